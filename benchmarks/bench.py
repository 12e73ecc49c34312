"""Speed and memory of this project's stage-1 training against the tutorial's recipe.

    python benchmarks/bench.py [--steps 8 --warmup 1 --accuracy-steps 100]   # --help for all options

A benchmark, not part of the package: it imports `llava_nb` (installed, as for the notebooks) and
`bench_jobs` beside it.

Same profile (offline by default), model, data and seed for every configuration. The baseline is the
tutorial as its authors ran it, in mixed precision: fp16 autocast on a GPU, bf16 autocast on a CPU with
bf16 matrix instructions (fp32 only where neither exists); `baseline_precision` in the JSON names it.

    tutorial       labels on every token (input_ids with padding at -100, as the tutorial's collator), the
                   model's own loss over all positions, mixed precision, padding to the longest in the batch
    tutorial_fp32  the same in fp32 (an extra row: what the first version of this benchmark compared with)
    fast_loss      the tutorial + assistant-only labels and LM-head logits only where a label is
    grouped        the tutorial + batches grouped by length (less padding)
    eager          the tutorial + eager attention instead of sdpa (what training picks on a CPU)
    bf16_frozen    the tutorial + frozen linear weights stored in bf16 on a CPU under bf16 autocast (the same
                   products, no cast per step, no fp32 copies; the export is rebuilt from the sources)
    shared_prefix  fast_loss + the system prompt, common to every sample, run once per batch (its keys and
                   values repeated across the batch; needs it unsupervised, so it builds on fast_loss)
    project        stage 1 as `llava_nb.train` runs it: everything above together (attention 'auto')

Each configuration trains in its own subprocess, given one `Job` as JSON on its standard input, after the
parent has written the offline sources, so each peak is its own and no cache is built while measured.
The memory compared is the training phase's peak RSS (VmHWM reset after the model is built). Timed steps
follow `--warmup` untimed ones; a step's time runs from the end of the previous step (reading and
collating its batch included). With `--repeats` > 1 the order alternates every round and the JSON names
what ran first. Generation is timed with the KV cache on a freshly built model (greedy,
`min_new_tokens = max_new_tokens`), for one image and for a batch. The last line printed is a JSON object
(`train_speedup_vs_tutorial`, `peak_rss_ratio_vs_tutorial`, `baseline_precision`, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_jobs import BASELINE, PROJECT, VARIANTS, Job, baseline_precision, execute

from llava_nb import config as cfg
from llava_nb.device import cpu_has_bf16

DEFAULT_CONFIGS = (
    "tutorial",
    "tutorial_fp32",
    "fast_loss",
    "grouped",
    "eager",
    "bf16_frozen",
    "shared_prefix",
    "project",
)


@dataclass(frozen=True)
class Settings:
    """A whole benchmark run (the command line's options)."""

    configs: tuple[str, ...] = DEFAULT_CONFIGS
    steps: int = 3
    warmup: int = 1
    batch_size: int = 8
    repeats: int = 1
    seed: int = 0
    profile: str = "offline"
    max_new_tokens: int = 32
    gen_batch_size: int = 8
    accuracy_steps: int = 0
    accuracy_limit: int = 32
    in_process: bool = False  # tests: every job in this process (faster; peaks are then shared)

    def job(self, config: str, **changes: Any) -> Job:
        """The Job for `config` with these settings (no accuracy run unless `changes` asks for one)."""
        shared = {f.name for f in dataclasses.fields(Job)} - {"config", "accuracy_limit"}
        return Job(
            config=config, **{k: v for k, v in dataclasses.asdict(self).items() if k in shared} | changes
        )


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

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_bf16_supported": cpu_has_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": round(os.getloadavg()[0], 2),
    }


def _in_subprocess(job: Job) -> dict[str, Any]:
    """`execute(job)` in a fresh `python benchmarks/bench.py --job` process, the job as JSON on its stdin."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job"]
    proc = subprocess.run(cmd, input=job.to_json(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} < {job.to_json()} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or any(map(math.isnan, (a, b))):
        return None
    return round(a / b, 3)


def run(settings: Settings, progress=None) -> dict[str, Any]:
    """The whole benchmark: each config `repeats` times (order reversed on every other round, so drift in a
    shared machine's load hits all alike), generation, optionally accuracy. Returns the summary dict."""
    from llava_nb import sources

    say = progress or (lambda line: None)
    configs = list(dict.fromkeys(settings.configs))
    for c in configs:
        if c not in VARIANTS:
            raise KeyError(f"unknown config {c!r}: choose from {sorted(VARIANTS)}")
    began = time.perf_counter()
    profile = cfg.get_profile(settings.profile)
    sources.prepare_backbones(profile)  # written now, so that no measured process writes a cache
    sources.prepare_dataset(profile)
    execute_job = execute if settings.in_process else _in_subprocess

    runs: dict[str, list[dict]] = {c: [] for c in configs}
    orders = []
    for r in range(settings.repeats):
        order = configs if r % 2 == 0 else configs[::-1]
        orders.append(order)
        for c in order:
            say(f"train {c} (round {r + 1}/{settings.repeats})")
            runs[c].append(execute_job(settings.job(c)))
    train_results = {}
    for c, rs in runs.items():
        merged = dict(rs[-1])
        for k in ("samples_per_s", "tokens_per_s", "supervised_tokens_per_s"):
            merged[k] = round(statistics.median(x[k] for x in rs), 3)
        for k in ("train_peak_rss_mb", "process_peak_rss_mb"):
            vals = [x[k] for x in rs if x.get(k) is not None]
            merged[k] = max(vals) if vals else None
        merged["step_seconds"] = [x for r in rs for x in r["step_seconds"]]
        merged["repeats"] = len(rs)
        train_results[c] = merged

    say(f"generate (max_new_tokens={settings.max_new_tokens}, batches 1 and {settings.gen_batch_size})")
    generation = execute_job(settings.job("generate"))

    accuracy = {}
    if settings.accuracy_steps:
        for c in (BASELINE, PROJECT):
            say(
                f"accuracy: train {c} {settings.accuracy_steps} steps, evaluate {settings.accuracy_limit} "
                "held-out samples"
            )
            a = execute_job(
                settings.job(
                    c, steps=settings.accuracy_steps, warmup=0, accuracy_limit=settings.accuracy_limit
                )
            )
            accuracy[c] = {
                k: a.get(k)
                for k in (
                    "accuracy",
                    "eval_loss",
                    "accuracy_steps",
                    "accuracy_limit",
                    "samples_per_s",
                    "train_wall_seconds",
                )
            }

    base, proj = train_results.get(BASELINE), train_results.get(PROJECT)
    summary: dict[str, Any] = {
        "train_speedup_vs_tutorial": _ratio(proj and proj["samples_per_s"], base and base["samples_per_s"]),
        "peak_rss_ratio_vs_tutorial": _ratio(
            proj and proj["train_peak_rss_mb"], base and base["train_peak_rss_mb"]
        ),
        "baseline_precision": base["precision"] if base else baseline_precision(),
        "speedup_vs_tutorial": {
            c: _ratio(r["samples_per_s"], base["samples_per_s"]) for c, r in train_results.items()
        }
        if base
        else {},
        "ran_first": orders[0][0] if orders else None,
        "orders": orders,
        "train": train_results,
        "generation": generation,
        "settings": dataclasses.asdict(settings),
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
    rows = [
        "| config | labels | fast_loss | precision | grouped | attention | bf16 frozen | shared prefix "
        "| padding | samples/s | tokens/s | supervised tokens/s | speed-up | training peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c, r in summary["train"].items():
        speed = _ratio(r["samples_per_s"], base["samples_per_s"]) if base else None
        rows.append(
            f"| {c} | {r['labels']} | {'yes' if r['fast_loss'] else 'no'} | {r['precision']} | "
            f"{'yes' if r.get('grouped') else 'no'} | {r.get('attention', '-')} | "
            f"{'yes' if r.get('bf16_frozen') else 'no'} | "
            f"{'yes' if r.get('shared_prefix') else 'no'} | {_fmt(100 * r['padding_fraction'], 1)} % | "
            f"{_fmt(r['samples_per_s'])} | {_fmt(r['tokens_per_s'], 0)} | "
            f"{_fmt(r['supervised_tokens_per_s'], 0)} | {_fmt(speed)}x | {_fmt(r['train_peak_rss_mb'], 0)} |"
        )
    g = summary["generation"]
    rows += [
        "",
        f"| generation (greedy, KV cache, {g['dtype']}, {g['max_new_tokens']} new tokens) | prompt tokens "
        "| seconds | new tokens/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k, v in g.items():
        if k.startswith("batch"):
            rows.append(
                f"| batch of {v['batch_size']} | {v['prompt_tokens']} | {_fmt(v['seconds'])} | "
                f"{_fmt(v['tokens_per_s'], 1)} |"
            )
    if summary.get("accuracy"):
        rows += [
            "",
            "| accuracy after N steps | steps | held-out accuracy | eval loss |",
            "| --- | ---: | ---: | ---: |",
        ]
        for c, a in summary["accuracy"].items():
            rows.append(
                f"| {c} | {a['accuracy_steps']} | {_fmt(a['accuracy'], 3)} | {_fmt(a['eval_loss'], 3)} |"
            )
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description="Training and generation speed and memory: this project's stage 1 "
        "against the tutorial's recipe in mixed precision, same model, data and "
        "seed. The last line printed is a JSON summary.",
    )
    p.add_argument(
        "--steps", type=int, default=d.steps, help=f"timed training steps per config (default {d.steps})"
    )
    p.add_argument(
        "--warmup", type=int, default=d.warmup, help=f"untimed steps before them (default {d.warmup})"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"training batch size (default {d.batch_size}, the offline profile's)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=d.repeats,
        help="run every config this many times, alternating the order; medians are reported",
    )
    p.add_argument(
        "--configs",
        default=",".join(d.configs),
        help=f"comma-separated, from {sorted(VARIANTS)} (default {','.join(d.configs)})",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=d.max_new_tokens, help="generation length (default 32)"
    )
    p.add_argument(
        "--gen-batch-size", type=int, default=d.gen_batch_size, help="the batched generation's size"
    )
    p.add_argument(
        "--accuracy-steps",
        type=int,
        default=d.accuracy_steps,
        help="also train tutorial and project this many steps each and evaluate held-out accuracy "
        "(evaluate.evaluate, --accuracy-limit samples); off by default, it is slow",
    )
    p.add_argument("--accuracy-limit", type=int, default=d.accuracy_limit)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--profile", default=d.profile, choices=sorted(cfg.PROFILES))
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every job in this process (faster, for tests; peaks are then not each job's own)",
    )
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)  # a Job as JSON on stdin (run())
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.job:
        out = execute(Job.from_json(sys.stdin.read()))
        print(json.dumps(out))
        return out

    def say(line: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    settings = Settings(
        configs=tuple(c.strip() for c in a.configs.split(",") if c.strip()),
        steps=a.steps,
        warmup=a.warmup,
        batch_size=a.batch_size,
        repeats=a.repeats,
        seed=a.seed,
        profile=a.profile,
        max_new_tokens=a.max_new_tokens,
        gen_batch_size=a.gen_batch_size,
        accuracy_steps=a.accuracy_steps,
        accuracy_limit=a.accuracy_limit,
        in_process=a.in_process,
    )
    summary = run(settings, progress=say)
    m = summary["machine"]
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}, "
        f"bf16 instructions: {m['cpu_bf16_supported']}; load average {m['load_average']}"
    )
    print(format_table(summary))
    print(
        f"train speed-up vs the tutorial in {summary['baseline_precision']}: "
        f"{summary['train_speedup_vs_tutorial']}x; "
        f"training peak RSS ratio: {summary['peak_rss_ratio_vs_tutorial']}; {summary['bench_seconds']} s"
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
