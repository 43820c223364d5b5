"""``Stack``: ncps models with the plain layers users put around them, applied in order.

What a converted Keras ``Sequential`` (or linear functional) model becomes: each layer takes
the previous one's output, and the stack returns what the Keras model returns. Layers:

* ``RNN`` wraps a CfC/LTC/CTRNN/CTGRU model and returns only its output, as a Keras RNN layer
  does; ``go_backwards`` runs it over the reversed sequence; ``return_state`` (last layer only)
  makes the stack return ``(output, *states)`` in Keras's order.
* ``Dense`` (a Linear on the last axis, so also ``TimeDistributed(Dense)``), ``Activation``,
  ``Dropout``, ``Flatten``, ``Normalization`` (Keras's: (x - mean) / max(sqrt(variance), eps)).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cells._common import lecun_tanh

ACTIVATIONS = {
    None: lambda x: x,
    "linear": lambda x: x,
    "relu": nn.relu,
    "tanh": mx.tanh,
    "sigmoid": mx.sigmoid,
    "softmax": lambda x: mx.softmax(x, axis=-1, precise=True),
    "softplus": nn.softplus,
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": nn.gelu,
    "elu": nn.elu,
    "selu": nn.selu,
    "exponential": mx.exp,
    "lecun_tanh": lecun_tanh,
}


def activation_function(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported activation {name!r}; supported: {sorted(k for k in ACTIVATIONS if k)}")
    return ACTIVATIONS[name]


class Dense(nn.Module):
    """Linear map of the last axis, then an activation: x (..., in) -> (..., units)."""

    def __init__(self, in_features: int, units: int, activation: str | None = None, use_bias: bool = True):
        super().__init__()
        activation_function(activation)
        self.activation = activation
        self.linear = nn.Linear(in_features, units, bias=use_bias)
        self._config = {"type": "Dense", "in_features": in_features, "units": units, "activation": activation, "use_bias": use_bias}

    def __call__(self, x):
        return activation_function(self.activation)(self.linear(x))


class Activation(nn.Module):
    def __init__(self, activation: str):
        super().__init__()
        activation_function(activation)
        self.activation = activation
        self._config = {"type": "Activation", "activation": activation}

    def __call__(self, x):
        return activation_function(self.activation)(x)


class Dropout(nn.Dropout):
    def __init__(self, rate: float = 0.0):
        super().__init__(rate)
        self._config = {"type": "Dropout", "rate": rate}


class Flatten(nn.Module):
    """(B, ...) -> (B, prod(...))."""

    def __init__(self):
        super().__init__()
        self._config = {"type": "Flatten"}

    def __call__(self, x):
        return x.reshape(x.shape[0], -1)


class Normalization(nn.Module):
    """Keras ``Normalization`` at inference: (x - mean) / max(sqrt(variance), epsilon)."""

    def __init__(self, features: int, epsilon: float = 1e-7):
        super().__init__()
        self.mean = mx.zeros((features,))
        self.variance = mx.ones((features,))
        self.freeze(keys=["mean", "variance"], recurse=False)
        self._config = {"type": "Normalization", "features": features, "epsilon": epsilon}

    def __call__(self, x):
        return (x - self.mean) / mx.maximum(mx.sqrt(self.variance), self._config["epsilon"])


class RNN(nn.Module):
    """A sequence model used as a Keras RNN layer: x (B, T, I) -> output (or output, *states)."""

    def __init__(self, model, return_state: bool = False, go_backwards: bool = False):
        super().__init__()
        self.model = model
        self.return_state = return_state
        self.go_backwards = go_backwards

    def __call__(self, x):
        if self.go_backwards:
            x = x[:, ::-1] if self.model.batch_first else x[::-1]
        output, state = self.model(x)
        if not self.return_state:
            return output
        # Keras orders mixed-memory states (memory, ODE state); ours are (h, c) = (ODE, memory).
        return (output, state[1], state[0]) if isinstance(state, tuple) else (output, state)


LAYER_TYPES = {cls.__name__: cls for cls in (Dense, Activation, Dropout, Flatten, Normalization)}


class Stack(nn.Module):
    """Layers applied in order; see the module docstring. ``stack(x) -> output``."""

    def __init__(self, layers: list):
        super().__init__()
        self.layers = list(layers)

    def __call__(self, x):
        x = mx.array(x) if not isinstance(x, mx.array) else x
        for layer in self.layers:
            x = layer(x)
        return x

    @property
    def rnn_layers(self) -> list:
        return [layer for layer in self.layers if isinstance(layer, RNN)]

    def get_config(self) -> dict:
        layers = []
        for layer in self.layers:
            if isinstance(layer, RNN):
                layers.append(
                    {"type": "RNN", "model": layer.model.get_config(), "return_state": layer.return_state, "go_backwards": layer.go_backwards}
                )
            else:
                layers.append(dict(layer._config))
        return {"class": "Stack", "layers": layers}


def stack_from_config(config: dict) -> Stack:
    from .models import model_from_config

    layers = []
    for spec in config["layers"]:
        spec = dict(spec)
        kind = spec.pop("type")
        if kind == "RNN":
            layers.append(RNN(model_from_config(spec.pop("model")), **spec))
        elif kind in LAYER_TYPES:
            layers.append(LAYER_TYPES[kind](**spec))
        else:
            raise ValueError(f"Unknown Stack layer type {kind!r}; expected RNN or one of {sorted(LAYER_TYPES)}")
    return Stack(layers)

