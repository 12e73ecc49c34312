"""Streams of llava-instruct-mix-vsft conversations, from a hub dataset id or local files: cleaned samples
in the hub's schema (bad ones dropped and counted, see `data.clean_sample`), the endless, resumable,
length-grouped stream that training reads, and the fixed held-out list that evaluation reads."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import torch

from . import config as cfg
from .data import SkipSample, clean_sample, content_items, note_skip
from .fsutil import hub_unreachable

DATA_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}
DEFAULT_SHUFFLE_BUFFER = (
    cfg.DataConfig.shuffle_buffer
)  # the train split's streaming shuffle when none is given


def stream(
    source: str,
    split: str,
    *,
    max_turns: int | None = None,
    seed: int = 0,
    shuffle_buffer: int | None = None,
    skipped: Counter | None = None,
) -> datasets.IterableDataset:
    """Stream `split` of a hub dataset id, a local folder, or local parquet/jsonl files, cleaned.

    Yields samples in the hub's schema with images decoded to RGB; samples with more than
    `max_turns` user/assistant exchanges are left out (`max_turns=1`: single-turn only, as LLaVA's
    stage 1). `shuffle_buffer=None` shuffles the train split (`DataConfig.shuffle_buffer`) and keeps the
    order of any other split; 0 never shuffles. Bad samples are dropped and counted by reason in `skipped`
    (pass `collator.skipped` to see every drop in one place).
    """
    skipped = Counter() if skipped is None else skipped
    ds = load_split(source, split)
    images = ds.features.get("images") if ds.features else None
    if isinstance(images, datasets.List) and isinstance(images.feature, datasets.Image):
        # decode ourselves, so that one broken image is a skipped sample and not a crashed stream
        ds = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
    if shuffle_buffer is None:
        shuffle_buffer = DEFAULT_SHUFFLE_BUFFER if split == "train" else 0
    if shuffle_buffer:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)

    def prepare(sample: dict) -> dict:
        try:
            sample = clean_sample(sample)
        except SkipSample as e:
            note_skip(skipped, e)
            return {"images": [], "_keep": False}
        n_turns = sum(m["role"] == "assistant" for m in sample["messages"])
        return {"images": sample["images"], "_keep": max_turns is None or n_turns <= max_turns}

    return ds.map(prepare).filter(lambda s: s["_keep"]).remove_columns("_keep")


def text_length(sample: dict) -> int:
    """Characters of text in a sample's messages: a cheap stand-in for its token count."""
    return sum(len(item.get("text") or "") for m in sample["messages"] for item in content_items(m))


def group_by_length(
    samples: Iterable[dict], group: int, *, window: int = 16, seed: int = 0
) -> Iterator[dict]:
    """The same samples, reordered so that each run of `group` holds samples of similar length.

    Reads `group * window` samples at a time, sorts them by `text_length`, cuts the sorted list into
    runs of `group` and yields the runs in a seeded random order (so long and short batches still
    alternate). A batch padded to its longest sample then carries little padding. Deterministic for a
    given input order and seed, so a resumed run can count its way back to the same place.
    """
    if group < 1 or window < 1:
        raise ValueError(f"group and window must be >= 1, got {group} and {window}")
    rng = random.Random(seed)
    samples = iter(samples)
    while chunk := list(itertools.islice(samples, group * window)):
        chunk.sort(key=text_length)
        runs = [chunk[i : i + group] for i in range(0, len(chunk), group)]
        rng.shuffle(runs)
        for run in runs:
            yield from run


def load_split(source: str, split: str) -> datasets.IterableDataset:
    """`split` of a hub dataset id, a local folder or local files, streamed as stored (nothing cleaned or
    decoded by this project); errors name the source and what was expected of it."""
    path = Path(source).expanduser()
    files = sorted(path.parent.glob(path.name)) if any(c in path.name for c in "*?[") else [path]
    if path.is_dir():
        kind, args = f"folder {source!r}", {"path": str(path)}
    elif files and all(f.is_file() and f.suffix in DATA_SUFFIXES for f in files):
        kind = f"files {source!r}"
        args = {"path": DATA_SUFFIXES[files[0].suffix], "data_files": {split: [str(f) for f in files]}}
    elif source.startswith(cfg.OFFLINE_PREFIX):
        raise ValueError(
            f"{source!r} names a generated dataset, not a path: pass the folder that "
            "llava_nb.sources.prepare_dataset(profile) returns"
        )
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        kind, args = f"hub dataset {source!r}", {"path": source}
    else:
        raise FileNotFoundError(
            f"dataset {source!r} not found: it is not an existing folder, nor existing "
            f"{'/'.join(DATA_SUFFIXES)} files, nor a hub id like 'owner/name'"
        )
    try:
        return datasets.load_dataset(**args, split=split, streaming=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{kind} holds no data files ({e}): expected parquet or jsonl files "
            f"named like {split}-00000-of-00001.parquet, as in a hub dataset"
        ) from e
    except (ConnectionError, OSError) as e:  # the hub unreachable, or offline mode with nothing cached
        if not kind.startswith("hub"):
            raise
        raise hub_unreachable(source, "dataset", e) from e
    except ValueError as e:
        if "split" not in str(e).lower():
            raise
        raise ValueError(
            f"{kind} has no split {split!r} ({e}). Pick one of its splits; a local folder names "
            f"them by file, as the hub does: {split}-00000-of-00001.parquet"
        ) from e


class TrainStream(torch.utils.data.IterableDataset):
    """The training samples as Trainer reads them: endless, in one order per seed, from sample `start` on.

    Pass k over the split is reshuffled with `set_epoch(k)` (the shuffle buffer's seed becomes seed + k),
    so the order depends on the seed alone. A resumed run starts at the sample count its checkpoint
    recorded: nothing is replayed, nothing skipped, and only raw samples are read past (no collation).
    `group` > 0 (and `length_window` > 0) reorders each window of `group * length_window` samples by length
    (`data.group_by_length`), so that batches of `group` samples need little padding.
    Under several processes accelerate wraps this in an IterableDatasetShard: every process reads the
    same stream and keeps its slice of each `batch x processes` window, so the count stays global.
    """

    def __init__(
        self,
        source: str,
        split: str,
        *,
        max_turns: int | None,
        seed: int,
        shuffle_buffer: int,
        skipped: Counter | None = None,
        start: int = 0,
        group: int = 0,
        length_window: int = cfg.TrainConfig.length_window,
    ):
        self.source, self.split, self.max_turns = source, split, max_turns
        self.seed, self.shuffle_buffer, self.start = seed, shuffle_buffer, start
        self.group, self.length_window = group, length_window
        self.skipped = Counter() if skipped is None else skipped

    def __iter__(self) -> Iterator[dict]:
        samples_of = stream(
            self.source,
            self.split,
            max_turns=self.max_turns,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            skipped=self.skipped,
        )
        position = 0
        for epoch in itertools.count():
            samples_of.set_epoch(epoch)
            samples: Iterable[dict] = samples_of
            if self.group and self.length_window:
                samples = group_by_length(
                    samples_of, self.group, window=self.length_window, seed=self.seed + epoch
                )
            n = 0
            for sample in samples:
                n += 1
                position += 1
                if position > self.start:
                    yield sample
            if n == 0:
                raise ValueError(
                    f"the {self.split!r} split of {self.source} yields no usable sample "
                    f"(max_turns={self.max_turns}, skipped: {dict(self.skipped)})"
                )


def held_out(
    source: str, split: str, n: int, *, max_turns: int | None, skipped: Counter | None = None
) -> list[dict]:
    """The first `n` usable samples of `split` in file order, as a list: the same eval set every time."""
    return list(
        itertools.islice(stream(source, split, max_turns=max_turns, shuffle_buffer=0, skipped=skipped), n)
    )
