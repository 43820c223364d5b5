"""The CTGRU's loop in ``ctgru.c``, as the ``CTGRUSequence`` primitive (``primitives.cpp``)."""

from __future__ import annotations

import mlx.core as mx

from .. import blas
from . import all_float32, by_row, cfc_applies, library
from .projection import projected


def ctgru_cell_sequence(cell, x, state, ts=None, differentiable=False):
    """A ``CTGRUCell``'s whole loop in the kernel, differentiable in every input: the sequence
    x (B, T, I), state (B, U M), ts None, 0-d or (B, T, 1) ->
    (outputs (B, T, U), every step's state (B, T, U M)); None where the kernel does not apply
    (as for a CfC: the kernels' BLAS is needed) or the arrays are not float32. Timespans count
    only with ``decay="mozer"``, as in the cell."""
    w_r, w_s, w_q = cell.prepare()
    if not all_float32(x, state, w_q, ts) or not cfc_applies():
        return None
    inputs = projected(cell, x)  # (B, T, 2 U M + U): the input halves of tau_r, tau_s, detect
    mozer = cell.decay == "mozer"
    timed = mozer and ts is not None
    batch, steps = inputs.shape[:2]
    arrays = [inputs, state]
    if timed:
        arrays.append(by_row(ts, batch, steps))
    arrays += [mx.concatenate([w_r, w_s], axis=1), w_q]
    # The time scales are constants of the configuration, attributes of the node.
    ln_tau = cell._time_scales["ln_tau"].tolist()
    decay = cell._time_scales["inv_tau" if mozer else "ltc_decay"].tolist()
    clip = 0.0 if cell.cell_clip is None else float(cell.cell_clip)
    outputs, states = library().ctgru_sequence(arrays, cell.M, mozer, clip, ln_tau, decay, timed, blas.sgemm_address())
    return outputs, states
