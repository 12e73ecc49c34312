"""Two CPU processes (one DDP group over gloo) train as one process does at the same global batch and seed:
the same projector, one export, one set of checkpoints; a resume and stage 2 (LoRA) run under them too.

The training processes run this file as a script (`__main__` below), started by `accelerate launch
--multi_gpu --num_processes 2` as the README's command does, or by plain `python` for the single process.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from llava_nb import checkpoints, config, train, trainer

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4  # samples per optimizer step: 2 processes x 2, or 1 process x 4
# Single-turn samples (~96 tokens); fp32 on CPU, as bf16 autocast would add noise of its own to the comparison
# Not the smoke budget: that caps the batch at 2 per device, and 1 process x 4 is the comparison here.
TINY = dict(
    data=dict(max_length=128),
    stage1=dict(
        max_steps=3,
        gradient_accumulation_steps=1,
        save_steps=1,
        eval_samples=0,
        logging_steps=1,
        max_turns=1,
        cpu_bf16=False,
    ),
    stage2=dict(
        max_steps=2,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        save_steps=2,
        eval_samples=2,
        eval_steps=2,
        logging_steps=1,
        max_turns=1,
        gradient_checkpointing=True,
        cpu_bf16=False,
    ),
)
# Projector after 3 steps, 1 process vs 2: the batches are padded to other lengths and the gradients summed in
# another order. Measured: 5e-7 at most, where one step moves the weights by ~3e-3 (lr 5e-3).
ATOL = 1e-5
TIMEOUT = 600  # seconds for one launch; the two take about a minute together on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, spec: dict, log: Path) -> None:
    """Run this file's `__main__` under `processes` CPU processes with `spec` (one JSON argument)."""
    if processes == 1:
        command = [sys.executable, __file__]
    else:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            __file__,
        ]
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",  # CPUs even where there are GPUs: gloo, fp32
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with open(log, "w") as out:
        done = subprocess.run(
            [*command, json.dumps(spec)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            timeout=TIMEOUT,
        )
    assert done.returncode == 0, log.read_text()[-5000:]


def spec(processes: int, root: Path, runs: list[dict]) -> dict:
    batch = GLOBAL_BATCH // processes
    return {
        "profile": {**TINY, "stage1": {**TINY["stage1"], "per_device_train_batch_size": batch}},
        "runs": [{**run, "export_dir": str(root / run["export_dir"])} for run in runs],
        "results": str(root / "results"),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """Folders of a 1-process and a 2-process run. The two processes run stage 1 up to step 2, resume it
    to step 3 and export, then run stage 2 from that export; the single process runs stage 1 uninterrupted."""
    roots = {n: tmp_path_factory.mktemp(f"processes{n}") for n in (1, 2)}
    launch(
        1, spec(1, roots[1], [{"stage": 1, "export_dir": "stage1", "export": False}]), roots[1] / "log.txt"
    )
    launch(
        2,
        spec(
            2,
            roots[2],
            [
                {"stage": 1, "export_dir": "stage1", "stop_at": 2},
                {"stage": 1, "export_dir": "stage1", "resume": True},
                {"stage": 2, "export_dir": "stage2"},
            ],
        ),
        roots[2] / "log.txt",
    )
    return roots


def results(root: Path, rank: int) -> list[dict]:
    return json.loads((root / "results" / f"rank{rank}.json").read_text())


def test_two_processes_train_the_projector_one_process_trains(runs):
    one = load_file(runs[1] / "stage1-checkpoints" / "checkpoint-3" / checkpoints.TRAINABLE_FILE)
    two = load_file(runs[2] / "stage1-checkpoints" / "checkpoint-3" / checkpoints.TRAINABLE_FILE)
    assert one.keys() == two.keys() and all(k.startswith("model.multi_modal_projector.") for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=ATOL, msg=k)
    # the loss each step logs is that of the whole global batch, gathered over the processes
    losses = {
        n: {
            e["step"]: e["loss"]
            for e in results(runs[n], 0)[-1 if n == 1 else 1]["log_history"]
            if "loss" in e
        }
        for n in (1, 2)
    }
    assert losses[1].keys() == losses[2].keys() == {1, 2, 3}
    assert losses[2] == pytest.approx(losses[1], abs=1e-4)


def test_two_processes_write_one_export_and_one_set_of_checkpoints(runs):
    root = runs[2]
    cut, resumed, _ = results(root, 0)
    assert (cut["global_step"], cut["export_dir"]) == (2, None)
    assert Path(resumed["resumed_from"]).name == "checkpoint-2" and resumed["global_step"] == 3
    assert resumed["export_dir"] == str(root / "stage1")
    assert [r["export_dir"] for r in results(root, 1)] == [None, None, None]  # process 1 writes no export
    assert sorted(p.name for p in root.iterdir()) == [
        "log.txt",
        "results",
        "stage1",
        "stage1-checkpoints",
        "stage2",
        "stage2-checkpoints",
    ]
    folder = root / "stage1-checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", "checkpoint-3"]  # no staging left
    assert {p.name for p in (folder / "checkpoint-3").glob("rng_state*")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    assert checkpoints.read_position(folder / "checkpoint-3") == 3 * GLOBAL_BATCH  # a global count of samples
    model = LlavaForConditionalGeneration.from_pretrained(root / "stage1")
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def test_stage2_with_lora_runs_under_two_processes(runs):
    root = runs[2]
    stage2 = results(root, 0)[2]
    assert stage2["global_step"] == 2 and stage2["export_dir"] == str(root / "stage2")
    assert any("eval_loss" in e for e in stage2["log_history"])
    before = LlavaForConditionalGeneration.from_pretrained(root / "stage1").state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(root / "stage2").state_dict()
    assert before.keys() == after.keys()  # LoRA merged
    assert not torch.equal(
        before["model.language_model.layers.0.self_attn.q_proj.weight"],
        after["model.language_model.layers.0.self_attn.q_proj.weight"],
    )


if __name__ == "__main__":  # one training process: train.train for each run of the JSON spec
    import datasets

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # datasets 5 sleeps 5 s after a pass (see test_train)
    spec = json.loads(sys.argv[1])
    profile = config.get_profile(
        os.environ.get(config.PROFILE_ENV) or "offline", **spec["profile"]
    )  # under test
    done = []
    for run in spec["runs"]:
        stop = [trainer.StopAtStep(run["stop_at"])] if run.get("stop_at") else []
        result = train.train(
            profile,
            run["stage"],
            export_dir=run["export_dir"],
            resume=run.get("resume", False),
            callbacks=stop,
            export_model=run.get("export", True),
        )
        done.append(
            {
                "global_step": result.global_step,
                "log_history": result.log_history,
                "export_dir": str(result.export_dir) if result.export_dir else None,
                "resumed_from": str(result.resumed_from) if result.resumed_from else None,
            }
        )
    rank = int(os.environ.get("RANK", "0"))
    Path(spec["results"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["results"]) / f"rank{rank}.json").write_text(json.dumps(done, indent=1))
