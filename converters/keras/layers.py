"""Converters of Keras's own layers (not the recurrent ones) into ``ncps_mlx.layers`` specs."""

from __future__ import annotations

import numpy as np

from ncps_mlx.layers import ACTIVATIONS

from ..description import ConversionError
from .registry import CONVERTERS, KerasLayer, class_of, converts

# Identity at inference.
IDENTITY_LAYERS = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
                   "GaussianDropout", "AlphaDropout", "ActivityRegularization")
MERGE_LAYERS = ("Concatenate", "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
POOLING_LAYERS = ("MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D", "GlobalAveragePooling1D",
                  "GlobalAveragePooling2D", "GlobalMaxPooling1D", "GlobalMaxPooling2D")
# Layers that may stand as another layer's activation (Conv1D(activation=LeakyReLU(0.4))).
ACTIVATION_LAYERS = ("Activation", "ReLU", "LeakyReLU", "ELU", "Softmax")


def activation_name(value):
    """A Keras activation as a name: "relu", {"config": "relu"} (Keras 3 functions), ">relu"."""
    if isinstance(value, dict):
        value = value.get("config", value.get("class_name"))
    if isinstance(value, str) and value.startswith(">"):
        value = value[1:]  # Keras 3 writes registered functions as ">name"
    return value


def activation(value, where):
    """A layer's ``activation`` argument: a name of ``ncps_mlx.layers.ACTIVATIONS``, or the spec
    of an activation layer where Keras serialised a layer object (a nested layer config)."""
    if isinstance(value, dict) and isinstance(value.get("config"), dict):
        kind = class_of(value, f"{where}'s activation", allowed=ACTIVATION_LAYERS)
        spec, _ = CONVERTERS[kind](KerasLayer(kind, value["config"], None, f"{where}'s activation"))
        return spec
    name = activation_name(value)
    if not isinstance(name, (str, type(None))) or name not in ACTIVATIONS:
        raise ConversionError(f"{where}: unsupported activation {name!r}; supported: {sorted(k for k in ACTIVATIONS if k)}")
    return name


def constant(value, where, what):
    """A number or array written into a config: plain lists, or tf.keras's ``__numpy__`` objects."""
    if isinstance(value, dict) and value.get("class_name") == "__numpy__":
        value = value.get("config", {}).get("value")
    try:
        result = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ConversionError(f"{where}: its {what} {str(value)[:60]} is not a number or an array of numbers") from None
    if result.dtype == object or not np.all(np.isfinite(result)):
        raise ConversionError(f"{where}: its {what} is not an array of finite numbers")
    return result


def _channels_last(layer):
    if layer.config.get("data_format") not in (None, "channels_last"):
        raise ConversionError(f"{layer.where}: data_format={layer.config['data_format']!r} is not supported; only channels_last")


def _ints(value, rank):
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * rank


def _last_axis(layer, default=-1):
    axis = layer.config.get("axis", default)
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    if not isinstance(axis, int):
        raise ConversionError(f"{layer.where}: axis={layer.config.get('axis')} is not supported; one axis only")
    return axis


@converts(*IDENTITY_LAYERS)
def identity(layer):
    return {"type": "Identity", "kind": layer.kind}, {}


@converts("Masking")
def masking(layer):
    return {"type": "Masking", "mask_value": float(layer.config.get("mask_value", 0.0))}, {}


@converts(*MERGE_LAYERS)
def merge(layer):
    spec = {"type": "Merge", "kind": layer.kind}
    if layer.kind == "Concatenate":
        spec["axis"] = int(layer.config.get("axis", -1))
    return spec, {}


@converts("Dense")
def dense(layer):
    use_bias = bool(layer.config.get("use_bias", True))
    values = layer.weights.named(["kernel", "bias"] if use_bias else ["kernel"])
    kernel = values["kernel"]
    spec = {"type": "Dense", "in_features": int(kernel.shape[0]), "units": int(kernel.shape[1]),
            "activation": activation(layer.config.get("activation"), layer.where), "use_bias": use_bias}
    arrays = {"linear.weight": kernel.T}
    if use_bias:
        arrays["linear.bias"] = values["bias"]
    return spec, arrays


@converts("Conv1D", "Conv2D")
def conv(layer):
    cfg, where = layer.config, layer.where
    _channels_last(layer)
    if int(cfg.get("groups", 1)) != 1:
        raise ConversionError(f"{where}: grouped convolutions (groups={cfg['groups']}) are not supported")
    use_bias = bool(cfg.get("use_bias", True))
    values = layer.weights.named(["kernel", "bias"] if use_bias else ["kernel"])
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
        "activation": activation(cfg.get("activation"), where),
        "use_bias": use_bias,
    }
    if spec["padding"] not in ("valid", "same", "causal") or (spec["padding"] == "causal" and rank != 1):
        raise ConversionError(f"{where}: padding={spec['padding']!r} is not supported")
    arrays = {"weight": np.transpose(kernel, (rank + 1, *range(rank), rank))}  # MLX (filters, *kernel, in)
    if use_bias:
        arrays["bias"] = values["bias"]
    return spec, arrays


@converts(*POOLING_LAYERS)
def pooling(layer):
    _channels_last(layer)
    kind, cfg = layer.kind, layer.config
    rank = int(kind[-2])
    reduce = "max" if "Max" in kind else "average"
    if kind.startswith("Global"):
        return {"type": "GlobalPooling", "kind": reduce, "rank": rank, "keepdims": bool(cfg.get("keepdims", False))}, {}
    pool = _ints(cfg.get("pool_size", 2), rank)
    strides = _ints(cfg.get("strides") or pool, rank)
    padding = str(cfg.get("padding", "valid")).lower()
    if padding not in ("valid", "same"):
        raise ConversionError(f"{layer.where}: padding={padding!r} is not supported")
    return {"type": "Pooling", "kind": reduce, "pool_size": pool, "strides": strides, "padding": padding}, {}


@converts("BatchNormalization", "LayerNormalization")
def normalizing(layer):
    cfg = layer.config
    axis = _last_axis(layer)
    if cfg.get("rms_scaling"):
        raise ConversionError(f"{layer.where}: rms_scaling=True is not supported")
    center, scale = bool(cfg.get("center", True)), bool(cfg.get("scale", True))
    names = (["gamma"] if scale else []) + (["beta"] if center else [])
    if layer.kind == "BatchNormalization":
        names += ["moving_mean", "moving_variance"]
    values = layer.weights.named(names)
    features = int(next(iter(values.values())).size)
    spec = {"type": layer.kind, "features": features, "epsilon": float(cfg.get("epsilon", 1e-3)), "center": center, "scale": scale}
    if axis != -1:
        # tf.keras records the axis as a positive index, in a rank known when it is called.
        spec["axis"] = int(axis)
    return spec, {k: v.reshape(-1) for k, v in values.items()}


@converts("Normalization")
def normalization(layer):
    """Adapted (mean, variance and count stored as weights) or given as constants in the config
    (``Normalization(mean=..., variance=...)``); over the last axis."""
    cfg, where = layer.config, layer.where
    if cfg.get("invert"):
        raise ConversionError(f"{where}: invert=True (denormalisation) is not supported")
    axis = cfg.get("axis", -1)
    if axis not in (-1, [-1], None) and not (isinstance(axis, list) and len(axis) == 1):
        raise ConversionError(f"{where}: axis={axis} is not supported; the last axis only")
    if cfg.get("mean") is not None and cfg.get("variance") is not None:
        mean, variance = constant(cfg["mean"], where, "mean"), constant(cfg["variance"], where, "variance")
    else:
        values = layer.weights.named(["mean", "variance"])
        mean, variance = values["mean"], values["variance"]
    if mean.size != variance.size:
        raise ConversionError(f"{where}: mean has {mean.size} values, variance {variance.size}")
    return {"type": "Normalization", "features": int(mean.size)}, {"mean": mean.reshape(-1), "variance": variance.reshape(-1)}


@converts("Rescaling")
def rescaling(layer):
    """x * scale + offset (scalars, or per channel)."""
    scale = constant(layer.config.get("scale", 1.0), layer.where, "scale")
    offset = constant(layer.config.get("offset", 0.0), layer.where, "offset")
    return {"type": "Rescaling", "scale": scale.tolist(), "offset": offset.tolist()}, {}


@converts("Embedding")
def embedding(layer):
    table = layer.weights.named(["embeddings"])["embeddings"]
    spec = {"type": "Embedding", "input_dim": int(table.shape[0]), "output_dim": int(table.shape[1])}
    return {**spec, "mask_zero": bool(layer.config.get("mask_zero", False))}, {"embeddings": table}


@converts("Flatten")
def flatten(layer):
    _channels_last(layer)
    return {"type": "Flatten"}, {}


@converts("Reshape")
def reshape(layer):
    return {"type": "Reshape", "target_shape": [int(v) for v in layer.config["target_shape"]]}, {}


@converts("Permute")
def permute(layer):
    return {"type": "Permute", "dims": [int(v) for v in layer.config["dims"]]}, {}


@converts("RepeatVector")
def repeat_vector(layer):
    return {"type": "RepeatVector", "n": int(layer.config["n"])}, {}


@converts("Activation")
def activation_layer(layer):
    name = activation(layer.config.get("activation"), layer.where)
    if isinstance(name, dict):
        return name, {}
    return {"type": "Activation", "activation": name}, {}


@converts("ReLU")
def relu(layer):
    cfg = layer.config
    max_value = cfg.get("max_value")
    return {"type": "ReLU", "max_value": None if max_value is None else float(max_value),
            "negative_slope": float(cfg.get("negative_slope", 0.0)), "threshold": float(cfg.get("threshold", 0.0))}, {}


@converts("LeakyReLU")
def leaky_relu(layer):  # Keras 3 calls it negative_slope, tf.keras alpha
    cfg = layer.config
    return {"type": "LeakyReLU", "negative_slope": float(cfg.get("negative_slope", cfg.get("alpha", 0.3)))}, {}


@converts("ELU")
def elu(layer):
    return {"type": "ELU", "alpha": float(layer.config.get("alpha", 1.0))}, {}


@converts("Softmax")
def softmax(layer):
    axis = layer.config.get("axis", -1)
    return {"type": "Softmax", "axis": int(axis[0] if isinstance(axis, list) else axis)}, {}
