"""The runtime layer: its boundaries, its one switch, its one diagnostic, and no side effects."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"
needs_linter = pytest.mark.skipif(not LINT.exists(), reason="import-linter not installed (pip install -e '.[dev]')")


def lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--no-cache"], capture_output=True, text=True, timeout=300, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(cwd)},
    )


@needs_linter
def test_import_linter_contracts_are_kept():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


@needs_linter
def test_import_linter_catches_a_cell_importing_the_runtime(tmp_path):
    for part in ("ncps_mlx", "converters"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    cell = tmp_path / "ncps_mlx" / "cells" / "cfc.py"
    cell.write_text(cell.read_text() + "\nfrom ncps_mlx.runtime import cpu  # noqa\n")
    done = lint(tmp_path)
    assert done.returncode != 0 and "1 broken" in done.stdout, done.stdout + done.stderr


QUIET_PROBE = """
import json, os
before = dict(os.environ)
import mlx.core as mx
import ncps_mlx
for model in (ncps_mlx.CfC(8, 16), ncps_mlx.LTC(8, 16), ncps_mlx.CTRNN(8, 16), ncps_mlx.CTGRU(8, 16)):
    y, _ = model(mx.random.normal((4, 10, 8)))
    mx.eval(y)
print(json.dumps({"environ_unchanged": dict(os.environ) == before}))
"""


def test_import_and_first_runs_leave_the_process_alone():
    """No environment edits (PATH included), and nothing printed, even while the kernels build."""
    done = subprocess.run([sys.executable, "-c", QUIET_PROBE], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert json.loads(done.stdout) == {"environ_unchanged": True}


def test_info_names_each_models_implementation():
    done = subprocess.run([sys.executable, "-m", "ncps_mlx", "info"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for line in ("mlx ", "device ", "runtime     NCPS_MLX_RUNTIME=auto", "kernels ", "kernel BLAS ", "  LTC ", "  CTGRU "):
        assert line in done.stdout, done.stdout
    if sys.platform.startswith("linux") and "not built" not in done.stdout and "could not" not in done.stdout:
        assert "CPU kernel" in done.stdout.split("  LTC ")[1].splitlines()[0]
    forced = subprocess.run(
        [sys.executable, "-m", "ncps_mlx", "info"], capture_output=True, text=True, timeout=600,
        env={**os.environ, "NCPS_MLX_RUNTIME": "mlx"},
    )
    assert "CPU kernel" not in forced.stdout and "NCPS_MLX_RUNTIME=mlx" in forced.stdout


def test_an_unknown_runtime_choice_is_a_clear_error(monkeypatch):
    import mlx.core as mx

    import ncps_mlx

    monkeypatch.setenv("NCPS_MLX_RUNTIME", "fast")
    with pytest.raises(ValueError, match="NCPS_MLX_RUNTIME must be one of auto, mlx; got 'fast'"):
        ncps_mlx.LTC(3, 5)(mx.ones((2, 4, 3)))


def test_info_says_when_mx_compile_cannot_keep_its_traces(tmp_path):
    """With no C++ compiler on PATH, MLX's CPU compile traces every call (and the models take
    their differentiable pass): ``info`` says so; with one (as here, where the kernels were
    built) it keeps its traces."""
    empty = tmp_path / "bin"
    empty.mkdir()
    runs = {}
    for name, path in (("no compiler", str(empty)), ("as installed", os.environ["PATH"])):
        done = subprocess.run([sys.executable, "-m", "ncps_mlx", "info"], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PATH": path})
        assert done.returncode == 0, done.stderr
        runs[name] = next(line for line in done.stdout.splitlines() if line.startswith("mx.compile"))
    assert "traces every call" in runs["no compiler"]
    if shutil.which("g++") or shutil.which("c++"):
        assert "keeps its traces" in runs["as installed"]
