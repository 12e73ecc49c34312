"""A Gradio chat on an exported folder: upload or paste an image, ask, watch the answer stream, follow up.

`python -m llava_nb.demo --checkpoint DIR` serves it on http://127.0.0.1 only (no share link). Each
browser tab keeps its own `infer.Chat` in a `gr.State`, so tabs never mix conversations; the model is
shared and answers one request at a time (queue concurrency 1). Bad input (no image, a file that is
not an image, an empty question, a failed generation) becomes a message in the page.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from . import config as cfg
from . import infer, runs

HOST = "127.0.0.1"  # localhost only: the demo has no login, so it is not put on the network
MAX_NEW_TOKENS_LIMIT = 512
TEMPERATURE_LIMIT = 1.5
EXAMPLE_QUESTION = {"t4": infer.TUTORIAL_QUESTION, "offline": "What colour is the largest shape?"}

# What the page says about bad input (tests match on these).
NO_IMAGE = "**No image yet.** Upload or paste an image on the left, then ask again."
EMPTY_QUESTION = "**The question is empty.** Type a question about the image, then press Enter or *Ask*."
UNREADABLE_IMAGE = "**That file is not an image I can read** ({error}). Upload a PNG, JPEG or WebP picture."
GENERATION_FAILED = "**Generation failed**: {error}. The conversation is kept as it was before this question."
EMPTY_REPLY = "The model stopped at once (an empty answer): try another question, or a temperature above 0."
NEW_IMAGE = "New image: the conversation starts over."


def uploaded_path(payload: dict | None) -> str | None:
    """The file behind a `gr.Image` value that was left unprocessed (events with `preprocess=False`).

    Processed, `gr.Image` opens the file with PIL before the handler runs, and a file that is not an
    image fails inside Gradio with a bare "Error". Unopened, it reaches `infer.load_image`, whose
    message the page shows.
    """
    return (payload or {}).get("path")


def generation_kwargs(temperature: float) -> dict:
    """`generate` settings for a temperature slider: 0 is greedy, above 0 samples at that temperature."""
    return {"do_sample": True, "temperature": float(temperature)} if temperature > 0 else {}


def to_messages(chat: infer.Chat | None) -> list[dict]:
    """A chat's finished turns in the `gr.Chatbot` format."""
    if chat is None:
        return []
    return [
        m
        for q, a in chat.history()
        for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]


@dataclass
class Conversation:
    """One tab's conversation: the uploaded file it is about, and the `infer.Chat` holding its turns."""

    image: str
    chat: infer.Chat
    dropped: threading.Event = field(default_factory=threading.Event)  # Clear or a new image: stop streaming


Update = tuple[list[dict], "Conversation | None", str, str]  # (chatbot, conversation, status, textbox)


def respond(
    model,
    processor,
    image: str | None,
    question: str,
    conversation: Conversation | None,
    max_new_tokens: float,
    temperature: float,
) -> Iterator[Update]:
    """Answer `question` in this tab's conversation, yielding the page's new state as the answer streams.

    A question about a new image starts a new `Chat`; one about the same image is a follow-up.
    """
    question = (question or "").strip()
    if conversation is not None and conversation.dropped.is_set():  # Clear or a new image ended it
        conversation = None
    chat = conversation.chat if conversation is not None else None
    if not question:
        yield to_messages(chat), conversation, EMPTY_QUESTION, ""
        return
    if image is None:
        yield to_messages(chat), conversation, NO_IMAGE, question
        return
    if conversation is None or conversation.image != image:  # keyed by file: an image swap cannot mix chats
        try:
            conversation = Conversation(image, infer.Chat(model, processor, image))
        except (OSError, ValueError) as e:  # infer.load_image: not a file, or not an image PIL reads
            error = str(e).replace(str(image), Path(image).name)  # Gradio's cache path says nothing
            yield [], None, UNREADABLE_IMAGE.format(error=error), question
            return
    chat = conversation.chat
    chat.max_new_tokens = int(max_new_tokens)
    chat.generate_kwargs = generation_kwargs(temperature)
    history = to_messages(chat)
    shown = [*history, {"role": "user", "content": question}]
    yield shown, conversation, "", ""  # the question appears at once; the textbox empties
    reply, keep = "", gr.skip()  # while it streams, leave the textbox alone: a follow-up may be typed there
    try:
        with closing(chat.stream(question)) as pieces:  # closing it stops the generation
            for piece in pieces:
                if conversation.dropped.is_set():
                    break
                reply += piece
                yield [*shown, {"role": "assistant", "content": reply}], conversation, keep, keep
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: say so in the page, keep the tab usable
        yield history, conversation, GENERATION_FAILED.format(error=f"{type(e).__name__}: {e}"), question
        return
    if conversation.dropped.is_set():  # Clear or a new image emptied the page: end on the same page
        yield [], None, keep, keep
        return
    yield to_messages(chat), conversation, keep if reply else EMPTY_REPLY, keep


def forget(conversation: Conversation | None) -> tuple[None, list, str]:
    """Stop an answer being streamed and forget the conversation; returns (conversation, chatbot, status)."""
    if conversation is not None:
        conversation.dropped.set()
    return None, [], ""


def new_image(image: str | None, conversation: Conversation | None) -> tuple:
    """A new or removed image: stop answering about the old one and empty the chat."""
    if conversation is None:
        return [], ""  # no conversation yet: only clear an earlier message
    if conversation.image == image:  # the same file again
        return gr.skip(), gr.skip()
    conversation.dropped.set()
    return [], NEW_IMAGE if image else ""


def build_app(
    model,
    processor,
    *,
    checkpoint: str | Path = "",
    profile_name: str = "offline",
    max_new_tokens: int = infer.MAX_NEW_TOKENS,
) -> gr.Blocks:
    """The chat page for one (model, processor); launch it with `launch`."""
    example = EXAMPLE_QUESTION.get(profile_name, infer.TUTORIAL_QUESTION)
    where = f" · `{checkpoint}`" if checkpoint else ""
    with gr.Blocks(title="llava-on-a-budget demo", analytics_enabled=False) as app:
        gr.Markdown(
            f"## llava-on-a-budget · chat about an image\n{type(model).__name__} on "
            f"{model.device.type} ({str(model.dtype).removeprefix('torch.')}){where}"
        )
        conversation = gr.State(None)  # this tab's Conversation; None until its first question
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(
                    type="filepath", sources=["upload", "clipboard"], label="Image", elem_id="llava-image"
                )
                max_tokens = gr.Slider(
                    1,
                    MAX_NEW_TOKENS_LIMIT,
                    value=max_new_tokens,
                    step=1,
                    label="Max new tokens",
                    elem_id="llava-max-new-tokens",
                )
                temperature = gr.Slider(
                    0.0,
                    TEMPERATURE_LIMIT,
                    value=0.0,
                    step=0.05,
                    label="Temperature (0: greedy)",
                    elem_id="llava-temperature",
                )
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Conversation", height=420, buttons=["copy_all"], elem_id="llava-chat"
                )
                status = gr.Markdown(elem_id="llava-status")
                question = gr.Textbox(
                    label="Question", placeholder=f"e.g. {example}", elem_id="llava-question"
                )
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="llava-ask")
                    clear = gr.Button("Clear", elem_id="llava-clear")

        def answer(image, text, current, n, t):
            yield from respond(model, processor, uploaded_path(image), text, current, n, t)

        # preprocess=False: the handlers get the image unopened (see uploaded_path)
        gr.on(
            [ask.click, question.submit],
            answer,
            [image, question, conversation, max_tokens, temperature],
            [chatbot, conversation, status, question],
            preprocess=False,
            concurrency_limit=1,
            concurrency_id="model",
        )
        image.change(
            lambda new, current: new_image(uploaded_path(new), current),
            [image, conversation],
            [chatbot, status],
            preprocess=False,
        )
        clear.click(
            lambda current: (None, "", *forget(current)),
            conversation,
            [image, question, conversation, chatbot, status],
        )  # start over
        chatbot.clear(forget, conversation, [conversation, chatbot, status])  # its bin: same image, new chat
    return app


def launch(
    app: gr.Blocks, port: int | None = None, *, inline: bool | None = None, block: bool = True
) -> gr.Blocks:
    """Serve `app` on 127.0.0.1 (`port` None: Gradio's first free port from 7860), one request at a time.

    `inline` shows it in the notebook (in Colab through Colab's port proxy); `block=False` returns at once.
    """
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=HOST,
        server_port=port,
        share=False,
        inline=inline,
        prevent_thread_lock=not block,
        show_error=True,
    )
    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llava_nb.demo",
        description="A Gradio chat with an exported LLaVA folder, served on http://127.0.0.1 only.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="an exported folder (notebooks/05_training.ipynb or `python -m llava_nb.train`)",
    )
    parser.add_argument("--port", type=int, default=None, help="default: the first free port from 7860")
    parser.add_argument(
        "--profile",
        choices=sorted(cfg.PROFILES),
        default=None,
        help=f"for the example question and hints; default: ${cfg.PROFILE_ENV}, else 't4'",
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=infer.MAX_NEW_TOKENS,
        help=f"the slider's starting value (default: {infer.MAX_NEW_TOKENS})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, block: bool = True) -> gr.Blocks:
    """Load the export and serve the demo; a folder that is not an export exits with status 2 and says why.

    `block=False` (tests) returns the running app instead of serving until Ctrl+C.
    """
    args = parse_args(argv)
    profile_name = args.profile or cfg.pick_profile_name("t4")
    problem = runs.checkpoint_problem(args.checkpoint, profile_name)
    if problem:  # checked before Gradio starts: a page that can only show this error helps nobody
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    try:
        model, processor = infer.load(args.checkpoint, args.device, profile_name=profile_name)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign model.safetensors, a bad device name
        print(f"error: could not load {args.checkpoint}: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    app = build_app(
        model,
        processor,
        checkpoint=args.checkpoint,
        profile_name=profile_name,
        max_new_tokens=args.max_new_tokens,
    )
    try:
        return launch(app, args.port, inline=False, block=block)
    except (
        OSError
    ) as e:  # Gradio: "Cannot find empty port in range: 7860-7860. You can specify ... launch()."
        print(
            f"error: cannot serve on {HOST}: {str(e).split('. ')[0]}; choose a free port with --port",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
