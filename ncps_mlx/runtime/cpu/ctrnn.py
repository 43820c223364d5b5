"""The CTRNN's loop in ``ctrnn.c``, as the ``CTRNNSequence`` primitive (``primitives.cpp``)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import blas
from . import all_float32, by_row, cfc_applies, library
from .projection import projected


def ctrnn_cell_sequence(cell, x, h, ts=None, differentiable=False):
    """A ``CTRNNCell``'s whole loop in the kernel, differentiable in every input: the sequence
    x (B, T, I), h (B, U), ts None, 0-d or (B, T, 1) -> (outputs, every step's state),
    the same (B, T, U) array; None where the kernel does not apply (as for a CfC: the kernels'
    BLAS is needed) or the arrays are not float32."""
    weight = cell.step.weight
    if not all_float32(x, h, weight, ts) or not cfc_applies():
        return None
    inputs = projected(cell, x)  # (B, T, U): the input half of the tanh argument
    batch, steps = inputs.shape[:2]
    arrays = [inputs, h]
    if ts is not None:
        arrays.append(by_row(ts, batch, steps))
    if cell.global_feedback:
        arrays.append(weight[:, cell.input_size :].T)
    arrays.append(nn.softplus(cell.tau_raw).reshape(1) if cell.learn_tau else mx.array([cell.tau], mx.float32))
    clip = 0.0 if cell.cell_clip is None else float(cell.cell_clip)
    states = library().ctrnn_sequence(arrays, cell.ode_unfolds, cell.delta_t, clip, ts is not None,
                                      cell.global_feedback, blas.sgemm_address())  # fmt: skip
    return states, states
