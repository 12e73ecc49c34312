"""Shared fixtures: the profile under test, its backbones and the model built from them.

The profile is `$LLAVA_NB_PROFILE` (default `offline`): `LLAVA_NB_PROFILE=t4 python -m pytest ...` runs the
same tests on the t4 profile, against the hub twins the root conftest serves. Model loads are
session-scoped, so the suite pays for them once; tests must not modify them.
"""

import os

import pytest


@pytest.fixture(scope="session")
def profile():
    """The profile under test, as defined (full budget; tests pick their own numbers): `offline`, or
    `$LLAVA_NB_PROFILE`."""
    from llava_nb import config

    return config.get_profile(os.environ.get(config.PROFILE_ENV) or "offline")


@pytest.fixture(scope="session")
def offline_profile():
    """The offline profile exactly as defined, for what only it has (the generated scenes, its cache)."""
    from llava_nb import config

    return config.get_profile("offline")


@pytest.fixture(scope="session")
def offline_backbones(offline_profile):
    """The offline CLIP twin and SmolLM2 folders, written once into the cache (CLIP: ~4 min)"""
    from llava_nb import sources

    return sources.prepare_backbones(offline_profile)


@pytest.fixture(scope="session")
def backbones(profile):
    """The profile's CLIP and language-model folders (offline: written once; t4: downloaded from the twin)."""
    from llava_nb import sources

    return sources.prepare_backbones(profile)


@pytest.fixture(scope="session")
def built(profile, backbones):
    """(model, processor) from surgery.build: fp32, CPU, only the projector trainable."""
    from llava_nb import surgery

    return surgery.build(profile, backbones)


@pytest.fixture(scope="session")
def source_lm(backbones):
    """The source language model, as transformers loads it from the profile's folder (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(backbones.lm_dir, dtype=torch.float32).eval()
