"""The drawn dataset: natural scenes that decide their answers, the hub's schema, deterministic writes."""

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


def test_scenes_are_natural_and_decide_the_answers():
    rng = np.random.default_rng(0)
    counts, sizes, sides, backgrounds = set(), [], set(), set()
    for _ in range(600):
        image, scene = synthetic.draw_scene(rng)
        assert image.mode == "RGB" and image.size == (224, 224)
        assert 1 <= len(scene) <= 3
        assert len({o["colour"] for o in scene}) == len({o["shape"] for o in scene}) == len(scene)
        owner = synthetic.object_map(scene)
        for k, o in enumerate(scene):
            x0, y0, x1, y1 = o["box"]
            lo, hi = synthetic.BIG_SIZE if k == 0 else synthetic.SMALL_SIZE
            assert lo <= x1 - x0 == y1 - y0 <= hi
            assert 0 <= x0 and 0 <= y0 and x1 <= 224 and y1 <= 224
            centre = (x0 + x1) / 2
            assert abs(centre - 112) >= synthetic.MARGIN
            assert o["side"] == ("left" if centre < 112 else "right")
            assert image.getpixel((int(centre), (y0 + y1) // 2 + 4)) == synthetic.COLOURS[o["colour"]]
            assert owner[(y0 + y1) // 2 + 4, int(centre)] == k + 1
            sizes.append(x1 - x0)
            sides.add((o["side"], y0 < 112))
        assert synthetic.largest(scene) is scene[0]
        pixels = np.asarray(image)
        for k, o in enumerate(scene):  # the object map covers exactly the pixels each object painted
            assert (pixels[owner == k + 1] == synthetic.COLOURS[o["colour"]]).all()
        for a in scene:  # no two boxes touch
            assert all(a is b or synthetic._apart(a["box"], b["box"]) for b in scene)
        counts.add(len(scene))
        backgrounds.add(image.getpixel((0, 0)))
    assert counts == {1, 2, 3} and len(sides) == 4  # every count, every quadrant
    assert min(sizes) < 40 and max(sizes) > 88 and len(backgrounds) > 500


def test_questions_answers_and_captions():
    scene = [
        {"colour": "blue", "shape": "square", "side": "right", "box": (140, 10, 210, 80)},
        {"colour": "red", "shape": "circle", "side": "left", "box": (2, 2, 38, 38)},
    ]
    assert synthetic.caption(scene) == "A red circle on the left and a blue square on the right."
    assert synthetic.caption(scene[:1]) == "A blue square on the right."
    assert synthetic.clip_caption(scene) == (
        "a small red circle on the left and a large blue square on the right"
    )
    rng = np.random.default_rng(0)
    for _ in range(20):
        qa = synthetic.questions(scene, rng)
        assert {k: a for k, (_, a) in qa.items()} == {
            "colour": "blue",
            "shape": "square",
            "count": "two",
            "position": "right",
        }
        assert all(synthetic.question_kind(q) == kind for kind, (q, _) in qa.items())
    assert {k: a for k, (_, a) in synthetic.questions(scene[1:], rng).items()} == {
        "colour": "red",
        "shape": "circle",
        "count": "one",
        "position": "left",
    }


def test_question_kind_recognises_every_template():
    for kind, templates in synthetic.TEMPLATES.items():
        for t in templates:
            text = t.format(colour="green", shape="triangle", side="left")
            assert synthetic.question_kind(text) == kind
            assert synthetic.question_kind("<image>\n" + text) == kind
    assert synthetic.question_kind("What is happening in this photo?") == "other"
    assert synthetic.question_kind("Is there a dog?") == "other"


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
                assert answer.startswith("A ") and answer.endswith(("on the left.", "on the right."))
            else:
                words = {
                    "colour": tuple(synthetic.COLOURS),
                    "shape": synthetic.SHAPES,
                    "count": synthetic.NUMBERS,
                    "position": ("left", "right"),
                }
                assert answer.rstrip(".").lower() in words[kind]


def test_written_dataset_has_the_hub_features_and_file_names(written):
    assert sorted(p.name for p in written.glob("*.parquet")) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet",
    ]
    splits = datasets.load_dataset(str(written), streaming=True)
    assert set(splits) == {"train", "test"}
    assert splits["train"].features == HUB_FEATURES == synthetic.FEATURES
    first = next(iter(splits["test"]))
    assert isinstance(first["images"][0], Image.Image)
    assert sum(1 for _ in splits["train"]) == 40 and sum(1 for _ in splits["test"]) == 12


def test_same_seed_same_bytes_and_train_test_disjoint(written, tmp_path):
    again = synthetic.write_dataset(tmp_path / "again", seed=3, n_train=40, n_test=12, shard_size=16)
    assert _digests(again) == _digests(written)
    images = {
        split: {
            hashlib.sha256(row["images"][0]["bytes"]).hexdigest()
            for row in datasets.load_dataset(str(written), split=split, streaming=True).cast_column(
                "images", datasets.List(datasets.Image(decode=False))
            )
        }
        for split in ("train", "test")
    }
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
