"""A sequence's input projection, for every step at once: x W^T + b as the ``InputProjection``
primitive (``primitives.cpp``), the product in the kernels' BLAS (on MLX's path it is MLX's
matmul, which on Linux runs on mlx[cpu]'s reference BLAS, ~3 GFLOP/s: for a CfC at batch 1024
two thirds of the forward pass); an LTC's sensory synapses as the ``LTCSensory`` primitive
(``ltc.c``: MLX ran them as (B, T, I, S) tensors, ~40% of W3's forward pass)."""

from __future__ import annotations

from .. import blas
from . import all_float32, applies, cfc_applies, library


def input_projection(cell, x, features_first=False):
    """``cell.project_input(x)`` for x (B, T, I), the same layout (feature-major cells, or with
    ``features_first``: a (B, T, P) view of (T, P, B)), differentiable; None where the cell's projection is not
    affine (no ``input_projection()``) nor an LTC's (``sensory_synapse_arrays()``), the kernels
    do not apply or the arrays are not float32."""
    sensory = getattr(cell, "sensory_synapse_arrays", None)
    if sensory is not None:
        arrays = sensory()
        if not all_float32(x, *arrays) or not applies():
            return None
        return library().ltc_sensory(cell.map_input(x), *arrays)
    affine = getattr(cell, "input_projection", None)
    if affine is None or not cfc_applies():
        return None
    weight, bias = affine()
    if not all_float32(x, weight, bias):
        return None
    features_first = features_first or getattr(cell, "features_first_inputs", False)
    y = library().input_projection(x, weight, bias, features_first, blas.sgemm_address())
    return y.transpose(2, 0, 1) if features_first else y


def projected(cell, x, features_first=False):
    """``cell.project_input(x)`` for a sequence x (B, T, I): ``input_projection``'s where it applies,
    else the cell's own."""
    y = input_projection(cell, x, features_first)
    return cell.project_input(x) if y is None else y
