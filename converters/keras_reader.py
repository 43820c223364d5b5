"""Reader for ``ncps.keras`` (Keras 3) and ``ncps.tf`` (tf.keras) models, with h5py and json only.

Formats: Keras 3 ``.keras`` archives (config.json + model.weights.h5), tf.keras full-model
``.h5`` files (``model_config`` attribute + ``model_weights``), weights-only ``.h5`` files of
either flavour (with the model config given as --config), and tf.keras SavedModel folders
(these need TensorFlow to read their variables). The model must be a
``Sequential`` or a functional model whose layers form a chain; each layer becomes a layer of
an ``ncps_mlx.Stack``, which returns what the Keras model returns.

The flavour differences (shared/docs/reference-notes.md points 0-6) are handled here so the
converted model is the same function: CfC heads without tanh (``ff_activation=None``), the
time gate's sign (``time_a`` weight and bias negated, exact), the ``MixedMemoryRNN`` circuit
(``memory_circuit="input"``), kernels transposed to (out, in), wired output sliced to the motor
neurons (``motor_output=True``), LTC parameters used as stored (NonNeg constraints, no
softplus: ``implicit_param_constraints=False``). Keras keeps CfC/LTC sparsity masks out of the
weight files, so wirings are rebuilt from the layer config (point 11); a wired CfC's mask is
signed in Keras, and its sign is folded into the converted kernel.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np

from ncps_mlx import wirings

from . import formats
from .description import (
    Checkpoint,
    ConversionError,
    Description,
    cfc_layer_masks,
    reference_wiring,
    sha256_of,
    wiring_masks,
)

NAME = "keras"
SUFFIXES = (".keras", ".h5")

NCPS_LAYERS = ("CfC", "LTC")
PLAIN_LAYERS = ("Dense", "Dropout", "Activation", "Flatten", "Normalization", "TimeDistributed")


def sniff(path: Path) -> bool:
    kind = formats.kind_of(path)
    if kind == "directory":
        return (Path(path) / "saved_model.pb").exists()
    if kind == "zip":
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            return Path(path).suffix == ".keras"
        return "config.json" in names
    return kind == "hdf5"


def read(path, config: dict | None = None, trust_pickle: bool = False) -> Checkpoint:
    """``config`` (from --config) is needed only for weights-only .h5 files: the Keras model
    config (``{"class_name": "Sequential", "config": {"layers": [...]}}``, as ``model.to_json()``
    writes it, or the same written by hand). Any file also accepts ``{"wirings": {layer name:
    wiring}}`` for wirings the file cannot record (an NCP: reference-notes point 11)."""
    path = Path(path)
    h5py = _import_h5py()
    config = dict(config or {})
    wiring_overrides = config.pop("wirings", {})
    kind = formats.kind_of(path)
    try:
        if kind == "directory":
            model_config, weights = _saved_model(path)
            file_format, framework = "tf.keras SavedModel", "tf.keras"
        elif kind == "zip":
            archive = zipfile.ZipFile(path)
            model_config = json.loads(archive.read("config.json"))
            weights = _Keras3Weights(h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r"))
            file_format, framework = "Keras 3 .keras archive", "keras"
        else:
            handle = h5py.File(path, "r")
            if "model_config" in handle.attrs:
                raw = handle.attrs["model_config"]
                model_config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
                weights = _TfKerasWeights(handle["model_weights"])
                file_format, framework = "tf.keras .h5 model", "tf.keras"
            elif "layer_names" in handle.attrs:
                weights = _TfKerasWeights(handle)
                file_format, framework = "tf.keras weights-only .h5", "tf.keras"
                model_config = None
            elif "layers" in handle:
                weights = _Keras3Weights(handle)
                file_format, framework = "Keras 3 weights-only .h5", "keras"
                model_config = None
            else:
                raise ConversionError(f"{path}: an HDF5 file with neither a Keras model nor Keras weights in it")
    except (zipfile.BadZipFile, KeyError, OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: truncated or corrupt Keras file ({str(error).splitlines()[0]})") from None
    if model_config is None:
        if not config:
            raise ConversionError(
                f"{path} holds weights only ({file_format}); give the Keras model config with --config "
                '(e.g. {"class_name": "Sequential", "config": {"layers": [{"class_name": "CfC", "config": '
                '{"units": 16, "return_sequences": true}}]}})'
            )
        model_config = config if "class_name" in config else {"class_name": "Sequential", "config": config}
    elif config:
        raise ConversionError(f"{path} carries its own model config; --config may only give 'wirings'")

    layers = _chain(model_config)
    arrays, specs = {}, []
    for index, (spec, layer_arrays) in enumerate(_convert_layers(layers, weights, wiring_overrides)):
        specs.append(spec)
        arrays.update({f"layers.{index}.{k}": v for k, v in layer_arrays.items()})
    description = Description(
        config={"class": "Stack", "layers": specs},
        arrays=arrays,
        source={
            "reader": NAME,
            "framework": framework,
            "format": file_format,
            "file": str(path),
            "sha256": sha256_of(path),
            "keras_layers": [_source_layer(layer, spec) for layer, spec in zip(layers, specs)],
            "keras_input_shape": _input_shape(model_config),
            "full_model": model_config is not config,
            "module": "",
        },
    )
    return Checkpoint(modules={"": description}, source={k: description.source[k] for k in ("reader", "framework", "format", "file", "sha256")})


def _input_shape(model_config: dict):
    """(time, features) from the model's InputLayer, None where not fixed; None if absent."""
    for layer in model_config.get("config", {}).get("layers", []):
        if layer.get("class_name") == "InputLayer":
            cfg = layer["config"]
            shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
            if isinstance(shape, dict):  # tf.keras SavedModel metadata: {"class_name": "__tuple__", "items": [...]}
                shape = shape.get("items")
            return list(shape[1:]) if shape else None
    return None


def _source_layer(layer: dict, spec: dict) -> dict:
    """What the verification worker needs to rebuild a layer with the reference classes."""
    kind = layer["class_name"].split(">")[-1]
    if kind in NCPS_LAYERS:
        options = _options(kind, layer["config"])
        options = {k: v for k, v in options.items() if k not in ("cell", "name", "trainable", "dtype", "time_major")}
        options["units"] = spec["model"]["units"] if isinstance(options.get("units"), dict) else options.get("units")
        options["activation"] = _activation_name(options.get("activation", "lecun_tanh"))
        for key in ("sparsity_mask", "stateful", "unroll", "zero_output_for_mask", "fully_recurrent"):
            options.pop(key, None)
        return {"class_name": kind, "config": options}
    return {"class_name": kind, "config": layer["config"]}


def _saved_model(path: Path):
    """A tf.keras SavedModel: the config from keras_metadata.pb, variables through TensorFlow
    (the variables' names are the same as in a tf.keras .h5 file)."""
    if not (path / "keras_metadata.pb").exists():
        raise ConversionError(
            f"{path}: a SavedModel without keras_metadata.pb (e.g. Keras 3 model.export(), which keeps only "
            "the inference graph); save the model as .keras (or tf.keras .h5) to convert it"
        )
    try:
        import tensorflow as tf
        from tf_keras.protobuf import saved_metadata_pb2
    except ImportError:
        raise ConversionError(
            f"{path} is a TensorFlow SavedModel; reading one needs TensorFlow and tf-keras "
            "(pip install 'ncps-mlx[tf]'). .keras and .h5 files convert without TensorFlow."
        ) from None
    metadata = saved_metadata_pb2.SavedMetadata()
    try:
        metadata.ParseFromString((path / "keras_metadata.pb").read_bytes())
        root = json.loads(metadata.nodes[0].metadata)
        loaded = tf.saved_model.load(str(path))
    except Exception as error:
        raise ConversionError(f"{path}: truncated or corrupt SavedModel ({str(error).splitlines()[0]})") from None
    per_layer = {}
    for node in metadata.nodes:
        if re.fullmatch(r"root\.layer(?:_with_weights)?-\d+", node.node_path):
            layer = getattr(loaded, node.node_path.split(".", 1)[1])
            per_layer[json.loads(node.metadata)["name"]] = {v.name: np.asarray(v.numpy(), np.float32) for v in layer.variables}
    return root["model_config"], _TfKerasWeights(per_layer)


def _import_h5py():
    try:
        import h5py
    except ImportError:
        raise ConversionError("reading Keras files needs h5py: pip install h5py") from None
    return h5py


# --- the model config ------------------------------------------------------------------------


def _chain(model_config: dict) -> list[dict]:
    """The model's layers in order (InputLayer dropped); a functional model must be a chain."""
    kind = model_config.get("class_name")
    config = model_config.get("config", {})
    if kind not in ("Sequential", "Functional", "Model"):
        raise ConversionError(f"top-level object is a {kind}, not a Sequential or functional Keras model")
    layers = [l for l in config.get("layers", []) if l.get("class_name") != "InputLayer"]
    if kind != "Sequential":
        for previous, layer in zip(layers, layers[1:]):
            inbound = json.dumps(layer.get("inbound_nodes", []))
            if previous["config"]["name"] not in inbound:
                raise ConversionError(
                    f"the functional model is not a chain of layers (layer {layer['config']['name']!r} does not read "
                    f"{previous['config']['name']!r}); only linear models convert"
                )
    return layers


def _activation_name(value):
    if isinstance(value, dict):
        value = value.get("config", value.get("class_name"))
    if isinstance(value, str) and value.startswith(">"):
        value = value[1:]  # Keras 3 writes registered functions as ">name"
    return value


def _wiring(config: dict, input_dim: int, where: str):
    """Rebuild a wiring from its serialised config (Keras keeps no masks in its weights)."""
    if "class_name" in config:  # Keras 3: {"class_name": ..., "config": ...}
        class_name, params = config["class_name"], dict(config.get("config", {}))
    elif "class" in config:  # ours (a --config wiring): {"class": ..., **arguments}
        params = dict(config)
        class_name = params.pop("class")
    else:  # tf.keras writes the wiring's get_config() inline
        class_name, params = _guess_wiring_class(config), dict(config)
    if class_name == "NCP" and (params.get("seed") is None or isinstance(params.get("inter_neurons"), list)):
        layer = where.split("'")[1] if "'" in where else "LAYER"
        raise ConversionError(
            f"{where}: the file records an NCP wiring without its seed (ncps.wirings.NCP.get_config loses it) and "
            "Keras stores no masks, so the wiring is not in the file (reference-notes point 11). Give it with "
            f'--config: {{"wirings": {{"{layer}": {{"class": "NCP", "inter_neurons": ..., ..., "seed": ...}}}}}}'
        )
    try:
        if class_name == "Wiring" or "exact" in params:
            wiring = wirings.wiring_from_description({"class": class_name, **params})
        else:
            wiring = wirings.wiring_from_config(class_name, params)
        wiring.build(input_dim)
    except (ValueError, TypeError) as error:
        raise ConversionError(f"{where}: cannot rebuild its {class_name} wiring: {error}") from None
    return wiring


def _guess_wiring_class(params: dict) -> str:
    if "output_size" in params:
        return "AutoNCP"
    if "erev_init_seed" in params:
        return "FullyConnected"
    if "random_seed" in params:
        return "Random"
    if "adjacency_matrix" in params:
        return "Wiring"
    return "NCP"


def _convert_layers(layers, weights, wiring_overrides):
    """[(Stack layer spec, arrays in the Stack layer's names)]."""
    converted = []
    counters: dict[str, int] = {}
    for position, layer in enumerate(layers):
        # tf.keras records registered classes as "package>Class" (e.g. "ncps>CfC").
        kind, cfg = layer["class_name"].split(">")[-1], layer["config"]
        snake = _snake(kind)
        counters[snake] = counters.get(snake, -1) + 1
        group_name = snake if counters[snake] == 0 else f"{snake}_{counters[snake]}"
        name = cfg.get("name", group_name)
        where = f"layer {name!r} ({kind})"
        if kind not in NCPS_LAYERS + PLAIN_LAYERS:
            raise ConversionError(
                f"{where}: unsupported layer type; supported: {', '.join(NCPS_LAYERS + PLAIN_LAYERS)} and InputLayer"
            )
        view = weights.layer(name, group_name, position)
        if kind in NCPS_LAYERS:
            cfg = _options(kind, cfg)
            if name in wiring_overrides:
                cfg = {**cfg, "units": wiring_overrides[name]}
            spec, arrays = _ncps_layer(kind, cfg, view, where)
        else:
            spec, arrays = _plain_layer(kind, cfg, view, where)
        converted.append((spec, arrays))
    if not converted:
        raise ConversionError("the model has no layers")
    return converted


def _snake(name: str) -> str:
    # keras.src.utils.naming.to_snake_case: how Keras 3 names layer groups in weight files.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _plain_layer(kind, cfg, view, where):
    if kind == "TimeDistributed":
        inner = cfg["layer"]
        if inner["class_name"] != "Dense":
            raise ConversionError(f"{where}: TimeDistributed({inner['class_name']}) is not supported (only Dense)")
        return _plain_layer("Dense", inner["config"], view.inner(), where)
    if kind == "Dense":
        view = view.of("dense")
        kernel = view.get("kernel")
        spec = {
            "type": "Dense",
            "in_features": int(kernel.shape[0]),
            "units": int(kernel.shape[1]),
            "activation": _checked_activation(cfg.get("activation"), where),
            "use_bias": bool(cfg.get("use_bias", True)),
        }
        arrays = {"linear.weight": kernel.T}
        if spec["use_bias"]:
            arrays["linear.bias"] = view.get("bias")
        return spec, arrays
    if kind == "Activation":
        return {"type": "Activation", "activation": _checked_activation(cfg.get("activation"), where)}, {}
    if kind == "Dropout":
        return {"type": "Dropout", "rate": float(cfg.get("rate", 0.0))}, {}
    if kind == "Flatten":
        return {"type": "Flatten"}, {}
    view = view.of("normalization")
    mean, variance = view.get("mean"), view.get("variance")
    return (
        {"type": "Normalization", "features": int(mean.size)},
        {"mean": mean.reshape(-1), "variance": variance.reshape(-1)},
    )


def _checked_activation(value, where):
    from ncps_mlx.stack import ACTIVATIONS

    name = _activation_name(value)
    if name not in ACTIVATIONS:
        raise ConversionError(f"{where}: unsupported activation {name!r}")
    return name


WIRING_KEYS = {
    "units", "output_dim", "erev_init_seed", "self_connections", "sparsity_level", "random_seed", "output_size",
    "seed", "inter_neurons", "command_neurons", "motor_neurons", "sensory_fanout", "inter_fanout",
    "recurrent_command_synapses", "motor_fanin", "adjacency_matrix", "sensory_adjacency_matrix", "input_dim",
}  # fmt: skip


def _options(kind: str, cfg: dict) -> dict:
    """One shape for both flavours' layer configs. Keras 3 puts the constructor arguments on
    the layer; tf.keras only on its cell (a MixedMemoryRNN around the ODE cell when mixed), and
    an LTC cell's config is its wiring's config merged with the cell's own options."""
    if "units" in cfg:
        return cfg
    options = {k: cfg[k] for k in ("return_sequences", "return_state", "go_backwards", "stateful", "unroll") if k in cfg}
    if cfg.get("time_major"):
        options["time_major"] = True
    cell = cfg.get("cell", {})
    inner = cell.get("config", {})
    options["mixed_memory"] = cell.get("class_name", "").split(">")[-1] == "MixedMemoryRNN"
    if options["mixed_memory"]:
        inner = inner["rnn_cell"].get("config", inner["rnn_cell"])
    if kind == "CfC":
        options["units"] = inner.get("wiring", inner.get("units"))
        for key in ("mode", "activation", "backbone_units", "backbone_layers", "backbone_dropout"):
            if key in inner:
                options[key] = inner[key]
    else:
        options["units"] = {k: v for k, v in inner.items() if k in WIRING_KEYS}
        for key in ("input_mapping", "output_mapping", "ode_unfolds", "epsilon"):
            if key in inner:
                options[key] = inner[key]
    return options


def _ncps_layer(kind, cfg, view, where):
    for option in ("stateful", "unroll", "time_major"):
        if cfg.get(option):
            raise ConversionError(f"{where}: {option}=True is not supported")
    mixed = bool(cfg.get("mixed_memory", False))
    cell_view = view.cell()
    lstm = cell_view.lstm() if mixed else None
    inner = cell_view.inner_cell() if mixed else cell_view
    input_size = int(lstm.get("input_kernel").shape[0]) if mixed else None
    wired = isinstance(cfg["units"], dict)
    if kind == "CfC":
        model, arrays = _cfc(cfg, inner, wired, mixed, input_size, where)
    else:
        model, arrays = _ltc(cfg, inner, wired, mixed, input_size, where)
    if mixed:
        arrays["lstm.input_map.weight"] = lstm.get("input_kernel").T
        arrays["lstm.input_map.bias"] = lstm.get("bias")
        arrays["lstm.recurrent_map.weight"] = lstm.get("recurrent_kernel").T
    spec = {
        "type": "RNN",
        "model": model,
        "return_state": bool(cfg.get("return_state", False)),
        "go_backwards": bool(cfg.get("go_backwards", False)),
    }
    return spec, {f"model.{k}": v for k, v in arrays.items()}


def _common(cfg, mixed):
    return {
        "return_sequences": bool(cfg.get("return_sequences", False)),
        "batch_first": True,
        "mixed_memory": mixed,
        "memory_circuit": "input",
    }


def _cfc(cfg, cell, wired, mixed, input_size, where):
    mode = cfg.get("mode", "default")
    if wired:
        layer_views = cell.wired_layers()
        first_kernel = layer_views[0].get("ff1_kernel")
        cell_inputs = int(first_kernel.shape[0]) - int(first_kernel.shape[1])
        wiring = _wiring(cfg["units"], cell_inputs, where)
        input_size = input_size if mixed else cell_inputs
        model = {
            "class": "CfC",
            "input_size": input_size,
            "units": wirings.describe(wiring),
            "mode": mode,
            "ff_activation": None,
            "motor_output": True,
            **_common(cfg, mixed),
        }
        if cfg.get("fully_recurrent", True) is False:
            raise ConversionError(f"{where}: fully_recurrent=False wired CfCs are not supported")
        arrays = {}
        masks = wiring_masks(wiring, "CfC")
        signed = cfc_layer_masks(wiring)
        if len(layer_views) != wiring.num_layers:
            raise ConversionError(f"{where}: {len(layer_views)} CfC layers in the weights, {wiring.num_layers} in its wiring")
        for index, layer in enumerate(layer_views):
            prefix = f"rnn_cell.layer_{index}."
            arrays.update(_cfc_cell_arrays(layer, mode, prefix, signed_mask=signed[index]))
            arrays[prefix + "sparsity_mask"] = masks[f"rnn_cell.layer_{index}.sparsity_mask"]
        return model, arrays

    units = int(cfg["units"])
    ff1 = cell.get("ff1_kernel")
    backbone = cell.backbone()
    if backbone:
        cell_inputs = int(backbone[0].get("kernel").shape[0]) - units
    else:
        cell_inputs = int(ff1.shape[0]) - units
    model = {
        "class": "CfC",
        "input_size": input_size if mixed else cell_inputs,
        "units": units,
        "mode": mode,
        "activation": _activation_name(cfg.get("activation", "lecun_tanh")),
        "backbone_units": int(backbone[0].get("kernel").shape[1]) if backbone else 0,
        "backbone_layers": len(backbone),
        "backbone_dropout": float(cfg.get("backbone_dropout") or 0.0),
        "ff_activation": None,
        **_common(cfg, mixed),
    }
    arrays = _cfc_cell_arrays(cell, mode, "rnn_cell.")
    for index, dense in enumerate(backbone):
        arrays[f"rnn_cell.backbone.{index}.weight"] = dense.get("kernel").T
        arrays[f"rnn_cell.backbone.{index}.bias"] = dense.get("bias")
    return model, arrays


def _cfc_cell_arrays(cell, mode, prefix, signed_mask=None):
    arrays = {}
    heads = ["ff1"] if mode == "pure" else ["ff1", "ff2"]
    for head in heads:
        kernel = cell.get(f"{head}_kernel")
        if signed_mask is not None:
            # Keras: kernel * signed mask. Ours: weight * |mask|. Folding the sign into the
            # weight gives the same product wherever the mask is nonzero.
            kernel = kernel * signed_mask
        arrays[prefix + f"{head}.weight"] = kernel.T
        arrays[prefix + f"{head}.bias"] = cell.get(f"{head}_bias")
    if mode == "pure":
        arrays[prefix + "w_tau"] = cell.get("w_tau")
        arrays[prefix + "A"] = cell.get("A")
    else:
        # Keras gates with sigmoid(-t_a * t + t_b); ours with sigmoid(t_a * t + t_b): negate
        # time_a's kernel and bias (negation is exact).
        arrays[prefix + "time_a.weight"] = -cell.dense("time_a").get("kernel").T
        arrays[prefix + "time_a.bias"] = -cell.dense("time_a").get("bias")
        arrays[prefix + "time_b.weight"] = cell.dense("time_b").get("kernel").T
        arrays[prefix + "time_b.bias"] = cell.dense("time_b").get("bias")
    return arrays


LTC_NAMES = ["gleak", "vleak", "cm", "sigma", "mu", "w", "erev", "sensory_sigma", "sensory_mu", "sensory_w", "sensory_erev"]


def _ltc(cfg, cell, wired, mixed, input_size, where):
    input_mapping = cfg.get("input_mapping", "affine")
    output_mapping = cfg.get("output_mapping", "affine")
    names = list(LTC_NAMES)
    if input_mapping in ("affine", "linear"):
        names.append("input_w")
    if input_mapping == "affine":
        names.append("input_b")
    if output_mapping in ("affine", "linear"):
        names.append("output_w")
    if output_mapping == "affine":
        names.append("output_b")
    values = cell.ltc(names)
    cell_inputs = int(values["sensory_w"].shape[0])
    units_config = cfg["units"]
    if isinstance(units_config, dict):
        wiring = _wiring(units_config, cell_inputs, where)
    else:
        wiring = wirings.FullyConnected(int(units_config))
        wiring.build(cell_inputs)
    model = {
        "class": "LTC",
        "input_size": input_size if mixed else cell_inputs,
        "units": wirings.describe(wiring),
        "input_mapping": input_mapping,
        "output_mapping": output_mapping,
        "ode_unfolds": int(cfg.get("ode_unfolds", 6)),
        "epsilon": float(cfg.get("epsilon", 1e-8)),
        "implicit_param_constraints": False,
        **_common(cfg, mixed),
    }
    arrays = {f"rnn_cell.{name}": value for name, value in values.items()}
    arrays.update(wiring_masks(wiring, "LTC"))
    return model, arrays


# --- weight views: one per file format, same questions ---------------------------------------


def _array(dataset) -> np.ndarray:
    return np.asarray(dataset[()], dtype=np.float32)


class _Keras3Weights:
    """Keras 3 ``model.weights.h5``: groups by attribute path, variables by creation order."""

    def __init__(self, handle):
        self.handle = handle

    def layer(self, config_name, group_name, position):
        root = self.handle["layers"] if "layers" in self.handle else self.handle["_layer_checkpoint_dependencies"]
        if group_name not in root:
            raise ConversionError(f"weights for layer {config_name!r} not found (expected group layers/{group_name})")
        return _K3View(root[group_name])


class _K3View:
    # Keras 3 names variables by creation order; these are the orders of the layers we read.
    ORDER = {
        "dense": ["kernel", "bias"],
        "normalization": ["mean", "variance"],
        "lstm": ["input_kernel", "recurrent_kernel", "bias"],
        "cfc": ["ff1_kernel", "ff1_bias", "ff2_kernel", "ff2_bias"],
        "cfc_pure": ["ff1_kernel", "ff1_bias", "w_tau", "A"],
    }

    def __init__(self, group, kind=None):
        self.group = group
        self.kind = kind

    def of(self, kind):
        return _K3View(self.group, kind)

    def _vars(self):
        if "vars" not in self.group:
            return []
        variables = self.group["vars"]
        return [_array(variables[k]) for k in sorted(variables, key=int)]

    def get(self, name):
        variables = self._vars()
        order = self.ORDER[self.kind]
        if self.kind == "cfc" and name in ("w_tau", "A"):
            order = self.ORDER["cfc_pure"]
        index = order.index(name)
        if index >= len(variables):
            raise ConversionError(f"missing weight {name} in {self.group.name}")
        return variables[index]

    def inner(self):
        return _K3View(self.group["layer"])

    def cell(self):
        return _K3View(self.group["cell"], "cfc")

    def lstm(self):
        return self.of("lstm")

    def inner_cell(self):
        return _K3View(self.group["rnn_cell"], "cfc")

    def dense(self, name):
        return _K3View(self.group[name], "dense")

    def backbone(self):
        if "backbone_fn" not in self.group:
            return []
        layers = self.group["backbone_fn"]["layers"]
        dense = sorted((k for k in layers if k.startswith("dense")), key=_suffix)
        return [_K3View(layers[k], "dense") for k in dense]

    def wired_layers(self):
        layers = self.group["_cfc_layers"]
        return [_K3View(layers[k], "cfc") for k in sorted(layers, key=_suffix)]

    def ltc(self, names):
        variables = self._vars()
        if len(variables) != len(names):
            raise ConversionError(f"{self.group.name}: {len(variables)} LTC variables, expected {len(names)} ({names})")
        return dict(zip(names, variables))


def _suffix(name: str) -> int:
    match = re.search(r"_(\d+)$", name)
    return int(match.group(1)) if match else 0


class _TfKerasWeights:
    """tf.keras ``.h5``: per layer, ``weight_names`` like ``cf_c/mixed_memory_rnn/ff1_weight:0``."""

    def __init__(self, group):
        self.group = group

    def layer(self, config_name, group_name, position):
        if isinstance(self.group, dict):  # a SavedModel's variables, by layer name
            if config_name not in self.group:
                raise ConversionError(f"weights for layer {config_name!r} not found in the SavedModel")
            return _TfView(self.group[config_name])
        names = [n.decode() if isinstance(n, bytes) else n for n in self.group.attrs.get("layer_names", [])]
        if config_name not in names:
            # A hand-written config may not know the file's layer names: take the layer in
            # the same position.
            if position >= len(names):
                raise ConversionError(f"weights for layer {config_name!r} not found (the file has layers {names})")
            config_name = names[position]
        layer = self.group[config_name]
        names = [n.decode() if isinstance(n, bytes) else n for n in layer.attrs.get("weight_names", [])]
        return _TfView({name: _array(layer[name]) for name in names})


def _loose(name: str) -> str:
    # tf.keras uniquifies variable scopes per process (mixed_memory_rnn_1, cf_c_cell_2, ...).
    return re.escape(name) + r"(?:_\d+)?"


class _TfView:
    """Finds ``.../<parts>/<name>:0`` among a layer's weight names; parts are regex fragments."""

    def __init__(self, weights: dict, parts: tuple = ()):
        self.weights = weights
        self.parts = parts

    def _find(self, name):
        pattern = re.compile(r"(?:^|/)" + "/".join(self.parts + (re.escape(name),)) + ":0$")
        hits = [k for k in self.weights if pattern.search(k)]
        if len(hits) != 1:
            raise ConversionError(f"expected one weight named {'/'.join(self.parts + (name,))}, found {len(hits)} ({hits[:3]})")
        return self.weights[hits[0]]

    def get(self, name):
        return self._find({"ff1_kernel": "ff1_weight", "ff2_kernel": "ff2_weight"}.get(name, name))

    def of(self, kind):
        return self

    def inner(self):
        return self

    def cell(self):
        return self

    def lstm(self):
        return _TfView(self.weights, self.parts + (_loose("mixed_memory_rnn"),))

    def inner_cell(self):
        return self

    def dense(self, name):
        return _TfView(self.weights, self.parts + (_loose(name),))

    def backbone(self):
        found = {int(m.group(1)) for k in self.weights if (m := re.search(r"(?:^|/)backbone(\d+)(?:_\d+)?/kernel:0$", k))}
        return [_TfView(self.weights, (_loose(f"backbone{i}"),)) for i in sorted(found)]

    def wired_layers(self):
        pattern = re.compile(r"wired_cf_c_cell(?:_\d+)?/(cf_c_cell(?:_\d+)?)/")
        scopes = {m.group(1) for k in self.weights if (m := pattern.search(k))}
        return [_TfView(self.weights, (_loose("wired_cf_c_cell"), re.escape(scope))) for scope in sorted(scopes, key=_suffix)]

    def ltc(self, names):
        return {name: self._find(name) for name in names}


# --- running the source, for verification ------------------------------------------------


def run_source(description: Description):
    """Runs the file in Keras (Keras 3 or tf.keras, in a subprocess with the environment that
    flavour needs): ``load_model`` when the reference can reload the file, else the model
    rebuilt with the reference classes and the file's weights loaded into it."""
    import os
    import subprocess
    import sys
    import tempfile

    from .verify import SourceUnavailable, named_results

    source = description.source
    legacy = source["framework"] == "tf.keras"

    def run(inputs):
        with tempfile.TemporaryDirectory() as folder:
            job = {
                "path": source["file"],
                "legacy": legacy,
                "full_model": source.get("full_model", True),
                "layers": source["keras_layers"],
                "input_size": np.asarray(inputs[0][0]).shape[-1],
                "input_shape": source.get("keras_input_shape"),
                "inputs": os.path.join(folder, "inputs.npz"),
                "outputs": os.path.join(folder, "outputs.npz"),
            }
            np.savez(job["inputs"], *[np.asarray(x) for x, _, _ in inputs])
            job_path = os.path.join(folder, "job.json")
            with open(job_path, "w") as handle:
                json.dump(job, handle, default=int)
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
            if legacy:
                env["TF_USE_LEGACY_KERAS"] = "1"
            else:
                env.pop("TF_USE_LEGACY_KERAS", None)
            code = "from ncps_mlx.converters.keras_reader import worker_main; worker_main()"
            done = subprocess.run([sys.executable, "-c", code, job_path], env=env, capture_output=True, text=True)
            if done.returncode == 3:
                raise SourceUnavailable(done.stderr.strip().splitlines()[-1])
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines() or ["(no output)"]
                raise ConversionError(f"running the Keras source failed: {lines[-1]}")
            results = np.load(job["outputs"])
            count = len(inputs)
            return [
                named_results(tuple(results[f"{i}_{j}"] for j in range(int(results[f"{i}_n"]))) if int(results[f"{i}_n"]) > 1 else results[f"{i}_0"])
                for i in range(count)
            ]

    return run


def worker_main():
    """Subprocess side of ``run_source``: loads or rebuilds the Keras model, runs the inputs."""
    import sys

    with open(sys.argv[1]) as handle:
        job = json.load(handle)
    try:
        if job["legacy"]:
            import tensorflow as tf
            import ncps.tf as flavour

            keras = tf.keras
        else:
            import keras
            import ncps.keras as flavour
    except ImportError as error:
        print(f"verifying a {'tf.keras' if job['legacy'] else 'Keras 3'} file needs TensorFlow and ncps "
              f"(pip install 'ncps-mlx[tf]'): {error}", file=sys.stderr)
        sys.exit(3)
    custom = {name: getattr(flavour, name) for name in ("CfC", "LTC", "CfCCell", "LTCCell", "WiredCfCCell", "MixedMemoryRNN")}
    model = None
    if job["full_model"]:
        try:
            model = keras.models.load_model(job["path"], custom_objects=custom, compile=False)
        except Exception:  # the reference cannot reload every file it writes (reference-notes point 9)
            model = None
    if model is None:
        model = _rebuild(job, keras, flavour)
        path = Path(job["path"])
        model.load_weights(str(path / "variables" / "variables") if path.is_dir() else str(path))
    data = np.load(job["inputs"])
    results = {}
    for i in range(len(data.files)):
        out = model(data[f"arr_{i}"])
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        results[f"{i}_n"] = np.array(len(outs))
        for j, value in enumerate(outs):
            results[f"{i}_{j}"] = np.asarray(value)
    np.savez(job["outputs"], **results)


def _rebuild(job, keras, flavour):
    """The model from its layer configs, with the reference's own layer classes."""
    shape = job.get("input_shape") or [None, job["input_size"]]
    layers = [keras.Input(tuple(shape))]
    for layer in job["layers"]:
        kind, cfg = layer["class_name"], dict(layer["config"])
        if kind in NCPS_LAYERS:
            units = cfg.pop("units")
            if isinstance(units, dict):
                units = reference_wiring(units)
            cfg.pop("wiring", None)
            cfg.pop("name", None)
            if kind == "LTC":
                for key in ("mode", "activation", "backbone_units", "backbone_layers", "backbone_dropout"):
                    cfg.pop(key, None)
            elif isinstance(units, int) is False:
                for key in ("backbone_units", "backbone_layers", "backbone_dropout"):
                    cfg.pop(key, None)
            layers.append(getattr(flavour, kind)(units, **{k: v for k, v in cfg.items() if k != "class"}))
        elif kind == "TimeDistributed":
            layers.append(keras.layers.TimeDistributed(keras.layers.deserialize(cfg["layer"])))
        else:
            layers.append(getattr(keras.layers, kind).from_config(cfg))
    return keras.Sequential(layers)
