"""The CTRNN's loop in ``ctrnn.c``, as the ``CTRNNSequence`` primitive (``primitives.cpp``)."""

from __future__ import annotations

import mlx.core as mx

from ...lowering import CTRNNLowering
from .. import blas
from . import now as at_once
from .loader import all_float32, by_row, cfc_applies, loaded
from .projection import input_projection


def ctrnn_sequence(cell: CTRNNLowering, x, h, ts=None, now=False):
    """A ``CTRNNCell``'s whole loop in the kernel, from its lowering, differentiable in every
    input: the sequence x (B, T, I), h (B, U), ts None, 0-d or (B, T, 1) -> (outputs, every
    step's state), the same (B, T, U) array; None where the kernel does not apply (as for a CfC:
    the kernels' BLAS is needed) or the arrays are not float32. ``now``: computed at once where
    every array is ready (``now.py``), for a one-step call."""
    if not all_float32(x, h, cell.weight, ts) or not (now or cfc_applies()):
        return None
    inputs = input_projection(cell, x, now=now)  # (B, T, U): the input half of the tanh argument
    if inputs is None:
        return None
    batch, steps = inputs.shape[:2]
    arrays = [inputs, h]
    if ts is not None:
        ready = at_once.filled(ts, (batch, steps)) if now else None
        arrays.append(by_row(ts, batch, steps) if ready is None else ready)
    if cell.global_feedback:
        arrays.append(cell.derived("ctrnn.recurrent", lambda: mx.contiguous(cell.weight[:, cell.input_size :].T)))
    arrays.append(cell.tau)
    clip = 0.0 if cell.cell_clip is None else float(cell.cell_clip)
    states = loaded().ctrnn_sequence(arrays, cell.ode_unfolds, cell.delta_t, clip, ts is not None,
                                      cell.global_feedback, blas.sgemm_address(), now)
    return states, states
