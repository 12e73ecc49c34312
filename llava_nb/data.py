"""Samples of llava-instruct-mix-vsft: checked and cleaned one by one, and the assistant-only collator.

Bad samples are dropped where they are found and counted by reason in a `collections.Counter`:
`clean_sample` rejects what can be judged from the sample alone (malformed messages, undecodable images,
`<image>` placeholders that do not match the images, empty replies), so a batch never arrives empty
because the data is dirty; the collator drops what depends on the tokenizer and `max_length`.
The streams that yield these samples are in `streams.py`.
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter

import torch
from PIL import Image

from .processing import IMAGE_TOKEN, image_tokens_per_image, special_prefix

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # what LlavaForConditionalGeneration's loss skips


class SkipSample(Exception):
    """A sample that cannot be trained on; `reason` is the short key it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def note_skip(skipped: Counter, error: SkipSample) -> None:
    """Count a skipped sample; warn at its reason's 1st, 10th, 100th... occurrence so logs stay short."""
    skipped[error.reason] += 1
    n = skipped[error.reason]
    if math.log10(n).is_integer():
        log.warning("skipped a sample (%s so far for this reason): %s", n, error)


# -------------------------------------------------------------------------------- sample checking


def clean_sample(sample: dict) -> dict:
    """The sample with its images decoded to RGB, or SkipSample naming what is wrong with it."""
    messages = sample.get("messages")
    _check_messages(messages)
    images = sample.get("images") or []
    if not isinstance(images, list):
        raise SkipSample("malformed_sample", f"'images' must be a list, got {type(images).__name__}")
    n_placeholders = count_images(messages)
    if n_placeholders != len(images):
        raise SkipSample(
            "image_count_mismatch",
            f"{n_placeholders} image placeholder(s) for {len(images)} image(s) in {_preview(messages)}",
        )
    return {"messages": messages, "images": [to_rgb(_decode(im, messages)) for im in images]}


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise SkipSample("malformed_messages", f"'messages' must be a non-empty list, got {messages!r:.80}")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        items = content if isinstance(content, list) else [content]
        if not all(
            isinstance(c, str)
            or (
                isinstance(c, dict)
                and c.get("type") in ("text", "image")
                and isinstance(c.get("text") or "", str)
            )
            for c in items
        ):
            raise SkipSample(
                "malformed_messages", f"message {i} is not a role with text or image items: {m!r:.80}"
            )
    turns = [m for m in messages if m.get("role") != "system"]
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != expected:
            raise SkipSample(
                "malformed_messages",
                f"turn {i} should come from the {expected}, got {m.get('role')!r} in {_preview(messages)}",
            )
    if not turns or turns[-1]["role"] != "assistant":
        raise SkipSample(
            "malformed_messages", f"the conversation must end with an assistant reply: {_preview(messages)}"
        )
    for m in turns[1::2]:
        if not "".join(c.get("text") or "" for c in content_items(m) if c.get("type") == "text").strip():
            raise SkipSample("empty_reply", f"an assistant reply is empty in {_preview(messages)}")


def count_images(messages: list[dict]) -> int:
    """Image placeholders in messages: `{"type": "image"}` items and `<image>` written inside a text."""
    return sum(
        item.get("type") == "image" or (item.get("text") or "").count(IMAGE_TOKEN)
        for m in messages
        for item in content_items(m)
    )


def content_items(message: dict) -> list[dict]:
    """A message's content as a list of {"type", "text"} items (a plain string becomes one text item)."""
    content = message.get("content")
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _preview(messages: list) -> str:
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), (list, str)):
            text = " ".join(c.get("text") or "" for c in content_items(m) if isinstance(c, dict))
            return f"the conversation starting {text.strip()[:60]!r}"
    return "a conversation with no user turn"


def _decode(image: object, messages: list) -> Image.Image:
    try:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, dict):  # the Image feature's storage: {"bytes": ..., "path": ...}
            image = image.get("bytes") or image.get("path")
        opened = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
        opened.load()  # decode now, so a truncated file fails here and not in the collator
        return opened
    except Exception as e:  # PIL raises many types for broken files
        raise SkipSample("undecodable_image", f"{type(e).__name__}: {e} in {_preview(messages)}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, as CLIP expects; transparent pixels become white instead of PIL's default black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


# ------------------------------------------------------------------------------------- collator


class LlavaCollator:
    """Turns raw samples into a right-padded batch for `LlavaForConditionalGeneration`.

    Labels supervise exactly the assistant replies and their end-of-turn token (the chat template's
    `{% generation %}` spans); the system prompt, user turns, image tokens and padding get
    `ignore_index`. A sample longer than `max_length` loses whole trailing turns (or, failing that, the
    end of its first reply); its image tokens are never cut, the sample is skipped instead.
    `skipped` counts dropped samples by reason; `totals` counts samples, tokens, padding,
    supervised tokens, truncated samples and replayed batches over the collator's life.
    """

    def __init__(
        self,
        processor,
        max_length: int,
        ignore_index: int = IGNORE_INDEX,
        pad_to_multiple_of: int | None = None,
    ):
        self.processor = processor
        self.max_length = max_length
        self.ignore_index = ignore_index
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = processor.tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: call processing.add_special_tokens(tokenizer)")
        self.image_tokens = image_tokens_per_image(processor)  # 49 for ViT-B/32 at 224 px
        self.prefix = special_prefix(processor.tokenizer)  # [bos] for TinyLlama, as inference tokenises
        self.skipped: Counter = Counter()
        self.totals: Counter = Counter()
        self._last_good: dict | None = None
        self._check_room()

    def _check_room(self) -> None:
        # Fail now, not after hours of skipped samples, if max_length cannot hold one image and a reply.
        probe = {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
            ],
            "images": [Image.new("RGB", (224, 224))],
        }
        _, labels, _ = self._tokenize(probe)
        first_reply = int((labels != self.ignore_index).nonzero()[0])
        if self.max_length <= first_reply:
            raise ValueError(
                f"max_length={self.max_length} cannot hold a reply: the system prompt, one "
                f"image and the turn markers take {first_reply} tokens; use a few hundred more"
            )

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        encoded = []
        for sample in samples:
            try:
                encoded.append(self.encode(sample))
            except SkipSample as e:
                note_skip(self.skipped, e)
        if not encoded:
            # A Trainer cannot step on an empty batch, and an all-ignored one gives a NaN loss.
            if self._last_good is None:
                raise ValueError(
                    f"no usable sample in the first batch (skipped: {dict(self.skipped)}); "
                    "check the data and max_length"
                )
            log.warning("every sample of a batch was skipped; repeating the last good sample")
            self.totals["replayed_batches"] += 1
            encoded = [self._last_good]
        self._last_good = encoded[-1]
        batch = self._pad(encoded)
        stats = batch_stats(batch, self.ignore_index)
        self.totals.update({k: stats[k] for k in ("samples", "tokens", "padding", "supervised")})
        return batch

    def encode(self, sample: dict) -> dict[str, torch.Tensor]:
        """One sample's input_ids, labels and pixel_values, cut to max_length; SkipSample if unusable."""
        ids, labels, pixel_values = self._tokenize(clean_sample(sample))
        if len(ids) > self.max_length:
            ids, labels = self._truncate(ids, labels, sample)
            self.totals["truncated"] += 1
        if not (labels != self.ignore_index).any():
            raise SkipSample(
                "no_supervised_tokens",
                f"no reply token left within max_length={self.max_length} in {_preview(sample['messages'])}",
            )
        return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values}

    def _tokenize(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # The tokenizer renders the template and marks the {% generation %} spans; each single
        # <image> token is then widened to the vision tower's feature count here. (The processor's own
        # apply_chat_template does both, but transformers 5.15 takes no `images` there and returns an
        # all-zero assistant mask for a multimodal chat; this path gives the same ids on 5.15 and 5.24.)
        tokenizer, images = self.processor.tokenizer, sample["images"]
        out = tokenizer.apply_chat_template(
            sample["messages"],
            chat_template=self.processor.chat_template or tokenizer.chat_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids, mask = out["input_ids"], out["assistant_masks"]
        if self.prefix and ids[: len(self.prefix)] != self.prefix:
            # The template holds no BOS: the tokenizer adds it to text (as in inference), not to a chat.
            ids, mask = self.prefix + ids, [0] * len(self.prefix) + mask
        ids = torch.tensor(ids, dtype=torch.long)
        mask = torch.tensor(mask, dtype=torch.bool)
        is_image = ids == self.processor.image_token_id
        if int(is_image.sum()) != len(images):
            raise SkipSample(
                "image_count_mismatch",
                f"{int(is_image.sum())} <image> placeholder(s) for "
                f"{len(images)} image(s) in {_preview(sample['messages'])}",
            )
        repeats = torch.where(is_image, self.image_tokens, 1)
        ids, mask = (
            ids.repeat_interleave(repeats),
            mask.repeat_interleave(repeats) & ~is_image.repeat_interleave(repeats),
        )
        labels = torch.where(mask, ids, self.ignore_index)
        pixel_values = (
            self.processor.image_processor(images, return_tensors="pt")["pixel_values"] if images else None
        )
        return ids, labels, pixel_values

    def _truncate(self, ids: torch.Tensor, labels: torch.Tensor, sample: dict) -> tuple[torch.Tensor, ...]:
        image_positions = (ids == self.processor.image_token_id).nonzero()
        keep_at_least = int(image_positions[-1]) + 1 if len(image_positions) else 0
        if keep_at_least > self.max_length:
            raise SkipSample(
                "image_truncated",
                f"its image tokens end at token {keep_at_least}, past "
                f"max_length={self.max_length}, in {_preview(sample['messages'])}",
            )
        supervised = labels != self.ignore_index
        # a reply ends where supervision stops: cutting there keeps whole turns
        turn_ends = (supervised[:-1] & ~supervised[1:]).nonzero().flatten() + 1
        fitting = [int(e) for e in turn_ends if keep_at_least <= e <= self.max_length]
        cut = max(fitting) if fitting else self.max_length
        return ids[:cut], labels[:cut]

    def _pad(self, encoded: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in encoded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(encoded), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), length), self.ignore_index, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, e in enumerate(encoded):  # right padding: training reads left to right
            n = len(e["input_ids"])
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = e["input_ids"], e["labels"], 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixel_values = [e["pixel_values"] for e in encoded if e["pixel_values"] is not None]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)  # (n_images, 3, H, W), in prompt order
        return batch


# ------------------------------------------------------------------------------ batch inspection


def batch_stats(batch: dict[str, torch.Tensor], ignore_index: int = IGNORE_INDEX) -> dict[str, float]:
    """Samples, real tokens, padding tokens, supervised tokens and the padding fraction of a batch."""
    mask = batch["attention_mask"]
    tokens = int(mask.sum())
    return {
        "samples": mask.shape[0],
        "tokens": tokens,
        "padding": mask.numel() - tokens,
        "supervised": int((batch["labels"] != ignore_index).sum()),
        "padding_fraction": 1 - tokens / mask.numel(),
    }


def show_supervised(
    batch: dict[str, torch.Tensor], tokenizer, row: int = 0, ignore_index: int = IGNORE_INDEX
) -> str:
    """Row `row` of a batch as text, what the loss sees marked: tokens whose label is not `ignore_index`
    in [[...]], each run of `<image>` or padding tokens as one marker with its count (`<image>x49`)."""
    ids = batch["input_ids"][row].tolist()
    supervised = (batch["labels"][row] != ignore_index).tolist()
    collapsed = {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN): IMAGE_TOKEN}
    collapsed |= {tokenizer.pad_token_id: tokenizer.pad_token} if tokenizer.pad_token is not None else {}
    keys = [(on, token if token in collapsed else None) for on, token in zip(supervised, ids)]
    starts = [i for i in range(len(ids)) if i == 0 or keys[i] != keys[i - 1]]  # a run per key
    parts, shown, on = [], "", False
    for start, end in zip(starts, starts[1:] + [len(ids)]):
        # decode growing prefixes, keep what is new: a run decoded alone loses SentencePiece's leading space
        text = tokenizer.decode(ids[:end])
        piece = text[len(shown) :] if text.startswith(shown) else tokenizer.decode(ids[start:end])
        shown = text
        if supervised[start] != on:
            parts.append("[[" if supervised[start] else "]]")
            on = supervised[start]
        parts.append(f"{collapsed[ids[start]]}x{end - start}" if ids[start] in collapsed else piece)
    return "".join(parts + ["]]"] * on)
