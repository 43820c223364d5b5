"""``python -m ncps_mlx info``: versions, the device, and how each model runs here."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> str:
    """The diagnostic report, as text."""
    import mlx.core as mx

    import ncps_mlx
    from ncps_mlx import runtime

    lines = [
        f"ncps_mlx    {ncps_mlx.__version__}",
        f"mlx         {mx.__version__}",
        f"python      {platform.python_version()} on {platform.system()} {platform.machine()}",
        f"device      {mx.default_device()}",
        f"runtime     NCPS_MLX_RUNTIME={runtime.choice()}",
        f"kernels     {runtime.cpu.status()}",
        f"kernel BLAS {runtime.blas.status()}",
        "mx.compile  " + ("keeps its traces" if runtime.stepping.compile_caches() else
                          "traces every call (MLX found no C++ compiler): MLX's path is slower"),
        "models:",
    ]
    probes = {
        "CfC": ncps_mlx.CfC(2, 4),
        "CfC (AutoNCP)": ncps_mlx.CfC(2, ncps_mlx.wirings.AutoNCP(6, 2)),
        "CfC (mixed memory)": ncps_mlx.CfC(2, 4, mixed_memory=True),
        "CfC (mixed, input)": ncps_mlx.CfC(2, 4, mixed_memory=True, memory_circuit="input"),
        "LTC": ncps_mlx.LTC(2, 4),
        "LTC (mixed, input)": ncps_mlx.LTC(2, 4, mixed_memory=True, memory_circuit="input"),
        "CTRNN": ncps_mlx.CTRNN(2, 4),
        "CTGRU": ncps_mlx.CTGRU(2, 4),
    }
    for name, model in probes.items():
        lines.append(f"  {name:<19} {runtime.implementation(model.rnn_cell.lowered(), model.use_mixed, memory_circuit=model.memory_circuit)}")
    lowered = probes["CfC"].rnn_cell.lowered()
    lines.append(f"  {'float16/bfloat16':<19} {runtime.implementation(lowered, False, mx.bfloat16)}")
    lines.append("optional:   " + ", ".join(f"{p} {_version(p)}" for p in ("ncps", "torch", "tensorflow", "onnxruntime")))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ncps_mlx", description=__doc__)
    parser.add_argument("command", choices=["info"], help="info: versions, device, and which implementation each model uses")
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
