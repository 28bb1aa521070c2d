"""No import cycles among alexnet_pipe's modules, counting imports inside functions too.

A lazy (function-level) import hides a cycle from Python at import time, not from a reader: the
two modules still depend on each other. So the graph here holds every import in a module's source
(``ast.walk``), at any depth, relative or absolute; ``from tests import x`` counts as importing ``x``
when ``x`` is a module of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import alexnet_pipe

PACKAGE = Path(alexnet_pipe.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE, top_level_only: bool = False) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from the source (nothing is imported)."""
    modules = {_module_name(p): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        nodes = tree.body if top_level_only else ast.walk(tree)
        targets: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets.update(c for c in candidates if c in modules and c != name)
        graph[name] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    cycles.append(sorted(group))
    return cycles


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "alexnet_pipe.convert.job" in graph and "alexnet_pipe.dataset.layout" in graph
    assert "alexnet_pipe.dataset.layout" in graph["alexnet_pipe.convert.job"]
    assert "alexnet_pipe.convert.shardcheck" in graph["alexnet_pipe.convert.job"]  # a function-level import, counted
    assert "alexnet_pipe.convert.shardcheck" not in import_graph(top_level_only=True)["alexnet_pipe.convert.job"]


def test_the_cycle_finder_finds_cycles():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_counting_function_level_imports():
    assert import_cycles(import_graph()) == []


def test_convert_and_repair_do_not_import_each_other():
    graph = import_graph()
    assert "alexnet_pipe.convert.repair" not in graph["alexnet_pipe.convert.job"]
