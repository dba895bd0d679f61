"""The package's rooms (top-level modules and subpackages of hf_taskarith) import each other
without cycles: a room never imports, at module level or inside a function, a room that imports it
back (directly or through others). Imports under ``if TYPE_CHECKING:`` do not count; upward
conveniences go through :mod:`hf_taskarith.delegates` by name."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import hf_taskarith

ROOT = Path(hf_taskarith.__file__).parent


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _edges() -> set[tuple[str, str]]:
    edges = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = module if rel.name == "__init__" else module.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree)
                       if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                       for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("hf_taskarith."):
                target = node.module
            else:
                continue
            if _room(module) != _room(target):
                edges.add((_room(module), _room(target)))
    return edges


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_the_rooms_import_each_other_without_cycles():
    edges = _edges()
    assert ("task_vector", "hub") not in edges and ("task_vector", "merging") not in edges
    cycles = _cycles(edges)
    assert not cycles, [(c, sorted(e for e in edges if e[0] in c and e[1] in c)) for c in cycles]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
