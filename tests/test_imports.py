"""The package's import structure: no cycles, no private names across modules, and the method's modules
importable first (``import verl`` loads our verl plugin, which imports the adapters; a method module that
imported verl at module level would re-enter itself half-initialised)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "l2t_verl"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of the l2t_verl imports a module runs when it is imported (not those inside
    functions, which run later)."""
    found = []
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative import
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{module}" if module else base
            if module.startswith("l2t_verl"):
                found.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("l2t_verl")]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for module, names in _module_level_imports(path):
            for imported in names:  # `from l2t_verl.x import y` where y is a submodule
                if f"{module}.{imported}" in modules:
                    edges.add(f"{module}.{imported}")
            if module in modules:
                edges.add(module)
        graph[name] = edges - {name}
    return graph


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            # A package importing its own submodules (re-exports) is not a cycle with them.
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_private_name_crosses_modules() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for module, names in _module_level_imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                offenders.append(f"{_module_name(path)} imports {private} from {module}")
    assert not offenders, offenders


def test_no_module_over_500_lines() -> None:
    long = {_module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


@pytest.mark.slow
@pytest.mark.parametrize("module", ["l2t_verl.step", "l2t_verl.advantage", "l2t_verl.penalty"])
def test_method_modules_import_first_without_breaking_the_plugin(module: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", f"import {module}, verl"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "failed to register" not in run.stderr, run.stderr[-2000:]
