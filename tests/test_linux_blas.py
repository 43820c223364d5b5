"""The private BLAS for MLX on Linux: it must speed MLX up without touching anyone else."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ncps_mlx import linux_blas

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def test_shim_is_a_valid_elf_with_one_dependency():
    image = linux_blas.shim_elf("libblas-test.so.3", "/opt/blas/libopenblas.so.0")
    assert image[:4] == b"\x7fELF"
    assert linux_blas.needed_libraries(image) == ["/opt/blas/libopenblas.so.0"]
    with pytest.raises(ValueError, match="not a 64-bit"):
        linux_blas.needed_libraries(b"#!/bin/sh\n" + bytes(64))


@linux
def test_shim_loads_and_brings_its_dependency():
    libm = ctypes.util.find_library("m")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "libshimtest.so"
        path.write_bytes(linux_blas.shim_elf("libshimtest.so", libm))
        handle = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
        assert hasattr(handle, "cos")  # found through the shim's DT_NEEDED


def run(code: str, cwd=None, **env) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}, cwd=cwd
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


PROBE = """
import json, ctypes, sys
{first}
import numpy as np, mlx.core as mx, ncps_mlx
a = np.random.default_rng(0).normal(size=(300, 200)).astype(np.float32)
b = np.random.default_rng(1).normal(size=(200, 100)).astype(np.float32)
err = float(np.max(np.abs(np.array(mx.array(a) @ mx.array(b)) - a.astype(np.float64) @ b.astype(np.float64))))
print(json.dumps({{"status": ncps_mlx.blas_status(), "err": err,
                  "global_cblas": hasattr(ctypes.CDLL(None), "cblas_sgemm")}}))
"""


@linux
def test_status_and_scope():
    default = run(PROBE.format(first="import ncps_mlx"), NCPS_MLX_BLAS="1")
    assert default["err"] < 1e-3  # a float32 matrix product either way
    assert default["global_cblas"] is False  # nothing was put in the global namespace
    off = run(PROBE.format(first="import ncps_mlx"), NCPS_MLX_BLAS="0")
    assert off["status"] == "turned off by NCPS_MLX_BLAS=0"
    late = run(PROBE.format(first="import mlx.core"), NCPS_MLX_BLAS="1")
    assert late["status"].startswith("mlx.core was imported before ncps_mlx")
    if linux_blas._find_blas() is not None:
        assert default["status"].startswith("MLX matrix products use")


@linux
def test_a_folder_named_mlx_on_the_path_does_not_hide_libmlx(tmp_path):
    # MLX's CPU compiler caches kernels in /tmp/mlx; mlx is a namespace package, so a script
    # run from /tmp saw that folder as mlx's first location and found no libmlx.so there.
    (tmp_path / "mlx" / "0.32.4" / "cpu").mkdir(parents=True)
    from_there = run(PROBE.format(first="import ncps_mlx"), cwd=tmp_path, NCPS_MLX_BLAS="1")
    assert from_there["status"] == run(PROBE.format(first="import ncps_mlx"), NCPS_MLX_BLAS="1")["status"]
    assert from_there["status"] != "libmlx.so names no separate BLAS library"


TORCH_PROBE = """
import json, numpy as np
{first}
import torch
torch.manual_seed(0)
a, b = torch.randn(256, 256), torch.randn(256, 256)
print(json.dumps({{"product": (a @ b).numpy().tobytes().hex()[:4000], "sum": float((a @ b).sum())}}))
"""


@linux
def test_torch_is_untouched():
    pytest.importorskip("torch")
    alone = run(TORCH_PROBE.format(first=""), NCPS_MLX_BLAS="1")
    together = run(TORCH_PROBE.format(first="import ncps_mlx"), NCPS_MLX_BLAS="1")
    assert alone == together  # bit for bit: torch still uses its own BLAS


def test_dynamic_symbols_of_a_real_library():
    candidates = [p for p in Path("/lib").glob("*/libm.so.6")] + [p for p in Path("/usr/lib").glob("*/libm.so.6")]
    if not candidates:
        pytest.skip("no libm.so.6 to read")
    defined, undefined = linux_blas.dynamic_symbols(candidates[0].read_bytes())
    assert {"cos", "exp", "sqrt"} <= defined
    assert "cos" not in undefined


wheel = pytest.mark.skipif(linux_blas._wheel_openblas() is None, reason="scipy-openblas32 not installed")

WHEEL_PROBE = PROBE.replace(
    '"global_cblas"',
    '"timeout_left": __import__("os").environ.get("OPENBLAS_THREAD_TIMEOUT"), "global_cblas"',
)


@linux
@wheel
def test_the_wheel_route_forwards_every_function_mlx_needs():
    """The route a fresh Linux machine takes (no system OpenBLAS): a compiled forwarding shim to
    the scipy-openblas32 wheel. Forced here with NCPS_MLX_BLAS=wheel, in a fresh cache."""
    with tempfile.TemporaryDirectory() as cache:
        first = run(WHEEL_PROBE.format(first="import ncps_mlx"), NCPS_MLX_BLAS="wheel", XDG_CACHE_HOME=cache)
        assert "scipy-openblas32" in first["status"], first["status"]
        assert first["err"] < 1e-3
        assert first["global_cblas"] is False
        assert first["timeout_left"] is None  # set only while the library loaded
        assert list(Path(cache).glob("ncps_mlx/blas-shim/*/libblas*"))
        again = run(WHEEL_PROBE.format(first="import ncps_mlx"), NCPS_MLX_BLAS="wheel", XDG_CACHE_HOME=cache)
        assert again["status"] == first["status"]  # the cached shim is reused


LAPACK_PROBE = """
import json, numpy as np, ncps_mlx, mlx.core as mx
a = np.random.default_rng(2).normal(size=(48, 48)).astype(np.float32) + 8 * np.eye(48, dtype=np.float32)
inverse = mx.linalg.inv(mx.array(a), stream=mx.cpu)
print(json.dumps({"status": ncps_mlx.blas_status(), "err": float(np.max(np.abs(np.array(inverse) @ a - np.eye(48))))}))
"""


@linux
@wheel
def test_the_wheel_route_serves_mlx_lapack_too():
    # The bundled LAPACK takes its BLAS from the same library the shim replaces.
    with tempfile.TemporaryDirectory() as cache:
        result = run(LAPACK_PROBE, NCPS_MLX_BLAS="wheel", XDG_CACHE_HOME=cache)
    assert "scipy-openblas32" in result["status"]
    assert result["err"] < 1e-4


@linux
@wheel
def test_torch_is_untouched_by_the_wheel_route():
    pytest.importorskip("torch")
    alone = run(TORCH_PROBE.format(first=""), NCPS_MLX_BLAS="wheel")
    together = run(TORCH_PROBE.format(first="import ncps_mlx"), NCPS_MLX_BLAS="wheel")
    assert alone == together


SPIN_PROBE = """
import json, os, time
import ncps_mlx, mlx.core as mx
a = mx.random.normal((512, 512))
mx.eval(a)

def cpu_seconds():  # per thread: user + system time
    tasks = {}
    for task in os.listdir("/proc/self/task"):
        fields = open(f"/proc/self/task/{task}/stat").read().rsplit(")", 1)[1].split()
        tasks[task] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return tasks

time.sleep(0.2)
before = cpu_seconds()
for _ in range(3):
    mx.eval(a @ a)  # ~3 ms on two threads
    time.sleep(0.15)
after = cpu_seconds()
others = sum(seconds - before.get(task, 0.0) for task, seconds in after.items() if task != str(os.getpid()))
print(json.dumps({"status": ncps_mlx.blas_status(), "other_threads_cpu": others}))
"""


@linux
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a one-core machine runs the BLAS on one thread")
@pytest.mark.parametrize("route", ["1", pytest.param("wheel", marks=wheel)])
def test_idle_blas_threads_stop_spinning(route):
    """After a two-thread product OpenBLAS's idle worker spins, ~0.1 s by default, taking a core
    from MLX's other stream and from torch. ``_short_spin`` shortens that to ~1.6 ms, but only
    if it is in force when the library first loads: the search for a system OpenBLAS loaded it
    earlier, and three products left the worker spinning 0.3 s."""
    with tempfile.TemporaryDirectory() as cache:
        probe = run(SPIN_PROBE, NCPS_MLX_BLAS=route, XDG_CACHE_HOME=cache)
    if "use" not in probe["status"]:
        pytest.skip(probe["status"])
    assert probe["other_threads_cpu"] < 0.08, probe


def test_overlapping_one_thread_blocks_restore_the_count():
    """Two threads' one_thread() blocks, the first closed before the second: the count is 1
    while either is open and the original after both (not the first's 1, as when each block
    restored what it found)."""
    import threading

    import ncps_mlx  # noqa: F401 (loads the BLAS)

    if not linux_blas.can_set_threads():
        pytest.skip(f"no thread control here: {linux_blas.status()}")
    get, set_ = linux_blas._THREADS
    set_(2)
    first_open, second_open, first_closed = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def second():
        first_open.wait()
        with linux_blas.one_thread():
            second_open.set()
            first_closed.wait()
            seen.append(get())

    worker = threading.Thread(target=second)
    worker.start()
    with linux_blas.one_thread():
        first_open.set()
        second_open.wait()
        seen.append(get())
    first_closed.set()
    worker.join()
    assert seen == [1, 1] and get() == 2
