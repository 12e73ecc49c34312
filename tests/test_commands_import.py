"""The commands run in a venv that holds only requirements.txt (the README's quickstart): nothing they
import may need a test or notebook tool, and they print no warning a user cannot act on.

Each check runs in a subprocess whose import system cannot see the dev tools (IPython, Jupyter, nbmake,
pytest, Playwright, ...): they look absent, exactly as in the quickstart's venv, so this fails in the dev
venv too.
"""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import llava_nb

DEV_ONLY = (
    "IPython",
    "ipykernel",
    "ipywidgets",
    "jupyter",
    "jupyter_client",
    "jupyter_core",
    "jupyterlab",
    "nbclient",
    "nbconvert",
    "nbformat",
    "nbmake",
    "pytest",
    "_pytest",
    "playwright",
)
# Run first in the subprocess: the path finder answers "no such module" for the dev tools (and jupyter_*),
# so importlib.util.find_spec returns None and `import IPython` raises ModuleNotFoundError, as in a bare venv.
HIDE_DEV_TOOLS = f"""
import importlib.machinery, sys
DEV_ONLY = {DEV_ONLY!r}
class WithoutDevTools(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in DEV_ONLY or top.startswith("jupyter"):
            return None
        return super().find_spec(name, path, target)
sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = WithoutDevTools
"""
COMMANDS = ("train", "evaluate", "demo")
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", HIDE_DEV_TOOLS + code], capture_output=True, text=True, timeout=300
    )


def test_the_dev_tools_really_are_hidden():
    found = _run("import importlib.util; print([m for m in DEV_ONLY if importlib.util.find_spec(m)])")
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stderr
    assert "ModuleNotFoundError" in _run("import IPython").stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_runs_without_dev_tools_and_warns_of_nothing(command):
    done = _run(
        f"import runpy, sys; sys.argv = ['llava_nb.{command}', '--help']\n"
        f"runpy.run_module('llava_nb.{command}', run_name='__main__')"
    )
    assert done.returncode == 0, (
        f"python -m llava_nb.{command} --help without dev tools:\n{done.stderr[-3000:]}"
    )
    assert "usage:" in done.stdout
    assert done.stderr == "", f"python -m llava_nb.{command} --help printed to stderr:\n{done.stderr[-3000:]}"


def test_the_benchmark_script_runs_without_dev_tools():
    """`python benchmarks/bench.py --help`: the benchmark, outside the package, needs no test tool either."""
    done = _run(
        f"import runpy, sys; sys.argv = [{str(BENCHMARK)!r}, '--help']\n"
        f"sys.path.insert(0, {str(BENCHMARK.parent)!r})\n"
        f"runpy.run_path({str(BENCHMARK)!r}, run_name='__main__')"
    )
    assert done.returncode == 0, f"benchmarks/bench.py --help without dev tools:\n{done.stderr[-3000:]}"
    assert "usage: python benchmarks/bench.py" in done.stdout and done.stderr == "", done.stderr[-3000:]


def test_every_module_of_the_package_imports_without_dev_tools():
    modules = [f"llava_nb.{m.name}" for m in pkgutil.iter_modules(llava_nb.__path__)]
    done = _run("import importlib\nfor name in " + repr(modules) + ": importlib.import_module(name)")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torchvision" not in done.stderr, done.stderr[-3000:]
