"""The t4 model at full size on this CPU: one stage-1 and one stage-2 training step at the t4 recipe, measured
beside `llava_nb.memory.memory_plan`. A benchmark, not a CI test (about 10 GB of RAM and minutes per step on
2 cores); tests/test_t4_full_size.py runs the same code on a tiny configuration.

    python benchmarks/t4_full_size.py              # full size; writes docs/t4-full-size-<date>.{json,txt}
    python benchmarks/t4_full_size.py --tiny       # 2 layers, width 64: seconds, writes nothing

What it builds: `surgery.t4_config()` (TinyLlama-1.1B-Chat: 22 layers x 2048, 32 heads / 4 KV heads; CLIP
ViT-B/32: 12 layers x 768) with random weights in the published dtypes (the language model and its head in
bfloat16 as TinyLlama's model.safetensors holds them, the vision tower in float32 as openai's file holds it),
the vocabulary grown by the two tokens the processor adds (`<image>`, `<pad>`) and padded to a multiple of 64
as `processing.resize_embeddings` does, then placed as training places it (`stages`): stage 1 the projector
alone, stage 2 LoRA on every linear layer of the language model with gradient checkpointing, frozen weights
and autocast as the project runs on this device. Attention is sdpa, as the t4 recipe runs on a T4 ('auto'
picks eager on a CPU because it is faster on the offline profile's ~150-token samples; at 1024 tokens eager
would keep every layer's attention probabilities). One micro-batch of 2 samples at max_length (1024 tokens,
49 of them image tokens), a multi-turn conversation whose replies are supervised, through the project's own
loss (`trainer.LlavaTrainer.compute_loss`: fast_loss, and in stage 1 the shared system prompt) and the
optimizer Trainer makes (AdamW).

What it measures per stage, on a first step: parameter counts; bytes of parameters, gradients and AdamW state
(summing tensor nbytes); tensors autograd saves for backward (`saved_tensors_hooks`, storages counted once,
weights excluded); FLOPs (`FlopCounterMode`, CPU flash attention added). A second step, without counters, is
the step time. Then the T4 times those FLOPs imply at a stated throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from llava_nb import config as cfg
from llava_nb import device, memory, stages, surgery, trainer
from llava_nb.data import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]

GIB = memory.GIB
ADDED_TOKENS = 2  # `<image>`, `<pad>` (processing.py): TinyLlama's tokenizer has neither (its pad is `</s>`)
SYSTEM_TOKENS = 38  # BOS, the system prompt and "USER:" as TinyLlama's tokenizer splits them (about)

# The T4 (NVIDIA's datasheet): 65 TFLOPS fp16 with tensor cores (fp16 products, fp32 sums), 8.1 TFLOPS
# fp32, 320 GB/s, 70 W. Under a sustained load its 70 W cap lowers the clock: cuBLAS's fp16 4096^3
# product, repeated, runs at about 24 TFLOPS (NVIDIA developer forum, "About GPU peak performance", 2023:
# "~24T ... due to power capping"), 37 % of the peak: the ceiling for a whole training step. A step is not
# one large product: RMSNorm in fp32, rotary, SiLU, casts, the fp32 log-softmax and AdamW are bound by the
# 320 GB/s, and LoRA's rank-16 products are too thin for the tensor cores, so the estimate's middle is two
# thirds of that ceiling, and its low half of it.
ACHIEVED_TFLOPS = {"ceiling": 24.0, "middle": 16.0, "low": 12.0}


# ---------------------------------------------------------------------------------------- the model


def t4_sized_config(*, tiny: bool = False, layers: int | None = None) -> LlavaConfig:
    """`surgery.t4_config()`: the t4 architecture, in the dtype surgery builds it in; `tiny`: 2 layers of
    width 64 in both towers; `layers`: that many language-model layers (per-layer costs at full width)."""
    text = {k: v for k, v in cfg.T4_TEXT_CONFIG.items() if k != "model_type"}
    vision = dict(cfg.T4_VISION_CONFIG)
    if tiny:
        text.update(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=1,
            vocab_size=320,
        )
        vision.update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
    if layers:
        text["num_hidden_layers"] = layers
    return surgery.llava_config(CLIPVisionConfig(**vision), LlamaConfig(**text), cfg.PROFILES["t4"].model)


def build_model(config: LlavaConfig, *, seed: int = 0) -> LlavaForConditionalGeneration:
    """Random weights in the published dtypes, built as surgery.assemble builds the model (in the dtype
    `surgery.llava_config` names), the processor's tokens added, backbones frozen (as surgery.build)."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # TinyLlama's model.safetensors holds bf16 values, its head too: copied in as such
        for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]:
            p.copy_(p.to(torch.bfloat16))
    vocab = config.text_config.vocab_size
    model.resize_token_embeddings(vocab + ADDED_TOKENS, pad_to_multiple_of=64, mean_resizing=False)
    model.config.image_token_id, model.config.pad_token_id = vocab, vocab + 1  # as processing names them
    model.config.text_config.pad_token_id = vocab + 1
    surgery.freeze_backbones(model)
    model.set_attn_implementation("sdpa")
    return model


def place(model: nn.Module, t: cfg.TrainConfig) -> str:
    """Place for training as stages.stage_model does; returns the key of memory.PRECISIONS that says how."""
    surgery.base_model(model).config.text_config.use_cache = False
    stages.place_for_training(model, narrow=stages.narrows_frozen_weights(t))
    if torch.cuda.is_available():
        return "t4"
    return "cpu_bf16" if stages.narrows_frozen_weights(t) else "cpu_fp32"


def enable_checkpointing(model: nn.Module) -> None:
    """What Trainer does for `gradient_checkpointing=True` (5.24 renamed it; 5.15 knows the old name)."""
    kwargs = {"use_reentrant": False}  # trainer.training_arguments
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def make_batch(
    config: LlavaConfig,
    *,
    batch: int = 2,
    seq_len: int = 1024,
    question: int = 24,
    reply: int = 200,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A micro-batch as the collator makes it at max_length: per row BOS, the system prompt and "USER:" (the
    same in every row), the image's tokens, then turns of a question and a supervised reply ending in the
    end-of-turn token, the last reply running to `seq_len` (cut there, as the collator cuts). Random token
    ids; no padding, and no unsupervised tail for the loss to trim."""
    g = torch.Generator().manual_seed(seed)
    image = config.image_token_id

    def words(n: int) -> torch.Tensor:  # the tokenizer's own ids
        return torch.randint(3, image, (n,), generator=g)

    system = torch.cat([torch.tensor([config.text_config.bos_token_id]), words(SYSTEM_TOKENS - 1)])
    rows, labels = [], []
    for _ in range(batch):
        ids = [system, torch.full((config.image_seq_length,), image)]
        sup = [torch.zeros(len(system) + config.image_seq_length, dtype=torch.bool)]
        room = seq_len - len(system) - config.image_seq_length
        while room > 0:
            prompt = words(min(question + 4, room))  # "\nQ ASSISTANT:", then "USER: Q ASSISTANT:"
            room -= len(prompt)
            n = room if room < 2 * reply + question + 4 else reply  # the last reply fills the row
            answer = words(n)
            if n == reply:
                answer[-1] = config.text_config.eos_token_id
            room -= n
            ids += [prompt, answer]
            sup += [torch.zeros(len(prompt), dtype=torch.bool), torch.ones(n, dtype=torch.bool)]
        row, mask = torch.cat(ids), torch.cat(sup)
        rows.append(row)
        labels.append(torch.where(mask, row, torch.full_like(row, IGNORE_INDEX)))
    size = config.vision_config.image_size
    return {
        "input_ids": torch.stack(rows),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
        "labels": torch.stack(labels),
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
    }


# ------------------------------------------------------------------------------------- what torch counts


class SavedTensors:
    """Bytes autograd saves for backward while active, each storage once, the model's weights excluded: the
    LM head and the loss after it ('logits and loss'), each decoder layer ('layer i'), autocast's
    low-precision copies of trainable weights ('weight copies') and the rest ('other': embeddings,
    projector, final norm, checkpointed layer inputs where transformers saves them outside the layer)."""

    def __init__(self, model: nn.Module):
        llava = surgery.base_model(model)
        self.exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.trainable = {tuple(p.shape) for p in model.parameters() if p.requires_grad}
        self.bytes: dict[str, int] = defaultdict(int)
        self.seen: set[int] = set()
        self.region = "other"
        self.modules = [(f"layer {i}", m) for i, m in enumerate(llava.model.language_model.layers)]
        self.head = llava.lm_head
        self._handles: list[Any] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _set(self, region: str):
        def hook(*_):
            self.region = region

        return hook

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            copy = tuple(t.shape) in self.trainable and t.dtype != torch.float32
            self.bytes["weight copies" if copy else self.region] += storage.nbytes()
        return t

    def __enter__(self) -> Self:
        for name, m in self.modules:
            self._handles += [
                m.register_forward_pre_hook(self._set(name)),
                m.register_forward_hook(self._set("other")),
            ]
        self._handles.append(self.head.register_forward_pre_hook(self._set("logits and loss")))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def layers(self) -> list[int]:
        return [self.bytes.get(name, 0) for name, _ in self.modules]


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode, with torch's CPU flash attention (which it does not know) counted as sdpa."""
    aten = torch.ops.aten
    custom = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = lambda q, k, v, *_, out_shape=None, **__: (
            sdpa_flop_count(q, k, v)
        )
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda g, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(g, q, k, v)
        )
    return FlopCounterMode(display=False, custom_mapping=custom)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        tensor_bytes(v for v in state.values() if torch.is_tensor(v)) for state in optimizer.state.values()
    )


def capture_first_call(module: nn.Module) -> tuple[dict[str, Any], Any]:
    """A pre-hook that keeps the first (args, kwargs) the module is called with."""
    seen: dict[str, Any] = {}

    def hook(_m, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def one_layer_saved_bytes(layer: nn.Module, call: tuple[tuple, dict], model: nn.Module, autocast) -> int:
    """Bytes one decoder layer saves for backward on the inputs it had in the step, run without checkpointing:
    what recomputing it holds during the backward of a checkpointed step."""
    args, kwargs = call
    hidden = args[0].detach().requires_grad_(True)
    was = getattr(layer, "gradient_checkpointing", False)
    layer.gradient_checkpointing = False
    try:
        with autocast(), SavedTensors(model) as saved:
            out = layer(hidden, *args[1:], **kwargs)
        del out
    finally:
        layer.gradient_checkpointing = was
    return sum(saved.bytes.values())


# --------------------------------------------------------------------------------------------- a step


def make_trainer(model: nn.Module, t: cfg.TrainConfig, folder: str) -> trainer.LlavaTrainer:
    args = trainer.training_arguments(t, folder, seed=0, evaluate=False)
    return trainer.LlavaTrainer(model=model, args=args, fast_loss=t.fast_loss, shared_prefix=t.shared_prefix)


def run_stage(
    model: nn.Module, t: cfg.TrainConfig, batch: dict[str, torch.Tensor], *, folder: str, timed_steps: int = 1
) -> dict[str, Any]:
    """One measured step (memory, FLOPs) and `timed_steps` plain ones, as Trainer would run them."""
    precision = place(model, t)
    dtypes = sorted(
        {
            f"{n.split('.')[1] if n.startswith('model.') else n.split('.')[0]} {str(p.dtype)[6:]}"
            for n, p in surgery.base_model(model).named_parameters()
            if not p.requires_grad
        }
    )
    if t.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    tr = make_trainer(model, t, folder)
    optimizer = tr.create_optimizer()
    bf16 = device.cpu_bf16_autocast(t)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    llava = surgery.base_model(model)
    seen, handle = capture_first_call(llava.model.language_model.layers[0])

    def step(measure: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        device.reset_peak_rss()
        began, cpu = time.perf_counter(), time.process_time()
        with flop_counter() if measure else contextlib.nullcontext() as flops:
            with SavedTensors(model) if measure else contextlib.nullcontext() as saved, autocast():
                loss = tr.compute_loss(model, dict(batch))
            forward = time.perf_counter() - began
            loss.backward()
            if measure:
                out["gradients"] = tensor_bytes(p.grad for p in trainable if p.grad is not None)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.update(
            seconds=time.perf_counter() - began,
            cpu_seconds=time.process_time() - cpu,
            forward_seconds=forward,
            loss=loss.item(),
            peak_rss_gib=(device.status_mb("VmHWM") or 0) / 1024,
        )
        if measure:
            out.update(
                flops=flops.get_total_flops(),
                saved=dict(saved.bytes),
                layers=saved.layers(),
                adamw=optimizer_state_bytes(optimizer),
            )
            out["flops_by_op"] = {
                str(op).split(".", 1)[-1]: n for op, n in flops.get_flop_counts().get("Global", {}).items()
            }
        return out

    measured = step(measure=True)
    handle.remove()
    one_layer = (
        one_layer_saved_bytes(llava.model.language_model.layers[0], seen["call"], model, autocast)
        if t.gradient_checkpointing
        else None
    )  # without checkpointing the step measured every layer
    timed = [step(measure=False) for _ in range(timed_steps)]
    frozen = [p for p in params if not p.requires_grad]
    return {
        "precision_key": precision,
        "precision": memory.PRECISIONS[precision].name,
        "frozen dtypes": dtypes,
        "attention": llava.config.text_config._attn_implementation,
        "gradient_checkpointing": t.gradient_checkpointing,
        "lora_r": t.lora_r,
        "parameters": {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in trainable),
        },
        "bytes": {
            "frozen weights": tensor_bytes(frozen),
            "trainable weights": tensor_bytes(trainable),
            "gradients": measured["gradients"],
            "AdamW state": measured["adamw"],
            "saved": measured["saved"],
            "saved per layer": measured["layers"],
            "one layer without checkpointing": one_layer,
        },
        "flops": measured["flops"],
        "flops_by_op": measured["flops_by_op"],
        "measured_step_seconds": round(measured["seconds"], 2),
        "step_seconds": round(min(s["seconds"] for s in timed), 2),
        "step_cpu_seconds": round(min(s["cpu_seconds"] for s in timed), 2),  # of this process, all threads
        "forward_seconds": round(min(s["forward_seconds"] for s in timed), 2),
        "loss": [round(measured["loss"], 4), *(round(s["loss"], 4) for s in timed)],
        "peak_rss_gib": round(max(s["peak_rss_gib"] for s in [measured, *timed]), 2),
    }


# ------------------------------------------------------------------------------------ plan vs measured


def measured_items(stage: dict[str, Any]) -> dict[str, float]:
    """The measured bytes under memory_plan's item names, in GiB."""
    b, saved = stage["bytes"], stage["bytes"]["saved"]
    outside = sum(v for k, v in saved.items() if k not in ("logits and loss", "weight copies"))
    if stage["gradient_checkpointing"]:  # the checkpointed inputs, and one layer recomputed in backward
        activations = outside + b["one layer without checkpointing"]
    else:
        activations = outside
    items = {
        "frozen weights (fp16)": b["frozen weights"],
        "trainable weights (fp32)": b["trainable weights"],
        "gradients (fp32)": b["gradients"],
        "AdamW moments (fp32)": b["AdamW state"],
        "activations": activations,
        "logits and loss": saved.get("logits and loss", 0),
    }
    return {k: round(v / GIB, 3) for k, v in items.items()}


def t4_estimate(flops: float) -> dict[str, float]:
    """Seconds one micro-batch's FLOPs take on a T4 at each of ACHIEVED_TFLOPS."""
    return {k: round(flops / (v * 1e12), 2) for k, v in ACHIEVED_TFLOPS.items()}


def machine() -> dict[str, Any]:
    import transformers

    cpu = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key in ("Model name", "CPU family", "Model") and key not in cpu:
                cpu[key] = value.strip()
    model_name = (
        f"{cpu.get('Model name', platform.processor())} (family {cpu.get('CPU family', '?')}, "
        f"model {cpu.get('Model', '?')})"
    )
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "bf16_instructions": device.cpu_has_bf16(),
        "ram_gib": round(ram, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": os.getloadavg(),
    }


def run(
    *,
    tiny: bool = False,
    layers: int | None = None,
    seq_len: int | None = None,
    batch: int | None = None,
    timed_steps: int = 1,
) -> dict[str, Any]:
    """Both stages on one model (stage 2 adds LoRA to it, as stage 2 adds it to the stage-1 export)."""
    profile = cfg.PROFILES["t4"]
    t1, t2 = profile.stage1, profile.stage2
    seq_len = seq_len or profile.data.max_length
    batch = batch or t1.per_device_train_batch_size
    config = t4_sized_config(tiny=tiny, layers=layers)
    began = time.perf_counter()
    model = build_model(config)
    built = time.perf_counter() - began
    data = make_batch(model.config, batch=batch, seq_len=seq_len)
    supervised = int((data["labels"][:, 1:] != IGNORE_INDEX).sum())
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "tiny": tiny,
        "layers": layers,
        "micro_batch": batch,
        "seq_len": seq_len,
        "image_tokens": model.config.image_seq_length,
        "vocab": model.get_input_embeddings().num_embeddings,
        "supervised_positions": supervised,
        "build_seconds": round(built, 1),
    }
    with tempfile.TemporaryDirectory() as folder:
        result["stage1"] = run_stage(model, t1, data, folder=folder, timed_steps=timed_steps)
        model = stages.add_lora(model, t2)
        result["stage2"] = run_stage(model, t2, data, folder=folder, timed_steps=timed_steps)
    result["machine"] = {**machine(), "load_average_before": load_before}
    for n, t in ((1, t1), (2, t2)):
        stage = result[f"stage{n}"]
        stage["plan"] = memory.memory_plan(config, t, seq_len=seq_len)
        stage["plan_as_measured"] = memory.memory_plan(
            config,
            t,
            seq_len=seq_len,
            precision=stage["precision_key"],
            supervised=supervised / (batch * seq_len),
        )
        stage["measured"] = measured_items(stage)
        stage["t4_seconds_per_micro_batch"] = t4_estimate(stage["flops"])
        stage["steps"], stage["accumulation"] = t.max_steps, t.gradient_accumulation_steps
    return result


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        (
            f"The t4 model at full size, one training step per stage: micro-batch "
            f"{result['micro_batch']} x {result['seq_len']} tokens ({result['image_tokens']} image tokens, "
            f"{result['supervised_positions']} supervised positions), vocabulary {result['vocab']}; "
            f"{result['date']}"
        ),
        (
            f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, {m['ram_gib']} GiB RAM, "
            f"bf16 instructions {m['bf16_instructions']}, Python {m['python']}, torch {m['torch']}, "
            f"transformers {m['transformers']}; load average (1, 5, 15 min) before "
            f"{', '.join(f'{x:.1f}' for x in m['load_average_before'])}, after "
            f"{', '.join(f'{x:.1f}' for x in m['load_average'])} (2 shared cores)"
        ),
    ]
    for n in (1, 2):
        s = result[f"stage{n}"]
        plan, here = s["plan"], s["plan_as_measured"]
        lines += [
            "",
            (
                f"stage {n}: {s['precision']}; attention {s['attention']}; checkpointing "
                f"{'on' if s['gradient_checkpointing'] else 'off'}; LoRA r={s['lora_r']}; frozen "
                f"weights: {', '.join(s['frozen dtypes'])}"
            ),
            "| item | plan on a T4 | plan in this precision | measured here | measured / plan |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        p = s["parameters"]
        rows = [
            ("parameters (M)", p["total"] / 1e6),
            ("trainable parameters (M)", p["trainable"] / 1e6),
            *((f"{k} GiB", v) for k, v in s["measured"].items()),
        ]
        for item, measured in rows:
            key = item.removesuffix(" GiB")
            lines.append(
                f"| {item} | {plan[key]:.3f} | {here[key]:.3f} | {measured:.3f} | "
                + (f"{measured / here[key]:.2f} |" if here[key] else "- |")
            )
        lines.append(
            f"| loss transients GiB (not saved; not measured) | {plan['loss transients']:.3f} | "
            f"{here['loss transients']:.3f} | | |"
        )
        lines.append(f"| total GiB | {plan['total']:.2f} | {here['total']:.2f} | | |")
        saved = s["bytes"]["saved"]
        detail = ", ".join(
            f"{k} {v / GIB:.3f}" for k, v in sorted(saved.items()) if not k.startswith("layer ")
        )
        per_layer = s["bytes"]["saved per layer"]
        lines.append(
            f"saved for backward, GiB: {detail}; decoder layers {sum(per_layer) / GIB:.3f} "
            f"({min(per_layer) / GIB:.4f}-{max(per_layer) / GIB:.4f} each)"
            + (
                f"; one layer recomputed in backward "
                f"{s['bytes']['one layer without checkpointing'] / GIB:.3f}"
                if s["gradient_checkpointing"]
                else ""
            )
        )
        est = s["t4_seconds_per_micro_batch"]
        lines += [
            f"FLOPs per micro-batch {s['flops'] / 1e12:.2f} T ("
            + ", ".join(
                f"{k} {v / 1e12:.2f} T" for k, v in sorted(s["flops_by_op"].items(), key=lambda kv: -kv[1])
            )
            + ")",
            (
                f"CPU: step {s['step_seconds']} s (forward and loss {s['forward_seconds']} s"
                + (f"; {s['step_cpu_seconds']} s of CPU time" if "step_cpu_seconds" in s else "")
                + "); the first "
                f"step, with the counters, {s['measured_step_seconds']} s; peak RSS "
                f"{s['peak_rss_gib']} GiB; loss {s['loss']}"
            ),
            "T4 estimate, seconds per micro-batch of 2: "
            + ", ".join(f"{v} at {ACHIEVED_TFLOPS[k]:g} TFLOPS ({k})" for k, v in est.items())
            + f"; the stage ({s['steps']} steps x {s['accumulation']} micro-batches): "
            + ", ".join(f"{v * s['steps'] * s['accumulation'] / 60:.0f}" for v in est.values())
            + " min",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="2 layers of width 64 (a dry run; writes nothing)")
    p.add_argument(
        "--layers", type=int, default=None, help="language-model layers (default: 22; writes nothing)"
    )
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the t4 max_length)")
    p.add_argument("--timed-steps", type=int, default=1, help="plain steps timed after the measured one")
    p.add_argument("--table-from", default=None, help="print the table of a JSON this script wrote, and stop")
    p.add_argument(
        "--out-dir",
        default=None,
        help="write t4-full-size-<date>.json and .txt there "
        "(default: docs/ at full size, nowhere with --tiny)",
    )
    args = p.parse_args(argv)
    if args.table_from:
        text = table(json.loads(Path(args.table_from).read_text()))
        print(text)
        return {"table": text}
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    result = run(tiny=args.tiny, layers=args.layers, seq_len=args.seq_len, timed_steps=args.timed_steps)
    text = table(result)
    print(text)
    out_dir = args.out_dir or (None if args.tiny or args.layers else ROOT / "docs")
    if out_dir:
        stem = Path(out_dir) / f"t4-full-size-{result['date']}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        stem.with_suffix(".txt").write_text(text + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
