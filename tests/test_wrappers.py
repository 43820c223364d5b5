"""ncps layers inside users' torch modules, saved as people save them (fixtures/torch_wrappers,
made by tools/make_wrapper_fixtures.py): every ncps module found and verified, every other
tensor kept, and the whole wrapper reproduced by an MLX port through ``load_weights``."""

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
from ncps_mlx.converters import readers
from ncps_mlx.converters.description import ConversionError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "torch_wrappers"
TOL = 1e-5

torch = pytest.importorskip("torch", reason="reading .pt/.ckpt files needs torch")

# fixture: (ncps modules in checkpoint order, other tensor groups, note about the container)
EXPECTED = {
    "wrapper.pt": (["seq_model"], ["conv", "static_net", "head"], None),
    "wrapper_dataparallel.pt": (["seq_model"], ["conv", "static_net", "head"], "'module.'"),
    "wrapper_compiled.pt": (["seq_model"], ["conv", "static_net", "head"], "'_orig_mod.'"),
    "lightning.ckpt": (["rnn"], ["head"], None),
    "training_two_rnns.pt": (["encoder", "decoder"], ["bridge"], None),
}


class Wrapper(nn.Module):
    """The MLX port of tools/make_wrapper_fixtures.Wrapper: same attribute names."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 5, kernel_size=3, padding=1)
        self.static_net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm(16), nn.ReLU(), nn.Linear(16, 8))
        self.seq_model = ncps_mlx.CfC(13, 16, backbone_units=24, backbone_layers=2, return_sequences=True)
        self.head = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))

    def __call__(self, x, s):
        features = self.conv(x)  # MLX convolutions are channels-last: (B, T, C) as it comes
        static = self.static_net(s)[:, None, :]
        static = mx.broadcast_to(static, (x.shape[0], x.shape[1], static.shape[-1]))
        out, _ = self.seq_model(mx.concatenate([features, static], axis=-1))
        return self.head(out)


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = ncps_mlx.LTC(4, 8, return_sequences=True)
        self.head = nn.Linear(8, 1)

    def __call__(self, x):
        return self.head(self.rnn(x)[0])


class Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = ncps_mlx.LTC(4, ncps_mlx.wirings.AutoNCP(12, 5, seed=1), return_sequences=True)
        self.bridge = nn.Linear(5, 6)
        self.decoder = ncps_mlx.CfC(6, ncps_mlx.wirings.AutoNCP(10, 2, seed=2), mixed_memory=True, return_sequences=True)

    def __call__(self, x):
        encoded, _ = self.encoder(x)
        return self.decoder(mx.tanh(self.bridge(encoded)))[0]


PORTS = {
    "wrapper.pt": Wrapper,
    "wrapper_dataparallel.pt": Wrapper,
    "wrapper_compiled.pt": Wrapper,
    "lightning.ckpt": Regressor,
    "training_two_rnns.pt": Seq2Seq,
}


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "ncps_mlx.converters.cli", *map(str, args)], capture_output=True, text=True
    )


def run_port(model, name):
    data = np.load(FIXTURES / f"{Path(name).stem}.npz")
    inputs = [mx.array(data["x"])] + ([mx.array(data["s"])] if "s" in data else [])
    out = np.array(model(*inputs))
    assert np.std(data["output"]) > 1e-2
    return float(np.max(np.abs(out - data["output"])))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reader_finds_every_module_and_keeps_the_rest(name):
    modules, groups, note = EXPECTED[name]
    checkpoint = readers.read(FIXTURES / name)
    assert list(checkpoint.modules) == modules
    assert list(checkpoint.other_groups()) == groups
    if note:
        assert any(note in n for n in checkpoint.notes)
    source = torch.load(FIXTURES / name, weights_only=True)
    source = source.get("state_dict", source.get("model_state_dict", source))
    assert len(checkpoint.other) + sum(len(d.source_arrays) for d in checkpoint.modules.values()) == len(source)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_converts_with_verification_and_keeps_every_tensor(name, tmp_path):
    out = tmp_path / "model.safetensors"
    result = cli(FIXTURES / name, "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    modules, groups, _ = EXPECTED[name]
    assert report["passed"] and report["written"] and len(report["reports"]) == len(modules)
    for module, checked in zip(modules, report["reports"]):
        assert f"module {module}" in checked["source"] and f"module {module}" in checked["target"]
        assert checked["checks"] and all(c["max_abs"] <= TOL for c in checked["checks"])
    models, other = ncps_mlx.load_modules(out)
    assert list(models) == modules
    assert sorted({k.split(".")[0] for k in other}) == sorted(groups)
    # The kept tensors are the checkpoint's, unchanged.
    checkpoint = readers.read(FIXTURES / name)
    for key, value in checkpoint.other.items():
        assert np.array_equal(np.array(other[key]), value), key


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_load_weights_reproduces_the_torch_wrapper(name, tmp_path):
    """The MLX port loads the torch checkpoint itself, and the converted file, to <= 1e-5."""
    from_checkpoint = ncps_mlx.load_weights(PORTS[name](), FIXTURES / name)
    from_checkpoint.eval()
    assert run_port(from_checkpoint, name) <= TOL
    out = tmp_path / "model.safetensors"
    assert cli(FIXTURES / name, "-o", out, "--no-verify", "--quiet").returncode == 0
    from_file = ncps_mlx.load_weights(PORTS[name](), out)
    from_file.eval()
    assert run_port(from_file, name) <= TOL


def test_load_weights_strict_names_what_is_missing_and_unexpected():
    class Renamed(Wrapper):
        def __init__(self):
            super().__init__()
            self.decoder = self.head  # head's tensors have no home under this name
            del self.head
            self.extra = nn.Linear(2, 2)

    with pytest.raises(ValueError) as error:
        ncps_mlx.load_weights(Renamed(), FIXTURES / "wrapper.pt")
    message = str(error.value)
    assert "missing in the file: decoder.layers.0.bias" in message and "extra.weight" in message
    assert "in the file but not in the module: head.0.bias" in message
    # Not strict: what matches is loaded, the rest left as it was.
    partial = ncps_mlx.load_weights(Renamed(), FIXTURES / "wrapper.pt", strict=False)
    reference = ncps_mlx.load_weights(Wrapper(), FIXTURES / "wrapper.pt")
    assert np.array_equal(np.array(partial.seq_model.rnn_cell.ff1.weight), np.array(reference.seq_model.rnn_cell.ff1.weight))

    class WrongShape(Wrapper):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Linear(16, 9), nn.Tanh(), nn.Linear(9, 2))

    with pytest.raises(ValueError, match=r"shapes differ: head.0.weight \(8, 16\) -> head.layers.0.weight \(9, 16\)"):
        ncps_mlx.load_weights(WrongShape(), FIXTURES / "wrapper.pt")


def test_load_picks_a_module_by_name(tmp_path):
    out = tmp_path / "seq2seq.safetensors"
    assert cli(FIXTURES / "training_two_rnns.pt", "-o", out, "--no-verify", "--quiet").returncode == 0
    with pytest.raises(ncps_mlx.ModelFileError, match=r"holds 2 ncps modules \('encoder', 'decoder'\); choose one"):
        ncps_mlx.load(out)
    with pytest.raises(ncps_mlx.ModelFileError, match=r"has no ncps module 'seq_model'; it holds 'encoder', 'decoder'"):
        ncps_mlx.load(out, module="seq_model")
    decoder = ncps_mlx.load(out, module="decoder")
    assert type(decoder).__name__ == "CfC" and decoder.state_size == 10
    assert type(ncps_mlx.load(out, module="encoder")).__name__ == "LTC"


def test_config_per_module():
    path = FIXTURES / "training_two_rnns.pt"
    checkpoint = readers.read(path, config={"decoder": {"return_sequences": False}, "encoder": {"ode_unfolds": 6}})
    assert checkpoint.module("decoder").config["return_sequences"] is False
    assert checkpoint.module("decoder").given == {"return_sequences": False}
    with pytest.raises(ConversionError, match=r"holds 2 ncps modules \('encoder', 'decoder'\); give --config as"):
        readers.read(path, config={"return_sequences": False})
    with pytest.raises(ConversionError, match="module 'decoder': the config says units=3"):
        readers.read(path, config={"decoder": {"units": 3}})
    # A bare layer still takes a flat config.
    bare = readers.read(Path(__file__).resolve().parents[1] / "fixtures" / "torch" / "cfc_no_gate.pt", config={"mode": "no_gate"})
    assert list(bare.modules) == [""] and bare.module().config["mode"] == "no_gate"


def test_onnx_export_of_one_module_of_several(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "decoder.onnx"
    refused = cli(FIXTURES / "training_two_rnns.pt", "-o", out)
    assert refused.returncode == 2 and "choose one with module=NAME (--module NAME)" in refused.stderr
    assert not out.exists()
    result = cli(FIXTURES / "training_two_rnns.pt", "-o", out, "--module", "decoder", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["passed"]


def test_inspect_lists_modules_and_other_groups():
    result = cli("inspect", FIXTURES / "wrapper_dataparallel.pt")
    assert result.returncode == 0, result.stderr
    assert "stripped the 'module.' prefix" in result.stdout
    assert "module       'seq_model'" in result.stdout and "model        CfC: input 13, state 16, output 16" in result.stdout
    assert "other        static_net.*: 9 tensors" in result.stdout
    info = json.loads(cli("inspect", FIXTURES / "lightning.ckpt", "--json").stdout)
    assert info["format"].startswith("Lightning checkpoint (hyper_parameters: units=8, lr=0.01")
    (module,) = info["modules"]
    assert module["name"] == "rnn" and module["model_class"] == "LTC" and module["parameters"] > 0
    assert info["other_tensors"] == {"head": {"tensors": 2, "values": 9}}
