"""The four private Trainer methods that `llava_nb.trainer.LlavaTrainer` overrides, checked against the
installed transformers on every CI leg (newest and Colab's 5.15): if a release renames one, changes its
parameters or
stops calling it where we rely on it, this fails here, loudly, instead of checkpoints silently going wrong."""

import inspect

import pytest
from transformers import Trainer

from llava_nb import trainer

OVERRIDDEN = {  # name: the parameters LlavaTrainer's override takes
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
    "_save_checkpoint": ["self", "model", "trial"],
    "_get_output_dir": ["self", "trial"],
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],
}


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_the_private_method_still_exists_with_the_parameters_we_override(name):
    assert hasattr(Trainer, name), f"transformers' Trainer has no {name} any more: update llava_nb/trainer.py"
    theirs = list(inspect.signature(getattr(Trainer, name)).parameters)
    ours = list(inspect.signature(getattr(trainer.LlavaTrainer, name)).parameters)
    assert theirs == ours == OVERRIDDEN[name], f"Trainer.{name}{theirs} changed: update llava_nb/trainer.py"


def test_trainer_still_calls_them_where_our_overrides_rely_on_it():
    save = inspect.getsource(Trainer._save_checkpoint)
    assert "_get_output_dir" in save and "save_model" in save  # the staging folder, and only what trains
    import transformers.trainer

    module = inspect.getsource(
        transformers.trainer
    )  # where resume_from_checkpoint is followed (varies by version)
    assert "self._load_from_checkpoint(" in module and "self._load_optimizer_and_scheduler(" in module


def test_only_llava_nb_trainer_overrides_private_trainer_methods():
    from pathlib import Path

    import llava_nb

    package = Path(llava_nb.__file__).parent
    for path in package.glob("*.py"):
        text = path.read_text()
        found = [name for name in OVERRIDDEN if f"def {name}(" in text]
        assert path.name == "trainer.py" or not found, (
            f"{path.name} overrides {found}: keep them in trainer.py"
        )
