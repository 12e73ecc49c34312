"""Inference: images from paths, PIL and URLs; streaming = plain generation; batch = one by one; chats."""

import contextlib
import io
import os
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import StoppingCriteria

from llava_nb import config, infer, synthetic
from tests.hub import twins, web_proxy

TOKENS = 8  # enough for a few words; each generate call costs about a second on a CPU


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(7)
    return [synthetic.draw_scene(rng)[0] for _ in range(3)]


# ------------------------------------------------------------------------------------------ images


def test_path_and_pil_give_the_same_image_and_inputs(built, scenes, tmp_path):
    _, processor = built
    path = tmp_path / "scene.png"
    scenes[0].save(path)
    from_path, from_pil = infer.load_image(path), infer.load_image(scenes[0])
    assert from_path.mode == from_pil.mode == "RGB"
    assert np.array_equal(np.asarray(from_path), np.asarray(from_pil))
    prompt = [[infer.user_turn("What colour is the circle?")]]
    a = infer.encode(processor, prompt, [[from_path]])
    b = infer.encode(processor, prompt, [[infer.load_image(str(path))]])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert infer.load_image(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_missing_and_broken_files_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file nor an http"):
        infer.load_image(tmp_path / "nope.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read image"):
        infer.load_image(tmp_path / "broken.jpg")


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_url_is_fetched_with_a_timeout_and_errors_are_clear(monkeypatch, scenes):
    """No network: urlopen is replaced, so only our handling of its answers is tested."""
    png = io.BytesIO()
    scenes[0].save(png, format="PNG")
    seen = {}

    def fake_urlopen(request, timeout):
        seen.update(url=request.full_url, timeout=timeout, agent=request.get_header("User-agent"))
        return _Response(png.getvalue())

    monkeypatch.setattr(infer.urllib.request, "urlopen", fake_urlopen)
    image = infer.load_image("https://example.org/scene.png", timeout=3)
    assert np.array_equal(np.asarray(image), np.asarray(scenes[0]))
    assert seen == {"url": "https://example.org/scene.png", "timeout": 3, "agent": infer.USER_AGENT}

    monkeypatch.setattr(infer.urllib.request, "urlopen", lambda request, timeout: _Response(b"<html>"))
    with pytest.raises(ValueError, match="did not return an image"):
        infer.load_image("https://example.org/page")

    def unreachable(request, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(infer.urllib.request, "urlopen", unreachable)
    with pytest.raises(
        ConnectionError, match="could not download image https://example.org/x.jpg within 20 s"
    ):
        infer.load_image("https://example.org/x.jpg")


@pytest.fixture
def proxied(monkeypatch):
    """The t4 session's web proxy (conftest); on other legs one started here the same way. Yields the
    folder it serves. urllib's default opener reads the proxy variables when built: rebuilt either way."""
    root = twins.write_twins() / "web"
    with contextlib.ExitStack() as stack:
        if not os.environ.get("https_proxy"):
            proxy = stack.enter_context(web_proxy.serve(root))
            for name, value in proxy.environ().items():
                monkeypatch.setenv(name, value)
        urllib.request.install_opener(None)
        stack.callback(urllib.request.install_opener, None)
        yield root


def test_web_images_come_through_a_proxy_as_a_users_would(proxied, monkeypatch):
    """The real fetch (urllib, its proxy tunnel and certificate check) of the tutorial's URL, unchanged:
    the t4 session's proxy answers with the Mona Lisa's stand-in; an unknown host is refused, not fetched."""
    image = infer.load_image(config.MONA_LISA_URL)
    with Image.open(proxied / "llava-vl.github.io" / "static" / "images" / "monalisa.jpg") as twin:
        assert np.array_equal(np.asarray(image), np.asarray(twin.convert("RGB")))
    with pytest.raises(ConnectionError, match="https://example.org/x.jpg .*502"):
        infer.load_image("https://example.org/x.jpg", timeout=5)
    with pytest.raises(ConnectionError, match="404"):
        infer.load_image("https://llava-vl.github.io/static/images/nothing.jpg", timeout=5)
    monkeypatch.delenv("SSL_CERT_FILE")  # the certificate is really checked: without the CA, no image
    with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        infer.load_image(config.MONA_LISA_URL, timeout=5)


# -------------------------------------------------------------------------------------- generation


def test_streamed_pieces_join_to_the_plain_answer(built, scenes):
    model, processor = built
    question = "Describe the image briefly."
    plain = infer.answer(model, processor, scenes[0], question, max_new_tokens=TOKENS)
    pieces = list(
        infer.stream(model, processor, [infer.user_turn(question)], [scenes[0]], max_new_tokens=TOKENS)
    )
    assert len(pieces) > 1  # it did stream
    assert "".join(pieces) == plain and plain


def test_a_left_padded_batch_answers_as_one_by_one(built, scenes):
    model, processor = built
    questions = [
        "How many shapes are there?",
        "Is the red circle on the left or the right side?",
        "What colour is the square?",
    ]  # different lengths: the batch needs padding
    batch = infer.answer_batch(model, processor, scenes, questions, max_new_tokens=TOKENS)
    inputs = infer.encode(processor, [[infer.user_turn(q)] for q in questions], [[im] for im in scenes])
    assert (inputs["attention_mask"][:, 0] == 0).any() and (
        inputs["attention_mask"][:, -1] == 1
    ).all()  # left
    # fp32 sums differ in the last bits between padded and unpadded rows: compare the decoded text
    assert batch == [
        infer.answer(model, processor, im, q, max_new_tokens=TOKENS) for im, q in zip(scenes, questions)
    ]
    assert all(batch) and len(set(batch)) > 1, batch  # real, distinct answers: an empty batch would not pass


def test_answer_batch_checks_its_arguments(built, scenes):
    with pytest.raises(ValueError, match="3 images but 2 questions"):
        infer.answer_batch(*built, scenes, ["a?", "b?"])


def test_closing_a_stream_early_stops_generation(built, scenes):
    model, processor = built

    class Steps(StoppingCriteria):  # counts generation steps; never stops anything itself
        n = 0

        def __call__(self, input_ids, scores, **kwargs):
            Steps.n += 1
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    chat = infer.Chat(
        model, processor, scenes[0], max_new_tokens=200, min_new_tokens=200, stopping_criteria=[Steps()]
    )
    pieces = chat.stream("Describe the image briefly.")
    next(pieces)
    pieces.close()  # a Stop button: the generating thread ends at its next token and is joined
    steps_at_close = Steps.n
    assert 0 < steps_at_close < 50, steps_at_close  # generation stopped, long before its 200 tokens
    assert chat.messages == []  # an interrupted reply does not join the conversation


# ----------------------------------------------------------------------------------------- chats


def test_a_follow_up_sees_the_image_and_the_earlier_turn(built, scenes):
    model, processor = built
    chat = infer.Chat(model, processor, scenes[0], max_new_tokens=4)
    first = chat.ask("What colour is the circle?")
    second = "".join(chat.stream("And how many shapes are there?"))
    assert chat.history() == [
        ("What colour is the circle?", first),
        ("And how many shapes are there?", second),
    ]
    kinds = [[item["type"] for item in m["content"]] for m in chat.messages]
    assert kinds == [["image", "text"], ["text"], ["text"], ["text"]]  # the image once, in the first question
    prompt = processor.apply_chat_template(chat._prompt("Where is it?"), add_generation_prompt=True)
    assert prompt.count("<image>") == 1 and f"ASSISTANT: {first}" in prompt

    other = infer.Chat(model, processor, scenes[1], max_new_tokens=4)  # a second tab: its own conversation
    other.ask("What shape is the blue object?")
    assert len(chat.messages) == 4 and len(other.messages) == 2 and other.image is not chat.image


# ---------------------------------------------------------------------------------------- loading


def test_training_and_inference_tokenise_every_prompt_alike(built, scenes):
    """Each reply's prompt, as the collator trains on it (up to its first supervised token), is exactly what
    infer.encode gives the model for the same conversation: the same ids, BOS included where the tokenizer
    adds one, once."""
    from llava_nb import data

    _, processor = built
    conversation = [
        infer.user_turn("What colour is the circle?"),
        infer.assistant_turn("Red."),
        infer.user_turn("How many are there?", with_image=False),
        infer.assistant_turn("Two."),
        infer.user_turn("Which side?", with_image=False),
        infer.assistant_turn("The left side."),
    ]
    encoded = data.LlavaCollator(processor, max_length=512).encode(
        {"messages": conversation, "images": scenes[:1]}
    )
    ids, supervised = encoded["input_ids"], (encoded["labels"] != data.IGNORE_INDEX).int()
    starts = [int(i) + 1 for i in torch.nonzero(supervised[1:] - supervised[:-1] == 1)]
    assert len(starts) == 3
    for k, start in enumerate(starts):
        prompt = infer.encode(processor, [conversation[: 2 * k + 1]], [scenes[:1]])["input_ids"][0]
        assert prompt.tolist() == ids[:start].tolist(), (
            f"reply {k + 1}: training and inference prompts differ"
        )


def test_missing_checkpoint_names_the_notebook_and_the_command(tmp_path):
    folder = tmp_path / "stage1"
    with pytest.raises(FileNotFoundError) as e:
        infer.load(folder)
    assert "notebooks/05_training.ipynb" in str(e.value)
    assert f"python -m llava_nb.train --profile offline --stage 1 --export-dir {folder}" in str(e.value)
    (folder / "checkpoint-4").mkdir(parents=True)
    assert "is not an exported model (missing config.json" in infer.checkpoint_problem(
        folder / "checkpoint-4"
    )


def test_evaluate_command_on_a_missing_folder_exits_with_the_hint(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_nb.evaluate",
            "--checkpoint",
            str(tmp_path / "none"),
            "--profile",
            "offline",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "05_training.ipynb" in done.stderr and "python -m llava_nb.train" in done.stderr
    assert done.stdout == ""


def test_an_export_loads_with_plain_transformers(built, scenes, tmp_path):
    """save_pretrained's folder comes back through LlavaForConditionalGeneration + AutoProcessor,
    on both transformers pins, with or without torchvision."""
    model, processor = built
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert infer.checkpoint_problem(tmp_path) is None
    loaded, loaded_processor = infer.load(tmp_path, device="cpu")
    assert type(loaded_processor).__name__ == "LlavaProcessor"
    prompt = [[infer.user_turn("What colour is the circle?")]]
    a, b = infer.encode(processor, prompt, [scenes[:1]]), infer.encode(loaded_processor, prompt, [scenes[:1]])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.allclose(
        a["pixel_values"], b["pixel_values"]
    )
    with torch.inference_mode():
        assert torch.allclose(model(**a).logits, loaded(**b).logits, atol=1e-4)
