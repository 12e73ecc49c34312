"""The notebooks as Colab and Jupyter users meet them: T4 metadata, one short first cell that gets the project
from the one place that names the repository (pyproject.toml), README badges that agree, no placeholder URLs
elsewhere, no cell repeated across notebooks, and plots that arrive as pictures in a stock kernel."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from llava_nb import colab

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
URL = re.compile(r"https?://[^\s\"'`)\]]+")
PLACEHOLDER = re.compile(r"[<>]|\byou\b|your[-_]|example\.(com|org)|OWNER|USER(NAME)?\b", re.IGNORECASE)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_seven_notebooks_are_all_there():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_opens_every_notebook_on_a_t4_with_the_bootstrap_cell(path):
    notebook = read(path)
    assert notebook["metadata"]["accelerator"] == "GPU"
    assert notebook["metadata"]["colab"]["gpuType"] == "T4"
    assert "".join(colab.first_code_cell(notebook)["source"]) == colab.bootstrap_source(), (
        f"{path.name}: its first code cell is not llava_nb/colab.py's: run python -m llava_nb.colab"
    )
    assert notebook["cells"][0]["cell_type"] == "markdown"  # the title comes first, then the bootstrap
    assert len(colab.bootstrap_source().splitlines()) < 8
    assert "runs.use_drive()" in "".join("".join(c["source"]) for c in notebook["cells"])  # runs on Drive


def test_no_run_of_six_lines_repeats_across_notebooks():
    seen: dict[tuple[str, ...], str] = {}
    for path in NOTEBOOKS:
        for cell in read(path)["cells"][2:]:  # after the title and the Colab cell
            lines = [line.strip() for line in "".join(cell["source"]).splitlines() if line.strip()]
            for i in range(len(lines) - 5):
                run = tuple(lines[i : i + 6])
                assert seen.setdefault(run, path.name) == path.name, (
                    f"{path.name} repeats six lines of {seen[run]}: {run}"
                )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_notebook_holds_a_placeholder_url(path):
    notebook = read(path)
    for cell in notebook["cells"]:
        if cell is colab.first_code_cell(notebook):  # the repository from pyproject.toml (tested above)
            continue
        for url in URL.findall("".join(cell["source"])):
            if "{" in url:  # built from a value in the cell, e.g. https://github.com/{REPO}
                continue
            assert not PLACEHOLDER.search(url), f"{path.name}: placeholder URL {url!r}"


def test_readme_badges_and_the_notebooks_first_cell_come_from_pyproject():
    readme = (ROOT / "README.md").read_text()
    assert colab.badges_markdown(ROOT) in readme, "README badges differ: run python -m llava_nb.colab"
    repo = colab.github_repo()
    for path in NOTEBOOKS:
        assert colab.colab_url(path.name) in readme
        assert f"https://github.com/{repo}" in "".join(colab.first_code_cell(read(path))["source"])
    assert readme.count("colab.research.google.com/github/") == len(NOTEBOOKS)  # no badge outside the block


def test_writing_the_notebooks_again_changes_nothing(tmp_path):
    for path in NOTEBOOKS:
        copy = tmp_path / path.name
        copy.write_text(path.read_text())
        assert not colab.write_notebook(copy), f"{path.name} is not as python -m llava_nb.colab writes it"


def test_setting_the_repository_writes_pyproject_only(tmp_path):
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    colab.set_repo("bob/fork-of-it", root=tmp_path)
    assert colab.github_repo(tmp_path) == "bob/fork-of-it"
    assert "https://github.com/bob/fork-of-it" in colab.bootstrap_source(colab.github_repo(tmp_path))
    with pytest.raises(SystemExit, match="owner/name"):
        colab.set_repo("not a repository", root=tmp_path)


def test_colab_setup_installs_no_test_tools():
    script = "\n".join(line.split("#")[0] for line in (ROOT / "colab_setup.sh").read_text().splitlines())
    assert "requirements-dev" not in script
    assert not re.search(r"\b(pytest|nbmake|playwright|nbclient)\b", script)


def run_bootstrap(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The first cell as a script, in a folder that is not a checkout, with a `git` that only records."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    git = tmp_path / "bin" / "git"
    git.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/git-args\nexit 1\n')  # no network: the clone "fails"
    git.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COLAB_")}
    return subprocess.run(
        [sys.executable, "-c", colab.bootstrap_source("bob/fork-of-it")],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=60,
        env={**clean, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", **env},
    )


def test_outside_colab_the_first_cell_does_nothing(tmp_path):
    done = run_bootstrap(tmp_path, {})
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "git-args").exists()


def test_in_colab_the_first_cell_clones_the_repository_and_stops_when_that_fails(tmp_path):
    done = run_bootstrap(tmp_path, {"COLAB_RELEASE_TAG": "test"})
    assert (tmp_path / "git-args").read_text().split() == [
        "clone",
        "-q",
        "--depth=1",
        "https://github.com/bob/fork-of-it",
        colab.CLONE_DIR,
    ]
    assert done.returncode != 0 and "CalledProcessError" in done.stderr  # nothing runs after a failed clone


PLOT_INPUTS = """\
import numpy as np
from types import SimpleNamespace
from llava_nb import config, evaluate, plots
profile = config.get_profile("t4")
history = [{"loss": 3.0 - 0.1 * s, "step": s} for s in range(1, 6)] + [{"eval_loss": 2.9, "step": 5}]
result1 = result2 = SimpleNamespace(log_history=history)
scene = np.full((64, 64, 3), 255, dtype=np.uint8)
answers = [dict(turn=0, image=scene, question="What colour?", expected="red", predicted=p, correct=p == "red")
           for p in ("red", "blue")]
before = after = SimpleNamespace(answers=answers)
pope_before = SimpleNamespace(metrics={"accuracy": 0.5, "f1": 0.6667})
pope_after = SimpleNamespace(metrics={"accuracy": 0.8, "f1": 0.79})"""


def test_the_notebooks_plotting_cells_show_pictures_in_a_stock_kernel():
    """The plotting cells of notebooks 05 and 06, verbatim, on small stand-in results: each shows an image/png
    (no `%matplotlib inline`, no pyplot: a kernel as `pip install jupyterlab` gives it)."""
    cells = [
        (path.name, "".join(c["source"]))
        for path in NOTEBOOKS
        for c in read(path)["cells"]
        if c["cell_type"] == "code" and "plots." in "".join(c["source"])
    ]
    assert {name for name, _ in cells} == {"05_training.ipynb", "06_inference.ipynb"}
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(PLOT_INPUTS)]
        + [nbformat.v4.new_code_cell(source) for _, source in cells]
    )
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    for (name, source), cell in zip(cells, notebook.cells[1:]):
        kinds = {kind for output in cell.outputs for kind in output.get("data", {})}
        assert "image/png" in kinds, f"{name}: {source!r} showed {[o.get('data', o) for o in cell.outputs]}"
