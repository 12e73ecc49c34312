"""The GPU memory plan of a training stage, computed from the architecture (no download, no GPU).

Parameter counts come from a model built on the meta device; activations from a per-layer count of
the tensors autograd keeps for backward (`saved_bytes_per_token_layer`), which tests/test_train.py
checks against what torch actually saves. The same plan in a CPU's precision is what
`benchmarks/t4_full_size.py` measures the full-size model against (`measured_beside_plan`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor a training step holds, on one kind of device."""

    name: str
    frozen_linear: int = 2  # frozen nn.Linear weights (language model, vision tower, an untied head)
    frozen_other: int = 2  # the other frozen weights: embeddings, norms, the patch convolution
    residual: int = 2  # the residual stream between decoder layers: what checkpointing keeps of each layer
    act: int = 2  # activations under autocast
    norm: int = 4  # RMSNorm's inputs (it computes in fp32)
    dropout_mask: int = 1  # LoRA dropout's mask


PRECISIONS = {
    # stages.place_for_training and trainer.training_arguments on a GPU: frozen weights fp16, fp16 autocast
    "t4": Precision("T4: frozen weights fp16, trainable fp32, fp16 autocast"),
    # ... on a CPU with bf16 instructions: frozen linear weights bf16, the embeddings (so the residual stream)
    # and norms fp32, bf16 autocast; CPU dropout keeps a float mask of its fp32 input (peft casts to fp32)
    "cpu_bf16": Precision(
        "CPU: bf16 autocast, frozen linear weights bf16, embeddings and norms fp32, trainable fp32",
        frozen_other=4,
        residual=4,
        dropout_mask=4,
    ),
    "cpu_fp32": Precision("CPU: fp32 throughout", 4, 4, 4, 4, 4, 4),
}


def saved_bytes_per_token_layer(
    text_config: Any,
    *,
    lora: tuple[int, int] = (0, 0),
    lora_r: int = 0,
    act_bytes: int = 2,
    norm_bytes: int = 4,
    mask_bytes: int = 1,
    kv_len: int = 0,
) -> int:
    """Bytes one frozen Llama decoder layer keeps for backward, per token (h hidden, i MLP width, n heads,
    h_kv = h x kv_heads / heads):

        2h x norm_bytes + 2 x 4           the inputs of both RMSNorms (they compute in fp32), their 1/rms
        (2h + 2h_kv + 3i) x act_bytes     q, k, v and the output for SDPA's backward; gate, up, silu(gate)
        n x 4                             SDPA's log-sum-exp (fp32)

    A frozen linear keeps nothing: with no weight gradient to compute it needs no input. That is why
    stage 1, whose gradient only passes through the language model, costs this little. With an attention
    mask (`kv_len` > 0: keys per query, e.g. after stage 1's shared prefix, or padding) transformers cannot
    use SDPA's grouped-query path: it repeats k and v to every head, (2h - 2h_kv) x act_bytes more, and the
    kernel keeps the mask in the activations' dtype, kv_len x act_bytes. A LoRA of rank r adds, for
    `lora = (n_linears, sum of their input widths)` (6h + i for Llama's 7 linears):

        inputs x (act_bytes + mask_bytes) + n_linears x r x act_bytes
                                          each adapter's dropped-out input and dropout mask; A's output

    Defaults are a GPU under fp16 autocast (bool dropout masks); on CPU in fp32 use act_bytes=4,
    mask_bytes=4 (CPU dropout keeps a float mask).
    """
    h, i = text_config.hidden_size, text_config.intermediate_size
    heads = text_config.num_attention_heads
    h_kv = h * text_config.num_key_value_heads // heads
    n = 2 * h * norm_bytes + 2 * 4 + (2 * h + 2 * h_kv + 3 * i) * act_bytes + heads * 4
    if kv_len:
        n += (2 * h - 2 * h_kv) * act_bytes + kv_len * act_bytes
    if lora_r:
        n_linears, inputs = lora
        n += inputs * (act_bytes + mask_bytes) + n_linears * lora_r * act_bytes
    return n


def frozen_weight_bytes(model: nn.Module, trainable: set[str], precision: Precision) -> int:
    """Bytes of the frozen weights as training places them (stages.place_for_training): nn.Linear weights
    at `frozen_linear`, the rest (embeddings, a head tied to them, norms, convolutions) at `frozen_other`."""
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    linear = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    return sum(
        p.numel()
        * (precision.frozen_linear if id(p) in linear and id(p) not in embedding else precision.frozen_other)
        for name, p in model.named_parameters()
        if name not in trainable
    )


def masked_attention(t: cfg.TrainConfig, batch: int, checkpointing: bool) -> bool:
    """True when training passes an attention mask to full-length rows: stage 1's shared prefix (its cached
    keys make the rows' keys longer than their queries; trainer.shared_prefix_cache), which runs with
    fast_loss and shared_prefix, a frozen language model, no checkpointing and two rows or more."""
    return t.fast_loss and t.shared_prefix and not t.lora_r and not checkpointing and batch >= 2


def memory_plan(
    config: LlavaConfig | None = None,
    t: cfg.TrainConfig | None = None,
    *,
    seq_len: int = 1024,
    checkpointing: bool | None = None,
    precision: str = "t4",
    supervised: float = 1.0,
) -> dict[str, float]:
    """Memory of one training stage in GiB, by item, on a T4 (`precision` 't4') or as this project trains on
    a CPU ('cpu_bf16', 'cpu_fp32': the precisions `benchmarks/t4_full_size.py` measures in).

    Defaults: the t4 architecture (`surgery.t4_config()`), stage 1 at the tutorial's micro-batch of 2,
    sequences of `seq_len` tokens (the t4 max_length), every position supervised (`supervised`: the share
    of positions with a label; with TrainConfig.fast_loss only those get logits). On a T4 frozen weights
    in fp16; trainable weights, their gradients and AdamW's two moments in fp32 (4 bytes each).
    Activations, for L layers, a micro-batch of b sequences of s tokens and hidden size h:

        without checkpointing   L x b x s x saved_bytes_per_token_layer (masked in stage 1: masked_attention)
        with checkpointing      L x b x s x h x residual bytes (each layer's input)  +  one layer's saved
                                tensors, recomputed during backward
        logits and loss         b x s x supervised x V x 4: the fp32 log-softmax cross-entropy saves
        loss transients         b x s x supervised x V x 8: in backward the log-softmax's fp32 gradient in and
                                out beside its saved output (in forward: the head's fp16 logits and their
                                fp32 copy, 6)

    The frozen vision tower keeps nothing for backward. Not included: the CUDA context (~0.3-0.5 GiB),
    allocator slack and temporaries. The tokenizer's two added tokens (vocabulary padded to a multiple
    of 64) add 64 rows, under 0.001 GiB. Measured beside it: `measured_beside_plan`.
    """
    config = config or surgery.t4_config()
    t = t or cfg.PROFILES["t4"].stage1
    p = PRECISIONS[precision]
    checkpointing = t.gradient_checkpointing if checkpointing is None else checkpointing
    model = meta_model(config)
    parts = surgery.parameters_by_part(model)
    projector = parts["projector"]["total"]
    n_linears, inputs, in_out = lora_shape(model)
    text = config.text_config
    L, h = text.num_hidden_layers, text.hidden_size
    lora = L * t.lora_r * in_out if t.lora_r else 0
    b, s = t.per_device_train_batch_size, seq_len
    masked = masked_attention(t, b, checkpointing)
    layer = (
        b
        * s
        * saved_bytes_per_token_layer(
            text,
            lora=(n_linears, inputs),
            lora_r=t.lora_r,
            act_bytes=p.act,
            norm_bytes=p.norm,
            mask_bytes=p.dropout_mask,
            kv_len=s if masked else 0,
        )
    )
    activations = L * b * s * h * p.residual + layer if checkpointing else L * layer
    trainable = projector + lora
    logits = b * s * (supervised if t.fast_loss else 1.0) * text.vocab_size
    frozen = frozen_weight_bytes(
        model, {n for n, _ in model.named_parameters() if n.startswith(surgery.PARTS["projector"])}, p
    )
    plan = {
        "frozen weights (fp16)": frozen,
        "trainable weights (fp32)": trainable * 4,
        "gradients (fp32)": trainable * 4,
        "AdamW moments (fp32)": trainable * 8,
        "activations": activations,
        "logits and loss": logits * 4,
        "loss transients": logits * 8,
    }
    plan = {k: round(v / GIB, 3) for k, v in plan.items()}
    plan["total"] = round(sum(plan.values()), 2)
    total = sum(part["total"] for part in parts.values()) + lora
    return {
        "parameters (M)": round(total / 1e6, 2),
        "trainable parameters (M)": round(trainable / 1e6, 2),
        "micro-batch x tokens": f"{b} x {s}",
        "checkpointing": checkpointing,
        **plan,
    }


MEASURED_ITEMS = (
    "frozen weights (fp16)",
    "trainable weights (fp32)",
    "gradients (fp32)",
    "AdamW moments (fp32)",
    "activations",
    "logits and loss",
)


MEASUREMENTS = Path(__file__).resolve().parent.parent / "docs"  # in a checkout: the committed measurements


def measured_beside_plan(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The full-size measurement `benchmarks/t4_full_size.py` wrote (`path`; default the newest
    docs/t4-full-size-<date>.json of this checkout) beside `memory_plan`: one row per stage and item (GiB,
    or millions of parameters), with the plan on a T4, the plan in the precision the measurement ran in (a
    CPU's), what was measured and its ratio to the latter. Loss transients and the total are not measured:
    torch counts what it saves for backward, not what lives a moment."""
    if path is None:
        found = sorted(MEASUREMENTS.glob("t4-full-size-*.json"))
        if not found:
            raise FileNotFoundError(
                f"no t4-full-size-<date>.json in {MEASUREMENTS}: run python benchmarks/t4_full_size.py"
            )
        path = found[-1]
    result = json.loads(Path(path).read_text())
    config = surgery.t4_config()
    config.text_config.vocab_size = result["vocab"]  # the tokenizer's added tokens, padded to 64
    rows = []
    for n in (1, 2):
        stage = result[f"stage{n}"]
        t = cfg.PROFILES["t4"].stage(n)
        t4 = memory_plan(config, t, seq_len=result["seq_len"])
        positions = result["micro_batch"] * result["seq_len"]
        here = memory_plan(
            config,
            t,
            seq_len=result["seq_len"],
            precision=stage["precision_key"],
            supervised=result["supervised_positions"] / positions,
        )
        measured = {item: stage["measured"][item] for item in MEASURED_ITEMS}
        for item, key in (("parameters (M)", "total"), ("trainable parameters (M)", "trainable")):
            measured[item] = round(stage["parameters"][key] / 1e6, 2)
        for item, value in measured.items():
            ratio = round(value / here[item], 2) if here[item] else None
            rows.append(
                {
                    "stage": n,
                    "item": item,
                    "plan (T4)": t4[item],
                    "plan (as measured)": here[item],
                    "measured": value,
                    "measured / plan": ratio,
                }
            )
    return rows
