"""Colab from a GitHub link: the repository's name in one place, and what derives from it.

`GITHUB_REPO` is the one place that names the published repository. The notebooks' first cell (its
`REPO` form field) and the README's "Open in Colab" badges are written from it, with the notebook
metadata that asks Colab for a T4; `tests/test_notebooks.py` checks that they agree. After publishing:

    python -m llava_nb.colab --repo <owner>/<name>    # sets GITHUB_REPO, rewrites notebooks and README

While GITHUB_REPO is the placeholder, the first cell reads the repository from the address Colab opened
the notebook from, and stops with a message asking for REPO when it cannot. Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

GITHUB_REPO = "OWNER/llava-on-a-budget"  # the published repository: `python -m llava_nb.colab --repo` sets it
GITHUB_BRANCH = "main"  # the branch the badges open
PLACEHOLDER_OWNER = "OWNER"  # GITHUB_REPO's owner until the repository is published
NOTEBOOKS = "notebooks"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
BADGES_BEGIN = "<!-- colab badges: written by `python -m llava_nb.colab` from llava_nb/colab.py -->"
BADGES_END = "<!-- end of colab badges -->"

# Colab opens a notebook with this metadata on a T4 GPU runtime (Runtime > Change runtime type).
COLAB_METADATA = {"accelerator": "GPU", "colab": {"gpuType": "T4", "provenance": []}}

# The first code cell of every notebook. Outside Colab it does nothing. In Colab it clones REPO (or, while
# REPO is the placeholder, the repository Colab's sessions API says this notebook was opened from), runs
# colab_setup.sh, and mounts Drive for the hub cache and the runs (declined: local disk, one warning).
BOOTSTRAP = '''\
# Colab only: get the project, install what it needs, keep downloads and runs on Drive. Elsewhere: nothing.
REPO = "{repo}"  # @param {{type:"string"}}
import os, re, subprocess, sys, urllib.parse, urllib.request
IN_COLAB, HOME = "COLAB_RELEASE_TAG" in os.environ, "/content/llava-on-a-budget"
if IN_COLAB and not os.path.isdir("llava_nb") and not os.path.isdir(HOME):  # first run in this runtime
    if not REPO.strip() or REPO.startswith("{placeholder}/"):  # the GitHub repository this notebook came from
        try:  # Colab's sessions API names the file it opened: ...github.com/<owner>/<name>/blob/...
            port = os.environ.get("KMP_TARGET_PORT", "9000")
            api = f"http://{{os.environ['COLAB_JUPYTER_IP']}}:{{port}}/api/sessions"
            sessions = urllib.parse.unquote(urllib.request.urlopen(api, timeout=10).read().decode())
            REPO = re.search(r"github(?:\\.com)?/([\\w.-]+/[\\w.-]+)/blob/", sessions)[1]
        except Exception:
            raise SystemExit("Which GitHub repository holds these notebooks? Type it as owner/name into "
                             "REPO in this cell's form, then run the cell again.") from None
    if subprocess.run(["git", "clone", "--depth=1", f"https://github.com/{{REPO.strip()}}", HOME]).returncode:
        raise SystemExit(f"git clone https://github.com/{{REPO.strip()}} failed: check REPO in the form.")
if IN_COLAB and not os.path.isdir("llava_nb"):  # not yet inside the checkout
    os.chdir(HOME)
    subprocess.run(["bash", "colab_setup.sh"], check=True)
    sys.path.insert(0, HOME)  # an editable install is not seen by an already running kernel
if IN_COLAB:
    from llava_nb import runs
    print(runs.use_drive())  # Colab asks for Drive: the hub cache and the runs then outlive this runtime
IN_COLAB'''


def repo_is_set(repo: str = GITHUB_REPO) -> bool:
    """Whether `repo` names a repository (owner/name) rather than the placeholder."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", repo)) and not repo.startswith(PLACEHOLDER_OWNER + "/")


def bootstrap_source(repo: str = GITHUB_REPO) -> str:
    """The first code cell of every notebook, with `repo` as its REPO form field's value."""
    return BOOTSTRAP.format(repo=repo, placeholder=PLACEHOLDER_OWNER)


def colab_url(notebook: str, repo: str = GITHUB_REPO, branch: str = GITHUB_BRANCH) -> str:
    """The address that opens `notebooks/<notebook>` from GitHub in Colab."""
    return f"https://colab.research.google.com/github/{repo}/blob/{branch}/{NOTEBOOKS}/{notebook}"


def notebook_names(root: Path) -> list[str]:
    """The numbered notebooks, in order."""
    return sorted(p.name for p in (root / NOTEBOOKS).glob("[0-9][0-9]_*.ipynb"))


def badges_markdown(root: Path, repo: str = GITHUB_REPO) -> str:
    """The README's badge block: one "Open in Colab" badge per notebook, between two markers."""
    lines = ["| notebook | open |", "|---|---|"]
    lines += [f"| `{name}` | [![Open In Colab]({BADGE_IMAGE})]({colab_url(name, repo)}) |"
              for name in notebook_names(root)]
    if not repo_is_set(repo):
        lines += ["", f"*These links lead nowhere until `GITHUB_REPO` names the published repository instead "
                      f"of `{repo}` (see below).*"]
    return "\n".join([BADGES_BEGIN, *lines, BADGES_END])


def first_code_cell(notebook: dict) -> dict:
    """The first code cell of a notebook (nbformat 4 JSON)."""
    return next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")


def write_notebook(path: Path, repo: str = GITHUB_REPO) -> bool:
    """Give a notebook the bootstrap cell and Colab metadata of `repo`; True when the file changed."""
    text = path.read_text()
    notebook = json.loads(text)
    first_code_cell(notebook)["source"] = bootstrap_source(repo).splitlines(keepends=True)
    notebook["metadata"] = {**COLAB_METADATA, **{k: v for k, v in notebook["metadata"].items()
                                                 if k not in COLAB_METADATA}}
    new = json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"  # as nbformat writes
    if new != text:
        path.write_text(new)
    return new != text


def write_readme(path: Path, repo: str = GITHUB_REPO) -> bool:
    """Replace the README's badge block with `badges_markdown`; True when the file changed."""
    text = path.read_text()
    if BADGES_BEGIN not in text or BADGES_END not in text:
        raise ValueError(f"{path} has no badge block: put the lines {BADGES_BEGIN!r} and {BADGES_END!r} "
                         "where the badges go")
    head, rest = text.split(BADGES_BEGIN, 1)
    new = head + badges_markdown(path.parent, repo) + rest.split(BADGES_END, 1)[1]
    if new != text:
        path.write_text(new)
    return new != text


def set_repo(repo: str) -> None:
    """Write `repo` into GITHUB_REPO in this file (the one place)."""
    if not repo_is_set(repo):
        raise SystemExit(f"--repo {repo!r}: give the GitHub repository as owner/name")
    source = Path(__file__)
    text = source.read_text()
    source.write_text(re.sub(r'^GITHUB_REPO = "[^"]*"', f'GITHUB_REPO = "{repo}"', text, count=1, flags=re.M))


def main(argv: Sequence[str] | None = None) -> list[str]:
    """`python -m llava_nb.colab [--repo owner/name]`: rewrite the notebooks' first cells and metadata,
    and the README's badges, from GITHUB_REPO. Returns the files it changed."""
    p = argparse.ArgumentParser(prog="python -m llava_nb.colab", description=__doc__.splitlines()[0])
    p.add_argument("--repo", help="set GITHUB_REPO (owner/name) first, e.g. after publishing on GitHub")
    args = p.parse_args(argv)
    repo = args.repo or GITHUB_REPO
    if args.repo:
        set_repo(args.repo)
    root = Path(__file__).resolve().parent.parent
    changed = [str(path) for path in sorted((root / NOTEBOOKS).glob("[0-9][0-9]_*.ipynb"))
               if write_notebook(path, repo)]
    changed += [str(root / "README.md")] if write_readme(root / "README.md", repo) else []
    print("\n".join(changed) or "nothing to change")
    if not repo_is_set(repo):
        print(f"GITHUB_REPO is still {repo!r}: the badges lead nowhere until --repo names the published "
              "repository", file=sys.stderr)
    return changed


if __name__ == "__main__":
    main()
