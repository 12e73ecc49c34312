"""The export's model card: the hub's metadata as huggingface_hub reads it back, the recipe, and scores that
are exactly what `python -m llava_nb.evaluate` printed (the card is rewritten, the export stays whole)."""

import copy
import dataclasses
import json
import os

import pytest
from huggingface_hub import ModelCard, ModelCardData

from llava_nb import cards, checkpoints, config, evaluate, fsutil, pope, runs
from tests.hub import twins


def _summary(profile) -> dict:
    """An export's training record, as llava_nb.train writes it."""
    return {
        "profile": profile.name,
        "stage": 1,
        "seed": 0,
        "dataset": profile.data.dataset,
        "train": dataclasses.asdict(profile.stage1),
        "data": dataclasses.asdict(profile.data),
        "model": {"vision_id": profile.model.vision_id, "lm_id": profile.model.lm_id},
        "init_from": None,
        "metrics": {"eval_loss": 1.23456, "steps": 3},
    }


@pytest.fixture(scope="module")
def export(built, profile, tmp_path_factory):
    model, processor = built
    folder = tmp_path_factory.mktemp("card") / "stage1"
    return checkpoints.export(copy.deepcopy(model), processor, folder, summary=_summary(profile))


def test_every_export_has_a_card_that_the_hub_library_reads(export, profile):
    card = ModelCard.load(export / cards.CARD_FILE)
    data = card.data
    assert isinstance(data, ModelCardData)
    assert data.pipeline_tag == "image-text-to-text" and data.library_name == "transformers"
    assert data.model_name == f"llava_nb-{profile.name}-stage1" and "llava" in data.tags
    if profile.name == "t4":
        assert data.base_model == [twins.VISION_REPO, twins.LM_REPO] and data.datasets == [twins.DATA_REPO]
        # TinyLlama's card says apache-2.0; openai's CLIP card has no licence tag (its repository: MIT)
        assert (data.license, data.license_name) == ("other", "apache-2.0-and-openai-clip")
        assert data.license_link.startswith("https://github.com/openai/CLIP")
    else:
        assert data.base_model == ["HuggingFaceTB/SmolLM2-135M-Instruct"] and data.datasets is None
        assert data.license == "apache-2.0"
    # the metadata survives a round trip through the library's own validation
    again = ModelCardData(**data.to_dict())
    assert again.eval_results[0].metric_value == 1.2346 and again.eval_results[0].metric_type == "loss"
    text = card.text
    t = profile.stage1
    assert f"| {profile.name} | 1 | {t.max_steps} | {t.per_device_train_batch_size} per" in text
    assert str(t.learning_rate) in text and "LlavaForConditionalGeneration.from_pretrained" in text
    assert runs.checkpoint_problem(export) is None and fsutil.is_complete(export)


def test_the_card_holds_the_scores_evaluate_printed(export, profile, capsys):
    """Both benchmarks in turn: each replaces its own scores, keeps the others; the export stays complete."""
    through_hub = os.environ.get(config.PROFILE_ENV) == "t4"
    mtime = export.stat().st_mtime_ns
    source = [] if through_hub else ["--dataset", str(twins.write_twins() / "datasets" / twins.POPE_REPO)]
    pope_args = ["--benchmark", "pope", "--limit", "6", "--max-new-tokens", "2", *source]
    printed = evaluate.main(["--checkpoint", str(export), "--profile", profile.name, *pope_args])
    assert json.loads(capsys.readouterr().out.rstrip("\n").splitlines()[-1]) == printed
    tested = evaluate.main(
        ["--checkpoint", str(export), "--profile", profile.name, "--limit", "2", "--max-new-tokens", "2"]
    )
    card = ModelCard.load(export / cards.CARD_FILE)
    scores = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    pope_source = printed["dataset"]
    for metric in ("accuracy", "f1", "precision", "recall", "yes_ratio"):
        if printed[metric] is not None:
            assert scores[(pope_source, metric)] == printed[metric]
    assert scores[(profile.data.dataset, "loss")] == tested["eval_loss"] != 1.2346  # evaluate's, not train's
    assert scores.get((profile.data.dataset, "accuracy")) == tested["accuracy"]  # t4: None, free-form replies
    by = {r.metric_config for r in card.data.eval_results}
    assert by == {cards.MEASURED_BY["evaluate"]}
    assert f"| POPE | test | accuracy | {printed['accuracy']} |" in card.text
    assert runs.checkpoint_problem(export) is None and export.stat().st_mtime_ns == mtime
    assert not [p for p in export.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    assert pope.REPO == "lmms-lab/POPE" and (pope_source == pope.REPO) == through_hub


def test_licence_fields_follow_the_sources():
    t4, offline = config.get_profile("t4").model, config.get_profile("offline").model
    assert cards.license_fields([t4.vision_id, t4.lm_id])["license"] == "other"
    assert cards.license_fields([offline.vision_id, offline.lm_id]) == {"license": "apache-2.0"}
    assert cards.license_fields(["someone/unknown"]) == {}


def test_an_export_without_a_training_record_still_has_a_card(tmp_path):
    path = cards.write_card(tmp_path, None)
    card = ModelCard.load(path)
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.eval_results is None
    assert "no training record" in card.text
