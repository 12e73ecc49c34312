"""Streams and the assistant-only collator, on the profile's tokenizer and a CLIP-B/32-shaped processor."""

import io
import json
import logging
import re
from collections import Counter

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from llava_nb import data, processing, streams, synthetic

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
N_IMAGE_TOKENS = 49  # 7 x 7 patches of 32 px at 224 px


@pytest.fixture(scope="module")
def processor(backbones):
    tokenizer = AutoTokenizer.from_pretrained(backbones.lm_dir)  # SmolLM2's or the TinyLlama twin's
    processing.add_special_tokens(tokenizer)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    config = LlavaConfig(vision_config=CLIPVisionConfig(patch_size=32).to_dict())
    return processing.build_processor(tokenizer, image_processor, config)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return synthetic.write_dataset(
        tmp_path_factory.mktemp("shapes") / "ds", seed=1, n_train=48, n_test=8, shard_size=16
    )


def chat(questions, replies, image=None, image_first=True):
    """A conversation in the hub's schema: the image with the first question, then text-only turns."""
    image = image or Image.new("RGB", (224, 224), (200, 30, 30))
    messages = []
    for i, (q, r) in enumerate(zip(questions, replies)):
        content = [{"type": "text", "text": q, "index": None}]
        if i == 0:
            item = {"type": "image", "text": None, "index": 0}
            content = [item, *content] if image_first else [*content, item]
        messages += [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": r, "index": None}]},
        ]
    return {"messages": messages, "images": [image]}


def spans(labels, tokenizer):
    """The decoded runs of supervised tokens in one row of labels, stripped (SentencePiece decodes a run
    without its leading space, GPT-2's BPE with it)."""
    return [s.strip() for s in processing.assistant_spans(tokenizer, labels, labels != -100)]


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("replies", [["Red."], ["Red.", "Circle.", "Two shapes, both on the left."]])
def test_labels_are_exactly_the_assistant_replies(processor, replies):
    tok = processor.tokenizer
    questions = ["What colour is it?", "What shape?", "How many?"][: len(replies)]
    collator = data.LlavaCollator(processor, max_length=512)
    batch = collator([chat(questions, replies), chat(["Describe the image briefly."], ["A red square."])])
    assert spans(batch["labels"][0], tok) == [f"{r}{tok.eos_token}" for r in replies]
    ids, labels, mask = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0]
    is_image = ids == processor.image_token_id
    assert int(is_image.sum()) == N_IMAGE_TOKENS and (labels[is_image] == -100).all()
    n = int(mask.sum())
    assert mask[:n].all() and not mask[n:].any()  # right padding
    assert (labels[n:] == -100).all() and (ids[n:] == tok.pad_token_id).all()
    assert (labels[:n][labels[:n] != -100] == ids[:n][labels[:n] != -100]).all()
    assert batch["pixel_values"].shape == (2, 3, 224, 224)


def test_show_supervised_marks_exactly_the_labelled_tokens(processor):
    tok = processor.tokenizer
    replies = ["Red.", "Circle.", "Two shapes, both on the left."]
    three_turns = chat(["What colour is it?", "What shape?", "How many?"], replies)
    batch = data.LlavaCollator(processor, max_length=512)(
        [three_turns, chat(["Describe it."], ["A square."])]
    )
    shown = data.show_supervised(batch, tok, row=0)
    marked = re.findall(r"\[\[(.*?)\]\]", shown, flags=re.DOTALL)
    assert (
        [m.strip() for m in marked] == spans(batch["labels"][0], tok) == [r + tok.eos_token for r in replies]
    )
    outside = re.sub(r"\[\[.*?\]\]", "", shown, flags=re.DOTALL)
    assert outside.count(f"<image>x{N_IMAGE_TOKENS}") == 1 and "USER:" in outside  # image: never marked
    # with the markers taken out and the image run written out again, the text is the row's own decoding
    n = int(batch["attention_mask"][0].sum())
    unmarked = shown.replace("[[", "").replace("]]", "")
    unmarked = unmarked.replace(f"<image>x{N_IMAGE_TOKENS}", "<image>" * N_IMAGE_TOKENS)
    assert unmarked == tok.decode(batch["input_ids"][0, :n])
    padding = int((batch["attention_mask"][1] == 0).sum())
    assert padding and data.show_supervised(batch, tok, row=1).endswith(f"{tok.pad_token}x{padding}")


def test_show_supervised_follows_the_labels_not_the_template(processor):
    tok = processor.tokenizer
    batch = data.LlavaCollator(processor, max_length=512)([chat(["What colour is it?"], ["Red."])])
    every = dict(batch, labels=batch["input_ids"].clone())  # the image included
    shown = data.show_supervised(every, tok)
    assert shown.startswith("[[") and shown.endswith("]]") and shown.count("[[") == 1
    assert f"<image>x{N_IMAGE_TOKENS}" in shown
    assert "[[" not in data.show_supervised(dict(batch, labels=torch.full_like(batch["labels"], -100)), tok)


def test_image_after_the_text_and_the_system_turn_are_not_supervised(processor):
    sample = chat(["Who wrote this book?\n"], ["Jane Austen."], image_first=False)
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief.", "index": None}]}
    sample["messages"].insert(0, system)
    batch = data.LlavaCollator(processor, max_length=512)([sample])
    assert spans(batch["labels"][0], processor.tokenizer) == [f"Jane Austen.{processor.tokenizer.eos_token}"]
    assert int((batch["input_ids"][0] == processor.image_token_id).sum()) == N_IMAGE_TOKENS


def test_bad_samples_are_skipped_with_their_reason(processor, caplog):
    good = chat(["What colour?"], ["Red."])
    broken_png = {"bytes": png_bytes(Image.new("RGB", (50, 50)))[:40], "path": None}
    bad = {
        "undecodable_image": {**good, "images": [{"bytes": b"not an image", "path": None}]},
        "image_count_mismatch": {**good, "images": [good["images"][0]] * 2},
        "malformed_messages": {**good, "messages": good["messages"][::-1]},  # assistant speaks first
        "empty_reply": chat(["What colour?"], ["  "]),
    }
    literal_placeholder = chat(["<image> What colour?"], ["Red."])  # a placeholder in the text, no 2nd image
    truncated_file = {**good, "images": [broken_png]}
    collator = data.LlavaCollator(processor, max_length=512)
    with caplog.at_level(logging.WARNING, logger="llava_nb.data"):
        batch = collator([*bad.values(), good, literal_placeholder, truncated_file, good])
    assert batch["input_ids"].shape[0] == 2
    assert collator.skipped == {
        "undecodable_image": 2,
        "image_count_mismatch": 2,
        "malformed_messages": 1,
        "empty_reply": 1,
    }
    assert all(reason in caplog.text for reason in bad)


def test_stream_drops_bad_rows_and_goes_on(tmp_path):
    rng = np.random.default_rng(0)
    good = [synthetic._encode(synthetic.make_sample(rng)) for _ in range(3)]
    rows = [
        good[0],
        {**good[1], "images": [{"bytes": b"\x89PNG garbage", "path": None}]},
        {**good[1], "images": []},
        good[2],
    ]
    table = pa.Table.from_pylist(rows, schema=synthetic.FEATURES.arrow_schema)
    pq.write_table(table, tmp_path / "train.parquet")
    skipped = Counter()
    samples = list(
        streams.stream(str(tmp_path / "train.parquet"), "train", shuffle_buffer=0, skipped=skipped)
    )
    assert [s["messages"] for s in samples] == [good[0]["messages"], good[2]["messages"]]
    assert skipped == {"undecodable_image": 1, "image_count_mismatch": 1}
    assert all(s["images"][0].mode == "RGB" for s in samples)


def test_stream_reads_jsonl_with_image_paths(tmp_path):
    Image.new("P", (40, 30)).save(tmp_path / "a.png")
    sample = chat(["What colour?"], ["Black."])
    (tmp_path / "train.jsonl").write_text(json.dumps({**sample, "images": [str(tmp_path / "a.png")]}) + "\n")
    [row] = list(streams.stream(str(tmp_path / "train.jsonl"), "train"))
    assert row["messages"] == sample["messages"] and row["images"][0].mode == "RGB"


def test_stream_reads_the_generated_folder_and_filters_turns(shapes, monkeypatch):
    # datasets pauses 5 s whenever a shuffled multi-shard parquet stream runs dry (an arrow workaround)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)  # datasets >= 5
    everything = list(streams.stream(str(shapes), "train", shuffle_buffer=0))
    single = list(streams.stream(str(shapes), "train", max_turns=1, shuffle_buffer=0))
    assert len(everything) == 48 and 0 < len(single) < 48
    assert all(len(s["messages"]) == 2 for s in single)
    shuffled = list(streams.stream(str(shapes), "train", seed=5))
    assert [s["messages"] for s in shuffled] != [s["messages"] for s in everything]
    files = list(streams.stream(str(shapes / "test-*.parquet"), "test"))
    assert len(files) == 8


def test_stream_errors_name_the_path_and_split(shapes, tmp_path):
    with pytest.raises(ValueError, match="no split 'validation'"):
        streams.stream(str(shapes), "validation")
    with pytest.raises(FileNotFoundError, match="not found"):
        streams.stream(str(tmp_path / "missing" / "train.parquet"), "train")
    with pytest.raises(FileNotFoundError, match="holds no data files"):
        streams.stream(str(tmp_path), "train")
    with pytest.raises(ValueError, match="prepare_dataset"):
        streams.stream("offline:shapes", "train")


def test_truncation_keeps_whole_turns_and_never_cuts_image_tokens(processor):
    tok = processor.tokenizer
    sample = chat(["What colour?", "What shape?", "How many?"], ["Red.", "Circle.", "Two."])
    full = data.LlavaCollator(processor, max_length=512).encode(sample)
    collator = data.LlavaCollator(processor, max_length=len(full["input_ids"]) - 3)
    batch = collator([sample])
    assert spans(batch["labels"][0], tok) == [f"Red.{tok.eos_token}", f"Circle.{tok.eos_token}"]
    assert int((batch["input_ids"][0] == processor.image_token_id).sum()) == N_IMAGE_TOKENS
    assert collator.totals["truncated"] == 1

    # the first reply does not fit whole: its beginning is kept, the image untouched
    supervised = (full["labels"] != -100).nonzero().flatten()
    first_reply_end = int(supervised[(supervised.diff() > 1).nonzero()[0]]) + 1
    short = data.LlavaCollator(processor, max_length=first_reply_end - 1).encode(sample)
    assert spans(short["labels"], tok) == ["Red."]
    assert int((short["input_ids"] == processor.image_token_id).sum()) == N_IMAGE_TOKENS

    # image tokens beyond max_length: the sample is skipped, never cut
    late_image = chat(["word " * 300], ["Red."], image_first=False)
    collator = data.LlavaCollator(processor, max_length=200)
    batch = collator([late_image, sample])
    assert collator.skipped == {"image_truncated": 1} and batch["input_ids"].shape[0] == 1
    assert int((batch["input_ids"][0] == processor.image_token_id).sum()) == N_IMAGE_TOKENS

    # a question so long that no reply token fits
    long_question = chat(["word " * 300], ["Red."])
    collator = data.LlavaCollator(processor, max_length=200)
    collator([sample, long_question])
    assert collator.skipped == {"no_supervised_tokens": 1}

    with pytest.raises(ValueError, match="cannot hold a reply"):
        data.LlavaCollator(processor, max_length=60)


def test_images_are_converted_to_rgb(processor):
    rgba = Image.new("RGBA", (64, 48), (255, 0, 0, 0))  # fully transparent: becomes white, not black
    palette = Image.new("RGB", (64, 64), (0, 0, 255)).convert("P")
    images = [
        Image.new("L", (80, 80), 128),
        rgba,
        Image.new("CMYK", (64, 64), (0, 255, 255, 0)),
        palette,
        Image.open(io.BytesIO(png_bytes(Image.new("LA", (30, 30))))),
    ]
    for image in images:
        rgb = data.to_rgb(image)
        assert rgb.mode == "RGB" and rgb.size == image.size
    assert data.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert data.to_rgb(images[2]).getpixel((0, 0)) == (255, 0, 0)
    collator = data.LlavaCollator(processor, max_length=512)
    batch = collator([chat(["Colour?"], ["Grey."], image=im) for im in images])
    assert batch["pixel_values"].shape == (len(images), 3, 224, 224)


def test_an_all_skipped_batch_repeats_the_last_good_sample(processor):
    collator = data.LlavaCollator(processor, max_length=512)
    bad = chat(["What colour?"], [""])
    with pytest.raises(ValueError, match="no usable sample in the first batch"):
        collator([bad])
    good = collator([chat(["What colour?"], ["Red."])])
    again = collator([bad, bad])
    assert all(torch.equal(good[k], again[k]) for k in good)
    assert collator.totals["replayed_batches"] == 1 and collator.skipped == {"empty_reply": 3}


def test_batch_trains_a_tiny_llava(processor, shapes):
    """The batch is what LlavaForConditionalGeneration expects: finite loss, image tokens match features."""
    tok = processor.tokenizer
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**tiny, image_size=224, patch_size=32).to_dict(),
        text_config=LlamaConfig(**tiny, vocab_size=len(tok), num_key_value_heads=2).to_dict(),
        image_token_id=processor.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    collator = data.LlavaCollator(processor, max_length=256)
    stream = iter(streams.stream(str(shapes), "train", shuffle_buffer=0, skipped=collator.skipped))
    batch = collator([next(stream) for _ in range(4)])
    torch.manual_seed(0)
    loss = LlavaForConditionalGeneration(config)(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0
    stats = data.batch_stats(batch)
    assert stats["samples"] == 4 and 0 < stats["supervised"] < stats["tokens"]
    assert 0 <= stats["padding_fraction"] < 1


def test_grouping_by_length_keeps_every_sample_and_cuts_padding(processor):
    rng = np.random.default_rng(0)
    samples = [chat([f"Question {i}?"], [" ".join(["word"] * int(rng.integers(1, 40)))]) for i in range(64)]
    grouped = list(streams.group_by_length(iter(samples), 8, window=4, seed=1))
    key = lambda s: s["messages"][0]["content"][1]["text"]  # noqa: E731
    assert sorted(map(key, grouped)) == sorted(map(key, samples))  # a reordering, nothing lost or repeated
    assert [key(s) for s in streams.group_by_length(iter(samples), 8, window=4, seed=1)] == list(
        map(key, grouped)
    )

    collate = data.LlavaCollator(processor, max_length=256)

    def padding(order):
        batches = [collate(order[i : i + 8]) for i in range(0, len(order), 8)]
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    assert padding(grouped) < padding(samples) / 2
    with pytest.raises(ValueError, match="group and window"):
        list(streams.group_by_length(iter(samples), 0))
