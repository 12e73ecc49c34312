"""Each hub twin holds what the hub serves: every file's keys equal the published file's keys, every value
equals the published value except the sizes a twin scales down (`tests.hub.published.SCALED`), and the
weights are in the published formats and dtypes (TinyLlama bfloat16 safetensors, CLIP float32
pytorch_model.bin)."""

import json

import pytest
import torch
import yaml

from tests.hub import published as pub
from tests.hub import twins


@pytest.fixture(scope="module")
def root():
    return twins.write_twins()


def differences(published, twin, scaled: set[str], path: str = "") -> list[str]:
    """Where `twin` departs from `published`: keys missing or extra anywhere, values unequal outside `scaled`.
    Lists of named entries (a card's features and splits) are compared by name, in order, as `path[name]`."""
    if isinstance(published, dict) and isinstance(twin, dict):
        where = path or "(top level)"
        out = [f"{where}: published key {k!r} missing" for k in sorted(set(published) - set(twin))]
        out += [f"{where}: key {k!r} not in the published file" for k in sorted(set(twin) - set(published))]
        for k in sorted(set(published) & set(twin)):
            out += differences(published[k], twin[k], scaled, f"{path}.{k}" if path else str(k))
        return out
    if _named(published) and _named(twin):
        names, twin_names = [x["name"] for x in published], [x["name"] for x in twin]
        if names != twin_names:
            return [f"{path}: published entries {names}, twin {twin_names}"]
        return [d for a, b in zip(published, twin) for d in differences(a, b, scaled, f"{path}[{a['name']}]")]
    if path in scaled:  # a size: the twin's own (the published one may not be recorded)
        return []
    if published != twin or type(published) is not type(twin):
        return [f"{path}: published {published!r}, twin {twin!r}"]
    return []


def _named(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(e, dict) and "name" in e for e in x)


def twin_content(root, repo: str, name: str) -> dict:
    kind = "datasets" if repo == pub.DATA_REPO else "models"
    text = (root / kind / repo / name).read_text()
    if name.endswith(".md"):  # a dataset card: its YAML header
        return yaml.safe_load(text.split("---\n")[1])
    return json.loads(text)


@pytest.mark.parametrize("repo, name", sorted(pub.PUBLISHED), ids=lambda x: x)
def test_each_twin_file_has_the_published_keys_and_values(root, repo, name):
    published, source = pub.PUBLISHED[repo, name]
    found = differences(published, twin_content(root, repo, name), pub.SCALED.get((repo, name), set()))
    assert not found, f"{repo}/{name} departs from the published file ({source}):\n" + "\n".join(found)


def test_the_differences_are_found_where_they_are():
    """The comparison itself: a missing key, an extra key, a changed value and a scaled size."""
    published = {"a": 1, "b": {"c": "x", "size": 10}, "splits": [{"name": "train", "n": 5}]}
    twin = {"a": 2, "b": {"c": "x", "size": 3, "dtype": "float32"}, "splits": [{"name": "train", "n": 1}]}
    assert differences(published, twin, {"b.size", "splits[train].n"}) == [
        "a: published 1, twin 2",
        "b: key 'dtype' not in the published file",
    ]
    assert differences({"a": 1}, {}, set()) == ["(top level): published key 'a' missing"]
    assert differences(published, published, set()) == []


def test_tinyllamas_weights_are_bfloat16_safetensors_with_the_published_names(root):
    from safetensors import safe_open

    folder = root / "models" / pub.LM_REPO
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    w = pub.TINYLLAMA_WEIGHTS
    with safe_open(folder / w["file"], framework="pt") as f:
        assert f.metadata() == w["metadata"]
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    expected = {
        *w["keys_outside_layers"],
        *(f"model.layers.{i}.{k}" for i in range(layers) for k in w["keys_per_layer"]),
    }
    assert keys == expected
    assert dtypes == {w["dtype"]}, (
        f"{pub.TINYLLAMA_WEIGHTS_SOURCE}: every tensor {w['dtype']}, the twin's {dtypes}"
    )
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "tokenizer.model", "tokenizer.json"}


def test_clips_weights_are_a_float32_pytorch_model_bin_with_the_published_names(root):
    folder = root / "models" / pub.VISION_REPO
    config = json.loads((folder / "config.json").read_text())
    w = pub.CLIP_WEIGHTS
    state = torch.load(folder / w["file"], map_location="cpu", weights_only=True)
    expected = set(w["keys_outside_layers"])
    for tower, sub in (("text_model", "text_config"), ("vision_model", "vision_config")):
        expected |= {
            f"{tower}.encoder.layers.{i}.{k}"
            for i in range(config[sub]["num_hidden_layers"])
            for k in w["keys_per_layer"]
        }
    assert set(state) == expected
    assert {k: str(v.dtype).removeprefix("torch.") for k, v in state.items() if k in w["buffers"]} == w[
        "buffers"
    ]
    assert {v.dtype for k, v in state.items() if k not in w["buffers"]} == {getattr(torch, w["dtype"])}
    assert not (folder / "model.safetensors").exists()


def test_the_question_beside_the_image_keeps_its_newline_toward_it(root):
    import pyarrow.parquet as pq

    first_turns = [
        row["messages"][0]["content"]
        for path in sorted((root / "datasets" / pub.DATA_REPO).rglob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]
    sides = {"image first": 0, "image last": 0}
    for content in first_turns:
        kinds = [item["type"] for item in content]
        assert kinds in (["image", "text"], ["text", "image"])
        text = content[kinds.index("text")]["text"]
        side = "image first" if kinds[0] == "image" else "image last"
        example = pub.VSFT_TEXT_BESIDE_IMAGE[side]
        assert text.startswith("\n") == example.startswith("\n") and text.endswith("\n") == example.endswith(
            "\n"
        )
        sides[side] += 1
    assert min(sides.values()) > 0, sides  # both, as in the published rows
