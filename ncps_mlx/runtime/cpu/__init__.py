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
  x itself and makes the first layer's input half block by block: a whole (T, units, B)
  projection beforehand, and its gradient, were 52 MB of fresh pages a call at batch 1024.
* ``ctrnn.c``, ``ctgru.c``: the CTRNN's and the CTGRU's loops, batch-major, their products in
  the same BLAS; each step recomputed in the backward pass.
* ``InputProjection`` (``primitives.cpp``): a sequence's affine input projection, one product
  in that BLAS instead of MLX's (``projection.py``).

``primitives.cpp`` makes them MLX primitives (MLX's ``examples/extensions`` way): each loop a
node with ``eval_cpu``, a ``vjp`` for every input (parameters, inputs, initial state,
timespans) and a ``vmap`` over the batch, so ``mx.grad``, ``mx.compile`` and ``mx.vmap`` treat
them as any other operation. The batch is split over the cores the process may run on.

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

import contextlib
import importlib
import logging
import os
import threading

import mlx.core as mx

from .. import blas

log = logging.getLogger("ncps_mlx")

_LOCK = threading.Lock()
_LOADED: dict = {}  # "kernels", "status" once tried


def _load():
    try:
        kernels = importlib.import_module(f"{__name__}._kernels")
    except ImportError as error:
        return None, (f"the CPU kernels are not built ({error}); reinstall ncps-mlx where a C++ compiler is "
                      "available (make setup): the models run on MLX's operations")  # fmt: skip
    if kernels.mlx_version != mx.__version__:
        return None, (f"the CPU kernels were built against mlx {kernels.mlx_version}, this is mlx "
                      f"{mx.__version__}; reinstall ncps-mlx: the models run on MLX's operations")  # fmt: skip
    try:
        kernels.probe(mx.array(0.0))
    except TypeError:
        return None, ("the CPU kernels were built with a nanobind that does not match this mlx's; reinstall "
                      "ncps-mlx: the models run on MLX's operations")  # fmt: skip
    return kernels, f"LTC, CfC, CTRNN and CTGRU time loops run in CPU kernels (MLX primitives built for mlx {kernels.mlx_version})"


def library():
    """The kernels' extension module, or None where they do not apply (``status()`` says why)."""
    if os.environ.get("NCPS_MLX_RUNTIME", "auto") == "mlx":
        return None
    with _LOCK:
        if "status" not in _LOADED:
            _LOADED["kernels"], _LOADED["status"] = _load()
            log.debug("ncps_mlx: %s", _LOADED["status"])
        return _LOADED["kernels"]


def status() -> str:
    """Whether the kernels are in use, in words."""
    if os.environ.get("NCPS_MLX_RUNTIME", "auto") == "mlx":
        return "turned off by NCPS_MLX_RUNTIME=mlx"
    library()
    return _LOADED["status"]


def evaluations() -> dict:
    """How often each kernel node (forward and backward passes) has run in this process."""
    kernels = library()
    return {} if kernels is None else kernels.evaluations()


def applies() -> bool:
    """Whether the kernels run now: built, on the CPU device, not within ``turned_off()``."""
    if getattr(_off, "value", False) or mx.default_device() != mx.cpu:
        return False
    return library() is not None


_off = threading.local()


@contextlib.contextmanager
def turned_off():
    """Within this block (in this thread) the models run on MLX's operations, as where these do
    not apply: for comparing the two."""
    previous = getattr(_off, "value", False)
    _off.value = True
    try:
        yield
    finally:
        _off.value = previous


def all_float32(*arrays) -> bool:
    """Whether every array (None skipped) is float32, the kernels' one dtype."""
    return all(a.dtype == mx.float32 for a in arrays if a is not None)


def by_row(timespans, batch: int, steps: int):
    """None, or timespans (0-d or (B, T, 1)) as a (B, T) array, the batch-major kernels' layout."""
    if timespans is None:
        return None
    return mx.broadcast_to(timespans.reshape(timespans.shape[:2]) if timespans.ndim == 3 else timespans, (batch, steps))


def cfc_applies() -> bool:
    """Whether a CfC runs in the kernel now: ``applies()``, and the kernels' BLAS loads."""
    return applies() and blas.sgemm_address() is not None


from .projection import input_projection, projected  # noqa: E402
from .ctgru import ctgru_cell_sequence  # noqa: E402
from .ctrnn import ctrnn_cell_sequence  # noqa: E402
from .cfc import cfc_cell_sequence, cfc_states, wired_cfc_cell_sequence, wired_cfc_states  # noqa: E402
from .ltc import ltc_cell_sequence, ltc_states  # noqa: E402

# The kernels by the name of the cell class whose loop they run (this package never imports the
# cells), whether each applies now (the LTC's needs no BLAS, the others the kernels' own), and
# whether it runs mixed memory's "state" circuit too (the LTC and the CfCs).
SEQUENCES = {
    "CfCCell": (cfc_cell_sequence, cfc_applies, True),
    "WiredCfCCell": (wired_cfc_cell_sequence, cfc_applies, True),
    "LTCCell": (ltc_cell_sequence, applies, True),
    "CTRNNCell": (ctrnn_cell_sequence, cfc_applies, False),
    "CTGRUCell": (ctgru_cell_sequence, cfc_applies, False),
}
