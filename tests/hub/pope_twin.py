"""lmms-lab/POPE in miniature, for tests: its card's configs and features, its file layout, the three
categories in equal parts with as many "yes" as "no", COCO-sized RGB JPEGs. `twins.write_twins` writes it
beside the other hub twins."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

POPE_REPO = "lmms-lab/POPE"
POPE_CATEGORIES = ("adversarial", "popular", "random")  # in the order of the card's `Full` splits
# COCO object names, for the questions ("Is there a dog in the image?")
POPE_OBJECTS = (
    "person",
    "dog",
    "cat",
    "car",
    "bus",
    "chair",
    "bottle",
    "cup",
    "bicycle",
    "horse",
    "pizza",
    "umbrella",
    "bench",
    "clock",
    "laptop",
    "book",
    "bowl",
    "truck",
    "kite",
    "surfboard",
)


def pope_features():
    """lmms-lab/POPE's features, as its dataset card's `dataset_info` lists them."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features(
        {
            "id": text,
            "question_id": text,
            "question": text,
            "answer": text,
            "image_source": text,
            "image": datasets.Image(),
            "category": text,
        }
    )


def write_pope(folder: Path, rng: np.random.Generator, *, per_category: int = 24) -> None:
    """POPE's files in miniature: `data/test-0000{0,1,2}-of-00003.parquet` (the `default` config, split
    `test`), `Full/<category>-00000-of-00001.parquet` (config `Full`) and the card with both configs.

    As in the real split: categories in blocks of equal size (one shard each), half the answers "yes";
    each image is asked about twice, once about an object it shows and once about one it does not; the
    image column is the Image feature's struct of JPEG bytes and the COCO file name.
    """
    import datasets
    import pyarrow.parquet as pq

    features = pope_features()
    (folder / "data").mkdir(parents=True)
    (folder / "Full").mkdir()
    rows: dict[str, list[dict]] = {}
    n = 0
    for category in POPE_CATEGORIES:
        rows[category] = []
        for _ in range(per_category // 2):
            image_id = int(rng.integers(1, 581930))
            source = f"COCO_val2014_{image_id:012d}"
            image = {"bytes": _coco_jpeg(rng), "path": f"{source}.jpg"}
            present, absent = rng.choice(len(POPE_OBJECTS), size=2, replace=False)
            for obj, answer in ((POPE_OBJECTS[present], "yes"), (POPE_OBJECTS[absent], "no")):
                rows[category].append(
                    {
                        "id": str(n),
                        "question_id": str(len(rows[category]) + 1),
                        "question": f"Is there a {obj} in the image?",
                        "answer": answer,
                        "image_source": source,
                        "image": image,
                        "category": category,
                    }
                )
                n += 1
    for shard, category in enumerate(POPE_CATEGORIES):
        # the Arrow table with the features in its schema metadata, as push_to_hub writes it
        table = datasets.Dataset.from_list(rows[category], features=features).data.table
        pq.write_table(table, folder / "data" / f"test-{shard:05d}-of-{len(POPE_CATEGORIES):05d}.parquet")
        pq.write_table(table, folder / "Full" / f"{category}-00000-of-00001.parquet")
    (folder / "README.md").write_text(pope_card(per_category))


def pope_card(per_category: int) -> str:
    """The dataset card's YAML header as lmms-lab/POPE publishes it, with the twin's row counts."""
    fields = "".join(
        f"  - name: {name}\n    dtype: {'image' if name == 'image' else 'string'}\n"
        for name in pope_features()
    )
    full_splits = "".join(f"  - name: {c}\n    num_examples: {per_category}\n" for c in POPE_CATEGORIES)
    full_files = "".join(f"  - split: {c}\n    path: Full/{c}-*\n" for c in POPE_CATEGORIES)
    return (
        "---\ndataset_info:\n- config_name: Full\n  features:\n"
        + fields
        + "  splits:\n"
        + full_splits
        + "- config_name: default\n  features:\n"
        + fields
        + "  splits:\n  - name: test\n"
        + f"    num_examples: {per_category * len(POPE_CATEGORIES)}\n"
        + "configs:\n- config_name: Full\n  data_files:\n"
        + full_files
        + "- config_name: default\n  data_files:\n  - split: test\n    path: data/test-*\n---\n"
        + f"# Twin of {POPE_REPO} (tests.hub.twins)\n"
    )


def _coco_jpeg(rng: np.random.Generator) -> bytes:
    """An RGB JPEG of COCO's sizes (POPE's images: 500x243 to 640x640)."""
    from PIL import Image

    width, height = int(rng.choice([500, 612, 640])), int(rng.integers(243, 641))
    pixels = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((width, height)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()
