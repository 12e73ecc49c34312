"""Speed and memory of this project's stage-1 training against the tutorial's recipe; `python -m llava_nb.bench`.

Same profile (offline by default), model, data and seed for every configuration:

    tutorial   labels on every token (input_ids with padding at -100, as the tutorial's collator),
               the model's own loss over all positions, fp32, padding to the longest in the batch
    fast_loss  assistant-only labels + LM-head logits only where a label is (fp32)
    bf16       the tutorial's labels and loss under bf16 autocast (where the CPU has bf16 instructions)
    grouped    the tutorial's labels, loss and fp32, with batches grouped by length (less padding)
    project    stage 1 as `llava_nb.train` runs it: assistant-only labels, fast_loss, bf16 autocast, grouped
    labels     (not run by default) assistant-only labels with the model's own loss, fp32

Each configuration trains in its own subprocess (`python -m llava_nb.bench --_one NAME`), so its peak
RSS is its own; the model build is not timed. Timed steps follow `--warmup` untimed ones; a step's time
runs from the end of the previous step (reading and collating its batch included). Generation is timed
with the KV cache on a freshly built model (greedy, `min_new_tokens = max_new_tokens`), for one image
and for a batch. The last line printed is a JSON object (`train_speedup_vs_tutorial`, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import config as cfg
from . import data

DEFAULT_CONFIGS = ("tutorial", "fast_loss", "bf16", "grouped", "project")
BASELINE, PROJECT = "tutorial", "project"


@dataclass(frozen=True)
class Variant:
    labels: str  # 'all': every non-pad token (the tutorial); 'assistant': the replies only (data.LlavaCollator)
    fast_loss: bool
    cpu_bf16: bool
    description: str
    group: bool = False  # batches of similar length (train.TrainStream's length grouping)


VARIANTS: dict[str, Variant] = {
    "tutorial": Variant("all", False, False, "tutorial: all-token labels, model loss, fp32"),
    "labels": Variant("assistant", False, False, "assistant-only labels, model loss, fp32"),
    "fast_loss": Variant("assistant", True, False, "assistant-only labels + fast_loss, fp32"),
    "bf16": Variant("all", False, True, "tutorial labels and loss, bf16 autocast"),
    "grouped": Variant("all", False, False, "tutorial labels and loss, fp32, batches grouped by length", True),
    "project": Variant("assistant", True, True, "project stage 1: assistant labels, fast_loss, bf16, grouped",
                       True),
}


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


# ------------------------------------------------------------------------------------------ memory


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (ru_maxrss), in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1024


def _status_mb(field_name: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Linux ≥ 4.0: reset VmHWM (the peak RSS) to the current RSS, so a later read covers what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------- training


def bench_profile(profile_name: str, *, batch_size: int, max_steps: int) -> cfg.Profile:
    """The profile's stage 1 with a short budget, no evaluation and no checkpoint."""
    return cfg.get_profile(profile_name, stage1=dict(
        max_steps=max_steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        save_steps=10**9, eval_samples=0, logging_steps=10**9))


def train_one(name: str, *, steps: int = 3, warmup: int = 1, batch_size: int = 8, seed: int = 0,
              profile_name: str = "offline", accuracy_limit: int = 0) -> dict[str, Any]:
    """Train configuration `name` (a VARIANTS key) in this process; its throughput and memory.

    `accuracy_limit` > 0: afterwards evaluate.evaluate(limit=accuracy_limit) on the trained model."""
    from . import sources, train

    v = VARIANTS[name]
    profile = bench_profile(profile_name, batch_size=batch_size, max_steps=warmup + steps)
    t = dataclasses.replace(profile.stage1, fast_loss=v.fast_loss, cpu_bf16=v.cpu_bf16)
    profile = dataclasses.replace(profile, stage1=t)
    source = sources.prepare_dataset(profile)
    sources.prepare_backbones(profile)
    rss_before_build = _status_mb("VmRSS")

    model, processor = train.stage_model(profile, 1, seed=seed)
    collator = data.LlavaCollator(processor, max_length=profile.data.max_length)
    if v.labels == "all":
        collator = TutorialCollator(collator)
    stream = train.TrainStream(source, profile.data.train_split, max_turns=t.max_turns, seed=seed,
                               shuffle_buffer=profile.data.shuffle_buffer, skipped=collator.skipped,
                               group=batch_size if v.group else 0, length_window=t.length_window)
    records: list[dict] = []

    class BenchTrainer(train.LlavaTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            stats = data.batch_stats(inputs)
            records.append({"step": self.state.global_step, **stats})
            return super().training_step(model, inputs, *args, **kwargs)

    with tempfile.TemporaryDirectory(prefix="llava-bench-") as tmp:
        args = train.training_arguments(t, tmp, seed=seed, evaluate=False)
        args.disable_tqdm = True
        timer = train.StepTimer()
        trainer = BenchTrainer(model=model, args=args, data_collator=collator, train_dataset=stream,
                               callbacks=[timer], fast_loss=t.fast_loss)
        rss_after_build = _status_mb("VmRSS")
        hwm_reset = reset_peak_rss()
        began = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - began
        train_peak = _status_mb("VmHWM") if hwm_reset else None

    timed = timer.seconds[warmup:]
    by_step: dict[int, dict] = {}
    for r in records:  # with gradient accumulation several batches make one step
        acc = by_step.setdefault(r["step"], {"samples": 0, "tokens": 0, "padding": 0, "supervised": 0})
        for k in acc:
            acc[k] += r[k]
    counted = [by_step[s] for s in sorted(by_step)][warmup:warmup + len(timed)]
    seconds = sum(timed)
    total = {k: sum(c[k] for c in counted) for k in ("samples", "tokens", "padding", "supervised")}
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {
        "config": name, "description": v.description, "labels": v.labels, "fast_loss": v.fast_loss,
        "grouped": v.group,
        "bf16": bool(args.bf16), "batch_size": batch_size, "warmup_steps": warmup, "timed_steps": len(timed),
        "seconds": round(seconds, 3), "step_seconds": [round(s, 3) for s in timed],
        "samples_per_s": total["samples"] / seconds if seconds else float("nan"),
        "tokens_per_s": total["tokens"] / seconds if seconds else float("nan"),
        "supervised_tokens_per_s": total["supervised"] / seconds if seconds else float("nan"),
        "supervised_fraction": total["supervised"] / max(total["tokens"], 1),
        "padding_fraction": total["padding"] / max(total["tokens"] + total["padding"], 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),  # the whole process, model build included
        "train_peak_rss_mb": round(train_peak, 1) if train_peak else None,  # peak during training only
        "rss_after_build_mb": round(rss_after_build, 1) if rss_after_build else None,
        "rss_before_build_mb": round(rss_before_build, 1) if rss_before_build else None,
        "train_wall_seconds": round(wall, 2),
        "last_loss": losses[-1] if losses else None,
    }
    if accuracy_limit:
        from . import evaluate

        llava = train.base_model(trainer.model)
        llava.config.use_cache = llava.config.text_config.use_cache = True
        llava.requires_grad_(False)
        ev = evaluate.evaluate(llava, processor, profile, limit=accuracy_limit)
        result.update(accuracy=ev.metrics["accuracy"], eval_loss=ev.metrics["eval_loss"],
                      accuracy_steps=warmup + steps, accuracy_limit=accuracy_limit)
    return result


# -------------------------------------------------------------------------------------- generation


def generate_one(*, max_new_tokens: int = 32, batch_sizes: Sequence[int] = (1, 8), seed: int = 0,
                 profile_name: str = "offline") -> dict[str, Any]:
    """Greedy generation tokens/s with the KV cache, fp32 on CPU, on a freshly built model (the projector
    at init: speed does not depend on the weights), prompts from the test split's images."""
    import itertools

    from . import infer, sources, surgery

    profile = cfg.get_profile(profile_name)
    profile = dataclasses.replace(profile, seed=seed)
    model, processor = surgery.build(profile)
    model = model.to(infer.default_dtype("cpu")).eval()
    model.config.use_cache = model.config.text_config.use_cache = True
    source = sources.prepare_dataset(profile)
    n = max(batch_sizes)
    samples = list(itertools.islice(data.stream(source, profile.data.test_split, shuffle_buffer=0), n))
    images = [[s["images"][0]] for s in samples]
    while len(images) < n:
        images += images[: n - len(images)]
    question = "What shape is in the image?"

    def run(bs: int, new: int) -> tuple[float, int, int]:
        inputs = infer.encode(processor, [[infer.user_turn(question)]] * bs, images[:bs], model)
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, use_cache=True,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        seconds = time.perf_counter() - began
        return seconds, int(out.shape[1] - inputs["input_ids"].shape[1]) * bs, int(inputs["input_ids"].shape[1])

    run(1, 2)  # warm-up: kernels, allocator
    result: dict[str, Any] = {"max_new_tokens": max_new_tokens, "dtype": str(model.dtype).replace("torch.", ""),
                              "kv_cache": True}
    for bs in batch_sizes:
        seconds, tokens, prompt = run(bs, max_new_tokens)
        result[f"batch{bs}"] = {"batch_size": bs, "prompt_tokens": prompt, "new_tokens": tokens,
                                "seconds": round(seconds, 3), "tokens_per_s": tokens / seconds}
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


# ------------------------------------------------------------------------------------------ driver


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    from .train import cpu_has_bf16

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_bf16_supported": cpu_has_bf16(),
            "cuda": torch.cuda.is_available()}


def _subprocess(args: list[str]) -> dict[str, Any]:
    """Run `python -m llava_nb.bench ARGS` and parse the JSON of its last stdout line."""
    cmd = [sys.executable, "-m", "llava_nb.bench", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or any(map(math.isnan, (a, b))):
        return None
    return round(a / b, 3)


def run(configs: Sequence[str] = DEFAULT_CONFIGS, *, steps: int = 3, warmup: int = 1, batch_size: int = 8,
        repeats: int = 1, seed: int = 0, profile_name: str = "offline", max_new_tokens: int = 32,
        gen_batch_size: int = 8, accuracy_steps: int = 0, accuracy_limit: int = 32,
        in_process: bool = False, progress=None) -> dict[str, Any]:
    """The whole benchmark: each config `repeats` times (order reversed on every other round, so drift in a
    shared machine's load hits all alike), generation, optionally accuracy. Returns the summary dict.

    `in_process=True` runs everything in this process (tests): faster, but peak RSS is then the process's.
    """
    say = progress or (lambda line: None)
    configs = list(dict.fromkeys(configs))
    for c in configs:
        if c not in VARIANTS:
            raise KeyError(f"unknown config {c!r}: choose from {sorted(VARIANTS)}")
    began = time.perf_counter()
    common = dict(steps=steps, warmup=warmup, batch_size=batch_size, seed=seed, profile_name=profile_name)

    def one(name: str, acc: int = 0) -> dict[str, Any]:
        if in_process:
            kw = dict(common, steps=acc or steps, warmup=0 if acc else warmup)
            return train_one(name, **kw, accuracy_limit=accuracy_limit if acc else 0)
        a = ["--_one", name, "--steps", str(acc or steps), "--warmup", str(0 if acc else warmup),
             "--batch-size", str(batch_size), "--seed", str(seed), "--profile", profile_name]
        if acc:
            a += ["--_accuracy-limit", str(accuracy_limit)]
        return _subprocess(a)

    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(repeats):
        for c in (configs if r % 2 == 0 else configs[::-1]):
            say(f"train {c} (round {r + 1}/{repeats})")
            runs[c].append(one(c))
    train_results = {}
    for c, rs in runs.items():
        merged = dict(rs[-1])
        for k in ("samples_per_s", "tokens_per_s", "supervised_tokens_per_s"):
            merged[k] = round(statistics.median(x[k] for x in rs), 3)
        for k in ("peak_rss_mb", "train_peak_rss_mb"):
            vals = [x[k] for x in rs if x.get(k) is not None]
            merged[k] = max(vals) if vals else None
        merged["step_seconds"] = [s for x in rs for s in x["step_seconds"]]
        merged["repeats"] = len(rs)
        train_results[c] = merged

    say(f"generate (max_new_tokens={max_new_tokens}, batches 1 and {gen_batch_size})")
    gen_kw = dict(max_new_tokens=max_new_tokens, batch_sizes=(1, gen_batch_size), seed=seed,
                  profile_name=profile_name)
    if in_process:
        generation = generate_one(**gen_kw)
    else:
        generation = _subprocess(["--_generate", "--max-new-tokens", str(max_new_tokens), "--gen-batch-size",
                                  str(gen_batch_size), "--seed", str(seed), "--profile", profile_name])

    accuracy = {}
    if accuracy_steps:
        for c in (BASELINE, PROJECT):
            say(f"accuracy: train {c} {accuracy_steps} steps, evaluate {accuracy_limit} held-out samples")
            a = one(c, accuracy_steps)
            accuracy[c] = {k: a.get(k) for k in ("accuracy", "eval_loss", "accuracy_steps", "accuracy_limit",
                                                 "samples_per_s", "train_wall_seconds")}

    base, proj = train_results.get(BASELINE), train_results.get(PROJECT)
    summary: dict[str, Any] = {
        "train_speedup_vs_tutorial": _ratio(proj and proj["samples_per_s"], base and base["samples_per_s"]),
        "peak_rss_ratio_vs_tutorial": _ratio(proj and proj["peak_rss_mb"], base and base["peak_rss_mb"]),
        "train_peak_rss_ratio_vs_tutorial": _ratio(proj and proj["train_peak_rss_mb"],
                                                   base and base["train_peak_rss_mb"]),
        "speedup_vs_tutorial": {c: _ratio(r["samples_per_s"], base["samples_per_s"])
                                for c, r in train_results.items()} if base else {},
        "bf16_used": {c: r["bf16"] for c, r in train_results.items()},
        "train": train_results,
        "generation": generation,
        "settings": {"profile": profile_name, "seed": seed, "batch_size": batch_size, "timed_steps": steps,
                     "warmup_steps": warmup, "repeats": repeats, "subprocess_per_config": not in_process},
        "machine": machine_info(),
    }
    if accuracy:
        summary["accuracy"] = accuracy
    summary["bench_seconds"] = round(time.perf_counter() - began, 1)
    return summary


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def format_table(summary: dict[str, Any]) -> str:
    """The results as a Markdown table (training, then generation)."""
    base = summary["train"].get(BASELINE)
    rows = ["| config | labels | fast_loss | bf16 | grouped | padding | samples/s | tokens/s | supervised tokens/s "
            "| speed-up | peak RSS MB | train peak RSS MB |",
            "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c, r in summary["train"].items():
        speed = _ratio(r["samples_per_s"], base["samples_per_s"]) if base else None
        rows.append(f"| {c} | {r['labels']} | {'yes' if r['fast_loss'] else 'no'} | "
                    f"{'yes' if r['bf16'] else 'no'} | {'yes' if r.get('grouped') else 'no'} | "
                    f"{_fmt(100 * r['padding_fraction'], 1)} % | {_fmt(r['samples_per_s'])} | {_fmt(r['tokens_per_s'], 0)} | "
                    f"{_fmt(r['supervised_tokens_per_s'], 0)} | {_fmt(speed)}x | {_fmt(r['peak_rss_mb'], 0)} | "
                    f"{_fmt(r['train_peak_rss_mb'], 0)} |")
    g = summary["generation"]
    rows += ["", f"| generation (greedy, KV cache, {g['dtype']}, {g['max_new_tokens']} new tokens) | prompt tokens "
             "| seconds | new tokens/s |", "| --- | ---: | ---: | ---: |"]
    for k, v in g.items():
        if k.startswith("batch"):
            rows.append(f"| batch of {v['batch_size']} | {v['prompt_tokens']} | {_fmt(v['seconds'])} | "
                        f"{_fmt(v['tokens_per_s'], 1)} |")
    if summary.get("accuracy"):
        rows += ["", "| accuracy after N steps | steps | held-out accuracy | eval loss |", "| --- | ---: | ---: | ---: |"]
        for c, a in summary["accuracy"].items():
            rows.append(f"| {c} | {a['accuracy_steps']} | {_fmt(a['accuracy'], 3)} | {_fmt(a['eval_loss'], 3)} |")
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava_nb.bench",
                                description="Training and generation speed and memory: this project's stage 1 "
                                            "against the tutorial's recipe, same model, data and seed. The last "
                                            "line printed is a JSON summary.")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per config (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size (default 8, the offline profile's)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every config this many times, alternating the order; medians are reported")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated, from {sorted(VARIANTS)} (default {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length (default 32)")
    p.add_argument("--gen-batch-size", type=int, default=8, help="the batched generation's size (default 8)")
    p.add_argument("--accuracy-steps", type=int, default=0,
                   help="also train tutorial and project this many steps each and evaluate held-out accuracy "
                        "(evaluate.evaluate, --accuracy-limit samples); off by default, it is slow")
    p.add_argument("--accuracy-limit", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="offline", choices=sorted(cfg.PROFILES))
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_accuracy-limit", dest="_accuracy_limit", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_generate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_in-process", dest="_in_process", action="store_true", help=argparse.SUPPRESS)  # tests
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a._one:
        out = train_one(a._one, steps=a.steps, warmup=a.warmup, batch_size=a.batch_size, seed=a.seed,
                        profile_name=a.profile, accuracy_limit=a._accuracy_limit)
        print(json.dumps(out))
        return out
    if a._generate:
        out = generate_one(max_new_tokens=a.max_new_tokens, batch_sizes=(1, a.gen_batch_size), seed=a.seed,
                           profile_name=a.profile)
        print(json.dumps(out))
        return out

    def say(line: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    summary = run([c.strip() for c in a.configs.split(",") if c.strip()], steps=a.steps, warmup=a.warmup,
                  batch_size=a.batch_size, repeats=a.repeats, seed=a.seed, profile_name=a.profile,
                  max_new_tokens=a.max_new_tokens, gen_batch_size=a.gen_batch_size,
                  accuracy_steps=a.accuracy_steps, accuracy_limit=a.accuracy_limit, in_process=a._in_process,
                  progress=say)
    m = summary["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}, "
          f"bf16 instructions: {m['cpu_bf16_supported']}; load average {os.getloadavg()[0]:.1f}")
    print(format_table(summary))
    print(f"train speed-up vs tutorial: {summary['train_speedup_vs_tutorial']}x; peak RSS ratio: "
          f"{summary['peak_rss_ratio_vs_tutorial']} (training only: {summary['train_peak_rss_ratio_vs_tutorial']}); "
          f"{summary['bench_seconds']} s")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
