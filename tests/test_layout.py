"""The package layout is the architecture: each package imports only the layers below it
(docs/architecture.md). Checked on the source with ast, function-level imports included."""

import ast
from pathlib import Path

JDIFF = Path(__file__).resolve().parents[1] / "jdiff"

# Layer of each top-level unit of jdiff; a unit may import units of a lower layer, and itself.
LAYERS = {
    "spec": 0,
    "signals": 0,
    "_logs": 0,
    "flow": 0,  # the rectified-flow interpolant, shift, timestep densities (numpy/jax only; schedules use it)
    "schedules": 1,
    "forward": 2,
    "losses": 3,
    "analytic": 3,  # the math
    "edm": 3,
    "sampling": 4,
    "likelihood": 4,  # bits/dim: the VLB over all t, the probability-flow ODE (diffrax)
    "models": 4,
    "data": 4,
    "metrics": 5,
    "distill": 5,  # the losses of few-step students (consistency, progressive distillation)
    "config": 6,
    "run": 7,
    "pretrained": 6,  # diffusers-format checkpoints in/out (run, training and cli use it)
    "training": 8,
    "cli": 9,
}
TOP = {"__init__"}  # jdiff/__init__.py re-exports the core API


def _unit(path: Path) -> str:
    rel = path.relative_to(JDIFF)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] == "jdiff" and len(parts) > 1 and parts[1] in LAYERS:
                out.add(parts[1])
    return out


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in JDIFF.rglob("*.py")} - TOP
    assert units == set(LAYERS), f"add new units to LAYERS (and to docs/architecture.md): {units ^ set(LAYERS)}"


def test_imports_only_go_down_the_layers():
    bad = []
    for path in JDIFF.rglob("*.py"):
        unit = _unit(path)
        if unit in TOP:
            continue
        for dep in _imports(path):
            if dep != unit and LAYERS[dep] >= LAYERS[unit]:
                bad.append(f"{path.relative_to(JDIFF)} imports jdiff.{dep} (layer {LAYERS[dep]} >= {LAYERS[unit]})")
    assert not bad, "\n".join(bad)


def test_no_eval_and_no_private_argparse():
    for path in JDIFF.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec"), f"{path}: {node.func.id}("
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("_actions", "_option_string_actions"), f"{path}: .{node.attr}"
