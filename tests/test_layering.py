"""The package's layers: no import cycles between its parts, and each layer imports only below it.

Every ``import`` statement counts, also those inside functions (a lazy import is still a
dependency). The registry finds plug-ins by package name (``PLUGIN_PACKAGES``), which is not an
import of their code.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from functools import cache
from pathlib import Path

import metamap

ROOT = Path(metamap.__file__).parent


def part_of(module: str) -> str:
    """``metamap.train.trainer`` -> ``metamap.train``; top-level modules stand for themselves."""
    return ".".join(module.split(".")[:2])


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def parsed() -> dict[str, tuple[Path, ast.AST]]:
    """Every metamap module's name -> (path, syntax tree), parsed once for all the tests here."""
    return {module_name(p): (p, ast.parse(p.read_text())) for p in ROOT.rglob("*.py")}


def imports(name: str, path: Path, tree: ast.AST):
    """``(imported name, fallback)`` for every import in a module: ``from metamap.data import cache``
    gives ``("metamap.data.cache", "metamap.data")``, the fallback being what is imported when the
    name is not a module; a plain ``import x.y`` gives ``("x.y", "x.y")``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            yield from ((f"{base}.{a.name}", base) for a in node.names)


def import_graph() -> dict[str, dict[str, list[str]]]:
    """part -> {imported part: [importing modules]} over every metamap module."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, (path, tree) in parsed().items():
        for target, _ in imports(name, path, tree):
            if (target == "metamap" or target.startswith("metamap.")) and part_of(target) != part_of(name):
                graph[part_of(name)][part_of(target)].append(name)
    return graph


def cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one part (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
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


def test_no_import_cycles_between_the_parts_of_the_package():
    graph = import_graph()
    found = cycles(graph)
    detail = [f"{a} -> {b} ({', '.join(sorted(set(graph[a][b])))})"
              for c in found for a in c for b in graph[a] if b in c]
    assert not found, "import cycles:\n" + "\n".join(detail)


def module_graph() -> dict[str, set[str]]:
    """module -> the metamap modules it imports (``from metamap.data import cache`` is an import
    of ``metamap.data.cache``; of the package itself only when the name is not a module)."""
    modules = parsed()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, (path, tree) in modules.items():
        targets = (t if t in modules else fallback for t, fallback in imports(name, path, tree))
        graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def test_no_import_cycles_between_modules():
    # Finer than the parts: two modules of one part (data's sources and a loader, say) that import
    # each other are a cycle too, even where Python happens to resolve it.
    graph = module_graph()
    found = cycles(graph)
    assert not found, "import cycles between modules: " + "; ".join(" <-> ".join(c) for c in found)
    assert "metamap.data.cache" in graph["metamap.data.omniglot"]      # the analysis sees `from x import mod`


def test_each_layer_imports_only_what_lies_below_it():
    graph = import_graph()
    forbidden = {
        "metamap.tasks": {"metamap.data", "metamap.algorithms", "metamap.train", "metamap.report"},
        "metamap.nets": {"metamap.algorithms", "metamap.train", "metamap.data", "metamap.report"},
        "metamap.data": {"metamap.algorithms", "metamap.train", "metamap.report"},
        "metamap.report": {"metamap.train", "metamap"},
        "metamap.registry": {"metamap.algorithms", "metamap.nets", "metamap.data", "metamap.tasks", "metamap.rl"},
    }
    wrong = [f"{a} imports {b} ({', '.join(sorted(set(graph[a][b])))})"
             for a, banned in forbidden.items() for b in graph.get(a, {}) if b in banned]
    assert not wrong, "\n".join(wrong)


def test_the_graph_sees_lazy_imports():
    # A check of the analysis itself: the command line imports the report inside a function.
    assert "metamap.report" in import_graph()["metamap.cli"]
