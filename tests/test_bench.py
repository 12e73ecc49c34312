"""The benchmark (benchmarks/bench.py) on a tiny budget: it runs end to end and its JSON summary holds finite,
positive numbers."""

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from llava_nb import data, sources, streams

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as `python benchmarks/bench.py` has it: bench_jobs beside bench
import bench  # noqa: E402
import bench_jobs  # noqa: E402


def test_tutorial_collator_labels_every_non_pad_token(built, profile):
    _, processor = built
    collator = data.LlavaCollator(processor, max_length=profile.data.max_length)
    samples = list(
        itertools.islice(streams.stream(sources.prepare_dataset(profile), "train", shuffle_buffer=0), 6)
    )
    ours = collator(samples)
    tutorial = bench_jobs.TutorialCollator(collator)(samples)
    real = tutorial["attention_mask"].bool()
    assert not real.all(), "the batch should hold some padding"
    assert torch.equal(tutorial["input_ids"], ours["input_ids"])
    assert torch.equal(
        tutorial["labels"][real], tutorial["input_ids"][real]
    )  # every real token, image ones too
    assert (tutorial["labels"][~real] == data.IGNORE_INDEX).all()
    # the project's labels are a strict subset: the assistant replies
    supervised = ours["labels"] != data.IGNORE_INDEX
    assert torch.equal(ours["labels"][supervised], tutorial["labels"][supervised])
    assert supervised.sum() < real.sum()


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_tiny_budget(backbones, capsys):
    summary = bench.main(
        [
            "--configs",
            "tutorial,tutorial_fp32,project",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "2",
            "--gen-batch-size",
            "2",
            "--in-process",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert {
        "train_speedup_vs_tutorial",
        "peak_rss_ratio_vs_tutorial",
        "baseline_precision",
        "ran_first",
        "train",
        "generation",
        "machine",
    } <= set(json.loads(out[-1]))
    table = "\n".join(out[:-1])
    assert all(f"| {name} |" in table for name in ("tutorial", "tutorial_fp32", "project"))
    for key in ("train_speedup_vs_tutorial", "peak_rss_ratio_vs_tutorial"):
        assert _finite_positive(summary[key]), (key, summary[key])
    train = summary["train"]
    for name in ("tutorial", "tutorial_fp32", "project"):
        assert train[name]["timed_steps"] == 1
        for key in ("samples_per_s", "tokens_per_s", "supervised_tokens_per_s", "train_peak_rss_mb"):
            assert _finite_positive(train[name][key]), (name, key, train[name][key])
    # the baseline is the tutorial in the machine's mixed precision; the fp32 run is an extra row
    assert summary["baseline_precision"] == train["tutorial"]["precision"] == train["project"]["precision"]
    assert (
        summary["baseline_precision"] in ("bf16", "fp16", "fp32")
        and train["tutorial_fp32"]["precision"] == "fp32"
    )
    assert summary["ran_first"] == "tutorial"
    assert train["tutorial"]["supervised_fraction"] == 1.0 > 0.5 > train["project"]["supervised_fraction"]
    assert train["project"]["fast_loss"] and not train["tutorial"]["fast_loss"]
    # the tutorial runs transformers' default attention; the project the device's choice, prefix shared
    from llava_nb.device import attention_implementation

    assert train["tutorial"]["attention"] == "sdpa" and not train["tutorial"]["shared_prefix"]
    assert (
        train["project"]["attention"] == attention_implementation("auto")
        and train["project"]["shared_prefix"]
    )
    for bs in (1, 2):
        g = summary["generation"][f"batch{bs}"]
        assert g["new_tokens"] == 2 * bs and _finite_positive(g["tokens_per_s"])


def test_a_job_travels_to_its_subprocess_as_json(backbones):
    job = bench.Settings(max_new_tokens=2, gen_batch_size=2).job("generate")
    assert bench_jobs.Job.from_json(job.to_json()) == job
    result = bench._in_subprocess(job)  # python benchmarks/bench.py --job, the JSON on its stdin
    assert result["batch2"]["new_tokens"] == 4 and result["max_new_tokens"] == 2
    with pytest.raises(RuntimeError, match="unknown_config"):
        bench._in_subprocess(bench_jobs.Job(config="unknown_config"))
