"""Sigmoid and tanh built from adds, multiplies and exponent bits, fused by ``mx.compile``.

MLX's CPU backend on Linux evaluates exp/sigmoid at ~14 ns an element (the library is built
without AVX/FMA); additions and multiplications cost well under 1 ns. The LTC evaluates a
sigmoid per synapse six times a step, so it spends nearly all its time there. This sigmoid
computes ``1 / (1 + exp(-x))`` with the classic single-precision exp (Cephes ``expf``):
``exp(x) = 2**n * p(r)``, ``n = round(x / ln 2)``, ``r = x - n ln 2`` split in two parts, ``p``
a degree-7 polynomial, ``2**n`` written straight into the exponent bits. Over the float
range its absolute error is <= 9e-8 and its relative error <= 1.5e-7 wherever the sigmoid
is a normal float (``tests/test_fastmath.py`` sweeps it), as accurate as ``mx.sigmoid``; NaN
stays NaN, +inf gives 1, -inf 6e-39 (the argument is clipped at -87). Compiled, it runs ~7x faster. ``tanh`` is ``sign(x) (1 - e) / (1 + e)``
with ``e = exp(-2|x|)`` from the same exp: absolute error <= 1.2e-7 (``mx.tanh``: ~6e-8). The
gradients are the exact ``s (1 - s)`` and ``1 - t**2`` of their own outputs.
"""

from __future__ import annotations

import mlx.core as mx

LOG2E = 1.44269504088896341
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 in two parts, so r = x - n ln 2 is exact
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _exp(x: mx.array) -> mx.array:
    # Below -87 exp underflows to the smallest normal range; above 88 it would overflow, and
    # 1 / (1 + exp(-x)) is already 0 or 1 to float32 precision there.
    x = mx.clip(x, -87.0, 88.0)
    n = mx.floor(x * LOG2E + 0.5)
    r = x - n * LN2_HI - n * LN2_LO
    p = EXP_POLY[0]
    for c in EXP_POLY[1:]:
        p = p * r + c
    p = p * r * r + r + 1.0
    two_n = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)
    return p * two_n


def _sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + _exp(-x))


def _tanh(x: mx.array) -> mx.array:
    # exp of a non-positive argument only: no overflow, and (1 - e) loses no more than half
    # an ulp of 1 for small |x|, an absolute error like mx.tanh's.
    e = _exp(-2.0 * mx.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return mx.where(x < 0, -t, t)


# Below this many elements the call into a compiled function (and, for gradients, the custom
# vjp) costs more than MLX's own transcendental saves: measured with tools/bench.py, small
# batches and wired CfC layers got slower, large batches and the LTC's synapse tensors faster.
MIN_ELEMENTS = 16384

def _with_gradient(function, derivative_from_output):
    """``function`` compiled, with the gradient written in terms of its own output."""
    # Not shapeless: the bit-level view has no shape rule for that; one trace per input shape.
    compiled = mx.compile(function)

    @mx.custom_function
    def fast(x: mx.array) -> mx.array:
        return compiled(x)

    @fast.vjp
    def fast_vjp(primals, cotangent, output):
        return (cotangent * derivative_from_output(output),)

    return fast


_fast_sigmoid = _with_gradient(_sigmoid, lambda s: s * (1.0 - s))
_fast_tanh = _with_gradient(_tanh, lambda t: 1.0 - t * t)


def sigmoid(x: mx.array) -> mx.array:
    """Elementwise logistic sigmoid, float32; see the module docstring. Small arrays use
    ``mx.sigmoid`` (see ``MIN_ELEMENTS``)."""
    return _fast_sigmoid(x) if x.size >= MIN_ELEMENTS else mx.sigmoid(x)


def tanh(x: mx.array) -> mx.array:
    """Elementwise tanh, float32; see the module docstring. Small arrays use ``mx.tanh``."""
    return _fast_tanh(x) if x.size >= MIN_ELEMENTS else mx.tanh(x)
