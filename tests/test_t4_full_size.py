"""benchmarks/t4_full_size.py on a tiny configuration (2 layers, width 64), so that the benchmark cannot rot,
and `memory.measured_beside_plan` on a small JSON of its shape."""

import importlib.util
import json
from pathlib import Path

import pytest

from llava_nb import memory

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "t4_full_size.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("t4_full_size", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(bench):
    return bench.run(tiny=True, seq_len=256, timed_steps=1)


def test_tiny_run_measures_both_stages_beside_the_plan(bench, tiny):
    for n in (1, 2):
        stage = tiny[f"stage{n}"]
        here, measured = stage["plan_as_measured"], stage["bytes"]
        assert stage["flops"] > 0 and stage["step_seconds"] > 0
        assert any("flash_attention" in op for op in stage["flops_by_op"])  # CPU attention is counted too
        # what the plan computes from the architecture is exactly what torch holds
        params = memory.meta_model(bench.t4_sized_config(tiny=True))
        assert stage["parameters"]["total"] > sum(p.numel() for p in params.parameters())  # + added tokens
        trainable = stage["parameters"]["trainable"]
        assert measured["trainable weights"] == measured["gradients"] == 4 * trainable
        assert 8 * trainable <= measured["AdamW state"] <= 8 * trainable + 64 * 4  # + a step count per tensor
        for item in ("activations", "logits and loss"):  # GiB, rounded: at this size only roughly
            assert stage["measured"][item] == pytest.approx(here[item], abs=0.002)
    two = tiny["stage2"]["bytes"]
    assert two["one layer without checkpointing"] > max(two["saved per layer"])  # checkpointed: inputs only
    assert tiny["stage2"]["parameters"]["trainable"] > tiny["stage1"]["parameters"]["trainable"]
    text = bench.table(tiny)
    assert "| activations GiB |" in text and "TFLOPS" in text


def test_measured_beside_plan_reads_the_benchmarks_json(tmp_path):
    plan = memory.memory_plan()
    measured = {k: plan[k] * 1.05 for k in memory.MEASURED_ITEMS}
    stage = {
        "precision_key": "t4",
        "measured": measured,
        "parameters": {"total": 1_100_000_000, "trainable": 5_771_264},
    }
    path = tmp_path / "t4-full-size.json"
    path.write_text(
        json.dumps(
            {
                "vocab": 32000,
                "seq_len": 1024,
                "micro_batch": 2,
                "supervised_positions": 2048,
                "stage1": stage,
                "stage2": stage,
            }
        )
    )
    rows = memory.measured_beside_plan(path)
    one = {r["item"]: r for r in rows if r["stage"] == 1}
    assert set(memory.MEASURED_ITEMS) < set(one)
    assert one["activations"]["plan (T4)"] == plan["activations"]
    assert one["activations"]["measured / plan"] == 1.05
    assert one["trainable parameters (M)"]["measured / plan"] == 1.0
    two = {r["item"]: r for r in rows if r["stage"] == 2}
    assert two["activations"]["plan (T4)"] < plan["activations"]  # stage 2 checkpoints
