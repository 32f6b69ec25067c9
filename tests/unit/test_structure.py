"""The layout rules of the design that the sources themselves can show (read with ``ast`` only).

- Pure modules (``gateway/intercept/``, ``gateway/sse/``, ``gateway/tools/{naming,schema,
  results}.py``) import no I/O package: not at the top, not inside a function, not under
  ``if TYPE_CHECKING:``. They are the sans-IO core, tested with bytes and dicts alone.
- The shell talks to dialects through ``gateway.intercept.dialect`` only: no module outside a
  dialect's folder imports from it except the registry (``gateway.intercept.dialects``), and no
  module of ``gateway/proxy/`` at all.
- No two project modules (``gateway/``, ``control/``; the generated ``control/v1`` aside) import
  each other, directly or round a longer cycle, counting every import statement wherever it
  stands: a cycle held by a function-level or TYPE_CHECKING import is still two modules that
  cannot be understood, or split, apart.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "control")
GENERATED = ("control.v1",)
PURE_PACKAGES = ("gateway.intercept", "gateway.sse")
PURE_MODULES = ("gateway.tools.naming", "gateway.tools.schema", "gateway.tools.results")
IO_PACKAGES = frozenset({"asyncio", "aiohttp", "grpc", "mcp", "httpx", "httpx2", "uvloop"})


@dataclass(frozen=True, slots=True)
class Import:
    """One imported name, resolved to a project module when it is one."""

    target: str  # a project module, or the dotted name as written
    line: int
    project: bool


def _modules() -> dict[str, Path]:
    """Every project module by dotted name (``gateway.sse`` for its ``__init__.py``)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            if not any(name == g or name.startswith(g + ".") for g in GENERATED):
                found[name] = path
    return found


MODULES = _modules()


def _project_module(name: str) -> str | None:
    """The project module ``name`` imports (its longest prefix that is one), or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in MODULES:
            return prefix
    return None


def _imports(module: str) -> Iterator[Import]:
    """Every import of ``module``, wherever it stands (``importlib.import_module`` too)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom | ast.Call):
            continue
        for name in _imported_names(node, package):
            target = _project_module(name)
            if target is not None:
                yield Import(target, node.lineno, True)
            else:
                yield Import(name, node.lineno, False)


def _imported_names(node: ast.Import | ast.ImportFrom | ast.Call, package: str) -> list[str]:
    """The dotted names an import statement (or ``import_module("x")`` call) imports."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            anchor = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        # ``from pkg import mod`` imports the module pkg.mod when there is one.
        return [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"] or [base]
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if called == "import_module" and node.args:
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return [first.value]
    return []


def _pure_modules() -> list[str]:
    pure = [m for m in MODULES if any(m == p or m.startswith(p + ".") for p in PURE_PACKAGES)]
    return sorted(pure) + [m for m in PURE_MODULES if m in MODULES]


def test_the_pure_modules_exist() -> None:
    """The rules below check something: the modules they name are where the design says."""
    pure = _pure_modules()
    assert "gateway.intercept.messages.stream" in pure
    assert "gateway.sse.framing" in pure
    assert all(m in MODULES for m in PURE_MODULES)


@pytest.mark.parametrize("module", _pure_modules())
def test_pure_module_imports_no_io(module: str) -> None:
    bad = [
        f"{MODULES[module].relative_to(ROOT)}:{i.line} imports {i.target}"
        for i in _imports(module)
        if not i.project and i.target.split(".")[0] in IO_PACKAGES
    ]
    assert not bad, "pure modules must not import I/O packages: " + "; ".join(bad)


# Each dialect's folder, and the one module outside them that may import one.
DIALECT_PACKAGES = ("gateway.intercept.messages",)
REGISTRY = "gateway.intercept.dialects"


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_dialect_packages_exist() -> None:
    """The rules below check something: the dialects, registry and shell are where they say."""
    assert all(p in MODULES for p in DIALECT_PACKAGES)
    assert REGISTRY in MODULES
    assert "gateway.proxy.relay" in _shell_modules()


@pytest.mark.parametrize("package", DIALECT_PACKAGES)
def test_only_the_registry_imports_a_dialect(package: str) -> None:
    bad = [
        f"{MODULES[module].relative_to(ROOT)}:{i.line} imports {i.target}"
        for module in sorted(MODULES)
        if not _in(module, package) and module != REGISTRY
        for i in _imports(module)
        if i.project and _in(i.target, package)
    ]
    assert not bad, "only the registry may import a dialect's modules: " + "; ".join(bad)


def _shell_modules() -> list[str]:
    return sorted(m for m in MODULES if _in(m, "gateway.proxy"))


@pytest.mark.parametrize("module", _shell_modules())
def test_the_shell_imports_no_dialect(module: str) -> None:
    """``gateway/proxy/`` holds a route's ``Dialect`` and never looks behind it."""
    bad = [
        f"{MODULES[module].relative_to(ROOT)}:{i.line} imports {i.target}"
        for i in _imports(module)
        if i.project and any(_in(i.target, p) for p in DIALECT_PACKAGES)
    ]
    assert not bad, "the shell must go through the Dialect: " + "; ".join(bad)


def _graph() -> dict[str, dict[str, int]]:
    """Project module -> {project module it imports: first line}."""
    graph: dict[str, dict[str, int]] = {}
    for module in MODULES:
        edges: dict[str, int] = {}
        for i in _imports(module):
            if i.project and i.target != module:
                edges.setdefault(i.target, i.line)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
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
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_between_project_modules() -> None:
    graph = _graph()
    described = []
    for component in _cycles(graph):
        members = set(component)
        edges = [
            f"{a} -> {b} (line {line})"
            for a in component
            for b, line in sorted(graph[a].items())
            if b in members
        ]
        described.append("{" + ", ".join(component) + "}: " + "; ".join(edges))
    assert not described, "import cycles: " + " | ".join(described)


def test_cycle_finder_finds_cycles() -> None:
    """The finder itself: a two-module cycle and a longer one, not a mere diamond."""
    graph = {
        "a": {"b": 1},
        "b": {"a": 2},
        "c": {"d": 1, "e": 1},
        "d": {"f": 1},
        "e": {"f": 1},
        "f": {"g": 1},
        "g": {"h": 1},
        "h": {"f": 1},
    }
    assert sorted(_cycles(graph)) == [["a", "b"], ["f", "g", "h"]]
