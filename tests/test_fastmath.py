"""The fast sigmoid and tanh: error over the whole float range, special values, gradients."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from ncps_mlx import fastmath


def sweep() -> np.ndarray:
    """Every power-of-two scale of float32 with dense mantissas, both signs, and the extremes."""
    rng = np.random.default_rng(0)
    exponents = np.arange(-126, 128)
    mantissas = rng.uniform(1.0, 2.0, size=(exponents.size, 400))
    positive = (mantissas * np.exp2(exponents)[:, None]).astype(np.float32).ravel()
    dense = np.linspace(-40, 40, 400_001, dtype=np.float32)
    special = np.array([0.0, -0.0, 1e-45, np.finfo(np.float32).max, np.finfo(np.float32).tiny], np.float32)
    return np.concatenate([positive, -positive, dense, special, -special])


X = sweep()


def fast(fn, x):
    # Force the fast path whatever the size, to test it alone.
    return np.array(getattr(fastmath, f"_fast_{fn}")(mx.array(x)))


def test_sigmoid_error_over_the_float_range():
    with np.errstate(over="ignore"):
        reference = 1.0 / (1.0 + np.exp(-X.astype(np.float64)))
    got = fast("sigmoid", X)
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - reference)) <= 1e-7
    normal = reference >= np.finfo(np.float32).tiny
    relative = np.abs(got[normal] - reference[normal]) / reference[normal]
    assert np.max(relative) <= 2e-7  # mx.sigmoid itself reaches 4e-6 in the far negative tail


def test_tanh_error_over_the_float_range():
    reference = np.tanh(X.astype(np.float64))
    got = fast("tanh", X)
    assert np.max(np.abs(got - reference)) <= 1.2e-7
    assert np.max(np.abs(got - reference)) <= 1.5 * np.max(np.abs(np.array(mx.tanh(mx.array(X))) - reference))


@pytest.mark.parametrize("fn", ["sigmoid", "tanh"])
def test_special_values(fn):
    got = fast(fn, np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32))
    assert np.isnan(got[0])
    expected = [1.0, 0.0, 0.5, 0.5] if fn == "sigmoid" else [1.0, -1.0, 0.0, 0.0]
    # sigmoid(-inf) comes out as 6e-39, not 0: the argument is clipped at -87 before exp.
    assert np.max(np.abs(got[1:] - np.array(expected, np.float32))) <= 1e-38


@pytest.mark.parametrize("fn", ["sigmoid", "tanh"])
def test_gradients_match_mlx(fn):
    x = mx.array(np.random.default_rng(1).normal(scale=3.0, size=(64, 64, 8)).astype(np.float32))
    weights = mx.array(np.random.default_rng(2).normal(size=x.shape).astype(np.float32))
    ours = mx.grad(lambda v: mx.sum(getattr(fastmath, fn)(v) * weights))(x)
    exact = mx.grad(lambda v: mx.sum(getattr(mx, fn)(v) * weights))(x)
    assert x.size >= fastmath.MIN_ELEMENTS
    assert float(mx.max(mx.abs(ours - exact))) <= 1e-6


def test_small_arrays_use_mlx_itself():
    x = mx.array(np.linspace(-5, 5, 1000, dtype=np.float32))
    assert np.array_equal(np.array(fastmath.sigmoid(x)), np.array(mx.sigmoid(x)))
    assert np.array_equal(np.array(fastmath.tanh(x)), np.array(mx.tanh(x)))


def test_inside_a_compiled_function():
    x = mx.array(np.random.default_rng(3).normal(size=(32, 32, 32)).astype(np.float32))
    compiled = mx.compile(lambda v: fastmath.sigmoid(v) + fastmath.tanh(v))
    # Each differs from MLX's by <= ~1e-7 (both are within 1e-7 of the truth); the sums up to
    # 2 add half an ulp (1.2e-7) of rounding.
    assert float(mx.max(mx.abs(compiled(x) - (mx.sigmoid(x) + mx.tanh(x))))) <= 4e-7
