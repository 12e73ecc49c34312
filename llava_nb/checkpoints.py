"""What training writes: checkpoints that hold only what trains, written atomically (a checkpoint is
complete or absent), the resume point, and the export that plain transformers loads. Where they go, and
what makes a folder an export, is `runs`' (inference reads it there, not here):

    <export_dir>/       the export: config, model.safetensors, processor, llava_nb_training.json, README.md
    <checkpoint_dir>/   checkpoint-N: trainable.safetensors, optimizer, scheduler, RNG, trainer state,
                        llava_nb_stream.json (samples read so far), llava_nb_manifest.json (complete)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .cards import CARD_FILE, write_card
from .device import set_config_dtype
from .fsutil import atomic_dir, is_complete, load_state_dict, write_manifest
from .runs import SUMMARY_FILE

log = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"  # a checkpoint's weights: only the tensors that train
STREAM_FILE = "llava_nb_stream.json"  # a checkpoint's position in the training stream
STAGING_PREFIX = ".staging-"


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
    state = load_state_dict(path)
    params = dict(model.named_parameters())
    expected = set(trainable_state(model))
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise KeyError(
            f"{path} does not match the model being trained (in the file only: {extra[:3]}, in "
            f"the model only: {missing[:3]}): it comes from another stage or LoRA setting; resume "
            "into the same stage and profile, or start afresh in another --export-dir"
        )
    for name, tensor in state.items():
        if params[name].shape != tensor.shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(params[name].shape)}: was lora_r changed since the checkpoint?"
            )
        params[name].copy_(tensor)


def checkpoint_step(folder: str | os.PathLike) -> int:
    """N from `.../checkpoint-N`."""
    return int(Path(folder).name.rsplit("-", 1)[-1])


def checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `folder`, oldest first; half-written ones are left out."""
    folder = Path(folder)
    found = sorted(
        (
            p
            for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
            if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", p.name)
        ),
        key=checkpoint_step,
    )
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


def resume_point(checkpoint_dir: Path, resume: bool | str, args: TrainingArguments) -> Path | None:
    """The checkpoint to resume from (None: start afresh); tidies `checkpoint_dir` accordingly."""
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    found = last_checkpoint(checkpoint_dir)
    if resume is True and found is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {checkpoint_dir}; start without it")
    with args.main_process_first(desc="tidying the checkpoint folder"):  # the others wait for process 0
        if args.process_index == 0 and checkpoint_dir.exists():
            if resume is False:
                old = [
                    *checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"),
                    *checkpoint_dir.glob(STAGING_PREFIX + "*"),
                ]
                if old:
                    log.warning(
                        "starting afresh: removing %d old checkpoint(s) in %s (resume=True continues them)",
                        len(old),
                        checkpoint_dir,
                    )
            else:  # a save cut short leaves its staging folder behind
                old = list(checkpoint_dir.glob(STAGING_PREFIX + "*"))
            for p in old:
                shutil.rmtree(p, ignore_errors=True)
    return found if resume else None


def export(
    model: nn.Module,
    processor: Any,
    folder: str | os.PathLike,
    *,
    summary: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a folder that plain transformers loads (config, model.safetensors, generation config,
    processor with tokenizer and chat template) and its model card (`cards`), atomically: a killed export
    leaves the previous one.

    A peft model is merged first. `dtype` defaults to the frozen weights' dtype (fp16 on a GPU); config.json
    names it (`dtype`, in the model's config and its text and vision configs), so that from_pretrained's
    default builds every part in the dtype the weights are stored in.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()  # W + B @ A x alpha / r, and the LoRA layers are gone
    if dtype is None:
        dtype = next(p.dtype for p in model.parameters() if not p.requires_grad)
    model = model.to(dtype).eval()
    set_config_dtype(model.config, dtype)
    model.requires_grad_(False)
    model.config.use_cache = model.config.text_config.use_cache = True  # Trainer and stage_model cleared it
    with atomic_dir(folder, unlisted=(CARD_FILE,)) as tmp:  # evaluate rewrites the card's scores
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if summary is not None:
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=str))
        write_card(tmp, json.loads(json.dumps(summary, default=str)) if summary is not None else None)
    return Path(folder)
