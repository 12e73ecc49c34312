"""The training loss with LM-head logits only where labels are equals the model's own loss."""

import itertools

import torch
from transformers import TrainingArguments

from llava_nb import data, sources, train


def test_fast_loss_equals_model_loss(built, profile, tmp_path):
    model, processor = built
    collator = data.LlavaCollator(processor, max_length=profile.data.max_length)
    source = sources.prepare_dataset(profile)
    batch = collator(list(itertools.islice(data.stream(source, "train", shuffle_buffer=0), 3)))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    fast = train.LlavaTrainer(model=model, args=args, fast_loss=True)
    slow = train.LlavaTrainer(model=model, args=args, fast_loss=False)
    with torch.no_grad():
        a = fast.compute_loss(model, dict(batch))
        b = slow.compute_loss(model, dict(batch))
        n = int((batch["labels"] != data.IGNORE_INDEX).sum())  # with a token count, as Trainer passes it
        c = fast.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n))
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    assert torch.allclose(c, b, atol=1e-5), (c, b)
