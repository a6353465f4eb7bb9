"""The import graph among `otr_megatron/core/` modules has no circle (issue 16, "Contracts and imports").

Read from the source with `ast`, not by importing, so a circle that happens to import fine today
(because the cycle is only closed inside a function) is still caught. Every import counts: module
level, inside functions (lazy imports run on first call and can close a circle then), and
`importlib.import_module("<literal>")`. A package `__init__` becomes a node only when a name that is
not a submodule is imported from it (`from otr_megatron.core import OTRConfig`); importing a
submodule through the package (`from otr_megatron.core import checks`) is an edge to the submodule.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import otr_megatron

PKG_ROOT = Path(otr_megatron.__file__).resolve().parent
CORE = "otr_megatron.core"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG_ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Names in `known` that the file at `path` imports anywhere (module level, functions, importlib)."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def add(name: str) -> None:
        # `import a.b.c` also imports a.b and a; only the deepest known module matters for a cycle
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                    else node.module or "")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            add(node.args[0].value)
    return out


def core_graph() -> dict[str, set[str]]:
    files = sorted((PKG_ROOT / "core").glob("*.py"))
    known = {_module_name(f) for f in files}
    return {_module_name(f): imports_of(f, known) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None. Iterative DFS with three colours."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {n: WHITE for n in graph}
    for root in sorted(graph):
        if colour[root] != WHITE:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
            elif colour.get(child, BLACK) == GREY:
                return path[path.index(child):] + [child]
            elif colour.get(child) == WHITE:
                colour[child] = GREY
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_core_import_graph_has_no_cycle():
    graph = core_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle among core modules: " + " -> ".join(cycle)


def test_core_import_graph_sees_every_kind_of_import():
    """The parser finds the edges the no-cycle test relies on: module level, lazy, importlib, via package."""
    g = core_graph()
    assert f"{CORE}.contract" in g[f"{CORE}.backends"]  # module-level `from ... import`
    assert f"{CORE}.torch_backend" in g[f"{CORE}.backends"]  # lazy `from otr_megatron.core import torch_backend`
    assert f"{CORE}.triton_backend" in g[f"{CORE}.backends"]  # importlib.import_module("...")
    assert f"{CORE}.checks" in g[f"{CORE}.loss"]  # submodule through the package name
    assert {f"{CORE}.config", f"{CORE}.loss"} <= g[CORE]  # the package __init__ is a node
    assert CORE not in g[f"{CORE}.loss"]  # ... but importing a submodule through it is not an edge to it


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, None),  # a diamond is not a circle
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
])
def test_find_cycle_on_known_graphs(graph, expected):
    assert find_cycle(graph) == expected


def test_lazy_and_relative_imports_make_edges(tmp_path, monkeypatch):
    """A circle closed only inside a function, or through a relative import, is still found."""
    pkg = tmp_path / "otr_megatron" / "core"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from otr_megatron.core import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG_ROOT", tmp_path / "otr_megatron")
    g = core_graph()
    assert g == {CORE: set(), f"{CORE}.a": {f"{CORE}.b"}, f"{CORE}.b": {f"{CORE}.a"}}
    assert find_cycle(g) == [f"{CORE}.a", f"{CORE}.b", f"{CORE}.a"]


def test_hook_imports_the_loss_at_module_level():
    """A reader of `mcore/hook.py` finds its dependency on the core loss in the file's imports."""
    tree = ast.parse((PKG_ROOT / "mcore" / "hook.py").read_text())
    top = {(n.module, a.name) for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ("otr_megatron.core.loss", "vocab_parallel_otr_loss") in top
    from otr_megatron.core.loss import vocab_parallel_otr_loss
    from otr_megatron.mcore import hook

    assert hook.vocab_parallel_otr_loss is vocab_parallel_otr_loss
