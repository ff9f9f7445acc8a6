"""The product's layers, read from its import graph (with `ast`, importing nothing; imports
inside functions and under TYPE_CHECKING count):

- `daemon` and `kemi` never import each other: they meet only through `shared`;
- nothing under `shared` imports `daemon` or `kemi`;
- the layer a connection lives in never imports the multi-process layer (`supervisors`);
- no import cycle anywhere in the product.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAEMON, KEMI, SHARED = "tlsbridge.daemon", "tlsbridge.kemi", "tlsbridge.shared"
SUPERVISORS = "tlsbridge.daemon.supervisors"
# Above the supervisors: the command line that starts one.
ABOVE_SUPERVISORS = {"tlsbridge.daemon.cli"}

Graph = dict[str, set[str]]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _modules() -> dict[str, Path]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    found = {}
    for package, folder in dirs.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `here`, up level - 1
                up = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{up}.{base}" if base else up
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                deps.add(sub if sub in known else base)
    return (deps & known) - {name}


@pytest.fixture(scope="module")
def graph() -> Graph:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _edges(graph: Graph, src: str, dst: str) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() if _under(m, src)
                  for d in deps if _under(d, dst))


def test_daemon_and_kemi_never_import_each_other(graph: Graph) -> None:
    assert not _edges(graph, DAEMON, KEMI)
    assert not _edges(graph, KEMI, DAEMON)


def test_shared_imports_neither_side(graph: Graph) -> None:
    assert not _edges(graph, SHARED, DAEMON)
    assert not _edges(graph, SHARED, KEMI)


def test_the_connection_layer_does_not_reach_up_into_the_supervisors(graph: Graph) -> None:
    up = [e for e in _edges(graph, DAEMON, SUPERVISORS)
          if not _under(e.split(" -> ")[0], SUPERVISORS)
          and e.split(" -> ")[0] not in ABOVE_SUPERVISORS]
    assert not up


def _cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# The engines' registry <-> engine modules cycle is being removed on its own branch (issue
# 17, item 3); once that lands this set is empty and the test covers every module.
NOT_YET = {"tlsbridge.daemon.engines", "tlsbridge.daemon.tls_context"}


def test_no_import_cycle_in_the_product(graph: Graph) -> None:
    bad = [c for c in _cycles(graph) if not all(any(_under(m, p) for p in NOT_YET) for m in c)]
    assert not bad, f"import cycles: {bad}"


def test_the_walk_sees_the_imports(graph: Graph) -> None:
    # Guards the tests above against passing on an empty or wrong graph.
    assert f"{DAEMON}.relaycore" in graph[f"{DAEMON}.relay"]
    assert f"{KEMI}.routing" in graph[f"{KEMI}.bridge"]
    assert f"{DAEMON}.metrics" in graph[f"{DAEMON}.server"]  # imported inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
