"""What this machine offers: library versions, the accelerator, the profile in use and free disk."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from . import config as cfg

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "peft")
T4_DOWNLOAD_GIB = 3.0  # TinyLlama safetensors (2.2 GB) + CLIP pytorch_model.bin (0.6 GB)
OFFLINE_WRITE_GIB = 1.0  # the random CLIP (0.5 GB) and SmolLM2 in fp32 (0.5 GB)


def package_version(name: str) -> str:
    """Installed version of a distribution, or 'not installed'."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def backbone_cache(profile: cfg.Profile) -> Path:
    """Where `prepare_backbones` puts this profile's backbones: the hub cache, or $LLAVA_NB_CACHE."""
    if cfg.is_offline(profile):
        return cfg.cache_dir()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def free_disk_gib(path: str | Path) -> float:
    """Free space on the disk holding `path` (or its nearest existing parent), in GiB."""
    path = Path(path).expanduser().absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free / 2**30


def environment_report(profile: cfg.Profile) -> dict[str, Any]:
    """Versions, GPU (name and memory, or 'CPU only'), profile and budget, Colab or not, free disk, advice."""
    report: dict[str, Any] = {"python": platform.python_version()}
    report |= {name: package_version(name) for name in PACKAGES}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
        report["is_t4"] = "T4" in props.name
        report["bf16"] = torch.cuda.is_bf16_supported()  # False on a T4: train in fp16
    else:
        report |= {"gpu": "CPU only", "is_t4": False, "bf16": False}
    cache = backbone_cache(profile)
    report |= {
        "profile": profile.name,
        "budget": profile.budget,
        "colab": cfg.in_colab(),
        "backbone_cache": str(cache),
        "free_disk_gib": round(free_disk_gib(cache), 1),
    }
    report["advice"] = _advice(profile, report)
    return report


def _advice(profile: cfg.Profile, report: dict[str, Any]) -> list[str]:
    advice = []
    offline = cfg.is_offline(profile)
    if not offline and report["gpu"] == "CPU only":
        advice.append(
            "the t4 profile wants a GPU: in Colab choose Runtime > Change runtime type > T4 GPU; "
            "on a CPU-only machine set PROFILE = 'offline'"
        )
    elif not offline and not report["is_t4"]:
        advice.append("not a T4: the recipe runs unchanged, but timings and memory headroom will differ")
    need = OFFLINE_WRITE_GIB if offline else T4_DOWNLOAD_GIB
    if report["free_disk_gib"] < need + 1:
        advice.append(
            f"only {report['free_disk_gib']} GiB free at {report['backbone_cache']}: the backbones "
            f"need about {need} GiB; free some space or point {cfg.CACHE_ENV}/HF_HOME elsewhere"
        )
    return advice
