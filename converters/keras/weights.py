"""Weight views: one per weight layout, each answering the same questions for a converter.

* ``Keras3Weights``: the ``.keras`` archive's ``model.weights.h5`` and Keras 3 ``.weights.h5``
  (also tf.keras's ``.keras`` archives): groups by attribute path (``layers/<class>_<n>``),
  variables by creation order.
* ``NamedWeights``: per layer a list of ``weight_names``: tf.keras ``.h5`` (``cf_c/.../ff1_weight:0``),
  Keras 3's legacy ``.h5`` (``ltc_1/ltc_cell_1/gleak``, no ``:0``), keras-ncp's cells
  (``rnn/wired_cfc_cell/cfc_cell_1/ff1_weight:0``), and a SavedModel's variables.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from ..description import ConversionError

log = logging.getLogger("ncps_mlx.converters")

# A weight dataset larger than this and larger than its stored bytes allow is refused before
# it is read: HDF5 declares shapes freely, and an unwritten chunked dataset reads as fill values.
MAX_DATASET_BYTES = 2**30


def checked_hdf5(handle):
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


def array(dataset) -> np.ndarray:
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


def _suffix(name: str) -> int:
    match = re.search(r"_(\d+)$", name)
    return int(match.group(1)) if match else 0


class Keras3Weights:
    """Keras 3 ``model.weights.h5``: groups by attribute path, variables by creation order."""

    def __init__(self, handle):
        self.handle = handle
        self.renamed = []

    def layer(self, config_name, group_name, position, config_names=()):
        root = self.handle["layers"] if "layers" in self.handle else self.handle["_layer_checkpoint_dependencies"]
        if group_name not in root:  # an error once a weight is asked for: weightless layers need none
            return K3View(None, missing=f"weights for layer {config_name!r} not found (expected group layers/{group_name})")
        return K3View(root[group_name])


class K3View:
    # Keras 3 names variables by creation order; these are the orders of the layers we read.
    ORDER = {
        "dense": ["kernel", "bias"],
        "lstm": ["input_kernel", "recurrent_kernel", "bias"],
        "cfc": ["ff1_kernel", "ff1_bias", "ff2_kernel", "ff2_bias"],
        "cfc_pure": ["ff1_kernel", "ff1_bias", "w_tau", "A"],
    }

    def __init__(self, group, kind=None, missing=None):
        self.group = group
        self.kind = kind
        self.missing = missing

    def _vars(self):
        if self.group is None:
            raise ConversionError(self.missing)
        if "vars" not in self.group:
            return []
        variables = self.group["vars"]
        return [array(variables[k]) for k in sorted(variables, key=int)]

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
        return K3View(self.group["layer"])

    def cell(self):
        return K3View(self.group["cell"], "cfc")

    def lstm(self):
        return K3View(self.group, "lstm", self.missing)

    def inner_cell(self):
        return K3View(self.group["rnn_cell"], "cfc")

    def dense(self, name):
        return K3View(self.group[name], "dense")

    def backbone(self):
        if "backbone_fn" not in self.group:
            return []
        layers = self.group["backbone_fn"]["layers"]
        dense = sorted((k for k in layers if k.startswith("dense")), key=_suffix)
        return [K3View(layers[k], "dense") for k in dense]

    def wired_layers(self):
        layers = self.group["_cfc_layers"]
        return [K3View(layers[k], "cfc") for k in sorted(layers, key=_suffix)]

    def ltc(self, names):
        variables = self._vars()
        if len(variables) != len(names):
            raise ConversionError(f"{self.group.name}: {len(variables)} LTC variables, expected {len(names)} ({names})")
        return dict(zip(names, variables))

    def named(self, names, optional=False):
        """The first variables, by creation order, under these names (a Normalization's count
        comes after its mean and variance). ``optional``: {} where the layer has none."""
        variables = self._vars()
        if optional and not variables:
            return {}
        if len(variables) < len(names):
            raise ConversionError(f"{self.group.name}: {len(variables)} variables, expected {len(names)} ({names})")
        return dict(zip(names, variables))

    def half(self, which):
        key = f"{which}_layer"
        if key not in self.group:
            raise ConversionError(f"{self.group.name}: no {key} weights")
        return K3View(self.group[key])


class NamedWeights:
    """Per layer, ``weight_names`` like ``cf_c/mixed_memory_rnn/ff1_weight:0``."""

    def __init__(self, group):
        self.group = group
        self.renamed = []  # (name in the config, name in the file) matched by position

    def layer(self, config_name, group_name, position, config_names=()):
        if isinstance(self.group, dict):  # a SavedModel's variables, by layer name
            if config_name not in self.group:
                raise ConversionError(f"weights for layer {config_name!r} not found in the SavedModel")
            return NamedView(self.group[config_name])
        names = [n.decode() if isinstance(n, bytes) else n for n in self.group.attrs.get("layer_names", [])]
        if config_name not in names:
            found = _renumbered(config_name, list(config_names), names)
            if found is None and position < len(names):  # a hand-written config's own names
                found = names[position]
            if found is None:
                raise ConversionError(f"weights for layer {config_name!r} not found (the file has layers {names})")
            self.renamed.append((config_name, found))
            log.info("layer %r of the config takes the weights of %r in the file (matched in topology order)", config_name, found)
            config_name = found
        layer = self.group[config_name]
        names = [n.decode() if isinstance(n, bytes) else n for n in layer.attrs.get("weight_names", [])]
        return NamedView({name: array(layer[name]) for name in names})


def _base(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def _renumbered(name, config_names, file_names):
    """The file's layer that Keras's automatic numbering renamed: the k-th config layer named
    like ``time_distributed`` is the k-th file layer so named, whatever number each carries."""
    same = [n for n in config_names if _base(n) == _base(name)]
    in_file = [n for n in file_names if _base(n) == _base(name)]
    if name not in same or len(same) != len(in_file):
        return None
    return in_file[same.index(name)]


def _loose(name: str) -> str:
    # tf.keras uniquifies variable scopes per process (mixed_memory_rnn_1, cf_c_cell_2, ...).
    return re.escape(name) + r"(?:_\d+)?"


class NamedView:
    """Finds ``.../<parts>/<name>`` (with or without tf.keras's ``:0``) among a layer's weight
    names; parts are regex fragments."""

    def __init__(self, weights: dict, parts: tuple = ()):
        self.weights = weights
        self.parts = parts

    def _find(self, name):
        pattern = re.compile(r"(?:^|/)" + "/".join(self.parts + (re.escape(name),)) + "(?::0)?$")
        hits = [k for k in self.weights if pattern.search(k)]
        if len(hits) != 1:
            raise ConversionError(f"expected one weight named {'/'.join(self.parts + (name,))}, found {len(hits)} ({hits[:3]})")
        return self.weights[hits[0]]

    def get(self, name):
        return self._find({"ff1_kernel": "ff1_weight", "ff2_kernel": "ff2_weight"}.get(name, name))

    def inner(self):
        return self

    def cell(self):
        return self

    def lstm(self):
        return NamedView(self.weights, self.parts + (_loose("mixed_memory_rnn"),))

    def inner_cell(self):
        return self

    def dense(self, name):
        return NamedView(self.weights, self.parts + (_loose(name),))

    def backbone(self):
        found = {int(m.group(1)) for k in self.weights if (m := re.search(r"(?:^|/)backbone(\d+)(?:_\d+)?/kernel(?::0)?$", k))}
        return [NamedView(self.weights, (_loose(f"backbone{i}"),)) for i in sorted(found)]

    def wired_layers(self):
        # ncps.tf: wired_cf_c_cell/cf_c_cell_1/; keras-ncp 2.x: wired_cfc_cell/cfc_cell_1/.
        pattern = re.compile(r"(wired_cf_?c_cell(?:_\d+)?)/(cf_?c_cell(?:_\d+)?)/")
        scopes = {m.groups() for k in self.weights if (m := pattern.search(k))}
        ordered = sorted(scopes, key=lambda scope: _suffix(scope[1]))
        return [NamedView(self.weights, (re.escape(outer), re.escape(inner))) for outer, inner in ordered]

    def ltc(self, names):
        return {name: self._find(name) for name in names}

    def named(self, names, optional=False):
        if optional and not self.weights:
            return {}
        return {name: self._find(name) for name in names}

    def half(self, which):
        return NamedView({k: v for k, v in self.weights.items() if re.search(rf"(?:^|/){which}_", k)}, self.parts)
