"""The CfC kernels' OpenBLAS: loaded privately, it must change nobody else's products."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ncps_mlx.runtime import blas

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def run(code: str, **env) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# Runs a CfC (the kernels load their BLAS on first use), then looks for BLAS symbols in the
# process's global namespace and checks MLX's own product against float64 numpy.
SCOPE_PROBE = """
import json, ctypes
import mlx.core as mx, numpy as np
import ncps_mlx
from ncps_mlx.runtime import blas
model = ncps_mlx.CfC(8, 16)
mx.eval(model(mx.random.normal((4, 10, 8)))[0])
a = np.random.default_rng(0).normal(size=(300, 200)).astype(np.float32)
b = np.random.default_rng(1).normal(size=(200, 100)).astype(np.float32)
err = float(np.max(np.abs(np.array(mx.array(a) @ mx.array(b)) - a.astype(np.float64) @ b.astype(np.float64))))
everything = ctypes.CDLL(None)
print(json.dumps({"status": blas.status(), "loaded": blas.sgemm_address() is not None, "err": err,
                  "global": [name for name in ("scipy_cblas_sgemm", "scipy_openblas_set_num_threads")
                             if hasattr(everything, name)]}))
"""


@linux
def test_the_kernels_blas_stays_out_of_the_global_namespace():
    probe = run(SCOPE_PROBE)
    if not probe["loaded"]:
        pytest.skip(probe["status"])
    assert "single-threaded" in probe["status"]
    assert probe["global"] == []  # RTLD_LOCAL: no one else can resolve to it
    assert probe["err"] < 1e-3


TORCH_PROBE = """
import json, numpy as np
{first}
import torch
torch.manual_seed(0)
a, b = torch.randn(256, 256), torch.randn(256, 256)
print(json.dumps({{"product": (a @ b).numpy().tobytes().hex()[:4000], "sum": float((a @ b).sum()),
                  "threads": torch.get_num_threads()}}))
"""

WITH_NCPS = """
import mlx.core as mx, ncps_mlx
mx.eval(ncps_mlx.CfC(8, 16)(mx.random.normal((4, 10, 8)))[0])
"""


@linux
def test_torch_is_untouched():
    pytest.importorskip("torch")
    alone = run(TORCH_PROBE.format(first=""))
    together = run(TORCH_PROBE.format(first=WITH_NCPS))
    assert alone == together  # bit for bit, same thread count: torch keeps its own BLAS


def test_status_says_why_when_there_is_none(monkeypatch):
    monkeypatch.setattr(blas, "_LOADED", {})
    monkeypatch.setattr(blas, "_wheel_openblas", lambda: None)
    if sys.platform.startswith("linux"):
        assert blas.sgemm_address() is None
        assert "pip install scipy-openblas32" in blas.status()
    else:
        assert blas.sgemm_address() is None and "not Linux" in blas.status()
