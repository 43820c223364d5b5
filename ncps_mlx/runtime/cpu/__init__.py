"""The models' time loops as CPU kernels, where MLX's own are slow.

On MLX's CPU backend a time step is many small operations, each dispatched to a stream thread;
the LTC's (batch, S, S) synapse tensors have broadcast inputs, for which MLX generates scalar
loops; and the Linux mlx[cpu] wheel's matrix products run on a reference BLAS (~3 GFLOP/s).
These kernels run a whole sequence in one node of MLX's graph:

* ``ltc.c``: an LTC's loop, forward and backward, a batch row at a time, the synapse loops
  vectorised; the backward pass recomputes each row's forward pass and walks it back; also with
  mixed memory's "state" circuit. Also the sensory synapses of its input (``LTCSensory``).
* ``cfc.c``: a CfC's loop, feature-major like ``ncps_mlx.cells.cfc``, each layer a matrix
  product of the kernels' own OpenBLAS (``runtime.blas``) on a block of batch columns: forward
  and backward for every CfC in every mode (wired, or with or without a backbone), also with
  mixed memory's "state" circuit. With a backbone the kernel reads the sequence
  x itself and makes the first layer's input half block by block (a whole (T, units, B)
  projection beforehand, and its gradient, were fresh pages every call at large batches).
* ``ctrnn.c``, ``ctgru.c``: the CTRNN's and the CTGRU's loops, batch-major, their products in
  the same BLAS; each step recomputed in the backward pass.
* ``InputProjection`` (``primitives.cpp``): a sequence's affine input projection, one product
  in that BLAS instead of MLX's (``projection.py``).
* ``now.py``: a one-step call at once. Every entry point takes ``now``: where every input is
  computed and none is a tracer, the node's function runs on the calling thread and returns
  computed arrays (the same function, so the same numbers); ``cfc_step`` and ``now.step_of``
  make a model's one-step results that way.
* ``matvec.c``: the kernels' products with one column (batch 1), a vectorised dot per row; the
  BLAS's setup cost more than such a product.

``primitives.cpp`` makes them MLX primitives (MLX's ``examples/extensions`` way): each loop a
node with ``eval_cpu``, a ``vjp`` for every input (parameters, inputs, initial state,
timespans) and a ``vmap`` over the batch, so ``mx.grad``, ``mx.compile`` and ``mx.vmap`` treat
them as any other operation. Where a batch's work is large enough (an estimate from its sizes:
~0.4 ms for an LTC's loop, ~1 ms for the products' loops), it is split over the cores the
process may run on, on worker threads kept for the process (starting threads a call cost more
than a small batch's work); the same ranges whoever runs them, so the same sums.

They compute the same functions as the MLX path (``rational.h`` is ``fastmath``'s tanh and
sigmoid; gradients from the exact derivatives of their outputs), in another order of additions,
and they are tested against it, against ncps.torch and against MLX's gradients
(``tests/test_cpu_kernels.py``, ``tests/test_gradients.py``).

They are built once, at install time, by ``setup.py`` through CMake and nanobind against the
installed mlx (``CMakeLists.txt``). Nothing is compiled, cached or loaded by path at import or
at first use: where the build could not run (no compiler), where it was built against another
mlx, off Linux, on another device, with ``NCPS_MLX_RUNTIME=mlx`` or within ``turned_off()``,
MLX's path runs, and ``status()`` (``python -m ncps_mlx info``) says why.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from ...lowering import CfCLowering, CTGRULowering, CTRNNLowering, LTCLowering, WiredCfCLowering
from .cfc import cfc_sequence, cfc_states, cfc_step, wired_cfc_sequence, wired_cfc_states
from .ctgru import ctgru_sequence
from .ctrnn import ctrnn_sequence
from .loader import all_float32, applies, by_row, cfc_applies, evaluations, library, loaded, status, turned_off
from .ltc import ltc_sequence, ltc_states
from .projection import input_projection
from . import now

__all__ = ["SEQUENCES", "Kernel", "all_float32", "applies", "by_row", "cfc_applies", "cfc_states", "evaluations", "input_projection",
           "library", "loaded", "ltc_states", "now", "status", "turned_off", "wired_cfc_states"]

class Kernel(NamedTuple):
    """A loop's kernel: ``run(lowering, x, h, ts, **options)``; whether it ``applies`` now (the
    LTC's needs no BLAS, the others the kernels' own); the mixed-memory circuits it runs; whether
    it takes dropout masks (a CfC's backbone); ``step(lowering, x, h, ts, **options)``, a
    one-step call at once (``now.py``)."""

    run: Callable
    applies: Callable
    memory_circuits: tuple
    dropout: bool
    step: Callable


# The kernels by the type of the lowering whose loop they run.
SEQUENCES = {
    CfCLowering: Kernel(cfc_sequence, cfc_applies, ("state", "input"), True, cfc_step),
    WiredCfCLowering: Kernel(wired_cfc_sequence, cfc_applies, ("state", "input"), False, cfc_step),
    LTCLowering: Kernel(ltc_sequence, applies, ("state", "input"), False, now.step_of(ltc_sequence)),
    CTRNNLowering: Kernel(ctrnn_sequence, cfc_applies, (), False, now.step_of(ctrnn_sequence)),
    CTGRULowering: Kernel(ctgru_sequence, cfc_applies, (), False, now.step_of(ctgru_sequence)),
}
