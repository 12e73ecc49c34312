"""POPE (object hallucination, yes/no questions about COCO photos): its questions, answer parsing and metrics.

- questions: a seeded subset of `lmms-lab/POPE`'s `test` split (9,000 questions, 3,000 per category:
  adversarial, popular, random; half of them "yes"), balanced over category and answer. The split's
  files are downloaded once into the hub cache (255 MB, reused by the next evaluation: notebook 06 runs
  two) and streamed from there with the images left undecoded; each question's place in the subset is
  a hash of the seed and its category and id, so the subset does not depend on the file order and only
  the chosen images are decoded. A row that cannot be used (a damaged image, an answer other than yes/no, an
  unknown category) is skipped and counted by reason.
- answers: `parse_yes_no` reads "Yes.", "yes, there is", "No", "Oui", "是的" ...; a reply that says both
  or neither is 'other', counted and reported, and scored as wrong.
- metrics (per category and overall): accuracy; precision, recall and F1 of "yes"; the yes-ratio (the
  share of replies read as yes). A model that always says yes: accuracy 0.5, recall 1.0, yes-ratio 1.0.

`evaluate.evaluate_pope` asks the model; this module only reads data and scores replies.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from .data import SkipSample, note_skip, to_rgb
from .fsutil import HubUnreachable, percent
from .streams import load_split

REPO = "lmms-lab/POPE"
SPLIT = "test"
CATEGORIES = ("adversarial", "popular", "random")
ANSWERS = ("yes", "no")
COLUMNS = ("id", "question_id", "question", "answer", "image_source", "image", "category")
INSTRUCTION = "Answer with yes or no."  # after the question, as LLaVA-1.5 adds a short answer format
MAX_NEW_TOKENS = 4  # "Yes", "No." or "Yes, there is": the first words decide
# Published POPE scores to set ours beside, in %, as each paper reports it (LLaVA-1.5: F1, the mean over
# the three categories; TinyLLaVA: its POPE column).
REFERENCES = {"LLaVA-1.5-7B": 85.9, "TinyLLaVA Qwen2-0.5B+SigLIP": 86.6}
CHANCE = 50.0  # accuracy of a coin toss, or of always answering "yes", on POPE's balanced answers

# Words that answer a yes/no question, after NFKC, case folding and accents dropped. Chinese and Japanese
# write no spaces: a reply's word is matched by its first characters instead (CJK_*; longest first).
YES_WORDS = {"yes", "yeah", "yep", "yup", "true", "correct", "oui", "si", "ja", "da", "sim", "tak"}
NO_WORDS = {"no", "not", "nope", "false", "non", "nein", "nao", "nie", "net", "none"}
CJK_NO = ("不是", "没有", "沒有", "不", "没", "沒", "否", "无", "無", "いいえ", "ない")
CJK_YES = ("是", "有", "对", "對", "はい", "ある")


class NotPope(ValueError):
    """A dataset that does not hold POPE's questions: the message names it and what it lacks."""


# ------------------------------------------------------------------------------------------ answers


def parse_yes_no(reply: str) -> str:
    """'yes', 'no' or 'other': what a free reply answers to a yes/no question.

    Words are compared after Unicode normalisation (full-width letters, accents, case), so "YES。",
    "Oui !" and "Sí" count; a reply with words of both kinds ("yes or no") or of neither is 'other'.
    """
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", reply).casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    found = set()
    for word in re.findall(r"[^\W_]+", text):
        if word in YES_WORDS:
            found.add("yes")
        elif word in NO_WORDS:
            found.add("no")
        elif _is_cjk(word[0]):
            if word.startswith(CJK_NO):
                found.add("no")
            elif word.startswith(CJK_YES):
                found.add("yes")
    return found.pop() if len(found) == 1 else "other"


def _is_cjk(char: str) -> bool:
    return "\u3040" <= char <= "\u30ff" or "\u3400" <= char <= "\u9fff" or "\uf900" <= char <= "\ufaff"


# ------------------------------------------------------------------------------------------ metrics


def metrics(rows: Sequence[dict]) -> dict[str, Any]:
    """POPE's metrics of `rows` (each with 'answer', the truth, and 'parsed', yes/no/other), overall
    and per category: accuracy, precision, recall and F1 of "yes", yes-ratio, counts."""
    out = _scores(rows)
    out["per_category"] = {
        c: _scores([r for r in rows if r["category"] == c])
        for c in [*CATEGORIES, *sorted({r["category"] for r in rows} - set(CATEGORIES))]
    }
    return out


def _scores(rows: Sequence[dict]) -> dict[str, Any]:
    n = len(rows)
    said = Counter(r["parsed"] for r in rows)
    tp = sum(r["parsed"] == "yes" and r["answer"] == "yes" for r in rows)
    positives = sum(r["answer"] == "yes" for r in rows)
    correct = sum(r["parsed"] == r["answer"] for r in rows)
    precision = tp / said["yes"] if said["yes"] else None
    recall = tp / positives if positives else None
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision and recall
        else (0.0 if precision is not None and recall is not None else None)
    )
    return {
        "accuracy": _round(correct / n if n else None),
        "precision": _round(precision),
        "recall": _round(recall),
        "f1": _round(f1),
        "yes_ratio": _round(said["yes"] / n if n else None),
        "n": n,
        "yes": said["yes"],
        "no": said["no"],
        "other": said["other"],
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def format_table(m: dict[str, Any]) -> str:
    """Per-category and overall POPE metrics as aligned plain text (percentages)."""
    lines = [
        f"{'category':<12}{'n':>5}{'accuracy':>10}{'precision':>11}{'recall':>8}{'F1':>8}{'yes':>7}"
        f"{'other':>7}"
    ]
    for name, row in [*m["per_category"].items(), ("all", m)]:
        if row["n"]:
            lines.append(
                f"{name:<12}{row['n']:>5}{percent(row['accuracy']):>10}{percent(row['precision']):>11}"
                f"{percent(row['recall']):>8}{percent(row['f1']):>8}{percent(row['yes_ratio']):>7}"
                f"{row['other']:>7}"
            )
    return "\n".join(lines)


def report(m: dict[str, Any], answers: Sequence[dict], examples: int = 6) -> str:
    """What `python -m llava_nb.evaluate --benchmark pope` prints before its JSON line."""
    lines = [
        f"POPE · checkpoint {m['checkpoint'] or '?'} · profile {m['profile']} · {m['n']} questions of "
        f"{m['dataset']} · {m['seconds']} s",
        "",
        format_table(m),
        "",
        f"other: {m['other']} replies neither yes nor no, scored as wrong. Published: "
        + ", ".join(f"{k} {v}" for k, v in REFERENCES.items())
        + f"; chance: {CHANCE:.0f} % accuracy.",
    ]
    if m.get("skipped"):
        lines.append(f"skipped questions: {m['skipped']}")
    lines += ["", "examples (question -> reply [read as] | expected):"]
    lines += [
        f"  {a['question']} -> {a['predicted']!r} [{a['parsed']}] | {a['expected']}"
        f"{' ✓' if a['correct'] else ' ✗'}"
        for a in answers[:examples]
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- questions


def questions(
    source: str = REPO,
    limit: int = 300,
    *,
    seed: int = 0,
    skipped: Counter | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """`limit` questions of POPE's test split, as equal a share as possible for each category and answer.

    `source` is the hub id (its files are fetched once into the hub cache, `local_copy`) or a local folder
    or parquet files in its layout. Each question comes with its image decoded to RGB; ordered by
    category, then by the seeded hash that chose it.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1 question, got {limit}")
    skipped = Counter() if skipped is None else skipped
    ds = load_split(local_copy(source, progress), SPLIT)
    missing = [c for c in COLUMNS if ds.features is not None and c not in ds.features]
    if missing:
        raise NotPope(
            f"{source} is not in POPE's layout: its {SPLIT!r} split lacks the column(s) {missing} "
            f"(expected {', '.join(COLUMNS)})"
        )
    ds = ds.cast_column("image", datasets.Image(decode=False))  # decode only the chosen few
    groups = [(c, a) for c in CATEGORIES for a in ANSWERS]
    quota = {g: limit // len(groups) + (i < limit % len(groups)) for i, g in enumerate(groups)}
    kept: dict[tuple, list] = {g: [] for g in groups}  # a max-heap (negated keys) of each group's smallest
    seen = 0
    for row in ds:
        seen += 1
        group = (row.get("category"), str(row.get("answer") or "").strip().lower())
        if group[0] not in CATEGORIES:
            note_skip(
                skipped,
                SkipSample(
                    "unknown_category", f"row id {row.get('id')!r}: {group[0]!r} is not one of {CATEGORIES}"
                ),
            )
            continue
        if group[1] not in ANSWERS:
            note_skip(
                skipped, SkipSample("not_yes_no", f"row id {row.get('id')!r}: answer {row.get('answer')!r}")
            )
            continue
        key = _key(seed, row)
        heap = kept[group]
        if len(heap) < quota[group]:
            heapq.heappush(heap, (_neg(key), seen, row))  # `seen` breaks ties: rows are not comparable
        elif quota[group] and key < _neg(heap[0][0]):
            heapq.heapreplace(heap, (_neg(key), seen, row))
    if progress:
        progress(f"POPE: read {seen} questions of {source}, chose {sum(map(len, kept.values()))}")
    chosen = sorted(
        (r for heap in kept.values() for _, _, r in heap),
        key=lambda r: (CATEGORIES.index(r["category"]), _key(seed, r)),
    )
    out = []
    for row in chosen:
        try:
            image = _image(row)
        except SkipSample as e:
            note_skip(skipped, e)
            continue
        out.append({**row, "answer": row["answer"].strip().lower(), "image": image})
    if not out:
        raise NotPope(f"no usable POPE question in {source} (skipped: {dict(skipped)})")
    return out


def local_copy(source: str, progress: Callable[[str], None] | None = None) -> str:
    """A hub id's `test` files downloaded into the hub cache (once: later calls find them there), as a
    pattern of local parquet files; a local folder or files as given.

    The files, not the snapshot folder: the hub cache links them to its blobs, and datasets' folder
    resolution passes over symbolic links (fsspec lists them as type 'other')."""
    if Path(source).expanduser().exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return source
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if progress:
        progress(f"POPE: fetching {source}'s {SPLIT} split from the hub, or its local cache")
    try:
        folder = snapshot_download(source, repo_type="dataset", allow_patterns=[f"data/{SPLIT}-*"])
        return str(Path(folder) / "data" / f"{SPLIT}-*.parquet")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:  # no network, offline mode, no such repo
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        raise HubUnreachable(
            f"cannot reach the dataset {source!r} on the Hugging Face Hub, and it is not in the "
            f"local cache ({why}). POPE downloads its {SPLIT} split once (255 MB for {REPO}): "
            "check the network (and that HF_HUB_OFFLINE is not set), or pass a local copy in "
            "the same layout with --dataset DIR"
        ) from e


def _image(row: dict) -> Image.Image:
    stored = row["image"]
    payload = stored.get("bytes") if isinstance(stored, dict) else None
    try:
        opened = Image.open(io.BytesIO(payload))
        opened.load()  # decode now: a truncated file fails here, as a skipped question
        return to_rgb(opened)
    except Exception as e:  # PIL raises many types for broken files; no bytes at all is a TypeError
        raise SkipSample(
            "undecodable_image",
            f"POPE row id {row.get('id')!r} ({row.get('image_source')}): {type(e).__name__}: {e}",
        ) from None


def _key(seed: int, row: dict) -> bytes:
    return hashlib.sha256(f"{seed}/{row['category']}/{row['question_id']}/{row['id']}".encode()).digest()


def _neg(key: bytes) -> bytes:
    """An order-reversing map on keys of one length, so heapq's min-heap keeps the largest on top."""
    return bytes(255 - b for b in key)
