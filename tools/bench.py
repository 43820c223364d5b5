"""Benchmark ncps_mlx against ncps.torch side by side, in one process, interleaved.

    python tools/bench.py [--workloads W1,W3] [--runs 5] [--json out.json] [--markdown out.md]

Workloads (input 20, float32): W1 CfC 64 units, batch 32 x 100 steps; W2 CfC AutoNCP(64, 8)
32 x 100; W3 LTC 64 units 32 x 100; W4 LTC AutoNCP(64, 8) 32 x 100; W5 CfC 64 units 8 x 1000;
W6 CfC 64 units 1024 x 50; plus CTRNN and CTGRU (64 units, 32 x 100), which have no torch
counterpart and are timed in MLX alone.

For each workload both models get the same weights (torch's, copied), the outputs are checked
to agree (max abs difference), and forward and forward+backward (the gradient of a summed
squared output with respect to every parameter) are timed: warm-up runs, then ``--runs``
rounds alternating torch and MLX, median time, reported as sequences per second and the
MLX / torch ratio. Nothing here changes how either library is loaded (performance-notes: a
global BLAS swap would slow torch and make the comparison lie).

Each timed call starts after a ``--settle`` pause (default 20 ms). torch's OpenMP workers
spin for a while after every call; an MLX call started right after one ran ~30% slower (W1
forward: 2010 seq/s back to back, 2850 after 20 ms, 2800 with torch idle), while 20 ms cost
torch nothing measurable (3283 vs 3306 seq/s). Each workload runs in a fresh process
(``--one-process`` to turn that off), the two libraries side by side in it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import ncps_mlx  # first: on Linux it gives MLX a fast BLAS before mlx.core loads (linux_blas)
import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORKLOADS = {
    "W1": ("CfC", "fc", 32, 100),
    "W2": ("CfC", "autoncp", 32, 100),
    "W3": ("LTC", "fc", 32, 100),
    "W4": ("LTC", "autoncp", 32, 100),
    "W5": ("CfC", "fc", 8, 1000),
    "W6": ("CfC", "fc", 1024, 50),
    "CTRNN": ("CTRNN", "fc", 32, 100),
    "CTGRU": ("CTGRU", "fc", 32, 100),
}
INPUT, UNITS = 20, 64


def build(family, wiring):
    """(torch model or None, MLX model) with the same weights."""
    import torch

    if family in ("CTRNN", "CTGRU"):
        model = getattr(ncps_mlx, family)(INPUT, UNITS)
        return None, model
    import ncps.torch as ncps_torch
    import ncps.wirings as reference

    from ncps_mlx.converters.torch_reader import rename_torch_keys

    torch.manual_seed(0)
    t_units = reference.AutoNCP(UNITS, 8) if wiring == "autoncp" else UNITS
    m_units = ncps_mlx.wirings.AutoNCP(UNITS, 8) if wiring == "autoncp" else UNITS
    t_model = getattr(ncps_torch, family)(INPUT, t_units)
    m_model = getattr(ncps_mlx, family)(INPUT, m_units)
    weights = rename_torch_keys(t_model.state_dict())
    m_model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return t_model, m_model


SETTLE = 0.02


def timer(fn, warmup, runs):
    for _ in range(warmup):
        fn()

    def once():
        time.sleep(SETTLE)
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return once


def bench(name, warmup, runs, backward):
    import torch

    family, wiring, batch, steps = WORKLOADS[name]
    t_model, m_model = build(family, wiring)
    x = np.random.default_rng(0).normal(size=(batch, steps, INPUT)).astype(np.float32)
    xt, xm = torch.from_numpy(x), mx.array(x)

    def mlx_forward():
        mx.eval(m_model(xm)[0])

    def mlx_loss(model, x):
        return mx.sum(mx.square(model(x)[0]))

    mlx_grad = nn.value_and_grad(m_model, mlx_loss)

    def mlx_backward():
        mx.eval(mlx_grad(m_model, xm))

    def torch_forward():
        with torch.no_grad():
            t_model(xt)

    def torch_backward():
        t_model.zero_grad()
        (t_model(xt)[0] ** 2).sum().backward()

    row = {"workload": name, "model": f"{family} {'AutoNCP(64, 8)' if wiring == 'autoncp' else '64 units'}",
           "batch": batch, "steps": steps}  # fmt: skip
    if t_model is not None:
        with torch.no_grad():
            reference = t_model(xt)[0].numpy()
        row["max_abs_diff"] = float(np.max(np.abs(np.array(m_model(xm)[0]) - reference)))
    kinds = [("forward", torch_forward, mlx_forward)]
    if backward:
        kinds.append(("forward+backward", torch_backward, mlx_backward))
    for kind, t_fn, m_fn in kinds:
        t_once = timer(t_fn, warmup, runs) if t_model is not None else None
        m_once = timer(m_fn, warmup, runs)
        t_times, m_times = [], []
        for _ in range(runs):  # interleaved, so both see the same machine state
            if t_once is not None:
                t_times.append(t_once())
            m_times.append(m_once())
        m_rate = batch / statistics.median(m_times)
        row[f"mlx_{kind}"] = m_rate
        if t_once is not None:
            t_rate = batch / statistics.median(t_times)
            row[f"torch_{kind}"] = t_rate
            row[f"ratio_{kind}"] = m_rate / t_rate
    return row


def machine() -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ncps_mlx": ncps_mlx.__version__,
        "blas": ncps_mlx.blas_status(),
        "kernels": ncps_mlx.kernel_status(),
        "native": ncps_mlx.native_status(),
        "commit": commit,
    }


def markdown(rows, info) -> str:
    lines = [
        f"Machine: {info['platform']}, {info['cpus']} CPUs; mlx {info['mlx']}, torch {info['torch']} "
        f"({info['torch_threads']} threads); commit {info['commit']}; {info.get('settle_s', 0) * 1000:.0f} ms settle before each timed call",
        f"BLAS: {info.get('blas', 'not recorded')}. Kernels: {info.get('kernels', 'not recorded')}. Time loops: {info.get('native', 'not recorded')}",
        "",
        "| workload | model | batch x steps | torch fwd seq/s | mlx fwd seq/s | fwd ratio | torch f+b seq/s | mlx f+b seq/s | f+b ratio | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def cell(key, fmt="{:.1f}"):
            return fmt.format(r[key]) if key in r else "-"

        lines.append(
            f"| {r['workload']} | {r['model']} | {r['batch']} x {r['steps']} | {cell('torch_forward')} | "
            f"{cell('mlx_forward')} | {cell('ratio_forward', '{:.2f}x')} | {cell('torch_forward+backward')} | "
            f"{cell('mlx_forward+backward')} | {cell('ratio_forward+backward', '{:.2f}x')} | {cell('max_abs_diff', '{:.1e}')} |"
        )
    return "\n".join(lines)


def in_fresh_process(name, args) -> dict:
    """One workload in a child process: what earlier workloads left behind (memory, caches,
    threads) then cannot tilt it. Measured here: the same W5 forward ran at 43 or 90 seq/s
    depending on what had run before it in the process."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "row.json"
        command = [sys.executable, __file__, "--workloads", name, "--runs", str(args.runs), "--warmup",
                   str(args.warmup), "--settle", str(args.settle), "--row-json", str(result)]  # fmt: skip
        if args.no_backward:
            command.append("--no-backward")
        subprocess.run(command, check=True)
        return json.loads(result.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated (default: all)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per measurement (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    parser.add_argument("--settle", type=float, default=0.02, help="seconds of pause before each timed call (default 0.02)")
    parser.add_argument(
        "--one-process", action="store_true",
        help="run every workload in this process (default: each in a fresh one, both libraries side by side in it)",
    )  # fmt: skip
    parser.add_argument("--row-json", metavar="FILE", help=argparse.SUPPRESS)  # a child's result
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    args = parser.parse_args()
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    if args.runs < 5:
        print("note: fewer than 5 runs; medians will be noisy", file=sys.stderr)

    global SETTLE
    SETTLE = args.settle
    info = machine()
    info["settle_s"] = SETTLE
    rows = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        if args.one_process or len(names) == 1:
            rows.append(bench(name, args.warmup, args.runs, not args.no_backward))
        else:
            rows.append(in_fresh_process(name, args))
    if args.row_json:
        Path(args.row_json).write_text(json.dumps(rows[0]))
        return
    table = markdown(rows, info)
    print(table)
    bad = [r["workload"] for r in rows if r.get("max_abs_diff", 0.0) > 1e-5]
    if bad:
        print(f"WARNING: outputs differ by more than 1e-5 on {bad}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": rows}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
