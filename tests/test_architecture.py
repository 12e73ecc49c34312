"""The package's shape as its docstring draws it: each module imports only modules on lower floors (no cycle,
no arrow back up), and every module is on the map."""

import ast
import re
from pathlib import Path

import llava_nb

PACKAGE = Path(llava_nb.__file__).parent


def floors() -> dict[str, int]:
    found, floor = {}, None
    for line in llava_nb.__doc__.splitlines():
        if m := re.match(r"\s+floor (\d+)\s+(\w+)", line):
            floor = int(m[1])
            found[m[2]] = floor
        elif floor is not None and (m := re.match(r"\s{13}(\w+)\s{2,}", line)):
            found[m[1]] = floor
    return found


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return names


def test_every_module_is_on_the_map_and_imports_only_lower_floors():
    mapped = floors()
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert set(mapped) == modules, (sorted(modules - set(mapped)), sorted(set(mapped) - modules))
    for module in modules:
        for dep in imports(PACKAGE / f"{module}.py") & modules:
            assert mapped[dep] < mapped[module], (
                f"{module} (floor {mapped[module]}) imports {dep} (floor {mapped[dep]})"
            )


def test_no_module_is_over_400_lines():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_the_package_imports_no_test_or_benchmark_tooling():
    """Twins, the local hub, the web proxy (tests/hub) and the benchmark (benchmarks/) stay outside."""
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = {node.module.split(".")[0]}
            else:
                continue
            assert not tops & {"tests", "benchmarks"}, f"{path.name} imports {sorted(tops)}"
