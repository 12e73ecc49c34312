"""Weight surgery: explicit key maps with shape checks, errors that name the key, frozen backbones, one
precision whatever the sources are stored in, and exports whose config.json says their weights' dtype."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from llava_nb import checkpoints, config, fsutil, surgery

PROJECTOR = "model.multi_modal_projector."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny CLIP and Llama checkpoints in the hub's layout (an untied head, as TinyLlama has)."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    vision = dict(small, num_hidden_layers=2, image_size=64, patch_size=16)
    clip = CLIPConfig(text_config=dict(small, num_hidden_layers=1), vision_config=vision, projection_dim=16)
    (root / "clip").mkdir()
    torch.save(CLIPModel(clip).state_dict(), root / "clip" / "pytorch_model.bin")  # openai's format
    clip.save_pretrained(root / "clip")
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128, num_hidden_layers=2, num_key_value_heads=1, tie_word_embeddings=False, **small
        )
    ).eval()
    lm.save_pretrained(root / "lm")
    return surgery.Backbones(vision_dir=root / "clip", lm_dir=root / "lm"), lm


def _empty(backbones):
    return LlavaForConditionalGeneration(surgery.config_from_backbones(backbones, config.ModelConfig()))


def _edited(tmp_path, src, edit, name):
    """Save an edited copy of the checkpoint `src` as tmp_path/name."""
    state = fsutil.load_state_dict(src)
    edit(state)
    path = tmp_path / name
    save_file(state, path) if name.endswith(".safetensors") else torch.save(state, path)
    return path


def test_text_logits_equal_the_source_lm(built, source_lm):
    model, processor = built
    for text in ("A red circle above a blue square.", "USER: What colour is the circle? ASSISTANT:"):
        ids = processor.tokenizer(text, return_tensors="pt").input_ids  # no <pad>: the source LM lacks it
        assert surgery.text_logits_max_diff(model, source_lm, ids) <= 1e-4


def test_only_the_projector_trains_after_freeze(built):
    model, _ = built
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(PROJECTOR) for n in trainable)
    counts = surgery.count_parameters(model)
    parts = surgery.parameters_by_part(model)
    assert counts["trainable"] == parts["projector"]["total"] == parts["projector"]["trainable"]
    assert counts["total"] == sum(p["total"] for p in parts.values())
    shared = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if (
        model.config.text_config.tie_word_embeddings
    ):  # SmolLM2: the head is the embeddings, even after resizing
        assert parts["lm_head"]["total"] == 0 and shared
    else:  # TinyLlama: a head of its own, frozen, with as many rows as the embeddings
        assert parts["lm_head"]["trainable"] == 0 and not shared
        assert model.lm_head.weight.shape == model.get_input_embeddings().weight.shape


def test_t4_parameter_count_from_config():
    with torch.device("meta"):  # shapes only: no memory, no download
        model = LlavaForConditionalGeneration(surgery.t4_config())
    surgery.freeze_backbones(model)
    parts = surgery.parameters_by_part(model)
    assert parts["language_model"]["total"] + parts["lm_head"]["total"] == 1_100_048_384  # TinyLlama-1.1B
    assert parts["projector"]["total"] == 768 * 2048 + 2048 + 2048 * 2048 + 2048
    counts = surgery.count_parameters(model)
    assert 1.18e9 < counts["total"] < 1.20e9 and counts["trainable"] == parts["projector"]["total"]
    assert surgery.describe_config(model.config)["image tokens per image"] == 49


def test_tiny_untied_assembly_equals_its_sources(tiny):
    backbones, lm = tiny
    model = surgery.assemble(backbones, config.ModelConfig())
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, lm.lm_head.weight)
    clip = fsutil.load_state_dict(backbones.vision_dir / "pytorch_model.bin")
    for key, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, clip["vision_model." + key]), key
    ids = torch.randint(0, 128, (2, 9))
    assert surgery.text_logits_max_diff(model, lm, ids) <= 1e-5


@pytest.fixture(scope="module")
def bf16_lm(tiny, tmp_path_factory):
    """The tiny LM as TinyLlama publishes its own: bf16 safetensors, a config saying "torch_dtype": "bfloat16"
    (transformers 4.35's key, no `dtype`)."""
    backbones, lm = tiny
    folder = tmp_path_factory.mktemp("bf16") / "lm"
    folder.mkdir()
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in lm.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    lm_config = json.loads((backbones.lm_dir / "config.json").read_text())
    lm_config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps({**lm_config, "torch_dtype": "bfloat16"}))
    return surgery.Backbones(vision_dir=backbones.vision_dir, lm_dir=folder), state


def _dtypes(model) -> dict[str, set]:
    return {
        part: {p.dtype for n, p in model.named_parameters() if n.startswith(prefix)}
        for part, prefix in surgery.PARTS.items()
    }


def test_a_bf16_language_model_is_assembled_in_fp32_exactly(bf16_lm):
    """transformers 5 builds a sub-model in its config's dtype: from TinyLlama's "bfloat16" the language model
    came out bf16 beside an fp32 head, projector and vision tower, and the first forward failed (BFloat16 !=
    float). Assembled, every part is fp32 as device.py says, each bf16 weight copied exactly (fp32 holds every
    bf16 value), and the logits are the source's, loaded as the tests and notebook 02 load it."""
    backbones, state = bf16_lm
    model = surgery.assemble(backbones, config.ModelConfig())
    assert _dtypes(model) == {part: {torch.float32} for part in surgery.PARTS}
    assert [c.dtype for c in (model.config, model.config.text_config, model.config.vision_config)] == [
        torch.float32
    ] * 3
    language = model.model.language_model.state_dict()
    for key, value in state.items():
        target = model.lm_head.weight if key == "lm_head.weight" else language[key.removeprefix("model.")]
        assert torch.equal(target, value.float()), key
    source = AutoModelForCausalLM.from_pretrained(backbones.lm_dir, dtype=torch.float32).eval()
    assert {p.dtype for p in source.parameters()} == {torch.float32}
    assert surgery.text_logits_max_diff(model.eval(), source, torch.randint(0, 128, (2, 9))) <= 1e-5


class _NoProcessor:
    def save_pretrained(self, folder):
        pass


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_an_export_says_the_dtype_its_weights_are_stored_in(bf16_lm, tmp_path, dtype):
    """config.json says `dtype` as transformers 5 writes it, in the model's config and in its text and vision
    configs, and that is the dtype of every tensor in model.safetensors; loaded with from_pretrained's
    default, every part comes back in it. `None`: the frozen weights' dtype (fp32 on a CPU)."""
    backbones, _ = bf16_lm
    model = surgery.assemble(backbones, config.ModelConfig())
    checkpoints.export(model, _NoProcessor(), tmp_path / "export", dtype=dtype)
    expected = dtype or torch.float32
    name = str(expected).removeprefix("torch.")
    saved = json.loads((tmp_path / "export" / "config.json").read_text())
    assert [saved.get("dtype"), saved["text_config"].get("dtype"), saved["vision_config"].get("dtype")] == [
        name
    ] * 3
    assert "torch_dtype" not in json.dumps(saved)
    with safe_open(tmp_path / "export" / "model.safetensors", framework="pt") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert stored == {{"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[name]}
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export")
    assert _dtypes(loaded) == {part: {expected} for part in surgery.PARTS}


def test_vision_weights_report_the_ignored_text_half(tiny):
    backbones, _ = tiny
    ignored = surgery.load_vision_weights(_empty(backbones), backbones.vision_dir / "pytorch_model.bin")
    assert ignored and not [k for k in ignored if k.startswith("vision_model.") and "position_ids" not in k]
    assert {"logit_scale", "text_projection.weight", "visual_projection.weight"} <= set(ignored)


def test_missing_vision_key_is_a_key_error_naming_it(tiny, tmp_path):
    backbones, _ = tiny
    key = "vision_model.encoder.layers.1.mlp.fc2.weight"
    src = backbones.vision_dir / "pytorch_model.bin"
    bad = _edited(tmp_path, src, lambda s: s.pop(key), "pytorch_model.bin")
    with pytest.raises(KeyError, match=re.escape(key)):
        surgery.load_vision_weights(_empty(backbones), bad)


def test_wrong_shape_lm_tensor_is_a_value_error_naming_it(tiny, tmp_path):
    backbones, _ = tiny
    key = "model.layers.1.mlp.down_proj.weight"

    def edit(state):
        state[key] = torch.zeros(32, 48)

    bad = _edited(tmp_path, backbones.lm_dir / "model.safetensors", edit, "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"{key} has shape (32, 48), the model expects (32, 64)")):
        surgery.load_language_weights(_empty(backbones), bad)


def test_missing_or_unknown_lm_keys_are_key_errors_naming_them(tiny, tmp_path):
    backbones, _ = tiny
    src = backbones.lm_dir / "model.safetensors"
    bad = _edited(tmp_path, src, lambda s: s.pop("lm_head.weight"), "no_head.safetensors")
    with pytest.raises(KeyError, match=r"lacks language-model weight\(s\) \['lm_head.weight'\]"):
        surgery.load_language_weights(_empty(backbones), bad)
    bad = _edited(tmp_path, src, lambda s: s.update(extra=torch.zeros(1)), "extra.safetensors")
    with pytest.raises(KeyError, match=r"does not know: \['extra'\]"):
        surgery.load_language_weights(_empty(backbones), bad)


def test_truncated_lm_checkpoint_is_a_clear_error(tiny, tmp_path):
    backbones, _ = tiny
    bad = tmp_path / "model.safetensors"
    data = (backbones.lm_dir / "model.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*damaged or incomplete.*prepare_backbones"):
        surgery.load_language_weights(_empty(backbones), bad)


def test_assemble_without_weights_file_says_what_to_run(tiny, tmp_path):
    backbones, _ = tiny
    with pytest.raises(FileNotFoundError, match="prepare_backbones"):
        surgery.lm_weights_file(tmp_path)
