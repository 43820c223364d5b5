"""The plain layers a converted Keras graph uses, with Keras's semantics at inference.

Every layer is channels-last, as Keras is by default. Each records its constructor arguments
(``get_config()`` -> ``{"type": class name, **arguments}``) so ``layer_from_config`` rebuilds it.
Merge layers (``MERGES``) take a list of arrays; every other layer one array.

Masks (Keras's, for padded sequences): ``Masking`` and ``Embedding(mask_zero=True)`` make a
(B, T) mask (``make_mask``); the layers with ``passes_mask`` hand it on unchanged; merges
combine their inputs' masks (all must be True); ``RNN`` and ``Bidirectional`` take it
(``layer(x, mask=...)``): a masked step keeps the state and repeats the previous output, and a
sequence output carries the mask on. ``ncps_mlx.graph.Graph`` wires this up.

* ``RNN`` wraps a CfC/LTC/CTRNN/CTGRU model as a Keras RNN layer: x (B, T, I) -> output, or
  ``(output, *states)`` with ``return_state`` (Keras's order: memory before the ODE state);
  ``go_backwards`` runs over the reversed sequence.
* ``Bidirectional(forward, backward)``: two RNNs, the backward one over the reversed sequence
  (its output sequence reversed back, as Keras does), merged by concat/sum/mul/ave.
* ``TimeDistributed(layer)``: (B, T, ...) -> layer on (B*T, ...) -> (B, T, ...).
* Dense (last axis; its activation a name or an activation layer's spec), Conv1D/Conv2D, pooling, global pooling, BatchNormalization,
  LayerNormalization, Normalization, Rescaling, Embedding, Flatten, Reshape, Permute, RepeatVector,
  Dropout-likes (identity at inference), Activation, ReLU, LeakyReLU, ELU, Softmax, and the
  merges Concatenate, Add, Subtract, Multiply, Average, Maximum, Minimum.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from . import configs
from .lowering import lecun_tanh

ACTIVATIONS = {
    None: lambda x: x,
    "linear": lambda x: x,
    "relu": nn.relu,
    "relu6": nn.relu6,
    "tanh": mx.tanh,
    "sigmoid": mx.sigmoid,
    "hard_sigmoid": lambda x: mx.clip(x / 6 + 0.5, 0, 1),
    "softmax": lambda x: mx.softmax(x, axis=-1, precise=True),
    "softplus": nn.softplus,
    "softsign": nn.softsign,
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": nn.gelu,
    "elu": nn.elu,
    "selu": nn.selu,
    "exponential": mx.exp,
    "lecun_tanh": lecun_tanh,
}


def activation_function(name):
    """A name of ``ACTIVATIONS``, or the spec of an activation layer (Keras serialises an
    activation given as a layer object, ``Conv1D(activation=LeakyReLU(0.4))``, as that layer)."""
    if isinstance(name, dict):
        spec = dict(name)
        kind = spec.pop("type", None)
        if kind not in ACTIVATION_LAYERS:
            raise ValueError(f"Unsupported activation layer {kind!r}; supported: {sorted(ACTIVATION_LAYERS)}")
        return SIMPLE_LAYERS[kind](**spec)
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported activation {name!r}; supported: {sorted(k for k in ACTIVATIONS if k)}")
    return ACTIVATIONS[name]


class Layer(nn.Module):
    """A layer that remembers its constructor arguments for ``get_config``."""

    passes_mask = False  # hands a Keras mask on unchanged (elementwise or last-axis layers)
    makes_mask = False  # starts one (make_mask(x) -> (B, T) booleans)

    def __init__(self, **arguments):
        super().__init__()
        self._arguments = arguments

    def get_config(self) -> dict:
        return {"type": type(self).__name__, **self._arguments}


class Dense(Layer):
    """Linear map of the last axis, then an activation: x (..., in) -> (..., units)."""

    passes_mask = True

    def __init__(self, in_features: int, units: int, activation: str | None = None, use_bias: bool = True):
        super().__init__(in_features=in_features, units=units, activation=activation, use_bias=use_bias)
        activation_function(activation)
        self.activation = activation
        self.linear = nn.Linear(in_features, units, bias=use_bias)

    def __call__(self, x):
        return activation_function(self.activation)(self.linear(x))


class Activation(Layer):
    passes_mask = True

    def __init__(self, activation: str):
        super().__init__(activation=activation)
        activation_function(activation)
        self.activation = activation

    def __call__(self, x):
        return activation_function(self.activation)(x)


class ReLU(Layer):
    """Keras ``ReLU``: x >= threshold: min(x, max_value); below: negative_slope * (x - threshold)."""

    passes_mask = True

    def __init__(self, max_value: float | None = None, negative_slope: float = 0.0, threshold: float = 0.0):
        super().__init__(max_value=max_value, negative_slope=negative_slope, threshold=threshold)

    def __call__(self, x):
        args = self._arguments
        y = mx.where(x >= args["threshold"], x, args["negative_slope"] * (x - args["threshold"]))
        return y if args["max_value"] is None else mx.minimum(y, args["max_value"])


class LeakyReLU(Layer):
    passes_mask = True

    def __init__(self, negative_slope: float = 0.3):
        super().__init__(negative_slope=negative_slope)

    def __call__(self, x):
        return mx.where(x >= 0, x, self._arguments["negative_slope"] * x)


class ELU(Layer):
    passes_mask = True

    def __init__(self, alpha: float = 1.0):
        super().__init__(alpha=alpha)

    def __call__(self, x):
        return mx.where(x > 0, x, self._arguments["alpha"] * (mx.exp(x) - 1))


class Softmax(Layer):
    def __init__(self, axis: int = -1):
        super().__init__(axis=axis)

    def __call__(self, x):
        return mx.softmax(x, axis=self._arguments["axis"], precise=True)


class Rescaling(Layer):
    """Keras ``Rescaling``: x * scale + offset (each a number, or one per channel)."""

    passes_mask = True

    def __init__(self, scale: float | list = 1.0, offset: float | list = 0.0):
        super().__init__(scale=scale, offset=offset)

    def __call__(self, x):
        scale, offset = (mx.array(self._arguments[k], dtype=x.dtype) for k in ("scale", "offset"))
        return x * scale + offset


class Identity(Layer):
    """Dropout, SpatialDropout*, GaussianNoise, GaussianDropout, AlphaDropout, ActivityRegularization
    at inference: the input unchanged. ``kind`` records which Keras layer it was."""

    passes_mask = True

    def __init__(self, kind: str = "Dropout"):
        super().__init__(kind=kind)

    def __call__(self, x):
        return x


class Flatten(Layer):
    """(B, ...) -> (B, prod(...))."""

    def __call__(self, x):
        return x.reshape(x.shape[0], -1)


class Reshape(Layer):
    """(B, ...) -> (B, *target_shape); one entry may be -1."""

    def __init__(self, target_shape: list):
        super().__init__(target_shape=list(target_shape))

    def __call__(self, x):
        return x.reshape(x.shape[0], *self._arguments["target_shape"])


class Permute(Layer):
    """Keras ``Permute``: ``dims`` numbers the non-batch axes from 1."""

    def __init__(self, dims: list):
        super().__init__(dims=list(dims))

    def __call__(self, x):
        return mx.transpose(x, [0, *self._arguments["dims"]])


class RepeatVector(Layer):
    """(B, F) -> (B, n, F)."""

    def __init__(self, n: int):
        super().__init__(n=n)

    def __call__(self, x):
        return mx.broadcast_to(x[:, None, :], (x.shape[0], self._arguments["n"], x.shape[1]))


class Normalization(Layer):
    """Keras ``Normalization`` at inference: (x - mean) / max(sqrt(variance), epsilon)."""

    def __init__(self, features: int, epsilon: float = 1e-7):
        super().__init__(features=features, epsilon=epsilon)
        self.mean = mx.zeros((features,))
        self.variance = mx.ones((features,))
        self.freeze(keys=["mean", "variance"], recurse=False)

    def __call__(self, x):
        return (x - self.mean) / mx.maximum(mx.sqrt(self.variance), self._arguments["epsilon"])


class _Normalizing(Layer):
    """A per-feature scale ``gamma`` (with ``scale``) and shift ``beta`` (with ``center``)."""

    passes_mask = True

    def __init__(self, features: int, epsilon: float = 1e-3, center: bool = True, scale: bool = True, axis: int = -1):
        super().__init__(features=features, epsilon=epsilon, center=center, scale=scale, axis=axis)
        if scale:
            self.gamma = mx.ones((features,))
        if center:
            self.beta = mx.zeros((features,))


class BatchNormalization(_Normalizing):
    """Keras ``BatchNormalization`` at inference, over the last axis:
    (x - moving_mean) / sqrt(moving_variance + epsilon) * gamma + beta."""

    def __init__(self, features: int, epsilon: float = 1e-3, center: bool = True, scale: bool = True, axis: int = -1):
        super().__init__(features, epsilon, center, scale, axis)
        self.moving_mean = mx.zeros((features,))
        self.moving_variance = mx.ones((features,))
        self.freeze(keys=["moving_mean", "moving_variance"], recurse=False)

    def __call__(self, x):
        # Keras: inv = rsqrt(variance + eps) * gamma; x * inv + (beta - mean * inv).
        inv = mx.rsqrt(self.moving_variance + self._arguments["epsilon"])
        if "gamma" in self:
            inv = inv * self.gamma
        shift = -self.moving_mean * inv
        if "beta" in self:
            shift = shift + self.beta
        axis = self._arguments["axis"] % x.ndim
        if axis != x.ndim - 1:  # tf.keras records the axis as a positive index
            shape = [1] * x.ndim
            shape[axis] = -1
            inv, shift = inv.reshape(shape), shift.reshape(shape)
        return x * inv + shift


class LayerNormalization(_Normalizing):
    """Keras ``LayerNormalization`` over the last axis: (x - mean) / sqrt(var + eps) * gamma + beta.
    ``axis`` is -1 or the last axis's positive index (as tf.keras records it)."""

    def __call__(self, x):
        if self._arguments["axis"] % x.ndim != x.ndim - 1:
            raise ValueError(f"LayerNormalization over axis {self._arguments['axis']} of a rank-{x.ndim} input: only the last axis is supported")
        mean = mx.mean(x, axis=-1, keepdims=True)
        variance = mx.var(x, axis=-1, keepdims=True)
        y = (x - mean) * mx.rsqrt(variance + self._arguments["epsilon"])
        if "gamma" in self:
            y = y * self.gamma
        return y + self.beta if "beta" in self else y


class Embedding(Layer):
    """Integer ids (...) -> (..., output_dim). With ``mask_zero`` id 0 is padding: it masks its step."""

    def __init__(self, input_dim: int, output_dim: int, mask_zero: bool = False):
        super().__init__(input_dim=input_dim, output_dim=output_dim, mask_zero=mask_zero)
        self.embeddings = mx.zeros((input_dim, output_dim))

    def __call__(self, x):
        return self.embeddings[x.astype(mx.int32)]

    @property
    def makes_mask(self) -> bool:
        return self._arguments["mask_zero"]

    def make_mask(self, x):
        return x != 0


class Masking(Layer):
    """Keras ``Masking``: a step whose features all equal ``mask_value`` is masked (and zeroed)."""

    makes_mask = True

    def __init__(self, mask_value: float = 0.0):
        super().__init__(mask_value=mask_value)

    def make_mask(self, x):
        return mx.any(x != self._arguments["mask_value"], axis=-1)

    def __call__(self, x):
        return x * self.make_mask(x)[..., None].astype(x.dtype)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's "same" padding of one axis: (before, after), the extra one after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv(Layer):
    """Keras ``Conv1D`` / ``Conv2D``, channels-last: x (B, *spatial, in) -> (B, *spatial', filters).
    ``weight`` is MLX's (filters, *kernel, in)."""

    def __init__(self, in_channels: int, filters: int, kernel_size: list, strides: list, padding: str = "valid",
                 dilation_rate: list | None = None, activation: str | None = None, use_bias: bool = True):
        rank = len(kernel_size)
        dilation_rate = list(dilation_rate or [1] * rank)
        super().__init__(in_channels=in_channels, filters=filters, kernel_size=list(kernel_size), strides=list(strides),
                         padding=padding, dilation_rate=dilation_rate, activation=activation, use_bias=use_bias)
        if padding not in ("valid", "same", "causal"):
            raise ValueError(f"Conv padding must be 'valid', 'same' or 'causal', got {padding!r}")
        activation_function(activation)
        self.weight = mx.zeros((filters, *kernel_size, in_channels))
        if use_bias:
            self.bias = mx.zeros((filters,))

    def __call__(self, x):
        args = self._arguments
        kernel, strides, dilation = args["kernel_size"], args["strides"], args["dilation_rate"]
        spatial = x.shape[1:-1]
        if args["padding"] == "same":
            low, high = zip(*(same_padding(n, k, s, d) for n, k, s, d in zip(spatial, kernel, strides, dilation)))
        elif args["padding"] == "causal":
            low, high = [(kernel[0] - 1) * dilation[0]], [0]
        else:
            low = high = [0] * len(kernel)
        y = mx.conv_general(x, self.weight, stride=strides, padding=(list(low), list(high)), kernel_dilation=dilation)
        if "bias" in self:
            y = y + self.bias
        return activation_function(args["activation"])(y)


class Pooling(Layer):
    """Keras ``MaxPooling1D/2D`` and ``AveragePooling1D/2D`` (``kind`` "max" or "average"), channels-last.
    "same" padding pads with -inf for max and averages over the window's real elements, as Keras."""

    def __init__(self, kind: str, pool_size: list, strides: list, padding: str = "valid"):
        super().__init__(kind=kind, pool_size=list(pool_size), strides=list(strides), padding=padding)
        if kind not in ("max", "average") or padding not in ("valid", "same"):
            raise ValueError(f"Pooling kind must be max/average and padding valid/same, got {kind!r}, {padding!r}")

    def _windows(self, x):
        """x (B, *spatial, C) -> (B, *out, C, *pool)."""
        pool, strides = self._arguments["pool_size"], self._arguments["strides"]
        spatial = x.shape[1:-1]
        out = [(n - k) // s + 1 for n, k, s in zip(spatial, pool, strides)]
        shape = [x.shape[0], *out, x.shape[-1], *pool]
        element = [1] * x.ndim
        for axis in range(x.ndim - 2, -1, -1):
            element[axis] = element[axis + 1] * x.shape[axis + 1]
        strides_elements = [element[0], *(element[i + 1] * s for i, s in enumerate(strides)), 1, *element[1:-1]]
        return mx.as_strided(x, shape, strides_elements)

    def __call__(self, x):
        args = self._arguments
        pool, strides = args["pool_size"], args["strides"]
        axes = tuple(range(-len(pool), 0))  # the window axes _windows puts last
        if args["padding"] == "same":
            pads = [same_padding(n, k, s) for n, k, s in zip(x.shape[1:-1], pool, strides)]
            widths = [(0, 0), *pads, (0, 0)]
            if args["kind"] == "max":
                return mx.max(self._windows(mx.pad(x, widths, constant_values=-math.inf)), axis=axes)
            ones = mx.pad(mx.ones((1, *x.shape[1:-1], 1), x.dtype), widths)
            total = mx.sum(self._windows(mx.pad(x, widths)), axis=axes)
            return total / mx.sum(self._windows(ones), axis=axes)
        windows = self._windows(mx.contiguous(x))
        return mx.max(windows, axis=axes) if args["kind"] == "max" else mx.mean(windows, axis=axes)


class GlobalPooling(Layer):
    """Keras ``GlobalAverage/GlobalMaxPooling1D/2D``: (B, *spatial, C) -> (B, C) (or keepdims)."""

    def __init__(self, kind: str, rank: int, keepdims: bool = False):
        super().__init__(kind=kind, rank=rank, keepdims=keepdims)

    def __call__(self, x):
        axes = tuple(range(1, 1 + self._arguments["rank"]))
        reduce = mx.max if self._arguments["kind"] == "max" else mx.mean
        return reduce(x, axis=axes, keepdims=self._arguments["keepdims"])


class Merge(Layer):
    """Keras's merge layers over a list of arrays: ``kind`` is the layer's name."""

    KINDS = ("Concatenate", "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")

    def __init__(self, kind: str, axis: int = -1):
        super().__init__(kind=kind, axis=axis)
        if kind not in self.KINDS:
            raise ValueError(f"Unknown merge {kind!r}; expected one of {self.KINDS}")

    def __call__(self, xs):
        kind = self._arguments["kind"]
        if kind == "Concatenate":
            return mx.concatenate(xs, axis=self._arguments["axis"])
        if kind == "Subtract":
            if len(xs) != 2:
                raise ValueError(f"Subtract takes exactly 2 inputs, got {len(xs)}")
            return xs[0] - xs[1]
        combine = {"Add": mx.add, "Average": mx.add, "Multiply": mx.multiply, "Maximum": mx.maximum, "Minimum": mx.minimum}[kind]
        result = xs[0]
        for x in xs[1:]:
            result = combine(result, x)
        return result / len(xs) if kind == "Average" else result


class TimeDistributed(Layer):
    """x (B, T, ...) -> ``layer`` on (B*T, ...) -> (B, T, ...)."""

    passes_mask = True  # the steps stay the steps

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def __call__(self, x):
        batch, steps = x.shape[:2]
        y = self.layer(x.reshape(batch * steps, *x.shape[2:]))
        return y.reshape(batch, steps, *y.shape[1:])

    def get_config(self) -> dict:
        return {"type": "TimeDistributed", "layer": self.layer.get_config()}


class RNN(nn.Module):
    """A sequence model used as a Keras RNN layer: x (B, T, I) -> output (or output, *states).
    ``mask`` (B, T): masked steps are skipped (``SequenceModel``); with ``zero_output_for_mask``
    a sequence output is zero at them."""

    def __init__(self, model, return_state: bool = False, go_backwards: bool = False, zero_output_for_mask: bool = False):
        super().__init__()
        self.model = model
        self.return_state = return_state
        self.go_backwards = go_backwards
        self.zero_output_for_mask = zero_output_for_mask

    def __call__(self, x, mask=None):
        if self.go_backwards:
            x = x[:, ::-1] if self.model.batch_first else x[::-1]
            mask = None if mask is None else mask[:, ::-1]
        output, state = self.model(x, mask=mask)
        if mask is not None and self.zero_output_for_mask and self.model.return_sequences:
            output = mx.where(mask[..., None], output, 0.0)
        if not self.return_state:
            return output
        # Keras orders mixed-memory states (memory, ODE state); ours are (h, c) = (ODE, memory).
        return (output, state[1], state[0]) if isinstance(state, tuple) else (output, state)

    def get_config(self) -> dict:
        return {"type": "RNN", "model": self.model.get_config(), "return_state": self.return_state,
                "go_backwards": self.go_backwards, "zero_output_for_mask": self.zero_output_for_mask}


class Bidirectional(nn.Module):
    """Keras ``Bidirectional``: ``forward`` over x, ``backward`` over x reversed in time; with
    return_sequences the backward outputs are reversed back before the merge. Returns the merged
    output, or ``[merged, *forward states, *backward states]`` with ``return_state``."""

    MERGE_MODES = ("concat", "sum", "mul", "ave")

    def __init__(self, forward, backward, merge_mode: str = "concat", return_state: bool = False,
                 zero_output_for_mask: bool = False):
        super().__init__()
        if merge_mode not in self.MERGE_MODES:
            raise ValueError(f"Bidirectional merge_mode must be one of {self.MERGE_MODES}, got {merge_mode!r}")
        self.forward = RNN(forward, return_state=True, zero_output_for_mask=zero_output_for_mask)
        self.backward = RNN(backward, return_state=True, go_backwards=True, zero_output_for_mask=zero_output_for_mask)
        self.merge_mode = merge_mode
        self.return_state = return_state

    def __call__(self, x, mask=None):
        y_forward, *states_forward = self.forward(x, mask=mask)
        y_backward, *states_backward = self.backward(x, mask=mask)
        if self.forward.model.return_sequences:
            y_backward = y_backward[:, ::-1]
        if self.merge_mode == "concat":
            y = mx.concatenate([y_forward, y_backward], axis=-1)
        elif self.merge_mode == "sum":
            y = y_forward + y_backward
        elif self.merge_mode == "mul":
            y = y_forward * y_backward
        else:
            y = (y_forward + y_backward) / 2
        return (y, *states_forward, *states_backward) if self.return_state else y

    def get_config(self) -> dict:
        return {
            "type": "Bidirectional",
            "forward": self.forward.model.get_config(),
            "backward": self.backward.model.get_config(),
            "merge_mode": self.merge_mode,
            "return_state": self.return_state,
            "zero_output_for_mask": self.forward.zero_output_for_mask,
        }


SIMPLE_LAYERS = {
    cls.__name__: cls
    for cls in (Dense, Activation, ReLU, LeakyReLU, ELU, Softmax, Identity, Rescaling, Flatten, Reshape, Permute, RepeatVector,
                Normalization, BatchNormalization, LayerNormalization, Embedding, Masking, Conv, Pooling, GlobalPooling,
                Merge)
}
MERGES = (Merge,)
ACTIVATION_LAYERS = ("Activation", "ReLU", "LeakyReLU", "ELU", "Softmax")


def layer_from_config(spec: dict):
    """Rebuild a layer from its ``get_config()``."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind == "RNN":
        return RNN(configs.build(spec.pop("model")), **spec)
    if kind == "Bidirectional":
        return Bidirectional(configs.build(spec.pop("forward")), configs.build(spec.pop("backward")), **spec)
    if kind == "TimeDistributed":
        return TimeDistributed(layer_from_config(spec["layer"]))
    if kind == "Dropout":  # written by ncps-mlx 0.1's Stack
        return Identity("Dropout")
    if kind not in SIMPLE_LAYERS:
        known = sorted([*SIMPLE_LAYERS, "RNN", "Bidirectional", "TimeDistributed"])
        raise ValueError(f"Unknown layer type {kind!r}; expected one of {known}")
    return SIMPLE_LAYERS[kind](**spec)
