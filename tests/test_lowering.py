"""The one lowering between the model math and what runs or exports it (``ncps_mlx.lowering``):
the runtime and the ONNX exporter read cells through it alone, each enumeration is defined once,
and the modules import each other without cycles."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import re
from pathlib import Path

import pytest

import ncps_mlx
from ncps_mlx import lowering, runtime
from ncps_mlx.converters import onnx_export

ROOT = Path(__file__).resolve().parents[1]
READERS_OF_CELLS = sorted((ROOT / "ncps_mlx" / "runtime").rglob("*.py")) + [ROOT / "converters" / "onnx_export.py"]


def _trees():
    for path in READERS_OF_CELLS:
        yield path, ast.parse(path.read_text())


def test_the_runtime_and_the_exporter_read_no_private_member():
    """No ``x._name`` but on ``self``/``cls`` (a class's own members) in runtime/ and onnx_export."""
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and re.fullmatch(r"_(?!_)\w*", node.attr):
                if ast.unparse(node.value) not in ("self", "cls"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def _is_type_name(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "__name__" and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) == "type")


def test_nothing_is_looked_up_by_class_name():
    """Kernels and exporters are keyed by the lowering's type, not ``type(cell).__name__``."""
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            keys = []
            if isinstance(node, ast.Subscript):
                keys = [node.slice]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                keys = node.args[:1]
            elif isinstance(node, ast.Compare):
                keys = [node.left, *node.comparators]
            if any(_is_type_name(sub) for key in keys for sub in ast.walk(key)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


MODELS = {
    "CfC": lambda: ncps_mlx.CfC(3, 8),
    "CfC pure, no backbone": lambda: ncps_mlx.CfC(3, 8, mode="pure", backbone_layers=0),
    "wired CfC": lambda: ncps_mlx.CfC(3, ncps_mlx.wirings.AutoNCP(8, 2)),
    "LTC": lambda: ncps_mlx.LTC(3, ncps_mlx.wirings.AutoNCP(8, 2)),
    "CTRNN": lambda: ncps_mlx.CTRNN(3, 4),
    "CTGRU": lambda: ncps_mlx.CTGRU(3, 4, M=3),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_cell_lowers_to_what_a_kernel_and_the_exporter_take(name):
    model = MODELS[name]()
    lowered = model.rnn_cell.lowered()
    assert type(lowered) in runtime.cpu.SEQUENCES and type(lowered) in onnx_export._EXPORTERS
    with pytest.raises(dataclasses.FrozenInstanceError):  # a lowering is a value
        lowered.mode = None


def test_each_enumeration_is_defined_once_and_the_kernels_agree():
    """Modes and backbone activations live in ``ncps_mlx.lowering``; cfc.c numbers them the same."""
    source = (ROOT / "ncps_mlx" / "runtime" / "cpu" / "cfc.c").read_text()
    modes = dict(re.findall(r"(\w+) = (\d+)", re.search(r"enum \{ DEFAULT[^}]*\}", source).group(0)))
    assert {mode.name: mode.kernel_id for mode in lowering.Mode} == {k: int(v) for k, v in modes.items()}
    activations = dict(re.findall(r"(\w+) = (\d+)", re.search(r"enum \{ LECUN_TANH[^}]*\}", source).group(0)))
    assert {a.name.upper(): a.kernel_id for a in lowering.BACKBONE_ACTIVATIONS.values()} == {k: int(v) for k, v in activations.items()}
    from ncps_mlx.cells import cfc

    assert cfc.MODES is lowering.MODES
    defined = [path for path in (ROOT / "ncps_mlx").rglob("*.py")
               if re.search(r'^\w*MODES\w* = [\(\{\[]\s*"default"', path.read_text(), flags=re.M)]
    assert defined == []  # lowering.MODES is derived from the enum, not written out again


def _import_graph() -> dict:
    """{module: the project modules it imports, at module level or inside a function}, for
    ncps_mlx and converters."""
    modules = {}
    for base, package in ((ROOT / "ncps_mlx", "ncps_mlx"), (ROOT / "converters", "ncps_mlx.converters")):
        for path in base.rglob("*.py"):
            parts = [p for p in path.relative_to(base).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path

    def targets(name, node, is_package):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name in modules]
        base = name.split(".") if is_package else name.split(".")[:-1]
        if node.level:
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
        return submodules or ([target] if target in modules else [])

    graph = {}
    for name, path in modules.items():
        imports = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[name] = {t for node in imports for t in targets(name, node, path.name == "__init__.py")} - {name}
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    order, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], itertools.count()

    def visit(module):
        order[module] = low[module] = next(counter)
        stack.append(module)
        on_stack.add(module)
        for other in graph[module]:
            if other not in order:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], order[other])
        if low[module] == order[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in order:
            visit(module)
    assert len(graph) > 40 and cycles == []
