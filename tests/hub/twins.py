"""Small, seeded twins of the hub repos the `t4` profile reads, for tests without the hub.

Each twin holds its repo's files in the formats, keys and dtypes the hub serves (written by the transformers
of their day, not today's), with the sizes scaled down so that a CPU trains them in seconds:

- `TinyLlama/TinyLlama-1.1B-Chat-v1.0`: a 2-layer LlamaForCausalLM (untied head, bos 1, eos 2) whose
  `model.safetensors` is bfloat16 and whose `config.json` is transformers 4.35's (`"torch_dtype": "bfloat16"`,
  no `dtype`); a SentencePiece BPE tokenizer trained here with byte fallback (`tokenizer.model` and its
  `tokenizer.json`), and `tokenizer_config.json` / `special_tokens_map.json` / `generation_config.json` with
  the keys of the published files (`LlamaTokenizer`, `legacy: false`, pad `</s>`, the Zephyr-style chat
  template, and no `add_bos_token` / `add_eos_token`).
- `openai/clip-vit-base-patch32`: a full CLIPModel as float32 `pytorch_model.bin` (both towers, the hub's key
  names with the `position_ids` buffers), 32-pixel patches at 224 px (49 patch tokens), narrow and shallow;
  `config.json` in transformers 4.16's layout; the published `preprocessor_config.json` in its old
  feature-extractor form.
- `HuggingFaceH4/llava-instruct-mix-vsft`: parquet shards under `data/` and the dataset card's `dataset_info`
  and `configs`, `train` and `test` splits: conversations of 1-10 exchanges, the question beside the image
  keeping the newline that separated it from `<image>`, replies of a few words to a few hundred, some longer
  than `max_length`, JPEG images of varied sizes and modes, a damaged image.
- `lmms-lab/POPE`: the card's two configs (`default`: split `test` in
  `data/test-0000{0,1,2}-of-00003.parquet`; `Full`: one split per category), its seven columns and
  features, the three categories in equal parts with as many "yes" as "no" in each, COCO-sized RGB JPEGs
  as the Image feature stores them (see "POPE").

`write_twins()` writes them once under the cache (atomically); `tests.hub.hub_server` serves them under
their hub ids, so `snapshot_download` and `load_dataset(..., streaming=True)` run as on Colab, and
`tests.hub.web_proxy` serves the web images beside them (`web/<host>/<path>`). The published values (keys,
chat template, small files) are read from `tests.hub.published`, which says where each was read; the
twin only scales sizes down. JSON files are written as transformers writes them (indent 2, sorted keys).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from llava_nb import config as cfg
from llava_nb.fsutil import atomic_dir, is_complete

from . import published as pub
from .pope_twin import POPE_REPO, pope_features, write_pope  # noqa: F401 (pope_features: tests)
from .published import DATA_REPO, LM_REPO, TINYLLAMA_CHAT_TEMPLATE, VISION_REPO  # noqa: F401 (tests)

# Bump when a twin's content changes: the cache folder is rebuilt. 5: JSON files with sorted keys, as
# transformers writes them (only CLIP's config.json changed order), the web images in a fixed order, and a
# tokenizer.model that names no temporary path: the same bytes on every run.
TWIN_VERSION = 5
# The twin's sizes, where it departs from the published files (published.SCALED lists the keys).
TINYLLAMA_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
}
CLIP_VISION_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 32,
}
CLIP_TEXT_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 1000,
}

WORDS = (
    "a the of and in on with to is are there this that picture image photo shows man woman people dog cat "
    "street car bus train table kitchen room window tree sky cloud water beach boat bird horse field grass "
    "red blue green yellow white black brown small large old young two three four many some one left right "
    "front behind near next under over standing sitting walking holding wearing looking playing eating "
    "what where how why who which color colour shape count side object scene describe detail background "
    "foreground light dark sunny cloudy food plate pizza cake fruit banana apple phone laptop book chair "
    "sign building city road bicycle person group child children game ball field snow mountain river"
).split()
QUESTIONS = (
    "What is shown in the image?",
    "Describe the scene in detail.",
    "How many people are there?",
    "What colour is the car?",
    "Where is the dog?",
    "What is the man holding?",
    "Is it sunny or cloudy?",
    "What could happen next?",
)


def twins_dir() -> Path:
    """Where the twins live: `<cache>/hub-twins-v<N>/{models,datasets}/<owner>/<name>`."""
    return cfg.cache_dir() / f"hub-twins-v{TWIN_VERSION}"


def write_twins(root: Path | None = None) -> Path:
    """Write the twins once (about 10 s), atomically; returns the folder `hub_server` serves."""
    root = twins_dir() if root is None else Path(root)
    if is_complete(root):
        return root
    with atomic_dir(root) as tmp:
        rng = np.random.default_rng(0)
        corpus = [_sentence(rng, 4, 30) for _ in range(3000)]
        write_tinyllama(tmp / "models" / LM_REPO, corpus)
        write_clip(tmp / "models" / VISION_REPO)
        write_vsft(tmp / "datasets" / DATA_REPO, rng)
        write_pope(tmp / "datasets" / POPE_REPO, np.random.default_rng(23))
        write_web_images(tmp / "web", rng)
    return root


# ------------------------------------------------------------------------------------------ TinyLlama


def write_tinyllama(folder: Path, corpus: list[str], *, seed: int = 0) -> None:
    """A 2-layer LlamaForCausalLM in bfloat16 with TinyLlama's files and a SentencePiece BPE tokenizer."""
    import sentencepiece as spm
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from llava_nb.processing import SYSTEM_PROMPT

    folder.mkdir(parents=True)
    lines = corpus + [SYSTEM_PROMPT, "USER: ASSISTANT: <|user|> <|assistant|> <|system|>", *QUESTIONS]
    # Llama's SentencePiece settings: BPE, byte fallback, digits split, a dummy prefix, no normalisation.
    # Written through model_writer, the model names no (temporary) path: the same bytes on every machine.
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model_file,
        model_type="bpe",
        vocab_size=1000,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        num_threads=1,
        train_extremely_large_corpus=False,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    # tokenizer_config.json as published: no add_bos_token / add_eos_token keys (the class's defaults apply)
    _write_json(folder / "tokenizer_config.json", pub.TINYLLAMA_TOKENIZER_CONFIG)
    # tokenizer.json: today's conversion of tokenizer.model, rewritten in the layout the hub's file has
    tokenizer = LlamaTokenizer.from_pretrained(folder)
    converted = json.loads(tokenizer.backend_tokenizer.to_str())
    (folder / "tokenizer.json").write_text(
        json.dumps(llama2_tokenizer_json(converted), indent=2, ensure_ascii=False) + "\n"
    )
    _write_json(folder / "special_tokens_map.json", pub.TINYLLAMA_SPECIAL_TOKENS_MAP)
    _write_json(folder / "tokenizer_config.json", pub.TINYLLAMA_TOKENIZER_CONFIG)  # as published, not resaved

    config = tinyllama_config(vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in config.items() if k != "torch_dtype"}, dtype=torch.float32)
    )
    # The hub's file: every tensor bfloat16, transformers 4.35's names, safetensors' "pt" metadata.
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", pub.TINYLLAMA_GENERATION_CONFIG)


def llama2_tokenizer_json(converted: dict) -> dict:
    """A tokenizer.json in the layout TinyLlama ships (Llama 2's, from transformers 4.3x's converter:
    `published.TINYLLAMA_TOKENIZER_JSON`), with the vocabulary, merges (as "a b" strings) and added tokens
    of `converted`, today's conversion of the twin's own tokenizer.model."""
    model = converted["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    published = pub.TINYLLAMA_TOKENIZER_JSON
    return {
        **published,
        "added_tokens": converted["added_tokens"],
        "model": {**published["model"], "vocab": model["vocab"], "merges": merges},
    }


def tinyllama_config(vocab_size: int) -> dict:
    """TinyLlama's config.json as transformers 4.35 wrote it (`torch_dtype`, `pretraining_tp`, ...), narrowed:
    2 layers of width 64, 4 heads sharing 2 key-value heads, this tokenizer's vocabulary."""
    return {**pub.TINYLLAMA_CONFIG, **TINYLLAMA_SIZES, "vocab_size": vocab_size}


def write_web_images(folder: Path, rng: np.random.Generator) -> None:
    """Stand-ins for the web images the t4 notebooks and evaluation fetch (Mona Lisa, ...), by URL path."""
    import urllib.parse

    for url in dict.fromkeys([cfg.MONA_LISA_URL, *(u for u, _, _ in cfg.T4_IMAGES)]):  # in order: seeded
        parts = urllib.parse.urlsplit(url)
        path = folder / parts.netloc / parts.path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(rng))


# ------------------------------------------------------------------------------------------------ CLIP


def write_clip(folder: Path, *, seed: int = 0) -> None:
    """A CLIPModel with ViT-B/32's patching (224 px, 32 px patches) and a 64-wide, 2-layer vision tower, in
    openai's files: float32 `pytorch_model.bin` with transformers 4.16's keys, and its 4.16 `config.json`."""
    import torch

    folder.mkdir(parents=True)
    text = {**CLIP_TEXT_SIZES, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    model = random_clip(CLIP_VISION_SIZES, text, seed=seed)
    state = model.state_dict()
    for tower, positions in (("text_model", 77), ("vision_model", (224 // 32) ** 2 + 1)):  # 4.16 saved them
        state.setdefault(f"{tower}.embeddings.position_ids", torch.arange(positions).unsqueeze(0))
    torch.save(state, folder / "pytorch_model.bin")  # openai's format, not safetensors
    _write_json(folder / "config.json", clip_config(CLIP_VISION_SIZES, CLIP_TEXT_SIZES))
    # openai/clip-vit-base-patch32 publishes the old feature-extractor form of the image settings.
    _write_json(folder / "preprocessor_config.json", pub.CLIP_PREPROCESSOR_CONFIG)


def random_clip(vision: dict, text: dict, *, seed: int = 0, position_std: float = 1.0):
    """A CLIPModel (both towers) with seeded random weights: ViT-B/32's vision settings
    (`config.T4_VISION_CONFIG`), overridden by `vision`; a text tower of `text` (2 layers unless it says).
    Position embeddings are drawn with `position_std`, the order of the patch embeddings as in a trained
    CLIP (transformers' init, 0.02, would make the patches' places all but indistinguishable)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    vision = {**cfg.T4_VISION_CONFIG, **vision}
    config = CLIPConfig(
        text_config={"num_hidden_layers": 2, **text},
        vision_config=vision,
        projection_dim=vision["projection_dim"],
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        position = model.vision_model.embeddings.position_embedding.weight
        position.normal_(0.0, position_std, generator=torch.Generator().manual_seed(seed))
    return model


def clip_config(vision: dict, text: dict) -> dict:
    """openai/clip-vit-base-patch32's config.json (transformers 4.16's layout: full nested sub-configs,
    `*_config_dict` null, no dtype anywhere but `torch_dtype: null`) with the towers' sizes given."""
    published = pub.CLIP_CONFIG
    return {
        **published,
        "projection_dim": vision["projection_dim"],
        "text_config": {**published["text_config"], **text, "projection_dim": vision["projection_dim"]},
        "vision_config": {**published["vision_config"], **vision},
    }


# ------------------------------------------------------------------------------- llava-instruct-mix-vsft


def write_vsft(folder: Path, rng: np.random.Generator, *, n_train: int = 96, n_test: int = 24) -> None:
    """Parquet shards `data/{split}-0000i-of-0000n.parquet` and the dataset card (`dataset_info` beside
    `configs`, as the hub's card has them), in the hub's schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llava_nb.synthetic import FEATURES

    (folder / "data").mkdir(parents=True)
    splits, download_size = [], 0
    for split, n, shards in (("train", n_train, 2), ("test", n_test, 1)):
        rows = [vsft_row(rng, damaged=(split == "train" and i == 5)) for i in range(n)]
        per_shard = -(-n // shards)
        num_bytes = 0
        for s in range(shards):
            table = pa.Table.from_pylist(
                rows[s * per_shard : (s + 1) * per_shard], schema=FEATURES.arrow_schema
            )
            path = folder / "data" / f"{split}-{s:05d}-of-{shards:05d}.parquet"
            pq.write_table(table, path)
            num_bytes += table.nbytes
            download_size += path.stat().st_size
        splits.append((split, num_bytes, n))
    split_lines = "".join(
        f"  - name: {name}\n    num_bytes: {num_bytes}\n    num_examples: {n}\n"
        for name, num_bytes, n in splits
    )
    (folder / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: messages\n    list:\n    - name: content\n      list:\n"
        "      - name: index\n        dtype: int64\n      - name: text\n        dtype: string\n"
        "      - name: type\n        dtype: string\n    - name: role\n      dtype: string\n"
        "  - name: images\n    sequence: image\n  splits:\n"
        + split_lines
        + f"  download_size: {download_size}\n  dataset_size: {sum(b for _, b, _ in splits)}\n"
        "configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: test\n    path: data/test-*\n---\n"
        "# Twin of HuggingFaceH4/llava-instruct-mix-vsft (tests.hub.twins)\n"
    )


def vsft_row(rng: np.random.Generator, *, damaged: bool = False) -> dict:
    """One conversation about one JPEG: 1-10 exchanges (mostly few), replies of 2 to ~300 words; the first
    question beside the image, with the newline toward it."""
    n_turns = int(rng.choice([1, 1, 1, 2, 3, 5, 10]))
    messages = []
    for turn in range(n_turns):
        question = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
        content = [{"index": None, "text": question, "type": "text"}]
        if turn == 0:  # the image comes before or after the question text, as in the real data, where the
            # text keeps the newline that separated it from LLaVA's `<image>`: "\nWhat ...", "Who ...?\n"
            image_item = {"index": 0, "text": None, "type": "image"}
            if rng.random() < 0.7:
                content = [image_item, {**content[0], "text": "\n" + question}]
            else:
                content = [{**content[0], "text": question + "\n"}, image_item]
        messages.append({"role": "user", "content": content})
        long_reply = rng.random() < 0.1
        reply = _sentence(rng, 150, 300) if long_reply else _sentence(rng, 2, 40)
        messages.append({"role": "assistant", "content": [{"index": None, "text": reply, "type": "text"}]})
    payload = b"\xff\xd8\xff\xe0 not a whole JPEG" if damaged else _jpeg(rng)
    return {"messages": messages, "images": [{"bytes": payload, "path": None}]}


def _jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    width, height = int(rng.integers(64, 640)), int(rng.integers(64, 480))
    mode = ["RGB", "RGB", "L", "CMYK"][int(rng.integers(4))]
    pixels = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((width, height)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _sentence(rng: np.random.Generator, low: int, high: int) -> str:
    words = [WORDS[int(i)] for i in rng.integers(len(WORDS), size=int(rng.integers(low, high + 1)))]
    text = " ".join(words)
    if rng.random() < 0.3:
        text += f" {int(rng.integers(0, 2000))}"
    return text[0].upper() + text[1:] + "."


def _write_json(path: Path, obj: dict) -> None:
    """As transformers' to_json_string / save_pretrained write configs: indent 2, keys sorted."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
