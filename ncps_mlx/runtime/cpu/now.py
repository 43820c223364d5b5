"""One-step calls computed at once, on the calling thread.

A controller calls a model one step at a time (T = 1, often batch 1). MLX evaluates a graph on
its stream's thread, and handing each call's nodes over and waiting for them costs several
times the step's arithmetic. So the kernels' entry points take ``now``: where every array a node
would read is computed, float32, row-contiguous and not traced (``mx.grad``, ``mx.vmap`` and
``mx.compile`` need nodes in their graphs), the kernel runs at once, as its node would, and
returns computed arrays. The helpers here give a model's results from those the same way;
where an array is not ready each returns None, and the caller takes MLX's (lazy) operation.
They are for calls made where ``applies()`` said yes (``runtime.at_once``).
"""

from __future__ import annotations

from .. import blas
from .loader import loaded


def features(a, feature_major: bool, start: int, stop: int, keep_time: bool = True, scale=None, shift=None):
    """Features [start, stop) of a computed (T, S, B) (``feature_major``) or (B, T, S) array as
    a computed (B, T, n), or the last step's (B, n) without ``keep_time``; times ``scale`` and
    plus ``shift`` (n,) where given. None where an array is not ready."""
    return loaded().features_now(a, feature_major, start, stop, keep_time, scale, shift)


def filled(a, shape):
    """A computed array of ``shape`` holding a's one value, or a's values in their order; None
    where a is not ready or has another count."""
    return loaded().filled_now(a, list(shape))


def keeps_every_row(mask) -> bool:
    """Whether a one-step call's mask (an array) is computed, not traced, and keeps every row
    (nonzero everywhere): then the call is the unmasked step. False where it is not ready or drops
    a row (the masked way takes it)."""
    return loaded().nonzero_now(mask)


def linear(y, weight, bias):
    """y (B, T, F) or (B, F) times W^T plus b, computed at once in the kernels' BLAS (a model's
    output projection); None where an array is not ready or the kernels do not apply."""
    if blas.sgemm_address() is None or y.ndim not in (2, 3) or not loaded().ready([y, weight, bias]):
        return None
    rows = y if y.ndim == 3 else loaded().filled_now(y, [y.shape[0], 1, y.shape[1]])
    out = loaded().input_projection(rows, weight, bias, False, blas.sgemm_address(), True)
    return out if y.ndim == 3 else loaded().features_now(out, False, 0, out.shape[2], False)


def step_of(sequence):
    """A kernel's one-step call at once from its ``sequence(lowering, x, h, ts, ..., now=True)``
    (-> (outputs, states[, memories]), (B, T, .) each): -> (outputs (B, 1, F), state (B, S),
    memory (B, S) or None), computed; None where they are not. Given arrays not yet computed are
    evaluated first (``settle``: outside any transformation)."""

    def step(lowering, x, h, ts=None, **options):
        memory = options.get("memory")
        given = [x, h] + [a for a in (ts, None if memory is None else memory[1]) if a is not None]
        if x.shape[1] != 1 or not loaded().settle(given):
            return None
        result = sequence(lowering, x, h, ts, now=True, **options)
        if result is None or not loaded().ready(list(result)):
            return None
        last = [features(a, False, 0, a.shape[2], keep_time=False) for a in result[1:]]
        return result[0], last[0], (last[1] if len(last) > 1 else None)

    return step
