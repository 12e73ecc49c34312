"""The hub twins and the local hub that serves them: the files each repo must have, and the HTTP answers that
huggingface_hub and datasets rely on (on both profiles; the t4 suite then runs everything through them)."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from transformers import AutoConfig, AutoTokenizer

from tests.hub import hub_server, twins


@pytest.fixture(scope="module")
def root():
    return twins.write_twins()


@pytest.fixture(scope="module")
def hub(root):
    with hub_server.serve(root) as url:
        yield url


def _get(url, headers=None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
        return r.status, dict(r.headers), r.read()


def test_each_twin_has_its_repos_files(root):
    lm = root / "models" / twins.LM_REPO
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    } <= {p.name for p in lm.iterdir()}
    published = json.loads((lm / "tokenizer_config.json").read_text())
    # as TinyLlama publishes it: no add_bos_token / add_eos_token keys (tokenizer.json's template adds <s>)
    assert published["tokenizer_class"] == "LlamaTokenizer"
    assert not {"add_bos_token", "add_eos_token"} & set(published)
    assert published["legacy"] is False and published["pad_token"] == "</s>"
    assert published["chat_template"] == twins.TINYLLAMA_CHAT_TEMPLATE
    config = AutoConfig.from_pretrained(lm)
    assert (config.model_type, config.tie_word_embeddings, config.bos_token_id, config.eos_token_id) == (
        "llama",
        False,
        1,
        2,
    )
    tok = AutoTokenizer.from_pretrained(lm)
    ids = tok("Hello, a dog 123 😀").input_ids
    assert ids[0] == 1 and tok.convert_ids_to_tokens(2) == "</s>"
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))  # byte fallback spells the emoji
    assert tok.decode(ids, skip_special_tokens=True) == "Hello, a dog 123 😀"
    clip = root / "models" / twins.VISION_REPO
    assert {"config.json", "pytorch_model.bin", "preprocessor_config.json"} <= {
        p.name for p in clip.iterdir()
    }
    data = root / "datasets" / twins.DATA_REPO
    assert sorted(p.name for p in (data / "data").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]


def test_the_vsft_twin_has_the_real_datasets_shape():
    import numpy as np

    rows = [twins.vsft_row(np.random.default_rng(s)) for s in range(60)]
    exchanges = [sum(m["role"] == "assistant" for m in r["messages"]) for r in rows]
    words = [
        len(m["content"][0]["text"].split()) for r in rows for m in r["messages"] if m["role"] == "assistant"
    ]
    assert min(exchanges) == 1 and max(exchanges) == 10
    assert min(words) <= 5 and max(words) >= 150


def test_the_hub_answers_as_the_libraries_expect(hub):
    status, _, body = _get(f"{hub}/api/models/{twins.LM_REPO}/revision/main")
    info = json.loads(body)
    assert status == 200 and len(info["sha"]) == 40
    assert "tokenizer.model" in {s["rfilename"] for s in info["siblings"]}
    url = f"{hub}/{twins.LM_REPO}/resolve/main/config.json"
    status, headers, body = _get(url)
    assert status == 200 and headers["X-Repo-Commit"] == info["sha"] and headers["ETag"].startswith('"')
    assert json.loads(body)["model_type"] == "llama"
    status, headers, part = _get(url, {"Range": "bytes=2-9"})
    assert status == 206 and part == body[2:10] and headers["Content-Range"] == f"bytes 2-9/{len(body)}"
    status, _, tail = _get(url, {"Range": "bytes=-5"})
    assert status == 206 and tail == body[-5:]
    tree = json.loads(_get(f"{hub}/api/datasets/{twins.DATA_REPO}/tree/main/data")[2])
    assert {e["path"] for e in tree} >= {"data/test-00000-of-00001.parquet"}
    for missing in (f"{hub}/api/models/nobody/nothing", f"{hub}/{twins.LM_REPO}/resolve/main/nope.bin"):
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(missing)
        assert e.value.code == 404 and e.value.headers["X-Error-Code"] in (
            "RepositoryNotFound",
            "EntryNotFound",
        )


def test_snapshot_download_and_streaming_run_through_the_twin(hub, tmp_path):
    """The real client code in a fresh process, pointed at the twin as Colab's would be at the hub."""
    script = f"""
from huggingface_hub import snapshot_download
import datasets
folder = snapshot_download({twins.VISION_REPO!r}, allow_patterns=["*.json", "*.bin"])
ds = datasets.load_dataset({twins.DATA_REPO!r}, split="test", streaming=True)
ds = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
print(sorted(p for p in __import__("os").listdir(folder)), sum(1 for _ in ds))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub, HF_HOME=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        done.stdout.split("]")[0] + "]" == "['config.json', 'preprocessor_config.json', 'pytorch_model.bin']"
    )
    assert done.stdout.split("]")[1].strip() == "24"


def test_without_the_hub_the_t4_command_names_the_repo_and_offers_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), LLAVA_NB_PROFILE="t4")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_nb.train",
            "--profile",
            "t4",
            "--max-steps",
            "1",
            "--export-dir",
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "openai/clip-vit-base-patch32" in done.stderr and "--profile offline" in done.stderr
