"""The drawn dataset: scenes that decide their answers, the hub's schema, deterministic atomic writes."""

import hashlib

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from llava_nb import synthetic

# The `dataset_info.features` block of HuggingFaceH4/llava-instruct-mix-vsft's dataset card, verbatim.
HUB_CARD_FEATURES = """
- name: messages
  list:
  - name: content
    list:
    - name: index
      dtype: int64
    - name: text
      dtype: string
    - name: type
      dtype: string
  - name: role
    dtype: string
- name: images
  sequence: image
"""
HUB_FEATURES = datasets.Features._from_yaml_list(yaml.safe_load(HUB_CARD_FEATURES))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "ds"
    return synthetic.write_dataset(root, seed=3, n_train=40, n_test=12, shard_size=16)


def _digests(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.parquet"))}


def test_scenes_are_clear_and_decide_the_answers():
    rng = np.random.default_rng(0)
    for _ in range(200):
        image, scene = synthetic.draw_scene(rng)
        assert image.mode == "RGB" and image.size == (224, 224)
        assert 1 <= len(scene) <= 3
        assert len({(o["colour"], o["shape"]) for o in scene}) == len(scene)
        for i, o in enumerate(scene):
            x0, y0, x1, y1 = o["box"]
            assert x1 - x0 >= synthetic.MIN_SIZE
            assert (x1 <= 112) if o["side"] == "left" else (x0 >= 112)  # wholly in its half
            assert all(synthetic._apart(o["box"], p["box"]) for p in scene[i + 1:])
            assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == synthetic.COLOURS[o["colour"]]


def test_only_unambiguous_questions_are_asked():
    scene = [{"colour": "red", "shape": "circle", "side": "left", "box": (10, 10, 70, 70)},
             {"colour": "blue", "shape": "circle", "side": "right", "box": (130, 10, 190, 70)},
             {"colour": "red", "shape": "square", "side": "right", "box": (130, 100, 190, 160)}]
    asked = synthetic.questions(scene)
    assert asked["colour"] == [({"shape": "square"}, "red")]  # two circles: their colour is not asked
    assert asked["shape"] == [({"colour": "blue"}, "circle")]  # two red objects
    assert asked["count"] == [({}, "three")]
    assert [a for _, a in asked["position"]] == ["left", "right", "right"]
    assert synthetic.caption(scene) == "A red circle, a blue circle and a red square."


def test_question_kind_recognises_every_template():
    for kind, templates in synthetic.TEMPLATES.items():
        for t in templates:
            text = t.format(colour="green", shape="triangle")
            assert synthetic.question_kind(text) == kind
            assert synthetic.question_kind("<image>\n" + text) == kind
    assert synthetic.question_kind("What is happening in this photo?") == "other"


def test_samples_follow_the_hub_schema():
    rng = np.random.default_rng(1)
    samples = [synthetic.make_sample(rng) for _ in range(100)]
    assert {len(s["messages"]) // 2 for s in samples} == {1, 2, 3}
    for s in samples:
        assert len(s["images"]) == 1 and isinstance(s["images"][0], Image.Image)
        assert s["messages"][0]["content"][0] == {"type": "image", "text": None, "index": 0}
        for turn, (user, reply) in enumerate(zip(s["messages"][::2], s["messages"][1::2])):
            assert user["role"] == "user" and reply["role"] == "assistant"
            assert user["content"][-1]["type"] == "text" and user["content"][-1]["index"] is None
            assert turn == 0 or len(user["content"]) == 1  # the image only in the first turn
            kind = synthetic.question_kind(user["content"][-1]["text"])
            answer = reply["content"][0]["text"]
            if kind == "caption":
                assert len(s["messages"]) == 2 and answer.startswith("A ")
            else:
                words = {"colour": synthetic.COLOURS, "shape": synthetic.SHAPES, "count": synthetic.NUMBERS,
                         "position": ("left", "right")}
                assert answer.rstrip(".").lower() in words[kind]


def test_written_dataset_has_the_hub_features_and_file_names(written):
    assert sorted(p.name for p in written.glob("*.parquet")) == [
        "test-00000-of-00001.parquet", "train-00000-of-00003.parquet", "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet"]
    splits = datasets.load_dataset(str(written), streaming=True)
    assert set(splits) == {"train", "test"}
    assert splits["train"].features == HUB_FEATURES == synthetic.FEATURES
    first = next(iter(splits["test"]))
    assert isinstance(first["images"][0], Image.Image)
    assert sum(1 for _ in splits["train"]) == 40 and sum(1 for _ in splits["test"]) == 12


def test_same_seed_same_bytes_and_train_test_disjoint(written, tmp_path):
    again = synthetic.write_dataset(tmp_path / "again", seed=3, n_train=40, n_test=12, shard_size=16)
    assert _digests(again) == _digests(written)
    images = {split: {hashlib.sha256(row["images"][0]["bytes"]).hexdigest()
                      for row in datasets.load_dataset(str(written), split=split, streaming=True)
                      .cast_column("images", datasets.List(datasets.Image(decode=False)))}
              for split in ("train", "test")}
    assert len(images["train"]) == 40 and len(images["test"]) == 12
    assert not images["train"] & images["test"]


def test_write_is_idempotent_and_repairs_a_damaged_folder(tmp_path):
    root = synthetic.write_dataset(tmp_path / "ds", n_train=8, n_test=4, shard_size=4)
    before = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    synthetic.write_dataset(root, n_train=8, n_test=4, shard_size=4)
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == before  # complete: nothing rewritten
    digests = _digests(root)
    (root / "train-00001-of-00002.parquet").unlink()
    synthetic.write_dataset(root, n_train=8, n_test=4, shard_size=4)
    assert _digests(root) == digests
    synthetic.write_dataset(root, n_train=12, n_test=4, shard_size=4)  # other arguments: rebuilt
    assert len(list(root.glob("train-*.parquet"))) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp folders left beside it
