"""The layer order of qcast's modules, checked on their import statements (docs/design.md, "Layout").

Lowest first: the core (graph capture, config, errors, the float building blocks, observers, the quantized-model
container), then backend-free graph passes, then backends (each a package; the torch backend holds its kernels),
then the pipeline and the techniques (plan, prepare, calibrate, convert, AdaRound, accuracy-aware search), then
reports, files and export, then the public API and the CLI. A module imports only from its own layer or below at
module level, and the layers below the backends never import a backend at all (not even inside a function): what a
backend can run reaches the pipeline as declared capabilities (``Backend.conv_add``, ``Plan.input_qmax``).
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "qcast"

LAYERS = [
    ("core", ["qcast.errors", "qcast.distributed", "qcast.config", "qcast.data", "qcast.timing", "qcast.nn", "qcast.smooth",
              "qcast.observers", "qcast.schemes", "qcast.quantizers", "qcast.quantized", "qcast.capture",
              "qcast.capture_export", "qcast.distributed"]),
    ("passes", ["qcast.passes"]),
    ("backends", ["qcast.backends"]),
    ("pipeline", ["qcast.plan", "qcast.prepare", "qcast.calibrate", "qcast.convert", "qcast.adaround",
                  "qcast.accuracy", "qcast.qat", "qcast.calibration_state",
                  "qcast.distributed.calibration"]),
    ("outputs", ["qcast.report", "qcast.serialize", "qcast.export"]),
    ("interface", ["qcast.api", "qcast.cli", "qcast.demo", "qcast.demo_data", "qcast.__main__", "qcast"]),
]


def _rank(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py: add it"
    return best[0]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, modules) -> list[tuple[str, bool, int]]:
    """``(imported qcast module, at module level, line)`` for each import statement of the module."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import mod` imports the submodule pkg.mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            if t == "qcast" or t.startswith("qcast."):
                out.append((t, id(node) in top, node.lineno))
    return out


MODULES = _modules()
EDGES = {name: _imports(name, path, MODULES) for name, path in MODULES.items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layer_order(name):
    here = _rank(name)
    bad = []
    for target, at_top, line in EDGES[name]:
        there = _rank(target)
        if at_top and there > here:
            bad.append(f"line {line}: imports {target} ({LAYERS[there][0]}) at module level")
        if here < _rank("qcast.backends") and there == _rank("qcast.backends"):
            bad.append(f"line {line}: imports the backend module {target}; the {LAYERS[here][0]} layer knows no backend")
    assert not bad, f"{name} ({LAYERS[here][0]}): " + "; ".join(bad)


def test_no_import_cycle_at_module_level():
    graph = {name: {t for t, at_top, _ in edges if at_top and t != name and t in MODULES}
             for name, edges in EDGES.items()}
    # a package's __init__ importing its own submodules is how packages work; a cycle through anything else is not
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
                return True
            if not state.get(nxt) and visit(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if not state.get(name) and visit(name, [name]):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)
