"""Shared helpers: build a model in ncps.torch and in ncps_mlx, share the weights, compare."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from ncps_mlx.converters.torch_reader import rename_torch_keys

torch = pytest.importorskip("torch")

# Parameters of an LTC that must stay positive when no softplus is applied at run time; the
# solver divides by a sum of them, so we perturb them multiplicatively.
LTC_POSITIVE = {"gleak", "cm", "w", "sensory_w"}


def perturb_(model, seed: int, scale: float = 0.5) -> None:
    """Move every trainable torch parameter away from its initial value, deterministically.

    The noise is relative to each tensor's own spread (0.1 for constant-initialised tensors
    such as LTC input_w), so weights change substantially without making the dynamics chaotic:
    with a flat 0.3 on 128-unit backbones, torch float32 itself drifts 5e-5 from torch float64
    within 24 steps, and no float32 implementation could be compared at 1e-5.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen)
            if name.split(".")[-1] in LTC_POSITIVE and "lstm" not in name:
                param.mul_(torch.exp(0.3 * noise))
            else:
                spread = float(param.std()) if param.numel() > 1 else 0.0
                param.add_(scale * (spread if spread > 1e-6 else 0.1) * noise)


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


def to_torch(x):
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(to_torch(v) for v in x)
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def to_mlx(x):
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(to_mlx(v) for v in x)
    return mx.array(np.asarray(x, dtype=np.float32))
