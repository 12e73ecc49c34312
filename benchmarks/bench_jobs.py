"""The benchmark's measurements, each run in a process of its own: train one configuration of stage 1 for a
few steps (throughput, the training phase's peak memory, optionally held-out accuracy), or time generation.
A `Job` says which; `bench.py` runs the jobs, compares them and reports."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from llava_nb import config as cfg
from llava_nb import data
from llava_nb.device import cpu_has_bf16, peak_rss_mb, reset_peak_rss, status_mb

BASELINE, PROJECT = "tutorial", "project"


@dataclass(frozen=True)
class Variant:
    labels: (
        str  # 'all': every non-pad token (the tutorial); 'assistant': the replies only (data.LlavaCollator)
    )
    fast_loss: bool
    mixed_precision: bool  # fp16 autocast on a GPU, bf16 autocast on a CPU that has it; False: fp32
    description: str
    group: bool = False  # batches of similar length (the training stream's length grouping)
    attention: str = (
        "sdpa"  # transformers 5's default (the tutorial's); 'auto': device.attention_implementation
    )
    shared_prefix: bool = False  # the system prompt once per batch (needs it unsupervised: assistant labels)
    bf16_frozen: bool = False  # frozen linear weights stored in bf16 (a CPU under bf16 autocast)


VARIANTS: dict[str, Variant] = {
    "tutorial": Variant("all", False, True, "tutorial: all-token labels, model loss, mixed precision"),
    "tutorial_fp32": Variant("all", False, False, "tutorial in fp32"),
    "fast_loss": Variant("assistant", True, True, "tutorial + assistant-only labels and fast_loss"),
    "grouped": Variant("all", False, True, "tutorial + batches grouped by length", True),
    "eager": Variant("all", False, True, "tutorial + eager attention", attention="eager"),
    "bf16_frozen": Variant(
        "all", False, True, "tutorial + frozen linear weights stored in bf16", bf16_frozen=True
    ),
    "shared_prefix": Variant(
        "assistant", True, True, "fast_loss + the system prompt run once per batch", shared_prefix=True
    ),
    "project": Variant(
        "assistant",
        True,
        True,
        "project stage 1: assistant labels, fast_loss, grouped, "
        "mixed precision, the device's attention, shared system prompt, bf16 frozen weights",
        True,
        attention="auto",
        shared_prefix=True,
        bf16_frozen=True,
    ),
}


@dataclass(frozen=True)
class Job:
    """One measurement, in a process of its own: train `config` (a VARIANTS key) or, with `config='generate'`,
    time generation. It travels to that process as JSON (`to_json` / `from_json`)."""

    config: str
    steps: int = 3
    warmup: int = 1
    batch_size: int = 8
    seed: int = 0
    profile: str = "offline"
    accuracy_limit: int = 0  # > 0: evaluate held-out accuracy on this many test samples after training
    max_new_tokens: int = 32
    gen_batch_size: int = 8

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))


def baseline_precision() -> str:
    """The tutorial's recipe's precision here: 'fp16' on a GPU, 'bf16' on a CPU that has it, else 'fp32'."""
    if torch.cuda.is_available():
        return "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


class TutorialCollator:
    """The tutorial's labels on top of `data.LlavaCollator`'s batch: labels = input_ids, padding at -100.

    Same samples, tokens, truncation and right padding to the longest in the batch; only the labels
    differ (system prompt, user turns and image tokens are supervised too)."""

    def __init__(self, collator: data.LlavaCollator):
        self.collator = collator
        self.skipped = collator.skipped

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(samples)
        labels = batch["input_ids"].clone()
        labels[labels == self.collator.pad_token_id] = self.collator.ignore_index
        batch["labels"] = labels
        return batch


# ---------------------------------------------------------------------------------------- training


def bench_profile(profile_name: str, *, batch_size: int, max_steps: int) -> cfg.Profile:
    """The profile's stage 1 with a short budget, no evaluation and no checkpoint."""
    return cfg.get_profile(
        profile_name,
        stage1=dict(
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1,
            save_steps=10**9,
            eval_samples=0,
            logging_steps=10**9,
        ),
    )


class RecordingCollator:
    """A collator that also records each batch's statistics (samples, tokens, padding, supervised)."""

    def __init__(self, collator):
        self.collator, self.skipped, self.records = collator, collator.skipped, []

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(samples)
        self.records.append(data.batch_stats(batch))
        return batch


def train_one(job: Job) -> dict[str, Any]:
    """Train `job.config` in this process; its throughput and memory (and accuracy, with accuracy_limit)."""
    from llava_nb import sources, stages, streams, surgery, trainer

    v = VARIANTS[job.config]
    profile = bench_profile(job.profile, batch_size=job.batch_size, max_steps=job.warmup + job.steps)
    t = dataclasses.replace(
        profile.stage1,
        fast_loss=v.fast_loss,
        cpu_bf16=v.mixed_precision,
        attention=v.attention,
        shared_prefix=v.shared_prefix,
        bf16_frozen=v.bf16_frozen,
    )
    profile = dataclasses.replace(profile, stage1=t)
    source = sources.prepare_dataset(profile)
    sources.prepare_backbones(profile)

    model, processor = stages.stage_model(profile, 1, seed=job.seed)
    collator = data.LlavaCollator(processor, max_length=profile.data.max_length)
    train_collator = collator if v.labels == "assistant" else TutorialCollator(collator)
    recorder = RecordingCollator(train_collator)
    stream = streams.TrainStream(
        source,
        profile.data.train_split,
        max_turns=t.max_turns,
        seed=job.seed,
        shuffle_buffer=profile.data.shuffle_buffer,
        skipped=train_collator.skipped,
        group=job.batch_size if v.group else 0,
        length_window=t.length_window,
    )
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as tmp:
        args = trainer.training_arguments(t, tmp, seed=job.seed, evaluate=False)
        args.disable_tqdm = True
        args.fp16 = args.fp16 and v.mixed_precision  # on a GPU the fp32 row turns fp16 autocast off too
        timer = trainer.StepTimer()
        runner = trainer.LlavaTrainer(
            model=model,
            args=args,
            data_collator=recorder,
            train_dataset=stream,
            callbacks=[timer],
            fast_loss=t.fast_loss,
            shared_prefix=t.shared_prefix,
        )
        hwm_reset = reset_peak_rss()  # from here on: the training phase alone
        began = time.perf_counter()
        runner.train()
        wall = time.perf_counter() - began
        train_peak = status_mb("VmHWM") if hwm_reset else None

    timed = timer.seconds[job.warmup :]
    counted = recorder.records[job.warmup : job.warmup + len(timed)]  # one batch per step (no accumulation)
    seconds = sum(timed)
    total = {k: sum(c[k] for c in counted) for k in ("samples", "tokens", "padding", "supervised")}
    losses = [e["loss"] for e in runner.state.log_history if "loss" in e]
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    result = {
        "config": job.config,
        "description": v.description,
        "labels": v.labels,
        "fast_loss": v.fast_loss,
        "grouped": v.group,
        "attention": surgery.base_model(model).config._attn_implementation,
        "shared_prefix": v.shared_prefix,
        "bf16_frozen": stages.narrows_frozen_weights(t),
        "precision": precision,
        "batch_size": job.batch_size,
        "warmup_steps": job.warmup,
        "timed_steps": len(timed),
        "seconds": round(seconds, 3),
        "step_seconds": [round(x, 3) for x in timed],
        "samples_per_s": total["samples"] / seconds if seconds else float("nan"),
        "tokens_per_s": total["tokens"] / seconds if seconds else float("nan"),
        "supervised_tokens_per_s": total["supervised"] / seconds if seconds else float("nan"),
        "supervised_fraction": total["supervised"] / max(total["tokens"], 1),
        "padding_fraction": total["padding"] / max(total["tokens"] + total["padding"], 1),
        "train_peak_rss_mb": round(train_peak, 1) if train_peak else None,  # the training phase's peak
        "process_peak_rss_mb": round(peak_rss_mb(), 1),  # the whole process, model build included
        "train_wall_seconds": round(wall, 2),
        "last_loss": losses[-1] if losses else None,
    }
    if job.accuracy_limit:
        from llava_nb import evaluate

        llava = surgery.base_model(stages.as_sources_hold_it(runner.model, profile, 1, seed=job.seed))
        llava.config.use_cache = llava.config.text_config.use_cache = True
        llava.requires_grad_(False)
        ev = evaluate.evaluate(llava, processor, profile, limit=job.accuracy_limit)
        result.update(
            accuracy=ev.metrics["accuracy"],
            eval_loss=ev.metrics["eval_loss"],
            accuracy_steps=job.warmup + job.steps,
            accuracy_limit=job.accuracy_limit,
        )
    return result


# -------------------------------------------------------------------------------------- generation


def generate_one(job: Job) -> dict[str, Any]:
    """Greedy generation tokens/s with the KV cache, fp32 on CPU, on a freshly built model (the projector
    at init: speed does not depend on the weights), prompts from the test split's images."""
    import itertools

    from llava_nb import infer, sources, streams, surgery

    profile = dataclasses.replace(cfg.get_profile(job.profile), seed=job.seed)
    model, processor = surgery.build(profile, sources.prepare_backbones(profile))
    model = model.to(torch.float32).eval()
    model.config.use_cache = model.config.text_config.use_cache = True
    source = sources.prepare_dataset(profile)
    batch_sizes = (1, job.gen_batch_size)
    n = max(batch_sizes)
    samples = list(itertools.islice(streams.stream(source, profile.data.test_split, shuffle_buffer=0), n))
    images = [[s["images"][0]] for s in samples]
    while len(images) < n:
        images += images[: n - len(images)]
    question = "What shape is in the image?"

    def run(bs: int, new: int) -> tuple[float, int, int]:
        inputs = infer.encode(processor, [[infer.user_turn(question)]] * bs, images[:bs], model)
        began = time.perf_counter()
        out = infer.generate_ids(model, processor, inputs, new, min_new_tokens=new)
        seconds = time.perf_counter() - began
        return (
            seconds,
            int(out.shape[1] - inputs["input_ids"].shape[1]) * bs,
            int(inputs["input_ids"].shape[1]),
        )

    run(1, 2)  # warm-up: kernels, allocator
    result: dict[str, Any] = {
        "max_new_tokens": job.max_new_tokens,
        "dtype": str(model.dtype).replace("torch.", ""),
        "kv_cache": True,
    }
    for bs in batch_sizes:
        seconds, tokens, prompt = run(bs, job.max_new_tokens)
        result[f"batch{bs}"] = {
            "batch_size": bs,
            "prompt_tokens": prompt,
            "new_tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": tokens / seconds,
        }
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


def execute(job: Job) -> dict[str, Any]:
    """Run one job in this process."""
    return generate_one(job) if job.config == "generate" else train_one(job)
