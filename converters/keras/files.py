"""Opening a Keras file: which container it is, its model config, and a view of its weights.

Containers: Keras 3 and tf.keras ``.keras`` archives (config.json + model.weights.h5), the
legacy ``.h5`` format as tf.keras and Keras 3 write it (``model_config`` + ``model_weights``),
weights-only ``.h5`` files of every flavour (the config then comes from --config), and tf.keras
SavedModel folders (their variables need TensorFlow). Which Keras wrote the file decides how it
is verified: ``keras_version`` in the file (2.x: tf.keras, 3.x: Keras 3).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import formats
from ..description import ConversionError
from .weights import Keras3Weights, NamedWeights, checked_hdf5


@dataclass
class Opened:
    model_config: dict | None  # None: a weights-only file
    weights: object  # Keras3Weights or NamedWeights
    file_format: str
    framework: str  # "keras" (Keras 3) or "tf.keras": the Keras that runs it for verification


def import_h5py():
    try:
        import h5py
    except ImportError:
        raise ConversionError("reading Keras files needs h5py: pip install h5py") from None
    return h5py


def _framework(version) -> str:
    """'tf.keras' for a file Keras 2 wrote, 'keras' for Keras 3."""
    version = version.decode() if isinstance(version, bytes) else str(version or "")
    return "tf.keras" if version.startswith("2.") else "keras"


def open_keras_file(path: Path) -> Opened:
    h5py = import_h5py()
    kind = formats.kind_of(path)
    try:
        if kind == "directory":
            model_config, weights = _saved_model(path)
            return Opened(model_config, weights, "tf.keras SavedModel", "tf.keras")
        if kind == "zip":
            return _archive(path, h5py)
        handle = checked_hdf5(h5py.File(path, "r"))
        framework = _framework(handle.attrs.get("keras_version", "2"))
        if "model_config" in handle.attrs:
            model_config = formats.load_json(handle.attrs["model_config"], f"{path}: its model_config attribute")
            flavour = "Keras 3 legacy" if framework == "keras" else "tf.keras"
            return Opened(model_config, NamedWeights(handle["model_weights"]), f"{flavour} .h5 model", framework)
        if "layer_names" in handle.attrs:
            flavour = "Keras 3 legacy" if framework == "keras" else "tf.keras"
            return Opened(None, NamedWeights(handle), f"{flavour} weights-only .h5", framework)
        if "layers" in handle:
            return Opened(None, Keras3Weights(handle), "Keras 3 weights-only .h5", "keras")
        raise ConversionError(f"{path}: an HDF5 file with neither a Keras model nor Keras weights in it")
    except (zipfile.BadZipFile, KeyError, OSError, RuntimeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: truncated or corrupt Keras file ({str(error).splitlines()[0]})") from None


def _archive(path: Path, h5py) -> Opened:
    formats.check_zip_members(path, "Keras file")
    archive = zipfile.ZipFile(path)
    members = {info.filename: info for info in archive.infolist()}
    for member in ("config.json", "model.weights.h5"):
        if member not in members:
            raise ConversionError(f"{path}: a .keras archive without {member}")
    for member in ("config.json", "metadata.json"):
        if member in members and members[member].file_size > formats.MAX_JSON_BYTES:
            raise ConversionError(f"{path}: its {member} would be {members[member].file_size / 2**20:.0f} MiB; a model config is a few KB")
    model_config = formats.load_json(archive.read("config.json"), f"{path}: its config.json")
    metadata = formats.load_json(archive.read("metadata.json"), f"{path}: its metadata.json") if "metadata.json" in members else {}
    framework = _framework(metadata.get("keras_version", "3") if isinstance(metadata, dict) else "3")
    weights = Keras3Weights(checked_hdf5(h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")))
    flavour = "tf.keras" if framework == "tf.keras" else "Keras 3"
    return Opened(model_config, weights, f"{flavour} .keras archive", framework)


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
    return root["model_config"], NamedWeights(per_layer)
