"""POPE: reading yes/no replies, the metrics against a hand computation, the balanced subset, the twin in
the real layout, and the whole benchmark through `evaluate` (on the t4 leg: streamed from the served twin)."""

import io
import json
import os
from collections import Counter

import datasets
import pytest
from PIL import Image

from llava_nb import config, evaluate, pope
from tests.hub import twins


@pytest.mark.parametrize(
    "reply, parsed",
    [
        ("Yes", "yes"),
        ("Yes.", "yes"),
        ("yes, there is", "yes"),
        ("  YES!", "yes"),
        ("Yes, there is a dog.", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("No, there is not.", "no"),
        ("There is not a dog", "no"),
        ("nope", "no"),
        ("", "other"),
        ("   ", "other"),
        ("yes or no", "other"),
        ("Yes. No.", "other"),
        ("There is a dog.", "other"),
        ("Oui", "yes"),
        ("Oui !", "yes"),
        ("Non.", "no"),
        ("Sí", "yes"),
        ("Ja", "yes"),
        ("Nein", "no"),
        ("是", "yes"),
        ("是的，有。", "yes"),
        ("有", "yes"),
        ("不是", "no"),
        ("没有。", "no"),
        ("否", "no"),
        ("yes。", "yes"),
        ("Ｙｅｓ", "yes"),
        ("ＮＯ！", "no"),
        ("はい", "yes"),
        ("いいえ", "no"),
        ("yesterday", "other"),
        ("Nothing", "other"),
        ("Noted", "other"),
    ],
)
def test_replies_are_read_as_yes_no_or_other(reply, parsed):
    assert pope.parse_yes_no(reply) == parsed


def _rows(truths, said, category="random"):
    return [{"answer": t, "parsed": s, "category": category} for t, s in zip(truths, said)]


def test_metrics_equal_a_hand_computation():
    # truth:  yes yes yes no  no  no  | parsed: yes no  yes yes other no
    rows = _rows(["yes", "yes", "yes", "no", "no", "no"], ["yes", "no", "yes", "yes", "other", "no"])
    m = pope.metrics(rows)
    # TP = 2 (rows 0, 2); said yes 3 times (0, 2, 3); 3 true yes; correct: rows 0, 2, 5 = 3 of 6
    precision, recall = 2 / 3, 2 / 3
    assert m["accuracy"] == round(3 / 6, 4) and m["precision"] == round(precision, 4)
    assert m["recall"] == round(recall, 4)
    assert m["f1"] == round(2 * precision * recall / (precision + recall), 4)
    assert m["yes_ratio"] == 0.5 and (m["n"], m["yes"], m["no"], m["other"]) == (6, 3, 2, 1)
    assert m["per_category"]["random"] == {k: v for k, v in m.items() if k != "per_category"}
    assert m["per_category"]["adversarial"]["n"] == 0 and m["per_category"]["adversarial"]["accuracy"] is None


def test_metrics_per_category_by_hand():
    rows = _rows(["yes", "no"], ["yes", "yes"], "adversarial") + _rows(["yes", "no"], ["no", "no"], "popular")
    m = pope.metrics(rows)
    adv, pop = m["per_category"]["adversarial"], m["per_category"]["popular"]
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    assert [adv[k] for k in keys] == [0.5, 0.5, 1.0, 0.6667, 1.0]  # said yes to both: 1 of 2 right
    assert [pop[k] for k in keys] == [0.5, None, 0.0, None, 0.0]  # said no to both: never yes, no precision
    assert (m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5)
    table = pope.format_table(m)
    assert table.splitlines()[1].startswith("adversarial") and table.splitlines()[-1].startswith("all")
    assert "n/a" in table


def test_a_model_that_always_says_yes_scores_chance():
    truths = ["yes", "no"] * 30
    m = pope.metrics(_rows(truths, [pope.parse_yes_no("Yes, there is.")] * len(truths)))
    assert m["yes_ratio"] == 1.0 and m["accuracy"] == 0.5 and m["recall"] == 1.0 and m["precision"] == 0.5
    assert 100 * m["accuracy"] == pope.CHANCE


@pytest.fixture(scope="module")
def pope_twin():
    """The POPE twin as a local folder in the hub's layout (the t4 leg also serves it under its hub id)."""
    return str(twins.write_twins() / "datasets" / twins.POPE_REPO)


def test_the_twin_has_the_real_layout_features_and_balance(pope_twin):
    from pathlib import Path

    folder = Path(pope_twin)
    assert sorted(p.name for p in (folder / "data").iterdir()) == [
        f"test-0000{i}-of-00003.parquet" for i in range(3)
    ]
    card = (folder / "README.md").read_text()
    assert "config_name: default" in card and "path: data/test-*" in card and "config_name: Full" in card
    ds = datasets.load_dataset(pope_twin, split="test", streaming=True)
    assert ds.features == twins.pope_features() and list(ds.features) == list(pope.COLUMNS)
    rows = list(ds.cast_column("image", datasets.Image(decode=False)))
    counts = Counter((r["category"], r["answer"]) for r in rows)
    assert set(counts) == {(c, a) for c in pope.CATEGORIES for a in pope.ANSWERS}
    assert len(set(counts.values())) == 1  # as many of each
    image = Image.open(io.BytesIO(rows[0]["image"]["bytes"]))
    assert image.format == "JPEG" and image.mode == "RGB" and 500 <= image.width <= 640
    assert rows[0]["image"]["path"] == rows[0]["image_source"] + ".jpg"
    full = datasets.load_dataset(pope_twin, "Full", split="adversarial", streaming=True)
    assert {r["category"] for r in full.remove_columns("image")} == {"adversarial"}


def test_the_subset_is_seeded_and_balanced(pope_twin):
    first = pope.questions(pope_twin, 12, seed=0)
    assert [q["id"] for q in first] == [q["id"] for q in pope.questions(pope_twin, 12, seed=0)]
    assert Counter((q["category"], q["answer"]) for q in first) == Counter(
        {(c, a): 2 for c in pope.CATEGORIES for a in pope.ANSWERS}
    )
    other = pope.questions(pope_twin, 12, seed=1)
    assert {q["id"] for q in other} != {q["id"] for q in first}
    assert all(isinstance(q["image"], Image.Image) and q["image"].mode == "RGB" for q in first)
    seven = pope.questions(pope_twin, 7, seed=0)  # one group gets the remainder
    assert len(seven) == 7 and {q["category"] for q in seven} == set(pope.CATEGORIES)


def test_bad_rows_are_skipped_and_counted(pope_twin, tmp_path):
    every = list(
        datasets.load_dataset(pope_twin, split="test", streaming=True).cast_column(
            "image", datasets.Image(decode=False)
        )
    )
    rows = [r for c in pope.CATEGORIES for r in [r for r in every if r["category"] == c][:4]]  # 2 yes, 2 no
    rows[0]["image"] = {"bytes": b"\xff\xd8\xff\xe0 not a whole JPEG", "path": "broken.jpg"}
    rows[1]["answer"] = "maybe"
    rows[4]["category"] = "other"
    datasets.Dataset.from_list(rows, features=twins.pope_features()).to_parquet(
        str(tmp_path / "test-00000-of-00001.parquet")
    )
    skipped = Counter()
    got = pope.questions(str(tmp_path), 12, skipped=skipped)
    assert skipped == Counter(undecodable_image=1, not_yes_no=1, unknown_category=1)
    assert len(got) == 9 and rows[0]["id"] not in {q["id"] for q in got}


def test_a_dataset_that_is_not_pope_is_a_clear_error(tmp_path):
    datasets.Dataset.from_list([{"question": "Is it?", "answer": "yes"}]).to_parquet(
        str(tmp_path / "test-00000-of-00001.parquet")
    )
    with pytest.raises(pope.NotPope, match=r"lacks the column\(s\) \['id', 'question_id'"):
        pope.questions(str(tmp_path), 6)


def test_evaluate_scores_pope_from_the_model_replies(built, profile, pope_twin, monkeypatch):
    """The real prompt and generation, then the replies swapped for a rule: always yes, then always right."""
    model, processor = built
    questions = pope.questions(pope_twin, 6, seed=profile.seed)
    result = evaluate.evaluate_pope(model, processor, profile, questions=questions, max_new_tokens=2)
    assert [a["question"] for a in result.answers] == [q["question"] for q in questions]
    assert result.metrics["n"] == 6 and sum(result.metrics[k] for k in ("yes", "no", "other")) == 6
    prompts = []
    monkeypatch.setattr(
        evaluate, "answer_turns", lambda m, p, turns, *a, **k: prompts.extend(turns) or ["Yes."] * len(turns)
    )
    always = evaluate.evaluate_pope(model, processor, profile, questions=questions)
    assert always.metrics["yes_ratio"] == 1.0 and always.metrics["accuracy"] == 0.5
    text = processor.apply_chat_template(prompts[0]["prompt"], add_generation_prompt=True)
    assert questions[0]["question"] + " " + pope.INSTRUCTION in text and "<image>" in text
    monkeypatch.setattr(
        evaluate,
        "answer_turns",
        lambda m, p, turns, *a, **k: [{"yes": "Yes, there is.", "no": "No."}[q["answer"]] for q in questions],
    )
    right = evaluate.evaluate_pope(model, processor, profile, questions=questions)
    assert right.metrics["accuracy"] == right.metrics["f1"] == 1.0 and right.metrics["yes_ratio"] == 0.5
    assert "adversarial" in right.table() and "100.0%" in right.table()


def test_the_command_runs_pope_through_the_hub_or_a_folder(built, profile, pope_twin, monkeypatch, capsys):
    """On the t4 leg `--benchmark pope` streams lmms-lab/POPE from the served twin (HF_ENDPOINT), as on
    Colab; on the offline leg it reads the twin's folder (`--dataset`)."""
    monkeypatch.setattr(evaluate, "load_model", lambda checkpoint, profile, device=None: built)
    through_hub = os.environ.get(config.PROFILE_ENV) == "t4"
    source = [] if through_hub else ["--dataset", pope_twin]
    pope_args = ["--benchmark", "pope", "--limit", "6", "--max-new-tokens", "2", *source]
    metrics = evaluate.main(["--checkpoint", "untrained", "--profile", profile.name, *pope_args])
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    assert json.loads(out[-1]) == metrics and metrics["benchmark"] == "pope"
    assert metrics["dataset"] == (pope.REPO if through_hub else pope_twin)
    assert metrics["n"] == 6 and {c: r["n"] for c, r in metrics["per_category"].items()} == {
        c: 2 for c in pope.CATEGORIES
    }
    assert any(line.startswith("all") for line in out) and "skipped" not in metrics


def test_without_the_hub_pope_names_the_dataset_and_the_way_out(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from llava_nb.fsutil import HubUnreachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 with an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(HubUnreachable, match=r"'lmms-lab/POPE'.*--dataset DIR"):
        pope.questions(pope.REPO, 6)
