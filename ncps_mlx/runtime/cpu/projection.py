"""A sequence's input projection, for every step at once: x W^T + b as the ``InputProjection``
primitive (``primitives.cpp``), the product in the kernels' BLAS (on MLX's path it is MLX's
matmul, which on Linux runs on mlx[cpu]'s reference BLAS, ~3 GFLOP/s: for a CfC at batch 1024
two thirds of the forward pass); an LTC's sensory synapses as the ``LTCSensory`` primitive
(``ltc.c``: MLX ran them as (B, T, I, S) tensors, ~40% of W3's forward pass)."""

from __future__ import annotations

import mlx.core as mx

from ...lowering import Lowering, LTCLowering
from .. import blas
from . import now as at_once
from .loader import all_float32, applies, cfc_applies, loaded


def input_projection(lowering, x, features_first=False, now=False):
    """A cell's input projection of a sequence x (B, T, I) in the kernels, from its lowering
    (``ncps_mlx.lowering``): an LTC's sensory synapse sums, else x W^T + b of
    ``lowering.input_projection()``; laid out as the cell lays it out (feature-major cells, or
    with ``features_first``: a (B, T, P) view of (T, P, B)), differentiable. None where the
    kernels do not apply or the arrays are not float32. ``now``: computed at once where every
    array is ready (``now.py``), for calls where ``runtime.at_once()`` said yes."""
    if isinstance(lowering, LTCLowering):
        arrays = lowering.derived("ltc.sensory", lambda: tuple(mx.contiguous(a) for a in lowering.sensory_synapse_arrays()))
        if not all_float32(x, *arrays) or not (now or applies()):
            return None
        mapped = at_once.features(x, False, 0, x.shape[2], True, lowering.input_w, lowering.input_b) if now else None
        return loaded().ltc_sensory(lowering.map_input(x) if mapped is None else mapped, *arrays, now)
    features_first = features_first or lowering.features_first
    if not features_first:
        return _projected(lowering, x, False, now)
    y = _projected(lowering, x, True, now)
    return None if y is None else y.transpose(2, 0, 1)


def features_first_projection(lowering, x, now=False):
    """x W^T + b of a (non-LTC) lowering's ``input_projection()``, as a (T, P, B) array; None
    where the kernels do not apply."""
    return _projected(lowering, x, True, now)


def _projected(lowering, x, features_first: bool, now: bool):
    if not (now or cfc_applies()):
        return None
    weight, bias = _weights(lowering)
    if not all_float32(x, weight, bias):
        return None
    return loaded().input_projection(x, weight, bias, features_first, blas.sgemm_address(), now)


def _weights(lowering):
    """A lowering's ``input_projection()`` row-contiguous (a slice would be copied by a node every
    call, and would not be ready for a call at once), kept with the lowering where it is one of
    ``ncps_mlx.lowering``'s."""
    def make():
        return tuple(mx.contiguous(a) for a in lowering.input_projection())

    return lowering.derived("contiguous input projection", make) if isinstance(lowering, Lowering) else make()
