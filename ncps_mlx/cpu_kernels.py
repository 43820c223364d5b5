"""Let MLX build its fused CPU kernels for AVX2 on x86-64 Linux.

``mx.compile`` on the CPU writes each fused kernel out as C++ and builds it with
``g++ -std=c++17 -O3 -Wall -fPIC -shared`` (MLX 0.32): code for the baseline x86-64
processor, SSE2, four floats an instruction. On a processor with AVX2 the same loops run
eight wide. Measured on the development machine (2 cores of an AMD EPYC), forward passes:
CfC at batch 1024 x 50 steps 49.6 -> 39.0 ms, dense LTC at batch 32 x 100 steps 293 -> 215 ms;
a tanh over 196608 floats 0.93 -> 0.25 ns an element.

MLX runs ``g++`` through the shell, so this module puts a small ``g++`` script first on the
process's PATH (inherited by its child processes). The script adds ``-mavx2 -mfma -mf16c -ffp-contract=off`` when, and only
when, the file being built is one of MLX's kernels (a ``.cpp`` in MLX's kernel cache,
``<tmp>/mlx/<version>/cpu/``), and otherwise runs the real compiler with the arguments it
was given. ``-ffp-contract=off``: no multiply and add are fused into one rounding, so every
element is computed with the same float32 operations in the same order as in MLX's own build,
and the results are bit for bit the same (``tests/test_cpu_kernels.py`` compares them).

It applies on Linux x86-64 when /proc/cpuinfo lists avx2, fma and f16c and a ``g++`` is on
PATH. ``NCPS_MLX_AVX2=0`` turns it off. ``status()`` says what happened; the first activation
on a machine says so once on stderr.

Two things to know: MLX caches built kernels by name (in ``<tmp>/mlx/<version>/cpu``), so a
kernel that MLX built before keeps that build; and a kernel cache shared with a machine
without AVX2 (one temporary folder mounted on two machines) would hand it code it cannot
run: set ``NCPS_MLX_AVX2=0`` there.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
from pathlib import Path

from . import file_cache

FLAGS = ("-mavx2", "-mfma", "-mf16c", "-ffp-contract=off")
NEEDED = ("avx2", "fma", "f16c")

_STATUS = "not attempted"


def status() -> str:
    """What ``enable()`` did, in words."""
    return _STATUS


def enable() -> str:
    """Put the kernel-compiler script first on PATH where it applies (see the module
    docstring); idempotent. Returns ``status()``."""
    global _STATUS
    if _STATUS == "not attempted":
        _STATUS = _enable()
    return _STATUS


def _enable() -> str:
    if os.environ.get("NCPS_MLX_AVX2", "1") == "0":
        return "turned off by NCPS_MLX_AVX2=0"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return "not Linux on x86-64: MLX builds its kernels as it always does"
    missing = [flag for flag in NEEDED if flag not in cpu_flags()]
    if missing:
        return f"the processor lacks {', '.join(missing)}: MLX builds its kernels as it always does"
    compiler = find_compiler()
    if compiler is None:
        return "no g++ on PATH (mx.compile on the CPU needs one too)"
    try:
        folder, created = _script_folder(compiler)
    except OSError as error:
        return f"not used ({error})"
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != str(folder):
        os.environ["PATH"] = str(folder) + (os.pathsep + path if path else "")
    message = f"MLX's CPU kernels are built with {' '.join(FLAGS)} (set NCPS_MLX_AVX2=0 to turn this off)"
    if created:
        print(f"ncps_mlx: {message}", file=sys.stderr)
    return message


def find_compiler(path=None):
    """The ``g++`` that PATH names, past any script of this module's (a child process
    inherits its parent's), as PATH names it: a symlink is kept, not resolved, as ccache's
    ``g++ -> ccache`` works only under its own name. None if there is none."""
    path = os.environ.get("PATH", "") if path is None else path
    ours = str(_cache_dir())
    kept = [entry for entry in path.split(os.pathsep) if entry and not os.path.abspath(entry).startswith(ours)]
    found = shutil.which("g++", path=os.pathsep.join(kept))
    return None if found is None else os.path.abspath(found)


def cpu_flags() -> set:
    """The processor's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def script(compiler: str) -> str:
    """The ``g++`` script that calls ``compiler``: with ``FLAGS`` for MLX's kernels only."""
    real = shlex.quote(compiler)
    return (
        "#!/bin/sh\n"
        "# Written by ncps_mlx (ncps_mlx/cpu_kernels.py): MLX's CPU kernels built for AVX2,\n"
        "# every other compilation passed on untouched. Child processes inherit PATH:\n"
        "# NCPS_MLX_AVX2=0 in theirs turns it off there too.\n"
        'if [ "${NCPS_MLX_AVX2:-1}" = 0 ]; then exec ' + real + ' "$@"; fi\n'
        'for argument in "$@"; do\n'
        '    case "$argument" in\n'
        f'        */mlx/*/cpu/*.cpp) exec {real} {" ".join(FLAGS)} "$@" ;;\n'
        "    esac\n"
        "done\n"
        f'exec {real} "$@"\n'
    )


def _script_folder(compiler: str):
    """(folder holding the ``g++`` script for ``compiler``, whether it was just written)."""
    path, created = file_cache.cached_file(KIND, "g++", script(compiler).encode(), executable=True)
    return path.parent, created


KIND = "kernel-compiler"


def _cache_dir() -> Path:
    return file_cache.folder(KIND)
