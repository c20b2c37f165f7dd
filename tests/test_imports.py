"""Imports point one way: no import cycle among sparcomm's modules, and ``sparcomm.comm``
never names a codec class (codecs describe themselves; the dispatcher reads the family).

The graph is read from the source with ``ast``: every ``import`` statement of every module
of ``sparcomm/`` and ``kernels/`` (installed as ``sparcomm.kernels``), at module level or
inside functions, except those under ``if TYPE_CHECKING:`` (never executed).  An edge goes
to the module imported (``from a.b import c`` is ``a.b.c`` when that is a module, else
``a.b``); a package's ``__init__`` run on the way is not an edge, as in import-linter.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sparcomm
from sparcomm.codecs import CODECS, Codec

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"sparcomm": ROOT / "sparcomm", "sparcomm.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, directory in SOURCES.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` of every executed import statement."""
    found: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, [], child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = module.split(".")
                    if not is_package:
                        package = package[:-1]
                    package = package[: len(package) - (child.level - 1)]
                    base = ".".join([*package, base] if base else package)
                found.append((base, [alias.name for alias in child.names], child.lineno))
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for base, names, _ in _imports(tree, name, path.name == "__init__.py"):
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules] or [base]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def test_the_graph_sees_the_package():
    graph = _graph()
    assert "sparcomm.comm._allreduce" in graph and "sparcomm.codecs.topk" in graph
    assert "sparcomm.comm._dispatch" in graph["sparcomm.comm._allreduce"]
    assert "sparcomm.codecs._base" in graph["sparcomm.codecs.topk"]


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (break them so imports point one way):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_comm_never_imports_codec_classes():
    codec_names = {name for name in CODECS} | {"Codec"}
    assert {"TopK", "QSGD", "TernGrad", "OneBit", "FP16", "NoCompression"} <= codec_names
    offenders = []
    modules = _modules()
    for name, path in modules.items():
        if not name.startswith("sparcomm.comm"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for base, names, line in _imports(tree, name, path.name == "__init__.py"):
            codec_module = (
                base.startswith("sparcomm.codecs.") and base != "sparcomm.codecs._registry"
            )
            named = base.startswith("sparcomm") and set(names) & codec_names
            if codec_module or named or base == "sparcomm.codecs":
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {names} from {base}")
    assert not offenders, "comm/ must read a codec's family and capabilities:\n" + "\n".join(
        offenders
    )
    assert issubclass(CODECS["TopK"], Codec) and sparcomm.TopK is CODECS["TopK"]
