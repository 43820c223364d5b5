"""Helpers the tests share: load ncps.torch weights into ncps_mlx models, perturb them, compare."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import mlx.core as mx

from ncps_mlx.converters.torch_reader import rename_torch_keys

try:  # torch is optional: without it the parity tests skip and the fixtures stand in
    import torch
except ImportError:
    torch = None

if torch is not None:
    # One perturbation for the fixtures and the live tests: tools/make_fixtures.py owns it.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_fixtures import perturb_  # noqa: E402


def load_torch_weights(mlx_model, torch_model) -> None:
    """Copy a torch model's state dict into the MLX model (strict: every name must match)."""
    weights = rename_torch_keys(torch_model.state_dict())
    mlx_model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)


def to_np(x):
    if isinstance(x, (tuple, list)):
        return tuple(to_np(v) for v in x)
    if isinstance(x, (mx.array, np.ndarray)):
        return np.array(x)
    return x.detach().numpy()


def max_abs_diff(a, b) -> float:
    a, b = to_np(a), to_np(b)
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        return max(max_abs_diff(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.max(np.abs(a - b)))


def _float32(x, make):
    """None, an array, or a tuple of them, as float32 arrays made by ``make``."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_float32(v, make) for v in x)
    return make(np.asarray(x, dtype=np.float32))


def to_torch(x):
    return _float32(x, torch.from_numpy)


def to_mlx(x):
    return _float32(x, mx.array)
