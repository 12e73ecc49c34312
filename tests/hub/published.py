"""What the hub serves for the t4 profile's three repos: each file's published content, and where it was read.

Data, not code under test: `tests/test_published_files.py` holds the twins (`tests.hub.twins`) to it, key for
key and value for value, except the sizes a twin scales down, which `SCALED` lists by their key paths.
"""

LM_REPO = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
VISION_REPO = "openai/clip-vit-base-patch32"
DATA_REPO = "HuggingFaceH4/llava-instruct-mix-vsft"

LM_REVISION = "fe8a4ea1ffedaf415f4da2f062534de366a451e6"  # the repo's main since 2024-03-17
HUB = "https://huggingface.co"

# ------------------------------------------------------------------------------------------- TinyLlama

TINYLLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 2048,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 22,
    "num_key_value_heads": 4,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0",
    "use_cache": True,
    "vocab_size": 32000,
}
TINYLLAMA_CONFIG_SOURCE = (
    f"{HUB}/{LM_REPO}/blob/{LM_REVISION}/config.json (608 bytes), as copied verbatim into two test files "
    "of the Rust crate atenia_engine (TINYLLAMA_CONFIG_JSON, 'embedded copy of "
    "models/tinyllama-1.1b/config.json'); json.dumps(indent=2, sort_keys=True) of this dict plus a "
    "newline is exactly 608 bytes, the size the hub lists (issue 22)"
)

TINYLLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
_ADDED = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
TINYLLAMA_TOKENIZER_CONFIG = {
    "added_tokens_decoder": {
        "0": {"content": "<unk>", **_ADDED},
        "1": {"content": "<s>", **_ADDED},
        "2": {"content": "</s>", **_ADDED},
    },
    "bos_token": "<s>",
    "chat_template": TINYLLAMA_CHAT_TEMPLATE,
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "legacy": False,
    "model_max_length": 2048,
    "pad_token": "</s>",
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
    "use_default_system_prompt": False,
}
TINYLLAMA_TOKENIZER_CONFIG_SOURCE = (
    f"{HUB}/{LM_REPO}/blob/{LM_REVISION}/tokenizer_config.json (1.29 kB; no add_bos_token / "
    "add_eos_token, issue 22). The chat template as the GGUF conversions of this repo carry it verbatim "
    "(shimmy's TinyLlama-1.1B-Chat-v1.0.Q4_0.gguf test constant, 410 chars); with model_max_length 2048 "
    "this dict serialises (indent=2, sort_keys, ensure_ascii=False, newline) to 1,289 bytes, the listed "
    "1.29 kB; with the two add_*_token keys it would be 1,340"
)

# tokenizer.json (1.84 MB): Llama 2's tokenizer as transformers 4.3x converted it; all but the vocabulary
# and merges, which the twin trains itself (SCALED).
_BOS = {"SpecialToken": {"id": "<s>", "type_id": 0}}
TINYLLAMA_TOKENIZER_JSON = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(("<unk>", "<s>", "</s>"))
    ],
    "normalizer": {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    },
    "pre_tokenizer": None,
    "post_processor": {
        "type": "TemplateProcessing",
        "single": [_BOS, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            _BOS,
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<s>", "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    },
    "decoder": {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    },
    "model": {
        "type": "BPE",
        "dropout": None,
        "unk_token": "<unk>",
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "vocab": None,
        "merges": None,
    },
}
TINYLLAMA_TOKENIZER_JSON_SOURCE = (
    f"{HUB}/{LM_REPO}/blob/{LM_REVISION}/tokenizer.json (1.84 MB, Llama 2's tokenizer): the layout of "
    "transformers 4.3x's LlamaConverter, as third-party fixtures of Llama tokenizers reproduce it (a "
    "Prepend + Replace normaliser, no pre-tokeniser, <s> from the template, a Strip(1, 0) decoder). "
    "transformers 5 keeps this post-processor, so the real file adds <s> though tokenizer_config.json "
    "names no add_bos_token"
)

_TOKEN = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
TINYLLAMA_SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": "<s>", **_TOKEN},
    "eos_token": {"content": "</s>", **_TOKEN},
    "pad_token": {"content": "</s>", **_TOKEN},
    "unk_token": {"content": "<unk>", **_TOKEN},
}
TINYLLAMA_GENERATION_CONFIG = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "max_length": 2048,
    "pad_token_id": 0,
    "transformers_version": "4.35.0",
}
TINYLLAMA_SMALL_FILES_SOURCE = (
    f"{HUB}/{LM_REPO}/tree/{LM_REVISION}: special_tokens_map.json 551 bytes and generation_config.json "
    "124 bytes as the hub lists them; these dicts serialise (indent=2, sort_keys, newline) to exactly "
    "those sizes"
)

# model.safetensors: 2,200,119,864 bytes = 1,100,048,384 parameters x 2 bytes (bfloat16) + a 23,096-byte
# header; one tensor per parameter, transformers 4.35's names (no rotary buffers), every tensor BF16.
TINYLLAMA_WEIGHTS = {
    "file": "model.safetensors",
    "dtype": "BF16",
    "metadata": {"format": "pt"},
    "keys_outside_layers": ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"],
    "keys_per_layer": [
        "input_layernorm.weight",
        "mlp.down_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "post_attention_layernorm.weight",
        "self_attn.k_proj.weight",
        "self_attn.o_proj.weight",
        "self_attn.q_proj.weight",
        "self_attn.v_proj.weight",
    ],
}
TINYLLAMA_WEIGHTS_SOURCE = (
    f"{HUB}/{LM_REPO}/blob/{LM_REVISION}/model.safetensors: 2,200,119,864 bytes (the hub's listing; also "
    "MODEL_SIZE_BYTES in third-party code that pins this revision), two bytes per parameter of the "
    "22-layer model: bfloat16"
)

# ------------------------------------------------------------------------------------------------ CLIP

# transformers 4.16's PretrainedConfig.to_dict() of a sub-config: every generation default written out.
_OLD_SUBCONFIG = {
    "_name_or_path": "",
    "add_cross_attention": False,
    "architectures": None,
    "bad_words_ids": None,
    "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None,
    "decoder_start_token_id": None,
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0,
    "finetuning_task": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_decoder": False,
    "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0,
    "max_length": 20,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beam_groups": 1,
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_scores": False,
    "prefix": None,
    "problem_type": None,
    "pruned_heads": {},
    "remove_invalid_values": False,
    "repetition_penalty": 1.0,
    "return_dict": True,
    "return_dict_in_generate": False,
    "sep_token_id": None,
    "task_specific_params": None,
    "temperature": 1.0,
    "tie_encoder_decoder": False,
    "tie_word_embeddings": True,
    "tokenizer_class": None,
    "top_k": 50,
    "top_p": 1.0,
    "torch_dtype": None,
    "torchscript": False,
    "transformers_version": "4.16.0.dev0",
    "use_bfloat16": False,
}
CLIP_CONFIG = {
    "_name_or_path": "openai/clip-vit-base-patch32",
    "architectures": ["CLIPModel"],
    "initializer_factor": 1.0,
    "logit_scale_init_value": 2.6592,
    "model_type": "clip",
    "projection_dim": 512,
    "text_config": {
        **_OLD_SUBCONFIG,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 512,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 2048,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 8,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 512,
        "vocab_size": 49408,
    },
    "text_config_dict": None,
    "transformers_version": None,
    "vision_config": {
        **_OLD_SUBCONFIG,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "dropout": 0.0,
        "eos_token_id": None,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "image_size": 224,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": None,
        "patch_size": 32,
        "projection_dim": 512,
    },
    "vision_config_dict": None,
}
CLIP_CONFIG_SOURCE = (
    f"{HUB}/{VISION_REPO}/blob/main/config.json, as copied verbatim (with its hand-edited "
    '`"projection_dim" : 512` in vision_config) into github.com/whaler404/Hf-Learn, '
    "transformers_learn/api/models/multimodal_models/clip/clip.md (commit bcaa333). No top-level "
    "torch_dtype or dtype: both sub-configs say torch_dtype null, and the weights are float32"
)

CLIP_PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
CLIP_PREPROCESSOR_SOURCE = (
    f"{HUB}/{VISION_REPO}/blob/main/preprocessor_config.json (the old feature-extractor form)"
)

# pytorch_model.bin (605 MB: 151,277,313 float32 parameters), torch.save of transformers 4.16's
# state_dict: both towers, the projections, logit_scale, and the position_ids buffers 4.16 still saved.
CLIP_WEIGHTS = {
    "file": "pytorch_model.bin",
    "dtype": "float32",
    "buffers": {
        "text_model.embeddings.position_ids": "int64",
        "vision_model.embeddings.position_ids": "int64",
    },
    "keys_outside_layers": [
        "logit_scale",
        "text_model.embeddings.position_embedding.weight",
        "text_model.embeddings.position_ids",
        "text_model.embeddings.token_embedding.weight",
        "text_model.final_layer_norm.bias",
        "text_model.final_layer_norm.weight",
        "text_projection.weight",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.embeddings.position_ids",
        "vision_model.post_layernorm.bias",
        "vision_model.post_layernorm.weight",
        "vision_model.pre_layrnorm.bias",
        "vision_model.pre_layrnorm.weight",
        "visual_projection.weight",
    ],
    "keys_per_layer": [
        f"{m}.{p}"
        for m in (
            "layer_norm1",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
            "self_attn.k_proj",
            "self_attn.out_proj",
            "self_attn.q_proj",
            "self_attn.v_proj",
        )
        for p in ("bias", "weight")
    ],
}
CLIP_WEIGHTS_SOURCE = (
    f"{HUB}/{VISION_REPO}/blob/main/pytorch_model.bin (605 MB, float32) beside "
    "tf_model.h5 and flax_model.msgpack; key names of transformers 4.16's CLIPModel"
)

# ------------------------------------------------------------------------------- llava-instruct-mix-vsft

_CONTENT = [
    {"name": "index", "dtype": "int64"},
    {"name": "text", "dtype": "string"},
    {"name": "type", "dtype": "string"},
]
VSFT_CARD = {
    "dataset_info": {
        "features": [
            {
                "name": "messages",
                "list": [{"name": "content", "list": _CONTENT}, {"name": "role", "dtype": "string"}],
            },
            {"name": "images", "sequence": "image"},
        ],
        "splits": [
            {"name": "train", "num_bytes": None, "num_examples": 259155},
            {"name": "test", "num_bytes": None, "num_examples": 13640},
        ],
        "download_size": None,
        "dataset_size": None,
    },
    "configs": [
        {
            "config_name": "default",
            "data_files": [
                {"split": "train", "path": "data/train-*"},
                {"split": "test", "path": "data/test-*"},
            ],
        }
    ],
}
VSFT_CARD_SOURCE = (
    f"{HUB}/datasets/{DATA_REPO}/blob/main/README.md: the YAML header (dataset_info beside configs). "
    "Rows: train 259,155 and test 13,640 in 20 train shards (issue 22, from the hub's viewer; the same "
    "counts and configs in the card of its derivative "
    "shijianS01/mix-random-templates-llava-vsft-259k). Byte sizes are not recorded here: the twin states "
    "its own"
)
VSFT_TRAIN_SHARDS = 20
# The user's text item beside the image keeps the newline that separated it from LLaVA's `<image>`.
VSFT_TEXT_BESIDE_IMAGE = {"image first": "\nWhat potential", "image last": "Who wrote this book?\n"}
VSFT_ROWS_SOURCE = f"{HUB}/datasets/{DATA_REPO}/viewer (issue 22)"

# ------------------------------------------------------------------------------------------ by file

PUBLISHED = {
    (LM_REPO, "config.json"): (TINYLLAMA_CONFIG, TINYLLAMA_CONFIG_SOURCE),
    (LM_REPO, "tokenizer_config.json"): (TINYLLAMA_TOKENIZER_CONFIG, TINYLLAMA_TOKENIZER_CONFIG_SOURCE),
    (LM_REPO, "tokenizer.json"): (TINYLLAMA_TOKENIZER_JSON, TINYLLAMA_TOKENIZER_JSON_SOURCE),
    (LM_REPO, "special_tokens_map.json"): (TINYLLAMA_SPECIAL_TOKENS_MAP, TINYLLAMA_SMALL_FILES_SOURCE),
    (LM_REPO, "generation_config.json"): (TINYLLAMA_GENERATION_CONFIG, TINYLLAMA_SMALL_FILES_SOURCE),
    (VISION_REPO, "config.json"): (CLIP_CONFIG, CLIP_CONFIG_SOURCE),
    (VISION_REPO, "preprocessor_config.json"): (CLIP_PREPROCESSOR_CONFIG, CLIP_PREPROCESSOR_SOURCE),
    (DATA_REPO, "README.md"): (VSFT_CARD, VSFT_CARD_SOURCE),
}

# Key paths (dots into nested dicts, [name] into lists of named entries) whose values a twin scales down.
_CLIP_TOWER = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "projection_dim",
)
SCALED = {
    (LM_REPO, "config.json"): {
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "num_key_value_heads",
        "vocab_size",
    },
    (LM_REPO, "tokenizer.json"): {"model.vocab", "model.merges"},
    (VISION_REPO, "config.json"): {
        "projection_dim",
        "text_config.vocab_size",
        *(f"{tower}.{k}" for tower in ("text_config", "vision_config") for k in _CLIP_TOWER),
    },
    (DATA_REPO, "README.md"): {
        "dataset_info.download_size",
        "dataset_info.dataset_size",
        *(f"dataset_info.splits[{s}].{k}" for s in ("train", "test") for k in ("num_bytes", "num_examples")),
    },
}
