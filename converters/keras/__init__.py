"""Reader for Keras models with ncps layers, with h5py and json only: ncps.keras (Keras 3),
ncps.tf (tf.keras, also as old as ncps 0.0.x) and keras-ncp 2.x cells in Keras's ``RNN``.

``files`` opens each container (``.keras``, legacy ``.h5``, weights-only ``.h5``/``.weights.h5``,
SavedModel), ``weights`` answers for each weight layout, ``topology`` reads the saved graph, and
each layer kind is one registered converter (``layers`` for Keras's own, ``ncps_layers`` for the
recurrent ones). The model becomes an ``ncps_mlx.Graph`` description. Lambda layers and classes
from outside Keras and the ncps packages are refused by name; nothing a config names is imported.
``reference`` runs the source in Keras for verification.
"""

from __future__ import annotations

from pathlib import Path

from .. import formats
from ..description import Checkpoint, ConversionError, Description, sha256_of
from . import layers as _layers  # noqa: F401  (registers Keras's layer converters)
from .files import open_keras_file
from .ncps_layers import source_layer
from .reference import run_source, run_sources  # noqa: F401
from .registry import KerasLayer, class_of, convert
from .topology import entry_name, outputs, topology

NAME = "keras"
SUFFIXES = (".keras", ".h5")


def sniff(path: Path) -> bool:
    kind = formats.kind_of(path)
    if kind == "directory":
        return (Path(path) / "saved_model.pb").exists()
    if kind == "zip":
        names = formats.zip_names(path)
        return Path(path).suffix == ".keras" if names is None else "config.json" in names
    return kind == "hdf5"


def read(path, config: dict | None = None, trust_pickle: bool = False) -> Checkpoint:
    """``config`` (from --config) is needed only for weights-only files: the Keras model config
    (``model.to_json()``, whatever package wrote it, or a hand-written ``{"class_name":
    "Sequential", "config": {"layers": [...]}}``). Any file also accepts ``{"wirings": {layer
    name: wiring}}`` for wirings the file cannot record (an NCP whose config lost its seed)."""
    with formats.parsed_by(path, "Keras file", "h5py", "zipfile"):
        return _read(Path(path), config)


def _read(path: Path, config: dict | None) -> Checkpoint:
    config = dict(config or {})
    wiring_overrides = config.pop("wirings", {})
    opened = open_keras_file(path)
    model_config = opened.model_config
    if model_config is None:
        if not config:
            raise ConversionError(
                f"{path} holds weights only ({opened.file_format}); give the Keras model config with --config "
                '(e.g. {"class_name": "Sequential", "config": {"layers": [{"class_name": "CfC", "config": '
                '{"units": 16, "return_sequences": true}}]}})'
            )
        model_config = config if "class_name" in config else {"class_name": "Sequential", "config": config}
    elif config:
        raise ConversionError(f"{path} carries its own model config; --config may only give 'wirings'")

    graph = topology(model_config)
    names = [entry_name(entry) or f"layer {index}" for index, entry in enumerate(graph["layers"])]
    arrays, specs = {}, []
    for index, entry in enumerate(graph["layers"]):
        name = names[index]
        where = f"layer {name!r} ({entry['class_name']})"
        kind = class_of(entry, where)
        view = opened.weights.layer(name, entry.get("_weights_group") or name, index, names)
        layer = KerasLayer(kind, entry.get("config", {}), view, f"layer {name!r} ({kind})", {"wiring": wiring_overrides.get(name)})
        spec, layer_arrays = convert(layer)
        specs.append(spec)
        arrays.update({f"layers.{index}.{k}": v for k, v in layer_arrays.items()})
    chain = model_config.get("class_name") == "Sequential"
    renamed = getattr(opened.weights, "renamed", [])
    source = {
        "reader": NAME,
        "framework": opened.framework,
        "format": opened.file_format,
        "file": str(path),
        "sha256": sha256_of(path),
    }
    if renamed:
        source["renamed_layers"] = ", ".join(f"{ours} = {theirs}" for ours, theirs in renamed)
    policies = sorted(_policies(model_config) - {"float32"})
    if policies:  # mixed precision keeps float32 variables; only the compute was half precision
        source["stored_dtype"] = f"float32 (Keras dtype policy {', '.join(policies)})"
    packages = _packages(model_config)
    if packages:
        source["written_by"] = ", ".join(sorted(packages))
        source["verified_with"] = "today's ncps.tf classes, which compute the same cells"
    description = Description(
        config={"class": "Graph", "inputs": graph["inputs"], "layers": specs, "calls": graph["calls"],
                "outputs": outputs(graph, specs)},
        arrays=arrays,
        source={
            **source,
            # The model can be rebuilt with the reference's classes where it cannot reload the file.
            "keras_layers": [source_layer(entry, spec) for entry, spec in zip(graph["layers"], specs)],
            "keras_chain": chain,
            "full_model": model_config is not config,
            "keras_config": model_config,
            "module": "",
        },
    )
    return Checkpoint(modules={"": description}, source=source)


def _objects(value):
    """Every JSON object in a config, depth first."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _objects(item)
    elif isinstance(value, list):
        for item in value:
            yield from _objects(item)


def _policies(model_config) -> set:
    """The dtype policies a config names (Keras 3: DTypePolicy objects; tf.keras: Policy)."""
    return {str(o["config"].get("name")) for o in _objects(model_config)
            if str(o.get("class_name", "")).endswith("Policy") and isinstance(o.get("config"), dict)}


def _packages(model_config) -> set:
    """The older packages a config shows: "keras-ncp 2.x" (its module ``kerasncp``, its registered
    ``Custom>`` cells) or "ncps 0.0.x" (a wiring's matrices as numpy arrays, which tf.keras writes
    as ``__numpy__`` objects; ncps 1.0 writes lists)."""
    objects = list(_objects(model_config))
    if any(str(o.get("module") or "").startswith("kerasncp") or str(o.get("class_name", "")).startswith("Custom>") for o in objects):
        return {"keras-ncp 2.x"}
    if any(isinstance(o.get("adjacency_matrix"), dict) and o["adjacency_matrix"].get("class_name") == "__numpy__" for o in objects):
        return {"ncps 0.0.x"}
    return set()
