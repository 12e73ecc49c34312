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
    seen = set()
    for _ in range(600):
        image, scene = synthetic.draw_scene(rng)
        assert image.mode == "RGB" and image.size == (224, 224)
        assert 1 <= len(scene) <= 3
        assert len({(o["colour"], o["shape"], o["side"]) for o in scene}) == 1  # copies of one object
        assert len({o["box"] for o in scene}) == len(scene)
        for o in scene:
            x0, y0, x1, y1 = o["box"]
            assert x1 - x0 == y1 - y0 >= synthetic.MIN_SIZE  # square box, 54-60 px, in one 2 x 2 block:
            assert (x0 // 32) == (x1 - 1) // 32 - 1 and y0 // 32 == (y1 - 1) // 32 - 1
            assert (x1 <= 96) if o["side"] == "left" else (x0 >= 128)  # wholly in its half, off the middle
            assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2 + 4)) == synthetic.COLOURS[o["colour"]]
        seen.add((scene[0]["colour"], scene[0]["shape"], scene[0]["side"], len(scene)))
    assert len(seen) == 4 * 3 * 2 * 3  # every combination occurs


def test_answers_and_caption():
    scene = [{"colour": "red", "shape": "circle", "side": "left", "box": (2, 2, 62, 62)},
             {"colour": "red", "shape": "circle", "side": "left", "box": (34, 66, 94, 126)}]
    assert synthetic.answers(scene) == {"colour": "red", "shape": "circle", "count": "two", "position": "left"}
    assert synthetic.caption(scene) == "Two red circles on the left."
    assert synthetic.caption(scene[:1]) == "One red circle on the left."


def test_question_kind_recognises_every_template():
    for kind, templates in synthetic.TEMPLATES.items():
        for t in templates:
            text = t
            assert synthetic.question_kind(text) == kind
            assert synthetic.question_kind("<image>\n" + text) == kind
    assert synthetic.question_kind("What is happening in this photo?") == "other"


def test_samples_follow_the_hub_schema():
    rng = np.random.default_rng(1)
    samples = [synthetic.make_sample(rng) for _ in range(100)]
    assert {len(s["messages"]) // 2 for s in samples} == {1, 3, 4, 5}
    for s in samples:
        assert len(s["images"]) == 1 and isinstance(s["images"][0], Image.Image)
        assert s["messages"][0]["content"][0] == {"type": "image", "text": None, "index": 0}
        for turn, (user, reply) in enumerate(zip(s["messages"][::2], s["messages"][1::2])):
            assert user["role"] == "user" and reply["role"] == "assistant"
            assert user["content"][-1]["type"] == "text" and user["content"][-1]["index"] is None
            assert turn == 0 or len(user["content"]) == 1  # the image only in the first turn
            kind = synthetic.question_kind(user["content"][-1]["text"])
            assert kind != "other"
            answer = reply["content"][0]["text"]
            if kind == "caption":
                assert answer.split()[0].lower() in synthetic.NUMBERS
                assert answer.endswith(("on the left.", "on the right."))
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
