"""The time loops of the LTC and the CfC as CPU kernels in C, where MLX's own are slow.

On MLX's CPU backend a time step is many small operations, each dispatched to a stream thread,
and the LTC's (batch, S, S) synapse tensors have broadcast inputs, for which MLX generates scalar
loops. These kernels run a whole sequence in one call per block of the batch, blocks on all
cores:

* ``ltc`` (``ltc.c``): an LTC's loop, forward and backward, a batch row at a time, the synapse
  loops vectorised; the backward pass recomputes each row's forward pass and walks it back.
* ``cfc`` (``cfc.c``): a CfC's loop, feature-major like ``ncps_mlx.cells.cfc``, each layer a
  matrix product of the kernels' own OpenBLAS (``runtime.blas``), on a block of batch columns:
  forward and backward for every CfC (wired, or with or without a backbone), except pure mode's
  backward pass, which stays MLX's.

They compute the same functions as the MLX path (``rational.h`` is ``fastmath``'s tanh and
sigmoid; gradients from the exact derivatives of their outputs), in another order of additions,
and they are tested against it, against ncps.torch and against MLX's gradients
(``tests/test_cpu_kernels.py``, ``tests/test_gradients.py``).

They are built once per machine with ``g++`` (``-O3 -fno-trapping-math``, plus ``-mavx2 -mfma``
where the processor has them), cached under ``$XDG_CACHE_HOME/ncps_mlx/native`` (by default ``~/.cache/ncps_mlx``), and loaded with
ctypes. They apply on Linux (x86-64 or aarch64) to the CPU device, outside
``mx.vmap``/``mx.compile`` tracing, without mixed memory, for float32. Elsewhere, with
``NCPS_MLX_RUNTIME=mlx``, within ``turned_off()``, or where they cannot be built, MLX's path
runs; ``status()`` says which (``python -m ncps_mlx info``), and a first build is logged.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import os
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import blas

log = logging.getLogger("ncps_mlx")

SOURCES = Path(__file__).parent
KIND = "native"

_STATUS = "not attempted"
_LIBRARY = None
_LOCK = threading.Lock()


def status() -> str:
    """Whether the kernels are in use, in words (builds them on first call)."""
    library()
    return _STATUS


def library():
    """The loaded kernel library, or None where the kernels do not apply (see ``status()``)."""
    global _STATUS, _LIBRARY
    with _LOCK:
        if _STATUS == "not attempted":
            _LIBRARY, _STATUS = _load()
    return _LIBRARY


def _load():
    if os.environ.get("NCPS_MLX_RUNTIME", "auto") == "mlx":
        return None, "turned off by NCPS_MLX_RUNTIME=mlx"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        return None, "not Linux on x86-64 or aarch64: the models run on MLX's operations"
    compiler = shutil.which("g++")
    if compiler is None:
        return None, "no g++ on PATH: the models run on MLX's operations"
    flags = ["-O3", "-fno-trapping-math", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma"]
    sources = sorted(SOURCES.glob("*.[ch]"))
    key = hashlib.sha256(b"\0".join([f.read_bytes() for f in sources] + [compiler.encode(), " ".join(flags).encode()]))
    path = _cache_folder() / key.hexdigest()[:16] / "ncps_kernels.so"
    built = False
    if not path.is_file():
        try:
            _build(compiler, flags, [f for f in sources if f.suffix == ".c"], path)
        except (OSError, subprocess.SubprocessError) as error:
            return None, f"the CPU kernels could not be built ({error}): the models run on MLX's operations"
        built = True
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        return None, f"the CPU kernels could not be loaded ({error}): the models run on MLX's operations"
    for function in (lib.ltc_forward, lib.ltc_backward, lib.cfc_forward, lib.cfc_backward, lib.wired_cfc_forward,
                     lib.wired_cfc_backward):
        function.restype = None
    message = f"LTC and CfC time loops run in CPU kernels built with {' '.join(flags[:2] + flags[4:])}"
    if built:
        log.info("ncps_mlx: %s", message)
    return lib, message


def _cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ncps_mlx" / KIND


def _cpu_flags() -> set:
    """The processor's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build(compiler, flags, sources, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=path.parent, suffix=".so")
    os.close(descriptor)
    try:
        # "-x c" before each file: g++ took a second file after one "-x c" for C++.
        files = [argument for source in sources for argument in ("-x", "c", str(source))]
        result = subprocess.run([compiler, *flags, "-o", partial, *files, "-lm"], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.strip().splitlines()
            raise subprocess.SubprocessError(errors[0] if errors else f"g++ exited with {result.returncode}")
        os.replace(partial, path)  # atomically: a concurrent process loads the old file or this one
    finally:
        if os.path.exists(partial):
            os.remove(partial)


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


def threads() -> int:
    """The cores this process may run on: the kernels' blocks of the batch."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def _pool():
    return concurrent.futures.ThreadPoolExecutor(threads(), thread_name_prefix="ncps_mlx_native")


if hasattr(os, "register_at_fork"):  # a forked child has none of its parent's threads
    os.register_at_fork(after_in_child=_pool.cache_clear)


def row_ranges(batch: int, parts=None):
    """[(first, last)] of ``parts`` (default ``threads()``) contiguous ranges of the batch; one
    empty range for an empty batch (a backward pass then still returns zero gradients)."""
    if batch == 0:
        return [(0, 0)]
    parts = min(batch, parts or threads())
    edges = [batch * k // parts for k in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def as_host(array) -> np.ndarray:
    """A C-contiguous float32 host array of an MLX array (evaluated; a view where it can be)."""
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32))


def pointer(array: np.ndarray):
    """The address of a host array's data, for a kernel's argument."""
    return array.ctypes.data_as(ctypes.c_void_p)


def run_rows(call, batch, parts=None):
    """``call(first, last)`` over the batch in one contiguous range of rows per core (or
    ``parts`` ranges)."""
    futures = [_pool().submit(call, first, last) for first, last in row_ranges(batch, parts)]
    return [future.result() for future in futures]


def cfc_applies() -> bool:
    """Whether a CfC runs in the kernel now: ``applies()``, and the kernels' BLAS loads."""
    return applies() and blas.sgemm_address() is not None


from .cfc import cfc_cell_sequence, cfc_states, wired_cfc_cell_sequence, wired_cfc_states  # noqa: E402
from .ltc import ltc_cell_sequence, ltc_states  # noqa: E402

# The kernels by the name of the cell class whose loop they run.
SEQUENCES = {"CfCCell": cfc_cell_sequence, "WiredCfCCell": wired_cfc_cell_sequence, "LTCCell": ltc_cell_sequence}
