"""The benchmark on a tiny budget: it runs end to end and its JSON summary holds finite, positive numbers."""

import itertools
import json
import math

import torch

from llava_nb import bench, data, sources


def test_tutorial_collator_labels_every_non_pad_token(built, profile):
    _, processor = built
    collator = data.LlavaCollator(processor, max_length=profile.data.max_length)
    samples = list(itertools.islice(data.stream(sources.prepare_dataset(profile), "train",
                                                shuffle_buffer=0), 6))
    ours = collator(samples)
    tutorial = bench.TutorialCollator(collator)(samples)
    real = tutorial["attention_mask"].bool()
    assert not real.all(), "the batch should hold some padding"
    assert torch.equal(tutorial["input_ids"], ours["input_ids"])
    assert torch.equal(tutorial["labels"][real], tutorial["input_ids"][real])  # every real token, image ones too
    assert (tutorial["labels"][~real] == data.IGNORE_INDEX).all()
    # the project's labels are a strict subset: the assistant replies
    supervised = ours["labels"] != data.IGNORE_INDEX
    assert torch.equal(ours["labels"][supervised], tutorial["labels"][supervised])
    assert supervised.sum() < real.sum()


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_tiny_budget(backbones, capsys):
    summary = bench.main(["--configs", "tutorial,project", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                          "--max-new-tokens", "2", "--gen-batch-size", "2", "--_in-process"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(summary))
    for key in ("train_speedup_vs_tutorial", "peak_rss_ratio_vs_tutorial"):
        assert _finite_positive(summary[key]), (key, summary[key])
    for name in ("tutorial", "project"):
        r = summary["train"][name]
        assert r["timed_steps"] == 1
        for key in ("samples_per_s", "tokens_per_s", "supervised_tokens_per_s", "peak_rss_mb"):
            assert _finite_positive(r[key]), (name, key, r[key])
    assert summary["train"]["tutorial"]["supervised_fraction"] == 1.0
    assert summary["train"]["project"]["supervised_fraction"] < 0.5
    assert summary["train"]["project"]["fast_loss"] and not summary["train"]["tutorial"]["fast_loss"]
    assert not summary["train"]["tutorial"]["bf16"]
    assert summary["train"]["project"]["bf16"] == summary["machine"]["cpu_bf16_supported"]
    for bs in (1, 2):
        g = summary["generation"][f"batch{bs}"]
        assert g["new_tokens"] == 2 * bs and _finite_positive(g["tokens_per_s"])
    assert summary["machine"]["cores"] >= 1 and summary["machine"]["torch"]
