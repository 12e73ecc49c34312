"""Stage 1 and stage 2 on `transformers.Trainer`: checkpoints of what trains, exact resume, atomic export.

Stage 1 (feature alignment) trains the projector alone on single-turn samples; stage 2 starts from the
stage-1 export, keeps the vision tower frozen, trains the projector and a LoRA adapter on the language
model's linear layers, and exports with the adapter merged. A run's folders, under `run_dir(profile)`:

    stage1/                 the export: LlavaForConditionalGeneration.from_pretrained(...) loads it
    stage1-checkpoints/     checkpoint-N: trainable tensors, optimizer, scheduler, RNG and trainer state
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
import itertools
import json
import logging
import os
import re
import resource
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (AutoProcessor, LlavaForConditionalGeneration, ProgressCallback, Trainer,
                          TrainerCallback, TrainingArguments)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import config as cfg
from . import data, sources, surgery
from .fsutil import atomic_dir, is_complete, write_manifest
from .runs import run_dir  # where a profile's stages go (runs.py: repository, Drive or a test folder)

log = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"  # a checkpoint's weights: only the tensors that train
STREAM_FILE = "llava_nb_stream.json"  # a checkpoint's position in the training stream
SUMMARY_FILE = "llava_nb_training.json"  # an export's record: profile, stage, settings, log history
STAGING_PREFIX = ".staging-"

# Under test (`config.in_test()`) notebook 05 trains a few steps of each stage on short samples.
TEST_BUDGET: dict[str, Any] = dict(
    stage1=dict(max_steps=3, per_device_train_batch_size=2, save_steps=1, eval_steps=3, eval_samples=4,
                logging_steps=1),
    stage2=dict(max_steps=2, per_device_train_batch_size=2, save_steps=2, eval_steps=2, eval_samples=4,
                logging_steps=1, gradient_checkpointing=True),
)


# ------------------------------------------------------------------------------------------ folders


def default_checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """`<output_dir>-checkpoints`: beside the export, which is replaced whole when written."""
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + "-checkpoints")


def default_init_from(output_dir: str | os.PathLike) -> Path:
    """Stage 2 starts from `<output_dir>/../stage1`, the stage-1 export of the same run."""
    return Path(output_dir).parent / "stage1"


# -------------------------------------------------------------------------------------- the model


def lora_target_regex(model: LlavaForConditionalGeneration) -> str:
    """A peft `target_modules` regex matching every nn.Linear of the language model and nothing else
    (not the vision tower's q/k/v projections, not the projector, not lm_head)."""
    names = sorted({name.rsplit(".", 1)[-1] for name, m in model.model.language_model.named_modules()
                    if isinstance(m, nn.Linear)})
    return rf"model\.language_model\..*\.({'|'.join(names)})"


def add_lora(model: LlavaForConditionalGeneration, t: cfg.TrainConfig, *, seed: int = 0) -> nn.Module:
    """Wrap the model in a peft LoRA adapter on the language model; the projector trains too."""
    from peft import LoraConfig, get_peft_model

    if t.lora_r <= 0:
        raise ValueError("stage 2 needs lora_r > 0 in the profile's stage2 TrainConfig")
    model.requires_grad_(False)
    lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                      target_modules=lora_target_regex(model), bias="none")
    torch.manual_seed(seed)  # LoRA's A matrices start random (B starts at zero)
    peft_model = get_peft_model(model, lora)
    model.model.multi_modal_projector.requires_grad_(True)  # peft froze everything but the adapter
    return peft_model


def place_for_training(model: nn.Module) -> torch.dtype:
    """T4-safe precision: on a GPU frozen weights in fp16 (half the memory), trainable ones in fp32
    (fp16 gradients cannot be unscaled by the loss scaler); on CPU all fp32. Returns the frozen dtype."""
    frozen = torch.float16 if torch.cuda.is_available() else torch.float32
    for p in model.parameters():  # buffers (RoPE frequencies) keep their fp32 precision
        p.data = p.data.to(torch.float32 if p.requires_grad else frozen)
    return frozen


def stage_model(profile: cfg.Profile, stage: int, *, init_from: str | os.PathLike | None = None,
                seed: int | None = None) -> tuple[nn.Module, Any]:
    """(model, processor) ready to train: stage 1 from the backbones, stage 2 from a stage-1 export + LoRA."""
    seed = profile.seed if seed is None else seed
    if stage == 1:
        model, processor = surgery.build(dataclasses.replace(profile, seed=seed))
        model.set_attn_implementation("sdpa")  # fused attention (the default in transformers 5; made sure)
    else:
        if init_from is None or not is_complete(init_from):
            raise FileNotFoundError(f"stage 2 starts from a complete stage-1 export, and {init_from} is not "
                                    "one (missing, or its save was cut short): run stage 1 first "
                                    "(`python -m llava_nb.train --stage 1`) or pass --init-from")
        frozen = torch.float16 if torch.cuda.is_available() else torch.float32
        model = LlavaForConditionalGeneration.from_pretrained(init_from, dtype=frozen,
                                                              attn_implementation="sdpa")
        processor = AutoProcessor.from_pretrained(init_from)
        model = add_lora(model, profile.stage(2), seed=seed)
    base_model(model).config.text_config.use_cache = False  # no KV cache while training; export restores it
    place_for_training(model)
    return model, processor


def base_model(model: nn.Module) -> LlavaForConditionalGeneration:
    """The LlavaForConditionalGeneration inside accelerate's wrappers (DDP, torch.compile) and peft's."""
    from accelerate.utils import extract_model_from_parallel
    from peft import PeftModel

    model = extract_model_from_parallel(model)
    return model.get_base_model() if isinstance(model, PeftModel) else model


# ------------------------------------------------------------------------------------------ data


class TrainStream(torch.utils.data.IterableDataset):
    """The training samples as Trainer reads them: endless, in one order per seed, from sample `start` on.

    Pass k over the split is reshuffled with `set_epoch(k)` (the shuffle buffer's seed becomes seed + k),
    so the order depends on the seed alone. A resumed run starts at the sample count its checkpoint
    recorded: nothing is replayed, nothing skipped, and only raw samples are read past (no collation).
    `group` > 0 (and `length_window` > 0) reorders each window of `group * length_window` samples by length
    (`data.group_by_length`), so that batches of `group` samples need little padding.
    Under several processes accelerate wraps this in an IterableDatasetShard: every process reads the
    same stream and keeps its slice of each `batch x processes` window, so the count stays global.
    """

    def __init__(self, source: str, split: str, *, max_turns: int | None, seed: int, shuffle_buffer: int,
                 skipped: Counter | None = None, start: int = 0, group: int = 0, length_window: int = 16):
        self.source, self.split, self.max_turns = source, split, max_turns
        self.seed, self.shuffle_buffer, self.start = seed, shuffle_buffer, start
        self.group, self.length_window = group, length_window
        self.skipped = Counter() if skipped is None else skipped

    def __iter__(self) -> Iterator[dict]:
        stream = data.stream(self.source, self.split, max_turns=self.max_turns, seed=self.seed,
                             shuffle_buffer=self.shuffle_buffer, skipped=self.skipped)
        position = 0
        for epoch in itertools.count():
            stream.set_epoch(epoch)
            samples: Iterable[dict] = stream
            if self.group and self.length_window:
                samples = data.group_by_length(stream, self.group, window=self.length_window, seed=self.seed + epoch)
            n = 0
            for sample in samples:
                n += 1
                position += 1
                if position > self.start:
                    yield sample
            if n == 0:
                raise ValueError(f"the {self.split!r} split of {self.source} yields no usable sample "
                                 f"(max_turns={self.max_turns}, skipped: {dict(self.skipped)})")


def held_out(source: str, split: str, n: int, *, max_turns: int | None,
             skipped: Counter | None = None) -> list[dict]:
    """The first `n` usable samples of `split` in file order, as a list: the same eval set every time."""
    stream = data.stream(source, split, max_turns=max_turns, shuffle_buffer=0, skipped=skipped)
    return list(itertools.islice(stream, n))


# ---------------------------------------------------------------------------------- checkpoints


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train (projector, LoRA), by parameter name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write the trainable tensors to `folder/trainable.safetensors` (fp32, a few MB)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous().cpu() for k, v in trainable_state(model).items()}
    save_file(tensors, folder / TRAINABLE_FILE)
    return folder / TRAINABLE_FILE


@torch.no_grad()
def load_trainable(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy a checkpoint's trainable tensors back into the model, checking names and shapes."""
    path = Path(folder) / TRAINABLE_FILE
    state = sources.load_state_dict(path)
    params = dict(model.named_parameters())
    expected = set(trainable_state(model))
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise KeyError(f"{path} does not match the model being trained (in the file only: {extra[:3]}, in "
                       f"the model only: {missing[:3]}): it comes from another stage or LoRA setting; resume "
                       "into the same stage and profile, or start afresh in another --output-dir")
    for name, tensor in state.items():
        if params[name].shape != tensor.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(params[name].shape)}: was lora_r changed since the checkpoint?")
        params[name].copy_(tensor)


def checkpoint_step(folder: str | os.PathLike) -> int:
    """N from `.../checkpoint-N`."""
    return int(Path(folder).name.rsplit("-", 1)[-1])


def checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `folder`, oldest first; half-written ones are left out."""
    folder = Path(folder)
    found = sorted((p for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                    if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", p.name)), key=checkpoint_step)
    complete = [p for p in found if is_complete(p)]
    for p in sorted(set(found) - set(complete)):
        log.warning("ignoring %s: incomplete (its save was cut short)", p)
    return complete


def read_position(checkpoint: str | os.PathLike) -> int:
    """How many training samples the run had read when it saved `checkpoint`."""
    return json.loads((Path(checkpoint) / STREAM_FILE).read_text())["samples_seen"]


def last_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `folder`, or None."""
    found = checkpoints(folder)
    return found[-1] if found else None


def commit_checkpoint(staged: Path, final: Path) -> None:
    """List a fully written checkpoint in its manifest, then move it into place in one rename."""
    write_manifest(staged)
    if final.exists():  # os.replace cannot replace a non-empty folder: move the old one aside first
        old = final.with_name(f"{STAGING_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(staged, final)


class LlavaTrainer(Trainer):
    """Trainer whose checkpoints hold only what trains and are written atomically.

    `compute_loss` is the place for loss-side speed-ups (for instance LM-head logits only where labels are).
    """

    def __init__(self, *args: Any, keep_checkpoints: int = 2, stream_origin: tuple[int, int] = (0, 0),
                 fast_loss: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fast_loss = fast_loss
        self.keep_checkpoints = keep_checkpoints
        self.stream_origin = stream_origin  # (step, samples read) where this run starts: (0, 0), or a resume
        self._staging: Path | None = None
        # tqdm's bar in notebooks too: transformers' notebook table (5.15 and 5.24) raises a TypeError in
        # on_train_end when training stops before max_steps (a StopAtStep demo), dividing by a None rate.
        for callback in list(self.callback_handler.callbacks):
            if type(callback).__name__ == "NotebookProgressCallback":
                self.remove_callback(callback)
                self.add_callback(ProgressCallback)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Cross-entropy over the supervised tokens, the LM head applied only where a label is.

        The model's own loss projects every position onto the vocabulary (49k-32k columns) and then
        ignores all but the ~6 % that are replies; this computes the same mean on the rows that count.
        """
        if not self.fast_loss or return_outputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        targets = inputs["labels"][:, 1:]
        supervised = targets != data.IGNORE_INDEX  # position t predicts token t + 1
        # The call goes through `model` as Trainer wrapped it, so that DDP synchronises the gradients and
        # accelerate's autocast applies; a pre-hook hands the LM head the supervised positions only,
        # (batch, seq, hidden) -> (n_supervised, hidden), so the logits come back as (n_supervised, vocab).
        def keep_supervised(_head: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
            return (args[0][:, :-1][supervised],)

        hook = base_model(model).lm_head.register_forward_pre_hook(keep_supervised)
        try:
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()
        finally:
            hook.remove()
        loss = nn.functional.cross_entropy(logits, targets[supervised], reduction="sum")
        if num_items_in_batch is None:
            return loss / supervised.sum().clamp(min=1)
        # num_items_in_batch: supervised tokens in the accumulated batches, of every process when
        # average_tokens_across_devices (Trainer gathers the count). DDP averages the gradients over the
        # processes, so scale back by their number, as Trainer.compute_loss does: the global batch's mean.
        loss = loss / num_items_in_batch
        if self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the trainable tensors only: the frozen backbones (0.2-2 GB) are rebuilt from their sources.
        The full model is written by `export`."""
        if self.args.should_save:
            save_trainable(self.model, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_trainable(model if model is not None else self.model, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or self.args.world_size == 1 or self.args.device.type != "cpu":
            return super()._load_optimizer_and_scheduler(checkpoint)
        # Several CPU processes: transformers 5.15 (Colab's) loads the optimizer state onto args.device,
        # 'cpu:<i>', which torch.load cannot restore to ("don't know how to restore data location"); newer
        # versions load it onto 'cpu', as here. Both files exist: Trainer's own save wrote them.
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        for name, state in ((OPTIMIZER_NAME, self.optimizer), (SCHEDULER_NAME, self.lr_scheduler)):
            state.load_state_dict(torch.load(Path(checkpoint) / name, map_location="cpu", weights_only=True))

    def _get_output_dir(self, trial: Any) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Trainer writes checkpoint-N in place, so a kill mid-save would leave half a folder that looks like
        # the newest checkpoint. Let it write into <output_dir>/.staging-checkpoint-N/checkpoint-N instead,
        # then rename the finished folder into place: a checkpoint either is complete or does not exist.
        final = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = final.with_name(STAGING_PREFIX + final.name)
        self._staging = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every process has written its rng_state_<i>.pth
        if self.args.should_save:
            step0, seen0 = self.stream_origin
            seen = seen0 + (self.state.global_step - step0) * samples_per_step(self.args)
            position = {"samples_seen": seen, "global_step": self.state.global_step}
            (staging_root / final.name / STREAM_FILE).write_text(json.dumps(position))
            commit_checkpoint(staging_root / final.name, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            for old in checkpoints(final.parent)[:-self.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()


class StopAtStep(TrainerCallback):
    """Ends training after `step` optimizer steps, as a lost runtime would (for resume demos and tests)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


class StepTimer(TrainerCallback):
    """Seconds per optimizer step, reading and collating its batches included; evaluation and saving not."""

    def __init__(self):
        self.seconds: list[float] = []
        self._mark = time.perf_counter()

    def _restart(self, args, state, control, **kwargs):
        self._mark = time.perf_counter()

    on_train_begin = on_evaluate = on_save = _restart

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds.append(now - self._mark)
        self._mark = now


def samples_per_step(args: TrainingArguments) -> int:
    """Samples one optimizer step reads from the stream: batch x accumulation x processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


# Field names that differ between the transformers versions we support.
_ARG_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
# transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (the old name warns);
# 5.15 (Colab) only knows the old name.
_CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in _ARG_FIELDS
                  else "gradient_checkpointing")


def cpu_has_bf16() -> bool:
    """True when this CPU runs bf16 matrix products natively (AVX-512 BF16 or AMX), via oneDNN."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def training_arguments(t: cfg.TrainConfig, checkpoint_dir: str | os.PathLike, *, seed: int,
                       evaluate: bool) -> TrainingArguments:
    """The profile's TrainConfig as TrainingArguments: the tutorial's schedule, T4-safe precision."""
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        output_dir=str(checkpoint_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": t.min_lr},
        warmup_steps=t.warmup_steps,  # < 1: a fraction of max_steps (transformers 5 dropped warmup_ratio)
        weight_decay=t.weight_decay,
        optim="adamw_torch",
        fp16=cuda,  # a T4 has no bf16: fp16 autocast with loss scaling
        # CPU: bf16 autocast where the processor has bf16 matrix instructions (about 3x faster matmuls
        # here); weights stay fp32, so exports and logits are unaffected. Elsewhere fp32.
        bf16=not cuda and t.cpu_bf16 and cpu_has_bf16(),
        use_cpu=not cuda,  # also what makes several CPU processes (torchrun) one DDP group, over gloo
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps,
        eval_on_start=evaluate,  # the loss curve starts at step 0
        prediction_loss_only=True,  # eval keeps the loss only, not (batch, seq, vocab) logits
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # LlavaTrainer prunes old checkpoints itself, after the new one is in place
        remove_unused_columns=False,  # the collator reads 'messages' and 'images'
        ignore_data_skip=True,  # TrainStream starts at the right sample; Trainer would collate what it skips
        # Each process reads the stream and keeps its slice of every batch (IterableDatasetShard). The default
        # for iterable data, process 0 dispatching, needs batches of equal length across processes.
        accelerator_config={"dispatch_batches": False},
        ddp_find_unused_parameters=False,  # every trainable tensor (projector, LoRA) takes part in each step
        dataloader_pin_memory=cuda,
        report_to="none",
        seed=seed,
        data_seed=seed,
    )
    kwargs[_CHECKPOINTING] = t.gradient_checkpointing
    if t.gradient_checkpointing:
        # non-reentrant: gradients reach the projector through frozen layers, no enable_input_require_grads
        kwargs[_CHECKPOINTING + "_kwargs"] = {"use_reentrant": False}
    return TrainingArguments(**kwargs)


# ---------------------------------------------------------------------------------------- export


def export(model: nn.Module, processor: Any, folder: str | os.PathLike, *, summary: dict | None = None,
           dtype: torch.dtype | None = None) -> Path:
    """Write a folder that plain transformers loads (config, model.safetensors, generation config,
    processor with tokenizer and chat template), atomically: a killed export leaves the previous one.

    A peft model is merged first. `dtype` defaults to the frozen weights' dtype (fp16 on a GPU).
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()  # W + B @ A x alpha / r, and the LoRA layers are gone
    if dtype is None:
        dtype = next(p.dtype for p in model.parameters() if not p.requires_grad)
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    model.config.use_cache = model.config.text_config.use_cache = True  # Trainer and stage_model cleared it
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if summary is not None:
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=str))
    return Path(folder)


def read_summary(folder: str | os.PathLike) -> dict:
    """The training record an export carries (`llava_nb_training.json`): settings, log history, metrics."""
    return json.loads((Path(folder) / SUMMARY_FILE).read_text())


# ------------------------------------------------------------------------------------- training


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


def _resume_point(checkpoint_dir: Path, resume: bool | str, args: TrainingArguments) -> Path | None:
    """The checkpoint to resume from (None: start afresh); tidies `checkpoint_dir` accordingly."""
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    found = last_checkpoint(checkpoint_dir)
    if resume is True and found is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {checkpoint_dir}; start without it")
    with args.main_process_first(desc="tidying the checkpoint folder"):  # the others wait for process 0
        if args.process_index == 0 and checkpoint_dir.exists():
            if resume is False:
                old = [*checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"),
                       *checkpoint_dir.glob(STAGING_PREFIX + "*")]
                if old:
                    log.warning("starting afresh: removing %d old checkpoint(s) in %s (resume=True continues "
                                "them)", len(old), checkpoint_dir)
            else:  # a save cut short leaves its staging folder behind
                old = list(checkpoint_dir.glob(STAGING_PREFIX + "*"))
            for p in old:
                shutil.rmtree(p, ignore_errors=True)
    return found if resume else None


def train(
    profile: cfg.Profile,
    stage: int = 1,
    *,
    output_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    init_from: str | os.PathLike | None = None,
    resume: bool | str = False,
    seed: int | None = None,
    dataset: str | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    keep_checkpoints: int = 2,
    export_model: bool = True,
) -> TrainResult:
    """Train one stage of `profile` and export it to `output_dir` (default `run_dir(profile)/stage<N>`).

    resume: False starts afresh (old checkpoints in `checkpoint_dir` are removed), True continues from the
    newest complete checkpoint, 'auto' continues if there is one. `seed` (default profile.seed) sets the
    projector/LoRA initialisation, the data order and dropout; the offline dataset itself stays the
    profile's. `dataset` replaces the profile's (hub id or local path). Stage 2 starts from `init_from`
    (default `<output_dir>/../stage1`). `export_model=False` keeps the checkpoints only.
    """
    t = profile.stage(stage)
    seed = profile.seed if seed is None else seed
    output_dir = Path(output_dir) if output_dir is not None else run_dir(profile) / f"stage{stage}"
    checkpoint_dir = Path(checkpoint_dir or default_checkpoint_dir(output_dir))
    if stage == 2 and init_from is None:
        init_from = default_init_from(output_dir)
    evaluate = t.eval_samples > 0

    args = training_arguments(t, checkpoint_dir, seed=seed, evaluate=evaluate)
    resume_from = _resume_point(checkpoint_dir, resume, args)
    args.eval_on_start = evaluate and resume_from is None  # a resumed run measured its start already
    step0, start = 0, 0  # where this run starts: its optimizer step and the samples read before it
    if resume_from is not None:
        step0, start = checkpoint_step(resume_from), read_position(resume_from)

    with args.main_process_first(desc="preparing the sources"):  # one writer per machine, the others wait
        source = dataset or sources.prepare_dataset(profile)
        if stage == 1:
            sources.prepare_backbones(profile)
    model, processor = stage_model(profile, stage, init_from=init_from, seed=seed)
    parameters = surgery.parameters_by_part(base_model(model))
    collator = data.LlavaCollator(processor, max_length=profile.data.max_length)
    train_stream = TrainStream(source, profile.data.train_split, max_turns=t.max_turns, seed=seed,
                               shuffle_buffer=profile.data.shuffle_buffer, skipped=collator.skipped,
                               start=start, length_window=t.length_window,
                               # each process keeps its slice of a batch x processes window of the stream
                               group=args.per_device_train_batch_size * args.world_size)
    eval_set = held_out(source, profile.data.test_split, t.eval_samples, max_turns=t.max_turns,
                        skipped=collator.skipped) if evaluate else None

    timer = StepTimer()
    trainer = LlavaTrainer(model=model, args=args, data_collator=collator, train_dataset=train_stream,
                           eval_dataset=eval_set, callbacks=[timer, *callbacks],
                           keep_checkpoints=keep_checkpoints, stream_origin=(step0, start),
                           fast_loss=t.fast_loss)
    if resume_from is not None:
        log.info("resuming from %s (step %d, sample %d)", resume_from, step0, start)
    began = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - began
    state = trainer.state
    finished = state.global_step >= t.max_steps
    if evaluate and finished and not any(e.get("step") == state.global_step and "eval_loss" in e
                                         for e in state.log_history):
        trainer.evaluate()
    metrics = _metrics(state.log_history, step_seconds=timer.seconds, seconds=seconds)

    exported = None
    if not finished:
        log.warning("stopped at step %d of %d: continue with resume=True (--resume)", state.global_step,
                    t.max_steps)
    elif export_model:
        if trainer.is_world_process_zero():
            summary = {"profile": profile.name, "stage": stage, "seed": seed, "dataset": source,
                       "train": dataclasses.asdict(t), "data": dataclasses.asdict(profile.data),
                       "init_from": str(init_from) if init_from else None, "metrics": metrics,
                       "log_history": state.log_history}
            exported = export(trainer.model, processor, output_dir, summary=summary)
        trainer.accelerator.wait_for_everyone()
    return TrainResult(export_dir=exported, checkpoint_dir=checkpoint_dir, global_step=state.global_step,
                       log_history=list(state.log_history), metrics=metrics, parameters=parameters,
                       skipped=dict(collator.skipped), resumed_from=resume_from)


def _metrics(log_history: list[dict], *, step_seconds: list[float], seconds: float) -> dict[str, float]:
    losses = [e["loss"] for e in log_history if "loss" in e]
    evals = [e["eval_loss"] for e in log_history if "eval_loss" in e]
    nan = float("nan")
    return {"steps": len(step_seconds), "seconds": round(seconds, 1),
            "seconds_per_step": round(sum(step_seconds) / len(step_seconds), 2) if step_seconds else nan,
            "peak_rss_mb": round(peak_rss_mb()),
            "first_train_loss": losses[0] if losses else nan, "train_loss": losses[-1] if losses else nan,
            "first_eval_loss": evals[0] if evals else nan, "eval_loss": evals[-1] if evals else nan}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports kB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1024


# ------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m llava_nb.train",
        description="Train one LLaVA stage and export it. Stage 1: the projector alone (backbones frozen). "
                    "Stage 2: projector + LoRA on the language model, from the stage-1 export, merged on "
                    "export. Several processes, GPUs or CPUs: accelerate launch --multi_gpu "
                    "--num_processes N -m llava_nb.train ...",
    )
    p.add_argument("--profile", default=None, choices=sorted(cfg.PROFILES),
                   help=f"settings to use (default: ${cfg.PROFILE_ENV}, or 'offline' under tests, else 't4')")
    p.add_argument("--stage", type=int, default=1, choices=(1, 2),
                   help="1: feature alignment (projector); 2: instructions (projector + LoRA)")
    p.add_argument("--output-dir", default=None,
                   help="the export folder (default: <run dir>/stage<N>, the run dir being "
                        "/content/drive/MyDrive/llava_nb/<profile> when Drive is mounted, else "
                        "outputs/<profile> in the repository, whatever the working directory)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where checkpoints go (default: <output-dir>-checkpoints)")
    p.add_argument("--init-from", default=None,
                   help="stage 2: the stage-1 export to start from (default: <output-dir>/../stage1)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the profile's)")
    p.add_argument("--save-steps", type=int, default=None,
                   help="checkpoint every N steps (default: the profile's)")
    p.add_argument("--dataset", default=None, help="hub id or local folder/files (default: the profile's)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--seed", type=int, default=None,
                   help="initialisation, data order and dropout (default: the profile's)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """`python -m llava_nb.train`: one stage, then a one-line summary per number."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    name = args.profile or cfg.pick_profile_name("t4")
    overrides = {k: v for k, v in dict(max_steps=args.max_steps, save_steps=args.save_steps).items()
                 if v is not None}
    profile = cfg.get_profile(name, **{f"stage{args.stage}": overrides})
    try:
        result = train(profile, args.stage, output_dir=args.output_dir, checkpoint_dir=args.checkpoint_dir,
                       init_from=args.init_from, resume=args.resume, seed=args.seed, dataset=args.dataset)
    except sources.HubUnreachable as e:  # a message, not a stack of huggingface_hub frames
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {"export_dir": str(result.export_dir), "checkpoint_dir": str(result.checkpoint_dir),
                   "global_step": result.global_step, **result.metrics, "skipped": result.skipped}
        print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
