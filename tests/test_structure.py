"""The shape of the ``pgproxy`` package: no import cycles, no module over 500 lines.

Imports are read from the source with ``ast``, never by importing it, and all of them count:
top level, under ``if TYPE_CHECKING:`` and inside function bodies (a lazy import hides a cycle
from the interpreter, not from the reader). ``from pgproxy.x import y`` depends on the module
``pgproxy.x.y`` when there is one, else on ``pgproxy.x``; relative imports are resolved. An
import depends on the module it names only, not on the packages above it, whose
``__init__`` runs first: counting those would tie ``pgproxy/__init__.py`` (whose ``compiled()``
imports ``backend``) into a loop with every module.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pgproxy"
MAX_LINES = 500

Sources = Mapping[str, tuple[str, bool]]  # module name -> (source text, is a package)
Graph = Mapping[str, set[str]]  # module name -> the package's modules it imports


def package_sources(root: Path, package: str) -> dict[str, tuple[str, bool]]:
    """Every module of ``package`` (a directory under ``root``), by dotted name."""
    sources = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        sources[name] = (path.read_text(encoding="utf-8"), is_package)
    return sources


def _known(dotted: str, modules: Mapping[str, object]) -> str | None:
    """The longest prefix of ``dotted`` that is one of ``modules`` (None: an outside import)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in modules:
            return name
    return None


def imported_modules(name: str, source: str, is_package: bool, modules: Sources) -> Iterator[str]:
    """The modules among ``modules`` that module ``name`` imports, anywhere in ``source``."""
    here = name.split(".") if is_package else name.split(".")[:-1]  # what "." means
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name, modules)
                if target is not None:
                    yield target
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here[: len(here) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found = target if target in modules else _known(base, modules)
                if found is not None:
                    yield found


def import_graph(sources: Sources) -> dict[str, set[str]]:
    return {
        name: set(imported_modules(name, source, is_package, sources)) - {name}
        for name, (source, is_package) in sources.items()
    }


def _components(graph: Graph) -> list[set[str]]:
    """The strongly connected components of ``graph`` (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _shortest_cycle(graph: Graph, start: str, within: set[str]) -> list[str]:
    """The shortest path from ``start`` back to itself through ``within`` (breadth first)."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph.get(node, ())):
            if succ not in within:
                continue
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if succ not in came_from:
                came_from[succ] = node
                queue.append(succ)
    raise AssertionError(f"{start} is on no cycle within {sorted(within)}")


def import_cycles(graph: Graph) -> list[list[str]]:
    """Import cycles, each as module names in import order, the first repeated at the end.

    Enough cycles to name every module caught in one: for each module in a loop not yet named
    (in sorted order), the shortest cycle through it."""
    cycles = []
    for component in _components(graph):
        if len(component) < 2:
            continue
        named: set[str] = set()
        for module in sorted(component):
            if module not in named:
                cycle = _shortest_cycle(graph, module, component)
                named.update(cycle)
                cycles.append(cycle)
    return sorted(cycles)


def describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


def oversized(root: Path, package: str, limit: int) -> list[tuple[str, int]]:
    """Modules of ``package`` over ``limit`` lines: (path from ``root``, lines), by path."""
    sizes = (
        (path.relative_to(root).as_posix(), len(path.read_text(encoding="utf-8").splitlines()))
        for path in sorted((root / package).rglob("*.py"))
    )
    return [(path, lines) for path, lines in sizes if lines > limit]


# --------------------------------------------------------------------------- pgproxy itself


def test_no_import_cycles() -> None:
    cycles = import_cycles(import_graph(package_sources(ROOT, PACKAGE)))
    assert not cycles, f"import cycles in {PACKAGE}:\n{describe(cycles)}"


def test_workers_import_neither_cli_nor_app() -> None:
    """The rule of ``pgproxy.workers``: the CLI and the app import it, never the reverse."""
    graph = import_graph(package_sources(ROOT, PACKAGE))
    workers = [name for name in graph if name.split(".")[:2] == ["pgproxy", "workers"]]
    assert "pgproxy.workers.supervisor" in workers
    assert {name: graph[name] & {"pgproxy.cli", "pgproxy.app"} for name in workers} == {
        name: set() for name in workers
    }


def test_no_module_over_500_lines() -> None:
    offenders = oversized(ROOT, PACKAGE, MAX_LINES)
    assert not offenders, f"modules over {MAX_LINES} lines: " + ", ".join(
        f"{path} ({lines})" for path, lines in offenders
    )


# --------------------------------------------------------------------------- the checkers


SYNTHETIC: dict[str, tuple[str, bool]] = {
    "pkg": ("", True),
    "pkg.a": ("import os\nfrom pkg import b\n", False),  # b: a submodule
    "pkg.b": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.c import C\n",
        False,
    ),
    "pkg.sub": ("from .. import d\n", True),
    "pkg.sub.c": ("from ..b import B\n\ndef f():\n    import pkg.a.x\n", False),  # a.x: no module
    "pkg.d": ("from pkg import VERSION\nfrom .sub import c\n", False),  # VERSION: a name
}


def test_the_import_graph_resolves_every_kind_of_import() -> None:
    assert import_graph(SYNTHETIC) == {
        "pkg": set(),
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.sub": {"pkg.d"},
        "pkg.sub.c": {"pkg.b", "pkg.a"},
        "pkg.d": {"pkg", "pkg.sub.c"},
    }


def test_the_cycle_check_reports_cycles_in_import_order() -> None:
    cycles = import_cycles(import_graph(SYNTHETIC))
    assert cycles == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]  # b <-> c: named already
    assert describe(cycles) == "pkg.a -> pkg.b -> pkg.sub.c -> pkg.a"
    separate = {"x": {"y"}, "y": {"x"}, "z": {"z2"}, "z2": {"z"}, "w": {"x", "z"}}
    assert describe(import_cycles(separate)) == "x -> y -> x\nz -> z2 -> z"
    star = {"x": {"y", "z"}, "y": {"x"}, "z": {"x"}}  # no one cycle names all three
    assert import_cycles(star) == [["x", "y", "x"], ["z", "x", "z"]]


def test_the_cycle_check_passes_a_graph_without_cycles() -> None:
    acyclic = {**SYNTHETIC, "pkg.sub.c": ("def f():\n    from pkg import VERSION\n", False)}
    assert import_cycles(import_graph(acyclic)) == []


def test_the_size_check_names_the_long_modules(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "short.py").write_text("x = 1\n" * 3)
    (tmp_path / "pkg" / "sub" / "long.py").write_text("x = 1\n" * 4)
    assert oversized(tmp_path, "pkg", 3) == [("pkg/sub/long.py", 4)]
