"""Reader for ``ncps.keras`` (Keras 3) and ``ncps.tf`` (tf.keras) models, with h5py and json only.

Formats: Keras 3 ``.keras`` archives (config.json + model.weights.h5), tf.keras full-model
``.h5`` files (``model_config`` attribute + ``model_weights``), weights-only ``.h5`` files of
either flavour (with the model config given as --config), and tf.keras SavedModel folders
(these need TensorFlow to read their variables). A ``Sequential`` or functional model (any
DAG of supported layers, several inputs and outputs) becomes an ``ncps_mlx.Graph`` that walks
the saved topology and returns the model's outputs in its order, Keras masks (Masking,
Embedding(mask_zero=True)) included. Lambda layers and classes from outside keras/ncps are
refused by name; nothing a config names is imported.

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


def sniff(path: Path) -> bool:
    kind = formats.kind_of(path)
    if kind == "directory":
        return (Path(path) / "saved_model.pb").exists()
    if kind == "zip":
        names = formats.zip_names(path)
        return Path(path).suffix == ".keras" if names is None else "config.json" in names
    return kind == "hdf5"


def read(path, config: dict | None = None, trust_pickle: bool = False) -> Checkpoint:
    with formats.parsed_by(path, "Keras file", "h5py", "zipfile"):
        return _read(path, config)


def _read(path, config: dict | None = None) -> Checkpoint:
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
            formats.check_zip_members(path, "Keras file")
            archive = zipfile.ZipFile(path)
            members = {info.filename: info for info in archive.infolist()}
            for member in ("config.json", "model.weights.h5"):
                if member not in members:
                    raise ConversionError(f"{path}: a .keras archive without {member}")
            if members["config.json"].file_size > formats.MAX_JSON_BYTES:
                raise ConversionError(f"{path}: its config.json would be {members['config.json'].file_size / 2**20:.0f} MiB; a model config is a few KB")
            model_config = formats.load_json(archive.read("config.json"), f"{path}: its config.json")
            weights = _Keras3Weights(_checked_hdf5(h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")))
            file_format, framework = "Keras 3 .keras archive", "keras"
        else:
            handle = _checked_hdf5(h5py.File(path, "r"))
            if "model_config" in handle.attrs:
                raw = handle.attrs["model_config"]
                model_config = formats.load_json(raw, f"{path}: its model_config attribute")
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
    except (zipfile.BadZipFile, KeyError, OSError, RuntimeError, json.JSONDecodeError) as error:
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

    topology = _topology(model_config)
    arrays, specs = {}, []
    for index, (spec, layer_arrays) in enumerate(_convert_layers(topology["layers"], weights, wiring_overrides)):
        specs.append(spec)
        arrays.update({f"layers.{index}.{k}": v for k, v in layer_arrays.items()})
    graph = {"class": "Graph", "inputs": topology["inputs"], "layers": specs, "calls": topology["calls"],
             "outputs": _outputs(topology, specs)}  # fmt: skip
    chain = model_config.get("class_name") == "Sequential"
    description = Description(
        config=graph,
        arrays=arrays,
        source={
            "reader": NAME,
            "framework": framework,
            "format": file_format,
            "file": str(path),
            "sha256": sha256_of(path),
            # The model can be rebuilt with the reference's classes where it cannot reload the file.
            "keras_layers": [_source_layer(layer, spec) for layer, spec in zip(topology["layers"], specs)],
            "keras_chain": chain,
            "full_model": model_config is not config,
            "keras_config": model_config,
            "module": "",
        },
    )
    source = {k: description.source[k] for k in ("reader", "framework", "format", "file", "sha256")}
    return Checkpoint(modules={"": description}, source=source)


# --- the saved topology ----------------------------------------------------------------------

SEQUENTIAL, FUNCTIONAL = ("Sequential",), ("Functional", "Model")


def _topology(model_config: dict) -> dict:
    """{"inputs", "layers" (Keras layer entries), "calls", "outputs" (refs or None for a chain)}."""
    kind = model_config.get("class_name") if isinstance(model_config, dict) else None
    config = model_config.get("config", {}) if isinstance(model_config, dict) else {}
    if kind not in SEQUENTIAL + FUNCTIONAL:
        raise ConversionError(f"top-level object is a {kind}, not a Sequential or functional Keras model")
    entries = config.get("layers", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "class_name" in e for e in entries):
        raise ConversionError("the model config's 'layers' is not a list of layer entries")
    layers = _with_weight_groups([e for e in entries if e["class_name"] != "InputLayer"])
    if not layers:
        raise ConversionError("the model has no layers")
    if kind in SEQUENTIAL:
        declared = [e for e in entries if e["class_name"] == "InputLayer"] or layers[:1]
        calls = [{"layer": i, "inputs": [["input", 0] if i == 0 else [i - 1, 0]]} for i in range(len(layers))]
        return {"inputs": [{"name": "input", **_declared_input(declared[0].get("config", {}))}], "layers": layers,
                "calls": calls, "outputs": None}  # fmt: skip
    names = [_entry_name(e) for e in layers]
    mask_sources = {n for n, e in zip(names, layers) if e["class_name"] in ("NotEqual", "Any", "Masking", "Embedding")}
    input_names = [ref[0] for ref in _refs(config.get("input_layers", []))]
    by_name = {_entry_name(e): e for e in entries}
    if not input_names or any(n not in by_name for n in input_names):
        raise ConversionError(f"the functional model's input_layers {config.get('input_layers')} do not name its InputLayers")
    inputs = [{"name": n, **_declared_input(by_name[n].get("config", {}))} for n in input_names]
    produced = {(n, 0): ["input", k] for k, n in enumerate(input_names)}
    pending = [(i, k, refs) for i, entry in enumerate(layers) for k, refs in enumerate(_inbound(entry, names[i], mask_sources))]
    calls = []
    while pending:
        ready = [p for p in pending if all((r[0], r[1]) in produced for r in p[2])]
        if not ready:
            missing = sorted({f"{r[0]}[{r[1]}]" for p in pending for r in p[2] if (r[0], r[1]) not in produced})
            raise ConversionError(f"the functional model's layers read tensors no layer makes: {missing[:5]}")
        for item in ready:
            index, node, refs = item
            calls.append({"layer": index, "inputs": [_resolve(produced, r) for r in refs]})
            produced[(names[index], node)] = [len(calls) - 1]
            pending.remove(item)
    outputs = []
    for ref in _refs(config.get("output_layers", [])):
        if (ref[0], ref[1]) not in produced:
            raise ConversionError(f"the functional model's output {ref[0]!r} is not made by any of its layers")
        outputs.append({"name": ref[0] if ref[2] == 0 else f"{ref[0]}_{ref[2]}", "ref": _resolve(produced, ref)})
    return _needed({"inputs": inputs, "layers": layers, "calls": calls, "outputs": outputs})


def _needed(topology) -> dict:
    """The topology without the calls no output depends on (Keras 3 records the ops that
    compute a mask, NotEqual and Any, which the Graph computes itself), layers renumbered."""
    calls, needed = topology["calls"], set()
    stack = [o["ref"][0] for o in topology["outputs"] if o["ref"][0] != "input"]
    while stack:
        c = stack.pop()
        if c not in needed:
            needed.add(c)
            stack += [ref[0] for ref in calls[c]["inputs"] if ref[0] != "input"]
    kept = sorted(needed)
    new_call = {c: i for i, c in enumerate(kept)}
    layer_ids = list(dict.fromkeys(calls[c]["layer"] for c in kept))
    new_layer = {l: i for i, l in enumerate(layer_ids)}

    def moved(ref):
        return ref if ref[0] == "input" else [new_call[ref[0]], ref[1]]

    return {
        "inputs": topology["inputs"],
        "layers": [topology["layers"][l] for l in layer_ids],
        "calls": [{"layer": new_layer[calls[c]["layer"]], "inputs": [moved(r) for r in calls[c]["inputs"]]} for c in kept],
        "outputs": [{**o, "ref": moved(o["ref"])} for o in topology["outputs"]],
    }


def _with_weight_groups(layers: list) -> list:
    """Each entry with the name of its group in a Keras 3 weights file (``_weights_group``):
    Keras numbers the groups per class in the order of all the model's layers, so this is
    counted before any layer is left out."""
    counters: dict[str, int] = {}
    named = []
    for entry in layers:
        snake = _snake(str(entry["class_name"]).rpartition(">")[2])
        counters[snake] = counters.get(snake, -1) + 1
        named.append({**entry, "_weights_group": snake if counters[snake] == 0 else f"{snake}_{counters[snake]}"})
    return named


def _entry_name(entry: dict) -> str:
    return entry.get("name") or entry.get("config", {}).get("name")


def _refs(value) -> list:
    """input_layers / output_layers: [[name, node, tensor], ...], or a single [name, node, tensor]."""
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, list) and len(v) >= 3 for v in value):
        raise ConversionError(f"cannot read the functional model's input/output layers {value!r}")
    return [(str(v[0]), int(v[1]), int(v[2])) for v in value]


def _resolve(produced, ref):
    source = produced[(ref[0], ref[1])]
    return source if source[0] == "input" else [source[0], ref[2]]


def _inbound(entry: dict, name: str, mask_sources=frozenset()) -> list:
    """Per call of the layer, the (layer, node, tensor) it reads, in both flavours' formats.
    ``mask_sources``: the layers a Keras 3 ``mask=`` tensor may come from (the Graph
    recomputes that mask)."""
    calls = []
    for node in entry.get("inbound_nodes", []):
        if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}} holding __keras_tensor__s
            refs, keyword_tensors, mask = [], [], []
            _keras_tensors(node.get("args", []), refs)
            kwargs = dict(node.get("kwargs", {}))
            # Keras 3 writes the mask Masking/Embedding(mask_zero) makes as an explicit tensor;
            # the Graph computes the same one itself.
            _keras_tensors(kwargs.pop("mask", None), mask)
            if any(r[0] not in mask_sources for r in mask):
                raise ConversionError(f"layer {name!r} is called with a mask= tensor of its own; only the masks of Masking and Embedding(mask_zero=True) are supported")
            _keras_tensors(kwargs, keyword_tensors)
        else:  # tf.keras: [[layer, node, tensor, kwargs], ...]
            refs = [tuple(item[:3]) for item in node]
            keyword_tensors = [key for item in node if len(item) > 3 for key in item[3] if key != "training"]
        if keyword_tensors:
            raise ConversionError(
                f"layer {name!r} is called with tensors as keyword arguments (initial_state, mask, ...); "
                "only positional inputs are supported"
            )
        calls.append([(str(r[0]), int(r[1]), int(r[2])) for r in refs])
    return calls


def _keras_tensors(value, found) -> None:
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            found.append(tuple(value["config"]["keras_history"]))
            return
        for item in value.values():
            _keras_tensors(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _keras_tensors(item, found)


def _declared_input(config: dict) -> dict:
    """{"shape": [...] without the batch axis, None where free, "dtype"} of an InputLayer."""
    shape = config.get("batch_shape") or config.get("batch_input_shape")
    if isinstance(shape, dict):  # tf.keras SavedModel metadata: {"class_name": "__tuple__", "items": [...]}
        shape = shape.get("items")
    dtype = config.get("dtype", "float32")
    dtype = dtype if isinstance(dtype, str) else "float32"
    return {"shape": list(shape[1:]) if shape else None, "dtype": dtype}


def _output_count(spec: dict) -> int:
    if spec["type"] == "RNN" and spec["return_state"]:
        return 3 if spec["model"]["mixed_memory"] else 2
    if spec["type"] == "Bidirectional" and spec["return_state"]:
        return 1 + 2 * (2 if spec["forward"]["mixed_memory"] else 1)
    return 1


def _outputs(topology, specs) -> list:
    """A chain returns all its last layer's tensors: the output, then any states."""
    if topology["outputs"] is not None:
        for output in topology["outputs"]:
            ref = output["ref"]
            if ref[0] != "input" and ref[1] >= _output_count(specs[topology["calls"][ref[0]]["layer"]]):
                raise ConversionError(f"output {output['name']!r} reads a tensor its layer does not make")
        return topology["outputs"]
    count = _output_count(specs[-1])
    names = ["output"] + [f"state_{i}" for i in range(count - 1)]
    return [{"name": name, "ref": [len(specs) - 1, j]} for j, name in enumerate(names)]


def _source_layer(layer: dict, spec: dict) -> dict:
    """What the verification worker needs to rebuild a layer with the reference classes."""
    kind = layer["class_name"].split(">")[-1]
    if kind in NCPS_LAYERS:
        options = _options(kind, layer["config"])
        options = {k: v for k, v in options.items() if k not in ("cell", "name", "trainable", "dtype", "time_major")}
        options["units"] = spec["model"]["units"] if isinstance(options.get("units"), dict) else options.get("units")
        options["activation"] = _activation_name(options.get("activation", "lecun_tanh"))
        for key in ("sparsity_mask", "stateful", "unroll", "fully_recurrent"):
            options.pop(key, None)
        return {"class_name": kind, "config": options, "name": _entry_name(layer)}
    return {"class_name": kind, "config": layer["config"], "name": _entry_name(layer)}


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


# Keras layer -> ncps_mlx.layers type. Dropout-likes are the identity at inference.
IDENTITY_LAYERS = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
                   "GaussianDropout", "AlphaDropout", "ActivityRegularization")  # fmt: skip
MERGE_LAYERS = ("Concatenate", "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
SHAPE_LAYERS = ("Flatten", "Reshape", "Permute", "RepeatVector")
ACTIVATION_LAYERS = ("Activation", "ReLU", "LeakyReLU", "ELU", "Softmax")
MASK_LAYERS = ("Masking",)
WEIGHTED_LAYERS = ("Dense", "Conv1D", "Conv2D", "BatchNormalization", "LayerNormalization", "Normalization", "Embedding")
POOLING_LAYERS = ("MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D", "GlobalAveragePooling1D",
                  "GlobalAveragePooling2D", "GlobalMaxPooling1D", "GlobalMaxPooling2D")  # fmt: skip
PLAIN_LAYERS = WEIGHTED_LAYERS + POOLING_LAYERS + SHAPE_LAYERS + ACTIVATION_LAYERS + IDENTITY_LAYERS + MERGE_LAYERS + MASK_LAYERS
WRAPPERS = ("TimeDistributed", "Bidirectional")
SUPPORTED = NCPS_LAYERS + WRAPPERS + PLAIN_LAYERS
REFUSED = {
    "Lambda": "a Lambda layer is Python code; it is never deserialised or run. Rebuild the model with a supported layer in its place",
}


def _layer_kind(entry: dict, where: str) -> str:
    """The Keras class of a layer entry; custom classes are refused by name, never imported."""
    kind = entry["class_name"]
    module = entry.get("module")
    package, _, kind = kind.rpartition(">")  # tf.keras writes registered classes as "package>Class"
    custom = (package and package != "ncps") or (module is not None and not str(module).startswith(("keras", "ncps")))
    if kind in REFUSED:
        raise ConversionError(f"{where}: {REFUSED[kind]}")
    if custom or kind not in SUPPORTED:
        origin = f" from {module or package}" if custom else ""
        raise ConversionError(
            f"{where}: unsupported layer type{origin}; supported: {', '.join(SUPPORTED)} and InputLayer"
        )
    return kind


def _convert_layers(layers, weights, wiring_overrides):
    """[(layer spec of ncps_mlx.layers, arrays in the layer's names)]."""
    converted = []
    for position, layer in enumerate(layers):
        cfg = layer.get("config", {})
        name = cfg.get("name") or _entry_name(layer) or f"layer {position}"
        kind = _layer_kind(layer, f"layer {name!r} ({layer['class_name']})")
        group_name = layer.get("_weights_group") or name
        where = f"layer {name!r} ({kind})"
        view = weights.layer(name, group_name, position)
        converted.append(_convert_layer(kind, cfg, view, where, wiring_overrides.get(name)))
    return converted


def _convert_layer(kind, cfg, view, where, wiring=None):
    if kind in NCPS_LAYERS:
        cfg = _options(kind, cfg)
        if wiring is not None:
            cfg = {**cfg, "units": wiring}
        return _ncps_layer(kind, cfg, view, where)
    if kind == "Bidirectional":
        return _bidirectional(cfg, view, where)
    if kind == "TimeDistributed":
        inner = cfg["layer"]
        inner_kind = _layer_kind(inner, f"{where}'s inner layer")
        if inner_kind in NCPS_LAYERS + WRAPPERS:
            raise ConversionError(f"{where}: TimeDistributed({inner_kind}) is not supported")
        spec, arrays = _plain_layer(inner_kind, inner.get("config", {}), view.inner(), where)
        if inner_kind == "Dense":  # a Dense maps the last axis already
            return spec, arrays
        return {"type": "TimeDistributed", "layer": spec}, {f"layer.{k}": v for k, v in arrays.items()}
    return _plain_layer(kind, cfg, view, where)


def _bidirectional(cfg, view, where):
    inner = cfg["layer"]
    kind = _layer_kind(inner, f"{where}'s layer")
    if kind not in NCPS_LAYERS:
        raise ConversionError(f"{where}: Bidirectional({kind}) is not supported; only Bidirectional(CfC|LTC)")
    merge_mode = cfg.get("merge_mode", "concat")
    if merge_mode not in ("concat", "sum", "mul", "ave"):
        raise ConversionError(f"{where}: merge_mode={merge_mode!r} is not supported; use concat, sum, mul or ave")
    backward_cfg = cfg.get("backward_layer") or inner
    halves = {}
    for half, entry in (("forward", inner), ("backward", backward_cfg)):
        options = {**_options(kind, entry["config"]), "go_backwards": False}
        spec, arrays = _ncps_layer(kind, options, view.half(half), f"{where} ({half})")
        halves[half] = (spec["model"], {f"{half}.{k}": v for k, v in arrays.items()})
    spec = {
        "type": "Bidirectional",
        "forward": halves["forward"][0],
        "backward": halves["backward"][0],
        "merge_mode": merge_mode,
        "return_state": bool(_options(kind, inner["config"]).get("return_state", False)),
        "zero_output_for_mask": bool(_options(kind, inner["config"]).get("zero_output_for_mask", False)),
    }
    return spec, {**halves["forward"][1], **halves["backward"][1]}


def _snake(name: str) -> str:
    # keras.src.utils.naming.to_snake_case: how Keras 3 names layer groups in weight files.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _channels_last(cfg, where):
    if cfg.get("data_format") not in (None, "channels_last"):
        raise ConversionError(f"{where}: data_format={cfg['data_format']!r} is not supported; only channels_last")


def _ints(value, rank):
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * rank


def _plain_layer(kind, cfg, view, where):
    if kind in IDENTITY_LAYERS:
        return {"type": "Identity", "kind": kind}, {}
    if kind == "Masking":
        return {"type": "Masking", "mask_value": float(cfg.get("mask_value", 0.0))}, {}
    if kind in MERGE_LAYERS:
        spec = {"type": "Merge", "kind": kind}
        if kind == "Concatenate":
            spec["axis"] = int(cfg.get("axis", -1))
        return spec, {}
    if kind == "Dense":
        values = view.named(["kernel", "bias"] if cfg.get("use_bias", True) else ["kernel"])
        kernel = values["kernel"]
        spec = {
            "type": "Dense",
            "in_features": int(kernel.shape[0]),
            "units": int(kernel.shape[1]),
            "activation": _checked_activation(cfg.get("activation"), where),
            "use_bias": bool(cfg.get("use_bias", True)),
        }
        arrays = {"linear.weight": kernel.T}
        if spec["use_bias"]:
            arrays["linear.bias"] = values["bias"]
        return spec, arrays
    if kind in ("Conv1D", "Conv2D"):
        _channels_last(cfg, where)
        if int(cfg.get("groups", 1)) != 1:
            raise ConversionError(f"{where}: grouped convolutions (groups={cfg['groups']}) are not supported")
        use_bias = bool(cfg.get("use_bias", True))
        values = view.named(["kernel", "bias"] if use_bias else ["kernel"])
        kernel = values["kernel"]  # Keras (*kernel, in, filters)
        rank = kernel.ndim - 2
        strides, dilation = _ints(cfg.get("strides", 1), rank), _ints(cfg.get("dilation_rate", 1), rank)
        if any(s != 1 for s in strides) and any(d != 1 for d in dilation):
            raise ConversionError(f"{where}: strides and dilation_rate both above 1 is not something Keras allows")
        spec = {
            "type": "Conv",
            "in_channels": int(kernel.shape[-2]),
            "filters": int(kernel.shape[-1]),
            "kernel_size": list(kernel.shape[:rank]),
            "strides": strides,
            "padding": str(cfg.get("padding", "valid")).lower(),
            "dilation_rate": dilation,
            "activation": _checked_activation(cfg.get("activation"), where),
            "use_bias": use_bias,
        }
        if spec["padding"] not in ("valid", "same", "causal") or (spec["padding"] == "causal" and rank != 1):
            raise ConversionError(f"{where}: padding={spec['padding']!r} is not supported")
        arrays = {"weight": np.transpose(kernel, (rank + 1, *range(rank), rank))}  # MLX (filters, *kernel, in)
        if use_bias:
            arrays["bias"] = values["bias"]
        return spec, arrays
    if kind in POOLING_LAYERS:
        _channels_last(cfg, where)
        rank = int(kind[-2])
        reduce = "max" if "Max" in kind else "average"
        if kind.startswith("Global"):
            return {"type": "GlobalPooling", "kind": reduce, "rank": rank, "keepdims": bool(cfg.get("keepdims", False))}, {}
        pool = _ints(cfg.get("pool_size", 2), rank)
        strides = _ints(cfg.get("strides") or pool, rank)
        padding = str(cfg.get("padding", "valid")).lower()
        if padding not in ("valid", "same"):
            raise ConversionError(f"{where}: padding={padding!r} is not supported")
        return {"type": "Pooling", "kind": reduce, "pool_size": pool, "strides": strides, "padding": padding}, {}
    if kind in ("BatchNormalization", "LayerNormalization"):
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if not isinstance(axis, int):
            raise ConversionError(f"{where}: axis={cfg.get('axis')} is not supported; one axis only")
        if cfg.get("rms_scaling"):
            raise ConversionError(f"{where}: rms_scaling=True is not supported")
        center, scale = bool(cfg.get("center", True)), bool(cfg.get("scale", True))
        names = (["gamma"] if scale else []) + (["beta"] if center else [])
        if kind == "BatchNormalization":
            names += ["moving_mean", "moving_variance"]
        values = view.named(names)
        features = int(next(iter(values.values())).size)
        spec = {"type": kind, "features": features, "epsilon": float(cfg.get("epsilon", 1e-3)), "center": center, "scale": scale}
        if axis != -1:
            # tf.keras records the axis as a positive index, in a rank known when it is called.
            spec["axis"] = int(axis)
        return spec, {k: v.reshape(-1) for k, v in values.items()}
    if kind == "Embedding":
        table = view.named(["embeddings"])["embeddings"]
        spec = {"type": "Embedding", "input_dim": int(table.shape[0]), "output_dim": int(table.shape[1])}
        return {**spec, "mask_zero": bool(cfg.get("mask_zero", False))}, {"embeddings": table}
    if kind == "Normalization":
        values = view.named(["mean", "variance"])
        mean, variance = values["mean"], values["variance"]
        spec = {"type": "Normalization", "features": int(mean.size)}
        return spec, {"mean": mean.reshape(-1), "variance": variance.reshape(-1)}
    if kind == "Flatten":
        _channels_last(cfg, where)
        return {"type": "Flatten"}, {}
    if kind == "Reshape":
        return {"type": "Reshape", "target_shape": [int(v) for v in cfg["target_shape"]]}, {}
    if kind == "Permute":
        return {"type": "Permute", "dims": [int(v) for v in cfg["dims"]]}, {}
    if kind == "RepeatVector":
        return {"type": "RepeatVector", "n": int(cfg["n"])}, {}
    if kind == "Activation":
        return {"type": "Activation", "activation": _checked_activation(cfg.get("activation"), where)}, {}
    if kind == "ReLU":
        max_value = cfg.get("max_value")
        return {"type": "ReLU", "max_value": None if max_value is None else float(max_value),
                "negative_slope": float(cfg.get("negative_slope", 0.0)), "threshold": float(cfg.get("threshold", 0.0))}, {}  # fmt: skip
    if kind == "LeakyReLU":  # Keras 3 calls it negative_slope, tf.keras alpha
        return {"type": "LeakyReLU", "negative_slope": float(cfg.get("negative_slope", cfg.get("alpha", 0.3)))}, {}
    if kind == "ELU":
        return {"type": "ELU", "alpha": float(cfg.get("alpha", 1.0))}, {}
    if kind == "Softmax":
        axis = cfg.get("axis", -1)
        return {"type": "Softmax", "axis": int(axis[0] if isinstance(axis, list) else axis)}, {}
    raise ConversionError(f"{where}: unsupported layer {kind!r}")


def _checked_activation(value, where):
    from ncps_mlx.layers import ACTIVATIONS

    name = _activation_name(value)
    if name not in ACTIVATIONS:
        raise ConversionError(f"{where}: unsupported activation {name!r}; supported: {sorted(k for k in ACTIVATIONS if k)}")
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
    keys = ("return_sequences", "return_state", "go_backwards", "stateful", "unroll", "zero_output_for_mask")
    options = {k: cfg[k] for k in keys if k in cfg}
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
        "zero_output_for_mask": bool(cfg.get("zero_output_for_mask", False)),
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


# A weight dataset larger than this and larger than its stored bytes allow is refused before
# it is read: HDF5 declares shapes freely, and an unwritten chunked dataset reads as fill values.
MAX_DATASET_BYTES = 2**30


def _checked_hdf5(handle):
    """The open file, every object's attributes and every dataset's shape and dtype read once:
    a damaged HDF5 file fails here, inside the reader's error handling, not at a lazy read later."""

    def touch(name, item):
        for key in item.attrs:
            item.attrs[key]
        if hasattr(item, "shape"):
            item.shape, item.dtype, item.id.get_storage_size()

    for key in handle.attrs:
        handle.attrs[key]
    handle.visititems(touch)
    return handle


def _array(dataset) -> np.ndarray:
    if not (hasattr(dataset, "shape") and hasattr(dataset, "dtype") and hasattr(dataset, "id")):
        raise ConversionError(f"HDF5 object {getattr(dataset, 'name', '?')} is a {type(dataset).__name__}, not a weight dataset")
    declared = int(np.prod(dataset.shape, dtype=object)) * dataset.dtype.itemsize
    stored = dataset.id.get_storage_size()
    if declared > MAX_DATASET_BYTES and declared > 16 * stored:
        raise ConversionError(
            f"weight {dataset.name} declares shape {tuple(dataset.shape)} ({declared / 2**30:.3g} GiB) with "
            f"{stored} bytes stored: not a weight of a real model"
        )
    if dataset.dtype.kind not in "fiu":
        raise ConversionError(f"weight {dataset.name} has dtype {dataset.dtype}, not a number")
    try:
        return np.asarray(dataset[()], dtype=np.float32)
    except (OSError, RuntimeError) as error:
        raise ConversionError(f"weight {dataset.name}: corrupt HDF5 data ({str(error).splitlines()[0]})") from None


class _Keras3Weights:
    """Keras 3 ``model.weights.h5``: groups by attribute path, variables by creation order."""

    def __init__(self, handle):
        self.handle = handle

    def layer(self, config_name, group_name, position):
        root = self.handle["layers"] if "layers" in self.handle else self.handle["_layer_checkpoint_dependencies"]
        if group_name not in root:  # an error once a weight is asked for: weightless layers need none
            return _K3View(None, missing=f"weights for layer {config_name!r} not found (expected group layers/{group_name})")
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

    def __init__(self, group, kind=None, missing=None):
        self.group = group
        self.kind = kind
        self.missing = missing

    def of(self, kind):
        return _K3View(self.group, kind, self.missing)

    def _vars(self):
        if self.group is None:
            raise ConversionError(self.missing)
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

    def named(self, names):
        """The first variables, by creation order, under these names (a Normalization's count
        comes after its mean and variance)."""
        variables = self._vars()
        if len(variables) < len(names):
            raise ConversionError(f"{self.group.name}: {len(variables)} variables, expected {len(names)} ({names})")
        return dict(zip(names, variables))

    def half(self, which):
        key = f"{which}_layer"
        if key not in self.group:
            raise ConversionError(f"{self.group.name}: no {key} weights")
        return _K3View(self.group[key])


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

    named = ltc

    def half(self, which):
        return _TfView({k: v for k, v in self.weights.items() if re.search(rf"(?:^|/){which}_", k)}, self.parts)


# --- running the source, for verification ------------------------------------------------


def run_source(description: Description):
    """Runs the file in Keras (Keras 3 or tf.keras, in a subprocess with the environment that
    flavour needs): ``load_model`` when the reference can reload the file, else the model
    rebuilt with the reference classes and the file's weights loaded into it."""
    return lambda inputs: run_sources([(description, inputs)])[0]


def run_sources(pairs):
    """Several ``(description, inputs)`` of one flavour in one subprocess, so that TensorFlow
    and Keras start once (~5 s each time): per pair, the results of ``run_source``."""
    import os
    import subprocess
    import sys
    import tempfile

    from .verify import SourceUnavailable, graph_results

    flavours = {description.source["framework"] for description, _ in pairs}
    if len(flavours) != 1:
        raise ValueError(f"run_sources takes sources of one flavour, got {sorted(flavours)}")
    legacy = flavours == {"tf.keras"}
    with tempfile.TemporaryDirectory() as folder:
        jobs = []
        for n, (description, inputs) in enumerate(pairs):
            source = description.source
            job = {
                "path": source["file"],
                "legacy": legacy,
                "full_model": source.get("full_model", True),
                "layers": source["keras_layers"],
                "chain": source.get("keras_chain", True),
                "graph": {k: description.config[k] for k in ("inputs", "calls", "outputs")},
                "input_shape": description.config["inputs"][0]["shape"],
                "input_size": np.asarray(inputs[0][0][0]).shape[-1],
                "cases": len(inputs),
                "inputs_per_case": len(inputs[0][0]),
                "inputs": os.path.join(folder, f"inputs_{n}.npz"),
                "outputs": os.path.join(folder, f"outputs_{n}.npz"),
            }
            np.savez(job["inputs"], **{f"{i}_{k}": np.asarray(x) for i, (xs, _, _) in enumerate(inputs) for k, x in enumerate(xs)})
            jobs.append(job)
        job_path = os.path.join(folder, "jobs.json")
        with open(job_path, "w") as handle:
            json.dump({"jobs": jobs}, handle, default=int)
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
        answers = []
        for (description, inputs), job in zip(pairs, jobs):
            names = [o["name"] for o in description.config["outputs"]]
            results = np.load(job["outputs"])
            count = lambda i: int(results[f"{i}_n"])  # noqa: E731
            answers.append([graph_results(names, [results[f"{i}_{j}"] for j in range(count(i))]) for i in range(len(inputs))])
        return answers


def worker_main():
    """Subprocess side of ``run_sources``: per job, loads or rebuilds the Keras model and runs
    its inputs."""
    import sys

    with open(sys.argv[1]) as handle:
        jobs = json.load(handle)["jobs"]
    legacy = jobs[0]["legacy"]
    try:
        if legacy:
            import tensorflow as tf
            import ncps.tf as flavour

            keras = tf.keras
        else:
            import keras
            import ncps.keras as flavour
    except ImportError as error:
        print(f"verifying a {'tf.keras' if legacy else 'Keras 3'} file needs TensorFlow and ncps "
              f"(pip install 'ncps-mlx[tf]'): {error}", file=sys.stderr)
        sys.exit(3)
    for job in jobs:
        _run_job(job, keras, flavour)


def _run_job(job, keras, flavour):
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
        if path.is_dir():
            model.load_weights(str(path / "variables" / "variables"))
        elif job["legacy"] and not job.get("chain", True):  # a rebuilt graph's layers, found by name
            model.load_weights(str(path), by_name=True)
        else:
            model.load_weights(str(path))
    data = np.load(job["inputs"])
    results = {}
    for i in range(job["cases"]):
        xs = [data[f"{i}_{k}"] for k in range(job["inputs_per_case"])]
        out = model(xs if len(xs) > 1 else xs[0])
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        results[f"{i}_n"] = np.array(len(outs))
        for j, value in enumerate(outs):
            results[f"{i}_{j}"] = np.asarray(value)
    np.savez(job["outputs"], **results)


def _rebuild(job, keras, flavour):
    """The model from its layer configs, with the reference's own layer classes: a Sequential
    for a chain (so a SavedModel's variables load in its order), else the functional graph."""
    if job.get("chain", True):
        shape = job.get("input_shape") or [None, job["input_size"]]
        return keras.Sequential([keras.Input(tuple(shape))] + [_reference_layer(layer, keras, flavour) for layer in job["layers"]])
    graph = job["graph"]
    inputs = [keras.Input(tuple(spec["shape"]), dtype=spec.get("dtype") or "float32", name=spec["name"]) for spec in graph["inputs"]]
    values = {("input", k): tensor for k, tensor in enumerate(inputs)}
    built = {}
    for c, call in enumerate(graph["calls"]):
        index = call["layer"]
        if index not in built:
            built[index] = _reference_layer(job["layers"][index], keras, flavour, named=True)
        args = [values[tuple(ref)] for ref in call["inputs"]]
        out = built[index](args if len(args) > 1 else args[0])
        for j, value in enumerate(out if isinstance(out, (list, tuple)) else [out]):
            values[(c, j)] = value
    outputs = [values[tuple(o["ref"])] for o in graph["outputs"]]
    return keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0])


def _reference_layer(layer, keras, flavour, named=False):
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
        if named and layer.get("name"):
            cfg["name"] = layer["name"]
        return getattr(flavour, kind)(units, **{k: v for k, v in cfg.items() if k != "class"})
    if kind == "TimeDistributed":
        return keras.layers.TimeDistributed(keras.layers.deserialize(cfg["layer"]), **({"name": cfg["name"]} if named else {}))
    if kind in NCPS_WRAPPED:
        custom = {name: getattr(flavour, name) for name in ("CfC", "LTC", "CfCCell", "LTCCell", "WiredCfCCell", "MixedMemoryRNN")}
        return keras.layers.deserialize({"class_name": kind, "config": cfg}, custom_objects=custom)
    return getattr(keras.layers, kind).from_config(cfg)


NCPS_WRAPPED = ("Bidirectional",)
