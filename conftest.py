"""Set-up shared by `tests/` and `notebooks/` (`pytest --nbmake tests notebooks`).

The profile, budget and run folder for everything the session starts, notebook kernels included, set
through the environment variables a user could set: `$LLAVA_NB_PROFILE` (`offline` unless set),
`$LLAVA_NB_BUDGET=smoke`, `$LLAVA_NB_OUTPUTS` (a temporary folder). For `t4`, the session serves small
twins of TinyLlama, CLIP, llava-instruct-mix-vsft and POPE under their hub ids on 127.0.0.1
(`tests.hub`) and points `HF_ENDPOINT` there, with an empty hub cache in a temporary folder:
`snapshot_download` and `load_dataset(..., streaming=True)` download and stream as they do on Colab. Web
images come through an https proxy (`https_proxy`, `SSL_CERT_FILE`). Notebook kernels inherit the
environment, so they see the same hub and web.
"""

import atexit
import contextlib
import os
import shutil
import tempfile

# What a user could set too: the profile (offline unless the CI leg says t4), the smoke budget (every stage a
# few steps, every evaluation a few samples) for notebooks and commands the tests start.
os.environ.setdefault("LLAVA_NB_PROFILE", "offline")
os.environ["LLAVA_NB_BUDGET"] = "smoke"
# One temporary run folder for the session (llava_nb.runs.OUTPUTS_ENV): notebooks 06 and 07 find 05's exports
# there, and test exports never land where a user's notebook would pick them up.
os.environ["LLAVA_NB_OUTPUTS"] = tempfile.mkdtemp(prefix="llava_nb-test-outputs-")
atexit.register(shutil.rmtree, os.environ["LLAVA_NB_OUTPUTS"], ignore_errors=True)


def pytest_configure(config):
    if os.environ.get("LLAVA_NB_PROFILE") != "t4":
        return
    # Before anything imports huggingface_hub or datasets: both read these once, at import.
    from tests.hub import hub_server, twins, web_proxy

    root = twins.twins_dir()  # written below, once the variables are set
    servers = contextlib.ExitStack()
    url = servers.enter_context(hub_server.serve(root))
    proxy = servers.enter_context(web_proxy.serve(root / "web"))  # https://<host>/<path>, as a user's proxy
    config._hub_twins = servers
    home = tempfile.mkdtemp(prefix="llava_nb-hf-home-")
    for name in (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_HUB_CACHE",
        "HF_DATASETS_CACHE",
        "HUGGINGFACE_HUB_CACHE",
    ):
        os.environ.pop(name, None)
    os.environ.update({"HF_ENDPOINT": url, "HF_HOME": home, "HF_HUB_DISABLE_TELEMETRY": "1"})
    web_proxy.install(proxy)
    twins.write_twins()


def pytest_unconfigure(config):
    servers = getattr(config, "_hub_twins", None)
    if servers is not None:
        servers.close()
