"""The package's import structure, read from the source (ast, nothing imported): no import circle between
dtrain's modules, nothing that imports the `dtrain` package itself from inside it (it would run back up
through dtrain/__init__.py), and nothing under dtrain/models/ that imports an engine.

Every `import` and `from ... import` counts, at module level and inside functions (a lazy import makes no
circle at import time, but still ties the two modules' designs together), resolved as Python resolves it:
`from .x import y` is an edge to the module x.y when there is one, else to x. Importing a.b.c also runs the
__init__ of a and a.b; those implied edges are not counted (every sibling import would then circle through
its package's __init__, which imports its submodules: that is a package's job, not a design circle).
Imports under `if TYPE_CHECKING:` never run and are not counted.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dtrain"


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported dtrain module, dotted
    line: int
    lazy: bool  # inside a function (runs when it is called), not at import time

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line}{', in a function' if self.lazy else ''})"


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its __init__.py)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, lazy: bool = False):
    """(import node, inside a function?) for every import that can run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _imports(ast.Module(body=node.orelse, type_ignores=[]), lazy)
        else:
            yield from _imports(node, lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def import_edges(root: Path = PACKAGE) -> list[Edge]:
    modules = module_names(root)
    top = root.name
    edges = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, lazy in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:  # relative: from the module's package, up level-1 more
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in dict.fromkeys(targets):
                if target == top or target.startswith(top + "."):
                    while target not in modules:  # `import dtrain.x.y` of a name: its module
                        target = target.rsplit(".", 1)[0]
                    if target != name:
                        edges.append(Edge(name, target, node.lineno, lazy))
    return edges


def _graph(edges: list[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    return graph


def components(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each module of one reaches
    every other through imports, so each holds at least one circle."""
    graph = _graph(edges)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):  # the package has ~70 modules: recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
    return sorted(found)


def cycles(edges: list[Edge]) -> list[list[str]]:
    """One shortest circle per component, from its first module back to it (breadth-first inside it).
    Fixing it may leave another circle in the same component: the test's report names all its modules."""
    graph, circles = _graph(edges), []
    for component in components(edges):
        start, members = component[0], set(component)
        paths, queue, circle = {start: [start]}, [start], None
        while circle is None:  # a strongly connected component always has a way back
            v = queue.pop(0)
            for w in sorted(graph[v] & members):
                if w == start:
                    circle = paths[v] + [start]
                    break
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        circles.append(circle)
    return circles


def _show(circle: list[str], edges: list[Edge]) -> str:
    lines = {(e.source, e.target): e for e in edges}
    return "; ".join(str(lines[a, b]) for a, b in zip(circle, circle[1:]))


# ---- the walker itself ----------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


def test_walker_resolves_relative_lazy_and_type_checking_imports(tmp_path):
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "__version__ = '1'\n",
            "pkg/a.py": "from . import __version__\nfrom .sub import b\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import x\n"
            "def f():\n    from .. import a\n",
            "pkg/sub/c.py": "import pkg.sub.b\nfrom ..a import name\nclass C:\n    from . import b\n",
        },
    )
    got = {(e.source, e.target, e.lazy) for e in import_edges(root)}
    assert got == {
        ("pkg.a", "pkg", False),
        ("pkg.a", "pkg.sub.b", False),
        ("pkg.sub.b", "pkg.a", True),
        ("pkg.sub.c", "pkg.sub.b", False),
        ("pkg.sub.c", "pkg.a", False),
    }


def test_walker_finds_circles_module_level_and_lazy(tmp_path):
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from .b import x\n",
            "pkg/b.py": "from .c import y\n",
            "pkg/c.py": "def f():\n    from .a import z\n",
            "pkg/d.py": "from . import e\n",
            "pkg/e.py": "import pkg.d\n",
        },
    )
    edges = import_edges(root)
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"], ["pkg.d", "pkg.e", "pkg.d"]]
    assert cycles([e for e in edges if not e.lazy]) == [["pkg.d", "pkg.e", "pkg.d"]]
    assert "pkg.c -> pkg.a (line 2, in a function)" in _show(cycles(edges)[0], edges)


# ---- the package ----------------------------------------------------------------------------------------


def test_no_import_circle():
    """Function-level imports count too. Before issue 23 there was no circle at import time, but two groups
    of modules in circles through function-level imports: 13 modules (dtrain/__init__ -> cli -> ... ->
    checkpoint and doctor back to dtrain for __version__; engine <-> its engines for check_engine;
    models.transfer -> engine) and 3 (data.shards <-> sources and folder, for DataError and make_builtin).
    A lazy import hides a circle from Python, not from the reader: none may come back."""
    edges = import_edges()
    assert [f"{_show(c, edges)} [all of {', '.join(m)}]" for c, m in zip(cycles(edges), components(edges))] == []


def test_nothing_imports_the_package_itself():
    """`from . import __version__` in dtrain/x.py runs back up through dtrain/__init__.py (and whatever it
    imports one day)."""
    assert [str(e) for e in import_edges() if e.target == PACKAGE.name] == []


def test_models_do_not_import_an_engine():
    """A model is built before, and without, any engine (export, transfer, a user's script)."""
    engine = f"{PACKAGE.name}.engine"
    assert [
        str(e)
        for e in import_edges()
        if e.source.startswith(f"{PACKAGE.name}.models") and (e.target == engine or e.target.startswith(engine + "."))
    ] == []
