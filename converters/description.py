"""The neutral description every reader produces and every writer consumes.

A reader returns a ``Checkpoint``: what one file holds, as a set of named modules (each a
``Description``) plus every other tensor of the file, kept under its checkpoint name. A bare
ncps layer is one module named ``""``; a user's torch wrapper with ``self.seq_model = CfC(...)``
beside a static encoder and a head is a module ``"seq_model"`` and the tensor groups
``static_net.*`` and ``head.*``; a Keras model is one module (its whole graph).

A ``Description`` is a model config (``ncps_mlx.model_from_config`` input: ``{"class": ...,
constructor arguments}``, a wiring as ``ncps_mlx.wirings.describe`` writes it) plus named float32
arrays in ncps_mlx's names and layout, plus provenance and a record of where each config value
came from (the weights, the user's config, or a reference default). Nothing downstream of a
Description knows which file format it came from.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ncps_mlx import wirings

from . import modelfile
from ncps_mlx.models import MODEL_CLASSES, model_from_config

from .errors import ConversionError
from .formats import load_json


@dataclass
class Description:
    config: dict
    arrays: dict[str, np.ndarray]
    source: dict
    inferred: dict = field(default_factory=dict)  # config values read off the weights
    given: dict = field(default_factory=dict)  # config values from the user's config
    defaulted: dict = field(default_factory=dict)  # reference defaults, for what neither tells
    notes: list[str] = field(default_factory=list)
    # The module's tensors as the source framework names them, for running the source.
    source_arrays: dict = field(default_factory=dict, repr=False)

    @property
    def model_class(self) -> str:
        return self.config["class"]

    def build(self):
        """The MLX model with these weights, in eval mode."""
        import mlx.core as mx

        try:
            model = model_from_config(self.config)
        except ValueError as error:
            raise ConversionError(f"cannot build {self.model_class}: {error}") from None
        try:
            modelfile.check_arrays(model, self.arrays, where=self.source.get("file", "checkpoint"))
        except modelfile.ModelFileError as error:
            raise ConversionError(str(error)) from None
        # C-ordered copies: a transposed view gives the same values but another matmul path
        # (and rounding) than the same weights loaded back from a file. np.ascontiguousarray is
        # not enough: a (1, n) view of an (n, 1) kernel counts as contiguous and keeps its
        # strides, which MLX takes over (a Dense(1) head then differed by 4e-8 after a round trip).
        model.load_weights([(k, mx.array(np.array(v, order="C", copy=True))) for k, v in self.arrays.items()], strict=True)
        model.eval()
        return model


@dataclass
class Checkpoint:
    """One file's content: ``modules`` by name ("" for a bare layer), ``other`` tensors (of no
    ncps module, under the checkpoint's own names), provenance, and notes on what was done."""

    modules: dict[str, Description]
    source: dict
    other: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def module(self, name: str | None = None) -> Description:
        """The module called ``name``; with ``None``, the only one (an error if there are several)."""
        where = self.source.get("file", "the checkpoint")
        return self.modules[modelfile.pick_module(list(self.modules), name, where, error=ConversionError)]

    def other_groups(self) -> dict[str, list[str]]:
        """The other tensors by their first name component (``head.0.weight`` -> ``head``)."""
        groups: dict[str, list[str]] = {}
        for name in self.other:
            groups.setdefault(name.split(".", 1)[0], []).append(name)
        return groups


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    path = Path(path)
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(child.read_bytes())
        return digest.hexdigest()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_user_config(path) -> dict:
    """Read a ``--config`` JSON file: ``{"class": "CfC" | "LTC", ...constructor arguments}``."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"config file {path}: no such file")
    if path.stat().st_size > 64 * 2**20:
        raise ConversionError(f"config file {path} is over 64 MiB; a config is a few KB of JSON")
    config = load_json(path.read_bytes(), f"config file {path}")
    if not isinstance(config, dict):
        raise ConversionError(f"config file {path} must hold a JSON object, got {type(config).__name__}")
    return config


def check_config_keys(config: dict, model_class: str, where: str) -> None:
    """Every key must be a constructor argument of ``model_class`` (or "class")."""
    if model_class not in MODEL_CLASSES:
        raise ConversionError(f"{where}: unknown model class {model_class!r}; expected one of {sorted(MODEL_CLASSES)}")
    allowed = set(inspect.signature(MODEL_CLASSES[model_class]).parameters) | {"class"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ConversionError(
            f"{where}: unknown {model_class} option(s) {unknown}; valid options are {sorted(allowed - {'class'})}"
        )


def resolve_config(model_class: str, inferred: dict, given: dict, where: str):
    """Merge what the weights tell with what the user gave; defaults fill the rest.

    Returns (config, given_used, defaulted). A given value that contradicts the weights is an
    error naming both.
    """
    check_config_keys(given, model_class, where)
    if given.get("class", model_class) != model_class:
        raise ConversionError(
            f"{where} describes a {given['class']} but the checkpoint holds a {model_class} ({_evidence(model_class)})"
        )
    config = {"class": model_class}
    given_used, defaulted = {}, {}
    for name, parameter in inspect.signature(MODEL_CLASSES[model_class]).parameters.items():
        if name in inferred:
            # A wiring given as units was already checked against the masks by the reader.
            if name in given and not isinstance(inferred[name], dict) and given[name] != inferred[name]:
                raise ConversionError(
                    f"{where} says {name}={given[name]!r} but the weights are for {name}={inferred[name]!r}"
                )
            config[name] = inferred[name]
        elif name in given:
            config[name] = given[name]
        elif parameter.default is not inspect.Parameter.empty:
            config[name] = defaulted[name] = parameter.default
        else:
            raise ConversionError(f"{name} is not in the weights; give it in --config")
        if name in given:
            given_used[name] = given[name]
    return config, given_used, defaulted


def _evidence(model_class: str) -> str:
    return "it has rnn_cell.gleak" if model_class == "LTC" else "it has rnn_cell.ff1"


def cfc_layer_masks(wiring) -> list[np.ndarray]:
    """Per wiring layer, the signed (inputs + units, units) mask a wired CfC layer applies:
    the adjacency from the previous layer (the sensory one for layer 0), then all-ones for
    the layer's own recurrence."""
    masks = []
    for layer_id in range(wiring.num_layers):
        neurons = wiring.get_neurons_of_layer(layer_id)
        if layer_id == 0:
            block = wiring.sensory_adjacency_matrix[:, neurons]
        else:
            block = wiring.adjacency_matrix[:, neurons][wiring.get_neurons_of_layer(layer_id - 1), :]
        masks.append(np.concatenate([block, np.ones((len(neurons), len(neurons)))], axis=0).astype(np.float32))
    return masks


def wiring_masks(wiring, family: str) -> dict[str, np.ndarray]:
    """The |adjacency| blocks a model of ``family`` actually uses, keyed by parameter name."""
    if family == "LTC":
        return {
            "rnn_cell.sparsity_mask": np.abs(wiring.adjacency_matrix).astype(np.float32),
            "rnn_cell.sensory_sparsity_mask": np.abs(wiring.sensory_adjacency_matrix).astype(np.float32),
        }
    return {f"rnn_cell.layer_{i}.sparsity_mask": np.abs(mask).T for i, mask in enumerate(cfc_layer_masks(wiring))}


def check_wiring_against_masks(wiring, family: str, arrays: dict, where: str) -> None:
    """A wiring given in a config must have the synapses the checkpoint's masks have."""
    expected = wiring_masks(wiring, family)
    for name, mask in expected.items():
        if name not in arrays:
            raise ConversionError(
                f"{where}: its {type(wiring).__name__} wiring has {wiring.num_layers} layers but the checkpoint "
                f"has no {name}"
            )
        if arrays[name].shape != mask.shape or not np.array_equal(arrays[name], mask):
            raise ConversionError(
                f"{where}: its {type(wiring).__name__} wiring (config {wiring.get_config()}) does not have the "
                f"synapses of the checkpoint ({name} differs). Check the wiring's seed and sizes, or leave "
                "'units' out of the config to take the wiring from the checkpoint."
            )


def layered_wiring(input_dim: int, layer_inputs: list[np.ndarray], output_dim: int | None = None):
    """A plain ``Wiring`` from per-layer input masks (each (inputs, layer_size)).

    Neuron ids follow the NCP convention: the last (motor) layer first. Polarities are not in
    a CfC checkpoint, so every synapse is recorded as excitatory (+1).
    """
    sizes = [block.shape[1] for block in layer_inputs]
    units = int(sum(sizes))
    ids, start = [None] * len(sizes), 0
    for layer_id in reversed(range(len(sizes))):
        ids[layer_id] = list(range(start, start + sizes[layer_id]))
        start += sizes[layer_id]
    wiring = wirings.Wiring(units, layers=ids)
    wiring.set_input_dim(input_dim)
    wiring.set_output_dim(sizes[-1] if output_dim is None else output_dim)
    for layer_id, block in enumerate(layer_inputs):
        nonzero = (np.abs(block) > 0).astype(np.int32)
        if layer_id == 0:
            wiring.sensory_adjacency_matrix[:, ids[0]] = nonzero
        else:
            rows = np.array(ids[layer_id - 1])[:, None]
            wiring.adjacency_matrix[rows, np.array(ids[layer_id])[None, :]] = nonzero
    return wiring


def reference_wiring(description: dict):
    """An ``ncps.wirings.Wiring`` with exactly our wiring's matrices and layers."""
    import ncps.wirings as reference

    ours = wirings.wiring_from_description(description)

    class Exact(reference.Wiring):
        @property
        def num_layers(self):
            return ours.num_layers

        def get_neurons_of_layer(self, layer_id):
            return list(ours.get_neurons_of_layer(layer_id))

        def get_type_of_neuron(self, neuron_id):
            return ours.get_type_of_neuron(neuron_id)

    wiring = Exact(ours.units)
    wiring.adjacency_matrix = np.array(ours.adjacency_matrix)
    wiring.set_input_dim(ours.input_dim)
    wiring.sensory_adjacency_matrix = np.array(ours.sensory_adjacency_matrix)
    wiring.set_output_dim(ours.output_dim)
    return wiring
