"""The package's layers only point down: at most six floors, no import circle, computed from the sources.

A module's floor is its place in the longest chain of imports among the package's own modules: 1 for a module
that imports none of them, else one more than the highest floor it imports. Imports inside functions count;
imports under ``if TYPE_CHECKING:`` do not (they never run). ``kernels/`` (installed as ``fused_residual.kernels``)
is a tree of its own below the package: it may import ``fused_residual.activations`` and nothing else of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fused_residual"
KERNELS = ROOT / "kernels"
ENTRY_POINTS = {"fused_residual", "fused_residual.__main__", "fused_residual.tune"}
MAX_FLOORS = 6


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST):
    """Every Import/ImportFrom node that can run: inside functions too, not under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules) -> list[str]:
    """The modules ``node`` imports: ``from P import a`` imports the module ``P.a`` where there is one, else ``P``
    (for its attribute ``a``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """Package module -> the package modules it imports at run time (``fused_residual.kernels`` left out)."""
    sources = {_module_name(p, PACKAGE, "fused_residual"): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in sources.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for node in _runtime_imports(tree):
            targets.update(t for t in _imported(node, name, path.name == "__init__.py", sources) if t in sources)
        graph[name] = targets - {name}
    return graph


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor; AssertionError naming the circle if there is one."""
    found: dict[str, int] = {}
    path: list[str] = []

    def floor(name: str) -> int:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(name):] + [name]))
        if name not in found:
            path.append(name)
            found[name] = 1 + max((floor(t) for t in graph[name]), default=0)
            path.pop()
        return found[name]

    for name in graph:
        floor(name)
    return found


def test_the_package_has_at_most_six_floors_and_no_circle():
    found = floors(import_graph())
    table = "\n".join(f"F{f} {name}" for name, f in sorted(found.items(), key=lambda item: (-item[1], item[0])))
    assert max(found.values()) <= MAX_FLOORS, table
    top = max(found.values())
    assert {name for name, f in found.items() if f == top} <= ENTRY_POINTS, table


def test_the_floor_count_sees_imports_inside_functions_and_skips_type_checking_ones():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n"
              "def f():\n    from . import c\n")
    nodes = list(_runtime_imports(ast.parse(source)))
    assert [n.names[0].name for n in nodes if isinstance(n, ast.ImportFrom) and n.level] == ["c"]
    assert floors({"a": {"c"}, "c": {"d"}, "d": set()}) == {"a": 3, "c": 2, "d": 1}
    try:
        floors({"a": {"b"}, "b": {"a"}})
    except AssertionError as e:
        assert "a -> b -> a" in str(e)
    else:
        raise AssertionError("a circle was not found")


def test_kernels_import_only_the_activation_registry_of_the_package():
    package = {_module_name(p, PACKAGE, "fused_residual") for p in PACKAGE.rglob("*.py")}
    for path in KERNELS.rglob("*.py"):
        name = _module_name(path, KERNELS, "fused_residual.kernels")
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            imported = set(_imported(node, name, path.name == "__init__.py", package)) & package
            assert imported <= {"fused_residual.activations"}, f"kernels/{path.name} imports {sorted(imported)}"
