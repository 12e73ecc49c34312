"""The training loss with LM-head logits only where labels are equals the model's own loss, and so do its
gradients on the projector."""

import itertools

import pytest
import torch
from transformers import TrainingArguments

from llava_nb import data, device, sources, streams, trainer


@pytest.fixture(scope="module")
def batch(built, profile):
    _, processor = built
    collator = data.LlavaCollator(processor, max_length=profile.data.max_length)
    source = sources.prepare_dataset(profile)
    return collator(list(itertools.islice(streams.stream(source, "train", shuffle_buffer=0), 3)))


def trainers(model, tmp_path) -> tuple[trainer.LlavaTrainer, trainer.LlavaTrainer]:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return (
        trainer.LlavaTrainer(model=model, args=args, fast_loss=True),
        trainer.LlavaTrainer(model=model, args=args, fast_loss=False),
    )


def test_fast_loss_equals_model_loss(built, batch, tmp_path):
    model, _ = built
    fast, slow = trainers(model, tmp_path)
    with torch.no_grad():
        a = fast.compute_loss(model, dict(batch))
        b = slow.compute_loss(model, dict(batch))
        n = int((batch["labels"] != data.IGNORE_INDEX).sum())  # with a token count, as Trainer passes it
        c = fast.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n))
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    assert torch.allclose(c, b, atol=1e-5), (c, b)


def test_fast_loss_gradients_equal_model_loss_gradients(built, batch, tmp_path):
    model, _ = built
    fast, slow = trainers(model, tmp_path)
    projector = [p for p in model.parameters() if p.requires_grad]
    assert projector
    # autograd.grad leaves .grad alone: the session's model stays as built
    a = torch.autograd.grad(fast.compute_loss(model, dict(batch)), projector)
    b = torch.autograd.grad(slow.compute_loss(model, dict(batch)), projector)
    for ga, gb in zip(a, b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


# ------------------------------------------------- less work per step: trimmed columns, a shared prefix


@pytest.fixture(scope="module")
def stage1(profile, backbones):
    """The stage-1 model as training builds it (attention 'auto': eager on a CPU, sdpa on a GPU), its frozen
    weights as the sources hold them (fp32 here), so that the model's own loss can run without autocast."""
    from llava_nb import stages

    model, _ = stages.stage_model(profile, 1, narrow=False)
    return model


def with_padding(batch: dict, columns: int) -> dict:
    """The batch with `columns` more padding columns on the right, as a longer sample elsewhere would add."""
    pad = {
        "input_ids": 0,
        "attention_mask": 0,
        "labels": data.IGNORE_INDEX,
    }  # the token under a 0 mask is moot
    out = dict(batch)
    for k, v in pad.items():
        out[k] = torch.cat([batch[k], torch.full((batch[k].shape[0], columns), int(v))], dim=1)
    return out


def test_training_attention_is_eager_on_a_cpu_and_sdpa_on_a_gpu(stage1):
    want = "sdpa" if torch.cuda.is_available() else "eager"
    assert device.attention_implementation("auto") == want
    assert stage1.config._attn_implementation == stage1.config.text_config._attn_implementation == want
    assert device.attention_implementation("sdpa") == "sdpa"
    with pytest.raises(ValueError, match="attention must be"):
        device.attention_implementation("flash")


def test_shared_prefix_is_the_system_prompt(stage1, batch, built):
    _, processor = built
    prefix, cache = trainer.shared_prefix_cache(stage1, batch)
    text = processor.tokenizer.decode(batch["input_ids"][0, :prefix])
    assert prefix > 10 and "curious user" in text and "<image>" not in text, text
    assert cache.get_seq_length() == prefix and cache.layers[0].keys.shape[0] == batch["input_ids"].shape[0]
    # one row, or a language model that trains: nothing is shared
    assert trainer.shared_prefix_cache(stage1, {k: v[:1] for k, v in batch.items()}) == (0, None)
    lm_param = next(stage1.model.language_model.parameters())
    lm_param.requires_grad_(True)
    try:
        assert trainer.shared_prefix_cache(stage1, batch) == (0, None)
    finally:
        lm_param.requires_grad_(False)


def test_trim_drops_only_columns_after_the_last_target(stage1, batch):
    padded = with_padding(batch, 3)
    trimmed = trainer.trim_after_last_target(padded, stage1.config.image_token_id)
    assert trimmed["input_ids"].shape[1] <= batch["input_ids"].shape[1]
    assert torch.equal(trimmed["labels"], padded["labels"][:, : trimmed["labels"].shape[1]])
    assert (padded["labels"][:, trimmed["labels"].shape[1] :] == data.IGNORE_INDEX).all()
    assert trimmed["pixel_values"] is padded["pixel_values"]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_less_work_same_loss_and_gradients(stage1, batch, tmp_path, attention):
    """fp32: trimming and the shared prefix change neither the loss nor the projector's gradients."""
    stage1.set_attn_implementation(attention)
    try:
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
        lean = trainer.LlavaTrainer(model=stage1, args=args, fast_loss=True, shared_prefix=True)
        slow = trainer.LlavaTrainer(model=stage1, args=args, fast_loss=False)
        projector = [p for p in stage1.parameters() if p.requires_grad]
        padded = with_padding(batch, 2)
        a_loss = lean.compute_loss(stage1, dict(padded))
        b_loss = slow.compute_loss(stage1, dict(batch))
        torch.testing.assert_close(a_loss, b_loss, rtol=1e-5, atol=1e-6)
        a = torch.autograd.grad(a_loss, projector)
        b = torch.autograd.grad(b_loss, projector)
        for ga, gb in zip(a, b, strict=True):  # sdpa's kernel rounds differently for other lengths
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5 * float(gb.abs().max()))
    finally:
        stage1.set_attn_implementation("sdpa" if torch.cuda.is_available() else "eager")


@pytest.mark.skipif(not device.cpu_has_bf16(), reason="this CPU has no bf16 matrix instructions")
def test_less_work_under_bf16_autocast_stays_within_rounding(stage1, batch, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    lean = trainer.LlavaTrainer(model=stage1, args=args, fast_loss=True, shared_prefix=True)
    plain = trainer.LlavaTrainer(model=stage1, args=args, fast_loss=True, shared_prefix=False)
    projector = [p for p in stage1.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a_loss = lean.compute_loss(stage1, dict(batch))
        b_loss = plain.compute_loss(stage1, dict(batch))
    torch.testing.assert_close(a_loss, b_loss, rtol=1e-2, atol=1e-3)
    for ga, gb in zip(
        torch.autograd.grad(a_loss, projector), torch.autograd.grad(b_loss, projector), strict=True
    ):
        # bf16 keeps 8 bits: element-wise a few outliers differ, the gradient as a whole must not
        assert float((ga - gb).norm() / gb.norm()) < 2e-2


def test_bf16_frozen_weights_give_the_same_loss_and_gradients(profile, backbones, stage1, batch, tmp_path):
    """Frozen linear weights stored in bf16 compute exactly what bf16 autocast computes from fp32 ones; the
    export's rebuild gives back the sources' weights bit for bit, with the trained tensors."""
    from torch import nn

    from llava_nb import stages

    if not stages.narrows_frozen_weights(profile.stage1):
        pytest.skip("frozen weights are narrowed on a CPU with bf16 instructions only")
    wide = stage1
    narrow, _ = stages.stage_model(profile, 1)  # as training builds it
    embedding = narrow.get_input_embeddings().weight
    linear = [
        m.weight
        for m in narrow.modules()
        if isinstance(m, nn.Linear) and not m.weight.requires_grad and m.weight is not embedding
    ]  # SmolLM2's head is tied to its embeddings
    assert linear and all(w.dtype == torch.bfloat16 for w in linear)  # TinyLlama's untied head too
    assert narrow.get_input_embeddings().weight.dtype == torch.float32  # and with it a tied head
    assert all(p.dtype == torch.float32 for p in narrow.parameters() if p.requires_grad)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    losses, grads = [], []
    for model in (wide, narrow):
        t = trainer.LlavaTrainer(model=model, args=args, fast_loss=True, shared_prefix=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = t.compute_loss(model, dict(batch))
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
    assert torch.equal(*losses)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    # export: the sources' weights exactly, the trained projector carried over
    with torch.no_grad():
        next(p for p in narrow.parameters() if p.requires_grad).add_(1.0)  # "trained"
    rebuilt = stages.as_sources_hold_it(narrow, profile, 1)
    w, r, n = wide.state_dict(), rebuilt.state_dict(), dict(narrow.named_parameters())
    assert w.keys() == r.keys()
    for k in w:
        if k in n and n[k].requires_grad:
            assert torch.equal(r[k], n[k]), k
        else:
            assert r[k].dtype == w[k].dtype and torch.equal(r[k], w[k]), k
    assert stages.as_sources_hold_it(wide, profile, 1) is wide
