"""Scoring a model's replies: the held-out loss, question turns with their true history, batched greedy
answers, exact match after normalisation (case, punctuation, articles, number words), and the result
(`Evaluation`) with its tables. `evaluate` runs these over a test split or POPE."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import infer, pope
from .data import IGNORE_INDEX, LlavaCollator, count_images
from .fsutil import percent
from .synthetic import question_kind

BATCH_SIZE = 8  # conversations per generate or loss batch
MAX_ANSWER_WORDS = 3  # a reply of at most this many words (normalised) is a short answer: exact match
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
        ]
    )
}
ARTICLES = {"a", "an", "the"}


# ------------------------------------------------------------------------------------ scoring


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, number words as digits: 'The Three.' -> '3'."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def is_correct(predicted: str, expected: str) -> bool:
    """Exact match after `normalize_answer`."""
    return normalize_answer(predicted) == normalize_answer(expected)


def is_short_answer(text: str) -> bool:
    """A reply that exact match can score: 1 to `MAX_ANSWER_WORDS` words after `normalize_answer`."""
    return 0 < len(normalize_answer(text).split()) <= MAX_ANSWER_WORDS


# ---------------------------------------------------------------------------------- questions


def _text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return " ".join(item.get("text") or "" for item in content if item.get("type") == "text").strip()


def question_turns(sample: dict, sample_index: int = 0) -> list[dict]:
    """Each user turn of a conversation with its true history, its kind and the expected reply."""
    messages = sample["messages"]
    turns = []
    for i, m in enumerate(messages):
        if m["role"] != "user" or i + 1 >= len(messages) or messages[i + 1]["role"] != "assistant":
            continue
        prompt = messages[: i + 1]  # system (if any), earlier turns with their true replies, this question
        question = _text(m)
        turns.append(
            {
                "sample": sample_index,
                "turn": len(turns),
                "kind": question_kind(question),
                "question": question,
                "expected": _text(messages[i + 1]),
                "prompt": prompt,
                "images": sample["images"][: count_images(prompt)],
            }
        )
    return turns


def answer_turns(
    model,
    processor,
    turns: list[dict],
    max_new_tokens: int,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Greedy replies to every turn, in batches of similar length (left padding); in `turns` order."""
    order = sorted(range(len(turns)), key=lambda i: len(turns[i]["prompt"]))  # less padding per batch
    replies: list[str] = [""] * len(turns)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out = infer.generate(
            model,
            processor,
            [turns[i]["prompt"] for i in chunk],
            [turns[i]["images"] for i in chunk],
            max_new_tokens,
        )
        for i, reply in zip(chunk, out):
            replies[i] = reply
        if progress:
            progress(f"answered {min(start + batch_size, len(order))}/{len(order)} questions")
    return replies


# ------------------------------------------------------------------------------------ the loss


@torch.inference_mode()
def eval_loss(
    model,
    processor,
    samples: list[dict],
    max_length: int,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[str], None] | None = None,
) -> tuple[float, int, Counter]:
    """Mean token loss over the supervised tokens of `samples`: (loss, supervised tokens, skipped by
    reason)."""
    collator = LlavaCollator(processor, max_length=max_length)
    total, tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = collator(samples[start : start + batch_size])
        labels = batch.pop("labels").to(model.device)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        logits = model(**batch).logits
        # token t predicts token t+1; summed here and divided once, so batches weigh by their tokens
        total += F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            labels[:, 1:].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
        if progress:
            progress(f"loss on {min(start + batch_size, len(samples))}/{len(samples)} samples")
    return (total / tokens if tokens else float("nan")), tokens, collator.skipped


# ------------------------------------------------------------------------------------ results


@dataclass
class Evaluation:
    """What `evaluate` measured: `metrics` (the JSON line) and every answer (with its image, for plots)."""

    metrics: dict[str, Any]
    # sample, kind, question, expected, predicted, correct, image
    answers: list[dict] = field(default_factory=list)

    def table(self) -> str:
        """The metrics and a few answers as aligned plain text."""
        return format_table(self)


def metrics_by_kind(answers: list[dict], kinds: Sequence[str]) -> dict[str, Any]:
    scored = [a for a in answers if a["correct"] is not None]
    per_kind = {}
    kinds = [*kinds, *sorted({a["kind"] for a in scored} - set(kinds))]  # the offline kinds, then any found
    for kind in kinds:
        rows = [a for a in scored if a["kind"] == kind]
        per_kind[kind] = {
            "accuracy": round(sum(a["correct"] for a in rows) / len(rows), 4) if rows else None,
            "n": len(rows),
        }
    accuracy = round(sum(a["correct"] for a in scored) / len(scored), 4) if scored else None
    return {"accuracy": accuracy, "n_questions": len(answers), "per_kind": per_kind}


def format_table(result: Evaluation, examples: int = 6) -> str:
    """Per-kind accuracy, the loss, and the first few answers, for a terminal (POPE: its metrics)."""
    m = result.metrics
    if m.get("benchmark") == "pope":
        return pope.report(m, result.answers, examples)
    header = f"checkpoint {m['checkpoint'] or '?'} · profile {m['profile']} · {m['n']} test samples"
    lines = [f"{header} · {m['seconds']} s", "", f"{'kind':<10}{'n':>5}{'accuracy':>10}"]
    for kind, row in m["per_kind"].items():
        lines.append(f"{kind:<10}{row['n']:>5}{percent(row['accuracy']):>10}")
    lines.append(f"{'all':<10}{m['n_questions']:>5}{percent(m['accuracy']):>10}")
    lines += ["", f"eval loss {m['eval_loss']:.4f} over {m['eval_tokens']} supervised tokens"]
    if m.get("note"):
        lines.append(f"note: {m['note']}")
    if result.answers:
        lines += ["", "examples (question -> answer | expected):"]
        for a in result.answers[:examples]:
            mark = "" if a["correct"] is None else (" ✓" if a["correct"] else " ✗")
            lines.append(f"  {a['question']} -> {a['predicted']!r} | {a['expected']!r}{mark}")
    return "\n".join(lines)


def comparison(results: dict[str, Evaluation]) -> dict[str, dict[str, Any]]:
    """Accuracy per kind, overall accuracy and eval loss of several evaluations, one column each."""
    out = {}
    for name, r in results.items():
        col = {kind: row["accuracy"] for kind, row in r.metrics["per_kind"].items()}
        out[name] = col | {"all": r.metrics["accuracy"], "eval_loss": r.metrics["eval_loss"]}
    return out
