"""The training loss with LM-head logits only where labels are equals the model's own loss, and so do its
gradients on the projector."""

import itertools

import pytest
import torch
from transformers import TrainingArguments

from llava_nb import data, sources, streams, trainer


@pytest.fixture(scope="module")
def batch(built, profile):
    _, processor = built
    collator = data.LlavaCollator(processor, max_length=profile.data.max_length)
    source = sources.prepare_dataset(profile)
    return collator(list(itertools.islice(streams.stream(source, "train", shuffle_buffer=0), 3)))


def trainers(model, tmp_path) -> tuple[trainer.LlavaTrainer, trainer.LlavaTrainer]:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return (trainer.LlavaTrainer(model=model, args=args, fast_loss=True),
            trainer.LlavaTrainer(model=model, args=args, fast_loss=False))


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
