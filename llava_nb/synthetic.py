"""Drawn scenes and their conversations, in the schema of `HuggingFaceH4/llava-instruct-mix-vsft`.

The offline profile trains on these instead of the hub's photos. The task is chosen so that a frozen
random-weight ViT-B/32, a trained projector and a frozen 135M language model learn it in minutes on a
CPU: every scene is 1-3 copies of one shape in one colour (four colours, three shapes), all in the left
or all in the right half, each copy filling its own 2 x 2 block of the ViT's 32-pixel patches (never the
middle column, which straddles the halves). So every answer (colour, shape, count, side) is one word
that the whole image decides, and no question needs telling two different objects apart.

Held-out accuracy of stage 1 after 300 steps (batch 8) on earlier drawings, for the record: up to three
different objects of any size anywhere, 55-67 % (binding "the red one" to its shape or side was out of
reach); identical copies of any size anywhere, 80-84 % (count and shape stuck near 65 %); identical
copies each in one patch, 92 %; each on a 2 x 2 block (this drawing), 99 %.
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

IMAGE_SIZE = 224
PATCH = 32  # the ViT-B/32 patch: the image is a 7 x 7 grid of patches
BACKGROUND = (255, 255, 255)
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (240, 200, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three")
INSET = 2  # px: a shape is at most 60 px wide, inside its 64 px block...
MIN_SIZE = 54  # ...and at least 54 px; size and offset vary, so no two images repeat
# First patch column of a 2 x 2 block in each half: the middle column (96-128 px) straddles the halves
SIDE_COLUMNS = {"left": (0, 1), "right": (4, 5)}

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

# Three phrasings per question kind; every question is about the whole scene.
TEMPLATES = {
    "colour": ("What colour are the shapes?", "Which colour do the objects have?", "What is the colour of the shapes?"),
    "shape": ("What shape are the objects?", "Which shape do you see?", "What kind of shape is shown?"),
    "count": ("How many shapes are there?", "How many objects are in the image?", "Count the shapes in the image."),
    "position": ("Are the shapes on the left or the right?", "On which side are the objects, left or right?",
                 "Are the objects in the left or right half?"),
    "caption": ("Describe the image briefly.", "Give a short description of the image.", "What is in this picture?"),
}
QUESTION_KINDS = ("colour", "shape", "count", "position")  # the kinds scored by exact answer
_KIND_PATTERNS = [(kind, re.compile(re.escape(t), re.IGNORECASE)) for kind, ts in TEMPLATES.items() for t in ts]

_FORMAT_VERSION = 3  # bump when drawing or phrasing changes, so old folders are rebuilt


def draw_scene(rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
    """Draw 1-3 copies of one (colour, shape), each on its own 2 x 2 block of patches in one half."""
    n = int(rng.integers(1, 4))
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    side = "left" if rng.random() < 0.5 else "right"
    while True:  # rejection sampling: three blocks fit one above the other, so this ends quickly
        scene: list[dict] = []
        for _ in range(n):
            for _ in range(100):
                size = int(rng.integers(MIN_SIZE, 2 * PATCH - 2 * INSET + 1))  # a few px of play in its block
                x0 = PATCH * int(rng.choice(SIDE_COLUMNS[side])) + int(rng.integers(0, 2 * PATCH - size + 1))
                y0 = PATCH * int(rng.integers(0, IMAGE_SIZE // PATCH - 1)) + int(rng.integers(0, 2 * PATCH - size + 1))
                box = (x0, y0, x0 + size, y0 + size)
                if all(_apart(box, other["box"]) for other in scene):
                    scene.append({"colour": colour, "shape": shape, "side": side, "box": box})
                    break
        if len(scene) == n:
            break
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        x0, y0, x1, y1 = obj["box"]
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return image, scene


def _apart(a: tuple, b: tuple) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def answers(scene: list[dict]) -> dict[str, str]:
    """The one-word answer to each question kind."""
    first = scene[0]
    return {"colour": first["colour"], "shape": first["shape"], "count": NUMBERS[len(scene)], "position": first["side"]}


def caption(scene: list[dict]) -> str:
    """'Two red circles on the left.'"""
    first, n = scene[0], len(scene)
    return f"{NUMBERS[n].capitalize()} {first['colour']} {first['shape']}{'s' if n > 1 else ''} on the {first['side']}."


def question_kind(text: str) -> str:
    """The kind of a user question (colour/shape/count/position/caption) from its text; 'other' if unknown."""
    text = " ".join(text.replace("<image>", " ").split())
    for kind, pattern in _KIND_PATTERNS:
        if pattern.fullmatch(text):
            return kind
    return "other"


def make_sample(rng: np.random.Generator) -> dict:
    """One drawn image with a conversation: 1 turn (15 %) or 3-5, questions of distinct kinds, sometimes a caption.

    Several answers per image give the projector more to learn from per forward pass (the image tokens
    and the system prompt are most of the sequence)."""
    image, scene = draw_scene(rng)
    turns = [(_pick(rng, TEMPLATES[kind]), answer.capitalize() + ".") for kind, answer in answers(scene).items()]
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
                rows = [_new_row(rng, seen, keep=split == "train") for _ in range(min(shard_size, n - s * shard_size))]
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
    return ("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: train-*\n"
            "  - split: test\n    path: test-*\n---\n# Drawn shapes in the llava-instruct-mix-vsft schema\n\n"
            f"Written by `llava_nb.synthetic.write_dataset(root, {call})`, format {_FORMAT_VERSION}.\n")


def _encode(sample: dict) -> dict:
    buf = io.BytesIO()
    sample["images"][0].save(buf, format="PNG")
    return {"messages": sample["messages"], "images": [{"bytes": buf.getvalue(), "path": None}]}
