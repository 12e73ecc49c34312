"""Where and in what precision the model runs, and how much memory a process has used.

- GPU (a T4): frozen weights in fp16 (a T4 has no bfloat16), fp16 autocast with loss scaling in training;
- CPU: fp32 weights; in training, where the processor has bf16 matrix instructions, bf16 autocast with
  frozen linear weights stored in bf16 (stages.place_for_training); eager attention (faster there).

Whatever the sources are stored in (TinyLlama's weights and config are bfloat16, CLIP's float32), weight
surgery builds every part in fp32 on the CPU (`set_config_dtype`), and an export's config.json says the
dtype its weights are stored in.
"""

from __future__ import annotations

import resource
import sys

import torch

from . import config as cfg


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """fp16 on a GPU (a T4 has no bfloat16), fp32 on the CPU (fp16 matmuls there are slow or missing)."""
    device = default_device() if device is None else torch.device(device)
    return torch.float16 if device.type == "cuda" else torch.float32


def frozen_dtype() -> torch.dtype:
    """The dtype frozen weights train in: fp16 on a GPU (half the memory of a T4), fp32 on the CPU."""
    return torch.float16 if torch.cuda.is_available() else torch.float32


def set_config_dtype(config, dtype: torch.dtype):
    """Name `dtype` in a model config and in each of its sub-configs, and return it.

    transformers 5 builds each sub-model in its own config's dtype (a LlavaConfig whose text_config came
    from TinyLlama's `"torch_dtype": "bfloat16"` builds the language model in bf16 beside an fp32 vision
    tower), and save_pretrained writes each config's `dtype`: saying one dtype everywhere keeps the model
    one precision and its config.json true to its weights."""
    config.dtype = dtype
    for name in getattr(config, "sub_configs", {}):
        if getattr(config, name, None) is not None:
            set_config_dtype(getattr(config, name), dtype)
    return config


def attention_implementation(requested: str = "auto") -> str:
    """The attention kernel training uses: 'auto' is sdpa on a GPU (fused, memory-efficient) and eager on a
    CPU, where for short sequences eager's plain matrix products train faster than torch's CPU
    flash-attention backward (docs/performance.md, row `eager`). 'sdpa' or 'eager' force one."""
    if requested not in ("auto", "sdpa", "eager"):
        raise ValueError(f"attention must be 'auto', 'sdpa' or 'eager', got {requested!r}")
    if requested != "auto":
        return requested
    return "sdpa" if torch.cuda.is_available() else "eager"


def cpu_has_bf16() -> bool:
    """True when this CPU runs bf16 matrix products natively (AVX-512 BF16 or AMX), via oneDNN."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_autocast(t: cfg.TrainConfig) -> bool:
    """True when training runs under bf16 autocast on a CPU: asked for, no GPU, and bf16 instructions."""
    return t.cpu_bf16 and not torch.cuda.is_available() and cpu_has_bf16()


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (ru_maxrss), in MB (Linux: kB, macOS: bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1024


def status_mb(field_name: str) -> float | None:
    """A memory field of /proc/self/status in MB (VmRSS: now, VmHWM: the peak), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Linux >= 4.0: reset VmHWM (the peak RSS) to the current RSS, so a later read covers what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
