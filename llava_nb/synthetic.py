"""Drawn scenes and their conversations, in the schema of `HuggingFaceH4/llava-instruct-mix-vsft`.

The offline profile trains on these instead of the hub's photos, and its CLIP twin is pretrained on the
same kind of scene (`llava_nb.clip_pretrain`). A scene is 1-3 different objects (no two share a colour
or a shape) anywhere on a pale background of varied tint and gradient; one of them is clearly the largest
(64-96 px against 32-48 px). Questions have one-word answers: the colour, the shape and the side (left or
right) of the largest object, and how many objects there are; a quarter of the conversations add a
caption naming every object. An object's centre keeps `MARGIN` px from the vertical midline, so its side
is never a toss-up. Train and test scenes come from disjoint seeds.

Asking about the largest object keeps one word to copy per question: with the language model frozen, the
projector learns to put a word into the image tokens for the model to copy, much less to make the model
compare its question with them. The question designs tried before, and how far each got:
docs/offline-profile.md.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from .fsutil import atomic_dir, is_complete

IMAGE_SIZE = 224  # square, so CLIP's centre crop keeps the whole scene
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (240, 200, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three")
MAX_OBJECTS = 3
BIG_SIZE = (64, 96)  # px, the side of the largest object's square box (the first one drawn)...
SMALL_SIZE = (32, 48)  # ...and of the others, so "the largest" is never a close call
MIN_SIZE, MAX_SIZE = SMALL_SIZE[0], BIG_SIZE[1]
LARGE = 56  # px: from this size on an object is "large" in the CLIP captions
MARGIN = 16  # px between an object's centre and the vertical midline
GAP = 4  # px between the boxes of two objects

# The hub's features (its dataset card): messages[].content[] = {index, text, type}, images = [Image].
FEATURES = datasets.Features(
    {
        "messages": datasets.List(
            {
                "content": datasets.List(
                    {
                        "index": datasets.Value("int64"),
                        "text": datasets.Value("string"),
                        "type": datasets.Value("string"),
                    }
                ),
                "role": datasets.Value("string"),
            }
        ),
        "images": datasets.List(datasets.Image()),
    }
)

# Three phrasings per question kind; {colour}, {shape} and {side} are the thing asked about.
TEMPLATES = {
    "colour": (
        "What colour is the largest shape?",
        "Which colour is the biggest object?",
        "What is the colour of the largest object?",
    ),
    "shape": (
        "What shape is the largest object?",
        "Which shape is the biggest one?",
        "What kind of shape is the largest object?",
    ),
    "count": (
        "How many shapes are there?",
        "How many objects are in the image?",
        "Count the shapes in the image.",
    ),
    "position": (
        "Is the largest shape on the left or the right?",
        "On which side is the biggest object, left or right?",
        "Is the largest object in the left or right half?",
    ),
    "caption": (
        "Describe the image briefly.",
        "Give a short description of the image.",
        "What is in this picture?",
    ),
}
QUESTION_KINDS = ("colour", "shape", "count", "position")  # the kinds scored by exact answer


def _pattern(template: str) -> re.Pattern:
    slots = {"colour": "|".join(COLOURS), "shape": "|".join(SHAPES), "side": "left|right"}
    text = re.escape(template)
    for slot, words in slots.items():
        text = text.replace(re.escape("{" + slot + "}"), f"(?:{words})")
    return re.compile(text, re.IGNORECASE)


_KIND_PATTERNS = [(kind, _pattern(t)) for kind, ts in TEMPLATES.items() for t in ts]

SCENE_VERSION = 5  # bump when drawing or captions change: the offline CLIP (trained on them) is rebuilt
_FORMAT_VERSION = 6  # bump when drawing or phrasing changes, so old dataset folders are rebuilt


def draw_scene(rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
    """Draw 1-3 objects of distinct colours and shapes anywhere on a tinted background, the first one clearly
    the largest (`BIG_SIZE` px, the others `SMALL_SIZE`); the scene lists them in drawing order."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    colours = [list(COLOURS)[int(i)] for i in rng.permutation(len(COLOURS))[:n]]
    shapes = [SHAPES[int(i)] for i in rng.permutation(len(SHAPES))[:n]]
    while True:  # rejection sampling: the boxes fit easily, so this ends quickly
        scene: list[dict] = []
        for k, (colour, shape) in enumerate(zip(colours, shapes)):
            lo, hi = BIG_SIZE if k == 0 else SMALL_SIZE
            for _ in range(100):
                size = int(rng.integers(lo, hi + 1))
                x0, y0 = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
                box = (x0, y0, x0 + size, y0 + size)
                centre = x0 + size / 2
                if abs(centre - IMAGE_SIZE / 2) >= MARGIN and all(_apart(box, o["box"]) for o in scene):
                    side = "left" if centre < IMAGE_SIZE / 2 else "right"
                    scene.append({"colour": colour, "shape": shape, "side": side, "box": box})
                    break
        if len(scene) == n:
            break
    image = _background(rng)
    _draw_objects(ImageDraw.Draw(image), scene, [COLOURS[o["colour"]] for o in scene])
    return image, scene


def _draw_objects(draw: ImageDraw.ImageDraw, scene: list[dict], fills: list) -> None:
    for obj, fill in zip(scene, fills):
        x0, y0, x1, y1 = obj["box"]
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)


def object_map(scene: list[dict]) -> np.ndarray:
    """(224, 224) uint8: 0 where the background shows, k + 1 where scene[k] does (whose each pixel is)."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw_objects(ImageDraw.Draw(mask), scene, [k + 1 for k in range(len(scene))])
    return np.asarray(mask)


def _background(rng: np.random.Generator) -> Image.Image:
    """A pale tint with a linear gradient in a random direction."""
    base = rng.uniform(190, 250, size=3)
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction)
    ramp = np.linspace(-1, 1, IMAGE_SIZE)
    gradient = direction[0] * ramp[None, :] + direction[1] * ramp[:, None]  # (H, W), in [-1.4, 1.4]
    pixels = base.astype(np.float32) + np.float32(rng.uniform(0, 25)) * gradient[..., None].astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _apart(a: tuple, b: tuple) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def largest(scene: list[dict]) -> dict:
    """The object the questions ask about: the largest one (its box side)."""
    return max(scene, key=lambda o: o["box"][2] - o["box"][0])


def questions(scene: list[dict], rng: np.random.Generator) -> dict[str, tuple[str, str]]:
    """One (question, one-word answer) per kind: the largest object's colour, shape and side; the count."""
    big = largest(scene)
    answers = {
        "colour": big["colour"],
        "shape": big["shape"],
        "count": NUMBERS[len(scene)],
        "position": big["side"],
    }
    return {kind: (_pick(rng, TEMPLATES[kind]), answers[kind]) for kind in QUESTION_KINDS}


def caption(scene: list[dict]) -> str:
    """'A red circle on the left and a blue square on the right.' (objects from left to right)"""
    parts = [f"a {o['colour']} {o['shape']} on the {o['side']}" for o in _left_to_right(scene)]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def clip_caption(scene: list[dict]) -> str:
    """What the CLIP twin is pretrained to match: 'a large red circle on the left and a small blue ...'"""
    parts = [
        f"a {'large' if o['box'][2] - o['box'][0] >= LARGE else 'small'} {o['colour']} {o['shape']} "
        f"on the {o['side']}"
        for o in _left_to_right(scene)
    ]
    return " and ".join(parts)


def _left_to_right(scene: list[dict]) -> list[dict]:
    return sorted(scene, key=lambda o: o["box"][0] + o["box"][2])


def question_kind(text: str) -> str:
    """The kind of a user question (colour/shape/count/position/caption) from its text; 'other' if unknown."""
    text = " ".join(text.replace("<image>", " ").split())
    for kind, pattern in _KIND_PATTERNS:
        if pattern.fullmatch(text):
            return kind
    return "other"


def make_sample(rng: np.random.Generator) -> dict:
    """One drawn image with a conversation: 1 turn (15 %) or 3-5, questions of distinct kinds, sometimes a
    caption.

    Several answers per image give the projector more to learn from per forward pass (the image tokens
    and the system prompt are most of the sequence)."""
    image, scene = draw_scene(rng)
    turns = [(question, answer.capitalize() + ".") for question, answer in questions(scene, rng).values()]
    if rng.random() < 0.25:
        turns.append((_pick(rng, TEMPLATES["caption"]), caption(scene)))
    n_turns = 1 if rng.random() < 0.15 else int(rng.integers(3, len(turns) + 1))  # some single-turn samples
    turns = [turns[int(i)] for i in rng.permutation(len(turns))][:n_turns]
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = [{"type": "image", "text": None, "index": 0}] if i == 0 else []
        content.append({"type": "text", "text": question, "index": None})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer, "index": None}]})
    return {"messages": messages, "images": [image]}


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def write_dataset(
    root: str | os.PathLike, *, seed: int = 0, n_train: int = 4000, n_test: int = 300, shard_size: int = 1000
) -> Path:
    """Write train/test parquet shards under `root` (hub names and features); nothing if already complete.

    Read them back with `datasets.load_dataset(str(root), split="train", streaming=True)` (the folder
    convention maps `train-00000-of-00004.parquet` to the train split). Train and test are drawn from
    disjoint child seeds of `seed`, and a test image that equals a train image is drawn again, so the
    test split is truly held out; the same arguments give the same bytes.
    """
    root = Path(root)
    card = _card(seed=seed, n_train=n_train, n_test=n_test, shard_size=shard_size)
    if is_complete(root) and (root / "README.md").read_text() == card:
        return root
    seen: set[bytes] = set()  # digests of the train images: a test image never repeats one
    with atomic_dir(root) as tmp:
        for split, n, seq in zip(("train", "test"), (n_train, n_test), np.random.SeedSequence(seed).spawn(2)):
            rng = np.random.default_rng(seq)
            n_shards = max(1, -(-n // shard_size))
            for s in range(n_shards):
                rows = [
                    _new_row(rng, seen, keep=split == "train")
                    for _ in range(min(shard_size, n - s * shard_size))
                ]
                table = pa.Table.from_pylist(rows, schema=FEATURES.arrow_schema)
                pq.write_table(table, tmp / f"{split}-{s:05d}-of-{n_shards:05d}.parquet")
        (tmp / "README.md").write_text(card)
    return root


def _new_row(rng: np.random.Generator, seen: set[bytes], *, keep: bool) -> dict:
    while True:
        row = _encode(make_sample(rng))
        digest = hashlib.sha256(row["images"][0]["bytes"]).digest()
        if keep:
            seen.add(digest)
            return row
        if digest not in seen:
            return row


def _card(**params: int) -> str:
    # Also the completeness key: a folder written with other arguments or an older drawing is rebuilt.
    call = ", ".join(f"{k}={v}" for k, v in params.items())
    # The YAML header is the hub's dataset-card `configs` block: which files make which split.
    return (
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: train-*\n"
        "  - split: test\n    path: test-*\n---\n# Drawn shapes in the llava-instruct-mix-vsft schema\n\n"
        f"Written by `llava_nb.synthetic.write_dataset(root, {call})`, format {_FORMAT_VERSION}.\n"
    )


def _encode(sample: dict) -> dict:
    buf = io.BytesIO()
    sample["images"][0].save(buf, format="PNG")
    return {"messages": sample["messages"], "images": [{"bytes": buf.getvalue(), "path": None}]}
