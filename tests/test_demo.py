"""The Gradio demo in a real browser: a system Chromium, driven by Playwright, against the app on localhost.

The browser is the first that starts of: $LLAVA_NB_CHROMIUM, Debian's /usr/bin/chromium (or another
Chromium on PATH), Playwright's own. With none, the test installs one: Debian's `chromium` with apt-get
(as root, or through sudo when it needs no password), else Playwright's download. What it tried and how
to fix it is the failure message; a missing browser or playwright is a failure, not a skip.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llava_nb import checkpoints, config, demo, infer, runs, surgery, synthetic
from tests.hub import web_proxy  # the installer reaches the network without the t4 session's proxy

CHROMIUM_ENV = "LLAVA_NB_CHROMIUM"  # a Chromium or Chrome executable to use instead of looking for one
# A trained export to run the page on instead of the untrained one; then the README's picture is taken too:
# LLAVA_NB_DEMO_EXPORT=outputs/offline/stage1 python -m pytest tests/test_demo.py
DEMO_EXPORT_ENV = "LLAVA_NB_DEMO_EXPORT"
README_PICTURE = Path(__file__).resolve().parent.parent / "docs" / "demo.png"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_TIMEOUT = 900  # seconds: apt-get fetches about 100 MB of packages
PLAYWRIGHTS_OWN = "Playwright's own Chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKENS = 12  # a few words: about a second of generation on a CPU
WAIT_MS = 120_000  # generous: the CPU is shared and slow
IDLE = re.compile(r"\bhide\b")  # the chat's status tracker is hidden when no request is running

# Every piece of the last bot message the page showed (a MutationObserver in the page).
WATCH_REPLIES = """() => {
  window.replies = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('#llava-chat [data-testid=bot]');
    if (bots.length) window.replies.push(bots[bots.length - 1].innerText.trim());
  }).observe(document.querySelector('#llava-chat'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def export_dir(backbones, tmp_path_factory):
    """$LLAVA_NB_DEMO_EXPORT, else a fresh export with the projector at init: its answers are nonsense,
    but they stream like real ones."""
    if os.environ.get(DEMO_EXPORT_ENV):
        trained = Path(os.environ[DEMO_EXPORT_ENV])
        problem = runs.checkpoint_problem(trained)
        if problem:
            pytest.fail(f"{DEMO_EXPORT_ENV}: {problem}")
        return trained
    model, processor = surgery.build(config.get_profile("offline"), backbones)  # own copy: export freezes it
    return checkpoints.export(model, processor, tmp_path_factory.mktemp("demo") / "export")


@pytest.fixture(scope="module")
def url(export_dir):
    """The demo as `python -m llava_nb.demo` starts it, on a free port, in this process."""
    with socket.socket() as s:
        s.bind((demo.HOST, 0))
        port = s.getsockname()[1]
    app = demo.main(
        [
            "--checkpoint",
            str(export_dir),
            "--port",
            str(port),
            "--profile",
            "offline",
            "--max-new-tokens",
            str(TOKENS),
        ],
        block=False,
    )
    yield f"http://{demo.HOST}:{port}/"
    app.close()


def chromium_candidates() -> list[str | None]:
    """Executables to try, best first; None stands for Playwright's own download."""
    found = [os.environ.get(CHROMIUM_ENV)] + [shutil.which(name) for name in CHROMIUM_NAMES]
    return [*dict.fromkeys(path for path in found if path), None]


def launch_chromium(playwright) -> tuple[object | None, list[str]]:
    """The first candidate that starts, and what the others said."""
    tried = []
    for path in chromium_candidates():
        try:
            return playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS), tried
        except Exception as e:  # playwright.sync_api.Error: missing, or not startable here (a snap stub)
            tried.append(f"{path or PLAYWRIGHTS_OWN}: {str(e).strip().splitlines()[0]}")
    return None, tried


def install_chromium() -> list[str]:
    """Install a Chromium: Debian's package when apt-get may run, else Playwright's. Returns a log."""
    log = []

    def run(command: list[str]) -> bool:
        print("installing a browser for the demo test:", " ".join(command), flush=True)
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
                env={**web_proxy.without(os.environ), "DEBIAN_FRONTEND": "noninteractive"},
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            log.append(f"{' '.join(command)}: {e}")
            return False
        log.append(f"{' '.join(command)}: exit status {done.returncode} {done.stderr.strip()[-300:]}".strip())
        return done.returncode == 0

    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]  # -n: fail rather than ask for a password
    if shutil.which("apt-get") and (not sudo or (shutil.which("sudo") and run([*sudo, "true"]))):
        wait = ["-o", "DPkg::Lock::Timeout=300"]  # another apt-get may be running
        run([*sudo, "apt-get", *wait, "update", "-qq"])
        if run([*sudo, "apt-get", *wait, "install", "-y", "-qq", "chromium"]):
            return log
    else:
        log.append("apt-get: not run (no apt-get, or neither root nor password-less sudo)")
    run([sys.executable, "-m", "playwright", "install", "chromium"])  # needs Playwright's download server
    return log


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -r requirements-dev.txt (it drives Chromium)")
    with sync_playwright() as p:
        browser, tried = launch_chromium(p)
        if browser is None:
            installed = install_chromium()
            browser, tried_again = launch_chromium(p)
            if browser is None:
                pytest.fail(
                    "no Chromium starts for the demo test. Tried:\n  "
                    + "\n  ".join(tried + tried_again)
                    + "\nInstalling one:\n  "
                    + "\n  ".join(installed)
                    + "\nFix: `sudo apt-get install -y chromium` (Debian), or `python -m playwright "
                    f"install --with-deps chromium`, or set {CHROMIUM_ENV} to a Chromium or Chrome."
                )
        yield browser
        browser.close()


@pytest.fixture
def open_tab(browser, url):
    """A function that opens the demo in a new tab (each tab is its own Gradio session)."""
    context = browser.new_context(viewport={"width": 1100, "height": 820})

    def open_tab():
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(url)
        page.locator("#llava-ask").wait_for()
        return page

    yield open_tab
    context.close()


def upload(page, path: Path) -> None:
    page.locator("#llava-image input[type=file]").set_input_files(path)


def ask(page, question: str) -> None:
    page.locator("#llava-question textarea").fill(question)
    page.locator("#llava-ask").click()


def wait_for_reply(page, n: int) -> str:
    """The text of the n-th bot message, once the request that writes it has finished."""
    from playwright.sync_api import expect

    bots = page.locator("#llava-chat [data-testid=bot]")
    expect(bots).to_have_count(n, timeout=WAIT_MS)
    expect(page.locator("#llava-chat [data-testid=status-tracker]")).to_have_class(IDLE, timeout=WAIT_MS)
    return bots.nth(n - 1).inner_text().strip()


def test_upload_ask_stream_follow_up_and_a_second_tab(open_tab, tmp_path):
    from playwright.sync_api import expect

    scene = tmp_path / "scene.png"
    synthetic.draw_scene(np.random.default_rng(0))[0].save(scene)
    page = open_tab()
    upload(page, scene)
    expect(page.locator("#llava-image img")).to_be_visible()  # uploaded and shown
    page.evaluate(WATCH_REPLIES)
    ask(page, "Describe the image briefly.")
    first = wait_for_reply(page, 1)
    assert first, "the first answer is empty"
    pieces = [text for text in dict.fromkeys(page.evaluate("window.replies")) if text]
    assert len(pieces) >= 2 and pieces[-1] == first, f"the answer did not stream: {pieces}"

    ask(page, "How many shapes are there?")  # a follow-up in the same conversation
    second = wait_for_reply(page, 2)
    assert second
    users = page.locator("#llava-chat [data-testid=user]")
    assert users.all_inner_texts() == ["Describe the image briefly.", "How many shapes are there?"]
    page.screenshot(path=tmp_path / "demo.png")
    assert (tmp_path / "demo.png").stat().st_size > 10_000

    other = open_tab()  # a second tab is a second session: no image, no conversation
    ask(other, "How many shapes are there?")
    expect(other.locator("#llava-status")).to_contain_text("No image yet")
    expect(other.locator("#llava-chat [data-testid=user]")).to_have_count(0)
    expect(page.locator("#llava-chat [data-testid=bot]")).to_have_count(2)  # the first tab kept its own

    page.locator("#llava-clear").click()  # start over
    expect(page.locator("#llava-chat [data-testid=user]")).to_have_count(0)
    expect(page.locator("#llava-image img")).to_have_count(0)


def test_a_trained_export_answers_right_in_the_page_and_the_readme_shows_it(open_tab, tmp_path):
    """With a trained export ($LLAVA_NB_DEMO_EXPORT), a held-out-style scene gets right answers in the page,
    and the page is the README's picture (docs/demo.png)."""
    from playwright.sync_api import expect

    if not os.environ.get(DEMO_EXPORT_ENV):
        pytest.skip(
            f"needs a trained export: {DEMO_EXPORT_ENV}=outputs/offline/stage1 (train it with the "
            "README's quickstart)"
        )
    scene_file = tmp_path / "scene.png"
    rng = np.random.default_rng(2026)  # not a training seed's scene
    image, scene = synthetic.draw_scene(rng)
    image.save(scene_file)
    page = open_tab()
    upload(page, scene_file)
    expect(page.locator("#llava-image img")).to_be_visible()
    for n, (kind, (question, answer)) in enumerate(synthetic.questions(scene, rng).items(), 1):
        ask(page, question)
        reply = wait_for_reply(page, n)
        assert answer.lower() in reply.lower(), f"{kind}: {question!r} -> {reply!r}, expected {answer!r}"
    page.screenshot(path=README_PICTURE)


def test_bad_input_gets_a_message_in_the_page(open_tab, tmp_path):
    from playwright.sync_api import expect

    page = open_tab()
    status = page.locator("#llava-status")
    ask(page, "   ")
    expect(status).to_contain_text("The question is empty")
    ask(page, "What colour is the circle?")
    expect(status).to_contain_text("No image yet")

    broken = tmp_path / "holiday.png"
    broken.write_text("not a picture")
    upload(page, broken)
    expect(status).to_have_text("")  # the upload cleared the message, so it has arrived
    ask(page, "What colour is the circle?")
    expect(status).to_contain_text("not an image I can read")
    expect(status).to_contain_text("holiday.png")
    expect(page.locator("#llava-chat [data-testid=user]")).to_have_count(0)
    assert "Traceback" not in page.inner_text("body")


def test_a_folder_that_is_not_an_export_stops_the_command_with_a_message(tmp_path, capsys):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainable.safetensors").write_bytes(b"")
    for folder in (tmp_path / "missing", tmp_path / "checkpoint-3"):
        with pytest.raises(SystemExit) as exit_:
            demo.main(["--checkpoint", str(folder), "--profile", "offline"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(folder) in err and "llava_nb.train" in err


def test_a_taken_port_stops_the_command_with_a_message(export_dir, capsys):
    with socket.socket() as taken:
        taken.bind((demo.HOST, 0))
        taken.listen()
        with pytest.raises(SystemExit) as exit_:
            demo.main(["--checkpoint", str(export_dir), "--port", str(taken.getsockname()[1])], block=False)
    assert exit_.value.code == 2
    assert "choose a free port with --port" in capsys.readouterr().err


def test_a_cleared_conversation_is_not_shown_again():
    chat = infer.Chat(model=None, processor=None)  # no image: nothing is loaded
    chat.messages = [infer.user_turn("How many shapes are there?"), infer.assistant_turn("Two.")]
    kept = demo.Conversation("scene.png", chat)
    assert next(demo.respond(None, None, "scene.png", "", kept, 8, 0.0)) == (
        demo.to_messages(chat),
        kept,
        demo.EMPTY_QUESTION,
        "",
    )
    assert demo.forget(kept) == (None, [], "")
    assert next(demo.respond(None, None, None, "And now?", kept, 8, 0.0)) == (
        [],
        None,
        demo.NO_IMAGE,
        "And now?",
    )


def test_temperature_zero_is_greedy():
    assert demo.generation_kwargs(0) == {}
    assert demo.generation_kwargs(0.7) == {"do_sample": True, "temperature": 0.7}
