"""The package's shape: no import cycle anywhere in specdec/, and every dependency points down the
layers of docs/ARCHITECTURE.md (server, cli -> engine -> scheduler -> runner, planner, validation ->
speculative -> kernels, models, sampling). Imports inside functions count: a lazy import upwards
is still an upward dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import specdec

ROOT = Path(specdec.__file__).parent
GENERATED = "specdec.v1"  # the gRPC stubs protoc writes at build time

# The highest-numbered layer a module's name starts with; everything else is the core's base (0).
LAYERS = {
    "specdec.testing": 7,  # helpers for the tests: may use anything
    "specdec.cli": 6,
    "specdec.server": 5,
    "specdec.router": 5,
    "specdec.client": 5,
    "specdec.bench": 5,
    "specdec.distill": 5,
    "specdec.eval": 5,
    "specdec.engine": 4,
    "specdec.scheduler": 3,
    "specdec.runner": 2,
    "specdec.planner": 2,
    "specdec.validation": 2,
    "specdec.speculative": 1,
    "specdec.readback": 1,
}


def _layer(module: str) -> int:
    if module == "specdec":  # the package's __init__: the public facade, re-exporting lazily
        return max(LAYERS.values()) + 1
    matches = [
        (len(prefix), layer)
        for prefix, layer in LAYERS.items()
        if module == prefix or module.startswith(prefix + ".")
    ]
    return max(matches)[1] if matches else 0


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py") if not _module_name(p).startswith(GENERATED)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from specdec.x import y` depends on specdec.x.y when that is a module.
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def test_the_graph_sees_the_package():
    graph = _graph()
    assert {"specdec.engine", "specdec.scheduler", "specdec.kernels.philox", "specdec.cli.serve"} <= set(
        graph
    )
    assert "specdec.runner" in graph["specdec.engine"]


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_dependencies_point_down_the_layers():
    upward = [
        f"{module} (layer {_layer(module)}) imports {dep} (layer {_layer(dep)})"
        for module, deps in sorted(_graph().items())
        for dep in sorted(deps)
        if _layer(dep) > _layer(module)
    ]
    assert not upward, "\n".join(upward)
