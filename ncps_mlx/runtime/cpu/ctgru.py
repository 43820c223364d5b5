"""The CTGRU's loop in ``ctgru.c``, as the ``CTGRUSequence`` primitive (``primitives.cpp``)."""

from __future__ import annotations

import mlx.core as mx

from ...lowering import CTGRULowering
from .. import blas
from . import now as at_once
from .loader import all_float32, by_row, cfc_applies, loaded
from .projection import input_projection


def ctgru_sequence(cell: CTGRULowering, x, state, ts=None, now=False):
    """A ``CTGRUCell``'s whole loop in the kernel, from its lowering, differentiable in every
    input: the sequence x (B, T, I), state (B, U M), ts None, 0-d or (B, T, 1) ->
    (outputs (B, T, U), every step's state (B, T, U M)); None where the kernel does not apply
    (as for a CfC: the kernels' BLAS is needed) or the arrays are not float32. Timespans count
    only with ``mozer`` decay, as in the cell. ``now``: computed at once where every array is
    ready (``now.py``), for a one-step call."""
    if not all_float32(x, state, cell.w_q, ts) or not (now or cfc_applies()):
        return None
    inputs = input_projection(cell, x, now=now)  # (B, T, 2 U M + U): the input halves of tau_r, tau_s, detect
    if inputs is None:
        return None
    timed = cell.mozer and ts is not None
    batch, steps = inputs.shape[:2]
    arrays = [inputs, state]
    if timed:
        ready = at_once.filled(ts, (batch, steps)) if now else None
        arrays.append(by_row(ts, batch, steps) if ready is None else ready)
    arrays += [cell.derived("ctgru.w_rs", lambda: mx.concatenate([cell.w_r, cell.w_s], axis=1)),
               cell.derived("ctgru.w_q", lambda: mx.contiguous(cell.w_q))]
    # The time scales are constants of the configuration, attributes of the node.
    clip = 0.0 if cell.cell_clip is None else float(cell.cell_clip)
    outputs, states = loaded().ctgru_sequence(arrays, cell.M, cell.mozer, clip, list(cell.ln_tau), list(cell.decay), timed,
                                               blas.sgemm_address(), now)
    return outputs, states
