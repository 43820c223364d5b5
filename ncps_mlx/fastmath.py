"""Sigmoid and tanh from adds, multiplies and divisions, which ``mx.compile`` fuses into
vectorised loops.

MLX's CPU backend on Linux evaluates exp/sigmoid/tanh at ~14-18 ns an element (the library
is built without AVX/FMA), where a fused add or multiply costs a fraction of a nanosecond.
CfC spends most of a step in three tanh/sigmoid calls and the LTC evaluates a sigmoid per
synapse six times a step, so both are bound by them. Here

    tanh(x) = x P(x^2) / Q(x^2)  for |x| <= 8.022  (x clipped to that first),

with P and Q of degree 4: a rational fit of tanh(x) / x on [0, 7.9] (``tools/fit_tanh.py``
makes the coefficients and the clip; in float64 the fit is within 1e-8). The clip is the
largest float below which the float32 ratio never exceeds 1 (checked at every float) and at
which it is 1 - 6e-8, so saturated values are off by about one ulp (tanh(8.022) =
1 - 2.1e-7). Eigen, and so TensorFlow/XLA on CPU, uses the same kind of approximation.
Evaluated in float32 the absolute error is <= 4e-7 over the whole float range (mx.tanh:
~9e-8; ``tests/test_fastmath.py`` sweeps every binade), relative <= 4e-7 down to
|x| = 3e-39; below that the vectorised form (arrays of ``SMALL`` elements or more) flushes
tanh(x) to a zero of x's sign. ``sigmoid(x) = 0.5 + 0.5 tanh(x / 2)``: absolute error
<= 2e-7; it is 3e-8 (not ~1e-38) in the far negative tail, where only absolute error
matters to the models. NaN stays NaN, +-inf give +-1; |tanh| never exceeds 1.

How it is written is dictated by the loops MLX generates for a compiled function and by the
depth at which it cuts them:

* No comparison-based select. The generated C++ is built with g++ -O3 and default
  floating-point flags, under which g++ will not vectorise a loop containing ``a > b ? a : b``
  (a comparison may trap), so ``mx.maximum``/``mx.clip``/``mx.where`` left the whole fused
  loop scalar: 2.4 ns an element where the same loop vectorised takes 0.9. ``mx.sign`` (a
  select between constants) does vectorise, so the clip is built from it (``clip``), and the
  floor that keeps x^8 a normal float is an addition.
* One cut, placed on purpose. mx.compile fuses at most ~11 operations deep; the clip plus
  the rational is deeper, and left to itself MLX cut it into four kernels. ``mx.contiguous``
  after the clip makes the cut there: one kernel for the clip, one for the rational. Arrays
  under ``SMALL`` elements take one fused scalar loop clipped by ``mx.clip`` instead: there
  launching two kernels costs more than the arithmetic saved.

The gradients are the exact ``1 - t**2`` and ``s (1 - s)`` of the function's own outputs (a
custom vjp), not the derivative of the rational.
"""

from __future__ import annotations

import contextlib
import threading

import mlx.core as mx

CLIP = 8.021990776062012
# tanh(x) / x ~= P(x^2) / Q(x^2); float32 values of the fitted coefficients, lowest first.
P = (1.0, 0.13450613617897034, 0.003578983014449477, 2.2023032215656713e-05, 1.5427520594357702e-08)
Q = (1.0, 0.46783941984176636, 0.026192206889390945, 0.0003423633170314133, 8.598630074629909e-07)


def _estrin(c, s, s2, s4):
    # Estrin's scheme, not Horner's: the graph is 4 operations deep instead of 8, and
    # mx.compile cuts fused kernels by depth, so a whole tanh fits in fewer of them.
    return (c[0] + c[1] * s) + s2 * (c[2] + c[3] * s) + c[4] * s4


# Inputs with |x| > BOUND become +-1 / INVERSE_BOUND = +-CLIP. BOUND is two ulps below CLIP, so
# that the reciprocal round trip in ``clip`` (at most an ulp) never lands beyond CLIP.
BOUND = 8.021988868713379
INVERSE_BOUND = 0.12465733289718628  # the smallest float32 whose float32 reciprocal is <= CLIP


def clip(x: mx.array) -> mx.array:
    """x clipped to [-BOUND, BOUND] by arithmetic alone (see the module docstring): 1 / r, where
    r is 1 / x inside the bound and +-INVERSE_BOUND outside it. Through reciprocals infinities
    need no special case (1 / inf = 0, where a blend of x itself would compute 0 * inf = NaN).
    Inside the bound the result is within an ulp of x; |x| < 3e-39 (1 / x overflows) gives +-0."""
    inside = mx.sign(BOUND - mx.abs(x))  # 1 inside, -1 outside, 0 on the bound (and for NaN)
    r = (0.5 + 0.5 * inside) * (1.0 / x) + (0.5 - 0.5 * inside) * (mx.sign(x) * INVERSE_BOUND)
    return 1.0 / r


# Below this many elements a tanh is one fused loop clipped with ``mx.clip``: scalar, but one
# kernel where the vectorised form takes two, and at these sizes a kernel launch costs more
# than the arithmetic.
SMALL = 2048


def rational_tanh(x: mx.array) -> mx.array:
    """The approximation itself, as plain MLX operations (no custom gradient)."""
    return _tanh_small(x) if x.size < SMALL else _tanh_large(x)


def _tanh_small(x: mx.array) -> mx.array:
    return _rational(mx.clip(x, -CLIP, CLIP))


def _tanh_large(x: mx.array) -> mx.array:
    return _rational(mx.contiguous(clip(x)))


def _rational(x: mx.array) -> mx.array:
    # The floor keeps s**4 a normal float (x86 computes subnormals ~100x slower); P and Q
    # change by 3e-10 relative there, far below float32's resolution.
    s = x * x + 1e-9
    s2 = s * s
    s4 = s2 * s2
    return x * _estrin(P, s, s2, s4) / _estrin(Q, s, s2, s4)


def rational_sigmoid(x: mx.array) -> mx.array:
    return _sigmoid_of(rational_tanh, x)


def _sigmoid_of(tanh_form, x: mx.array) -> mx.array:
    return 0.5 + 0.5 * tanh_form(0.5 * x)


def _with_gradient(function, derivative_from_output):
    """``function`` compiled, with the gradient written in terms of its own output.

    Compiled for each shape, not shapeless: called on its own (a cell's single step, eager
    use), the shapeless form was several times slower."""
    compiled = mx.compile(function)

    @mx.custom_function
    def fast(x: mx.array) -> mx.array:
        return compiled(x)

    @fast.vjp
    def fast_vjp(primals, cotangent, output):
        return (cotangent * derivative_from_output(output),)

    return fast


# The form is chosen by size outside the compiled functions: a custom function per form.
_fast_tanh = {small: _with_gradient(form, lambda t: 1.0 - t * t) for small, form in ((True, _tanh_small), (False, _tanh_large))}
_fast_sigmoid = {
    small: _with_gradient(lambda x, form=form: _sigmoid_of(form, x), lambda s: s * (1.0 - s))
    for small, form in ((True, _tanh_small), (False, _tanh_large))
}


_mode = threading.local()


@contextlib.contextmanager
def _using(new_mode: str):
    previous = mode()
    _mode.value = new_mode
    try:
        yield
    finally:
        _mode.value = previous


def mode() -> str:
    """This thread's mode: "fast" (the rational with its custom gradient, the default),
    "inline" (``inline_functions``) or "exact" (``exact_functions``)."""
    return getattr(_mode, "value", "fast")


def exact_functions(enabled: bool = True):
    """Within this block (in this thread) ``tanh`` and ``sigmoid`` are MLX's own.

    ``SequenceModel`` uses it when it runs its plain loop under a transformation
    (``mx.vmap``, an outer ``mx.compile``): there every compiled function is traced again at
    each call, so the rational's ~20 operations would each be dispatched on their own, and
    one native operation with a native gradient is faster.
    """
    return _using("exact") if enabled else contextlib.nullcontext()


def custom_gradients():
    """Within this block ``tanh`` and ``sigmoid`` carry their custom gradient again (inside an
    ``inline_functions`` block: a derivative taken while tracing a forward pass)."""
    return _using("fast")


def inline_functions():
    """Within this block ``tanh`` and ``sigmoid`` are the bare rational, without the custom
    gradient around it: for tracing compiled steps that are never differentiated, where the
    custom function's boundary would keep MLX from fusing across it (CfC: -16 to -25% a step).
    """
    return _using("inline")


def tanh(x: mx.array) -> mx.array:
    """Elementwise tanh of a float32 array of any shape; see the module docstring. Another
    dtype (a float16 or bfloat16 model) gets MLX's own, in that dtype."""
    if x.dtype != mx.float32:
        return mx.tanh(x)
    current = mode()
    if current == "fast":
        return _fast_tanh[x.size < SMALL](x)
    return rational_tanh(x) if current == "inline" else mx.tanh(x)


def sigmoid(x: mx.array) -> mx.array:
    """Elementwise logistic sigmoid of a float32 array of any shape; see the module docstring.
    Another dtype gets MLX's own, in that dtype."""
    if x.dtype != mx.float32:
        return mx.sigmoid(x)
    current = mode()
    if current == "fast":
        return _fast_sigmoid[x.size < SMALL](x)
    return rational_sigmoid(x) if current == "inline" else mx.sigmoid(x)
