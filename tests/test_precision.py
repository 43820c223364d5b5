"""Precision: verification judged against the reference run in float64, half-precision
checkpoints in (fixtures/precision, made by tools/make_precision_fixtures.py with torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

import ncps_mlx
from ncps_mlx.converters import readers, verify

torch = pytest.importorskip("torch")
pytest.importorskip("ncps")

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "precision"
WIDE = ROOT / "cfc_wide_input.pt"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ncps_mlx.converters.cli", *map(str, args)], capture_output=True, text=True, timeout=600)


def test_the_wide_input_fixture_is_past_a_fixed_absolute_tolerance():
    """The pattern itself: ncps.torch's own float32 run is off the float64 answer by more than
    1e-5, so a fixed atol against it cannot tell round-off from a wrong conversion."""
    data = np.load(ROOT / "cfc_wide_input.npz")
    assert np.max(np.abs(data["output"] - data["output64"])) > 1e-5
    ours = readers.read(WIDE, config=json.loads(WIDE.with_suffix(".json").read_text())).module().build()
    output, _ = ours(mx.array(data["x"]))
    ours_error = np.max(np.abs(np.array(output, dtype=np.float64) - data["output64"]))
    assert np.max(np.abs(np.array(output) - data["output"])) > 1e-5  # the old check failed here
    assert ours_error <= verify.REFERENCE_ERROR_MULTIPLE * np.max(np.abs(data["output"] - data["output64"]))


def test_a_wide_input_model_passes_verification_by_default(tmp_path):
    out = tmp_path / "wide.safetensors"
    result = cli(WIDE, "--config", WIDE.with_suffix(".json"), "-o", out, "--json")
    assert result.returncode == 0, result.stderr[-1500:]
    report = json.loads(result.stdout)["reports"][0]
    assert report["passed"] and "float64" in report["rule"]
    checks = report["checks"]
    assert all(c["error_vs_float64"] is not None and c["reference_error_vs_float64"] is not None for c in checks)
    assert max(c["max_abs"] for c in checks) > 1e-5  # over the old fixed tolerance, and still a pass
    assert max(c["reference_error_vs_float64"] for c in checks) > 1e-5
    table = cli("verify", WIDE, out, "--config", WIDE.with_suffix(".json"))
    assert table.returncode == 0 and "ref vs f64" in table.stdout


def _edited(path, edit, tmp_path):
    model = ncps_mlx.load(path)
    weights = dict(__import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(model.parameters()))
    edit(weights)
    model.load_weights(list(weights.items()))
    edited = tmp_path / "edited.safetensors"
    ncps_mlx.save(model, edited)
    return edited


def _nudge(weights):
    value = np.array(weights["rnn_cell.ff1.weight"])
    value[0, 0] += 1e-3
    weights["rnn_cell.ff1.weight"] = mx.array(value)


def _swap_heads(weights):
    weights["rnn_cell.ff1.weight"], weights["rnn_cell.ff2.weight"] = weights["rnn_cell.ff2.weight"], weights["rnn_cell.ff1.weight"]


@pytest.mark.parametrize("edit", [_nudge, _swap_heads], ids=["one weight +1e-3", "heads swapped"])
def test_a_wrong_conversion_still_fails(edit, tmp_path):
    good = tmp_path / "wide.safetensors"
    assert cli(WIDE, "--config", WIDE.with_suffix(".json"), "-o", good, "--no-verify").returncode == 0
    result = cli("verify", WIDE, _edited(good, edit, tmp_path), "--config", WIDE.with_suffix(".json"))
    assert result.returncode == 1, result.stdout
    assert "FAILED" in result.stdout


@pytest.mark.parametrize("name, stored", [("cfc_bfloat16", "bfloat16"), ("ltc_float16", "float16")])
def test_half_precision_state_dicts_convert(name, stored, tmp_path):
    path = ROOT / f"{name}.pt"
    data = np.load(ROOT / f"{name}.npz")
    model = readers.read(path).module().build()
    output, _ = model(mx.array(data["x"]))
    assert np.max(np.abs(np.array(output) - data["output"])) <= 1e-5
    result = cli(path, "-o", tmp_path / "out.safetensors")
    assert result.returncode == 0, result.stderr[-1500:]
    inspected = cli("inspect", path)
    assert f"dtype        {stored} (converted to float32 exactly)" in inspected.stdout


# --- half-precision model files ------------------------------------------------------------------

from mlx.utils import tree_flatten  # noqa: E402

from ncps_mlx import CTGRU, CTRNN, CfC, LTC, wirings  # noqa: E402

MAKERS = {
    "CfC": lambda: CfC(6, 16, return_sequences=True),
    "wired CfC": lambda: CfC(6, wirings.AutoNCP(16, 3), return_sequences=True),
    "LTC": lambda: LTC(6, wirings.AutoNCP(16, 3), return_sequences=True),
    "CTRNN": lambda: CTRNN(6, 16),
    "CTGRU": lambda: CTGRU(6, 16),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_half_precision_model_files_load_and_run_within_their_dtype_tolerance(kind, dtype, tmp_path):
    """Saved with ncps_mlx.save(dtype=...), loaded in that dtype, run in it on non-trivial
    weights for 32 steps: within the stated tolerance of the same model run in float64."""
    mx.random.seed(7)
    model = MAKERS[kind]()
    weights = [(k, v * (1.0 + 0.3 * mx.random.normal(v.shape))) for k, v in tree_flatten(model.trainable_parameters())]
    model.load_weights(weights, strict=False)
    path = ncps_mlx.save(model, tmp_path / "half.safetensors", dtype=dtype)
    assert ncps_mlx.converters.modelfile.read_metadata(path)["dtype"] == dtype
    loaded = ncps_mlx.load(path)
    assert all(v.dtype == getattr(mx, dtype) for _, v in tree_flatten(loaded.trainable_parameters()))
    x = mx.random.normal((3, 32, 6))
    output, _ = loaded(x.astype(getattr(mx, dtype)))
    assert output.dtype == getattr(mx, dtype)  # it computes in its dtype, not promoted to float32
    exact_model = MAKERS[kind]()
    exact_model.load_weights(list(tree_flatten(model.parameters())))
    exact_model.set_dtype(mx.float64)
    with mx.stream(mx.cpu):
        exact, _ = exact_model(x.astype(mx.float64))
        exact = np.array(exact)
    error = np.max(np.abs(np.array(output.astype(mx.float32), dtype=np.float64) - exact))
    tolerance = verify.HALF_PRECISION_ULPS * verify.EPSILON[dtype] * max(1.0, np.max(np.abs(exact)))
    assert error <= tolerance, (error, tolerance)
    assert error > 1e-6  # really half precision, not float32 in disguise


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("fixture", ["cfc_default", "cfc_autoncp", "ltc_ncp"])
def test_dtype_model_files_of_converted_checkpoints_are_verified_against_float64(fixture, dtype, tmp_path):
    source = ROOT.parent / "torch" / f"{fixture}.pt"
    config = source.with_suffix(".json")
    out = tmp_path / f"{fixture}.safetensors"
    result = cli(source, "-o", out, "--dtype", dtype, "--json", *(["--config", config] if config.exists() else []))
    assert result.returncode == 0, result.stderr[-1500:]
    report = json.loads(result.stdout)["reports"][0]
    assert dtype in report["rule"] and dtype in report["target"]
    assert all(c["ok"] and c["error_vs_float64"] is not None for c in report["checks"])
    assert max(c["error_vs_float64"] for c in report["checks"]) > 1e-5  # half precision was really run
    loaded = ncps_mlx.load(out)
    assert all(v.dtype == getattr(mx, dtype) for _, v in tree_flatten(loaded.trainable_parameters()))


def test_onnx_output_refuses_a_half_precision_dtype(tmp_path):
    result = cli(ROOT.parent / "torch" / "cfc_default.pt", "-o", tmp_path / "m.onnx", "--dtype", "float16")
    assert result.returncode == 2 and "--dtype applies to model files" in result.stderr


@pytest.mark.parametrize("kind", sorted(MODELS := {"CfC": MAKERS["CfC"], "LTC": MAKERS["LTC"], "CTGRU": MAKERS["CTGRU"]}))
def test_bfloat16_through_the_differentiable_pass(kind, monkeypatch):
    """Where MLX has no C++ compiler every call is traced afresh (as under mx.grad), and a
    bfloat16 model then runs the plain loop with MLX's gradient (runtime.stepping's worker
    thread cannot run a bfloat16 backward pass): forward and gradient there, against the usual
    path."""
    from ncps_mlx.runtime import stepping

    model = MODELS[kind]()
    model.set_dtype(mx.bfloat16)
    x = mx.random.normal((2, 6, 6)).astype(mx.bfloat16)
    loss = nn.value_and_grad(model, lambda m, x: mx.sum(m(x)[0].astype(mx.float32) ** 2))
    expected_y, (expected_loss, expected_grads) = model(x)[0], loss(model, x)
    mx.eval(expected_y, expected_loss, expected_grads)
    monkeypatch.setattr(stepping, "under_transformation", lambda leaves: True)
    y, (value, grads) = model(x)[0], loss(model, x)
    mx.eval(y, value, grads)
    assert y.dtype == mx.bfloat16
    assert np.max(np.abs(np.array(y.astype(mx.float32)) - np.array(expected_y.astype(mx.float32)))) <= 0.05
    for (key, g), (_, e) in zip(tree_flatten(grads), tree_flatten(expected_grads)):
        assert g.dtype == mx.bfloat16 and np.all(np.isfinite(np.array(g.astype(mx.float32)))), key
