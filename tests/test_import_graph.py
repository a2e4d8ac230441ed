"""The layering README's Layout section describes, read from the source with `ast`: no import cycles
between modules; harness/ (the core, the job runner, storage) never imports the papers (methods/),
the leaderboard or the Hydra plugins; the leaderboard reads harness/ only through the store, which
imports no torch. Every import counts, also those inside functions: a lazy import still ties the
two modules together."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "methods", "leaderboard", "hydra_plugins")
LEADERBOARD_MAY_IMPORT = {"harness.store", "harness.atomic"}  # the store's read side and what it imports


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of our packages it imports (`from pkg import mod` counts as pkg.mod)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files else node.module
                           for alias in node.names]
            else:
                continue
            found.update(t for t in targets if t in files and t != name)
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None; depth-first search with colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_harness_imports_no_paper_leaderboard_or_plugin():
    bad = [f"{m} imports {t}" for m, targets in import_graph().items() if m.split(".")[0] == "harness"
           for t in targets if t.split(".")[0] in ("methods", "leaderboard", "hydra_plugins")]
    assert not bad, "; ".join(bad)


def test_leaderboard_reads_harness_only_through_the_store():
    graph = import_graph()
    bad = [f"{m} imports {t}" for m, targets in graph.items() if m.split(".")[0] == "leaderboard"
           for t in targets if t.split(".")[0] == "harness" and t not in LEADERBOARD_MAY_IMPORT]
    assert not bad, "; ".join(bad)
    # What the leaderboard may import stays within itself and imports no torch.
    for name in LEADERBOARD_MAY_IMPORT:
        assert graph[name] <= LEADERBOARD_MAY_IMPORT, f"{name} imports {graph[name] - LEADERBOARD_MAY_IMPORT}"
        tree = ast.parse((REPO / (name.replace(".", "/") + ".py")).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.split(".")[0] == "torch" for m in imported), f"{name} imports torch"


def test_the_checks_catch_what_they_guard():
    """The checks themselves can fail: a cycle is found, and an edge counts through `from pkg import mod`."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "harness.core.distributed" in import_graph()["harness.core.trainer"]
