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
    return np.array(getattr(fastmath, fn)(mx.array(x)))


def test_sigmoid_error_over_the_float_range():
    with np.errstate(over="ignore"):
        reference = 1.0 / (1.0 + np.exp(-X.astype(np.float64)))
    got = fast("sigmoid", X)
    assert np.all((got >= 0.0) & (got <= 1.0))
    assert np.max(np.abs(got - reference)) <= 2e-7


def test_tanh_error_over_the_float_range():
    reference = np.tanh(X.astype(np.float64))
    got = fast("tanh", X)
    assert np.all(np.abs(got) <= 1.0)
    assert np.max(np.abs(got - reference)) <= 4e-7
    # Relative too, down to |x| = 3e-39 (tanh(x) = x P / Q): below, 1 / x overflows in the clip
    # and tanh flushes to a zero of x's sign.
    relative = np.abs(X) >= 3e-39
    assert np.max(np.abs(got[relative] - reference[relative]) / np.abs(reference[relative])) <= 4e-7
    flushed = np.abs(X) < 2.9e-39
    assert np.all(got[flushed] == 0.0) and np.array_equal(np.signbit(got[flushed]), np.signbit(X[flushed]))


def every_float_near_the_clip() -> np.ndarray:
    bits = np.arange(np.float32(7.5).view(np.int32), np.float32(8.5).view(np.int32), dtype=np.int32)
    return np.concatenate([bits.view(np.float32), -bits.view(np.float32)])


@pytest.mark.parametrize("compiled", [False, True])
def test_never_beyond_one_at_any_float_near_the_clip(compiled):
    """The float32 ratio oscillates around 1 above 8.022 (33 floats exceed it): the clip and the
    reciprocal round trip that implements it must keep every input below that."""
    x = every_float_near_the_clip()
    tanh = mx.compile(fastmath.rational_tanh) if compiled else fastmath.tanh
    got = np.array(tanh(mx.array(x)))
    assert np.all(np.abs(got) <= 1.0)
    assert np.max(np.abs(got - np.tanh(x.astype(np.float64)))) <= 4e-7
    sigmoid = np.array(fastmath.sigmoid(mx.array(2 * x)))
    assert np.all((sigmoid >= 0.0) & (sigmoid <= 1.0))


def test_clip_keeps_inputs_and_saturates_at_clip():
    x = np.concatenate([every_float_near_the_clip(), np.array([np.inf, -np.inf, 1e30, -3e38, 1.0, -1e-30], np.float32)])
    got = np.array(mx.compile(fastmath.clip)(mx.array(x)))
    inside = np.abs(x) < fastmath.BOUND
    assert np.max(np.abs(got[inside] - x[inside]) / np.abs(x[inside])) <= 2**-23  # within an ulp
    assert np.all(np.abs(got) <= np.float32(fastmath.CLIP))
    outside = np.abs(x) > fastmath.BOUND
    assert np.array_equal(got[outside], np.sign(x[outside]) * np.float32(fastmath.CLIP))


def test_mlx_evaluates_the_rational_as_the_fit_tool_models_it():
    """tools/fit_tanh.py chooses the clip from a numpy float32 model of the evaluation; it is
    only valid if MLX's compiled loop computes the same bits."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("fit_tanh", Path(__file__).parent.parent / "tools" / "fit_tanh.py")
    fit_tanh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_tanh)
    x = fit_tanh.floats_between(4.0, 8.4)[::7]
    model = fit_tanh.evaluate_float32(fastmath.P, fastmath.Q, x, clip=np.inf)
    s = mx.array(x)
    got = np.array(mx.compile(lambda v: v * fastmath._estrin(fastmath.P, *_powers(v)) / fastmath._estrin(fastmath.Q, *_powers(v)))(s))
    assert np.array_equal(got, model)
    clip, bound, inverse = fit_tanh.choose_clip(fastmath.P, fastmath.Q)
    assert (float(clip), float(bound), float(inverse)) == (fastmath.CLIP, fastmath.BOUND, fastmath.INVERSE_BOUND)


def _powers(x):
    s = x * x + 1e-9
    s2 = s * s
    return s, s2, s2 * s2


def test_the_fit_itself_is_tighter_than_float32_rounding():
    """In float64 the rational (with its float32 coefficients) is within 5e-8 of tanh: the float32 error bound above is
    rounding, not the approximation."""
    x = np.linspace(0.0, fastmath.CLIP, 200_001)
    s = x * x
    fit = x * np.polyval(fastmath.P[::-1], s) / np.polyval(fastmath.Q[::-1], s)
    assert np.max(np.abs(fit - np.tanh(x))) <= 5e-8


@pytest.mark.parametrize("fn", ["sigmoid", "tanh"])
def test_special_values(fn):
    got = fast(fn, np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e3, -1e3], np.float32))
    assert np.isnan(got[0])
    if fn == "sigmoid":
        expected = [1.0, 0.0, 0.5, 0.5, 1.0, 0.0]
    else:
        expected = [1.0, -1.0, 0.0, -0.0, 1.0, -1.0]
    # Saturated values are one ulp inside the limits (the clip, see the module docstring).
    assert np.max(np.abs(got[1:] - np.array(expected, np.float32))) <= 6e-8
    assert np.array_equal(np.signbit(got[3:5]), [False, fn == "tanh"])


@pytest.mark.parametrize("fn", ["sigmoid", "tanh"])
def test_gradients_match_mlx(fn):
    x = mx.array(np.random.default_rng(1).normal(scale=3.0, size=(64, 64, 8)).astype(np.float32))
    weights = mx.array(np.random.default_rng(2).normal(size=x.shape).astype(np.float32))
    ours = mx.grad(lambda v: mx.sum(getattr(fastmath, fn)(v) * weights))(x)
    exact = mx.grad(lambda v: mx.sum(getattr(mx, fn)(v) * weights))(x)
    # The gradient is 1 - t**2 (or s (1 - s)) of the approximate output: off by at most
    # twice the output's error (4e-7) times the weight.
    error = mx.abs(ours - exact) / mx.maximum(mx.abs(weights), 1.0)
    assert float(mx.max(error)) <= 2 * 4e-7 + 1e-7


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (32, 64, 64)])
def test_any_shape_and_inside_a_compiled_function(shape):
    x = mx.array(np.random.default_rng(3).normal(scale=4.0, size=shape).astype(np.float32))
    compiled = mx.compile(lambda v: fastmath.sigmoid(v) + fastmath.tanh(v))
    expected = mx.sigmoid(x) + mx.tanh(x)
    assert compiled(x).shape == x.shape
    # Each is within its bound of the truth, MLX's within 1e-7; the sum rounds once more.
    assert float(mx.max(mx.abs(compiled(x) - expected))) <= 2e-7 + 4e-7 + 2e-7 + 2.4e-7


@pytest.mark.parametrize("fn", ["sigmoid", "tanh"])
def test_both_forms_small_and_large_arrays(fn):
    """Under fastmath.SMALL elements one fused loop with mx.clip, from it on the vectorised form
    with the arithmetic clip: the same function to within rounding, error bound and limits."""
    x = every_float_near_the_clip()[:: 97]
    x = np.concatenate([x, np.linspace(-20, 20, 4001, dtype=np.float32), [np.inf, -np.inf, 0.0]]).astype(np.float32)
    reference = np.tanh(x.astype(np.float64)) if fn == "tanh" else 0.5 + 0.5 * np.tanh(0.5 * x.astype(np.float64))
    for size in (fastmath.SMALL - 1, fastmath.SMALL, 4 * fastmath.SMALL):
        chunk = np.resize(x, size)
        expected = np.resize(reference, size)
        for mode in ("fast", "inline"):
            with fastmath._using(mode):
                got = np.array(mx.compile(getattr(fastmath, fn))(mx.array(chunk)))
            assert np.max(np.abs(got - expected)) <= (4e-7 if fn == "tanh" else 2e-7), (size, mode)
            assert np.all(np.abs(got) <= 1.0)
