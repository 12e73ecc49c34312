"""Weight surgery: join a CLIP vision tower and a causal LM into a LlavaForConditionalGeneration.

transformers 5 layout: `model.model.vision_tower` (a CLIPVisionModel, keys without the `vision_model.`
prefix since 5.0), `model.model.multi_modal_projector`, `model.model.language_model` (the LM's base
model) and a top-level `model.lm_head`. `base_model` finds that model again inside any wrapper (DDP,
torch.compile, peft).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, CLIPConfig, LlavaConfig, LlavaForConditionalGeneration

from . import config as cfg
from .device import set_config_dtype
from .fsutil import load_state_dict

log = logging.getLogger(__name__)

VISION_PREFIX = "vision_model."  # openai's full CLIP file: vision_model.*, text_model.*, projections


@dataclass(frozen=True)
class Backbones:
    """Folders laid out like hub repos: a full CLIP checkpoint and a causal LM with its tokenizer."""

    vision_dir: Path  # config.json, pytorch_model.bin (text + vision keys), preprocessor_config.json
    lm_dir: Path  # config.json, model.safetensors, tokenizer files


def llava_config(
    vision_config, text_config, model_cfg: cfg.ModelConfig, dtype: torch.dtype = torch.float32
) -> LlavaConfig:
    """LlavaConfig for these backbones (the image token id is set later, by processing), every part in
    `dtype`: not in the dtype a backbone's own config names (TinyLlama's says bfloat16)."""
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        vision_feature_layer=model_cfg.vision_feature_layer,
        vision_feature_select_strategy=model_cfg.vision_feature_select_strategy,
        projector_hidden_act=model_cfg.projector_hidden_act,
        image_seq_length=num_image_tokens(vision_config, model_cfg.vision_feature_select_strategy),
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    return set_config_dtype(config, dtype)


def num_image_tokens(vision_config, strategy: str = "default") -> int:
    """Tokens one image becomes: one per patch, plus CLS unless the 'default' strategy drops it."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches if strategy == "default" else patches + 1


def config_from_backbones(backbones: Backbones, model_cfg: cfg.ModelConfig) -> LlavaConfig:
    vision = CLIPConfig.from_pretrained(backbones.vision_dir).vision_config
    text = AutoConfig.from_pretrained(backbones.lm_dir)
    return llava_config(vision, text, model_cfg)


def t4_config() -> LlavaConfig:
    """The t4 profile's LlavaConfig from the architecture constants (no download needed)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    text = {k: v for k, v in cfg.T4_TEXT_CONFIG.items() if k != "model_type"}
    return llava_config(
        CLIPVisionConfig(**cfg.T4_VISION_CONFIG), LlamaConfig(**text), cfg.PROFILES["t4"].model
    )


def describe_config(config: LlavaConfig) -> dict[str, object]:
    """The architecture of a LlavaConfig in a few readable lines."""
    v, t = config.vision_config, config.text_config
    grid = v.image_size // v.patch_size
    return {
        "vision tower": f"CLIP ViT, {v.num_hidden_layers} layers x {v.hidden_size}, "
        f"{v.patch_size}-px patches at {v.image_size} px ({grid} x {grid} grid)",
        "language model": f"{t.model_type}, {t.num_hidden_layers} layers x {t.hidden_size}, "
        f"vocabulary {t.vocab_size}",
        "projector": f"{v.hidden_size} -> {t.hidden_size} -> {t.hidden_size}, {config.projector_hidden_act}",
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "image tokens per image": config.image_seq_length,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


def load_vision_weights(model: LlavaForConditionalGeneration, path: str | Path) -> list[str]:
    """Copy `vision_model.*` from a full CLIP checkpoint into the vision tower; return ignored keys."""
    state = load_state_dict(path)
    target = model.model.vision_tower.state_dict()
    mapping = {k[len(VISION_PREFIX) :]: k for k in state if k.startswith(VISION_PREFIX)}
    missing = sorted(VISION_PREFIX + k for k in target if k not in mapping and not k.endswith("position_ids"))
    if missing:
        raise KeyError(
            f"{path} lacks vision weight(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} missing): it is not a complete CLIP checkpoint; download it again"
        )
    _copy(
        model.model.vision_tower,
        {dst: state[src] for dst, src in mapping.items() if dst in target},
        path,
        prefix=VISION_PREFIX,
    )
    return sorted(k for k in state if k not in mapping.values() or k[len(VISION_PREFIX) :] not in target)


def load_language_weights(model: LlavaForConditionalGeneration, path: str | Path) -> None:
    """Copy a causal LM's `model.*` into the language model and `lm_head.weight` into the head."""
    state = load_state_dict(path)
    tied = model.config.tie_word_embeddings
    lm_target = model.model.language_model.state_dict()
    mapping = {f"model.{k}": k for k in lm_target}
    missing = [src for src in mapping if src not in state]
    if not tied and "lm_head.weight" not in state:
        missing.append("lm_head.weight")
    if missing:
        raise KeyError(
            f"{path} lacks language-model weight(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            f" ({len(missing)} missing): the file is wrong or truncated; download it again"
        )
    unexpected = sorted(set(state) - set(mapping) - {"lm_head.weight"})
    if unexpected:
        raise KeyError(
            f"{path} has weight(s) this language model does not know: {unexpected[:5]}; "
            "does config.json belong to the same model?"
        )
    lm_state = {dst: state[src] for src, dst in mapping.items()}
    _copy(model.model.language_model, lm_state, path, prefix="model.")
    if not tied:
        _copy(model.lm_head, {"weight": state["lm_head.weight"]}, path, prefix="lm_head.")
    elif "lm_head.weight" in state and not torch.equal(
        state["lm_head.weight"], state["model.embed_tokens.weight"]
    ):
        raise ValueError(f"{path}: lm_head.weight differs from the embeddings but the config ties them")


@torch.no_grad()
def _copy(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path, prefix: str = "") -> None:
    """Copy each tensor into the module's parameter or buffer of the same name, checking shapes.

    `prefix` turns a module name back into the checkpoint's key, so errors name what is in the file.
    """
    params = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, src in tensors.items():
        dst = params[name]
        if dst.shape != src.shape:
            raise ValueError(
                f"{path}: {prefix}{name} has shape {tuple(src.shape)}, the model expects "
                f"{tuple(dst.shape)}: the checkpoint and config.json describe different models"
            )
        dst.copy_(src)


def freeze_backbones(model: LlavaForConditionalGeneration) -> None:
    """Freeze vision tower, language model and head: only the projector trains (LLaVA stage 1)."""
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts (tied weights counted once)."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }


PARTS = {
    "vision_tower": "model.vision_tower.",
    "projector": "model.multi_modal_projector.",
    "language_model": "model.language_model.",
    "lm_head": "lm_head.",
}


def parameters_by_part(model: LlavaForConditionalGeneration) -> dict[str, dict[str, int]]:
    """count_parameters for each part of the model; a tied lm_head counts 0 (it is the embeddings)."""
    out = {part: {"total": 0, "trainable": 0} for part in PARTS}
    for name, p in model.named_parameters():  # a shared tensor is yielded once, under its first name
        part = next((part for part, prefix in PARTS.items() if name.startswith(prefix)), "other")
        counts = out.setdefault(part, {"total": 0, "trainable": 0})
        counts["total"] += p.numel()
        counts["trainable"] += p.numel() if p.requires_grad else 0
    return out


def assemble(
    backbones: Backbones, model_cfg: cfg.ModelConfig, *, seed: int = 0
) -> LlavaForConditionalGeneration:
    """Build the LLaVA model, load both backbones by explicit key maps, freeze them (fp32, CPU, whatever
    the backbones are stored in: bf16 weights are copied in exactly, as fp32 holds every bf16 value)."""
    config = config_from_backbones(backbones, model_cfg)
    torch.manual_seed(seed)  # the projector's initial weights
    model = LlavaForConditionalGeneration(config)
    ignored = load_vision_weights(model, backbones.vision_dir / "pytorch_model.bin")
    log.info("vision checkpoint: %d keys not used by LLaVA (CLIP's text half and projections)", len(ignored))
    load_language_weights(model, lm_weights_file(backbones.lm_dir))
    if config.tie_word_embeddings:
        model.tie_weights()
    freeze_backbones(model)
    return model.eval()


def lm_weights_file(lm_dir: Path) -> Path:
    """The single weights file of a language-model folder (safetensors preferred)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (lm_dir / name).is_file():
            return lm_dir / name
    raise FileNotFoundError(
        f"{lm_dir} has no model.safetensors: sharded or missing weights; run prepare_backbones()"
    )


@torch.no_grad()
def text_logits_max_diff(
    llava: LlavaForConditionalGeneration, lm: torch.nn.Module, input_ids: torch.Tensor
) -> float:
    """Max |logit difference| between LLaVA and its source LM on a text-only input (0 after surgery)."""
    a = llava(input_ids=input_ids).logits.float()
    b = lm(input_ids=input_ids).logits.float()
    n = min(a.shape[-1], b.shape[-1])  # LLaVA's vocabulary may be padded with new tokens
    return (a[..., :n] - b[..., :n]).abs().max().item()


def build(profile: cfg.Profile, backbones: Backbones):
    """Profile and its backbones on disk (`sources.prepare_backbones(profile)`) → (model, processor):
    surgery, special tokens, resized embeddings, frozen backbones."""
    from .processing import load_processor, resize_embeddings

    model = assemble(backbones, profile.model, seed=profile.seed)
    processor = load_processor(backbones.vision_dir, backbones.lm_dir, model.config)
    resize_embeddings(model, processor.tokenizer)
    return model, processor


def base_model(model: torch.nn.Module) -> LlavaForConditionalGeneration:
    """The LlavaForConditionalGeneration inside accelerate's wrappers (DDP, torch.compile) and peft's."""
    from accelerate.utils import extract_model_from_parallel
    from peft import PeftModel

    model = extract_model_from_parallel(model)
    return model.get_base_model() if isinstance(model, PeftModel) else model
