"""Small pieces shared by the cells: initialisers and argument checks (the activations are
``ncps_mlx.lowering.BACKBONE_ACTIVATIONS``)."""

from __future__ import annotations

import math

import mlx.core as mx

from ..arguments import check_int  # noqa: F401  (the cells check their sizes with it)


def glorot_uniform(shape) -> mx.array:
    """Xavier/Glorot uniform for an (out, in) weight, as torch.nn.init.xavier_uniform_."""
    fan_out, fan_in = shape
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return mx.random.uniform(-limit, limit, shape)


def check_choice(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {what} {value!r}; expected one of {list(allowed)}")
