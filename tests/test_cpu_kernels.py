"""MLX's CPU kernels built for AVX2: the same results bit for bit, and no other compilation touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from ncps_mlx import cpu_kernels

applies = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or os.uname().machine != "x86_64"
    or not set(cpu_kernels.NEEDED) <= cpu_kernels.cpu_flags()
    or shutil.which("g++") is None,
    reason="needs Linux x86-64 with AVX2, FMA, F16C and g++",
)

# Compiled kernels of every kind the models use, fed floats across the whole range: the
# rational tanh/sigmoid (vectorised and small forms), MLX's own transcendental functions,
# division, broadcasting (strided kernels), and whole LTC and CfC forward passes.
PROBE = """
import hashlib, json, os, sys
import numpy as np
import ncps_mlx, mlx.core as mx
from ncps_mlx import fastmath
rng = np.random.default_rng(0)
x = np.concatenate([
    rng.normal(0, 3, 50000), rng.normal(0, 30, 20000), rng.uniform(-1e-30, 1e-30, 1000),
    [0.0, -0.0, 1e-40, -1e-40, 8.021990776062012, -8.03, 88.0, -104.0, 1e30, np.inf, -np.inf, np.nan],
]).astype(np.float32)
a = mx.array(x)
b = mx.array(rng.normal(size=(64, 64)).astype(np.float32))
functions = [
    mx.compile(fastmath.rational_tanh),
    mx.compile(fastmath.rational_sigmoid),
    mx.compile(lambda v: fastmath.rational_tanh(v[:1500])),
    mx.compile(lambda v: mx.exp(v) / (1.0 + mx.abs(v)) + mx.sigmoid(v) * mx.tanh(0.5 * v) - mx.log1p(mx.abs(v))),
    mx.compile(lambda v: (v[:4096].reshape(64, 64)[:, :, None] - b) * b),
]
light = os.environ.get("PROBE_LIGHT") == "1"  # one kernel is enough to see how it was built
digest = hashlib.sha256()
for function in functions[:1] if light else functions:
    digest.update(np.array(function(a)).tobytes())
sequence = mx.array(rng.normal(size=(4, 12, 5)).astype(np.float32))
mx.random.seed(1)
for model in () if light else (ncps_mlx.LTC(5, 16), ncps_mlx.CfC(5, 16), ncps_mlx.CfC(5, ncps_mlx.wirings.AutoNCP(12, 3))):
    digest.update(np.array(model(sequence)[0]).tobytes())
kernels = os.path.join(os.environ["TMPDIR"], "mlx")
built = [os.path.join(r, f) for r, _, fs in os.walk(kernels) for f in fs if f.endswith(".so")]
print(json.dumps({"digest": digest.hexdigest(), "status": ncps_mlx.kernel_status(), "kernels": built,
                  "path": os.environ["PATH"].split(os.pathsep)[0]}))
"""


# PATH without the script that importing ncps_mlx put first on it here.
ORIGINAL_PATH = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if "kernel-compiler" not in p)


def probe(tmp_path, name, **env) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PATH": ORIGINAL_PATH, "TMPDIR": str(folder), "XDG_CACHE_HOME": str(tmp_path / "cache"), "NCPS_MLX_NATIVE": "0", **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def ymm_instructions(library: str) -> int:
    listing = subprocess.run(["objdump", "-d", library], capture_output=True, text=True).stdout
    return listing.count("%ymm")


@applies
def test_avx2_kernels_give_the_same_bits(tmp_path):
    # A fresh kernel cache (TMPDIR) for each: every kernel is built anew, one way or the other.
    plain = probe(tmp_path, "plain", NCPS_MLX_AVX2="0")
    avx2 = probe(tmp_path, "avx2")
    assert plain["status"] == "turned off by NCPS_MLX_AVX2=0"
    assert avx2["status"].startswith("MLX's CPU kernels are built with -mavx2")
    assert plain["digest"] == avx2["digest"]
    if shutil.which("objdump"):  # and the AVX2 build really is one
        assert sum(ymm_instructions(k) for k in avx2["kernels"]) > 0
        assert sum(ymm_instructions(k) for k in plain["kernels"]) == 0


@applies
def test_other_compilations_pass_through(tmp_path):
    avx2 = probe(tmp_path, "avx2", PROBE_LIGHT="1")
    wrapper = os.path.join(avx2["path"], "g++")
    source = tmp_path / "probe.cpp"
    # Built for the baseline processor, a check for AVX2 is false; with -mavx2 it would be true.
    source.write_text("#include <cstdio>\nint main() {\n#ifdef __AVX2__\nstd::puts(\"avx2\");\n#else\n"
                      "std::puts(\"baseline\");\n#endif\n}\n")  # fmt: skip
    for name, expected in [("probe.cpp", "baseline"), ("mlx/0.32.4/cpu/probe.cpp", "avx2")]:
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target != source:
            shutil.copy(source, target)
        subprocess.run([wrapper, str(target), "-o", str(tmp_path / "probe")], check=True)
        assert subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True).stdout.strip() == expected


@applies
def test_switched_off_in_a_child_process_that_inherited_the_script(tmp_path):
    avx2 = probe(tmp_path, "avx2", PROBE_LIGHT="1")
    child = probe(tmp_path, "child", NCPS_MLX_AVX2="0", PROBE_LIGHT="1", PATH=avx2["path"] + os.pathsep + ORIGINAL_PATH)
    assert child["path"] == avx2["path"]  # the script is first on PATH, and it passes through
    if shutil.which("objdump"):
        assert sum(ymm_instructions(k) for k in child["kernels"]) == 0


def test_script_quotes_the_compiler_and_adds_flags_only_for_mlx_kernels():
    text = cpu_kernels.script("/opt/my tools/g++")
    assert "exec '/opt/my tools/g++' -mavx2 -mfma -mf16c -ffp-contract=off \"$@\"" in text
    assert text.rstrip().endswith("exec '/opt/my tools/g++' \"$@\"")
    assert 'if [ "${NCPS_MLX_AVX2:-1}" = 0 ]; then exec \'/opt/my tools/g++\' "$@"; fi' in text
    assert "*/mlx/*/cpu/*.cpp)" in text


def test_compiler_found_past_our_scripts_and_by_its_own_name(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ours = cpu_kernels._cache_dir() / "0123456789abcdef"
    ccache = tmp_path / "bin" / "ccache"
    for folder in (ours, tmp_path / "lib" / "ccache", ccache.parent):
        folder.mkdir(parents=True)
    (ours / "g++").write_text("#!/bin/sh\n")
    ccache.write_text("#!/bin/sh\n")
    for script in (ours / "g++", ccache):
        script.chmod(0o755)
    (tmp_path / "lib" / "ccache" / "g++").symlink_to(ccache)  # as Debian's ccache package does
    path = os.pathsep.join([str(ours), str(tmp_path / "lib" / "ccache"), str(ccache.parent)])
    assert cpu_kernels.find_compiler(path) == str(tmp_path / "lib" / "ccache" / "g++")
    assert cpu_kernels.find_compiler(str(ours)) is None
