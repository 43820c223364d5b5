"""Regenerate fixtures/ with the reference package (needs torch, TensorFlow and ncps:
pip install -e '.[torch,tf]').

    python tools/make_fixtures.py [--out fixtures]

For each variant in VARIANTS, writes to fixtures/torch/:
  NAME.pt           torch.save(model.state_dict())          (what users save)
  NAME.safetensors  the same state dict as safetensors        (readable without torch)
  NAME.json         the --config a user would pass: what the weights do not tell
  NAME.npz          inputs and ncps.torch's outputs: x, output, state[, state_c];
                    x1, timespans1, output1, state1[, state1_c] (batch 1 with timespans)
and cfc_module.pt, a whole pickled module (torch.save(model)) for the --trust-pickle path.
Then tools/make_keras_fixtures.py writes fixtures/keras and fixtures/tf_keras,
tools/make_keras_graph_fixtures.py fixtures/keras_graphs (whole functional models), and
tools/make_wrapper_fixtures.py fixtures/torch_wrappers (user modules, Lightning, DataParallel) and
tools/make_keras_published_fixtures.py fixtures/keras_published (older Keras/ncps/keras-ncp layouts).
Weights are perturbed away from their initialisation (relative to each tensor's spread) so the
fixtures test more than the initialiser.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import ncps.torch as ncps_torch
import ncps.wirings as ncps_wirings
from safetensors.numpy import save_file

INPUT = 4
BATCH = 2
STEPS = 12

# name: (class, units (int or (wiring class, args, kwargs)), constructor kwargs, keys for --config)
VARIANTS = {
    "cfc_default": ("CfC", 8, {"backbone_units": 16}, []),
    "cfc_pure": ("CfC", 8, {"backbone_units": 16, "mode": "pure"}, []),
    "cfc_no_gate": ("CfC", 8, {"backbone_units": 16, "mode": "no_gate"}, ["mode"]),
    "cfc_backbone2_silu": ("CfC", 8, {"backbone_units": 12, "backbone_layers": 2, "activation": "silu"}, ["activation"]),
    "cfc_backbone0": ("CfC", 8, {"backbone_layers": 0}, []),
    "cfc_proj": ("CfC", 8, {"backbone_units": 16, "proj_size": 2}, []),
    "cfc_mixed": ("CfC", 8, {"backbone_units": 16, "mixed_memory": True}, []),
    "cfc_time_first_last": (
        "CfC",
        8,
        {"backbone_units": 16, "batch_first": False, "return_sequences": False},
        ["batch_first", "return_sequences"],
    ),
    "cfc_autoncp": ("CfC", ("AutoNCP", (10, 2), {"seed": 5}), {}, ["units"]),
    "cfc_ncp_mixed": ("CfC", ("NCP", (4, 3, 2, 2, 2, 2, 2), {"seed": 3}), {"mixed_memory": True}, []),
    "cfc_fc_wired": ("CfC", ("FullyConnected", (8, 3), {}), {}, []),
    "cfc_random_wired_no_gate": ("CfC", ("Random", (8, 3), {"sparsity_level": 0.5, "random_seed": 2}), {"mode": "no_gate"}, ["mode"]),
    "ltc_fc": ("LTC", 8, {}, []),
    "ltc_ncp": ("LTC", ("NCP", (4, 3, 2, 2, 2, 2, 2), {"seed": 3}), {}, ["units"]),
    "ltc_autoncp_no_config": ("LTC", ("AutoNCP", (10, 3), {"seed": 9}), {}, []),
    "ltc_linear_none": ("LTC", 8, {"input_mapping": "linear", "output_mapping": None}, []),
    "ltc_unconstrained": (
        "LTC",
        8,
        {"implicit_param_constraints": False, "ode_unfolds": 4, "epsilon": 1e-6},
        ["implicit_param_constraints", "ode_unfolds", "epsilon"],
    ),
    "ltc_mixed": ("LTC", 8, {"mixed_memory": True}, []),
}


def make_units(spec):
    if isinstance(spec, int):
        return spec, spec
    name, args, kwargs = spec
    return getattr(ncps_wirings, name)(*args, **kwargs), {"class": name, **dict(zip(_arg_names(name), args)), **kwargs}


def _arg_names(name):
    return {
        "AutoNCP": ["units", "output_size"],
        "NCP": [
            "inter_neurons",
            "command_neurons",
            "motor_neurons",
            "sensory_fanout",
            "inter_fanout",
            "recurrent_command_synapses",
            "motor_fanin",
        ],
        "FullyConnected": ["units", "output_dim"],
        "Random": ["units", "output_dim"],
    }[name]


# Parameters of an LTC that must stay positive when no softplus is applied at run time; the
# solver divides by a sum of them, so they are perturbed multiplicatively.
LTC_POSITIVE = ("gleak", "cm", "w", "sensory_w")


def perturb_(model, seed, scale=0.5):
    """Move every trainable torch parameter away from its initial value, deterministically.

    The noise is relative to each tensor's own spread (0.1 for constant-initialised tensors
    such as LTC input_w), so weights change substantially without making the dynamics chaotic:
    with a flat 0.3 on 128-unit backbones, torch float32 itself drifts 5e-5 from torch float64
    within 24 steps, and no float32 implementation could be compared at 1e-5.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen)
            if name.split(".")[-1] in LTC_POSITIVE and "lstm" not in name:
                param.mul_(torch.exp(0.3 * noise))
            else:
                spread = float(param.std()) if param.numel() > 1 else 0.0
                param.add_(scale * (spread if spread > 1e-6 else 0.1) * noise)


def run(model, x, ts=None):
    with torch.no_grad():
        out, state = model(torch.from_numpy(x), None, None if ts is None else torch.from_numpy(ts))
    states = state if isinstance(state, tuple) else (state,)
    return out.numpy(), [s.numpy() for s in states]


def make(name, out_dir: Path, seed: int):
    family, units_spec, kwargs, config_keys = VARIANTS[name]
    torch.manual_seed(seed)
    units, units_config = make_units(units_spec)
    model = getattr(ncps_torch, family)(INPUT, units, **kwargs)
    perturb_(model, seed + 1000)
    model.eval()

    state_dict = model.state_dict()
    torch.save(state_dict, out_dir / f"{name}.pt")
    save_file({k: v.numpy().copy() for k, v in state_dict.items()}, str(out_dir / f"{name}.safetensors"))
    config = {"class": family}
    for key in config_keys:
        config[key] = units_config if key == "units" else kwargs[key]
    (out_dir / f"{name}.json").write_text(json.dumps(config, indent=2) + "\n")

    rng = np.random.default_rng(seed)
    batch_first = kwargs.get("batch_first", True)
    x = rng.normal(size=(BATCH, STEPS, INPUT)).astype(np.float32)
    x = x if batch_first else np.ascontiguousarray(x.swapaxes(0, 1))
    out, states = run(model, x)
    x1 = rng.normal(size=(1, STEPS, INPUT)).astype(np.float32)
    ts1 = rng.uniform(0.2, 2.0, size=(1, STEPS)).astype(np.float32)
    x1 = x1 if batch_first else np.ascontiguousarray(x1.swapaxes(0, 1))
    ts1 = ts1 if batch_first else np.ascontiguousarray(ts1.T)
    out1, states1 = run(model, x1, ts1)
    arrays = {"x": x, "output": out, "x1": x1, "timespans1": ts1, "output1": out1}
    for prefix, values in (("state", states), ("state1", states1)):
        arrays[prefix] = values[0]
        if len(values) > 1:
            arrays[f"{prefix}_c"] = values[1]
    np.savez(out_dir / f"{name}.npz", **arrays)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "fixtures"))
    args = parser.parse_args()
    out_dir = Path(args.out) / "torch"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for seed, name in enumerate(VARIANTS):
        model = make(name, out_dir, seed)
        if name == "cfc_backbone2_silu":
            torch.save(model, out_dir / "cfc_module.pt")
        print(f"wrote {name}")
    total = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"{len(VARIANTS)} variants, {total / 1024:.0f} KiB in {out_dir}")
    # Keras 3 and tf.keras each need their own process (TF_USE_LEGACY_KERAS is read at import).
    for name in ("make_keras_fixtures.py", "make_keras_graph_fixtures.py"):
        script = Path(__file__).with_name(name)
        for flavour in ("keras", "tf"):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
            if flavour == "tf":
                env["TF_USE_LEGACY_KERAS"] = "1"
            else:
                env.pop("TF_USE_LEGACY_KERAS", None)
            subprocess.run([sys.executable, str(script), flavour], env=env, check=True)
    subprocess.run([sys.executable, str(Path(__file__).with_name("make_wrapper_fixtures.py"))], check=True)
    # Layouts of older Keras and ncps/keras-ncp versions, each flavour in its own process.
    subprocess.run([sys.executable, str(Path(__file__).with_name("make_keras_published_fixtures.py"))], check=True)


if __name__ == "__main__":
    main()
