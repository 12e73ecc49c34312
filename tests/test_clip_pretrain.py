"""The offline CLIP twin: pretrained here, deterministic for a seed, rebuilt after a kill, and it sees."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import torch

from llava_nb import clip_pretrain, config, sources, synthetic
from llava_nb.fsutil import is_complete

# A tower of the real shape (224 px, 32-px patches) but 32 wide and one layer deep: a step takes milliseconds.
TINY = dict(
    vision_width=32,
    vision_layers=1,
    vision_heads=2,
    text_width=16,
    text_layers=1,
    text_heads=2,
    projection_dim=16,
    steps=3,
    batch_size=4,
    warmup_steps=1,
)


def _tiny_profile(**overrides):
    return config.get_profile("offline", model=dict(offline_clip={**TINY, **overrides}))


def test_same_seed_same_weights_other_seed_other_weights():
    c = _tiny_profile().model.offline_clip
    a, rec_a = clip_pretrain.pretrain(c)
    b, rec_b = clip_pretrain.pretrain(c)
    other, _ = clip_pretrain.pretrain(config.ClipConfig(**{**TINY, "seed": 1}))
    sa, sb, so = a.state_dict(), b.state_dict(), other.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and rec_a["loss"] == rec_b["loss"]
    assert not all(torch.equal(sa[k], so[k]) for k in sa)


def test_hard_negatives_break_one_binding_and_captions_tokenize():
    rng = np.random.default_rng(0)
    for _ in range(200):
        _, scene = synthetic.draw_scene(rng)
        negative = clip_pretrain.hard_negative(scene, rng)
        assert synthetic.clip_caption(negative) != synthetic.clip_caption(scene)
        assert [o["box"] for o in negative] == [o["box"] for o in scene]
    longest = (
        "a large blue square on the right and a small green triangle on the left and a large yellow "
        "circle on the right"
    )
    ids = clip_pretrain.tokenize(["a small red circle on the left", longest])
    assert ids["input_ids"].shape[1] <= clip_pretrain.MAX_TOKENS
    assert (ids["input_ids"] == clip_pretrain.UNK).sum() == 0
    assert (ids["input_ids"] == clip_pretrain.EOS).sum() == 2


def test_patch_targets_say_what_each_patch_shows():
    """The patch objective's targets: per attribute, shares of the patch's pixels, background first."""
    scene = [
        {"colour": "blue", "shape": "square", "side": "right", "box": (128, 0, 224, 96)},
        {"colour": "red", "shape": "circle", "side": "left", "box": (0, 160, 40, 200)},
    ]
    t = clip_pretrain.patch_targets([scene])[0]  # (49, classes)
    sizes = [len(v) for v in clip_pretrain.PATCH_CLASSES.values()]
    for part in torch.split(t, sizes, dim=-1):
        assert torch.allclose(part.sum(-1), torch.ones(49))
    colour, shape, side, size, count = torch.split(t, sizes, dim=-1)
    assert (count == torch.tensor([0.0, 0, 1, 0])).all()  # two objects, said on every patch
    inside = 0 * 7 + 5  # row 0, column 5: wholly inside the blue square
    assert colour[inside].tolist() == [0, 0, 0, 1, 0] and shape[inside].tolist() == [0, 0, 1, 0]
    assert side[inside].tolist() == [0, 0, 1] and size[inside].tolist() == [0, 0, 1]
    assert colour[6 * 7 + 6].tolist() == [1, 0, 0, 0, 0]  # bottom right: background
    assert 0 < colour[5 * 7 + 0, 1] < 1 and side[5 * 7 + 0, 1] == colour[5 * 7 + 0, 1]  # part of the circle


def test_written_like_openais_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(config.CACHE_ENV, str(tmp_path))
    from transformers import CLIPImageProcessor, CLIPModel

    folder = sources._prepare_vision(_tiny_profile().model, lambda line: None)
    assert set(sources.VISION_FILES) <= {p.name for p in folder.iterdir()} and is_complete(folder)
    keys = set(torch.load(folder / "pytorch_model.bin", weights_only=True))
    assert {
        "logit_scale",
        "text_projection.weight",
        "visual_projection.weight",
        "vision_model.embeddings.patch_embedding.weight",
        "text_model.embeddings.token_embedding.weight",
    } <= keys
    model = CLIPModel.from_pretrained(folder)
    assert model.config.vision_config.patch_size == 32 and model.config.vision_config.image_size == 224
    assert CLIPImageProcessor.from_pretrained(folder).crop_size == {"height": 224, "width": 224}
    assert folder.name == sources.offline_clip_name(_tiny_profile().model.offline_clip)
    assert folder.name != sources.offline_clip_name(config.ClipConfig())  # the settings name the folder
    assert clip_pretrain.record(folder)["zero_shot"]["n"] == 100
    assert set(clip_pretrain.record(folder)["patch_accuracy"]) == set(clip_pretrain.PATCH_CLASSES)


def test_a_build_killed_mid_pretraining_leaves_nothing_and_the_next_call_rebuilds(tmp_path, monkeypatch):
    """SIGKILL in the middle of pretraining: no half-written cache folder; the next call builds it."""
    script = textwrap.dedent(f"""
        import time
        from llava_nb import clip_pretrain, config, sources
        loss = clip_pretrain.contrastive_loss
        def slow(*args, **kwargs):  # one line per step, and slow enough to be killed in the middle
            print("step", flush=True)
            time.sleep(0.5)
            return loss(*args, **kwargs)
        clip_pretrain.contrastive_loss = slow
        profile = config.get_profile("offline", model=dict(offline_clip={dict(TINY, steps=5)!r}))
        sources._prepare_vision(profile.model, print)
    """)
    env = {**os.environ, config.CACHE_ENV: str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    steps = 0
    for line in proc.stdout:
        steps += line.strip() == "step"
        if steps == 3:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    profile = _tiny_profile(steps=5)
    folder = tmp_path / sources.offline_clip_name(profile.model.offline_clip)
    assert not folder.exists()  # only the temporary folder beside it, which nothing reads
    assert [p.name.startswith(f".{folder.name}.tmp-") for p in tmp_path.iterdir()] == [True]

    monkeypatch.setenv(config.CACHE_ENV, str(tmp_path))
    lines = []
    again = sources._prepare_vision(profile.model, lines.append)
    assert again == folder and is_complete(again) and any("writing" in line for line in lines)
    fresh, _ = clip_pretrain.pretrain(profile.model.offline_clip)
    saved = torch.load(again / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items())  # the weights of a clean run


def test_the_offline_tower_sees(offline_backbones):
    """Zero-shot on held-out scenes: its caption among 100, and over its hard negative: far above chance."""
    record = clip_pretrain.record(offline_backbones.vision_dir)
    assert record["zero_shot"]["retrieval"] > 0.25  # chance: 0.01
    assert record["zero_shot"]["binding"] > 0.65  # chance: 0.5
    again = clip_pretrain.zero_shot(clip_pretrain.load(offline_backbones.vision_dir), n=50, seed=7)
    assert again["retrieval"] > 0.25 and again["binding"] > 0.65
