"""One run folder per profile whatever the working directory; Drive on Colab; the override (which the
test session sets); the layout inside it; finding and describing the export a notebook uses."""

import os
import sys
import warnings
from pathlib import Path

import pytest

from llava_nb import config, runs
from llava_nb.fsutil import write_manifest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def user(monkeypatch):
    """As a user runs it: no override, no Drive."""
    monkeypatch.delenv(runs.OUTPUTS_ENV, raising=False)
    monkeypatch.setattr(runs, "DRIVE", Path("/nonexistent-drive"))


def test_a_checkout_keeps_runs_in_its_outputs_whatever_the_working_directory(user, tmp_path, monkeypatch):
    profile = config.get_profile("offline")
    assert runs.repo_root() == ROOT
    for cwd in (ROOT, ROOT / "notebooks", tmp_path):
        monkeypatch.chdir(cwd)
        assert runs.run_dir(profile) == ROOT / "outputs" / "offline"
    assert runs.run_dir is runs.run_dir  # the CLI's default is the notebooks' folder


def test_drive_then_the_override_take_precedence(user, tmp_path, monkeypatch):
    profile = config.get_profile("offline")
    monkeypatch.setattr(runs, "DRIVE", tmp_path / "drive")
    (tmp_path / "drive" / "MyDrive").mkdir(parents=True)
    assert runs.run_dir(profile) == tmp_path / "drive" / "MyDrive" / "llava_nb" / "offline"
    monkeypatch.setenv(runs.OUTPUTS_ENV, str(tmp_path / "elsewhere"))
    assert runs.run_dir(profile) == tmp_path / "elsewhere" / "offline"


def test_the_test_session_keeps_runs_out_of_the_checkout():
    # conftest.py sets the override; runs.py itself has no test branch
    assert os.environ.get(runs.OUTPUTS_ENV)
    assert not runs.run_dir(config.get_profile("offline")).is_relative_to(ROOT / "outputs")


def test_the_layout_of_a_run_folder(user, tmp_path, monkeypatch):
    monkeypatch.setenv(runs.OUTPUTS_ENV, str(tmp_path))
    profile = config.get_profile("offline")
    stage2 = runs.stage_dir(profile, 2)
    assert stage2 == tmp_path / "offline" / "stage2"
    assert runs.default_checkpoint_dir(stage2) == tmp_path / "offline" / "stage2-checkpoints"
    assert runs.default_init_from(stage2) == runs.stage_dir(profile, 1)
    assert runs.EXPORT_NAMES == ("stage2", "stage1", runs.SHORT)


def test_outside_colab_drive_is_left_alone(user):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runs.mount_drive() is False
        assert runs.use_drive() == {"drive": "not Colab: nothing to do"}


def test_a_declined_drive_falls_back_to_local_disk_with_one_warning(user, monkeypatch):
    import types

    def declined(path):
        raise ValueError("mount failed")

    google = types.ModuleType("google")
    google.colab = types.ModuleType("google.colab")
    google.colab.drive = types.SimpleNamespace(mount=declined)
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", google.colab)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "test")
    with pytest.warns(UserWarning) as caught:
        where = runs.use_drive()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "mount failed" in message and "local disk" in message and "disconnect" in message
    assert where["drive"].startswith("not mounted")
    assert runs.run_dir(config.get_profile("t4")) == ROOT / "outputs" / "t4"


def test_a_mounted_drive_holds_the_hub_cache(user, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(runs, "DRIVE", tmp_path)
    (tmp_path / "MyDrive").mkdir()
    monkeypatch.setenv("COLAB_RELEASE_TAG", "test")
    monkeypatch.setenv("HF_HUB_CACHE", constants.HF_HUB_CACHE)  # restored afterwards
    monkeypatch.setattr(constants, "HF_HUB_CACHE", constants.HF_HUB_CACHE)
    where = runs.use_drive()
    cache = tmp_path / "MyDrive" / "llava_nb" / "hub-cache"
    runs_folder = tmp_path / "MyDrive" / "llava_nb"
    assert where == {"drive": "mounted", "runs": str(runs_folder), "hub cache": str(cache)}
    assert os.environ["HF_HUB_CACHE"] == constants.HF_HUB_CACHE == str(cache) and cache.is_dir()


def fake_export(folder: Path, stage: int, steps: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / runs.SUMMARY_FILE).write_text(
        f'{{"profile": "offline", "stage": {stage}, "train": {{"max_steps": {steps}}}, "metrics": {{}}}}'
    )
    write_manifest(folder)
    return folder


def test_find_export_takes_the_newest_and_says_how_it_was_trained(user, tmp_path, monkeypatch, capsys):

    monkeypatch.setenv(runs.OUTPUTS_ENV, str(tmp_path))
    profile = config.get_profile("offline")
    assert runs.find_export(profile) is None
    assert "no export in" in capsys.readouterr().out
    monkeypatch.setattr(
        runs,
        "checkpoint_problem",
        lambda folder, name="offline": None if (Path(folder) / "config.json").is_file() else "missing",
    )
    old = fake_export(tmp_path / "offline" / "stage2", 2, 40)
    new = fake_export(tmp_path / "offline" / "stage1", 1, 300)
    os.utime(old, (1, 1))  # stage 2 from an earlier run, stage 1 retrained since
    assert runs.find_export(profile) == new
    assert "using" in capsys.readouterr().out
    described = runs.describe_export(new)
    assert (described["stage"], described["steps"], described["export"]) == (1, 300, str(new))
    with pytest.raises(FileNotFoundError, match="missing"):
        runs.find_export(profile, tmp_path / "nowhere")
