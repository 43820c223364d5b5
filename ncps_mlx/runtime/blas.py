"""The matrix products of the CfC kernels (``runtime.cpu``): an OpenBLAS of their own.

The Linux ``mlx[cpu]`` wheel links a reference BLAS (~3-8 GFLOP/s here, where OpenBLAS runs at
120-240). The kernels do not use it: they call the ``scipy-openblas32`` wheel's sgemm (a
dependency of ncps-mlx on Linux), loaded on first use with ``RTLD_LOCAL``. Every symbol of that
library carries a ``scipy_`` prefix, so nothing else in the process (MLX, numpy, torch) can
resolve to it, and loading it changes nobody's products.

The kernels split the batch over the cores themselves, so the library runs single-threaded:
its thread count is set to 1 once, when it is loaded, and its worker threads then never run
(an idle OpenBLAS worker spins ~0.1 s after every product by default, which took a core from
torch or from MLX's own threads: performance-notes).

MLX's own products keep MLX's BLAS: an earlier version of this module swapped it at import
through an ELF shim, an import side effect that held only when ``ncps_mlx`` was imported before
``mlx.core``. With the input projections and every loop but the mixed-memory LTC's and wired
CfC's in the kernels, what is left on it is small.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger("ncps_mlx")

_LOCK = threading.Lock()
_LOADED: dict = {}  # "handle", "sgemm", "status" once tried


def _wheel_openblas():
    """The library file of the scipy-openblas32 wheel, found without importing it; None if absent."""
    spec = importlib.util.find_spec("scipy_openblas32")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "lib" / "libscipy_openblas.so"
        if path.is_file():
            return path
    return None


def _load():
    if not sys.platform.startswith("linux"):
        return None, "not Linux: the CfC kernels are not built here"
    path = _wheel_openblas()
    if path is None:
        return None, "the scipy-openblas32 wheel is not installed (pip install scipy-openblas32)"
    try:
        handle = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
        sgemm = ctypes.cast(handle.scipy_cblas_sgemm, ctypes.c_void_p).value
        set_threads = handle.scipy_openblas_set_num_threads
    except (OSError, AttributeError) as error:
        return None, f"{path} could not be used ({error})"
    set_threads.argtypes, set_threads.restype = [ctypes.c_int], None
    set_threads(1)
    _LOADED["handle"] = handle  # kept for the life of the process
    return sgemm, f"{path} (scipy-openblas32), single-threaded"


def sgemm_address():
    """The address of the kernels' ``cblas_sgemm`` (loaded on first call), or None where there is
    none; ``status()`` says why."""
    if "status" in _LOADED:  # set after "sgemm": read without the lock on every kernel call
        return _LOADED["sgemm"]
    with _LOCK:
        if "status" not in _LOADED:
            _LOADED["sgemm"], _LOADED["status"] = _load()
            log.debug("CfC kernels' BLAS: %s", _LOADED["status"])
        return _LOADED["sgemm"]


def status() -> str:
    """The kernels' BLAS, in words."""
    sgemm_address()
    return _LOADED["status"]
