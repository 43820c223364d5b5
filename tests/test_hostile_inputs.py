"""Every bad input fails safe: a corpus of broken and malicious inputs, built at test time from
the fixtures, across every reader, the model file, ONNX for verify, config JSON, CLI arguments
and the Python API.

Each CLI case must exit 2 with one line on stderr that names the cause (no traceback), leave
nothing in the output folder, and, for payloads (pickle ``__reduce__``, Lambda bytecode,
``module``/``class_name`` naming ``os``/``builtins``), leave the marker file its code would
write absent. Each API case must raise ValueError or TypeError naming the argument.
The CLI runs in this process (``ncps_mlx.converters.cli.main``), as it does from a shell.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

import ncps_mlx
from ncps_mlx.converters import cli

pytest.importorskip("h5py")
import h5py  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
TORCH = ROOT / "torch"
KERAS = ROOT / "keras"
TF_KERAS = ROOT / "tf_keras"
GRAPHS = ROOT / "keras_graphs"


# --- building the corpus -------------------------------------------------------------------------


class Payload:
    """An object whose unpickling would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def edited_zip(source: Path, target: Path, edit=None, drop=(), add=None) -> Path:
    """A copy of a zip archive with members changed by ``edit(name, bytes) -> bytes``."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for item in original.namelist():
            if item in drop:
                continue
            data = original.read(item)
            copy.writestr(item, edit(item, data) if edit else data)
        for name, data in (add or {}).items():
            copy.writestr(name, data)
    return target


def keras_config_edit(source: Path, target: Path, change) -> Path:
    def edit(name, data):
        if name != "config.json":
            return data
        config = json.loads(data)
        change(config)
        return json.dumps(config).encode()

    return edited_zip(source, target, edit)


def keras_layers(config):
    return config["config"]["layers"]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def torch_state(name="cfc_default"):
    torch = pytest.importorskip("torch")
    return torch, torch.load(TORCH / f"{name}.pt", weights_only=True)


def write_torch(tmp, name, obj):
    torch = pytest.importorskip("torch")
    path = tmp / name
    torch.save(obj, path)
    return path


def with_nonfinite(tmp, value, count):
    torch, state = torch_state()
    key = "rnn_cell.backbone.0.weight"
    flat = state[key].flatten().clone()
    flat[:count] = value
    state[key] = flat.reshape(state[key].shape)
    return write_torch(tmp, "nonfinite.pt", state)


def huge_safetensors(tmp):
    """A header declaring a (40000, 1000000) float32 tensor (149 GiB) over 16 bytes of data."""
    header = {"rnn_cell.backbone.0.weight": {"dtype": "F32", "shape": [40000, 1000000], "data_offsets": [0, 16]}}
    path = tmp / "huge.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * 16))
    return path


def huge_h5(tmp):
    """A Keras 3 .keras whose first kernel is replaced by a dataset declaring 149 GiB, unwritten."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(KERAS / "cfc_seq_dense.keras") as archive:
        weights = archive.read("model.weights.h5")
        config = archive.read("config.json")
        metadata = archive.read("metadata.json") if "metadata.json" in archive.namelist() else b"{}"
    buffer.write(weights)
    with h5py.File(buffer, "r+") as handle:
        names = []
        handle.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        del handle[names[0]]
        handle.create_dataset(names[0], shape=(40000, 1000000), dtype="float32", chunks=(1, 1000))
    path = tmp / "huge.keras"
    with zipfile.ZipFile(path, "w") as target:
        target.writestr("config.json", config)
        target.writestr("metadata.json", metadata)
        target.writestr("model.weights.h5", buffer.getvalue())
    return path


def lying_model_file(tmp, change):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    model = ncps_mlx.CfC(4, 8, backbone_units=8)
    path = ncps_mlx.save(model, tmp / "good.safetensors")
    with safe_open(str(path), "np") as handle:
        metadata = dict(handle.metadata())
        arrays = {k: handle.get_tensor(k) for k in handle.keys()}
    change(metadata, arrays)
    target = tmp / "lying.safetensors"
    save_file(arrays, str(target), metadata=metadata)
    return target


def set_modules(metadata, modules):
    metadata["modules"] = json.dumps(modules)


def first_module(metadata):
    return next(iter(json.loads(metadata["modules"]).values()))


# Each case: (how to build the argv (from tmp, out folder) -> list, expected words of the error).
# The output goes to out/; "MARKER" in a case means tmp / "MARKER" must stay absent.
CASES = {}


def case(name, message, payload=False):
    def register(build):
        CASES[name] = (build, message, payload)
        return build

    return register


def convert(path_of, *extra, out="out.safetensors"):
    def build(tmp, out_dir):
        return [str(path_of(tmp)), "-o", str(out_dir / out), "--no-verify", *extra]

    return build


def file_with(name, data):
    def make(tmp):
        path = tmp / name
        path.write_bytes(data(tmp) if callable(data) else data)
        return path

    return make


def config_file(text):
    def make(tmp):
        path = tmp / "config.json"
        path.write_text(text)
        return str(path)

    return make


def with_config(source, text):
    def build(tmp, out_dir):
        return [str(source), "-o", str(out_dir / "out.safetensors"), "--no-verify", "--config", config_file(text)(tmp)]

    return build


def part(path, fraction):
    data = Path(path).read_bytes()
    return data[: int(len(data) * fraction)]


def flipped(path, start=64, count=512):
    data = bytearray(Path(path).read_bytes())
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xA5
    return bytes(data)


# torch checkpoints
case("torch: empty file", "empty")(convert(file_with("empty.pt", b"")))
case("torch: truncated zip", "truncated or corrupt torch checkpoint")(convert(file_with("t.pt", lambda t: part(TORCH / "cfc_default.pt", 0.5))))
case("torch: truncated to 100 bytes", "truncated or corrupt")(convert(file_with("t.pt", lambda t: (TORCH / "cfc_default.pt").read_bytes()[:100])))
case("torch: bytes flipped", "corrupt")(convert(file_with("f.pt", lambda t: flipped(TORCH / "cfc_default.pt", 200, 4000))))
case("torch: random bytes", "not a checkpoint this tool reads")(convert(file_with("r.pt", bytes(range(256)) * 8)))
case("torch: plain pickle payload", "refused", payload=True)(
    convert(file_with("p.pt", lambda t: pickle.dumps({"rnn_cell.ff1.weight": Payload(t / "MARKER")})))
)
case("torch: torch.save payload", "refused", payload=True)(
    convert(lambda t: write_torch(t, "payload.pt", {"state_dict": Payload(t / "MARKER")}))
)
case("torch: NaN weights", "rnn_cell.backbone.0.weight (3 values)")(convert(lambda t: with_nonfinite(t, float("nan"), 3)))
case("torch: Inf weights", "NaN or Inf")(convert(lambda t: with_nonfinite(t, float("inf"), 1)))
case("torch: no ncps module", "not an ncps CfC or LTC checkpoint")(
    convert(lambda t: write_torch(t, "linear.pt", {"weight": torch_state()[0].zeros(3, 3)}))
)
case("torch: a list, not a dict", "not a state dict")(convert(lambda t: write_torch(t, "list.pt", [1, 2, 3])))
case("torch: empty dict", "not a state dict")(convert(lambda t: write_torch(t, "empty_dict.pt", {})))
case("torch: lightning without state_dict", "not a state dict")(
    convert(lambda t: write_torch(t, "l.ckpt", {"pytorch-lightning_version": "2.0", "epoch": 3}))
)
case("torch: shapes that do not fit", "rnn_cell.backbone.0.weight has shape (3, 2): it reads [input; state]")(
    convert(lambda t: write_torch(t, "bad_shape.pt", {**torch_state()[1], "rnn_cell.backbone.0.weight": torch_state()[0].zeros(3, 2)}))
)
case("torch: a tensor missing", "rnn_cell")(
    convert(lambda t: write_torch(t, "missing.pt", {k: v for k, v in torch_state()[1].items() if "ff2" not in k}))
)
case("torch: integer weights", "tensor rnn_cell.ff1.weight is torch.int64; an ncps module's weights are floating point")(
    convert(lambda t: write_torch(t, "ints.pt", {k: (v * 100).long() if k.endswith("ff1.weight") else v for k, v in torch_state()[1].items()}))
)

# safetensors
case("safetensors: header length beyond the file", "not a checkpoint this tool reads")(
    convert(file_with("h.safetensors", struct.pack("<Q", 10**12) + b"{}"))
)
case("safetensors: header not JSON", "header is not JSON")(convert(file_with("j.safetensors", struct.pack("<Q", 8) + b"{notjson")))
case("safetensors: 149 GiB declared", "declares")(convert(huge_safetensors))
case("safetensors: offsets past the end", "truncated safetensors file")(
    convert(file_with("o.safetensors", safetensors_bytes({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 16)))
)
case("safetensors: unsupported dtype", "unsupported dtype")(
    convert(file_with("d.safetensors", safetensors_bytes({"rnn_cell.ff1.weight": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16)))
)
case("safetensors: header a list", "not a checkpoint this tool reads")(convert(file_with("l.safetensors", safetensors_bytes([], b""))))
case("safetensors: truncated", "truncated")(convert(file_with("t.safetensors", lambda t: part(TORCH / "cfc_default.safetensors", 0.6))))
case("safetensors: shape and size disagree", "declares shape [3, 3] (36 bytes) but holds 16 bytes")(
    convert(file_with("s.safetensors", safetensors_bytes({"rnn_cell.ff1.weight": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}}, b"\0" * 16)))
)
case("safetensors: offsets not two integers", "data_offsets")(
    convert(file_with("x.safetensors", safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": "zero"}}, b"\0" * 4)))
)

def zip_bomb(tmp):
    """A .keras whose weights member inflates 200 MiB of zeros from ~200 KB."""
    path = tmp / "bomb.keras"
    with zipfile.ZipFile(KERAS / "cfc_seq_dense.keras") as original, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        bomb.writestr("config.json", original.read("config.json"))
        bomb.writestr("model.weights.h5", b"\0" * (200 * 2**20))
    return path


case("keras: zip bomb", "refused as a zip bomb")(convert(zip_bomb))

# config JSON
case("config: not JSON", "config.json is not JSON")(with_config(TORCH / "cfc_default.pt", "{units: 8"))
case("config: nested too deep", "too deep")(with_config(TORCH / "cfc_default.pt", nested(100000)))
case("config: a list", "must hold a JSON object, got list")(with_config(TORCH / "cfc_default.pt", "[1, 2]"))
case("config: file missing", "no such file")(convert(lambda t: TORCH / "cfc_default.pt", "--config", "/nonexistent/config.json"))
case("config: contradicts the weights", "units")(with_config(TORCH / "cfc_default.pt", '{"units": 99}'))
case("config: unknown argument", "unknown")(with_config(TORCH / "cfc_default.pt", '{"unitz": 8}'))
case("config: negative ode_unfolds", "ode_unfolds")(with_config(TORCH / "ltc_fc.pt", '{"ode_unfolds": -2}'))
case("config: mode not a mode", "mode")(with_config(TORCH / "cfc_default.pt", '{"mode": "turbo"}'))

# Keras 3 .keras and tf.keras .h5
case("keras: truncated", "truncated or corrupt")(convert(file_with("t.keras", lambda t: part(KERAS / "cfc_seq_dense.keras", 0.5))))
case("keras: zip without config.json", "a zip archive without config.json")(
    convert(lambda t: edited_zip(KERAS / "cfc_seq_dense.keras", t / "noconfig.keras", drop=("config.json",)))
)
case("keras: zip without weights", "without model.weights.h5")(
    convert(lambda t: edited_zip(KERAS / "cfc_seq_dense.keras", t / "noweights.keras", drop=("model.weights.h5",)))
)
case("keras: config.json not JSON", "config.json is not JSON")(
    convert(lambda t: edited_zip(KERAS / "cfc_seq_dense.keras", t / "j.keras", lambda n, d: b"{oops" if n == "config.json" else d))
)
case("keras: config nested too deep", "too deep")(
    convert(lambda t: edited_zip(KERAS / "cfc_seq_dense.keras", t / "deep.keras", lambda n, d: nested(100000).encode() if n == "config.json" else d))
)


def _lambda(config):
    keras_layers(config)[-1].update(
        {"class_name": "Lambda", "module": "keras.layers",
         "config": {"name": "x", "function": {"class_name": "__lambda__", "config": {"code": "4wEAAAAA", "defaults": None, "closure": None}}}}
    )


def _os_system(config):
    keras_layers(config)[-1].update({"module": "os", "class_name": "system", "registered_name": "system"})


def _builtins(config):
    keras_layers(config)[-1].update({"module": "builtins", "class_name": "eval"})


def _registered(config):
    keras_layers(config)[-1].update({"module": None, "class_name": "os>system"})


def _negative_units(config):
    keras_layers(config)[0 if keras_layers(config)[0]["class_name"] != "InputLayer" else 1]["config"]["units"] = -4


def _top_level(config):
    config["class_name"] = "posix.system"


case("keras: Lambda layer", "a Lambda layer is Python code", payload=True)(
    convert(lambda t: keras_config_edit(KERAS / "cfc_seq_dense.keras", t / "lambda.keras", _lambda))
)
case("keras: class from os", "unsupported layer type from os", payload=True)(
    convert(lambda t: keras_config_edit(KERAS / "cfc_seq_dense.keras", t / "os.keras", _os_system))
)
case("keras: class from builtins", "unsupported layer type from builtins", payload=True)(
    convert(lambda t: keras_config_edit(KERAS / "cfc_seq_dense.keras", t / "builtins.keras", _builtins))
)
case("keras: registered os>system", "unsupported layer type from os", payload=True)(
    convert(lambda t: keras_config_edit(KERAS / "cfc_seq_dense.keras", t / "reg.keras", _registered))
)
case("keras: top-level class elsewhere", "not a Sequential or functional Keras model")(
    convert(lambda t: keras_config_edit(KERAS / "cfc_seq_dense.keras", t / "top.keras", _top_level))
)
case("keras: negative units", "units must be a positive int")(
    convert(lambda t: keras_config_edit(KERAS / "cfc_seq_dense.keras", t / "neg.keras", _negative_units))
)
case("keras: 149 GiB dataset", "declares")(convert(huge_h5))
case("keras: NaN weights", "NaN or Inf")(
    convert(
        lambda t: edited_zip(
            KERAS / "cfc_seq_dense.keras", t / "nan.keras",
            lambda n, d: _h5_with_nan(d) if n == "model.weights.h5" else d,
        )
    )
)
case("keras graph: output of an unknown layer", "is not made by any of its layers")(
    convert(lambda t: keras_config_edit(GRAPHS / "two_inputs_two_heads.keras", t / "out.keras",
                                        lambda c: c["config"].update(output_layers=[["nowhere", 0, 0]])))
)
case("keras graph: a cycle", "read tensors no layer makes")(
    convert(lambda t: keras_config_edit(GRAPHS / "two_inputs_two_heads.keras", t / "cycle.keras", _cycle))
)
case("tf.keras: truncated .h5", "truncated or corrupt")(convert(file_with("t.h5", lambda t: part(TF_KERAS / "cfc_seq_dense.h5", 0.3))))
case("tf.keras: foreign HDF5", "neither a Keras model nor Keras weights")(convert(lambda t: _foreign_h5(t)))
case("tf.keras: model_config not JSON", "its model_config attribute is not JSON")(convert(lambda t: _h5_attr(t, b"{nope")))
case("tf.keras: weights only without --config", "holds weights only")(convert(lambda t: TF_KERAS / "cfc_autoncp_weights_only.h5"))
case("SavedModel: a folder that is not one", "not a checkpoint this tool reads")(convert(lambda t: (t / "folder").mkdir() or (t / "folder")))


def _cycle(config):
    for entry in config["config"]["layers"]:
        if entry["config"].get("name") == "seq_norm":
            entry["inbound_nodes"][0]["args"][0]["config"]["keras_history"] = ["cfc", 0, 0]


def _h5_with_nan(data: bytes) -> bytes:
    buffer = io.BytesIO(data)
    with h5py.File(buffer, "r+") as handle:
        names = []
        handle.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.size > 1 else None)
        dataset = handle[names[0]]
        values = dataset[()]
        values.flat[0] = np.nan
        dataset[...] = values
    return buffer.getvalue()


def _foreign_h5(tmp):
    path = tmp / "foreign.h5"
    with h5py.File(path, "w") as handle:
        handle["data"] = np.zeros(3)
    return path


def _h5_attr(tmp, value):
    path = tmp / "attr.h5"
    path.write_bytes((TF_KERAS / "cfc_seq_dense.h5").read_bytes())
    with h5py.File(path, "r+") as handle:
        handle.attrs["model_config"] = value
    return path


# ncps-mlx model files
case("model file: config says 16 units, tensors 8", "do not match the model its config describes")(
    convert(lambda t: lying_model_file(t, lambda m, a: set_modules(m, {"": {**first_module(m), "units": 16}})))
)
case("model file: modules not JSON", "metadata")(convert(lambda t: lying_model_file(t, lambda m, a: m.update(modules="{oops"))))
case("model file: future format version", "format version '99' is not supported")(convert(lambda t: lying_model_file(t, lambda m, a: m.update(format_version="99"))))
case("model file: unknown model class", "class")(
    convert(lambda t: lying_model_file(t, lambda m, a: set_modules(m, {"": {**first_module(m), "class": "os.system"}})))
)
case("model file: NaN tensor", "NaN or Inf")(
    convert(lambda t: lying_model_file(t, lambda m, a: a.__setitem__("rnn_cell.backbone.0.weight", a["rnn_cell.backbone.0.weight"] * np.nan)))
)
case("model file: negative units", "units must be a positive int")(
    convert(lambda t: lying_model_file(t, lambda m, a: set_modules(m, {"": {**first_module(m), "units": -8}})))
)
case("model file: truncated", "truncated")(
    convert(lambda t: file_with("m.safetensors", part(ncps_mlx.save(ncps_mlx.CfC(4, 8), t / "whole.safetensors"), 0.7))(t))
)

# CLI arguments and paths
case("cli: --atol nan", "--atol must be a finite number >= 0")(convert(lambda t: TORCH / "cfc_default.pt", "--atol", "nan"))
case("cli: --atol -1", "--atol must be a finite number >= 0")(convert(lambda t: TORCH / "cfc_default.pt", "--atol", "-1"))
case("cli: --atol inf", "--atol must be a finite number >= 0")(convert(lambda t: TORCH / "cfc_default.pt", "--atol", "inf"))
case("cli: --atol text", "--atol")(convert(lambda t: TORCH / "cfc_default.pt", "--atol", "tight"))
case("cli: source missing", "no such file")(convert(lambda t: t / "missing.pt"))
case("cli: unknown output suffix", "must end in .safetensors or .onnx")(convert(lambda t: TORCH / "cfc_default.pt", out="model.bin"))
case("cli: output folder missing", "does not exist")(lambda t, o: [str(TORCH / "cfc_default.pt"), "-o", str(o / "no" / "m.safetensors")])
case("cli: output folder is a file", "is a file, not a folder")(
    lambda t, o: [str(TORCH / "cfc_default.pt"), "-o", str(_a_file(o) / "m.safetensors")]
)
case("cli: output is a folder", "is a folder")(lambda t, o: [str(TORCH / "cfc_default.pt"), "-o", str(_a_folder(o)), "--force"])
case("cli: output exists", "exists; pass --force")(lambda t, o: [str(TORCH / "cfc_default.pt"), "-o", str(_a_file(o, "m.safetensors"))])
case("cli: unknown module", "has no ncps module 'decoderr'; it holds 'encoder', 'decoder'")(convert(lambda t: ROOT / "torch_wrappers" / "training_two_rnns.pt", "--module", "decoderr", out="m.onnx"))
case("cli: several modules, none chosen for ONNX", "holds 2 ncps modules ('encoder', 'decoder'); choose one")(convert(lambda t: ROOT / "torch_wrappers" / "training_two_rnns.pt", out="m.onnx"))
case("cli: bad --onnx-inputs", "unknown input(s) hidden")(convert(lambda t: TORCH / "cfc_default.pt", "--onnx-inputs", "hidden", out="m.onnx"))
case("cli: --module for a model file", "--module applies to ONNX output")(
    convert(lambda t: ROOT / "torch_wrappers" / "training_two_rnns.pt", "--module", "encoder")
)
case("cli: no output", "required: -o/--output")(lambda t, o: ["frobnicate", "x"])
case("verify: output missing", "no such file")(lambda t, o: ["verify", str(TORCH / "cfc_default.pt"), str(t / "missing.safetensors")])
case("verify: ONNX that is not ONNX", "not a readable ONNX file")(
    lambda t, o: ["verify", str(TORCH / "cfc_default.pt"), str(file_with("x.onnx", b"\x08\x07garbage" * 50)(t))]
)
case("verify: ONNX of another model", "holds a")(
    lambda t, o: ["verify", str(TORCH / "cfc_default.pt"), str(ncps_mlx.export_onnx(ncps_mlx.LTC(4, 5), t / "ltc.onnx"))]
)
case("verify: model file of another model", "holds a")(
    lambda t, o: ["verify", str(TORCH / "cfc_default.pt"), str(ncps_mlx.save(ncps_mlx.LTC(4, 5), t / "ltc.safetensors"))]
)


def _a_file(folder, name="a_file"):
    path = folder / name
    path.write_text("x")
    return path


def _a_folder(folder):
    path = folder / "a_folder.safetensors"
    path.mkdir()
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_cli_input(name, tmp_path, capsys):
    build, message, payload = CASES[name]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = build(tmp_path, out_dir)
    before = {p.name for p in out_dir.iterdir()}
    code = cli.main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if not line.startswith("[INFO]")]
    assert code == 2, (code, captured.err[-2000:])
    assert len(errors) == 1, errors
    assert errors[0].startswith("ncps-convert: error: ")
    assert message in errors[0], errors[0]
    assert "Traceback" not in captured.err and "internal error" not in captured.err
    assert "[" + "squeeze]" not in errors[0] and not any(f"[{op}]" in errors[0] for op in ("bits", "reshape", "matmul", "addmm"))
    assert {p.name for p in out_dir.iterdir()} == before  # nothing written, nothing half-written
    if payload:
        assert not (tmp_path / "MARKER").exists()


# --- the Python API ----------------------------------------------------------------------------

W = ncps_mlx.wirings
API_CASES = {
    "CfC(0, 16)": (lambda: ncps_mlx.CfC(0, 16), ValueError, "input_size must be a positive int, got 0"),
    "CfC(20, -1)": (lambda: ncps_mlx.CfC(20, -1), ValueError, "units must be a positive int, got -1"),
    "CfC(20, 0)": (lambda: ncps_mlx.CfC(20, 0), ValueError, "units must be a positive int, got 0"),
    "CfC(4.5, 8)": (lambda: ncps_mlx.CfC(4.5, 8), TypeError, "input_size must be a positive int, got 4.5"),
    "CfC(4, '8')": (lambda: ncps_mlx.CfC(4, "8"), TypeError, "units must be a positive int or a Wiring, got '8'"),
    "CfC mode": (lambda: ncps_mlx.CfC(4, 8, mode="turbo"), ValueError, "mode"),
    "CfC backbone_units=-3": (lambda: ncps_mlx.CfC(4, 8, backbone_units=-3), ValueError, "backbone_units must be a positive int"),
    "CfC backbone_layers=-1": (lambda: ncps_mlx.CfC(4, 8, backbone_layers=-1), ValueError, "backbone_layers must be an int >= 0"),
    "CfC proj_size=0": (lambda: ncps_mlx.CfC(4, 8, proj_size=0), ValueError, "proj_size must be a positive int"),
    "LTC(4, 0)": (lambda: ncps_mlx.LTC(4, 0), ValueError, "units must be a positive int, got 0"),
    "LTC ode_unfolds=0": (lambda: ncps_mlx.LTC(4, 8, ode_unfolds=0), ValueError, "ode_unfolds must be a positive int"),
    "CTRNN(4, -2)": (lambda: ncps_mlx.CTRNN(4, -2), ValueError, "units must be a positive int, got -2"),
    "CTGRU M=0": (lambda: ncps_mlx.CTGRU(4, 5, M=0), ValueError, "M"),
    "AutoNCP(10, 10)": (lambda: W.AutoNCP(10, 10), ValueError, "output_size"),
    "NCP(0, ...)": (lambda: W.NCP(0, 3, 2, 2, 2, 2, 2), ValueError, "inter_neurons"),
    "FullyConnected(-1)": (lambda: W.FullyConnected(-1), ValueError, "units"),
    "Random sparsity 1.5": (lambda: W.Random(8, 2, sparsity_level=1.5), ValueError, "sparsity level '1.5'"),
    "model input of 4-D": (lambda: ncps_mlx.CfC(4, 8)(mx.zeros((1, 2, 3, 4))), ValueError, "Expected input of shape"),
    "model wrong features": (lambda: ncps_mlx.CfC(4, 8)(mx.zeros((1, 2, 5))), ValueError, "5 features"),
    "model hx wrong shape": (lambda: ncps_mlx.CfC(4, 8)(mx.zeros((1, 2, 4)), mx.zeros((1, 7))), ValueError, "Initial state hx"),
    "model timespans wrong": (lambda: ncps_mlx.CfC(4, 8)(mx.zeros((2, 3, 4)), None, mx.ones((2, 4))), ValueError, "timespans"),
    "load a missing file": (lambda: ncps_mlx.load("/nonexistent/m.safetensors"), ValueError, "/nonexistent/m.safetensors: no such file"),
    "load_weights into the wrong module": (
        lambda: ncps_mlx.load_weights(ncps_mlx.LTC(4, 5), TORCH / "cfc_default.safetensors"), ValueError, "does not fit LTC"
    ),
    "load(module=unknown)": (lambda: ncps_mlx.load(ncps_mlx.save(ncps_mlx.CfC(4, 8), "/tmp/ncps_mlx_hostile.safetensors"), module="x"),
                             ValueError, "has no ncps module 'x'; it holds one unnamed module"),
    "export_onnx bad input": (lambda: ncps_mlx.export_onnx(ncps_mlx.CfC(4, 8), "/tmp/x.onnx", inputs=["h0"]), ValueError, "unknown ONNX input"),
}


@pytest.mark.parametrize("name", sorted(API_CASES))
def test_hostile_api_input(name):
    call, error_type, message = API_CASES[name]
    with pytest.raises(error_type) as raised:
        call()
    assert message in str(raised.value)
    assert not str(raised.value).startswith("[")  # not an MLX-internal "[op] ..." message


def test_corpus_size():
    """The issue asks for at least 60 hostile cases; the count goes into the closing note."""
    print(f"hostile cases: {len(CASES)} CLI + {len(API_CASES)} API")
    assert len(CASES) + len(API_CASES) >= 60


# --- faults: a failing write, Ctrl-C and SIGTERM -----------------------------------------------


def _says_the_disk_is_full(code, stderr, out):
    """Exit 2, one line naming the cause, and nothing left in the output's folder."""
    errors = [line for line in stderr.splitlines() if not line.startswith("[INFO]")]
    assert code == 2 and errors == [f"ncps-convert: error: writing {out} failed: No space left on device; nothing was written"]
    assert list(out.parent.iterdir()) == []


def _convert_into(folder):
    out = folder / "out"
    out.mkdir()
    return cli.main([str(TORCH / "cfc_default.pt"), "-o", str(out / "m.safetensors"), "--no-verify"]), out / "m.safetensors"


def test_a_failing_write_leaves_nothing_and_says_why(tmp_path, monkeypatch, capsys):
    from ncps_mlx.converters import modelfile

    def disk_full(models, path, **kwargs):
        Path(path).write_bytes(b"half a model file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modelfile, "save_modules", disk_full)
    code, out = _convert_into(tmp_path)
    _says_the_disk_is_full(code, capsys.readouterr().err, out)


def test_mlx_failing_to_write_a_full_disk_is_said_in_one_line(tmp_path, monkeypatch, capsys):
    """MLX's own failure (a RuntimeError "[write] Unable to write N bytes to file.") on a full
    disk: one line naming the cause, no partial file."""
    import shutil

    import mlx.core as mx

    def full(path, arrays, metadata=None):
        Path(path).write_bytes(b"the first bytes")
        raise RuntimeError("[write] Unable to write 4625 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 20, 1 << 20, 0))
    code, out = _convert_into(tmp_path)
    _says_the_disk_is_full(code, capsys.readouterr().err, out)


def test_a_real_full_disk(tmp_path):
    """A 4 KiB tmpfs, where the machine lets a test mount one (root in a container that allows it)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        out = disk / "m.safetensors"
        result = subprocess.run([sys.executable, "-m", "ncps_mlx.converters.cli", str(TORCH / "cfc_default.pt"), "-o", str(out), "--no-verify"],
                                capture_output=True, text=True, timeout=300)
        _says_the_disk_is_full(result.returncode, result.stderr, out)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def _has_tensorflow():
    try:
        import tensorflow  # noqa: F401
        import ncps.keras  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_tensorflow(), reason="the window to interrupt in is Keras's verification run")
@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_mid_conversion_leaves_no_file(signal_name, code, tmp_path):
    """Interrupted while verification runs (the partial output is on disk then): the exit code
    is 128 + the signal, the partial file is gone, and the output was never written."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    out.mkdir()
    exe = Path(sys.executable).with_name("ncps-convert")
    # SIGINT as at a terminal: a test run started in the background (`make test &`) inherits
    # SIGINT ignored, and Python then keeps it ignored in the child (the conversion completed).
    process = subprocess.Popen([str(exe), str(GRAPHS / "bidirectional.keras"), "-o", str(out / "m.safetensors")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not any(p.name.startswith(".") for p in out.iterdir()) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "the conversion ended before it could be interrupted"
    time.sleep(0.5)
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-2000:]
    assert "nothing was written" in stderr.strip().splitlines()[-1] and "Traceback" not in stderr
    assert list(out.iterdir()) == []


def test_nonfinite_weights_are_reported_and_convert_only_when_allowed(tmp_path, capsys):
    path = with_nonfinite(tmp_path, float("nan"), 3)
    assert cli.main(["inspect", str(path)]) == 0
    assert "NaN/Inf      rnn_cell.backbone.0.weight: 3 values" in capsys.readouterr().out
    assert cli.main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nonfinite"] == {"rnn_cell.backbone.0.weight": 3}
    out = tmp_path / "m.safetensors"
    assert cli.main([str(path), "-o", str(out), "--allow-nonfinite", "--quiet"]) == 0  # NaN where torch has NaN
    capsys.readouterr()
    assert np.isnan(np.array(ncps_mlx.load(out).rnn_cell.backbone[0].weight)).sum() == 3
