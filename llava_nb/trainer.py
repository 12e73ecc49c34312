"""The Trainer of both stages: checkpoints of what trains, written atomically, a loss that projects only the
supervised positions onto the vocabulary, the training arguments of a TrainConfig, and two callbacks.

Four of Trainer's private methods are overridden here, and only here: `_load_from_checkpoint` (a
checkpoint holds the trainable tensors only), `_save_checkpoint` with `_get_output_dir` (write into a
staging folder, then rename), and `_load_optimizer_and_scheduler` (several CPU processes on transformers
5.15). tests/test_trainer.py fails loudly on every CI leg if their signatures change.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    LlavaForConditionalGeneration,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import config as cfg
from .checkpoints import (
    STAGING_PREFIX,
    STREAM_FILE,
    checkpoints,
    commit_checkpoint,
    load_trainable,
    save_trainable,
)
from .data import IGNORE_INDEX
from .device import cpu_bf16_autocast
from .surgery import base_model


class LlavaTrainer(Trainer):
    """Trainer whose checkpoints hold only what trains and are written atomically.

    `compute_loss` is the place for loss-side speed-ups (for instance LM-head logits only where labels are).
    """

    def __init__(
        self,
        *args: Any,
        keep_checkpoints: int = 2,
        stream_origin: tuple[int, int] = (0, 0),
        fast_loss: bool = True,
        shared_prefix: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.fast_loss, self.shared_prefix = fast_loss, shared_prefix
        self.keep_checkpoints = keep_checkpoints
        self.stream_origin = stream_origin  # (step, samples read) where this run starts: (0, 0), or a resume
        self._staging: Path | None = None
        # tqdm's bar in notebooks too: transformers' notebook table (5.15 and 5.24) raises a TypeError in
        # on_train_end when training stops before max_steps (a StopAtStep demo), dividing by a None rate.
        # Found by class name: importing transformers.utils.notebook needs IPython, which the commands
        # do not install (Trainer adds that callback only inside a notebook, where IPython runs).
        notebook_bars = [
            c for c in self.callback_handler.callbacks if type(c).__name__ == "NotebookProgressCallback"
        ]
        for callback in notebook_bars:
            self.remove_callback(callback)
        if notebook_bars:
            self.add_callback(ProgressCallback)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Cross-entropy over the supervised tokens, computing only what they need.

        The model's own loss projects every position onto the vocabulary (49k-32k columns) and then ignores
        all but the few that are replies; this applies the LM head to the rows that count, drops the
        columns after the batch's last supervised token and, with `shared_prefix` while the language model
        is frozen (stage 1), runs the system prompt that opens every sample once instead of once per sample
        (`shared_prefix_cache`). The same mean, the same gradients (tests/test_fast_loss.py).
        """
        if not self.fast_loss or return_outputs:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        inputs = trim_after_last_target(inputs, base_model(model).config.image_token_id)
        prefix, cache = 0, None
        if self.shared_prefix:  # in the precision of the model's forward, which accelerate wraps in autocast
            with self.accelerator.autocast():
                prefix, cache = shared_prefix_cache(model, inputs)
        targets = inputs["labels"][:, prefix + 1 :]
        supervised = targets != IGNORE_INDEX  # position t predicts token t + 1

        # The call goes through `model` as Trainer wrapped it, so that DDP synchronises the gradients and
        # accelerate's autocast applies; a pre-hook hands the LM head the supervised positions only,
        # (batch, seq, hidden) -> (n_supervised, hidden), so the logits come back as (n_supervised, vocab).
        def keep_supervised(_head: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
            return (args[0][:, :-1][supervised],)

        forward = {k: v for k, v in inputs.items() if k != "labels"}
        if cache is not None:  # the rest of each sample, after the prefix's keys and values
            forward.update({"input_ids": inputs["input_ids"][:, prefix:], _CACHE_ARG: cache})
        hook = base_model(model).lm_head.register_forward_pre_hook(keep_supervised)
        try:
            logits = model(**forward).logits.float()
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
        # the newest checkpoint. Let it write into <checkpoint_dir>/.staging-checkpoint-N/checkpoint-N
        # instead (args.output_dir is the checkpoint_dir), then rename the finished folder into place: a
        # checkpoint either is complete or does not exist.
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
            for old in checkpoints(final.parent)[: -self.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()


def trim_after_last_target(inputs: dict[str, torch.Tensor], image_token_id: int) -> dict[str, torch.Tensor]:
    """The batch without the columns after its last supervised token: they predict nothing that counts."""
    labels = inputs["labels"]
    targets = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    if len(targets) == 0:
        return inputs
    keep = int(targets[-1]) + 2  # position t predicts label t + 1: keep positions 0 .. last target
    if keep >= labels.shape[1] or (inputs["input_ids"][:, keep:] == image_token_id).any():
        return inputs  # nothing to cut, or an image placeholder there (its features must all find a place)
    return {
        k: v[:, :keep] if k in ("input_ids", "attention_mask", "labels") else v for k, v in inputs.items()
    }


def shared_prefix_cache(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, Any]:
    """(P, keys and values of the first P tokens, for every row) when the batch's rows open with the same P
    unpadded, unsupervised text tokens (the system prompt) and the language model is frozen: the prefix
    runs once, for one row, and its cache is repeated across the batch. (0, None) when it does not apply:
    one row, no common prefix, a language model that trains (stage 2: LoRA) or gradient checkpointing
    (which drops a cache passed to the layers)."""
    from transformers import DynamicCache

    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
    llava = base_model(model)
    lm = llava.model.language_model
    checkpointing = getattr(lm, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers 5.15 (Colab's)
        checkpointing = lm.is_gradient_checkpointing
    if ids.shape[0] < 2 or checkpointing or any(p.requires_grad for p in lm.parameters()):
        return 0, None
    common = (
        (ids == ids[:1]).all(0)
        & (mask == 1).all(0)
        & (labels == IGNORE_INDEX).all(0)
        & (ids[0] != llava.config.image_token_id)
    )
    prefix = int(common.int().cumprod(0).sum()) - 1  # label `prefix` unsupervised too: nothing to predict
    if prefix < 1:
        return 0, None
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        lm(input_ids=ids[:1, :prefix], use_cache=True, **{_CACHE_ARG: cache})
    cache.batch_repeat_interleave(ids.shape[0])
    return prefix, cache


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


# Names that differ between the transformers versions we support.
# The forward argument that takes a KV cache: `cache` from transformers 5.2x (`past_key_values` then warns
# and goes in 5.40), `past_key_values` in 5.15 (Colab).
_CACHE_ARG = (
    "cache"
    if "cache" in inspect.signature(LlavaForConditionalGeneration.forward).parameters
    else "past_key_values"
)
_ARG_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
# transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (the old name warns);
# 5.15 (Colab) only knows the old name.
_CHECKPOINTING = (
    "activation_checkpointing" if "activation_checkpointing" in _ARG_FIELDS else "gradient_checkpointing"
)


def training_arguments(
    t: cfg.TrainConfig, checkpoint_dir: str | os.PathLike, *, seed: int, evaluate: bool
) -> TrainingArguments:
    """The profile's TrainConfig as TrainingArguments: the tutorial's schedule, T4-safe precision."""
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        output_dir=str(checkpoint_dir),  # Trainer's output_dir only ever holds checkpoints: checkpoint_dir
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
        bf16=cpu_bf16_autocast(t),
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
