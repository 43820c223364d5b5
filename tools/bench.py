"""Benchmark ncps_mlx against its peers: every peer in its own process, rounds interleaved.

    python tools/bench.py [--workloads W1,W6] [--peers mlx,torch,compile,xla,ort] [--runs 7]
                          [--json out.json] [--markdown out.md]

Peers: ``mlx`` (ncps_mlx, ``import mlx.core`` first, as users write it), ``torch`` (ncps.torch
eager), ``compile`` (ncps.torch under ``torch.compile``; its compiles take minutes a
workload here), ``xla`` (ncps.keras under ``tf.function(jit_compile=True)``, Keras 3 on
TensorFlow). Workloads (input 20, float32): W1 CfC 64, batch 32 x 100 steps; W3 LTC 64, 32 x
100; W4 LTC AutoNCP(64, 8), 32 x 100; W6 CfC 64, 1024 x 50; MIX CfC 64 with mixed memory, 32 x
100; CTRNN and CTGRU 64 units, 32 x 100 (no peer has them: seq/s and the GFLOP/s of their
matrix products); W5 CfC 64, 8 x 1000, forward+backward only, with each process's peak RSS.

Off those rows, each configuration beside its twin without the option (``TWINS``), the twin's
ncps_mlx in its own process in the same interleaved rounds: DROP (backbone dropout 0.1 in training, 2 backbone layers; ncps.torch puts dropout
only after layers 2..n) against DROP0; INPUT (mixed memory's "input" circuit, ncps.keras's
MixedMemoryRNN) against MIX; MASKC and MASKL (20% of the steps masked) against W1 and W3;
LTCINPUT against LTCMIX. W7C and W7L: a controller, batch 1, one step a call with the state
carried, 2,000 steps a round, median and p99 microseconds per step of ncps_mlx, ncps.torch
eager (one thread), onnxruntime (``ort``, one thread) on the step graph ncps_mlx exports of the
same weights, MLX's own floor (one trivial operation evaluated from Python a call) and the
machine's (``work``: a fixed job of no MLX, twelve NumPy (64, 84) matrix-vector products a call,
about a step's length: its p99 over its median is what the machine's interruptions alone give a
job of that length).

Each (workload, kind) starts one process per peer. A process builds its model, checks it
runs, warms up, then times one call (forward, or forward plus the gradient of a summed
squared output with respect to every parameter) each time the parent asks; the parent asks
the peers in turn, ``--runs`` rounds, so every peer sees the same machine state, and reports
medians as sequences per second and the ncps_mlx / peer ratio. ncps_mlx runs ncps.torch's
weights (copied through the converter's key map) and its output is compared with torch's;
the XLA peer runs its own initialisation (the work per call does not depend on the values).
Each timed call starts after a ``--settle`` pause (default 20 ms): torch's OpenMP workers spin
after a call, and a call started straight after one ran ~30% slower. A peer that cannot run a
workload (torch.compile on W5 here: a RecursionError in Inductor) says "fails" in its cells;
``--json`` is written after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INPUT, UNITS = 20, 64
WORKLOADS = {  # family, wiring, batch, steps, kinds
    "W1": ("CfC", "fc", 32, 100, ("forward", "forward+backward")),
    "W3": ("LTC", "fc", 32, 100, ("forward", "forward+backward")),
    "W4": ("LTC", "autoncp", 32, 100, ("forward", "forward+backward")),
    "W6": ("CfC", "fc", 1024, 50, ("forward", "forward+backward")),
    "MIX": ("CfC", "mixed", 32, 100, ("forward", "forward+backward")),
    "CTRNN": ("CTRNN", "fc", 32, 100, ("forward", "forward+backward")),
    "CTGRU": ("CTGRU", "fc", 32, 100, ("forward", "forward+backward")),
    "W5": ("CfC", "fc", 8, 1000, ("forward+backward",)),
    # Off the rows above: each configuration beside its twin without the option, in the same run.
    "DROP0": ("CfC", "layers2", 32, 100, ("forward", "forward+backward")),
    "DROP": ("CfC", "dropout", 32, 100, ("forward", "forward+backward")),
    "INPUT": ("CfC", "mixed_input", 32, 100, ("forward", "forward+backward")),
    "MASKC": ("CfC", "masked", 32, 100, ("forward", "forward+backward")),
    "MASKL": ("LTC", "masked", 32, 100, ("forward", "forward+backward")),
    "LTCMIX": ("LTC", "mixed", 32, 100, ("forward", "forward+backward")),
    "LTCINPUT": ("LTC", "mixed_input", 32, 100, ("forward", "forward+backward")),
    # W7: a controller, batch 1, one step a call with the state carried, 2,000 steps a round.
    "W7C": ("CfC", "autoncp", 1, 2000, ("stream",)),
    "W7L": ("LTC", "autoncp", 1, 2000, ("stream",)),
}
TWINS = {"DROP": "DROP0", "INPUT": "MIX", "MASKC": "W1", "MASKL": "W3", "LTCINPUT": "LTCMIX"}
PEERS = ("mlx", "torch", "compile", "xla", "ort")
HAS_PEERS = ("CfC", "LTC")
# What each variant builds (model options), and which peers have it: ncps.torch has neither masks
# nor the "input" circuit; ncps.keras's mixed memory is the "input" circuit (MixedMemoryRNN);
# onnxruntime runs the exported step graph only.
VARIANTS = {
    "fc": ({}, ("torch", "compile", "xla")),
    "autoncp": ({}, ("torch", "compile", "xla", "ort")),
    "mixed": ({"mixed_memory": True}, ("torch", "compile")),
    "mixed_input": ({"mixed_memory": True, "memory_circuit": "input"}, ("xla",)),
    "layers2": ({"backbone_layers": 2}, ("torch", "compile")),
    "dropout": ({"backbone_layers": 2, "backbone_dropout": 0.1}, ("torch", "compile")),
    "masked": ({}, ("xla",)),
}


def describe(family, wiring):
    names = {"fc": "64", "autoncp": "AutoNCP(64, 8)", "mixed": "64 mixed memory", "layers2": "64, 2 backbone layers",
             "dropout": "64, 2 backbone layers, dropout 0.1, training", "masked": "64, 20% of steps masked",
             "mixed_input": "64 mixed memory, \"input\" circuit"}
    return f"{family} " + names[wiring]


def options(family, wiring):
    """(model options, training) of a variant; LTCs take no backbone options."""
    kwargs = dict(VARIANTS[wiring][0])
    if family != "CfC":
        kwargs = {k: v for k, v in kwargs.items() if k in ("mixed_memory", "memory_circuit")}
    return kwargs, "backbone_dropout" in kwargs


def mask_of(batch, steps):
    """The masked workloads' mask: 20% of the steps of each sample False, the first kept."""
    import numpy as np

    keep = np.random.default_rng(1).random((batch, steps)) > 0.2
    keep[:, 0] = True
    return keep


def matmul_flops(family, batch, steps):
    """Floating-point operations of the matrix products in one forward call (CTRNN, CTGRU)."""
    if family == "CTRNN":  # x W_in once a step, h W_rec in each of 6 Euler unfolds
        return 2 * batch * steps * (INPUT * UNITS + 6 * UNITS * UNITS)
    m = 8  # CTGRU's time scales: [x, h] -> retrieve, store (U x M each), detect (U)
    return 2 * batch * steps * ((INPUT + UNITS) * (2 * UNITS * m + UNITS))


# --- one peer, in its own process -------------------------------------------------------------


def child_mlx(family, wiring, weights, batch, steps):
    import mlx.core as mx  # first, as users write it
    import mlx.nn as nn
    import numpy as np

    import ncps_mlx

    units = ncps_mlx.wirings.AutoNCP(UNITS, 8) if wiring == "autoncp" else UNITS
    kwargs, training = options(family, wiring)
    model = getattr(ncps_mlx, family)(INPUT, units, **kwargs)
    if weights:
        model.load_weights([(k, mx.array(v)) for k, v in np.load(weights).items()], strict=True)
    model.train(training)
    mask = mx.array(mask_of(batch, steps)) if wiring == "masked" else None

    def forward(x):
        y = model(x, mask=mask)[0]
        mx.eval(y)
        return y

    grad = nn.value_and_grad(model, lambda m, x: mx.sum(mx.square(m(x, mask=mask)[0])))
    return mx.array, forward, lambda x: mx.eval(grad(model, x)), np.array, model


def child_torch(family, wiring, weights_out, compiled):
    import numpy as np
    import torch
    import ncps.torch as reference
    import ncps.wirings as reference_wirings

    from ncps_mlx.converters.torch_reader import rename_torch_keys

    torch.manual_seed(0)
    units = reference_wirings.AutoNCP(UNITS, 8) if wiring == "autoncp" else UNITS
    kwargs, training = options(family, wiring)
    model = getattr(reference, family)(INPUT, units, **kwargs)
    model.train(training)
    if weights_out:
        np.savez(weights_out, **rename_torch_keys(model.state_dict()))
    run = torch.compile(model) if compiled else model

    def forward(x):
        with torch.no_grad():
            return run(x)[0]

    def backward(x):
        model.zero_grad()
        (run(x)[0] ** 2).sum().backward()

    return torch.from_numpy, forward, backward, lambda y: y.detach().numpy(), model


def child_xla(family, wiring, batch, steps):
    os.environ.pop("TF_USE_LEGACY_KERAS", None)  # this process only: ncps.keras is Keras 3
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import ncps.keras as reference
    import ncps.wirings as reference_wirings

    units = reference_wirings.AutoNCP(UNITS, 8) if wiring == "autoncp" else UNITS
    kwargs, _ = options(family, wiring)
    kwargs.pop("memory_circuit", None)  # ncps.keras's mixed memory is the "input" circuit
    layer = getattr(reference, family)(units, return_sequences=True, **kwargs)
    layer.build((None, None, INPUT))
    mask = tf.constant(mask_of(batch, steps)) if wiring == "masked" else None

    @tf.function(jit_compile=True)
    def forward(x):
        return layer(x, mask=mask)

    @tf.function(jit_compile=True)
    def gradients(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(layer(x, mask=mask)))
        return tape.gradient(loss, layer.trainable_variables)

    return tf.constant, lambda x: forward(x).numpy(), lambda x: [g.numpy() for g in gradients(x)], lambda y: y, None


def streamer(peer, family, wiring, weights):
    """``step(x_t)`` for W7: one step of batch 1 a call, the state carried, as a controller runs."""
    import numpy as np

    if peer == "floor":  # MLX's own floor per call: one trivial operation evaluated from Python
        import mlx.core as mx

        a = mx.zeros((1, UNITS))
        mx.eval(a)
        return lambda x_t: mx.eval(a + 1)
    if peer == "work":  # the machine's own tail: a fixed job of about a step's length, no MLX
        rng = np.random.default_rng(0)
        matrix, vector = rng.normal(size=(64, 84)).astype(np.float32), rng.normal(size=84).astype(np.float32)

        def step(x_t):
            for _ in range(12):
                matrix @ vector

        return step
    if peer == "mlx":
        import mlx.core as mx

        to_array, _, _, _, model = child_mlx(family, wiring, weights, 1, 1)
        state = [mx.zeros((1, model.state_size))]

        def step(x_t):  # x_t (1, I): the observation as one step, (1, 1, I)
            y, state[0] = model(mx.array(x_t[:, None]), state[0])
            mx.eval(y, state[0])

        return step
    if peer == "torch":
        import torch

        torch.set_num_threads(1)  # batch 1: more threads were slower
        _, _, _, _, model = child_torch(family, wiring, weights, False)
        state = [torch.zeros(1, model.state_size)]

        def step(x_t):
            with torch.no_grad():
                y, state[0] = model(torch.from_numpy(x_t)[:, None], state[0])

        return step
    # onnxruntime, one thread, on the step graph ncps_mlx exports of the same weights
    import onnxruntime as ort

    import ncps_mlx

    _, _, _, _, model = child_mlx(family, wiring, weights, 1, 1)
    path = Path(tempfile.mkdtemp()) / "step.onnx"
    ncps_mlx.export_onnx(model, path, step=True)
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = settings.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"])
    state = [np.zeros((1, model.state_size), np.float32)]

    def step(x_t):
        y, state[0] = session.run(["output", "next_state"], {"input": x_t, "state": state[0]})

    return step


def child(args):
    import numpy as np

    family, wiring, batch, steps, _ = WORKLOADS[args.workload]
    if args.kind == "stream":
        return child_stream(args, family, wiring, steps)
    if args.child == "mlx":
        to_array, forward, backward, to_numpy, _ = child_mlx(family, wiring, args.weights, batch, steps)
    elif args.child == "xla":
        to_array, forward, backward, to_numpy, _ = child_xla(family, wiring, batch, steps)
    else:
        to_array, forward, backward, to_numpy, _ = child_torch(family, wiring, args.weights, args.child == "compile")
    x = to_array(np.random.default_rng(0).normal(size=(batch, steps, INPUT)).astype(np.float32))
    call = forward if args.kind == "forward" else backward
    if args.outputs:
        np.save(args.outputs, to_numpy(forward(x)))
    for _ in range(args.warmup):
        call(x)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        time.sleep(args.settle)
        start = time.perf_counter()
        call(x)
        print(time.perf_counter() - start, flush=True)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def child_stream(args, family, wiring, steps):
    """W7: each "run" times ``steps`` one-step calls and answers their times (JSON)."""
    import numpy as np

    step = streamer(args.child, family, wiring, args.weights)
    xs = np.random.default_rng(0).normal(size=(steps, 1, INPUT)).astype(np.float32)
    for t in range(200):
        step(xs[t])
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        times = []
        for t in range(steps):
            start = time.perf_counter()
            step(xs[t])
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


# --- the parent -------------------------------------------------------------------------------


def start(peer, name, kind, args, folder, weights, outputs=True):
    command = [sys.executable, __file__, "--child", peer, "--workload", name, "--kind", kind,
               "--warmup", str(args.warmup), "--settle", str(args.settle)]
    if weights:
        command += ["--weights", weights]
    if kind == "forward" and outputs:
        command += ["--outputs", str(Path(folder) / f"{peer}.npy")]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    ready = process.stdout.readline().strip()
    if ready != "ready":  # e.g. torch.compile cannot compile W5 here (a RecursionError in Inductor)
        process.kill()
        print(f"[bench] {peer} on {name} {kind} did not start (its stderr is above): its cells say so", file=sys.stderr,
              flush=True)
        return None
    return process


def measure(name, kind, peers, args):
    import numpy as np

    family, wiring, batch, steps, _ = WORKLOADS[name]
    peers = [p for p in peers if p == "mlx" or (family in HAS_PEERS and p in VARIANTS[wiring][1])]
    if kind == "stream":
        return measure_stream(name, peers + list(STREAM_REFERENCES), args)
    peers = [p for p in peers if p != "ort"]
    with tempfile.TemporaryDirectory() as folder:
        weights = str(Path(folder) / "weights.npz") if "torch" in peers else None
        processes, failed = {}, []
        for peer in sorted(peers, key=lambda p: p != "torch"):  # torch first: it writes the weights
            process = start(peer, name, kind, args, folder, weights if peer in ("torch", "mlx") else None)
            if process is None:
                failed.append(peer)
            else:
                processes[peer] = process
        if name in TWINS:  # the twin without the option, ncps_mlx, in the same interleaved rounds
            twin = start("mlx", TWINS[name], kind, args, folder, None, outputs=False)
            if twin is not None:
                processes["twin"] = twin
        times = {peer: [] for peer in processes}
        for _ in range(args.runs):
            for peer, process in processes.items():
                process.stdin.write("run\n")
                process.stdin.flush()
                times[peer].append(float(process.stdout.readline()))
        row = {"workload": name, "model": describe(family, wiring), "batch": batch, "steps": steps, "kind": kind}
        row.update({f"{peer}_failed": True for peer in failed})
        for peer, process in processes.items():
            process.stdin.close()
            row[f"{peer}_peak_rss_mb"] = json.loads(process.stdout.readline())["peak_rss_mb"]
            process.wait()
            twin_batch = WORKLOADS[TWINS[name]][2] if peer == "twin" else batch
            row[f"{peer}_seq_s"] = twin_batch / statistics.median(times[peer])
        if kind == "forward" and "torch" in processes and "mlx" in processes and not options(family, wiring)[1]:
            mlx_y, torch_y = (np.load(Path(folder) / f"{p}.npy") for p in ("mlx", "torch"))
            row["max_abs_diff"] = float(np.max(np.abs(mlx_y - torch_y)))
    for peer in processes:
        if peer not in ("mlx", "twin") and "mlx_seq_s" in row:
            row[f"ratio_{peer}"] = row["mlx_seq_s"] / row[f"{peer}_seq_s"]
    if "twin_seq_s" in row and "mlx_seq_s" in row:
        row["twin_over_configuration"] = row["twin_seq_s"] / row["mlx_seq_s"]
    if family not in HAS_PEERS and kind == "forward":
        row["mlx_gflop_s"] = matmul_flops(family, batch, steps) * row["mlx_seq_s"] / batch / 1e9
    return row


# W7's peers in their table's order; the last two are references (no model, no weights).
STREAM_PEERS, STREAM_REFERENCES = ("mlx", "torch", "ort", "floor", "work"), ("floor", "work")


def measure_stream(name, peers, args):
    """W7: median and p99 microseconds per one-step call, every step of every round pooled."""
    family, wiring, batch, steps, _ = WORKLOADS[name]
    peers = [p for p in peers if p in STREAM_PEERS]
    with tempfile.TemporaryDirectory() as folder:
        weights = str(Path(folder) / "weights.npz") if "torch" in peers else None
        processes = {}
        for peer in sorted(peers, key=lambda p: p != "torch"):  # torch first: it writes the weights
            process = start(peer, name, "stream", args, folder, weights if peer not in STREAM_REFERENCES else None)
            if process is not None:
                processes[peer] = process
        times = {peer: [] for peer in processes}
        for _ in range(args.runs):
            for peer, process in processes.items():
                process.stdin.write("run\n")
                process.stdin.flush()
                times[peer] += json.loads(process.stdout.readline())
        row = {"workload": name, "model": describe(family, wiring), "batch": batch, "steps": steps, "kind": "stream"}
        for peer, process in processes.items():
            process.stdin.close()
            row[f"{peer}_peak_rss_mb"] = json.loads(process.stdout.readline())["peak_rss_mb"]
            process.wait()
            row[f"{peer}_us_median"] = statistics.median(times[peer]) * 1e6
            row[f"{peer}_us_p99"] = statistics.quantiles(times[peer], n=100)[98] * 1e6
        for peer in processes:
            if peer != "mlx" and "mlx_us_median" in row:
                row[f"ratio_{peer}"] = row[f"{peer}_us_median"] / row["mlx_us_median"]
    return row


def machine() -> dict:
    import importlib.metadata as metadata

    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "-"

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {
        "platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
        **{p: version(p) for p in ("mlx", "torch", "tensorflow", "keras", "ncps")},
        "commit": commit.stdout.strip() or "unknown",
    }


def markdown(rows, peers, info) -> str:
    others = [p for p in peers if p not in ("mlx", "ort")]
    head = ["workload", "model", "B x T", "pass", "ncps_mlx seq/s"] + [f"{p} seq/s" for p in others]
    head += [f"vs {p}" for p in others] + ["max abs diff", "peak RSS MB (mlx / " + " / ".join(others) + ")"]
    lines = [
        f"Machine: {info['platform']}, {info['cpus']} CPUs, Python {info['python']}; mlx {info['mlx']}, "
        f"torch {info['torch']}, tensorflow {info['tensorflow']}, keras {info['keras']}, ncps {info['ncps']}; "
        f"commit {info['commit']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in [r for r in rows if r["kind"] != "stream"]:
        def get(key, fmt="{:.0f}"):
            if key in r:
                return fmt.format(r[key])
            peer = key.split("_")[-1] if key.startswith("ratio_") else key.split("_")[0]
            return "fails" if r.get(f"{peer}_failed") else "-"

        mlx = get("mlx_seq_s") + (f" ({r['mlx_gflop_s']:.0f} GFLOP/s)" if "mlx_gflop_s" in r else "")
        cells = [r["workload"], r["model"], f"{r['batch']} x {r['steps']}", r["kind"], mlx]
        cells += [get(f"{p}_seq_s") for p in others] + [get(f"ratio_{p}", "{:.2f}x") for p in others]
        cells += [get("max_abs_diff", "{:.1e}"), " / ".join(get(f"{p}_peak_rss_mb") for p in peers)]
        lines.append("| " + " | ".join(cells) + " |")
    twins = [r for r in rows if "twin_over_configuration" in r]
    if twins:
        lines += ["", "Each configuration and its twin (ncps_mlx both) in the same interleaved rounds:", "",
                  "| configuration | pass | seq/s | its twin | twin seq/s | twin / configuration |", "|---|---|---|---|---|---|"]
        for r in twins:
            t = TWINS[r["workload"]]
            lines.append(f"| {r['workload']} {r['model']} | {r['kind']} | {r['mlx_seq_s']:.0f} | {t} {describe(*WORKLOADS[t][:2])} | "
                         f"{r['twin_seq_s']:.0f} | {r['twin_over_configuration']:.2f}x |")
    streams = [r for r in rows if r["kind"] == "stream"]
    if streams:
        names = [p for p in STREAM_PEERS if any(f"{p}_us_median" in r for r in streams)]
        lines += ["", "| workload | model | steps a round | " + " | ".join(f"{p} us/step median (p99, p99/median)" for p in names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        for r in streams:
            cells = [f"{r[p + '_us_median']:.0f} ({r[p + '_us_p99']:.0f}, {r[p + '_us_p99'] / r[p + '_us_median']:.1f}x)"
                     if f"{p}_us_median" in r else "-" for p in names]
            lines.append(f"| {r['workload']} | {r['model']} | {r['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated (default: all)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated from {','.join(PEERS)} (default: all)")
    parser.add_argument("--runs", type=int, default=7, help="timed rounds per measurement (default 7)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--settle", type=float, default=0.02, help="seconds of pause before each timed call")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    for hidden in ("--child", "--workload", "--kind", "--weights", "--outputs"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if [w for w in names if w not in WORKLOADS] or [p for p in peers if p not in PEERS]:
        parser.error(f"choose workloads from {list(WORKLOADS)} and peers from {list(PEERS)}")
    if "mlx" not in peers:
        peers.insert(0, "mlx")
    info, rows = machine(), []
    for name in names:
        for kind in WORKLOADS[name][4]:
            print(f"[bench] {name} {kind} ...", file=sys.stderr, flush=True)
            rows.append(measure(name, kind, peers, args))
            if args.json:  # as it goes: a long run that stops keeps what it measured
                Path(args.json).write_text(json.dumps({"machine": info, "peers": peers, "results": rows}, indent=2))
    table = markdown(rows, peers, info)
    print(table)
    bad = [r["workload"] for r in rows if r.get("max_abs_diff", 0.0) > 1e-5]
    if bad:
        print(f"WARNING: ncps_mlx and ncps.torch outputs differ by more than 1e-5 on {bad}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "peers": peers, "results": rows}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
