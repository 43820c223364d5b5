"""Keras NCP checkpoints as people publish them (fixtures/keras_published, made by
tools/make_keras_published_fixtures.py with the framework and package version that writes each
layout): converted without TensorFlow, to the source's outputs; verified against Keras by the CLI;
and every way such a file can be unsupported refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

import ncps_mlx
from ncps_mlx.converters import readers
from ncps_mlx.converters.description import ConversionError

pytest.importorskip("h5py")

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "keras_published"
FIXTURES = sorted(ROOT.glob("*.npz"))
TOL = 1e-5  # relative above 1


def source_of(npz: Path) -> Path:
    return next(p for p in sorted(ROOT.iterdir()) if p.name.startswith(npz.stem + ".") and p.suffix in (".h5", ".keras"))


def config_of(npz: Path):
    path = npz.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else None


def within(got, want) -> bool:
    return float(np.max(np.abs(got - want))) <= TOL * max(1.0, float(np.max(np.abs(want))))


def has_tensorflow():
    try:
        import tensorflow  # noqa: F401
        import ncps  # noqa: F401
    except ImportError:
        return False
    return True


def _model_config(npz):
    source = source_of(npz)
    if source.suffix == ".keras":
        return json.loads(zipfile.ZipFile(source).read("config.json"))
    import h5py

    with h5py.File(source, "r") as handle:
        text = handle.attrs.get("model_config")
        return json.loads(text) if text is not None else config_of(npz)


def test_each_published_pattern_has_a_fixture():
    by_name = {p.stem: p for p in FIXTURES}
    text = {name: json.dumps(_model_config(npz)) for name, npz in by_name.items()}
    numpy_wirings = [n for n, t in text.items() if '"__numpy__"' in t and '"adjacency_matrix"' in t and "ncps007" in n]
    assert {source_of(by_name[n]).suffix for n in numpy_wirings} == {".keras", ".h5"}
    import h5py

    with h5py.File(source_of(by_name["keras3_three_ltcs_heads"]), "r") as handle:  # Keras 3 writing legacy .h5
        assert handle.attrs["keras_version"].startswith("3.") and "model_config" in handle.attrs
    assert text["keras3_three_ltcs_heads"].count('"ncps>LTC"') == 3
    assert '"Custom>LTCCell"' in text["kerasncp_rnn_ltc_ncp"] or '"kerasncp.tf.ltc_cell"' in text["kerasncp_rnn_ltc_ncp"]
    with h5py.File(source_of(by_name["kerasncp_rnn_wired_cfc_ncp"]), "r") as handle:
        names = [n for layer in handle.attrs["layer_names"] for n in handle[layer].attrs["weight_names"]]
        assert any("wired_cfc_cell/cfc_cell_1/ff1_weight" in n for n in names)
    for layer in ("Rescaling", "Normalization", "GaussianNoise", "Conv2D"):
        assert f'"{layer}"' in text["tf_cnn_trunk_cfc"]
    assert '"LeakyReLU"' in text["keras3_conv1d_leaky_mixed_wired_cfc"] and '"mixed_memory": true' in text["keras3_conv1d_leaky_mixed_wired_cfc"]


@pytest.mark.parametrize("npz", FIXTURES, ids=lambda p: p.stem)
def test_published_file_converts_to_the_same_function(npz, monkeypatch):
    for name in ("tensorflow", "keras", "tf_keras", "kerasncp"):
        monkeypatch.setitem(sys.modules, name, None)
    graph = readers.read(source_of(npz), config=config_of(npz)).module().build()
    data = np.load(npz)
    outs = graph(mx.array(data["x_0"]))
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    expected = sorted(k for k in data.files if k.startswith("out_"))
    assert len(outs) == len(expected)
    for value, key in zip(outs, expected):
        assert within(np.array(value), data[key]), (key, float(np.max(np.abs(np.array(value) - data[key]))))


@pytest.mark.parametrize("name", ["kerasncp_rnn_ltc_ncp", "kerasncp_rnn_wired_cfc_ncp"])
def test_keras_ncp_cells_compute_what_ncps_tf_computes(name):
    """The verification of a keras-ncp file runs ncps.tf: the fixture script loaded the same
    weights into ncps.tf's classes and recorded how far apart the two ran."""
    assert float(np.load(ROOT / f"{name}.npz")["reference_max_abs"]) <= 1e-6


def test_renumbered_layers_are_matched_and_said():
    npz = ROOT / "kerasncp_rnn_ltc_ncp.npz"
    checkpoint = readers.read(source_of(npz), config=config_of(npz))
    assert checkpoint.source["renamed_layers"] == "rnn = rnn_1, dense = dense_1"
    assert checkpoint.source["written_by"] == "keras-ncp 2.x"


@pytest.mark.parametrize("name", ["tf_cnn_trunk_cfc", "keras3_conv1d_leaky_mixed_wired_cfc", "ncps007_ltc_ncp_two_heads_h5"])
def test_model_file_and_onnx_of_published_models(name, tmp_path):
    npz = ROOT / f"{name}.npz"
    graph = readers.read(source_of(npz), config=config_of(npz)).module().build()
    data = np.load(npz)
    ncps_mlx.save(graph, tmp_path / "m.safetensors")
    again = ncps_mlx.load(tmp_path / "m.safetensors")
    outs = again(mx.array(data["x_0"]))
    for value, key in zip(outs if isinstance(outs, (list, tuple)) else [outs], sorted(k for k in data.files if k.startswith("out_"))):
        assert within(np.array(value), data[key])
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = ncps_mlx.export_onnx(graph, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: data["x_0"]})
    for value, key in zip(got, sorted(k for k in data.files if k.startswith("out_")), strict=True):
        assert within(value, data[key])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ncps_mlx.converters.cli", *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("npz", FIXTURES, ids=lambda p: p.stem)
def test_cli_converts_and_verifies_against_keras(npz, tmp_path):
    if not has_tensorflow():
        pytest.skip("verifying against Keras needs TensorFlow and ncps")
    out = tmp_path / "out.safetensors"
    config = [] if config_of(npz) is None else ["--config", npz.with_suffix(".json")]
    result = cli(source_of(npz), "-o", out, *config, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    checks = [c for r in report["reports"] for c in r["checks"]]
    assert checks and all(c["ok"] for c in checks) and report["passed"] and report["verified"]
    assert out.exists()


# --- refusals: one line, exit 2, nothing written ---------------------------------------------


def _edited_config(npz, edit, tmp_path):
    config = json.loads(json.dumps(config_of(npz)))
    edit(config)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def _rnn(config):
    return next(e for e in config["config"]["layers"] if e["class_name"] == "RNN")


def _lstm_cell(config):
    _rnn(config)["config"]["cell"] = {"module": "keras.layers", "class_name": "LSTMCell", "config": {"units": 4}}


def _custom_cell(config):
    _rnn(config)["config"]["cell"]["class_name"] = "Custom>MyCell"
    _rnn(config)["config"]["cell"]["module"] = "my_package.cells"


def _lost_matrices(config):
    cell = _rnn(config)["config"]["cell"]["config"]
    cell["adjacency_matrix"] = {"class_name": "__numpy__", "config": {"value": "rm -rf /"}}


def _cfc_cell_without_units(config):
    _rnn(config)["config"]["cell"] = {"class_name": "Custom>CfcCell", "config": {"name": "cfc_cell"}}


def _activation_layer_unsupported(config):
    conv = next(e for e in config["config"]["layers"] if e["class_name"] == "Conv1D")
    conv["config"]["activation"] = {"module": "keras.layers", "class_name": "PReLU", "config": {"name": "p"}}


def _activation_from_elsewhere(config):
    conv = next(e for e in config["config"]["layers"] if e["class_name"] == "Conv1D")
    conv["config"]["activation"] = {"module": "os", "class_name": "system", "config": {"command": "ls"}}


def _normalization_invert(config):
    next(e for e in config["config"]["layers"] if e["class_name"] == "Normalization")["config"]["invert"] = True


REFUSALS = {
    "LSTMCell in RNN": ("kerasncp_rnn_ltc_ncp", _lstm_cell, "(RNN)'s cell: unsupported class 'LSTMCell'"),
    "custom cell": ("kerasncp_rnn_ltc_ncp", _custom_cell, "unsupported class 'MyCell' from my_package.cells"),
    "garbage matrices": ("kerasncp_rnn_ltc_ncp", _lost_matrices, "adjacency_matrix rm -rf / is not a number"),
    "CfcCell without units": ("kerasncp_rnn_ltc_ncp", _cfc_cell_without_units, "records no units; describe the layer as a CfC"),
    "PReLU activation": ("keras3_conv1d_leaky_mixed_wired_cfc", _activation_layer_unsupported, "activation: unsupported class 'PReLU'"),
    "activation from os": ("keras3_conv1d_leaky_mixed_wired_cfc", _activation_from_elsewhere, "unsupported class 'system' from os"),
    "Normalization invert": ("keras3_conv1d_leaky_mixed_wired_cfc", _normalization_invert, "invert=True (denormalisation) is not supported"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unsupported_things_in_published_files_are_refused_by_name(case, tmp_path):
    name, edit, message = REFUSALS[case]
    npz = ROOT / f"{name}.npz"
    config = _edited_config(npz, edit, tmp_path)
    with pytest.raises(ConversionError) as caught:
        readers.read(source_of(npz), config=json.loads(config.read_text()))
    assert message in str(caught.value)
    out = tmp_path / "out.safetensors"
    result = cli(source_of(npz), "-o", out, "--config", config, "--no-verify")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("[INFO]")]
    assert len(errors) == 1 and errors[0].startswith("ncps-convert: error: ") and message in errors[0], errors
    assert "Traceback" not in result.stderr and not out.exists()


def test_a_wired_cfc_config_given_to_a_file_without_its_cells_is_refused(tmp_path):
    """A wired CfC's config pointed at an LTC's weights: no IndexError, a line naming the cause."""
    npz = ROOT / "kerasncp_rnn_wired_cfc_ncp.npz"
    config = json.loads(npz.with_suffix(".json").read_text())
    with pytest.raises(ConversionError, match="without the weights of its wired cell's layers"):
        readers.read(ROOT / "kerasncp_rnn_ltc_ncp.h5", config=config)


def test_a_mixed_float16_model_converts_to_its_float32_function():
    """Trained under Keras's mixed_float16 policy: float32 variables, float16 compute. The
    conversion computes the same weights in float32 (``out_0``, made by Keras in float32), which
    is closer to the float64 answer than Keras's float16 run (``mixed_out_0``)."""
    npz = ROOT / "keras3_mixed_float16_cfc.npz"
    data = np.load(npz)
    assert np.max(np.abs(data["out_0"] - data["mixed_out_0"])) > 1e-4  # the file really computed in float16
    checkpoint = readers.read(source_of(npz))
    assert checkpoint.source["stored_dtype"] == "float32 (Keras dtype policy mixed_float16)"
    output = np.array(checkpoint.module().build()(mx.array(data["x_0"])))
    assert within(output, data["out_0"])
