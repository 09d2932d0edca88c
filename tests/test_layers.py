"""The house keeps its layers: every import inside vlmlab points down (or within its own folder),
module imports form no cycle, and no module outgrows one sitting. Parsed from the source, lazy
imports inside functions included."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlmlab"
#: lowest first; a module may import from its own rank and the ranks below
RANKS = {"hardware": 0, "cluster": 0, "figures": 0, "assets": 0, "model": 1, "plan": 2, "observe": 3, "run": 4, "measure": 5,
         "api": 6, "ui": 7}
COMPAT = {"vlmlab", "vlmlab.plans", "vlmlab.profiling"}  # the package and the deprecated old paths: top
MAX_LINES = 450
DATA_TABLES = ("vlmlab/model/catalog",)  # the catalogue's data tables may be longer


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> set:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "vlmlab"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "vlmlab":
                continue
            for a in node.names:  # `from vlmlab.run import workers` imports vlmlab.run.workers
                sub = f"{target}.{a.name}"
                out.add(sub if sub in MODULES else target)
    return out


def rank(name: str):
    if name in COMPAT:
        return 99
    part = name.split(".")[1]
    return RANKS.get(part)


MODULES = modules()


def test_every_module_has_a_layer():
    assert [m for m in MODULES if rank(m) is None] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    mine = rank(name)
    upward = sorted(t for t in imports_of(name, MODULES[name])
                    if t not in COMPAT and t != "vlmlab" and (rank(t) or 0) > mine)
    assert upward == [], f"{name} (layer {name.split('.')[1]}) imports from a layer above it: {upward}"


def test_no_import_cycles():
    graph = {n: {t for t in imports_of(n, p) if t in MODULES and t != n and n not in COMPAT}
             for n, p in MODULES.items()}
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for t in sorted(graph[n]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert cycles == []


def test_modules_are_short():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES
            and not str(p.relative_to(PACKAGE.parent)).startswith(DATA_TABLES)}
    assert long == {}


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from vlmlab.measure.bench import bench\n")
    assert imports_of("vlmlab.model.bad", bad) == {"vlmlab.measure.bench"}
    assert rank("vlmlab.measure.bench") > rank("vlmlab.model.bad")
