"""Keras 3 and tf.keras models: bundled fixtures (no TensorFlow needed) and live checks."""

from __future__ import annotations

import json
import os
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

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = sorted(p for folder in ("keras", "tf_keras") for p in (ROOT / folder).glob("*.npz"))
TOL = 1e-5


def source_of(npz: Path) -> Path:
    for suffix in (".keras", ".weights.h5", ".h5", ""):  # "": a SavedModel folder
        candidate = npz.with_name(npz.stem + suffix)
        if candidate.exists():
            return candidate
    raise FileNotFoundError(npz)


def config_of(npz: Path):
    path = npz.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else None


def has_tensorflow():
    try:
        import tensorflow  # noqa: F401
        import ncps  # noqa: F401
    except ImportError:
        return False
    return True


def test_fixture_coverage():
    names = {f"{p.parent.name}/{p.stem}" for p in FIXTURES}
    for flavour in ("keras", "tf_keras"):
        assert any(n.startswith(f"{flavour}/cfc_") and "mixed" in n for n in names)
        assert any(n.startswith(f"{flavour}/cfc_autoncp") for n in names)  # wired CfC
        assert any(n.startswith(f"{flavour}/ltc_") and "ncp" in n for n in names)  # wired LTC
    assert any(source_of(p).suffix == ".keras" for p in FIXTURES)
    assert any(source_of(p).name.endswith(".weights.h5") for p in FIXTURES)  # Keras 3 weights only
    assert any(p.parent.name == "tf_keras" and config_of(p) is None for p in FIXTURES)  # tf.keras full model
    assert any(p.parent.name == "tf_keras" and (config_of(p) or {}).get("class_name") for p in FIXTURES)  # weights only
    assert any(source_of(p).is_dir() for p in FIXTURES)  # SavedModel


@pytest.mark.parametrize("npz", FIXTURES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fixture_converts_to_the_same_function(npz, monkeypatch):
    """Read with h5py + json only: TensorFlow is made unimportable for the conversion (a
    SavedModel alone needs it)."""
    if source_of(npz).is_dir():
        if not has_tensorflow():
            pytest.skip("reading a SavedModel needs TensorFlow")
    else:
        for name in ("tensorflow", "keras", "tf_keras"):
            monkeypatch.setitem(sys.modules, name, None)
    description = readers.read(source_of(npz), config=config_of(npz)).module()
    model = description.build()
    data = np.load(npz)
    out = model(mx.array(data["x"]))
    outs = out if isinstance(out, list) else (out,)
    expected = sorted(k for k in data.files if k.startswith("out_"))
    assert len(outs) == len(expected)
    for value, key in zip(outs, expected):
        assert np.array(value).shape == data[key].shape
        assert np.max(np.abs(np.array(value) - data[key])) <= TOL
    assert np.std(data["out_0"]) > 1e-3


def test_flavour_handling_is_recorded_in_the_converted_config():
    description = readers.read(ROOT / "keras" / "cfc_autoncp_mixed_dense.keras").module()
    model_config = description.config["layers"][0]["model"]
    assert model_config["ff_activation"] is None  # point 0
    assert model_config["memory_circuit"] == "input"  # point 3
    assert model_config["motor_output"] is True  # point 5
    ltc = readers.read(ROOT / "tf_keras" / "ltc_fc_seq.h5").module().config["layers"][0]["model"]
    assert ltc["implicit_param_constraints"] is False  # point 6


def test_model_file_round_trip_of_a_graph(tmp_path):
    description = readers.read(ROOT / "keras" / "cfc_norm_backbone2_timedistributed.keras").module()
    model = description.build()
    path = ncps_mlx.save(model, tmp_path / "graph.safetensors")
    loaded = ncps_mlx.load(path)
    x = mx.array(np.load(ROOT / "keras" / "cfc_norm_backbone2_timedistributed.npz")["x"])
    assert float(mx.max(mx.abs(loaded(x) - model(x)))) == 0.0


def test_ncp_wiring_must_be_given():
    path = ROOT / "keras" / "ltc_ncp_mixed.keras"
    with pytest.raises(ConversionError, match=r'--config: \{"wirings": \{"ltc_ncp"'):
        readers.read(path)


def test_savedmodel_without_tensorflow_says_so(monkeypatch):
    for name in ("tensorflow", "tf_keras"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConversionError, match="reading one needs TensorFlow"):
        readers.read(ROOT / "tf_keras" / "ltc_autoncp_savedmodel")


def test_weights_only_needs_a_config():
    with pytest.raises(ConversionError, match="holds weights only"):
        readers.read(ROOT / "tf_keras" / "cfc_autoncp_weights_only.h5")


def cli(*args):
    exe = Path(sys.executable).with_name("ncps-convert")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)


def _bad_files(tmp_path):
    good = (ROOT / "keras" / "cfc_seq_dense.keras").read_bytes()
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(good[: len(good) // 2])
    h5 = (ROOT / "tf_keras" / "cfc_seq_dense.h5").read_bytes()
    truncated_h5 = tmp_path / "truncated.h5"
    truncated_h5.write_bytes(h5[: len(h5) // 3])
    corrupt_h5 = tmp_path / "corrupt.h5"
    corrupt_h5.write_bytes(h5[:8] + bytes(b ^ 0xFF for b in h5[8:4096]) + h5[4096:])
    import h5py

    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["data"] = np.zeros(3)
    lstm = tmp_path / "lstm.keras"
    with zipfile.ZipFile(ROOT / "keras" / "cfc_seq_dense.keras") as source, zipfile.ZipFile(lstm, "w") as target:
        for item in source.namelist():
            data = source.read(item)
            if item == "config.json":
                data = data.replace(b'"class_name": "Dense"', b'"class_name": "LSTM"')
            target.writestr(item, data)
    return {
        "truncated .keras": (truncated, "truncated or corrupt"),
        "truncated .h5": (truncated_h5, "truncated or corrupt"),
        "corrupt .h5": (corrupt_h5, "corrupt"),
        "foreign .h5": (foreign, "neither a Keras model nor Keras weights"),
        "unsupported layer": (lstm, "(LSTM): unsupported layer type"),
    }


@pytest.mark.parametrize("case", ["truncated .keras", "truncated .h5", "corrupt .h5", "foreign .h5", "unsupported layer"])
def test_bad_keras_files(case, tmp_path):
    path, message = _bad_files(tmp_path)[case]
    out = tmp_path / "out.safetensors"
    result = cli(path, "-o", out, "--no-verify")
    assert result.returncode == 2, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if not line.startswith("[INFO]")]
    assert len(errors) == 1 and errors[0].startswith("ncps-convert: error: ") and message in errors[0], errors
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- live: against Keras itself ---------------------------------------------------------------

live = pytest.mark.skipif(not has_tensorflow(), reason="needs TensorFlow and ncps")


@live
@pytest.mark.parametrize(
    "source,config",
    [
        ("keras/cfc_autoncp_mixed_dense.keras", None),  # reloaded with keras.models.load_model
        ("tf_keras/cfc_no_gate_mixed.h5", None),  # tf.keras cannot reload it: rebuilt, weights loaded
        ("tf_keras/cfc_autoncp_weights_only.h5", "tf_keras/cfc_autoncp_weights_only.json"),
        ("keras/ltc_fc_weights_only.weights.h5", "keras/ltc_fc_weights_only.json"),
        ("tf_keras/cfc_mixed_dense_savedmodel", None),
    ],
)
def test_convert_and_verify_against_keras(source, config, tmp_path):
    args = [ROOT / source, "-o", tmp_path / "m.safetensors", "--json"]
    if config:
        args += ["--config", ROOT / config]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["reports"][0]["source"].startswith(("keras", "tf.keras"))
    assert all(check["max_abs"] <= TOL for check in report["reports"][0]["checks"])


@live
def test_tf_keras_cannot_save_or_reload_a_wired_cfc_but_we_convert_it(tmp_path):
    script = f"""
import os, numpy as np
import tensorflow as tf, ncps.tf as nt, ncps.wirings as nw
model = tf.keras.Sequential([tf.keras.Input((None, 4)), nt.CfC(nw.AutoNCP(10, 3), return_sequences=True)])
try:
    model.save({str(tmp_path / 'full.h5')!r}); print("saved")
except Exception as error:
    print("save failed:", type(error).__name__)
model.save_weights({str(tmp_path / 'weights.h5')!r})
try:
    tf.keras.models.load_model({str(tmp_path / 'weights.h5')!r}); print("loaded")
except Exception as error:
    print("load failed:", type(error).__name__)
np.save({str(tmp_path / 'y.npy')!r}, model(np.ones((1, 5, 4), np.float32)).numpy())
"""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert "save failed" in done.stdout and "load failed" in done.stdout, done.stdout + done.stderr
    config = json.loads((ROOT / "tf_keras" / "cfc_autoncp_weights_only.json").read_text())
    model = readers.read(tmp_path / "weights.h5", config=config).module().build()
    y = np.array(model(mx.ones((1, 5, 4))))
    assert np.max(np.abs(y - np.load(tmp_path / "y.npy"))) <= TOL


def test_keras_reader_needs_no_tensorflow_import():
    code = (
        "import sys; from ncps_mlx.converters import readers; "
        f"readers.read({str(ROOT / 'keras' / 'cfc_seq_dense.keras')!r}).module().build(); "
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "False False", done.stderr


def _reloading_case(npz):
    from ncps_mlx.converters.verify import cases

    description = readers.read(source_of(npz), config=config_of(npz)).module()
    case_list = [("B=3 T=12", 3, 12, False, False)] if "flatten" in npz.stem else cases(description)
    return description, case_list


@pytest.fixture(scope="module")
def keras_reloading_every_fixture():
    """Keras's outputs for every fixture, from one subprocess per flavour (TensorFlow starts
    twice, not once per fixture): {npz: results}."""
    from ncps_mlx.converters.keras import run_sources
    from ncps_mlx.converters.verify import make_inputs

    by_flavour = {}
    for npz in FIXTURES:
        description, case_list = _reloading_case(npz)
        inputs = make_inputs(description.config, case_list, 0)
        by_flavour.setdefault(description.source["framework"], []).append((npz, description, inputs))
    results = {}
    for entries in by_flavour.values():
        for (npz, _, _), answer in zip(entries, run_sources([(d, i) for _, d, i in entries])):
            results[npz] = answer
    return results


@live
@pytest.mark.slow
@pytest.mark.parametrize("npz", FIXTURES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_fixture_against_keras_reloading_it(npz, keras_reloading_every_fixture):
    """Keras itself (load_model, or the reference classes rebuilt when it cannot reload the
    file) runs the file; the converted model must agree on inputs of new lengths."""
    from ncps_mlx.converters.verify import compare, mlx_runner

    description, case_list = _reloading_case(npz)
    keras_results = keras_reloading_every_fixture[npz]
    report = compare(
        description.config, lambda inputs: keras_results, "keras", mlx_runner(description.build()), "mlx", case_list,
        state_size=0, atol=TOL,
    )
    assert report.passed, report.table()
    assert len(report.checks) >= len(case_list)


@live
@pytest.mark.parametrize("source", ["keras/cfc_autoncp_mixed_dense.keras", "tf_keras/ltc_autoncp_savedmodel"])
def test_inspect_keras(source):
    result = cli("inspect", ROOT / source)
    assert result.returncode == 0, result.stderr
    assert "model        Graph: " in result.stdout and "wiring       AutoNCP: neurons per layer" in result.stdout
