"""The package's layout: imports go down the data flow (calibrate -> decompose -> adapt -> export),
never around it, and the tree is formatted and linted (ruff) as CI checks it."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "corda_kernels")

# Lower layers never import higher ones; within a layer, modules may import each other (acyclically).
LAYERS = [
    {"_backend", "_dtypes", "_files", "_deprecation", "_measure", "_version", "distributed", "testing"},
    {"kernels"},
    {"ops", "linalg"},
    {"nn"},
    {"integrations"},
    {"methods"},
    {"calibration"},
    {"decomposition"},
    {"config"},
    {"adapt", "export", "memory"},
    {"blockwise"},
    {"cli"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, module: str, modules) -> set[str]:
    """Every corda_kernels module ``module`` imports, at import time or inside functions
    (``from pkg import name`` names the submodule ``pkg.name`` when there is one, else ``pkg``)."""
    is_package = path.endswith("__init__.py")
    tree = ast.parse(open(path).read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("corda_kernels"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("corda_kernels"):
                continue
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                paths[_module_name(path)] = path
    graph = {}
    for module, path in paths.items():
        graph[module] = {t for t in _imports(path, module, paths) if t in paths and t != module}
    return graph


def _component(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root, which may import anything


def test_every_module_has_a_layer():
    missing = sorted({c for m in _graph() if (c := _component(m)) is not None and c not in LAYER})
    assert not missing, f"place these in LAYERS: {missing}"


def test_imports_go_down_the_layers():
    upward = []
    for module, targets in _graph().items():
        source = _component(module)
        if source is None:
            continue
        for target in targets:
            dest = _component(target)
            if dest is None:
                upward.append(f"{module} -> {target} (the package root)")
            elif LAYER[dest] > LAYER[source]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports climbing the data flow:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {m: {t for t in ts if not graph_is_package_of(t, m)} for m, ts in _graph().items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def graph_is_package_of(target: str, module: str) -> bool:
    """A module importing its own package's ``__init__`` (as `from . import x` does) is not a cycle edge:
    the package is being initialized by that very import."""
    return module.startswith(target + ".")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    ruff = shutil.which("ruff")
    if ruff is None:
        try:
            import ruff  # noqa: F401
        except ImportError:
            pytest.skip("ruff is not installed (pip install -e '.[test]')")
        ruff = [sys.executable, "-m", "ruff"]
    else:
        ruff = [ruff]
    proc = subprocess.run([*ruff, *command, ROOT], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
