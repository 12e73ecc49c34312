"""Stage 1 and stage 2 on `transformers.Trainer`: checkpoints of what trains, exact resume, atomic export.

Stage 1 (feature alignment) trains the projector alone on single-turn samples; stage 2 starts from the
stage-1 export, keeps the vision tower frozen, trains the projector and a LoRA adapter on the language
model's linear layers, and exports with the adapter merged. A run's folders, under `run_dir(profile)`
(the layout is `runs`'):

    stage1/                 export_dir: LlavaForConditionalGeneration.from_pretrained(...) loads it
    stage1-checkpoints/     checkpoint_dir: checkpoint-N, trainable tensors, optimizer, scheduler, RNG, state
    stage2/, stage2-checkpoints/

Command line: `python -m llava_nb.train --help`. The same command runs as several processes, one DDP group
(NCCL on GPUs, gloo on CPUs): `accelerate launch --multi_gpu --num_processes N -m llava_nb.train ...` or
`torchrun --nproc_per_node N -m llava_nb.train ...`. Each process reads the stream and keeps its slice of
every batch (accelerate's IterableDatasetShard), so a step reads batch x accumulation x N samples; the loss
is the mean over all of them and DDP averages the gradients. The main process alone writes checkpoints
(every process adds its RNG state) and the export; --resume continues a run with the same N.
`accelerate launch --cpu` starts one process only, unless accelerate is configured for MPI; on CPUs use
--multi_gpu as above (with `CUDA_VISIBLE_DEVICES=` on a machine that has GPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from . import config as cfg
from . import data, sources, surgery
from .checkpoints import checkpoint_step, export, read_position, resume_point
from .device import peak_rss_mb
from .fsutil import HubUnreachable
from .runs import SHORT, default_checkpoint_dir, default_init_from, find_export, run_dir, stage_dir
from .stages import as_sources_hold_it, stage_model
from .streams import TrainStream, held_out
from .trainer import LlavaTrainer, StepTimer, training_arguments

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a `train` call did: where it wrote, the log history (for plots.loss_curve) and its costs."""

    export_dir: Path | None  # None when the run stopped before max_steps (resume it)
    checkpoint_dir: Path
    global_step: int
    log_history: list[dict]
    metrics: dict[str, float]  # seconds_per_step, peak_rss_mb, final train_loss / eval_loss, ...
    parameters: dict[str, dict[str, int]]  # total and trainable parameters per part, as trained
    skipped: dict[str, int] = field(default_factory=dict)  # dropped samples by reason
    resumed_from: Path | None = None


def train(
    profile: cfg.Profile,
    stage: int = 1,
    *,
    export_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    init_from: str | os.PathLike | None = None,
    resume: bool | str = False,
    seed: int | None = None,
    dataset: str | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    keep_checkpoints: int = 2,
    export_model: bool = True,
) -> TrainResult:
    """Train one stage of `profile` and export it to `export_dir` (default `run_dir(profile)/stage<N>`);
    its checkpoints go to `checkpoint_dir` (default `<export_dir>-checkpoints`).

    resume: False starts afresh (old checkpoints in `checkpoint_dir` are removed), True continues from the
    newest complete checkpoint, 'auto' continues if there is one. `seed` (default profile.seed) sets the
    projector/LoRA initialisation, the data order and dropout; the offline dataset itself stays the
    profile's. `dataset` replaces the profile's (hub id or local path). Stage 2 starts from `init_from`
    (default `<export_dir>/../stage1`). `export_model=False` keeps the checkpoints only.
    """
    t = profile.stage(stage)
    seed = profile.seed if seed is None else seed
    export_dir = Path(export_dir) if export_dir is not None else stage_dir(profile, stage)
    checkpoint_dir = Path(checkpoint_dir or default_checkpoint_dir(export_dir))
    if stage == 2 and init_from is None:
        init_from = default_init_from(export_dir)
    evaluate = t.eval_samples > 0

    args = training_arguments(t, checkpoint_dir, seed=seed, evaluate=evaluate)  # output_dir=checkpoint_dir
    resume_from = resume_point(checkpoint_dir, resume, args)
    args.eval_on_start = evaluate and resume_from is None  # a resumed run measured its start already
    step0, start = 0, 0  # where this run starts: its optimizer step and the samples read before it
    if resume_from is not None:
        step0, start = checkpoint_step(resume_from), read_position(resume_from)

    with args.main_process_first(desc="preparing the sources"):  # one writer per machine, the others wait
        source = dataset or sources.prepare_dataset(profile)
        if stage == 1:
            sources.prepare_backbones(profile)
    model, processor = stage_model(profile, stage, init_from=init_from, seed=seed)
    parameters = surgery.parameters_by_part(surgery.base_model(model))
    collator = data.LlavaCollator(processor, max_length=profile.data.max_length)
    train_stream = TrainStream(
        source,
        profile.data.train_split,
        max_turns=t.max_turns,
        seed=seed,
        shuffle_buffer=profile.data.shuffle_buffer,
        skipped=collator.skipped,
        start=start,
        length_window=t.length_window,
        # each process keeps its slice of a batch x processes window of the stream
        group=args.per_device_train_batch_size * args.world_size,
    )
    eval_set = (
        held_out(
            source, profile.data.test_split, t.eval_samples, max_turns=t.max_turns, skipped=collator.skipped
        )
        if evaluate
        else None
    )

    timer = StepTimer()
    trainer = LlavaTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_stream,
        eval_dataset=eval_set,
        callbacks=[timer, *callbacks],
        keep_checkpoints=keep_checkpoints,
        stream_origin=(step0, start),
        fast_loss=t.fast_loss,
        shared_prefix=t.shared_prefix,
    )
    if resume_from is not None:
        log.info("resuming from %s (step %d, sample %d)", resume_from, step0, start)
    began = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - began
    state = trainer.state
    finished = state.global_step >= t.max_steps
    if (
        evaluate
        and finished
        and not any(e.get("step") == state.global_step and "eval_loss" in e for e in state.log_history)
    ):
        trainer.evaluate()
    metrics = _metrics(state.log_history, step_seconds=timer.seconds, seconds=seconds)

    exported = None
    if not finished:
        log.warning(
            "stopped at step %d of %d: continue with resume=True (--resume)", state.global_step, t.max_steps
        )
    elif export_model:
        if trainer.is_world_process_zero():
            summary = {
                "profile": profile.name,
                "stage": stage,
                "seed": seed,
                "dataset": source,
                "train": dataclasses.asdict(t),
                "data": dataclasses.asdict(profile.data),
                "model": {"vision_id": profile.model.vision_id, "lm_id": profile.model.lm_id},
                "init_from": str(init_from) if init_from else None,
                "metrics": metrics,
                "log_history": state.log_history,
            }
            model = as_sources_hold_it(trainer.model, profile, stage, init_from=init_from, seed=seed)
            exported = export(model, processor, export_dir, summary=summary)
        trainer.accelerator.wait_for_everyone()
    return TrainResult(
        export_dir=exported,
        checkpoint_dir=checkpoint_dir,
        global_step=state.global_step,
        log_history=list(state.log_history),
        metrics=metrics,
        parameters=parameters,
        skipped=dict(collator.skipped),
        resumed_from=resume_from,
    )


def _metrics(log_history: list[dict], *, step_seconds: list[float], seconds: float) -> dict[str, float]:
    losses = [e["loss"] for e in log_history if "loss" in e]
    evals = [e["eval_loss"] for e in log_history if "eval_loss" in e]
    nan = float("nan")
    return {
        "steps": len(step_seconds),
        "seconds": round(seconds, 1),
        "seconds_per_step": round(sum(step_seconds) / len(step_seconds), 2) if step_seconds else nan,
        "peak_rss_mb": round(peak_rss_mb()),
        "first_train_loss": losses[0] if losses else nan,
        "train_loss": losses[-1] if losses else nan,
        "first_eval_loss": evals[0] if evals else nan,
        "eval_loss": evals[-1] if evals else nan,
    }


def find_or_train(
    profile: cfg.Profile, checkpoint: str | os.PathLike | None = None, *, short_steps: int = 30
) -> Path:
    """An export to use (notebooks 06 and 07): `checkpoint` when given (it must be an export), else the
    newest complete export in `run_dir(profile)` (`runs.find_export`), else a short stage 1 trained here,
    `min(short_steps, profile.stage1.max_steps)` steps into `run_dir(profile)/short`, so that a notebook
    can go on before notebook 05 has run. Prints what it does."""
    found = find_export(profile, checkpoint)
    if found is not None:
        return found
    steps = min(short_steps, profile.stage1.max_steps)
    short = dataclasses.replace(profile, stage1=dataclasses.replace(profile.stage1, max_steps=steps))
    folder = run_dir(profile) / SHORT
    print(f"training {steps} stage-1 steps into {folder} (notebook 05 trains {profile.stage1.max_steps})")
    return train(short, 1, export_dir=folder).export_dir  # max_steps reached: exported


# ------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m llava_nb.train",
        description="Train one LLaVA stage and export it. Stage 1: the projector alone (backbones frozen). "
        "Stage 2: projector + LoRA on the language model, from the stage-1 export, merged on "
        "export. Several processes, GPUs or CPUs: accelerate launch --multi_gpu "
        "--num_processes N -m llava_nb.train ...",
    )
    p.add_argument(
        "--profile",
        default=None,
        choices=sorted(cfg.PROFILES),
        help=f"settings to use (default: ${cfg.PROFILE_ENV}, else 't4')",
    )
    p.add_argument(
        "--budget",
        default=None,
        choices=sorted(cfg.BUDGETS),
        help=f"'smoke' caps every stage at a few steps, to check a run works end to end "
        f"(default: ${cfg.BUDGET_ENV}, else 'full')",
    )
    p.add_argument(
        "--stage",
        type=int,
        default=1,
        choices=(1, 2),
        help="1: feature alignment (projector); 2: instructions (projector + LoRA)",
    )
    p.add_argument(
        "--export-dir",
        default=None,
        help="the export folder (default: <run dir>/stage<N>, the run dir being "
        "/content/drive/MyDrive/llava_nb/<profile> when Drive is mounted, else "
        "outputs/<profile> in the repository, whatever the working directory)",
    )
    p.add_argument(
        "--checkpoint-dir", default=None, help="where checkpoints go (default: <export-dir>-checkpoints)"
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="stage 2: the stage-1 export to start from (default: <export-dir>/../stage1)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the profile's)")
    p.add_argument(
        "--save-steps", type=int, default=None, help="checkpoint every N steps (default: the profile's)"
    )
    p.add_argument("--dataset", default=None, help="hub id or local folder/files (default: the profile's)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="initialisation, data order and dropout (default: the profile's)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """`python -m llava_nb.train`: one stage, then a one-line summary per number."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    name = args.profile or cfg.pick_profile_name("t4")
    overrides = {
        k: v for k, v in dict(max_steps=args.max_steps, save_steps=args.save_steps).items() if v is not None
    }
    profile = cfg.get_profile(name, cfg.pick_budget_name(args.budget), **{f"stage{args.stage}": overrides})
    try:
        result = train(
            profile,
            args.stage,
            export_dir=args.export_dir,
            checkpoint_dir=args.checkpoint_dir,
            init_from=args.init_from,
            resume=args.resume,
            seed=args.seed,
            dataset=args.dataset,
        )
    except HubUnreachable as e:  # a message, not a stack of huggingface_hub frames
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {
            "export_dir": str(result.export_dir),
            "checkpoint_dir": str(result.checkpoint_dir),
            "global_step": result.global_step,
            **result.metrics,
            "skipped": result.skipped,
        }
        print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
