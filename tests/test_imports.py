"""The modules of rlvr/ import one another without a cycle: each can be read knowing only the
ones below it. Every import counts, those inside functions too (they hide a cycle, not end it)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "rlvr"


def _imported_modules(path: Path) -> set[str]:
    """The rlvr modules a file imports anywhere in it (`from rlvr import x` counts x)."""
    names: set[str] = set()
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "rlvr":
                names.update(f"rlvr.{a.name}" for a in node.names if a.name in modules)
    return {n.split(".")[1] for n in names if n.startswith("rlvr.") and n.count(".") == 1}


def import_graph() -> dict[str, set[str]]:
    return {p.stem: _imported_modules(p) - {p.stem} for p in sorted(PACKAGE.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_rlvr_has_no_import_cycle():
    graph = import_graph()
    assert {"memory", "memory_search", "memory_notes", "experiment"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_imports_inside_functions(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom rlvr.memory import GIB\n\ndef g():\n"
                 "    from rlvr import memory_notes, not_a_module\n    import rlvr.plotting\n")
    assert _imported_modules(f) == {"memory", "memory_notes", "plotting"}
