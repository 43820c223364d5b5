"""Small pieces shared by the cells: activations and initialisers."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .. import fastmath
from ..arguments import check_int  # noqa: F401  (the cells check their sizes with it)


def lecun_tanh(x: mx.array) -> mx.array:
    """LeCun's scaled tanh, 1.7159 * tanh(0.666 x), the reference CfC backbone default."""
    return 1.7159 * fastmath.tanh(0.666 * x)


ACTIVATIONS = {
    "lecun_tanh": lecun_tanh,
    "silu": nn.silu,
    "relu": nn.relu,
    "tanh": fastmath.tanh,
    # torch.nn.GELU defaults to the exact erf form; so does mlx.nn.gelu.
    "gelu": nn.gelu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation '{name}'; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def glorot_uniform(shape) -> mx.array:
    """Xavier/Glorot uniform for an (out, in) weight, as torch.nn.init.xavier_uniform_."""
    fan_out, fan_in = shape
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return mx.random.uniform(-limit, limit, shape)


def check_choice(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {what} {value!r}; expected one of {list(allowed)}")
