"""Whole Keras models around an NCP (fixtures/keras_graphs, made by tools/make_keras_graph_fixtures.py):
several inputs and heads with merges, a TimeDistributed conv encoder, Bidirectional CfC/LTC,
a fixed-length Input, an Embedding encoder-decoder, padded sequences behind Masking and
Embedding(mask_zero=True); Keras 3 .keras and tf.keras .h5."""

from __future__ import annotations

import io
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

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "keras_graphs"
FIXTURES = sorted(ROOT.glob("*.npz"))
TOL = 1e-5


def source_of(npz: Path) -> Path:
    return next(npz.with_suffix(s) for s in (".keras", ".h5") if npz.with_suffix(s).exists())


def inputs_of(data) -> list:
    return [data[f"x_{i}"] for i in range(sum(k.startswith("x_") for k in data.files))]


def outputs_of(data) -> list:
    return [data[f"out_{i}"] for i in range(sum(k.startswith("out_") for k in data.files))]


def has_tensorflow():
    try:
        import tensorflow  # noqa: F401
        import ncps  # noqa: F401
    except ImportError:
        return False
    return True


live = pytest.mark.skipif(not has_tensorflow(), reason="needs TensorFlow and ncps")


def test_fixture_coverage():
    names = {p.stem for p in FIXTURES}
    assert {"two_inputs_two_heads", "tf_two_inputs_two_heads", "timedistributed_conv_cfc", "bidirectional",
            "fixed_length", "tf_fixed_length", "encoder_decoder", "masked_padding", "embedding_mask_zero"} <= names
    for name in ("masked_padding", "embedding_mask_zero"):  # padded: sample 1 ends in a padded step
        assert np.all(np.load(ROOT / f"{name}.npz")["x_0"][1, -1] == 0)


@pytest.mark.parametrize("npz", FIXTURES, ids=lambda p: p.stem)
def test_graph_converts_to_the_same_function(npz, monkeypatch):
    """Read with h5py + json only (TensorFlow made unimportable); Keras's own outputs, saved by
    the fixture script from the live model, within 1e-5 for every output."""
    for name in ("tensorflow", "keras", "tf_keras"):
        monkeypatch.setitem(sys.modules, name, None)
    model = readers.read(source_of(npz)).module().build()
    data = np.load(npz)
    expected = outputs_of(data)
    out = model(*[mx.array(x) for x in inputs_of(data)])
    outs = out if isinstance(out, list) else [out]
    assert isinstance(out, list) == (len(expected) > 1)  # a single output stays a single array
    assert len(outs) == len(expected)
    for value, want in zip(outs, expected):
        assert np.array(value).shape == want.shape
        assert np.max(np.abs(np.array(value) - want)) <= TOL
        assert np.std(want) > 1e-2  # the fixture's outputs move with their inputs


def test_inputs_and_outputs_keep_the_keras_names_and_order():
    graph = readers.read(ROOT / "two_inputs_two_heads.keras").module().build()
    assert [spec["name"] for spec in graph.input_specs] == ["sensors", "context"]
    assert [spec["shape"] for spec in graph.input_specs] == [[None, 4], [6]]
    assert graph.output_names == ["steer", "speed"]
    data = np.load(ROOT / "two_inputs_two_heads.npz")
    with pytest.raises(ValueError, match=r"takes 2 input\(s\) \(sensors, context\), got 1"):
        graph(mx.array(data["x_0"]))
    swapped = graph(mx.array(data["x_0"][:, :6, :]), mx.array(data["x_1"]))  # any length fits the free axis
    assert [o.shape for o in swapped] == [(3, 2), (3, 1)]


def test_a_mask_reaching_a_layer_that_cannot_take_it_is_refused(tmp_path):
    path = _edited_masked(tmp_path)
    with pytest.raises(ConversionError, match=r"\(Flatten\) would receive a Keras mask"):
        readers.read(path).module().build()


def _edited_masked(tmp_path) -> Path:
    """masked_padding.keras with a Flatten between the LayerNormalization and the LTC."""
    source = zipfile.ZipFile(ROOT / "masked_padding.keras")
    config = json.loads(source.read("config.json"))
    layers = config["config"]["layers"]
    norm = next(e for e in layers if e["class_name"] == "LayerNormalization")
    ltc = next(e for e in layers if e["class_name"] == "LTC")
    flatten = {"module": "keras.layers", "class_name": "Flatten", "config": {"name": "flat", "data_format": "channels_last"},
               "name": "flat", "inbound_nodes": [{"args": [{"class_name": "__keras_tensor__", "config": {
                   "shape": [None, None, 12], "dtype": "float32", "keras_history": [norm["name"], 0, 0]}}], "kwargs": {}}]}
    ltc["inbound_nodes"][0]["args"][0]["config"]["keras_history"] = ["flat", 0, 0]
    layers.insert(layers.index(ltc), flatten)
    path = tmp_path / "flat.keras"
    with zipfile.ZipFile(path, "w") as target:
        for item in source.namelist():
            target.writestr(item, json.dumps(config) if item == "config.json" else source.read(item))
    return path


def test_a_wrong_weight_is_seen():
    """The comparison can fail: one changed weight moves the outputs far past the tolerance."""
    description = readers.read(ROOT / "timedistributed_conv_cfc.keras").module()
    data = np.load(ROOT / "timedistributed_conv_cfc.npz")
    name = next(k for k in description.arrays if k.endswith("weight") and "layer." not in k)
    description.arrays[name] = description.arrays[name] * 1.01
    out = description.build()(mx.array(inputs_of(data)[0]))
    assert np.max(np.abs(np.array(out) - outputs_of(data)[0])) > 1e-4


@pytest.mark.parametrize("name", ["two_inputs_two_heads.keras", "bidirectional.keras", "encoder_decoder.keras"])
def test_model_file_round_trip(name, tmp_path):
    model = readers.read(ROOT / name).module().build()
    path = ncps_mlx.save(model, tmp_path / "graph.safetensors")
    loaded = ncps_mlx.load(path)
    data = np.load((ROOT / name).with_suffix(".npz"))
    xs = [mx.array(x) for x in inputs_of(data)]
    a, b = model(*xs), loaded(*xs)
    for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
        assert float(mx.max(mx.abs(x - y))) == 0.0


@pytest.mark.parametrize("npz", FIXTURES, ids=lambda p: p.stem)
def test_onnx_export_matches_keras(npz, tmp_path):
    """onnxruntime, fed by the Keras input names, against the live Keras model's outputs."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    graph = readers.read(source_of(npz)).module().build()
    if "mask" in npz.stem:
        with pytest.raises(ValueError, match="Keras masks .* does not export to ONNX"):
            ncps_mlx.export_onnx(graph, tmp_path / "graph.onnx")
        return
    path = ncps_mlx.export_onnx(graph, tmp_path / "graph.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [spec["name"] for spec in graph.input_specs]
    assert [o.name for o in session.get_outputs()] == graph.output_names
    data = np.load(npz)
    got = session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs_of(data))})
    for value, want in zip(got, outputs_of(data), strict=True):
        assert np.max(np.abs(value - want)) <= TOL


def cli(*args):
    exe = Path(sys.executable).with_name("ncps-convert")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)


@live
@pytest.mark.slow
@pytest.mark.parametrize("npz", FIXTURES, ids=lambda p: p.stem)
def test_cli_converts_with_verification_against_keras(npz, tmp_path):
    """The default convert runs Keras on new inputs of the declared shapes and compares."""
    out = tmp_path / "model.safetensors"
    result = cli(source_of(npz), "-o", out, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["passed"] and report["reports"][0]["source"].startswith(("keras", "tf.keras"))
    checks = report["reports"][0]["checks"]
    assert len(checks) >= 3 and all(c["max_abs"] <= TOL for c in checks)
    if npz.stem.endswith("fixed_length"):
        assert {tuple(c["shape"]) for c in checks} == {(1, 3), (4, 3), (3, 3)}


@live
@pytest.mark.slow
@pytest.mark.parametrize("name", ["two_inputs_two_heads.keras", "tf_two_inputs_two_heads.h5"])
def test_cli_onnx_of_the_two_input_graph_matches_keras(name, tmp_path):
    result = cli(ROOT / name, "-o", tmp_path / "graph.onnx", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    reports = json.loads(result.stdout)["reports"]
    assert [r["target"].startswith("onnxruntime") for r in reports] == [True, True]
    assert reports[0]["source"].startswith(("keras", "tf.keras"))
    assert {c["tensor"] for c in reports[0]["checks"]} == {"steer", "speed"}
    assert all(r["passed"] for r in reports)


def test_inspect_lists_inputs_and_outputs():
    result = cli("inspect", ROOT / "two_inputs_two_heads.keras")
    assert result.returncode == 0, result.stderr
    assert "inputs       sensors (?, ?, 4), context (?, 6)" in result.stdout
    assert "outputs      steer (?, 2), speed (?, 1)" in result.stdout
    fixed = cli("inspect", ROOT / "fixed_length.keras")
    assert "inputs       window (?, 12, 4)" in fixed.stdout


# --- what is refused ------------------------------------------------------------------------


def _edited(tmp_path, edit) -> Path:
    """two_inputs_two_heads.keras with its config.json changed by ``edit(config)``."""
    source = zipfile.ZipFile(ROOT / "two_inputs_two_heads.keras")
    config = json.loads(source.read("config.json"))
    edit(config)
    path = tmp_path / "edited.keras"
    with zipfile.ZipFile(path, "w") as target:
        for item in source.namelist():
            target.writestr(item, json.dumps(config) if item == "config.json" else source.read(item))
    return path


def _layer(config, name):
    return next(e for e in config["config"]["layers"] if e["config"].get("name") == name)


def _lambda(config):
    entry = _layer(config, "drop")
    entry["class_name"] = "Lambda"
    entry["config"]["function"] = {"class_name": "__lambda__", "config": {"code": "4wEAAAAAAAAA", "defaults": None}}


def _custom(config):
    entry = _layer(config, "trunk")
    entry["module"], entry["class_name"] = "os", "system"


def _keyword_tensor(config):
    entry = _layer(config, "cfc")
    node = entry["inbound_nodes"][0]
    node["kwargs"]["initial_state"] = node["args"][0]


@pytest.mark.parametrize(
    "edit, message",
    [
        (_lambda, r"layer 'drop' \(Lambda\): a Lambda layer is Python code; it is never deserialised or run"),
        (_custom, r"layer 'trunk' \(system\): unsupported layer type from os; supported: CfC, LTC"),
        (_keyword_tensor, r"layer 'cfc' is called with tensors as keyword arguments"),
    ],
    ids=["Lambda", "custom class", "keyword tensor"],
)
def test_graphs_with_code_or_unsupported_calls_are_refused(edit, message, tmp_path):
    path = _edited(tmp_path, edit)
    with pytest.raises(ConversionError, match=message):
        readers.read(path)
    result = cli(path, "-o", tmp_path / "out.safetensors")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("ncps-convert: error: ")
    assert "Traceback" not in result.stderr and not (tmp_path / "out.safetensors").exists()
