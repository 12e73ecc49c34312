"""What trains in each stage: stage 1 the projector alone, stage 2 the projector and a LoRA adapter on the
language model; the frozen rest placed in a T4-safe precision; the model found inside any wrapper."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from . import config as cfg
from . import sources, surgery
from .device import attention_implementation, cpu_bf16_autocast, frozen_dtype
from .fsutil import is_complete
from .surgery import base_model


def lora_target_regex(model: LlavaForConditionalGeneration) -> str:
    """A peft `target_modules` regex matching every nn.Linear of the language model and nothing else
    (not the vision tower's q/k/v projections, not the projector, not lm_head)."""
    names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.model.language_model.named_modules()
            if isinstance(m, nn.Linear)
        }
    )
    return rf"model\.language_model\..*\.({'|'.join(names)})"


def add_lora(model: LlavaForConditionalGeneration, t: cfg.TrainConfig, *, seed: int = 0) -> nn.Module:
    """Wrap the model in a peft LoRA adapter on the language model; the projector trains too."""
    from peft import LoraConfig, get_peft_model

    if t.lora_r <= 0:
        raise ValueError("stage 2 needs lora_r > 0 in the profile's stage2 TrainConfig")
    model.requires_grad_(False)
    lora = LoraConfig(
        r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        target_modules=lora_target_regex(model),
        bias="none",
    )
    torch.manual_seed(seed)  # LoRA's A matrices start random (B starts at zero)
    with warnings.catch_warnings():  # peft reads transformers' deprecated alias; nothing a user can change
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        peft_model = get_peft_model(model, lora)
    model.model.multi_modal_projector.requires_grad_(True)  # peft froze everything but the adapter
    return peft_model


def narrows_frozen_weights(t: cfg.TrainConfig) -> bool:
    """True when training stores frozen linear weights in bf16: on a CPU under bf16 autocast, which casts
    them to bf16 for every product anyway (a GPU keeps them in fp16 already)."""
    return t.bf16_frozen and cpu_bf16_autocast(t)


def place_for_training(model: nn.Module, *, narrow: bool = False) -> torch.dtype:
    """T4-safe precision: on a GPU frozen weights in fp16 (half the memory), trainable ones in fp32
    (fp16 gradients cannot be unscaled by the loss scaler); on CPU all fp32. `narrow`: frozen nn.Linear
    weights in bf16, which under bf16 autocast gives the very same products (autocast would cast them)
    without a cast per step and without their fp32 copies; embeddings (a tied head with them) and norms
    keep fp32, as autocast keeps them. Returns the frozen dtype."""
    frozen = frozen_dtype()
    for p in model.parameters():  # buffers (RoPE frequencies) keep their fp32 precision
        p.data = p.data.to(torch.float32 if p.requires_grad else frozen)
    if narrow:
        embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        for m in model.modules():
            if isinstance(m, nn.Linear):
                for p in m.parameters(recurse=False):
                    if not p.requires_grad and id(p) not in embedding:
                        p.data = p.data.to(torch.bfloat16)
    return frozen


def stage_model(
    profile: cfg.Profile,
    stage: int,
    *,
    init_from: str | os.PathLike | None = None,
    seed: int | None = None,
    narrow: bool = True,
) -> tuple[nn.Module, Any]:
    """(model, processor) ready to train: stage 1 from the backbones, stage 2 from a stage-1 export + LoRA.
    `narrow=False` keeps the frozen weights as their sources hold them (see `as_sources_hold_it`)."""
    seed = profile.seed if seed is None else seed
    t = profile.stage(stage)
    attention = attention_implementation(t.attention)
    if stage == 1:
        backbones = sources.prepare_backbones(profile)  # on disk already when train() prepared them
        model, processor = surgery.build(dataclasses.replace(profile, seed=seed), backbones)
        model.set_attn_implementation(attention)
    else:
        if init_from is None or not is_complete(init_from):
            raise FileNotFoundError(
                f"stage 2 starts from a complete stage-1 export, and {init_from} is not "
                "one (missing, or its save was cut short): run stage 1 first "
                "(`python -m llava_nb.train --stage 1`) or pass --init-from"
            )
        model = LlavaForConditionalGeneration.from_pretrained(
            init_from, dtype=frozen_dtype(), attn_implementation=attention
        )
        processor = AutoProcessor.from_pretrained(init_from)
        model = add_lora(model, t, seed=seed)
    base_model(model).config.text_config.use_cache = False  # no KV cache while training; export restores it
    place_for_training(model, narrow=narrow and narrows_frozen_weights(t))
    return model, processor


def as_sources_hold_it(
    model: nn.Module,
    profile: cfg.Profile,
    stage: int,
    *,
    init_from: str | os.PathLike | None = None,
    seed: int | None = None,
) -> nn.Module:
    """The trained model with its frozen weights exactly as their sources hold them, for export: `model`
    itself, or when training narrowed them to bf16 the stage rebuilt from its sources with the trained
    tensors (projector, LoRA) copied in."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if all(p.dtype == frozen_dtype() for p in frozen):
        return model
    fresh, _ = stage_model(profile, stage, init_from=init_from, seed=seed, narrow=False)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if p.requires_grad:
                p.copy_(trained.pop(name))
    if trained:
        raise KeyError(f"rebuilding for export: trained tensors {sorted(trained)[:3]} have no place")
    return fresh
