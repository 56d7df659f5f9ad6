"""The package's structure holds: imports go one way through the layers hegelion_queue/__init__.py names, no module
imports one that imports it back (inside functions too), anywhere in the tree (bench/ included), and no module
is over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hegelion_queue

from .conftest import ROOT

PACKAGE = ROOT / "hegelion_queue"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The modules of the tree a file imports, at the top or inside functions (a name imported from a package that
    is one of its modules counts as that module)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in known else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in known and m != me}


def tree(*folders: str) -> dict[str, set[str]]:
    files = [p for folder in folders for p in (ROOT / folder).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, known) for p in files}


def layer_of(module: str) -> int:
    for i, (_, members) in enumerate(hegelion_queue.LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return i
    raise AssertionError(f"{module} is in no layer of hegelion_queue.LAYERS")


def circles(graph: dict[str, set[str]]) -> list[str]:
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return False

    return sorted(f"{a} -> {b} -> … -> {a}" for a in graph for b in graph[a] if reaches(b, a))


def test_imports_go_down_the_layers_only():
    graph = tree("hegelion_queue")
    upward = sorted(f"{a} ({hegelion_queue.LAYERS[layer_of(a)][0]}) imports {b} ({hegelion_queue.LAYERS[layer_of(b)][0]})"
                    for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))
    assert not upward, upward


@pytest.mark.parametrize("folders", [("hegelion_queue",), ("hegelion_queue", "bench", "workers")])
def test_no_import_circle_anywhere(folders):
    assert not circles(tree(*folders)), circles(tree(*folders))


def test_every_package_says_what_it_owns_and_no_module_is_over_500_lines():
    for init in PACKAGE.rglob("__init__.py"):
        assert len(ast.get_docstring(ast.parse(init.read_text())) or "") > 80, f"{init}: say what it owns"
    long = {str(p.relative_to(ROOT)): n for folder in ("hegelion_queue", "bench", "workers")
            for p in (ROOT / folder).rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
