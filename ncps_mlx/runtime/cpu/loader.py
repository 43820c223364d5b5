"""Loading the kernels' extension and deciding whether they apply; the kernels' Python sides
(``cfc``, ``ltc``, ``ctrnn``, ``ctgru``, ``projection``) share these."""

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
        kernels = importlib.import_module(f"{__package__}._kernels")
    except ImportError as error:
        return None, (f"the CPU kernels are not built ({error}); reinstall ncps-mlx where a C++ compiler is "
                      "available (make setup): the models run on MLX's operations")
    if kernels.mlx_version != mx.__version__:
        return None, (f"the CPU kernels were built against mlx {kernels.mlx_version}, this is mlx "
                      f"{mx.__version__}; reinstall ncps-mlx: the models run on MLX's operations")
    try:
        kernels.probe(mx.array(0.0))
    except TypeError:
        return None, ("the CPU kernels were built with a nanobind that does not match this mlx's; reinstall "
                      "ncps-mlx: the models run on MLX's operations")
    return kernels, f"LTC, CfC, CTRNN and CTGRU time loops run in CPU kernels (MLX primitives built for mlx {kernels.mlx_version})"


def library():
    """The kernels' extension module, or None where they do not apply (``status()`` says why)."""
    if os.environ.get("NCPS_MLX_RUNTIME", "auto") == "mlx":
        return None
    return loaded()


def loaded():
    """The kernels' extension module if it loads, whatever ``NCPS_MLX_RUNTIME`` says: for the
    kernels' own calls, made after ``applies()`` said yes."""
    kernels = _LOADED.get("kernels")
    if kernels is not None:
        return kernels
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
    if _off.value or mx.default_device() != mx.cpu:
        return False
    return library() is not None


class _Off(threading.local):
    value = False  # in every thread until turned_off() sets its own


_off = _Off()


@contextlib.contextmanager
def turned_off():
    """Within this block (in this thread) the models run on MLX's operations, as where these do
    not apply: for comparing the two."""
    previous = _off.value
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
