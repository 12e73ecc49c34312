"""Drawn scenes and their conversations, in the schema of `HuggingFaceH4/llava-instruct-mix-vsft`.

The offline profile trains on these instead of the hub's photos. The task is chosen so that a frozen
random-weight ViT-B/32 plus a trained projector can solve it: 1-3 big flat shapes on a white
background, four colours, three shapes, each object wholly inside the left or the right half, so
every answer is one word that the pixels decide.
"""

from __future__ import annotations

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
BACKGROUND = (255, 255, 255)
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (240, 200, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three")
MIN_SIZE, MAX_SIZE = 64, 96  # px: each object spans 2 to 3 patches of 32 px each way
MARGIN = 6  # px between objects, and between an object and the midline or the border

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

# Two or three phrasings per question kind; {colour} and {shape} are filled from the scene.
TEMPLATES = {
    "colour": (
        "What colour is the {shape}?",
        "What is the colour of the {shape}?",
        "Which colour does the {shape} have?",
    ),
    "shape": (
        "What shape is the {colour} object?",
        "Which shape is {colour}?",
        "What is the {colour} shape?",
    ),
    "count": (
        "How many shapes are there?",
        "How many objects are in the image?",
        "Count the shapes in the image.",
    ),
    "position": (
        "Is the {colour} {shape} on the left or the right?",
        "Is the {colour} {shape} on the left or right side?",
        "Where is the {colour} {shape}, left or right?",
    ),
    "caption": (
        "Describe the image briefly.",
        "Give a short description of the image.",
        "What is in this picture?",
    ),
}
QUESTION_KINDS = ("colour", "shape", "count", "position")  # the kinds scored by exact answer
_KIND_PATTERNS = [  # each template as a regex: its {fields} match any word
    (kind, re.compile(re.sub(r"\\\{\w+\\\}", r"\\w+", re.escape(t)), re.IGNORECASE))
    for kind, templates in TEMPLATES.items()
    for t in templates
]

_FORMAT_VERSION = 2  # bump when drawing or phrasing changes, so old folders are rebuilt


def draw_scene(rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
    """Draw 1-3 non-overlapping shapes, distinct (colour, shape) pairs; return the image and the objects."""
    n = int(rng.integers(1, 4))
    while True:  # rejection sampling; a 224 px canvas fits three objects easily, so this rarely loops
        scene = _place_objects(rng, n)
        if scene is not None:
            break
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        x0, y0, x1, y1 = obj["box"]
        fill = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return image, scene


def _place_objects(rng: np.random.Generator, n: int) -> list[dict] | None:
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    half = IMAGE_SIZE // 2
    scene: list[dict] = []
    for k in chosen:
        colour, shape = pairs[int(k)]
        for _ in range(100):
            size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            side = "left" if rng.random() < 0.5 else "right"
            # the whole object lies in its half, so "left or right?" never depends on a pixel
            lo = MARGIN if side == "left" else half + MARGIN
            x0 = int(rng.integers(lo, lo + half - 2 * MARGIN - size + 1))
            y0 = int(rng.integers(MARGIN, IMAGE_SIZE - MARGIN - size + 1))
            box = (x0, y0, x0 + size, y0 + size)
            if all(_apart(box, other["box"]) for other in scene):
                scene.append({"colour": colour, "shape": shape, "side": side, "box": box})
                break
        else:
            return None
    return scene


def _apart(a: tuple, b: tuple) -> bool:
    return a[2] + MARGIN <= b[0] or b[2] + MARGIN <= a[0] or a[3] + MARGIN <= b[1] or b[3] + MARGIN <= a[1]


def caption(scene: list[dict]) -> str:
    """'A red circle, a blue square and a green triangle.': left half top to bottom, then right half."""
    ordered = sorted(scene, key=lambda o: (o["side"] != "left", o["box"][1]))
    parts = [f"a {o['colour']} {o['shape']}" for o in ordered]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def questions(scene: list[dict]) -> dict[str, list[tuple[dict, str]]]:
    """Every askable question per kind, as (template fields, one-word answer); ambiguous ones are left out."""
    shapes = [o["shape"] for o in scene]
    colours = [o["colour"] for o in scene]
    return {
        "colour": [({"shape": o["shape"]}, o["colour"]) for o in scene if shapes.count(o["shape"]) == 1],
        "shape": [({"colour": o["colour"]}, o["shape"]) for o in scene if colours.count(o["colour"]) == 1],
        "count": [({}, NUMBERS[len(scene)])],
        "position": [({"colour": o["colour"], "shape": o["shape"]}, o["side"]) for o in scene],
    }


def question_kind(text: str) -> str:
    """The kind of a user question (colour/shape/count/position/caption) from its text; 'other' if unknown."""
    text = " ".join(text.replace("<image>", " ").split())
    for kind, pattern in _KIND_PATTERNS:
        if pattern.fullmatch(text):
            return kind
    return "other"


def make_sample(rng: np.random.Generator) -> dict:
    """One drawn image with a conversation: a caption, one question, or 2-3 questions on the same image."""
    image, scene = draw_scene(rng)
    style = rng.random()
    if style < 0.3:
        turns = [(_pick(rng, TEMPLATES["caption"]), caption(scene))]
    else:
        n_turns = 1 if style < 0.6 else int(rng.integers(2, 4))
        askable = questions(scene)
        kinds = [k for k in QUESTION_KINDS if askable[k]]
        picked = rng.choice(len(kinds), size=min(n_turns, len(kinds)), replace=False)
        turns = []
        for i in picked:
            kind = kinds[int(i)]
            fields, answer = askable[kind][int(rng.integers(len(askable[kind])))]
            turns.append((_pick(rng, TEMPLATES[kind]).format(**fields), answer.capitalize() + "."))
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
    disjoint child seeds of `seed`; the same arguments give the same bytes.
    """
    root = Path(root)
    card = _card(seed=seed, n_train=n_train, n_test=n_test, shard_size=shard_size)
    if is_complete(root) and (root / "README.md").read_text() == card:
        return root
    with atomic_dir(root) as tmp:
        for split, n, seq in zip(("train", "test"), (n_train, n_test), np.random.SeedSequence(seed).spawn(2)):
            rng = np.random.default_rng(seq)
            n_shards = max(1, -(-n // shard_size))
            for s in range(n_shards):
                rows = [_encode(make_sample(rng)) for _ in range(min(shard_size, n - s * shard_size))]
                table = pa.Table.from_pylist(rows, schema=FEATURES.arrow_schema)
                pq.write_table(table, tmp / f"{split}-{s:05d}-of-{n_shards:05d}.parquet")
        (tmp / "README.md").write_text(card)
    return root


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
