"""A sequence's input projection, for every step at once: x W^T + b as the ``InputProjection``
primitive (``primitives.cpp``), the product in the kernels' BLAS (on MLX's path it is MLX's
matmul, which on Linux runs on mlx[cpu]'s reference BLAS, ~3 GFLOP/s: for a CfC at batch 1024
two thirds of the forward pass); an LTC's sensory synapses as the ``LTCSensory`` primitive
(``ltc.c``: MLX ran them as (B, T, I, S) tensors, ~40% of W3's forward pass)."""

from __future__ import annotations

from ...lowering import LTCLowering
from .. import blas
from .loader import all_float32, applies, cfc_applies, loaded


def input_projection(lowering, x, features_first=False):
    """A cell's input projection of a sequence x (B, T, I) in the kernels, from its lowering
    (``ncps_mlx.lowering``): an LTC's sensory synapse sums, else x W^T + b of
    ``lowering.input_projection()``; laid out as the cell lays it out (feature-major cells, or
    with ``features_first``: a (B, T, P) view of (T, P, B)), differentiable. None where the
    kernels do not apply or the arrays are not float32."""
    if isinstance(lowering, LTCLowering):
        arrays = lowering.derived("ltc.sensory", lowering.sensory_synapse_arrays)
        if not all_float32(x, *arrays) or not applies():
            return None
        return loaded().ltc_sensory(lowering.map_input(x), *arrays)
    if not cfc_applies():
        return None
    weight, bias = lowering.input_projection()
    if not all_float32(x, weight, bias):
        return None
    features_first = features_first or lowering.features_first
    y = loaded().input_projection(x, weight, bias, features_first, blas.sgemm_address())
    return y.transpose(2, 0, 1) if features_first else y
