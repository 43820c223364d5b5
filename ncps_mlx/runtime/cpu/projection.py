"""A sequence's input projection, x W^T + b for every step at once, as the ``InputProjection``
primitive (``primitives.cpp``): the product in the kernels' BLAS. On MLX's path it is MLX's
matmul, which on Linux runs on mlx[cpu]'s reference BLAS (~3 GFLOP/s): for a CfC at batch 1024
that product was two thirds of the forward pass."""

from __future__ import annotations

import mlx.core as mx

from .. import blas
from . import cfc_applies, library


def input_projection(cell, x):
    """``cell.project_input(x)`` for x (B, T, I), the same layout (feature-major cells: a
    (B, T, P) view of (T, P, B)), differentiable; None where the cell's projection is not
    affine (no ``input_projection()``), the kernels do not apply or the arrays are not float32."""
    affine = getattr(cell, "input_projection", None)
    if affine is None or not cfc_applies():
        return None
    weight, bias = affine()
    if any(a.dtype != mx.float32 for a in (x, weight, bias)):
        return None
    features_first = getattr(cell, "features_first_inputs", False)
    y = library().input_projection(x, weight, bias, features_first, blas.sgemm_address())
    return y.transpose(2, 0, 1) if features_first else y
