"""Special tokens, the chat template, and image tokens that match the vision tower's features."""

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoTokenizer

from llava_nb import data, processing

SYSTEM = processing.SYSTEM_PROMPT
Q1 = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}
]
A1 = [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]
Q2 = [{"role": "user", "content": [{"type": "text", "text": "How many circles are there?"}]}]
A2 = [{"role": "assistant", "content": [{"type": "text", "text": "One."}]}]


@pytest.fixture
def tokenizer(backbones):
    """A fresh tokenizer of the profile's language model, as shipped (pad == eos: SmolLM2 <|im_end|>,
    TinyLlama </s>)."""
    return AutoTokenizer.from_pretrained(backbones.lm_dir)


@pytest.fixture(scope="module")
def image():
    img = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(img).ellipse((110, 70, 210, 170), fill="red")
    return img


def test_special_tokens_are_appended_once_and_pad_is_not_eos(tokenizer):
    n = len(tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert processing.add_special_tokens(tokenizer) == ["<image>", "<pad>"]
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [n, n + 1]
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer("a <image>\nb", add_special_tokens=False).input_ids.count(n) == 1  # one token
    assert processing.add_special_tokens(tokenizer) == [] and len(tokenizer) == n + 2  # idempotent


def test_special_token_ids_come_from_the_tokenizer(tokenizer):
    tokenizer.add_tokens(["<extra>"])  # shifts every later id: nothing may assume 49152
    n = len(tokenizer)
    processing.add_special_tokens(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<image>") == n


def test_an_existing_distinct_pad_token_is_kept(tokenizer):
    tokenizer.pad_token = tokenizer.unk_token  # <|endoftext|>, not the end-of-turn token
    pad = tokenizer.pad_token_id
    assert processing.add_special_tokens(tokenizer) == ["<image>"]
    assert tokenizer.pad_token_id == pad


def test_model_config_uses_the_tokenizers_ids(built):
    model, processor = built
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tok.pad_token_id
    rows = model.get_input_embeddings().num_embeddings
    assert rows % 64 == 0 and len(tok) <= rows < len(tok) + 64
    assert model.config.text_config.vocab_size == rows


@pytest.mark.parametrize(
    "messages, generation_prompt, expected",
    [
        (Q1 + A1, False, f"{SYSTEM} USER: <image>\nWhat colour is the circle? ASSISTANT: Red.<eos>"),
        (Q1, True, f"{SYSTEM} USER: <image>\nWhat colour is the circle? ASSISTANT:"),
        (
            Q1 + A1 + Q2 + A2,
            False,
            f"{SYSTEM} USER: <image>\nWhat colour is the circle? ASSISTANT: Red.<eos>"
            "USER: How many circles are there? ASSISTANT: One.<eos>",
        ),
        (
            Q1 + A1 + Q2,
            True,
            f"{SYSTEM} USER: <image>\nWhat colour is the circle? ASSISTANT: Red.<eos>"
            "USER: How many circles are there? ASSISTANT:",
        ),
        (
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            True,
            "Be brief. USER: Hi ASSISTANT:",
        ),
    ],
    ids=["one-turn", "one-turn-prompt", "multi-turn", "multi-turn-prompt", "system-and-plain-strings"],
)
def test_chat_template_renders_exactly(built, messages, generation_prompt, expected):
    _, processor = built
    expected = expected.replace("<eos>", processor.tokenizer.eos_token)  # SmolLM2 <|im_end|>, TinyLlama </s>
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert text == expected
    assert (
        processor.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        == expected
    )


def test_processor_writes_one_token_per_image_feature(built, image):
    model, processor = built
    assert processing.image_tokens_per_image(processor) == model.config.image_seq_length == 49  # 7 x 7
    prompt = processor.apply_chat_template(Q1, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 49
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 224, 224)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        logits = model(**inputs).logits
    assert tuple(features[0].shape) == (49, model.config.text_config.hidden_size)
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def test_assistant_mask_covers_exactly_the_replies(built, image):
    _, processor = built
    eos = processor.tokenizer.eos_token
    encoded = data.LlavaCollator(processor, max_length=512).encode(
        {"messages": Q1 + A1 + Q2 + A2, "images": [image]}
    )
    ids, mask = encoded["input_ids"], encoded["labels"] != data.IGNORE_INDEX
    spans = processing.assistant_spans(processor.tokenizer, ids, mask)
    assert [s.strip() for s in spans] == [f"Red.{eos}", f"One.{eos}"]
    image_positions = ids == processor.image_token_id
    assert int(image_positions.sum()) == 49 and not mask[image_positions].any()


def test_three_turn_labels_are_the_three_replies_and_their_end_tokens(built, image):
    _, processor = built
    tok = processor.tokenizer
    q3 = [{"role": "user", "content": [{"type": "text", "text": "Is it on the left?"}]}]
    a3 = [{"role": "assistant", "content": [{"type": "text", "text": "Yes, on the left side."}]}]
    encoded = data.LlavaCollator(processor, max_length=512).encode(
        {"messages": Q1 + A1 + Q2 + A2 + q3 + a3, "images": [image]}
    )
    ids, mask = encoded["input_ids"], encoded["labels"] != data.IGNORE_INDEX
    spans = processing.assistant_spans(tok, ids, mask)
    assert [s.strip() for s in spans] == [
        f"Red.{tok.eos_token}",
        f"One.{tok.eos_token}",
        f"Yes, on the left side.{tok.eos_token}",
    ]
    assert int((ids == tok.eos_token_id).sum()) == 3 and mask[ids == tok.eos_token_id].all()


def test_a_sequence_starts_with_the_tokenizers_own_prefix_exactly_once(built, image):
    """TinyLlama's tokenizer adds <s> to text, SmolLM2's adds nothing: training sequences follow suit."""
    _, processor = built
    tok = processor.tokenizer
    prefix = processing.special_prefix(tok)
    assert (
        prefix
        == tok("x").input_ids[: len(tok("x").input_ids) - len(tok("x", add_special_tokens=False).input_ids)]
    )
    ids = data.LlavaCollator(processor, max_length=512).encode({"messages": Q1 + A1, "images": [image]})[
        "input_ids"
    ]
    assert ids[: len(prefix)].tolist() == prefix
    if tok.bos_token_id is not None and prefix == [tok.bos_token_id]:
        assert int((ids == tok.bos_token_id).sum()) == 1


def test_assistant_spans_splits_runs(tokenizer):
    ids = tokenizer("a b c d e", add_special_tokens=False).input_ids
    spans = processing.assistant_spans(tokenizer, ids, [0, 1, 1, 0, 1])
    assert [s.strip() for s in spans] == ["b c", "e"]  # SentencePiece decodes a run without its leading space
    assert processing.assistant_spans(tokenizer, ids, [0] * 5) == []


def test_template_lines_lays_out_the_template_without_changing_it():
    lines = processing.template_lines().splitlines()
    assert "".join(line.strip() for line in lines).replace("\\n", "\n") == processing.CHAT_TEMPLATE
    assert lines[-1] == "{%- endif -%}" and "        {%- generation -%}" in lines  # nesting shows as indent
    assert processing.template_lines("A {% if x %}{{ x }}{% endif %}").splitlines() == [
        "A ",
        "{% if x %}",
        "    {{ x }}",
        "{% endif %}",
    ]
