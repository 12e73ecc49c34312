"""Held-out accuracy and loss of an exported model, or of the untrained one; `python -m llava_nb.evaluate`.

- eval loss: mean cross-entropy over the supervised (assistant) tokens of the test split, batched by
  the training collator (every token weighs the same, whatever its batch).
- accuracy: every question turn of the test split whose expected reply is a short answer (at most
  `MAX_ANSWER_WORDS` words) is answered by batched greedy generation, with the true earlier turns as
  history (teacher forcing), and scored by exact match after normalisation (case, punctuation,
  articles, number words). Longer replies (captions, descriptions) count in the loss only. The offline
  scenes' questions are reported by kind (colour, shape, count, position); a dataset of your own
  (`--dataset`) is scored the same way, its questions of unknown phrasing under the kind 'other'.
- the hub's llava-instruct-mix-vsft (the t4 default) has free-form answers, so there is no accuracy
  (`accuracy: null`); the model answers a fixed set of public-domain images instead, for a person to read.

`--benchmark pope` scores POPE instead (`llava_nb.pope`: a seeded, category-balanced subset of
lmms-lab/POPE, yes/no replies, accuracy, precision, recall, F1 and yes-ratio per category).

The command prints a table and, as its last line, one JSON object (`accuracy`, `n`, `eval_loss`, ...); for an
exported folder it also puts those scores into the folder's model card (`cards.record_scores`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import cards, infer, pope
from . import config as cfg
from .data import IGNORE_INDEX, LlavaCollator, count_images
from .device import default_device, default_dtype
from .sources import HubUnreachable, prepare_backbones, prepare_dataset
from .streams import held_out
from .synthetic import QUESTION_KINDS, question_kind

log = logging.getLogger(__name__)

UNTRAINED = "untrained"  # --checkpoint value: surgery.build's model, projector at init
BENCHMARKS = ("test", "pope")  # the profile's test split (loss, short answers), or POPE
SHORT_ANSWER_TOKENS = 10  # at least this many new tokens for a dataset of one's own: a few words
MAX_ANSWER_WORDS = 3  # a reply of at most this many words (normalised) is a short answer: exact match
# Replies are paragraphs: no accuracy, the fixed images instead
FREE_FORM_DATASETS = ("HuggingFaceH4/llava-instruct-mix-vsft",)
BATCH_SIZE = 8
T4_IMAGES = cfg.T4_IMAGES  # what the t4 profile answers about instead of scoring
T4_NOTE = ("no accuracy: llava-instruct-mix-vsft's answers are free-form sentences; read the answers on the "
           "fixed images instead")

NUMBER_WORDS = {w: str(i) for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven",
                                                  "eight", "nine", "ten", "eleven", "twelve"])}
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
        turns.append({
            "sample": sample_index, "turn": len(turns), "kind": question_kind(question), "question": question,
            "expected": _text(messages[i + 1]), "prompt": prompt, "images": sample["images"][: count_images(prompt)],
        })
    return turns


def answer_turns(model, processor, turns: list[dict], max_new_tokens: int, batch_size: int = BATCH_SIZE,
                 progress: Callable[[str], None] | None = None) -> list[str]:
    """Greedy replies to every turn, in batches of similar length (left padding); in `turns` order."""
    order = sorted(range(len(turns)), key=lambda i: len(turns[i]["prompt"]))  # less padding per batch
    replies: list[str] = [""] * len(turns)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        out = infer.generate(model, processor, [turns[i]["prompt"] for i in chunk],
                             [turns[i]["images"] for i in chunk], max_new_tokens)
        for i, reply in zip(chunk, out):
            replies[i] = reply
        if progress:
            progress(f"answered {min(start + batch_size, len(order))}/{len(order)} questions")
    return replies


# ------------------------------------------------------------------------------------ the loss


@torch.inference_mode()
def eval_loss(model, processor, samples: list[dict], max_length: int, batch_size: int = BATCH_SIZE,
              progress: Callable[[str], None] | None = None) -> tuple[float, int, Counter]:
    """Mean token loss over the supervised tokens of `samples`: (loss, supervised tokens, skipped by reason)."""
    collator = LlavaCollator(processor, max_length=max_length)
    total, tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = collator(samples[start:start + batch_size])
        labels = batch.pop("labels").to(model.device)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        logits = model(**batch).logits
        # token t predicts token t+1; summed here and divided once, so batches weigh by their tokens
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
        tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
        if progress:
            progress(f"loss on {min(start + batch_size, len(samples))}/{len(samples)} samples")
    return (total / tokens if tokens else float("nan")), tokens, collator.skipped


# ---------------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """What `evaluate` measured: `metrics` (the JSON line) and every answer (with its image, for plots)."""

    metrics: dict[str, Any]
    answers: list[dict] = field(default_factory=list)  # sample, kind, question, expected, predicted, correct, image

    def table(self) -> str:
        """The metrics and a few answers as aligned plain text."""
        return format_table(self)


def held_out_samples(profile: cfg.Profile, limit: int) -> list[dict]:
    """The first `limit` cleaned samples of the profile's test split, in file order."""
    source = prepare_dataset(profile)
    return held_out(source, profile.data.test_split, limit, max_turns=None)


def evaluate(model, processor, profile: cfg.Profile, limit: int | None = None, *, batch_size: int = BATCH_SIZE,
             max_new_tokens: int | None = None, samples: list[dict] | None = None,
             progress: Callable[[str], None] | None = None, name: str = "") -> Evaluation:
    """Eval loss on the test split and answers (short answers scored; the hub's: fixed images)."""
    start = time.perf_counter()
    offline = profile.data.dataset.startswith(cfg.OFFLINE_PREFIX)  # the drawn scenes: scored by kind
    scored = profile.data.dataset not in FREE_FORM_DATASETS
    limit = limit or profile.eval.limit
    own = scored and not offline  # a dataset of one's own: short answers of a few words
    max_new_tokens = max_new_tokens or max(profile.eval.max_new_tokens, SHORT_ANSWER_TOKENS if own else 0)
    model.eval()
    samples = samples if samples is not None else held_out_samples(profile, limit)
    loss, tokens, skipped = eval_loss(model, processor, samples, profile.data.max_length, batch_size, progress)
    if scored:
        turns = [t for i, s in enumerate(samples) for t in question_turns(s, i)
                 if is_short_answer(t["expected"])]
    else:
        turns = []
        for i, (url, question, expected) in enumerate(T4_IMAGES):
            try:
                images = [infer.load_image(url)]
            except (ConnectionError, ValueError) as e:
                log.warning("%s", e)
                if progress:
                    progress(f"skipped {url}: {e}")
                continue
            turns.append({"sample": i, "turn": 0, "kind": "other", "question": question, "expected": expected,
                          "prompt": [infer.user_turn(question)], "images": images, "url": url})
    replies = answer_turns(model, processor, turns, max_new_tokens, batch_size, progress)
    answers = [{"sample": t["sample"], "turn": t["turn"], "kind": t["kind"], "question": t["question"],
                "expected": t["expected"], "predicted": reply,
                "correct": is_correct(reply, t["expected"]) if scored else None,
                "image": t["images"][0] if t["images"] else None}
               for t, reply in zip(turns, replies)]
    metrics = _metrics(answers, QUESTION_KINDS if offline else ())
    metrics |= {"benchmark": "test", "dataset": profile.data.dataset, "eval_loss": round(loss, 4),
                "n": len(samples), "eval_tokens": tokens, "profile": profile.name,
                "checkpoint": name, "max_new_tokens": max_new_tokens,
                "seconds": round(time.perf_counter() - start, 1)}
    if skipped:
        metrics["skipped"] = dict(skipped)
    if not scored:
        metrics["note"] = T4_NOTE
    elif not answers:
        metrics["note"] = f"no test reply of at most {MAX_ANSWER_WORDS} words: nothing to score"
    return Evaluation(metrics, answers)


def _metrics(answers: list[dict], kinds: Sequence[str]) -> dict[str, Any]:
    scored = [a for a in answers if a["correct"] is not None]
    per_kind = {}
    kinds = [*kinds, *sorted({a["kind"] for a in scored} - set(kinds))]  # the offline kinds, then any found
    for kind in kinds:
        rows = [a for a in scored if a["kind"] == kind]
        per_kind[kind] = {"accuracy": round(sum(a["correct"] for a in rows) / len(rows), 4) if rows else None,
                          "n": len(rows)}
    accuracy = round(sum(a["correct"] for a in scored) / len(scored), 4) if scored else None
    return {"accuracy": accuracy, "n_questions": len(answers), "per_kind": per_kind}


def evaluate_pope(model, processor, profile: cfg.Profile, limit: int | None = None, *,
                  source: str = pope.REPO, batch_size: int = BATCH_SIZE, max_new_tokens: int | None = None,
                  questions: list[dict] | None = None, progress: Callable[[str], None] | None = None,
                  name: str = "") -> Evaluation:
    """POPE on `limit` questions (default: the profile's `eval.pope_questions`): each image with its
    question and `pope.INSTRUCTION` in the chat template, greedy replies of a few tokens, POPE's metrics."""
    start = time.perf_counter()
    model.eval()
    skipped: Counter = Counter()
    if questions is None:
        questions = pope.questions(source, limit or profile.eval.pope_questions, seed=profile.seed,
                                   skipped=skipped, progress=progress)
    max_new_tokens = max_new_tokens or pope.MAX_NEW_TOKENS
    turns = [{"prompt": [infer.user_turn(f"{q['question']} {pope.INSTRUCTION}")], "images": [q["image"]]}
             for q in questions]
    replies = answer_turns(model, processor, turns, max_new_tokens, batch_size, progress)
    answers = []
    for i, (q, reply) in enumerate(zip(questions, replies)):
        parsed = pope.parse_yes_no(reply)
        answers.append({"sample": i, "turn": 0, "kind": q["category"], "category": q["category"],
                        "question": q["question"], "expected": q["answer"], "answer": q["answer"],
                        "predicted": reply, "parsed": parsed, "correct": parsed == q["answer"],
                        "image": q["image"]})
    metrics = {"benchmark": "pope", **pope.metrics(answers), "dataset": source, "seed": profile.seed,
               "profile": profile.name, "checkpoint": name, "max_new_tokens": max_new_tokens,
               "seconds": round(time.perf_counter() - start, 1)}
    if skipped:
        metrics["skipped"] = dict(skipped)
    return Evaluation(metrics, answers)


def benchmark(model, processor, profile: cfg.Profile, limit: int | None = None, *, measured: Evaluation,
              name: str = "", progress: Callable[[str], None] | None = None) -> Evaluation:
    """The profile's score to compare (`eval.benchmark`): POPE on t4; on the offline profile, whose scenes
    POPE does not fit, the test split's accuracy, i.e. `measured` (the `evaluate` already run) as it is."""
    if profile.eval.benchmark == "pope":
        return evaluate_pope(model, processor, profile, limit, progress=progress, name=name)
    return measured


def references(profile: cfg.Profile) -> tuple[dict[str, float], float | None]:
    """Published scores to set the profile's benchmark beside and its chance level (in %): POPE's; none
    for the scenes (their chance differs by kind: 25 % for colour to 50 % for the side)."""
    return (dict(pope.REFERENCES), pope.CHANCE) if profile.eval.benchmark == "pope" else ({}, None)


def format_table(result: Evaluation, examples: int = 6) -> str:
    """Per-kind accuracy, the loss, and the first few answers, for a terminal (POPE: its metrics)."""
    m = result.metrics
    if m.get("benchmark") == "pope":
        return pope.report(m, result.answers, examples)
    header = f"checkpoint {m['checkpoint'] or '?'} · profile {m['profile']} · {m['n']} test samples"
    lines = [f"{header} · {m['seconds']} s", "", f"{'kind':<10}{'n':>5}{'accuracy':>10}"]
    for kind, row in m["per_kind"].items():
        lines.append(f"{kind:<10}{row['n']:>5}{_pct(row['accuracy']):>10}")
    lines.append(f"{'all':<10}{m['n_questions']:>5}{_pct(m['accuracy']):>10}")
    lines += ["", f"eval loss {m['eval_loss']:.4f} over {m['eval_tokens']} supervised tokens"]
    if m.get("note"):
        lines.append(f"note: {m['note']}")
    if result.answers:
        lines += ["", "examples (question -> answer | expected):"]
        for a in result.answers[:examples]:
            mark = "" if a["correct"] is None else (" ✓" if a["correct"] else " ✗")
            lines.append(f"  {a['question']} -> {a['predicted']!r} | {a['expected']!r}{mark}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def comparison(results: dict[str, Evaluation]) -> dict[str, dict[str, Any]]:
    """Accuracy per kind, overall accuracy and eval loss of several evaluations, one column each."""
    out = {}
    for name, r in results.items():
        col = {kind: row["accuracy"] for kind, row in r.metrics["per_kind"].items()}
        out[name] = col | {"all": r.metrics["accuracy"], "eval_loss": r.metrics["eval_loss"]}
    return out


# ---------------------------------------------------------------------------------------- CLI


def load_model(checkpoint: str, profile: cfg.Profile, device: str | None = None):
    """(model, processor) from an exported folder, or surgery.build's for `checkpoint='untrained'`."""
    if checkpoint != UNTRAINED:
        return infer.load(checkpoint, device=device, profile_name=profile.name)
    from .surgery import build

    model, processor = build(profile, prepare_backbones(profile))
    device = torch.device(device) if device else default_device()
    return model.to(device, default_dtype(device)).eval(), processor


def _per_profile(name: str) -> str:
    return ", ".join(f"{getattr(p.eval, name)} {p.name}" for p in cfg.PROFILES.values())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llava_nb.evaluate",
        description="Eval loss and answer accuracy of an exported LLaVA folder (or the untrained model) on the "
                    "profile's test split. Prints a table, then one JSON line (accuracy, n, eval_loss, ...).")
    parser.add_argument("--checkpoint", required=True,
                        help="an exported folder (notebooks/05_training.ipynb or `python -m llava_nb.train`), "
                             f"or '{UNTRAINED}' for the model straight after surgery (projector at init)")
    parser.add_argument("--profile", choices=sorted(cfg.PROFILES), default=None,
                        help=f"default: ${cfg.PROFILE_ENV}, else 't4'")
    parser.add_argument("--budget", default=None, choices=sorted(cfg.BUDGETS),
                        help=f"'smoke': a few samples (default: ${cfg.BUDGET_ENV}, else 'full')")
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="test",
                        help="'test': the eval loss and short answers of the profile's test split (default); "
                             f"'pope': POPE's yes/no questions ({pope.REPO}, a seeded subset balanced "
                             "over its categories and answers; needs the hub or --dataset)")
    parser.add_argument("--dataset", default=None,
                        help="hub id or local folder/files whose test split to score (default: the "
                             f"profile's; for --benchmark pope, {pope.REPO}); "
                             f"replies of at most {MAX_ANSWER_WORDS} words are scored by exact match")
    parser.add_argument("--limit", type=int, default=None,
                        help="test samples to evaluate (default: the profile's, " + _per_profile("limit")
                             + "); POPE: questions (" + _per_profile("pope_questions") + ")")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help=f"samples per forward pass and per generate call (default: {BATCH_SIZE})")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest answer, in tokens (default: the profile's, " + _per_profile("max_new_tokens") + ")")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation from the command line; returns the metrics it printed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    profile = cfg.get_profile(args.profile or cfg.pick_profile_name("t4"), cfg.pick_budget_name(args.budget))
    if args.dataset and args.benchmark == "test":
        profile = cfg.get_profile(profile.name, profile.budget, data=dict(dataset=args.dataset))

    def say(line: str) -> None:  # progress goes to stderr: stdout ends with the JSON line
        print(line, file=sys.stderr, flush=True)

    try:
        model, processor = load_model(args.checkpoint, profile, args.device)
        name = args.checkpoint if args.checkpoint == UNTRAINED else str(Path(args.checkpoint))
        if args.benchmark == "pope":
            result = evaluate_pope(model, processor, profile, args.limit, source=args.dataset or pope.REPO,
                                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                   progress=say, name=name)
        else:
            result = evaluate(model, processor, profile, args.limit, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, progress=say, name=name)
    except (FileNotFoundError, HubUnreachable, pope.NotPope) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(result.table())
    if args.checkpoint != UNTRAINED:  # the export's card shows the scores printed below
        cards.record_scores(args.checkpoint, result.metrics)
        say(f"scores written to the model card {Path(args.checkpoint) / cards.CARD_FILE}")
    print(json.dumps(result.metrics), flush=True)
    return result.metrics


if __name__ == "__main__":
    main()
