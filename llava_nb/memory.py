"""The GPU memory plan of a training stage, computed from the architecture (no download, no GPU).

Parameter counts come from a model built on the meta device; activations from a per-layer count of
the tensors autograd keeps for backward (`saved_bytes_per_token_layer`), which tests/test_train.py
checks against what torch actually saves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from . import config as cfg
from . import surgery

GIB = 2**30


def meta_model(config: LlavaConfig) -> LlavaForConditionalGeneration:
    """The model's structure without its weights: shapes only, no memory, instant."""
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def lora_shape(model: LlavaForConditionalGeneration) -> tuple[int, int, int]:
    """(linears per decoder layer, sum of their input widths, sum of their in + out widths): what a
    LoRA on every linear layer of the language model (stages.lora_target_regex) adapts in one layer."""
    layer = model.model.language_model.layers[0]
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    inputs = sum(m.in_features for m in linears)
    return len(linears), inputs, inputs + sum(m.out_features for m in linears)


def saved_bytes_per_token_layer(text_config: Any, *, lora: tuple[int, int] = (0, 0), lora_r: int = 0,
                                act_bytes: int = 2, norm_bytes: int = 4, mask_bytes: int = 1) -> int:
    """Bytes one frozen Llama decoder layer keeps for backward, per token (h hidden, i MLP width,
    h_kv = h x kv_heads / heads):

        2h x norm_bytes                   the inputs of both RMSNorms (they compute in fp32)
        (2h + 2h_kv + 3i) x act_bytes     q, k, v and the output for SDPA's backward; gate, up, silu(gate)

    A frozen linear keeps nothing: with no weight gradient to compute it needs no input. That is why
    stage 1, whose gradient only passes through the language model, costs this little. A LoRA of rank
    r adds, for `lora = (n_linears, sum of their input widths)` (6h + i for Llama's 7 linears):

        inputs x (act_bytes + mask_bytes) + n_linears x r x act_bytes
                                          each adapter's dropped-out input and dropout mask; A's output

    Defaults are a GPU under fp16 autocast (bool dropout masks); on CPU in fp32 use act_bytes=4,
    mask_bytes=4 (CPU dropout keeps a float mask).
    """
    h, i = text_config.hidden_size, text_config.intermediate_size
    h_kv = h * text_config.num_key_value_heads // text_config.num_attention_heads
    n = 2 * h * norm_bytes + (2 * h + 2 * h_kv + 3 * i) * act_bytes
    if lora_r:
        n_linears, inputs = lora
        n += inputs * (act_bytes + mask_bytes) + n_linears * lora_r * act_bytes
    return n


def memory_plan(config: LlavaConfig | None = None, t: cfg.TrainConfig | None = None, *, seq_len: int = 1024,
                checkpointing: bool | None = None) -> dict[str, float]:
    """GPU memory of one training stage in GiB, by item, for the T4 recipe's precision.

    Defaults: the t4 architecture (`surgery.t4_config()`), stage 1 at the tutorial's micro-batch of 2,
    sequences of `seq_len` tokens (the t4 max_length). Frozen weights in fp16; trainable weights,
    their gradients and AdamW's two moments in fp32 (4 bytes each). Activations, for L layers, a
    micro-batch of b sequences of s tokens and hidden size h:

        without checkpointing   L x b x s x saved_bytes_per_token_layer
        with checkpointing      L x b x s x h x 2  (each layer's input)  +  one layer's saved tensors,
                                recomputed during backward
        loss                    b x s x V x 10  (fp16 logits, their fp32 copy and log-softmax, its gradient);
                                an upper bound: with TrainConfig.fast_loss only supervised rows get logits

    The frozen vision tower keeps nothing for backward. Not included: the CUDA context (~0.3-0.5 GiB),
    allocator slack and temporaries. The tokenizer's two added tokens (vocabulary padded to a multiple
    of 64) add 64 rows, under 0.001 GiB.
    """
    config = config or surgery.t4_config()
    t = t or cfg.PROFILES["t4"].stage1
    checkpointing = t.gradient_checkpointing if checkpointing is None else checkpointing
    model = meta_model(config)
    parts = surgery.parameters_by_part(model)
    total = sum(p["total"] for p in parts.values())
    projector = parts["projector"]["total"]
    n_linears, inputs, in_out = lora_shape(model)
    text = config.text_config
    L, h = text.num_hidden_layers, text.hidden_size
    lora = L * t.lora_r * in_out if t.lora_r else 0
    b, s = t.per_device_train_batch_size, seq_len
    layer = b * s * saved_bytes_per_token_layer(text, lora=(n_linears, inputs), lora_r=t.lora_r)
    activations = L * b * s * h * 2 + layer if checkpointing else L * layer
    trainable = projector + lora
    plan = {
        "frozen weights (fp16)": (total - projector) * 2,
        "trainable weights (fp32)": trainable * 4,
        "gradients (fp32)": trainable * 4,
        "AdamW moments (fp32)": trainable * 8,
        "activations": activations,
        "logits and loss": b * s * text.vocab_size * 10,
    }
    plan = {k: round(v / GIB, 3) for k, v in plan.items()}
    plan["total"] = round(sum(plan.values()), 2)
    return {"trainable parameters (M)": round(trainable / 1e6, 2), "micro-batch x tokens": f"{b} x {s}",
            "checkpointing": checkpointing, **plan}
