"""Regenerate fixtures/precision with torch and ncps.torch (pip install -e '.[torch]'):

    python tools/make_precision_fixtures.py

* ``cfc_wide_input.pt`` (+ ``.json``): the pattern of a published speech-enhancement mask, a
  CfC over 513 spectrogram features with weights at trained scale (backbone weights up to ~6,
  pre-activations in the hundreds), where float32 round-off alone exceeds 1e-5. ``.npz``: the
  input ``x`` and ncps.torch's outputs in float32 (``output``, ``state``) and of a float64 copy
  of the module (``output64``, ``state64``).
* ``cfc_bfloat16.pt`` and ``ltc_float16.pt``: state dicts saved after ``model.bfloat16()`` /
  ``model.half()`` (mixed-precision training), each with ``.npz`` holding ``x`` and the outputs
  of the module widened back to float32 (``output``), which is what the conversion computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import ncps.torch as ncps_torch
import ncps.wirings as ncps_wirings

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "precision"


def run(module, x, dtype):
    module = module.to(dtype)
    with torch.no_grad():
        output, state = module(torch.from_numpy(x).to(dtype))
    return output.double().numpy(), state.double().numpy()


def wide_input():
    torch.manual_seed(0)
    model = ncps_torch.CfC(513, 64, backbone_units=128, backbone_layers=1, return_sequences=True).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            values = torch.randn(parameter.shape, generator=generator) * 0.3
            if name == "rnn_cell.backbone.0.weight":  # the 513 input columns at trained scale
                values[:, :513] = (torch.randn((parameter.shape[0], 513), generator=generator) * 2.5).clamp(-6, 6)
            parameter.copy_(values)
    torch.save(model.state_dict(), OUT / "cfc_wide_input.pt")
    (OUT / "cfc_wide_input.json").write_text(json.dumps({"backbone_units": 128, "backbone_layers": 1}) + "\n")
    x = np.random.default_rng(2).normal(size=(2, 20, 513)).astype(np.float32)
    output, state = run(model, x, torch.float32)
    output64, state64 = run(model, x, torch.float64)
    np.savez(OUT / "cfc_wide_input.npz", x=x, output=output, state=state, output64=output64, state64=state64)
    print(f"wrote cfc_wide_input: float32 reference off float64 by {np.max(np.abs(output - output64)):.2e}")


def half(name, model, to_half):
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2 * (parameter.std() if parameter.numel() > 1 else 1))
    to_half(model)
    torch.save(model.state_dict(), OUT / f"{name}.pt")
    x = np.random.default_rng(5).normal(size=(2, 12, 4)).astype(np.float32)
    output, _ = run(model.float().eval(), x, torch.float32)
    np.savez(OUT / f"{name}.npz", x=x, output=output)
    print(f"wrote {name}")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    wide_input()
    half("cfc_bfloat16", ncps_torch.CfC(4, ncps_wirings.AutoNCP(12, 3), return_sequences=True), lambda m: m.bfloat16())
    half("ltc_float16", ncps_torch.LTC(4, 8, return_sequences=True), lambda m: m.half())
