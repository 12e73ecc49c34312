"""Colab from a GitHub link: the notebooks' first cell and the README's badges, from one repository address.

The published repository is data: `[project.urls] Repository` in pyproject.toml. The notebooks' first cell
(it clones that repository) and the README's "Open in Colab" badges are written from it, with the notebook
metadata that asks Colab for a T4; `tests/test_notebooks.py` checks that they agree. After publishing a
fork:

    python -m llava_nb.colab --repo <owner>/<name>    # sets the address, rewrites notebooks and README

Stdlib only; works in a checkout (it rewrites the checkout's files).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout
GITHUB_BRANCH = "main"  # the branch the badges open
PLACEHOLDER_OWNER = "OWNER"  # the repository's owner until it is published
NOTEBOOKS = "notebooks"
CLONE_DIR = "/content/llava-on-a-budget"  # where the first cell puts the checkout in Colab
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
BADGES_BEGIN = "<!-- colab badges: written by `python -m llava_nb.colab` from pyproject.toml -->"
BADGES_END = "<!-- end of colab badges -->"

# Colab opens a notebook with this metadata on a T4 GPU runtime (Runtime > Change runtime type).
COLAB_METADATA = {"accelerator": "GPU", "colab": {"gpuType": "T4", "provenance": []}}

# The first code cell of every notebook. Outside Colab it does nothing; in Colab it clones the repository
# (once per runtime), installs it with colab_setup.sh and works inside the checkout.
BOOTSTRAP = """\
import os, subprocess  # Colab only: fetch the project, install it, work inside it. Elsewhere: nothing.

if "COLAB_RELEASE_TAG" in os.environ and not os.path.isdir("llava_nb"):
    url, home = "https://github.com/{repo}", "{home}"
    subprocess.run(f"test -d {{home}} || git clone -q --depth=1 {{url}} {{home}}", shell=True, check=True)
    os.chdir(home)  # llava_nb is imported from here
    subprocess.run(["bash", "colab_setup.sh"], check=True)"""


def github_repo(root: Path = ROOT) -> str:
    """owner/name of the published repository, from pyproject.toml's `[project.urls] Repository`."""
    url = tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    return url.removeprefix("https://github.com/").strip("/")


def repo_is_set(repo: str) -> bool:
    """Whether `repo` names a repository (owner/name) rather than the placeholder."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", repo)) and not repo.startswith(PLACEHOLDER_OWNER + "/")


def bootstrap_source(repo: str | None = None) -> str:
    """The first code cell of every notebook, cloning `repo` (default: pyproject.toml's)."""
    return BOOTSTRAP.format(repo=repo or github_repo(), home=CLONE_DIR)


def colab_url(notebook: str, repo: str | None = None, branch: str = GITHUB_BRANCH) -> str:
    """The address that opens `notebooks/<notebook>` from GitHub in Colab."""
    repo = repo or github_repo()
    return f"https://colab.research.google.com/github/{repo}/blob/{branch}/{NOTEBOOKS}/{notebook}"


def notebook_names(root: Path) -> list[str]:
    """The numbered notebooks, in order."""
    return sorted(p.name for p in (root / NOTEBOOKS).glob("[0-9][0-9]_*.ipynb"))


def badges_markdown(root: Path = ROOT, repo: str | None = None) -> str:
    """The README's badge block: one "Open in Colab" badge per notebook, between two markers."""
    repo = repo or github_repo(root)
    lines = ["| notebook | open |", "|---|---|"]
    lines += [
        f"| `{name}` | [![Open In Colab]({BADGE_IMAGE})]({colab_url(name, repo)}) |"
        for name in notebook_names(root)
    ]
    if not repo_is_set(repo):
        lines += [
            "",
            f"*These links lead nowhere until pyproject.toml names the published repository "
            f"instead of `{repo}` (see below).*",
        ]
    return "\n".join([BADGES_BEGIN, *lines, BADGES_END])


def first_code_cell(notebook: dict) -> dict:
    """The first code cell of a notebook (nbformat 4 JSON)."""
    return next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")


def write_notebook(path: Path, repo: str | None = None) -> bool:
    """Give a notebook the bootstrap cell and Colab metadata of `repo`; True when the file changed."""
    text = path.read_text()
    notebook = json.loads(text)
    first_code_cell(notebook)["source"] = bootstrap_source(repo).splitlines(keepends=True)
    notebook["metadata"] = {
        **COLAB_METADATA,
        **{k: v for k, v in notebook["metadata"].items() if k not in COLAB_METADATA},
    }
    new = json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"  # as nbformat writes
    if new != text:
        path.write_text(new)
    return new != text


def write_readme(path: Path, repo: str | None = None) -> bool:
    """Replace the README's badge block with `badges_markdown`; True when the file changed."""
    text = path.read_text()
    found = re.search(r"^<!-- colab badges:.*?^" + re.escape(BADGES_END), text, re.S | re.M)
    if not found:
        raise ValueError(
            f"{path} has no badge block: put the lines {BADGES_BEGIN!r} and {BADGES_END!r} "
            "where the badges go"
        )
    new = text[: found.start()] + badges_markdown(path.parent, repo) + text[found.end() :]
    if new != text:
        path.write_text(new)
    return new != text


def set_repo(repo: str, root: Path = ROOT) -> None:
    """Write `repo` into pyproject.toml's `[project.urls] Repository` (the one place)."""
    if not repo_is_set(repo):
        raise SystemExit(f"--repo {repo!r}: give the GitHub repository as owner/name")
    path = root / "pyproject.toml"
    text, n = re.subn(
        r'^Repository = "[^"]*"',
        f'Repository = "https://github.com/{repo}"',
        path.read_text(),
        count=1,
        flags=re.M,
    )
    if not n:
        raise SystemExit(f"{path}: no `Repository = ...` line under [project.urls] to set")
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> list[str]:
    """`python -m llava_nb.colab [--repo owner/name]`: rewrite the notebooks' first cells and metadata,
    and the README's badges, from pyproject.toml's repository. Returns the files it changed."""
    p = argparse.ArgumentParser(prog="python -m llava_nb.colab", description=__doc__.splitlines()[0])
    p.add_argument("--repo", help="set the repository (owner/name) first, e.g. after publishing a fork")
    args = p.parse_args(argv)
    if args.repo:
        set_repo(args.repo)
    repo = github_repo()
    changed = [
        str(path)
        for path in sorted((ROOT / NOTEBOOKS).glob("[0-9][0-9]_*.ipynb"))
        if write_notebook(path, repo)
    ]
    changed += [str(ROOT / "README.md")] if write_readme(ROOT / "README.md", repo) else []
    print("\n".join(changed) or "nothing to change")
    if not repo_is_set(repo):
        print(
            f"the repository is still {repo!r}: the badges lead nowhere until --repo names the published one",
            file=sys.stderr,
        )
    return changed


if __name__ == "__main__":
    main()
