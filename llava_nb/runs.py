"""Where a run lives and what an export is: one folder per profile, the same for the CLI and every
notebook, Drive on Colab, and the checks that tell an export from anything else. Training writes this
layout and inference, evaluation and the demo read it; both take it from here.

`run_dir(profile)` is, first match wins:

    $LLAVA_NB_OUTPUTS/<profile>                  when set
    /content/drive/MyDrive/llava_nb/<profile>    Colab with Google Drive mounted
    <repository>/outputs/<profile>               a checkout, whatever the working directory
    ./outputs/<profile>                          an installed copy (no checkout to hold it)

Inside it, one name per folder: an export_dir is an exported model (plain transformers loads it), its
checkpoint_dir holds the trainer's checkpoint-N folders:

    stage1/  stage2/                              export_dir of each stage (`stage_dir`)
    stage1-checkpoints/  stage2-checkpoints/      checkpoint_dir beside each (`default_checkpoint_dir`)
    short/                                        notebooks 06/07's stopgap (`train.find_or_train`)

On Colab, `use_drive` also keeps the hub's download cache on Drive, so a notebook's fresh runtime finds
the backbones the previous notebook fetched (huggingface_hub reads the cache's place at each download, so
this works after transformers is imported too).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

from . import config as cfg
from .fsutil import MANIFEST, is_complete

DRIVE = Path("/content/drive")  # where Colab mounts Google Drive
DRIVE_FOLDER = "llava_nb"  # under MyDrive: run folders and the hub cache
HUB_CACHE_FOLDER = "hub-cache"  # under DRIVE_FOLDER: what HF_HUB_CACHE points at while Drive is used
OUTPUTS_ENV = "LLAVA_NB_OUTPUTS"  # overrides where run folders go
SHORT = "short"  # the export of notebooks 06/07's short stage 1, when no other is there
CHECKPOINTS_SUFFIX = "-checkpoints"  # <export_dir>-checkpoints: where an export's training checkpoints go
SUMMARY_FILE = "llava_nb_training.json"  # an export's record of its training (written by checkpoints.export)
EXPORT_FILES = ("config.json", "processor_config.json", "tokenizer_config.json")  # what every export holds
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def repo_root() -> Path | None:
    """The checkout this package was imported from, or None for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


def drive_home() -> Path | None:
    """`MyDrive/llava_nb` when Google Drive is mounted, else None."""
    return DRIVE / "MyDrive" / DRIVE_FOLDER if (DRIVE / "MyDrive").is_dir() else None


def outputs_root(profile: cfg.Profile) -> Path:
    """The folder that holds every profile's run folder (see the module docstring for the order)."""
    if os.environ.get(OUTPUTS_ENV):
        return Path(os.environ[OUTPUTS_ENV]).expanduser()
    if drive_home() is not None:
        return drive_home()
    folder = Path(profile.outputs_root).expanduser()
    return folder if folder.is_absolute() else (repo_root() or Path.cwd()) / folder


def run_dir(profile: cfg.Profile) -> Path:
    """Where a profile's stages go: `<outputs_root>/<profile>`, laid out as the module docstring draws."""
    return outputs_root(profile) / profile.name


def stage_name(stage: int) -> str:
    """`stage1`, `stage2`: a stage's export folder in the run folder."""
    return f"stage{stage}"


def stage_dir(profile: cfg.Profile, stage: int) -> Path:
    """A stage's default export_dir: `run_dir(profile)/stage<N>`."""
    return run_dir(profile) / stage_name(stage)


def default_checkpoint_dir(export_dir: str | os.PathLike) -> Path:
    """`<export_dir>-checkpoints`: beside the export, which is replaced whole when written."""
    export_dir = Path(export_dir)
    return export_dir.with_name(export_dir.name + CHECKPOINTS_SUFFIX)


def default_init_from(export_dir: str | os.PathLike) -> Path:
    """Stage 2 starts from `<export_dir>/../stage1`, the stage-1 export of the same run."""
    return Path(export_dir).parent / stage_name(1)


EXPORT_NAMES = (stage_name(2), stage_name(1), SHORT)  # a run folder's exports, as `find_export` looks


# ------------------------------------------------------------------------------------------- Drive


def mount_drive() -> bool:
    """In Colab, mount Google Drive (Colab asks for permission) so runs and downloads outlive the runtime.

    Returns whether Drive is mounted. Outside Colab it does nothing and returns False; when the mount is
    declined or fails it warns once, saying what a disconnect will cost, and returns False.
    """
    if not cfg.in_colab():
        return False
    if drive_home() is None:
        try:
            from google.colab import drive  # only exists in Colab

            drive.mount(str(DRIVE))
        except Exception as e:  # declined, timed out, or no Drive for this account
            warnings.warn(
                f"Google Drive is not mounted ({type(e).__name__}: {e}). Run folders and the hub download "
                f"cache stay on this runtime's local disk, which a disconnect or runtime reset erases: "
                f"checkpoints and exports are lost, and the next runtime downloads the backbones again "
                f"(TinyLlama and CLIP, 2.8 GB, for t4). To keep them, run this cell again and allow access "
                f"to Drive.",
                stacklevel=2,
            )
            return False
    return drive_home() is not None


def use_drive() -> dict[str, str]:
    """Colab: mount Drive and put the hub cache there (HF_HUB_CACHE), beside the run folders.

    Every notebook runs in a fresh runtime; with the cache on Drive, notebook 02 onwards reads the
    backbones notebook 01 fetched instead of downloading them again. Returns where things go.
    """
    if not cfg.in_colab():
        return {"drive": "not Colab: nothing to do"}
    if not mount_drive():
        return {"drive": "not mounted: local disk (see the warning)"}
    cache = drive_home() / HUB_CACHE_FOLDER
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_CACHE"] = str(cache)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: it read the variable at import, so tell it too
        constants.HF_HUB_CACHE = str(cache)
    return {"drive": "mounted", "runs": str(drive_home()), "hub cache": str(cache)}


# ----------------------------------------------------------------------------------------- exports


def make_checkpoint_hint(folder: str | os.PathLike, profile_name: str = "offline") -> str:
    """How to get an exported folder at `folder`: the notebook and the command that write one."""
    return (
        f"train one with notebooks/05_training.ipynb, or run `python -m llava_nb.train --profile "
        f"{profile_name} --stage 1 --export-dir {folder}`"
    )


def checkpoint_problem(folder: str | os.PathLike, profile_name: str = "offline") -> str | None:
    """None when `folder` holds a complete export (model and processor); otherwise what is wrong and what
    to do."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"no exported model at {folder}: {make_checkpoint_hint(folder, profile_name)}"
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append("model.safetensors")
    if missing:
        return (
            f"{folder} is not an exported model (missing {', '.join(missing)}; a checkpoint-N folder "
            f"holds only what trains): point at the export, or "
            f"{make_checkpoint_hint(folder, profile_name)}"
        )
    if (folder / MANIFEST).is_file() and not is_complete(folder):
        return (
            f"{folder} is damaged (a file is missing or has the wrong size, see {MANIFEST}): delete it "
            f"and {make_checkpoint_hint(folder, profile_name)}"
        )
    return None


def read_summary(folder: str | os.PathLike) -> dict:
    """The training record an export carries (`llava_nb_training.json`): settings, log history, metrics."""
    return json.loads((Path(folder) / SUMMARY_FILE).read_text())


def find_export(profile: cfg.Profile, checkpoint: str | os.PathLike | None = None) -> Path | None:
    """The export to use: `checkpoint` when given (it must be one), else the newest complete export in
    `run_dir(profile)` (stage2/, stage1/ or short/), else None. Prints where it looked."""
    if checkpoint is not None:
        problem = checkpoint_problem(checkpoint, profile.name)
        if problem:
            raise FileNotFoundError(problem)
        return Path(checkpoint)
    run = run_dir(profile)
    found = [run / name for name in EXPORT_NAMES if checkpoint_problem(run / name, profile.name) is None]
    if not found:
        print(f"no export in {run} (looked for {', '.join(EXPORT_NAMES)})")
        return None
    newest = max(found, key=lambda folder: folder.stat().st_mtime)  # an export is renamed into place whole
    print(f"using {newest}" + (f" (newest of {', '.join(f.name for f in found)})" if len(found) > 1 else ""))
    return newest


def describe_export(folder: str | os.PathLike) -> dict[str, object]:
    """Which export this is and how it was trained (from the record `llava_nb.train` writes into it)."""
    folder = Path(folder)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(folder.stat().st_mtime))
    if not (folder / SUMMARY_FILE).is_file():
        return {"export": str(folder), "written": when, "trained": f"unknown (no {SUMMARY_FILE})"}
    summary = read_summary(folder)
    metrics = summary.get("metrics", {})
    return {
        "export": str(folder),
        "written": when,
        "profile": summary.get("profile"),
        "stage": summary.get("stage"),
        "steps": summary.get("train", {}).get("max_steps"),
        "batch": summary.get("train", {}).get("per_device_train_batch_size"),
        "init_from": summary.get("init_from"),
        "eval_loss": metrics.get("eval_loss"),
        "dataset": summary.get("dataset"),
    }
