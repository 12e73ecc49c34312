"""Special tokens, the LLaVA chat template and a LlavaProcessor whose image-token count is right."""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer, LlavaConfig, LlavaProcessor, PreTrainedModel
from transformers.utils import is_torchvision_available
from transformers.utils import logging as hf_logging

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)

# LLaVA v1 conversation format: "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>".
# Content is a string or a list of {"type": "image"|"text", "text": ...} items (llava-instruct-mix-vsft).
# The reply's leading space sits inside {% generation %}: a prompt ending in "ASSISTANT:" then asks the
# model for " Red" exactly as training showed it. The generation markers let transformers return the
# assistant mask (`return_assistant_tokens_mask=True`): the reply and its end-of-turn token.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + SYSTEM_PROMPT.replace("'", "\\'") + "') -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- set items = [{'type': 'text', 'text': message['content']}] if message['content'] is string "
    "else message['content'] -%}"
    "{%- set ns.text = '' -%}"
    "{%- for item in items -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>' -%}"
    "{%- elif item['type'] == 'text' and item['text'] -%}"
    "{%- if ns.text.endswith('<image>') and not item['text'].startswith('\n') -%}"
    "{%- set ns.text = ns.text + '\n' -%}{%- endif -%}"
    "{%- set ns.text = ns.text + item['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + ns.text + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT:' -}}{%- generation -%}{{- ' ' + ns.text + eos_token -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def template_lines(template: str = CHAT_TEMPLATE) -> str:
    """A one-line Jinja chat template laid out to read: a tag a line, indented by nesting, newlines as \\n."""
    lines, depth = [], 0
    for piece in re.split(r"(\{[%{].*?[%}]\})", template.replace("\n", "\\n")):
        word = re.match(r"\{%-?\s*(\w*)", piece)[1] if piece.startswith("{%") else ""
        depth -= word.startswith("end")
        if piece:  # a tag, or literal text between tags
            lines.append("    " * (depth - (word in ("else", "elif"))) + piece)
        depth += word in ("for", "if", "generation")
    return "\n".join(lines)


def add_special_tokens(tokenizer) -> list[str]:
    """Add `<image>` and a pad token only where the tokenizer lacks them; returns what was added.

    A pad token equal to the end-of-turn token gets its own `<pad>`: the collator supervises the
    end-of-turn token, so padding must be told apart from it.
    """
    added = []
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        added.append(IMAGE_TOKEN)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(PAD_TOKEN)
    tokenizer.chat_template = CHAT_TEMPLATE
    return added


def resize_embeddings(model: PreTrainedModel, tokenizer) -> None:
    """Grow the embeddings to the tokenizer (rows padded to a multiple of 64, new rows at the mean of
    the old ones, as transformers does) and keep the config's special-token ids in step."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        frozen = not model.get_input_embeddings().weight.requires_grad
        # mean_resizing is chosen, so transformers' note on it (a warning) says nothing a user can act on
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        if frozen:  # resizing makes fresh, trainable tensors
            model.get_input_embeddings().requires_grad_(False)
            model.get_output_embeddings().requires_grad_(False)
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for c in (model.config, model.config.text_config, model.generation_config):
        c.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id


def build_processor(tokenizer, image_processor, config: LlavaConfig) -> LlavaProcessor:
    """A LlavaProcessor writing as many `<image>` tokens as the vision tower yields features.

    CLIP prepends a CLS token (`num_additional_image_tokens=1`) and the 'default' strategy drops it
    again: 7 x 7 = 49 tokens for B/32 at 224 px. Without the +1, transformers writes 48 and the
    forward pass fails with "Image features and image tokens do not match".
    """
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        patch_size=config.vision_config.patch_size,
        num_additional_image_tokens=1,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=IMAGE_TOKEN,
    )


def load_processor(vision_dir: str | Path, lm_dir: str | Path, config: LlavaConfig) -> LlavaProcessor:
    """Tokenizer from the LM folder (with our special tokens), image processor from the CLIP folder."""
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    add_special_tokens(tokenizer)
    return build_processor(tokenizer, image_processor_class().from_pretrained(vision_dir), config)


def image_processor_class() -> type:
    """CLIP's image processor for this machine: the torchvision one where torchvision is installed (Colab),
    else the PIL one. Named explicitly: transformers 5.15 gates AutoImageProcessor behind torchvision, and
    asking for `CLIPImageProcessor` without it prints a fallback warning a user cannot act on. Both save
    the same `preprocessor_config.json` (`CLIPImageProcessor`), which either loads."""
    if is_torchvision_available():
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil


def image_tokens_per_image(processor: LlavaProcessor) -> int:
    """How many `<image>` tokens the processor writes for one image."""
    crop = processor.image_processor.crop_size
    n = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    n += processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


def special_prefix(tokenizer) -> list[int]:
    """The ids a tokenizer puts before any text of its own accord: `[bos]` for Llama's (TinyLlama),
    none for GPT-2-style BPE (SmolLM2). Inference tokenises prompts with them (`processor(text=...)`),
    so training must start every sequence with the same ids."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    raise ValueError(
        f"cannot tell which special tokens {type(tokenizer).__name__} adds: 'x' is {plain} "
        f"without them and {full} with them"
    )


def assistant_spans(tokenizer, input_ids, mask) -> list[str]:
    """Decode each run of consecutive masked tokens (1/True in `mask`): what the loss will see."""
    ids, keep = [int(i) for i in input_ids], [bool(m) for m in mask]
    spans, run = [], []
    for token, on in zip(ids + [None], keep + [False]):  # a trailing False closes the last run
        if on:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans
