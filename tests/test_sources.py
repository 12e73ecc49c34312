"""Backbones on disk: written once, reused, repaired when damaged; checkpoints fail loudly."""

import time

import pytest
import torch
from safetensors.torch import save_file
from test_clip_pretrain import TINY as TINY_CLIP  # a tower that pretrains in milliseconds

from llava_nb import config, fsutil, sources
from llava_nb.fsutil import MANIFEST, atomic_dir, is_complete


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_second_prepare_reuses_the_cache(offline_profile, offline_backbones):
    before = {d: _mtimes(d) for d in (offline_backbones.vision_dir, offline_backbones.lm_dir)}
    lines = []
    start = time.perf_counter()
    again = sources.prepare_backbones(offline_profile, progress=lines.append)
    assert time.perf_counter() - start < 5
    assert again == offline_backbones
    assert {d: _mtimes(d) for d in (again.vision_dir, again.lm_dir)} == before  # nothing rewritten
    assert len(lines) == 2 and all("reusing" in line for line in lines)
    assert set(sources.VISION_FILES) | {MANIFEST} <= set(before[again.vision_dir])
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= set(before[again.lm_dir])


def test_damaged_vision_folder_is_rebuilt_and_the_rest_kept(tmp_path, monkeypatch, offline_backbones):
    monkeypatch.setenv(config.CACHE_ENV, str(tmp_path))
    lm = offline_backbones.lm_dir
    (tmp_path / lm.name).symlink_to(lm)  # complete: must be reused, not rewritten
    lm_before = _mtimes(offline_backbones.lm_dir)
    # A tiny tower pretrained for 2 steps keeps the real writer fast; the folder name records its settings.
    profile = config.get_profile("offline", model=dict(offline_clip=dict(TINY_CLIP, steps=2)))
    vision = sources.prepare_backbones(profile).vision_dir
    assert vision.parent == tmp_path and is_complete(vision)

    (vision / "config.json").unlink()  # a missing file
    assert not is_complete(vision)
    sources.prepare_backbones(profile)
    assert is_complete(vision) and (vision / "config.json").is_file()

    with open(vision / "pytorch_model.bin", "r+b") as f:  # a truncated file
        f.truncate(1000)
    assert not is_complete(vision)
    sources.prepare_backbones(profile)
    assert is_complete(vision) and (vision / "pytorch_model.bin").stat().st_size > 1000

    assert _mtimes(offline_backbones.lm_dir) == lm_before
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == sorted([vision.name, offline_backbones.lm_dir.name])  # no temporary folders


def test_atomic_dir_leaves_nothing_when_the_body_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_the_old_version_when_a_rewrite_fails(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("killed")
    assert (tmp_path / "out" / "a.txt").read_text() == "old" and is_complete(tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    with atomic_dir(tmp_path / "out") as tmp:  # a successful rewrite replaces it whole
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["b.txt", MANIFEST])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_is_complete_needs_the_manifest_and_every_file_at_its_size(tmp_path):
    folder = tmp_path / "f"
    assert not is_complete(folder)
    with atomic_dir(folder) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"1234")
    assert is_complete(folder) and fsutil.folder_listing(folder)[-1] == ("sub/w.bin", 4)
    (folder / "sub" / "w.bin").write_bytes(b"123")
    assert not is_complete(folder)
    (folder / "sub" / "w.bin").write_bytes(b"1234")
    (folder / MANIFEST).write_text("{not json")
    assert not is_complete(folder)


@pytest.mark.parametrize("name", ["weights.safetensors", "pytorch_model.bin"])
def test_truncated_checkpoint_is_a_value_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    state = {"a.weight": torch.randn(64, 64), "b.bias": torch.randn(64)}
    save_file(state, path) if name.endswith(".safetensors") else torch.save(state, path)
    assert torch.equal(fsutil.load_state_dict(path)["a.weight"], state["a.weight"])
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"{name}.*damaged or incomplete"):
        fsutil.load_state_dict(path)


def test_missing_or_foreign_checkpoint_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_backbones"):
        fsutil.load_state_dict(tmp_path / "model.safetensors")
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported checkpoint format 'model.pt'"):
        fsutil.load_state_dict(tmp_path / "model.pt")


def test_folder_listing_and_human_size(offline_backbones):
    listing = dict(fsutil.folder_listing(offline_backbones.vision_dir))
    assert 10e6 < listing["pytorch_model.bin"] < 30e6  # a 4-layer, 256-wide tower, a small text half, fp32
    sizes = [fsutil.human_size(n) for n in (999, 1000, 1_234_567, 2.2e9)]
    assert sizes == ["999 B", "1.0 kB", "1.2 MB", "2.2 GB"]
