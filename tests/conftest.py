"""Shared fixtures: the offline backbones (written once into the usual cache) and the model built from them.

The model loads are session-scoped, so the suite pays for them once; tests must not modify them.
"""

import os

import pytest

os.environ["LLAVA_NB_IN_TEST"] = "1"  # notebooks and commands started from tests pick `offline`


@pytest.fixture(scope="session")
def offline_profile():
    """The offline profile exactly as defined (no $LLAVA_NB_PROFILE override)."""
    from llava_nb import config

    return config.get_profile("offline")


@pytest.fixture(scope="session")
def backbones(offline_profile):
    """Offline CLIP twin and SmolLM2 folders (written on first use, ~20 s; reused afterwards)."""
    from llava_nb import sources

    return sources.prepare_backbones(offline_profile)


@pytest.fixture(scope="session")
def built(offline_profile, backbones):
    """(model, processor) from surgery.build: fp32, CPU, only the projector trainable."""
    from llava_nb import surgery

    return surgery.build(offline_profile, backbones)


@pytest.fixture(scope="session")
def source_lm(backbones):
    """The source language model, as transformers loads it from the offline folder (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(backbones.lm_dir, dtype=torch.float32).eval()
