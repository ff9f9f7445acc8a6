"""The import graph of the product's packages has no cycle where it is checked.

Every module's imports are read with `ast` (nothing is imported), including those inside
functions and under TYPE_CHECKING: an import deferred into a function still makes the two
modules depend on each other. The package folders come from pyproject.toml's `package-dir`, so
the graph covers every module of `daemon/`, `kemi/` and `shared/`; `CHECKED` says where a cycle
fails the test, and widening it to ("tlsbridge",) covers the whole product.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A cycle through any module under these names fails.
CHECKED = ("tlsbridge.daemon.engines", "tlsbridge.daemon.tls_context",
           "tlsbridge.daemon.certinfo")

Graph = dict[str, set[str]]


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Import name -> folder, as pyproject.toml maps them (`tlsbridge.daemon` -> daemon/)."""
    with open(root / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {name: root / folder for name, folder in mapping.items()}


def modules(dirs: Mapping[str, Path]) -> dict[str, Path]:
    """Every module of the packages by its import name; a package is its __init__.py."""
    found = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The modules of `known` that module `name` (file `path`) imports, anywhere in it.

    `from p import x` depends on module p.x when there is one, else on p (x is a name in it).
    """
    known = set(known)
    here = name if _is_package(path) else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package `here`, up level - 1
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                deps.add(sub if sub in known else base)
    return (deps & known) - {name}


def import_graph(root: Path = ROOT) -> Graph:
    mods = modules(package_dirs(root))
    return {name: imported(name, path, mods) for name, path in mods.items()}


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        # Recursive: the graph is a few hundred modules deep at most.
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def path_through(graph: Mapping[str, Iterable[str]], component: list[str]) -> Iterator[str]:
    """One cycle of a component, as the modules it passes, for the failure message."""
    members, start = set(component), component[0]
    trail, seen = [start], {start}
    while True:
        nxt = next(w for w in sorted(graph[trail[-1]]) if w in members)
        if nxt in seen:
            yield from trail[trail.index(nxt):]
            yield nxt
            return
        trail.append(nxt)
        seen.add(nxt)


# ---- the product ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph()


def test_no_import_cycle_through_the_checked_modules(graph: Graph) -> None:
    bad = [c for c in cycles(graph) if any(under(m, CHECKED) for m in c)]
    assert not bad, "import cycles:\n" + "\n".join(
        f"{', '.join(c)} (e.g. {' -> '.join(path_through(graph, c))})" for c in bad)


def test_no_engine_imports_the_registry_back(graph: Graph) -> None:
    registry = "tlsbridge.daemon.engines.registry"
    back = sorted(m for m, deps in graph.items() if registry in deps
                  and under(m, ("tlsbridge.daemon.engines",)))
    assert not back


def test_the_walk_sees_the_imports(graph: Graph) -> None:
    # Guards the two tests above against passing on an empty or wrong graph.
    engines = "tlsbridge.daemon.engines"
    assert {f"{engines}.openssl", f"{engines}.checks", f"{engines}.base"} <= graph[
        f"{engines}.registry"]
    # Imported inside a function: counted.
    assert f"{engines}.gnutls" in graph[f"{engines}.registry"]
    assert f"{engines}.gnutls.binding" in graph[f"{engines}.gnutls.session"]


# ---- the walker itself ------------------------------------------------------------------


def test_cycles_found_and_reported() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert list(path_through(g, ["a", "b", "c"])) == ["a", "b", "c", "a"]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_deferred_imports(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = { "top.pkg" = "pkg" }\n')
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("def f():\n    from top.pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nfrom .. import c\n")
    (pkg / "c.py").write_text("import top.pkg.a\n")
    g = import_graph(tmp_path)
    assert g == {
        "top.pkg": set(), "top.pkg.a": {"top.pkg.sub.b"}, "top.pkg.c": {"top.pkg.a"},
        "top.pkg.sub": {"top.pkg.sub.b"}, "top.pkg.sub.b": {"top.pkg.a", "top.pkg.c"},
    }
    assert cycles(g) == [["top.pkg.a", "top.pkg.c", "top.pkg.sub.b"]]
