"""Converting ncps.torch checkpoints: bundled fixtures, a live matrix, the model file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

import ncps_mlx
from ncps_mlx.converters import readers
from ncps_mlx.converters.description import ConversionError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "torch"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.npz"))
TOL = 1e-5


def has_torch():
    try:
        import torch  # noqa: F401
        import ncps.torch  # noqa: F401
    except ImportError:
        return False
    return True


def fixture_config(name):
    config = json.loads((FIXTURES / f"{name}.json").read_text())
    return config


def check_against_npz(model, name):
    data = np.load(FIXTURES / f"{name}.npz")
    for suffix, ts in (("", None), ("1", "timespans1")):
        out, state = model(mx.array(data[f"x{suffix}"]), None, None if ts is None else mx.array(data[ts]))
        states = state if isinstance(state, tuple) else (state,)
        assert np.max(np.abs(np.array(out) - data[f"output{suffix}"])) <= TOL
        assert np.max(np.abs(np.array(states[0]) - data[f"state{suffix}"])) <= TOL
        if f"state{suffix}_c" in data:
            assert np.max(np.abs(np.array(states[1]) - data[f"state{suffix}_c"])) <= TOL
    assert np.std(data["output"]) > 1e-3


def test_fixtures_present():
    assert len(NAMES) >= 15
    for name in NAMES:
        for suffix in (".pt", ".safetensors", ".json"):
            assert (FIXTURES / f"{name}{suffix}").exists(), f"{name}{suffix}"


@pytest.mark.parametrize("name", NAMES)
def test_fixture_safetensors_without_torch(name, monkeypatch):
    """The safetensors copy of each fixture converts with no torch import at all."""
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    description = readers.read(FIXTURES / f"{name}.safetensors", config=fixture_config(name)).module()
    check_against_npz(description.build(), name)


@pytest.mark.skipif(not has_torch(), reason="reading .pt files needs torch")
@pytest.mark.parametrize("name", NAMES)
def test_fixture_pt(name):
    description = readers.read(FIXTURES / f"{name}.pt", config=fixture_config(name)).module()
    assert description.source["framework"] == "torch"
    check_against_npz(description.build(), name)


@pytest.mark.skipif(not has_torch(), reason="reading .pt files needs torch")
def test_pickled_module_needs_opt_in_and_then_needs_no_config():
    with pytest.raises(ConversionError, match="--trust-pickle"):
        readers.read(FIXTURES / "cfc_module.pt")
    description = readers.read(FIXTURES / "cfc_module.pt", trust_pickle=True).module()
    assert description.config["activation"] == "silu"  # read off the module, not defaulted
    assert "activation" not in description.defaulted
    check_against_npz(description.build(), "cfc_backbone2_silu")


def test_config_that_contradicts_the_weights():
    path = FIXTURES / "cfc_default.safetensors"
    with pytest.raises(ConversionError, match="says units=32 but the weights are for units=8"):
        readers.read(path, config={"class": "CfC", "units": 32})
    with pytest.raises(ConversionError, match="describes a LTC but the checkpoint holds a CfC"):
        readers.read(path, config={"class": "LTC"})
    with pytest.raises(ConversionError, match="mode='pure'"):
        readers.read(path, config={"mode": "pure"})
    with pytest.raises(ConversionError, match=r"unknown CfC option\(s\) \['unitz'\]"):
        readers.read(path, config={"unitz": 8})
    with pytest.raises(ConversionError, match="does not have the synapses"):
        readers.read(
            FIXTURES / "cfc_autoncp.safetensors",
            config={"class": "CfC", "units": {"class": "AutoNCP", "units": 10, "output_size": 2, "seed": 6}},
        )


def test_wiring_inferred_without_config_equals_configured_one():
    plain = readers.read(FIXTURES / "cfc_autoncp.safetensors").module().build()
    configured = readers.read(FIXTURES / "cfc_autoncp.safetensors", config=fixture_config("cfc_autoncp")).module().build()
    assert type(configured.wiring).__name__ == "AutoNCP" and type(plain.wiring).__name__ == "Wiring"
    x = mx.random.normal((2, 5, 4))
    assert float(mx.max(mx.abs(plain(x)[0] - configured(x)[0]))) == 0.0
    assert plain.wiring.num_layers == configured.wiring.num_layers == 3


def test_ltc_output_mapping_none_needs_the_wiring_when_sparse(tmp_path):
    arrays = mx.load(str(FIXTURES / "ltc_ncp.safetensors"))
    del arrays["rnn_cell.output_w"], arrays["rnn_cell.output_b"]
    path = tmp_path / "ltc.safetensors"
    mx.save_safetensors(str(path), arrays)
    with pytest.raises(ConversionError, match="motor \\(output\\) neurons is not in this checkpoint"):
        readers.read(path)
    config = {**fixture_config("ltc_ncp"), "output_mapping": None}
    assert readers.read(path, config=config).module().build().output_size == 2


# --- a generated matrix against live ncps.torch ----------------------------------------------

MATRIX = []
for mode in ("default", "pure", "no_gate"):
    for wiring in ("fc", "autoncp", "ncp"):
        for mixed in (False, True):
            for proj in (None, 3):
                MATRIX.append(("CfC", wiring, {"mode": mode, "mixed_memory": mixed, "proj_size": proj}))
for wiring in ("fc", "ncp"):
    for mapping in ("affine", "linear", None):
        for implicit in (True, False):
            MATRIX.append(
                ("LTC", wiring, {"input_mapping": mapping, "output_mapping": mapping, "implicit_param_constraints": implicit})
            )
MATRIX += [
    ("CfC", "fc", {"return_sequences": False}),
    ("CfC", "autoncp", {"batch_first": False}),
    ("LTC", "ncp", {"return_sequences": False, "batch_first": False}),
]


def live_units(wiring, family):
    import ncps.wirings as reference

    if wiring == "fc":
        return 9, 9
    if wiring == "autoncp":
        return reference.AutoNCP(12, 3, seed=4), {"class": "AutoNCP", "units": 12, "output_size": 3, "seed": 4}
    args = (4, 4, 2, 2, 2, 3, 2)
    names = ["inter_neurons", "command_neurons", "motor_neurons", "sensory_fanout", "inter_fanout"]
    names += ["recurrent_command_synapses", "motor_fanin"]
    return reference.NCP(*args, seed=8), {"class": "NCP", **dict(zip(names, args)), "seed": 8}


@pytest.mark.skipif(not has_torch(), reason="the live matrix needs torch and ncps")
@pytest.mark.parametrize("case", range(len(MATRIX)), ids=lambda i: f"{MATRIX[i][0]}-{MATRIX[i][1]}-{i}")
def test_live_matrix(case, tmp_path):
    import torch
    import ncps.torch as ncps_torch

    from helpers import perturb_

    family, wiring, kwargs = MATRIX[case]
    kwargs = {k: v for k, v in kwargs.items() if not (k == "proj_size" and v is None)}
    torch.manual_seed(case)
    units, units_config = live_units(wiring, family)
    model = getattr(ncps_torch, family)(5, units, **kwargs)
    perturb_(model, case)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    config = {"class": family, "units": units_config, **kwargs}
    converted = readers.read(path, config=config).module().build()

    rng = np.random.default_rng(case)
    batch_first = kwargs.get("batch_first", True)
    for batch, ts in ((3, False), (1, True)):
        x = rng.normal(size=(batch, 20, 5)).astype(np.float32)
        t = rng.uniform(0.3, 2.0, size=(batch, 20)).astype(np.float32) if ts else None
        if not batch_first:
            x = np.ascontiguousarray(x.swapaxes(0, 1))
            t = None if t is None else np.ascontiguousarray(t.T)
        with torch.no_grad():
            t_out, t_state = model(torch.from_numpy(x), None, None if t is None else torch.from_numpy(t))
        m_out, m_state = converted(mx.array(x), None, None if t is None else mx.array(t))
        assert np.max(np.abs(np.array(m_out) - t_out.numpy())) <= TOL
        t_states = t_state if isinstance(t_state, tuple) else (t_state,)
        m_states = m_state if isinstance(m_state, tuple) else (m_state,)
        for a, b in zip(m_states, t_states):
            assert np.max(np.abs(np.array(a) - b.numpy())) <= TOL


# --- the model file --------------------------------------------------------------------------

KINDS = {
    "cfc": lambda: ncps_mlx.CfC(4, ncps_mlx.wirings.AutoNCP(10, 2), mixed_memory=True, proj_size=3),
    "cfc_keras_flavour": lambda: ncps_mlx.CfC(
        4, ncps_mlx.wirings.FullyConnected(8, 3), ff_activation=None, motor_output=True, mixed_memory=True,
        memory_circuit="input",
    ),
    "ltc": lambda: ncps_mlx.LTC(4, ncps_mlx.wirings.NCP(4, 3, 2, 2, 2, 2, 2), implicit_param_constraints=False),
    "ctrnn": lambda: ncps_mlx.CTRNN(4, 6, learn_tau=True, cell_clip=2.0, proj_size=2),
    "ctgru": lambda: ncps_mlx.CTGRU(4, 3, M=4, decay="mozer", batch_first=False),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_save_load_round_trip_is_exact(kind, tmp_path):
    model = KINDS[kind]()
    path = ncps_mlx.save(model, tmp_path / "m.safetensors", source={"framework": "test"})
    loaded = ncps_mlx.load(path)
    assert type(loaded) is type(model)
    original = dict(tree_flatten(model.parameters()))
    again = dict(tree_flatten(loaded.parameters()))
    assert original.keys() == again.keys()
    for key in original:
        assert np.array_equal(np.array(original[key]), np.array(again[key])), key
    x = mx.random.normal((3, 6, 4))
    timespans = mx.random.uniform(0.5, 1.5, (3, 6))
    if not model.batch_first:
        x, timespans = x.swapaxes(0, 1), timespans.T
    model.eval()
    out_a, _ = model(x, timespans=timespans)
    out_b, _ = loaded(x, timespans=timespans)
    assert float(mx.max(mx.abs(out_a - out_b))) == 0.0
    if getattr(model, "wiring", None) is not None:
        assert np.array_equal(model.wiring.adjacency_matrix, loaded.wiring.adjacency_matrix)
        assert np.array_equal(model.wiring.sensory_adjacency_matrix, loaded.wiring.sensory_adjacency_matrix)
    # Plain load_weights works on the file too.
    fresh = KINDS[kind]()
    fresh.load_weights(str(path))
    fresh.eval()
    assert float(mx.max(mx.abs(fresh(x, timespans=timespans)[0] - out_b))) == 0.0


def test_model_file_metadata(tmp_path):
    path = ncps_mlx.save(ncps_mlx.CfC(4, 8), tmp_path / "m.safetensors", source={"framework": "torch", "sha256": "ab"})
    meta = ncps_mlx.converters.modelfile.read_metadata(path)
    assert meta["format"] == "ncps_mlx" and meta["format_version"] == "2"
    assert meta["ncps_mlx_version"] == ncps_mlx.__version__
    assert meta["source"] == {"framework": "torch", "sha256": "ab"}
    assert meta["modules"][""]["class"] == "CfC" and meta["modules"][""]["units"] == 8
    assert meta["other_tensors"] == []


def test_model_file_errors(tmp_path):
    with pytest.raises(ncps_mlx.ModelFileError, match="no such file"):
        ncps_mlx.load(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    mx.save_safetensors(str(plain), {"a": mx.zeros((2,))})
    with pytest.raises(ncps_mlx.ModelFileError, match="not an ncps-mlx model file"):
        ncps_mlx.load(plain)
    good = ncps_mlx.save(ncps_mlx.CfC(4, 8), tmp_path / "good.safetensors")
    arrays, metadata = mx.load(str(good), return_metadata=True)
    arrays.pop("rnn_cell.ff1.bias")
    arrays["extra"] = mx.zeros((1,))
    bad = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(bad), arrays, metadata)
    with pytest.raises(ncps_mlx.ModelFileError, match=r"missing tensors \[rnn_cell.ff1.bias\].*unexpected tensors \[extra\]"):
        ncps_mlx.load(bad)
    wrong = dict(metadata, modules=json.dumps({"": {**json.loads(metadata["modules"])[""], "units": 9}}))
    mx.save_safetensors(str(bad), dict(mx.load(str(good))), wrong)
    with pytest.raises(ncps_mlx.ModelFileError, match="wrong shapes"):
        ncps_mlx.load(bad)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ncps_mlx.ModelFileError, match="truncated or corrupt"):
        ncps_mlx.load(truncated)
