"""Chat with an exported LLaVA folder: images from URLs, paths or PIL, streamed tokens, batches, follow-ups.

Everything here works on a (model, processor) pair as plain transformers loads it; nothing is kept in
module globals, so two `Chat` objects (two browser tabs of a demo) never share a conversation.
"""

from __future__ import annotations

import io
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from queue import Queue

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from . import config as cfg
from .data import to_rgb
from .device import default_device, default_dtype
from .runs import checkpoint_problem

ImageInput = str | Path | Image.Image  # an http(s) URL, a local path, or a PIL image
MONA_LISA_URL, TUTORIAL_QUESTION = cfg.MONA_LISA_URL, cfg.TUTORIAL_QUESTION  # the tutorial's example
MAX_NEW_TOKENS = 64
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte fallback (Llama, TinyLlama)
URL_TIMEOUT_S = 20.0
# Hosts such as Wikimedia refuse requests without a descriptive User-Agent.
USER_AGENT = "llava-on-a-budget/0.1 (educational notebook; python-urllib)"


# ------------------------------------------------------------------------------------- loading


def load(
    folder: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    profile_name: str = "offline",
):
    """(model, processor) from an exported folder with plain transformers, in eval mode on `device`.

    A missing or incomplete folder is a FileNotFoundError that names the notebook and command making one.
    """
    problem = checkpoint_problem(folder, profile_name)
    if problem:
        raise FileNotFoundError(problem)
    device = torch.device(device) if device is not None else default_device()
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype or default_dtype(device))
    # AutoProcessor builds LlavaProcessor + CLIPImageProcessor from processor_config.json. Unlike
    # AutoImageProcessor it needs no torchvision on transformers 5.15 (Colab's pin): without torchvision
    # it picks the PIL backend (checked on 5.15.0 and 5.24.0).
    processor = AutoProcessor.from_pretrained(folder)
    return model.to(device).eval(), processor


# -------------------------------------------------------------------------------------- images


def load_image(image: ImageInput, timeout: float = URL_TIMEOUT_S) -> Image.Image:
    """An RGB PIL image from a PIL image, a local path, or an http(s) URL (fetched with a timeout)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    text = str(image)
    if text.startswith(("http://", "https://")):
        return to_rgb(_fetch(text, timeout))
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image {text!r} is neither an existing file nor an http(s) URL")
    try:
        with Image.open(path) as opened:
            opened.load()
            return to_rgb(opened)
    except Exception as e:  # PIL raises many types for broken files
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _fetch(url: str, timeout: float) -> Image.Image:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise ConnectionError(
            f"could not download image {url} within {timeout:.0f} s ({e}); check the "
            "address and the network, or pass a local path or a PIL image instead"
        ) from e
    try:
        opened = Image.open(io.BytesIO(payload))
        opened.load()
        return opened
    except Exception as e:
        raise ValueError(f"{url} did not return an image ({len(payload)} bytes: {payload[:60]!r}...)") from e


# ---------------------------------------------------------------------------------- generation


def user_turn(question: str, with_image: bool = True) -> dict:
    """A user message in llava-instruct-mix-vsft's schema, the image (if any) before the text."""
    content = [{"type": "image"}] if with_image else []
    return {"role": "user", "content": content + [{"type": "text", "text": question}]}


def assistant_turn(answer: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


def encode(
    processor, conversations: Sequence[list[dict]], images: Sequence[Sequence[Image.Image]], model=None
):
    """Left-padded model inputs for conversations that end with a user turn (one image list each).

    The prompt goes through the processor exactly as the training collator's does (the chat template
    rendered to text, then tokenised with the images), ending in `ASSISTANT:`.
    """
    prompts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    flat = [im for ims in images for im in ims]
    # padding_side per call, not on the tokenizer: the processor may be shared (the demo, the collator)
    inputs = processor(
        text=prompts, images=flat or None, padding=True, padding_side="left", return_tensors="pt"
    )
    if model is not None:
        inputs = inputs.to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def _generate_kwargs(processor, max_new_tokens: int, kwargs: dict) -> dict:
    # Greedy unless told otherwise; the sampling knobs are cleared so a generation_config that sets
    # them does not warn on every call.
    out = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "pad_token_id": processor.tokenizer.pad_token_id,
    }
    out.update(kwargs)
    return out


@torch.inference_mode()
def generate_ids(model, processor, inputs, max_new_tokens: int = MAX_NEW_TOKENS, **kwargs) -> torch.Tensor:
    """`model.generate` on encoded inputs with this project's defaults (greedy, the KV cache, the pad token):
    the prompt's ids followed by the new ones."""
    return model.generate(**inputs, **_generate_kwargs(processor, max_new_tokens, kwargs))


@torch.inference_mode()
def generate(
    model,
    processor,
    conversations: Sequence[list[dict]],
    images: Sequence[Sequence[Image.Image]],
    max_new_tokens: int = MAX_NEW_TOKENS,
    **kwargs,
) -> list[str]:
    """Replies to a batch of conversations in one `generate` call (greedy by default), stripped."""
    inputs = encode(processor, conversations, images, model)
    out = generate_ids(model, processor, inputs, max_new_tokens, **kwargs)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]  # left padding: every prompt ends at the same column
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def answer(
    model, processor, image: ImageInput | None, question: str, max_new_tokens: int = MAX_NEW_TOKENS, **kwargs
) -> str:
    """One question about one image (or none); the reply as text."""
    return answer_batch(model, processor, [image], [question], max_new_tokens, **kwargs)[0]


def answer_batch(
    model,
    processor,
    images: Sequence[ImageInput | None],
    questions: Sequence[str] | str,
    max_new_tokens: int = MAX_NEW_TOKENS,
    **kwargs,
) -> list[str]:
    """One question per image (or the same question for all), answered in one left-padded batch."""
    if isinstance(questions, str):
        questions = [questions] * len(images)
    if len(questions) != len(images):
        raise ValueError(
            f"{len(images)} images but {len(questions)} questions: give one question per image, "
            "or a single string for all"
        )
    loaded = [[load_image(im)] if im is not None else [] for im in images]
    conversations = [[user_turn(q, bool(ims))] for q, ims in zip(questions, loaded)]
    return generate(model, processor, conversations, loaded, max_new_tokens, **kwargs)


class _StopWhenSet(StoppingCriteria):
    """Ends a generation early once `event` is set (a closed stream, a demo's Stop button)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _TokenQueue(BaseStreamer):
    """Receives generated token ids from `generate` (prompt first, then one step at a time) into a queue."""

    def __init__(self, timeout: float | None):
        self.queue: Queue = Queue()
        self.timeout = timeout
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate's first call hands over the prompt
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist(), timeout=self.timeout)

    def end(self) -> None:
        self.queue.put(None, timeout=self.timeout)

    def __iter__(self) -> Iterator[list[int]]:
        while (ids := self.queue.get(timeout=self.timeout)) is not None:
            yield ids


def stream(
    model,
    processor,
    conversation: list[dict],
    images: Sequence[Image.Image],
    max_new_tokens: int = MAX_NEW_TOKENS,
    timeout: float | None = 300.0,
    **kwargs,
) -> Iterator[str]:
    """Yield the reply to one conversation in pieces as they are generated.

    The pieces join to exactly what `generate` returns for the same call (leading and trailing
    whitespace dropped): the reply so far is decoded whole at every step and only text that no later
    token can change is yielded (not trailing whitespace, not a character still waiting for the rest of
    its bytes, as SentencePiece's byte fallback spells emoji). Closing the iterator early stops the
    generation.
    """
    inputs = encode(processor, [conversation], [images], model)
    tokens = _TokenQueue(timeout)
    stop = threading.Event()
    failure: list[BaseException] = []
    gen_kwargs = _generate_kwargs(processor, max_new_tokens, kwargs)
    gen_kwargs["stopping_criteria"] = StoppingCriteriaList(
        [*kwargs.get("stopping_criteria", []), _StopWhenSet(stop)]
    )

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(**inputs, **gen_kwargs, streamer=tokens)
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread below
            failure.append(e)
            tokens.end()  # unblock the reader; it re-raises

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ids: list[int] = []
    sent = ""
    try:
        for new in tokens:
            ids += new
            # A run of byte tokens (<0xE2><0x82>...) decodes as one group, valid UTF-8 or all U+FFFD: it is
            # settled only once a token that is not a byte follows.
            settled = len(ids)
            while settled and BYTE_TOKEN.fullmatch(
                processor.tokenizer.convert_ids_to_tokens(ids[settled - 1])
            ):
                settled -= 1
            stable = processor.tokenizer.decode(ids[:settled], skip_special_tokens=True).strip()
            if len(stable) > len(sent) and stable.startswith(sent):
                yield stable[len(sent) :]
                sent = stable
        rest = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        if rest.startswith(sent) and len(rest) > len(sent):
            yield rest[len(sent) :]
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]


# ------------------------------------------------------------------------------------ the chat


class Chat:
    """One conversation about one image: its messages, its image, and follow-up questions.

    `ask` returns the reply; `stream` yields it in pieces. A reply joins the history only once it is
    complete, so an interrupted stream leaves the conversation as it was.
    """

    def __init__(
        self,
        model,
        processor,
        image: ImageInput | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        **generate_kwargs,
    ):
        self.model, self.processor = model, processor
        self.image = load_image(image) if image is not None else None
        self.messages: list[dict] = []
        self.max_new_tokens = max_new_tokens
        self.generate_kwargs = generate_kwargs

    def _prompt(self, question: str) -> list[dict]:
        first = not self.messages  # the image goes with the first question, as in training
        return [*self.messages, user_turn(question, with_image=first and self.image is not None)]

    @property
    def images(self) -> list[Image.Image]:
        return [self.image] if self.image is not None else []

    def ask(self, question: str) -> str:
        """The reply to `question`, given the image and every earlier turn."""
        prompt = self._prompt(question)
        reply = generate(
            self.model, self.processor, [prompt], [self.images], self.max_new_tokens, **self.generate_kwargs
        )[0]
        self.messages = [*prompt, assistant_turn(reply)]
        return reply

    def stream(self, question: str) -> Iterator[str]:
        """Like `ask`, yielding the reply in pieces as they are generated."""
        prompt = self._prompt(question)
        pieces = []
        for piece in stream(
            self.model, self.processor, prompt, self.images, self.max_new_tokens, **self.generate_kwargs
        ):
            pieces.append(piece)
            yield piece
        self.messages = [*prompt, assistant_turn("".join(pieces))]

    def history(self) -> list[tuple[str, str]]:
        """(question, reply) pairs so far."""
        texts = [
            " ".join(item["text"] for item in m["content"] if item["type"] == "text") for m in self.messages
        ]
        return list(zip(texts[0::2], texts[1::2]))
