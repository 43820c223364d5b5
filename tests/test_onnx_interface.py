"""The ONNX interface on the bundled ncps.torch fixtures: the default export takes `input` alone
and loads without a warning; `inputs=` makes initial states and timespans real graph inputs;
the step graph streams. Each is checked against ncps.torch itself (verify_output: batch 1
with random timespans, batch 4, batch 3 from a random initial state)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ncps_mlx
from ncps_mlx.converters import readers
from ncps_mlx.converters.verify import verify_output

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("ncps.torch")

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "torch"
FIXTURES = sorted(p for p in ROOT.glob("*.pt") if p.stem != "cfc_module")  # cfc_module: a pickle


def description_of(pt: Path):
    config = pt.with_suffix(".json")
    return readers.read(pt, config=json.loads(config.read_text()) if config.exists() else None).module()


def checked(description, path, want_timespans, want_state):
    reports = verify_output(description, path)
    assert [r.target.split(" ")[0] for r in reports] == ["onnxruntime", "onnxruntime"]
    assert reports[0].source.startswith("torch")
    for report in reports:
        assert report.passed, report.table()
    labels = {c.case for c in reports[0].checks}
    assert any("random timespans" in label for label in labels) == want_timespans
    assert any("random initial state" in label for label in labels) == want_state


@pytest.mark.parametrize("pt", FIXTURES, ids=lambda p: p.stem)
def test_bundled_fixture_exports_three_ways(pt, tmp_path):
    description = description_of(pt)
    model = description.build()
    mixed = model.use_mixed

    default = ncps_mlx.export_onnx(model, tmp_path / "default.onnx")
    session = ort.InferenceSession(str(default), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["output", "state"] + (["memory"] if mixed else [])
    checked(description, default, want_timespans=False, want_state=False)

    inputs = ["initial_state", "timespans"] + (["initial_memory"] if mixed else [])
    fed = ncps_mlx.export_onnx(model, tmp_path / "inputs.onnx", inputs=inputs)
    session = ort.InferenceSession(str(fed), providers=["CPUExecutionProvider"])
    layout = ["batch", "time"] if model.batch_first else ["time", "batch"]
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes == {"input": [*layout, model.input_size], "initial_state": ["batch", model.state_size],
                      "timespans": layout, **({"initial_memory": ["batch", model.state_size]} if mixed else {})}
    checked(description, fed, want_timespans=True, want_state=True)

    step = ncps_mlx.export_onnx(model, tmp_path / "step.onnx", step=True, inputs=["timespans"])
    checked(description, step, want_timespans=True, want_state=True)


def test_default_export_loads_without_a_warning(tmp_path):
    """In a fresh process, at onnxruntime's default log level."""
    paths = []
    for name in ("cfc_mixed", "ltc_ncp", "cfc_time_first_last"):
        model = description_of(ROOT / f"{name}.pt").build()
        paths.append(str(ncps_mlx.export_onnx(model, tmp_path / f"{name}.onnx")))
        paths.append(str(ncps_mlx.export_onnx(model, tmp_path / f"{name}_step.onnx", step=True)))
    code = "import sys, onnxruntime as ort\nfor p in sys.argv[1:]: ort.InferenceSession(p, providers=['CPUExecutionProvider'])"
    done = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout == ""


def cli(*args):
    exe = Path(sys.executable).with_name("ncps-convert")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)


def test_cli_onnx_inputs_and_step(tmp_path):
    out = tmp_path / "m.onnx"
    result = cli(ROOT / "cfc_mixed.pt", "-o", out, "--onnx-inputs", "initial_state,initial_memory,timespans", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    names = [i.name for i in ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()]
    assert names == ["input", "initial_state", "initial_memory", "timespans"]
    result = cli(ROOT / "cfc_mixed.pt", "-o", out, "--onnx-step", "--onnx-inputs", "timespans", "--force", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["passed"], result.stderr[-2000:]
    names = [i.name for i in ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()]
    assert names == ["input", "state", "memory", "timespan"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--onnx-inputs", "initial_state,hidden"], "unknown input(s) hidden; choose from initial_state, initial_memory, timespans"),
        (["--onnx-inputs", "initial_memory"], "unknown ONNX input(s) ['initial_memory'] for this model"),
        (["--onnx-step", "--onnx-inputs", "initial_state"], "inputs= may only add 'timespans'"),
    ],
)
def test_cli_refuses_bad_onnx_options(args, message, tmp_path):
    result = cli(ROOT / "cfc_default.pt", "-o", tmp_path / "m.onnx", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())
    result = cli(ROOT / "cfc_default.pt", "-o", tmp_path / "m.safetensors", "--onnx-step")
    assert result.returncode == 2 and "--onnx-inputs and --onnx-step apply to ONNX output" in result.stderr
