"""Evaluation: answer normalisation, teacher-forced question turns, the token loss, the command's JSON
line."""

import json

import numpy as np
import pytest
import torch

from llava_nb import config, evaluate, plots, scoring, synthetic
from llava_nb.data import LlavaCollator


@pytest.mark.parametrize(
    "predicted, expected",
    [
        ("Red.", "red"),
        ("  RED ", "Red."),
        ("The red.", "Red."),
        ("3", "Three."),
        ("three", "3"),
        ("Left!", "left"),
        ("a circle", "Circle."),
        ("Two", "2."),
        ("zero.", "0"),
    ],
)
def test_equivalent_answers_match(predicted, expected):
    assert scoring.is_correct(predicted, expected)


@pytest.mark.parametrize(
    "predicted, expected",
    [
        ("The circle is red.", "Red."),
        ("redd", "red"),
        ("Two.", "Three."),
        ("", "Left."),
        ("left or right", "Left."),
    ],
)
def test_different_answers_do_not(predicted, expected):
    assert not scoring.is_correct(predicted, expected)


def test_normalisation():
    assert scoring.normalize_answer("The THREE red, circles!") == "3 red circles"
    assert scoring.normalize_answer("An apple... a day") == "apple day"


def _multi_turn_sample(seed=3):
    rng = np.random.default_rng(seed)
    while True:
        sample = synthetic.make_sample(rng)
        if len(sample["messages"]) >= 4:
            return sample


def test_question_turns_carry_the_true_history():
    sample = _multi_turn_sample()
    turns = scoring.question_turns(sample, sample_index=5)
    messages = sample["messages"]
    assert len(turns) == len(messages) // 2
    for k, turn in enumerate(turns):
        assert turn["prompt"] == messages[: 2 * k + 1]  # earlier replies are the dataset's, not the model's
        assert turn["expected"] == messages[2 * k + 1]["content"][0]["text"]
        assert turn["kind"] == synthetic.question_kind(turn["question"]) in synthetic.TEMPLATES
        assert turn["images"] == sample["images"] and turn["sample"] == 5 and turn["turn"] == k


def test_eval_loss_is_the_models_own_loss_on_one_batch(built):
    model, processor = built
    samples = [_multi_turn_sample(1), _multi_turn_sample(2)]
    loss, tokens, skipped = scoring.eval_loss(model, processor, samples, max_length=256, batch_size=2)
    batch = LlavaCollator(processor, max_length=256)(samples)
    with torch.inference_mode():
        reference = model(**batch).loss.item()  # mean over the batch's supervised tokens
    assert loss == pytest.approx(reference, rel=1e-4)
    assert tokens == int((batch["labels"][:, 1:] != -100).sum()) and not skipped


def test_command_prints_a_table_then_one_json_line(built, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_model", lambda checkpoint, profile, device=None: built)
    metrics = evaluate.main(
        ["--checkpoint", "untrained", "--profile", "offline", "--limit", "2", "--max-new-tokens", "2"]
    )
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    assert "eval loss" in "\n".join(out[:-1]) and "accuracy" in out[2]
    last = json.loads(out[-1])
    assert last == metrics
    assert {"accuracy", "n", "eval_loss", "per_kind", "n_questions"} <= set(last)
    assert last["n"] == 2 and last["checkpoint"] == "untrained" and last["eval_loss"] > 0
    assert last["n_questions"] == sum(row["n"] for row in last["per_kind"].values())


def test_answers_line_up_for_a_before_after_grid(built):
    model, processor = built
    profile = config.get_profile("offline")
    samples = evaluate.held_out_samples(profile, 2)
    result = evaluate.evaluate(model, processor, profile, samples=samples, max_new_tokens=2, name="untrained")
    assert all(a["image"] is not None and a["correct"] is not None for a in result.answers)
    assert result.metrics["accuracy"] == pytest.approx(
        sum(a["correct"] for a in result.answers) / len(result.answers), abs=1e-4
    )
    # "after": the same questions, answered by a rule that is always right, so the columns must differ
    right = [dict(a, predicted=a["expected"], correct=True) for a in result.answers]
    after = scoring.Evaluation(
        dict(result.metrics, **scoring.metrics_by_kind(right, synthetic.QUESTION_KINDS)), right
    )
    fig = plots.answer_grid({"before": result.answers, "after": right}, n=2, ncols=2)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    shown = sorted(right, key=lambda a: a["turn"])[:2]  # the grid shows first turns first
    assert len(titles) == 2 and all(f"after: {a['expected']} ✓" in t for a, t in zip(shown, titles)), titles
    table = scoring.comparison({"before": result, "after": after})
    assert set(table["before"]) == {*synthetic.QUESTION_KINDS, "all", "eval_loss"}
    assert table["after"]["all"] == 1.0 and table["before"]["all"] == result.metrics["accuracy"]


def test_t4_path_reads_its_images_and_reports_no_accuracy(built, monkeypatch, tmp_path):
    """The t4 branch on local data: loss on the split, answers on the fixed images (urlopen faked: no
    network)."""
    import io

    from llava_nb import infer

    model, processor = built
    png = io.BytesIO()
    synthetic.draw_scene(np.random.default_rng(0))[0].save(png, format="PNG")

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    urls = []
    monkeypatch.setattr(
        infer.urllib.request,
        "urlopen",
        lambda request, timeout: urls.append(request.full_url) or Response(png.getvalue()),
    )
    offline = config.get_profile("offline")
    samples = evaluate.held_out_samples(offline, 2)  # local stand-ins for the hub's free-form test split
    profile = config.get_profile("offline", data={"dataset": evaluate.FREE_FORM_DATASETS[0]})
    result = evaluate.evaluate(model, processor, profile, 2, max_new_tokens=2, samples=samples)
    assert urls == [url for url, _, _ in evaluate.T4_IMAGES]
    assert result.metrics["accuracy"] is None and "note" in result.metrics and result.metrics["n"] == 2
    assert [a["question"] for a in result.answers] == [q for _, q, _ in evaluate.T4_IMAGES]
    assert all(a["correct"] is None for a in result.answers) and result.metrics["eval_loss"] > 0
    assert "n/a" in result.table()


def test_a_users_dataset_is_scored_on_its_short_answers(built):
    """--dataset of one's own: replies of a few words scored (unknown phrasings: 'other'), long ones not."""
    model, processor = built
    image = synthetic.draw_scene(np.random.default_rng(0))[0]

    def turn(role, text, image_first=False):
        content = [{"type": "image", "text": None, "index": 0}] if image_first else []
        return {"role": role, "content": content + [{"type": "text", "text": text, "index": None}]}

    samples = [
        {
            "images": [image],
            "messages": [
                turn("user", "Which fruit is this?", image_first=True),
                turn("assistant", "A green apple."),
                turn("user", "Describe it."),
                turn("assistant", "A round fruit lying on a white table in the sun."),
                turn("user", "How many shapes are there?"),
                turn("assistant", "Two."),
            ],
        }
    ]
    replies = ("A green apple.", "Two.", "A round fruit lying on a table.", "")
    assert [scoring.is_short_answer(t) for t in replies] == [True, True, False, False]
    profile = config.get_profile("offline", data={"dataset": "/somewhere/my-dataset"})
    result = evaluate.evaluate(model, processor, profile, samples=samples, max_new_tokens=2)
    expected = [("other", "A green apple."), ("count", "Two.")]
    assert [(a["kind"], a["expected"]) for a in result.answers] == expected
    assert set(result.metrics["per_kind"]) == {"count", "other"} and result.metrics["n_questions"] == 2
    assert result.metrics["accuracy"] is not None and "note" not in result.metrics
