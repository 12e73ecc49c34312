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
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import cards, infer, pope
from . import config as cfg
from .device import default_device, default_dtype
from .fsutil import HubUnreachable
from .scoring import (
    BATCH_SIZE,
    MAX_ANSWER_WORDS,
    Evaluation,
    answer_turns,
    eval_loss,
    is_correct,
    is_short_answer,
    metrics_by_kind,
    question_turns,
)
from .sources import prepare_backbones, prepare_dataset
from .streams import held_out
from .synthetic import QUESTION_KINDS

log = logging.getLogger(__name__)

UNTRAINED = "untrained"  # --checkpoint value: surgery.build's model, projector at init
BENCHMARKS = ("test", "pope")  # the profile's test split (loss, short answers), or POPE
SHORT_ANSWER_TOKENS = 10  # at least this many new tokens for a dataset of one's own: a few words
# Replies are paragraphs: no accuracy, the fixed images instead
FREE_FORM_DATASETS = ("HuggingFaceH4/llava-instruct-mix-vsft",)
T4_IMAGES = cfg.T4_IMAGES  # what the t4 profile answers about instead of scoring
T4_NOTE = (
    "no accuracy: llava-instruct-mix-vsft's answers are free-form sentences; read the answers on the "
    "fixed images instead"
)

# ---------------------------------------------------------------------------------- evaluation


def held_out_samples(profile: cfg.Profile, limit: int) -> list[dict]:
    """The first `limit` cleaned samples of the profile's test split, in file order."""
    source = prepare_dataset(profile)
    return held_out(source, profile.data.test_split, limit, max_turns=None)


def evaluate(
    model,
    processor,
    profile: cfg.Profile,
    limit: int | None = None,
    *,
    batch_size: int = BATCH_SIZE,
    max_new_tokens: int | None = None,
    samples: list[dict] | None = None,
    progress: Callable[[str], None] | None = None,
    name: str = "",
) -> Evaluation:
    """Eval loss on the test split and answers (short answers scored; the hub's: fixed images)."""
    start = time.perf_counter()
    offline = profile.data.dataset.startswith(cfg.OFFLINE_PREFIX)  # the drawn scenes: scored by kind
    scored = profile.data.dataset not in FREE_FORM_DATASETS
    limit = limit or profile.eval.limit
    own = scored and not offline  # a dataset of one's own: short answers of a few words
    max_new_tokens = max_new_tokens or max(profile.eval.max_new_tokens, SHORT_ANSWER_TOKENS if own else 0)
    model.eval()
    samples = samples if samples is not None else held_out_samples(profile, limit)
    loss, tokens, skipped = eval_loss(
        model, processor, samples, profile.data.max_length, batch_size, progress
    )
    if scored:
        turns = [
            t for i, s in enumerate(samples) for t in question_turns(s, i) if is_short_answer(t["expected"])
        ]
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
            turns.append(
                {
                    "sample": i,
                    "turn": 0,
                    "kind": "other",
                    "question": question,
                    "expected": expected,
                    "prompt": [infer.user_turn(question)],
                    "images": images,
                    "url": url,
                }
            )
    replies = answer_turns(model, processor, turns, max_new_tokens, batch_size, progress)
    answers = [
        {
            "sample": t["sample"],
            "turn": t["turn"],
            "kind": t["kind"],
            "question": t["question"],
            "expected": t["expected"],
            "predicted": reply,
            "correct": is_correct(reply, t["expected"]) if scored else None,
            "image": t["images"][0] if t["images"] else None,
        }
        for t, reply in zip(turns, replies)
    ]
    metrics = metrics_by_kind(answers, QUESTION_KINDS if offline else ())
    metrics |= {
        "benchmark": "test",
        "dataset": profile.data.dataset,
        "eval_loss": round(loss, 4),
        "n": len(samples),
        "eval_tokens": tokens,
        "profile": profile.name,
        "checkpoint": name,
        "max_new_tokens": max_new_tokens,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if skipped:
        metrics["skipped"] = dict(skipped)
    if not scored:
        metrics["note"] = T4_NOTE
    elif not answers:
        metrics["note"] = f"no test reply of at most {MAX_ANSWER_WORDS} words: nothing to score"
    return Evaluation(metrics, answers)


def evaluate_pope(
    model,
    processor,
    profile: cfg.Profile,
    limit: int | None = None,
    *,
    source: str = pope.REPO,
    batch_size: int = BATCH_SIZE,
    max_new_tokens: int | None = None,
    questions: list[dict] | None = None,
    progress: Callable[[str], None] | None = None,
    name: str = "",
) -> Evaluation:
    """POPE on `limit` questions (default: the profile's `eval.pope_questions`): each image with its
    question and `pope.INSTRUCTION` in the chat template, greedy replies of a few tokens, POPE's metrics."""
    start = time.perf_counter()
    model.eval()
    skipped: Counter = Counter()
    if questions is None:
        questions = pope.questions(
            source,
            limit or profile.eval.pope_questions,
            seed=profile.seed,
            skipped=skipped,
            progress=progress,
        )
    max_new_tokens = max_new_tokens or pope.MAX_NEW_TOKENS
    turns = [
        {"prompt": [infer.user_turn(f"{q['question']} {pope.INSTRUCTION}")], "images": [q["image"]]}
        for q in questions
    ]
    replies = answer_turns(model, processor, turns, max_new_tokens, batch_size, progress)
    answers = []
    for i, (q, reply) in enumerate(zip(questions, replies)):
        parsed = pope.parse_yes_no(reply)
        answers.append(
            {
                "sample": i,
                "turn": 0,
                "kind": q["category"],
                "category": q["category"],
                "question": q["question"],
                "expected": q["answer"],
                "answer": q["answer"],
                "predicted": reply,
                "parsed": parsed,
                "correct": parsed == q["answer"],
                "image": q["image"],
            }
        )
    metrics = {
        "benchmark": "pope",
        **pope.metrics(answers),
        "dataset": source,
        "seed": profile.seed,
        "profile": profile.name,
        "checkpoint": name,
        "max_new_tokens": max_new_tokens,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if skipped:
        metrics["skipped"] = dict(skipped)
    return Evaluation(metrics, answers)


def benchmark(
    model,
    processor,
    profile: cfg.Profile,
    limit: int | None = None,
    *,
    measured: Evaluation,
    name: str = "",
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """The profile's score to compare (`eval.benchmark`): POPE on t4; on the offline profile, whose scenes
    POPE does not fit, the test split's accuracy, i.e. `measured` (the `evaluate` already run) as it is."""
    if profile.eval.benchmark == "pope":
        return evaluate_pope(model, processor, profile, limit, progress=progress, name=name)
    return measured


def references(profile: cfg.Profile) -> tuple[dict[str, float], float | None]:
    """Published scores to set the profile's benchmark beside and its chance level (in %): POPE's; none
    for the scenes (their chance differs by kind: 25 % for colour to 50 % for the side)."""
    return (dict(pope.REFERENCES), pope.CHANCE) if profile.eval.benchmark == "pope" else ({}, None)


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
        description="Eval loss and answer accuracy of an exported LLaVA folder (or the untrained model) on "
        "the profile's test split. Prints a table, then one JSON line (accuracy, n, eval_loss, ...).",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="an exported folder (notebooks/05_training.ipynb or `python -m llava_nb.train`), "
        f"or '{UNTRAINED}' for the model straight after surgery (projector at init)",
    )
    parser.add_argument(
        "--profile",
        choices=sorted(cfg.PROFILES),
        default=None,
        help=f"default: ${cfg.PROFILE_ENV}, else 't4'",
    )
    parser.add_argument(
        "--budget",
        default=None,
        choices=sorted(cfg.BUDGETS),
        help=f"'smoke': a few samples (default: ${cfg.BUDGET_ENV}, else 'full')",
    )
    parser.add_argument(
        "--benchmark",
        choices=BENCHMARKS,
        default="test",
        help="'test': the eval loss and short answers of the profile's test split (default); "
        f"'pope': POPE's yes/no questions ({pope.REPO}, a seeded subset balanced "
        "over its categories and answers; needs the hub or --dataset)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="hub id or local folder/files whose test split to score (default: the "
        f"profile's; for --benchmark pope, {pope.REPO}); "
        f"replies of at most {MAX_ANSWER_WORDS} words are scored by exact match",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="test samples to evaluate (default: the profile's, "
        + _per_profile("limit")
        + "); POPE: questions ("
        + _per_profile("pope_questions")
        + ")",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        help=f"samples per forward pass and per generate call (default: {BATCH_SIZE})",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest answer, in tokens (default: the profile's, " + _per_profile("max_new_tokens") + ")",
    )
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
            result = evaluate_pope(
                model,
                processor,
                profile,
                args.limit,
                source=args.dataset or pope.REPO,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                progress=say,
                name=name,
            )
        else:
            result = evaluate(
                model,
                processor,
                profile,
                args.limit,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                progress=say,
                name=name,
            )
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
