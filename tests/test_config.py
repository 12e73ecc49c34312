"""Profiles and budgets: a budget caps a profile's numbers after any override, and is chosen the way a user
chooses it ($LLAVA_NB_BUDGET, or a parameter), never by asking whether tests run."""

import pytest

from llava_nb import config


def test_smoke_caps_every_stage_and_evaluation_but_keeps_smaller_values():
    full = config.get_profile("t4")
    smoke = config.get_profile("t4", "smoke", stage1=dict(per_device_train_batch_size=1, max_steps=1000))
    caps = config.BUDGETS["smoke"]
    assert (full.budget, smoke.budget) == ("full", "smoke")
    assert smoke.stage1.max_steps == caps["stage1"]["max_steps"] < full.stage1.max_steps  # override capped
    assert smoke.stage1.per_device_train_batch_size == 1  # already below the cap: kept
    assert smoke.stage2.max_steps == caps["stage2"]["max_steps"]
    assert (
        smoke.eval.limit == caps["eval"]["limit"]
        and smoke.eval.pope_questions == caps["eval"]["pope_questions"]
    )
    assert smoke.stage2.lora_r == full.stage2.lora_r and smoke.model == full.model  # only numbers it names
    assert config.get_profile("t4", "full") == full


def test_pick_profile_reads_the_profile_and_budget_a_user_sets(monkeypatch):
    monkeypatch.setenv(config.PROFILE_ENV, "offline")
    monkeypatch.setenv(config.BUDGET_ENV, "smoke")
    picked = config.pick_profile("t4", stage1=dict(max_steps=7))
    assert (picked.name, picked.budget, picked.stage1.max_steps) == ("offline", "smoke", 3)
    monkeypatch.setenv(config.BUDGET_ENV, "full")
    assert config.pick_profile("t4", stage1=dict(max_steps=7)).stage1.max_steps == 7
    monkeypatch.delenv(config.BUDGET_ENV)
    monkeypatch.delenv(config.PROFILE_ENV)
    assert (config.pick_profile("t4").name, config.pick_profile("t4").budget) == ("t4", "full")


def test_unknown_budget_or_setting_says_what_is_valid(monkeypatch):
    monkeypatch.setenv(config.BUDGET_ENV, "tiny")
    with pytest.raises(KeyError, match="unknown budget 'tiny'.*full.*smoke.*LLAVA_NB_BUDGET"):
        config.pick_profile("offline")
    with pytest.raises(KeyError, match="unknown profile.stage1 setting"):
        config.get_profile("offline", stage1=dict(max_stepz=3))
