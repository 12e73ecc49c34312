"""Training on the offline model with tiny budgets: exact resume, atomic checkpoints, exports that plain
transformers loads, what stage 2 may change, and the memory formula against what torch really saves."""

import itertools
import json
import signal
import subprocess
import sys

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoProcessor, LlamaModel, LlavaForConditionalGeneration

from llava_nb import checkpoints, config, memory, plots, runs, streams, surgery, synthetic, train, trainer
from llava_nb.fsutil import write_manifest

PROJECTOR = "model.multi_modal_projector."
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Short samples, batch 1 x accumulation 2 (a step reads 2 samples), a save every step.
# The smoke budget (config.BUDGETS: 3 and 2 steps, a save every step or two) with shorter samples, batch 1 x
# accumulation 2 in stage 1 (a step reads 2 samples) and a save every step in stage 2.
TINY = dict(
    data=dict(max_length=160),
    stage1=dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, eval_samples=0),
    stage2=dict(per_device_train_batch_size=1, gradient_accumulation_steps=1, save_steps=1, eval_samples=2),
)


@pytest.fixture(scope="module")
def tiny(profile):
    """The profile under test on the smoke budget, with TINY's changes."""
    return config.get_profile(profile.name, "smoke", **TINY)


@pytest.fixture(scope="module")
def stage1(tiny, tmp_path_factory):
    """An uninterrupted 3-step stage-1 run, exported."""
    root = tmp_path_factory.mktemp("run")
    return train.train(tiny, 1, export_dir=root / "stage1")


def trained(run: train.TrainResult, step: int) -> dict[str, torch.Tensor]:
    return load_file(run.checkpoint_dir / f"checkpoint-{step}" / checkpoints.TRAINABLE_FILE)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_stream_is_one_order_per_seed_and_starts_anywhere(tmp_path, monkeypatch):
    # datasets 5 sleeps 5 s after each pass over parquet files (apache/arrow#45214; 4.0 does not); ~12 here
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)
    root = synthetic.write_dataset(tmp_path / "ds", seed=3, n_train=40, n_test=2, shard_size=20)

    def messages(start: int, n: int, **grouping) -> list:
        stream = streams.TrainStream(
            str(root), "train", max_turns=1, seed=5, shuffle_buffer=4, start=start, **grouping
        )
        return [s["messages"] for s in itertools.islice(stream, n)]

    first = messages(0, 30)  # 4 single-turn samples a pass: 7 passes, each reshuffled
    assert messages(0, 30) == first
    assert messages(11, 19) == first[11:]
    grouped = messages(0, 30, group=2, length_window=2)  # grouped by length: still one order, any start
    per_pass = sum(1 for _ in streams.stream(str(root), "train", max_turns=1, shuffle_buffer=0))
    assert grouped != first and sorted(map(str, grouped[:per_pass])) == sorted(map(str, first[:per_pass]))
    assert messages(11, 19, group=2, length_window=2) == grouped[11:]


def test_only_the_projector_trains_in_stage1(stage1):
    p = stage1.parameters
    assert p["projector"]["trainable"] == p["projector"]["total"] > 0
    assert sum(v["trainable"] for v in p.values()) == p["projector"]["total"]
    assert list(trained(stage1, 3)) and all(k.startswith(PROJECTOR) for k in trained(stage1, 3))


def test_resume_after_an_interruption_matches_the_uninterrupted_run(stage1, tiny, tmp_path):
    out = tmp_path / "stage1"
    cut = train.train(tiny, 1, export_dir=out, callbacks=[trainer.StopAtStep(1)], export_model=False)
    assert cut.global_step == 1 and cut.export_dir is None
    resumed = train.train(tiny, 1, export_dir=out, resume=True, export_model=False)
    assert resumed.resumed_from.name == "checkpoint-1" and resumed.global_step == 3
    assert checkpoints.read_position(resumed.checkpoint_dir / "checkpoint-3") == 6  # 3 steps x 1 sample x 2
    assert_same_tensors(trained(resumed, 3), trained(stage1, 3))
    assert [c.name for c in checkpoints.checkpoints(resumed.checkpoint_dir)] == [
        "checkpoint-2",
        "checkpoint-3",
    ]


def test_a_save_killed_by_sigkill_leaves_the_previous_checkpoint_usable(stage1, tiny, tmp_path):
    """A training process killed (SIGKILL) in the middle of writing checkpoint-2 leaves checkpoint-1 whole,
    and --resume continues from it to exactly where the uninterrupted run got."""
    out = tmp_path / "stage1"
    script = f"""
import json, os, signal
from llava_nb import config, train, trainer
real = trainer.LlavaTrainer._save_rng_state
def killed_mid_save(self, output_dir):  # weights and optimizer of step 2 written, RNG and state not yet
    if self.state.global_step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, output_dir)
trainer.LlavaTrainer._save_rng_state = killed_mid_save
profile = config.get_profile({tiny.name!r}, {tiny.budget!r}, **json.loads({json.dumps(TINY)!r}))
train.train(profile, 1, export_dir={str(out)!r}, export_model=False)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    folder = runs.default_checkpoint_dir(out)
    assert (
        folder / ".staging-checkpoint-2" / "checkpoint-2" / checkpoints.TRAINABLE_FILE
    ).is_file()  # half saved
    assert [c.name for c in checkpoints.checkpoints(folder)] == ["checkpoint-1"]
    resumed = train.train(
        tiny, 1, export_dir=out, resume=True, export_model=False, callbacks=[trainer.StopAtStep(2)]
    )
    assert resumed.resumed_from.name == "checkpoint-1" and resumed.global_step == 2
    assert not list(folder.glob(".staging-*"))
    assert_same_tensors(trained(resumed, 2), trained(stage1, 2))


def test_incomplete_checkpoint_folders_are_ignored(tmp_path):
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / checkpoints.TRAINABLE_FILE).write_bytes(b"x" * 10)
    write_manifest(tmp_path / "checkpoint-1")
    assert checkpoints.last_checkpoint(tmp_path).name == "checkpoint-1"
    (tmp_path / "checkpoint-1" / checkpoints.TRAINABLE_FILE).write_bytes(b"x")  # truncated after the fact
    assert checkpoints.last_checkpoint(tmp_path) is None


def test_export_loads_and_generates_without_llava_nb(stage1):
    script = f"""
import sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained({str(stage1.export_dir)!r})
processor = AutoProcessor.from_pretrained({str(stage1.export_dir)!r})
question = [{{"type": "image"}}, {{"type": "text", "text": "What colour is the circle?"}}]
chat = [{{"role": "user", "content": question}}]
inputs = processor(images=Image.new("RGB", (224, 224), "red"), return_tensors="pt",
                   text=processor.apply_chat_template(chat, add_generation_prompt=True))
out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
assert out.shape[1] > inputs["input_ids"].shape[1]
assert "llava_nb" not in sys.modules
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_stage1_export_keeps_the_language_model_exact(stage1, source_lm):
    model = LlavaForConditionalGeneration.from_pretrained(stage1.export_dir).eval()
    processor = AutoProcessor.from_pretrained(stage1.export_dir)
    ids = processor.tokenizer(
        "USER: What colour is the circle? ASSISTANT: Red.", return_tensors="pt"
    ).input_ids
    assert runs.read_summary(stage1.export_dir)["stage"] == 1
    assert stage1.metrics["steps"] == 3
    assert model.config.text_config.use_cache
    assert surgery.text_logits_max_diff(model, source_lm, ids) < 1e-4


def test_the_stage1_export_says_the_dtype_its_weights_are_stored_in(stage1):
    """config.json's `dtype` (transformers 5's key), in the model's config and its text and vision configs,
    is the dtype of every tensor in model.safetensors: the frozen weights' (fp32 on a CPU, fp16 on a GPU),
    not the bfloat16 TinyLlama's config names."""
    from safetensors import safe_open

    saved = json.loads((stage1.export_dir / "config.json").read_text())
    names = {saved.get("dtype"), saved["text_config"].get("dtype"), saved["vision_config"].get("dtype")}
    with safe_open(stage1.export_dir / "model.safetensors", framework="pt") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys()}
    expected = "float16" if torch.cuda.is_available() else "float32"
    assert names == {expected} and stored == {{"float16": "F16", "float32": "F32"}[expected]}


def test_stage2_changes_only_the_projector_and_lora_targets(stage1, tiny, tmp_path):
    run = train.train(tiny, 2, export_dir=tmp_path / "stage2", init_from=stage1.export_dir)
    p = run.parameters
    assert p["vision_tower"]["trainable"] == 0 and p["lm_head"]["trainable"] == 0
    assert p["projector"]["trainable"] == p["projector"]["total"]
    # LoRA only: r x (in + out) for every linear layer of the language model, nothing else
    llava = LlavaForConditionalGeneration.from_pretrained(stage1.export_dir)
    linears = [m for m in llava.model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    r = tiny.stage2.lora_r
    assert p["language_model"]["trainable"] == sum(r * (m.in_features + m.out_features) for m in linears)
    assert any("eval_loss" in e for e in run.log_history)
    # compare as transformers loads them (the file itself uses the hub's legacy key names)
    before = LlavaForConditionalGeneration.from_pretrained(stage1.export_dir).state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(run.export_dir).state_dict()
    assert before.keys() == after.keys()  # merged: no lora_A / lora_B left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_weights = {
        k
        for k in before
        if k.startswith("model.language_model.")
        and k.rsplit(".", 2)[-2] in LORA_TARGETS
        and k.endswith(".weight")
    }
    assert changed <= lora_weights | {k for k in before if k.startswith(PROJECTOR)}
    assert any(k.startswith(PROJECTOR) for k in changed)
    assert len(changed & lora_weights) > len(lora_weights) // 2
    assert not any(
        k.startswith(("model.vision_tower.", "lm_head")) or "norm" in k or "embed" in k for k in changed
    )


def test_stage2_without_a_stage1_export_says_what_to_do(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="run stage 1 first"):
        train.train(tiny, 2, export_dir=tmp_path / "stage2")


def test_find_or_train_checks_a_given_export_finds_one_or_trains_a_short_stage1(
    stage1, tiny, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(runs.OUTPUTS_ENV, str(tmp_path))
    assert train.find_or_train(tiny, stage1.export_dir) == stage1.export_dir  # given: used as it is
    with pytest.raises(FileNotFoundError, match="no exported model"):
        train.find_or_train(tiny, tmp_path / "nowhere")
    capsys.readouterr()
    short = train.find_or_train(tiny, short_steps=2)  # an empty run folder: min(2, 3) steps trained here
    assert short == runs.run_dir(tiny) / runs.SHORT and runs.checkpoint_problem(short) is None
    assert runs.read_summary(short)["train"]["max_steps"] == 2
    assert "training 2 stage-1 steps" in capsys.readouterr().out
    assert train.find_or_train(tiny, short_steps=2) == short  # found now: nothing trained
    assert "training" not in capsys.readouterr().out


def test_training_arguments_follow_the_tutorial():
    t = config.get_profile("t4").stage1
    args = trainer.training_arguments(t, "unused", seed=0, evaluate=True)
    assert (args.max_steps, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (350, 2, 4)
    assert args.learning_rate == 2e-4 and args.lr_scheduler_kwargs == {"min_lr": 2e-5}
    assert args.lr_scheduler_type.value == "cosine_with_min_lr"
    assert args.get_warmup_steps(350) == 18  # 5 % of 350, rounded up


@pytest.mark.parametrize("lora_r", [0, 8])
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's call
def test_activation_formula_matches_what_autograd_saves(backbones, lora_r):
    """Per decoder layer and token, the formula equals the bytes torch keeps for backward (fp32, CPU)."""
    from peft import LoraConfig, get_peft_model

    measured = []
    for layers in (1, 2):  # the difference is one layer, free of embeddings and the final norm
        text = AutoConfig.from_pretrained(backbones.lm_dir, num_hidden_layers=layers)
        text._attn_implementation = "sdpa"
        model = LlamaModel(text).requires_grad_(False)
        if lora_r:
            lora = LoraConfig(r=lora_r, lora_dropout=0.05, target_modules=list(LORA_TARGETS))
            model = get_peft_model(model, lora)
        model.train()
        weights = {w.untyped_storage().data_ptr() for w in [*model.parameters(), *model.buffers()]}
        saved = {}

        def pack(t, weights=weights, saved=saved):
            if t.untyped_storage().data_ptr() not in weights:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        b, s = 2, 16
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(
                inputs_embeds=torch.randn(b, s, text.hidden_size, requires_grad=True),
                attention_mask=torch.ones(b, s, dtype=torch.long),
            )
        measured.append(sum(saved.values()) / (b * s))
    h, i = text.hidden_size, text.intermediate_size
    formula = memory.saved_bytes_per_token_layer(
        text, lora=(7, 6 * h + i), lora_r=lora_r, act_bytes=4, mask_bytes=4
    )
    assert formula == pytest.approx(measured[1] - measured[0], rel=0.01)


def test_memory_plan_of_the_t4_recipe_fits_a_t4():
    t4 = config.get_profile("t4")
    one = memory.memory_plan(t=t4.stage1, seq_len=t4.data.max_length, checkpointing=False)
    one_ckpt = memory.memory_plan(t=t4.stage1, seq_len=t4.data.max_length, checkpointing=True)
    two = memory.memory_plan(t=t4.stage2, seq_len=t4.data.max_length)
    assert one["trainable parameters (M)"] == 5.77  # 768*2048 + 2048 + 2048*2048 + 2048
    assert 2.1 < one["frozen weights (fp16)"] < 2.3  # TinyLlama 1.1B + CLIP-B/32 vision 88M, 2 bytes each
    assert one_ckpt["activations"] < one["activations"] / 4
    assert two["trainable parameters (M)"] > one["trainable parameters (M)"]
    assert max(one["total"], two["total"]) < 14.5  # a T4 has 15 GiB


def test_loss_curve_draws_train_and_eval_loss():
    history = [{"loss": 3.0 - 0.1 * s, "step": s} for s in range(1, 6)] + [
        {"eval_loss": 2.9, "step": 5},
        {"train_loss": 2.7, "step": 5},
    ]
    fig = plots.loss_curve(history)
    assert [line.get_label() for line in fig.axes[0].lines] == ["train loss", "eval loss (held out)"]
    with pytest.raises(ValueError, match="no 'loss'"):
        plots.loss_curve([{"train_runtime": 1.0}])


def test_command_line_help():
    done = subprocess.run(
        [sys.executable, "-m", "llava_nb.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for flag in (
        "--profile",
        "--stage",
        "--export-dir",
        "--max-steps",
        "--save-steps",
        "--dataset",
        "--resume",
        "--seed",
        "--init-from",
    ):
        assert flag in done.stdout
