"""Forward and gradient parity with ncps.torch on perturbed weights over 24 steps.

Each case builds the same model in ncps.torch and ncps_mlx (the MLX wiring from our own
``ncps_mlx.wirings`` with the same seed, checked equal to torch's masks before the weights are
copied), perturbs the torch weights away from their initial values, copies them, and runs both
on the same input. Outputs and final states must agree within 1e-5.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import ncps_mlx

pytest.importorskip("torch")
from helpers import load_torch_weights, max_abs_diff, perturb_, to_mlx, to_np, to_torch, torch

ncps_torch = pytest.importorskip("ncps.torch")
ncps_wirings = pytest.importorskip("ncps.wirings")

TOL = 1e-5
STEPS = 24
INPUT = 6

WIRINGS = {
    "fc": ("FullyConnected", (16, 4), {}),
    "random": ("Random", (16, 4), {"sparsity_level": 0.5, "random_seed": 5}),
    "ncp": ("NCP", (6, 5, 3, 3, 3, 4, 2), {"seed": 7}),
    "autoncp": ("AutoNCP", (20, 4), {"seed": 11}),
}


def wiring_pair(key):
    name, args, kwargs = WIRINGS[key]
    return getattr(ncps_wirings, name)(*args, **kwargs), getattr(ncps_mlx.wirings, name)(*args, **kwargs)


def build(family, units, torch_kwargs=None, mlx_kwargs=None, seed=0, perturb_scale=0.5, shrink=1.0):
    """Same architecture in both frameworks; units is an int or a WIRINGS key."""
    torch_kwargs = dict(torch_kwargs or {})
    mlx_kwargs = {**torch_kwargs, **(mlx_kwargs or {})}
    if isinstance(units, str):
        t_units, m_units = wiring_pair(units)
    else:
        t_units = m_units = units
    torch.manual_seed(seed)
    t_model = getattr(ncps_torch, family)(INPUT, t_units, **torch_kwargs)
    m_model = getattr(ncps_mlx, family)(INPUT, m_units, **mlx_kwargs)
    t_state = t_model.state_dict()
    m_params = dict(tree_flatten(m_model.parameters()))
    for key, value in t_state.items():
        if key.endswith("sparsity_mask"):
            assert np.array_equal(np.array(m_params[key]), value.numpy()), f"{key} differs from ncps.torch"
    perturb_(t_model, seed + 1, perturb_scale)
    if shrink != 1.0:
        with torch.no_grad():
            for name, param in t_model.named_parameters():
                if param.requires_grad:
                    param.mul_(shrink)
    load_torch_weights(m_model, t_model)
    return t_model, m_model


def make_inputs(batch, steps=STEPS, seed=0, time_first=False):
    rng = np.random.default_rng(seed)
    shape = (steps, batch, INPUT) if time_first else (batch, steps, INPUT)
    return rng.normal(size=shape).astype(np.float32)


def run_pair(t_model, m_model, x, hx=None, timespans=None):
    with torch.no_grad():
        t_out, t_state = t_model(to_torch(x), to_torch(hx), to_torch(timespans))
    m_out, m_state = m_model(to_mlx(x), to_mlx(hx), to_mlx(timespans))
    return (t_out, t_state), (m_out, m_state)


def assert_parity(t_result, m_result):
    (t_out, t_state), (m_out, m_state) = t_result, m_result
    out_err = max_abs_diff(m_out, t_out)
    state_err = max_abs_diff(m_state, t_state)
    assert out_err <= TOL and state_err <= TOL, f"output err {out_err:.3g}, state err {state_err:.3g}"
    # Guard against a vacuous comparison: the outputs must actually move.
    assert float(np.std(to_np(t_out))) > 1e-3


CFC_CASES = {
    "default": ("CfC", 12, {}),
    "pure": ("CfC", 12, {"mode": "pure"}),
    "no_gate": ("CfC", 12, {"mode": "no_gate"}),
    "backbone0": ("CfC", 12, {"backbone_layers": 0}),
    "backbone2": ("CfC", 12, {"backbone_layers": 2, "backbone_units": 20}),
    "backbone2_pure": ("CfC", 12, {"backbone_layers": 2, "backbone_units": 20, "mode": "pure"}),
    "silu": ("CfC", 12, {"activation": "silu"}),
    "relu": ("CfC", 12, {"activation": "relu"}),
    "tanh": ("CfC", 12, {"activation": "tanh"}),
    "gelu": ("CfC", 12, {"activation": "gelu"}),
    "proj": ("CfC", 12, {"proj_size": 5}),
    "mixed": ("CfC", 12, {"mixed_memory": True}),
    "mixed_proj_nogate": ("CfC", 12, {"mixed_memory": True, "proj_size": 3, "mode": "no_gate"}),
    "wired_fc": ("CfC", "fc", {}),
    "wired_random": ("CfC", "random", {}),
    "wired_ncp": ("CfC", "ncp", {}),
    "wired_autoncp": ("CfC", "autoncp", {}),
    "wired_autoncp_pure": ("CfC", "autoncp", {"mode": "pure"}),
    "wired_autoncp_nogate": ("CfC", "autoncp", {"mode": "no_gate"}),
    "wired_ncp_mixed_proj": ("CfC", "ncp", {"mixed_memory": True, "proj_size": 2}),
    "wired_random_mixed": ("CfC", "random", {"mixed_memory": True}),
}

LTC_CASES = {
    "fc": ("LTC", 10, {}),
    "fc_linear": ("LTC", 10, {"input_mapping": "linear", "output_mapping": "linear"}),
    "fc_none": ("LTC", 10, {"input_mapping": None, "output_mapping": None}),
    "fc_unconstrained": ("LTC", 10, {"implicit_param_constraints": False}),
    "fc_unfolds3_eps": ("LTC", 10, {"ode_unfolds": 3, "epsilon": 1e-6}),
    "ncp": ("LTC", "ncp", {}),
    "ncp_unconstrained": ("LTC", "ncp", {"implicit_param_constraints": False}),
    "ncp_linear_none": ("LTC", "ncp", {"input_mapping": "linear", "output_mapping": None}),
    "autoncp": ("LTC", "autoncp", {}),
    "random": ("LTC", "random", {}),
    "mixed": ("LTC", 10, {"mixed_memory": True}),
    "ncp_mixed": ("LTC", "ncp", {"mixed_memory": True}),
}

ALL_CASES = {**{f"cfc_{k}": v for k, v in CFC_CASES.items()}, **{f"ltc_{k}": v for k, v in LTC_CASES.items()}}


@pytest.mark.parametrize("case", sorted(ALL_CASES))
def test_forward_parity(case):
    family, units, kwargs = ALL_CASES[case]
    t_model, m_model = build(family, units, kwargs)
    assert_parity(*run_pair(t_model, m_model, make_inputs(batch=3)))


# Where the CPU kernels apply (ncps_mlx.runtime.cpu: the LTC's loop, a CfC's forward pass) the
# tests above run them; these run the models on MLX's own kernels too.
UNMIXED = sorted(k for k, v in ALL_CASES.items() if not v[2].get("mixed_memory"))


@pytest.mark.parametrize("case", UNMIXED)
def test_forward_parity_without_the_kernels(case):
    family, units, kwargs = ALL_CASES[case]
    t_model, m_model = build(family, units, kwargs)
    with ncps_mlx.runtime.cpu.turned_off():
        assert_parity(*run_pair(t_model, m_model, make_inputs(batch=3)))


def initial_state(m_model, batch, mixed, seed=3):
    rng = np.random.default_rng(seed)
    shape = (batch, m_model.state_size) if batch else (m_model.state_size,)
    h = rng.normal(scale=0.5, size=shape).astype(np.float32)
    if mixed:
        return h, rng.normal(scale=0.5, size=shape).astype(np.float32)
    return h


@pytest.mark.parametrize(
    "case", ["cfc_default", "cfc_mixed", "cfc_wired_autoncp", "ltc_fc", "ltc_ncp_mixed", "ltc_fc_unconstrained"]
)
def test_hx_given(case):
    family, units, kwargs = ALL_CASES[case]
    t_model, m_model = build(family, units, kwargs)
    hx = initial_state(m_model, 3, kwargs.get("mixed_memory", False))
    assert_parity(*run_pair(t_model, m_model, make_inputs(batch=3), hx=hx))


@pytest.mark.parametrize("case", ["cfc_default", "cfc_mixed", "cfc_wired_ncp", "ltc_fc", "ltc_mixed"])
def test_unbatched(case):
    family, units, kwargs = ALL_CASES[case]
    t_model, m_model = build(family, units, kwargs)
    x = make_inputs(batch=1)[0]
    hx = initial_state(m_model, 0, kwargs.get("mixed_memory", False))
    result_t, result_m = run_pair(t_model, m_model, x, hx=hx)
    assert to_np(result_m[0]).shape == (STEPS, to_np(result_t[0]).shape[-1])
    assert_parity(result_t, result_m)


@pytest.mark.parametrize("case", ["cfc_default", "cfc_proj", "cfc_wired_ncp", "ltc_fc", "ltc_ncp"])
@pytest.mark.parametrize("return_sequences", [True, False])
def test_time_first_and_last_output(case, return_sequences):
    family, units, kwargs = ALL_CASES[case]
    kwargs = {**kwargs, "batch_first": False, "return_sequences": return_sequences}
    t_model, m_model = build(family, units, kwargs)
    assert_parity(*run_pair(t_model, m_model, make_inputs(batch=3, time_first=True)))


@pytest.mark.parametrize("case", ["cfc_default", "cfc_pure", "cfc_no_gate", "cfc_wired_autoncp", "ltc_fc", "ltc_ncp"])
@pytest.mark.parametrize("layout", ["BT", "BT1"])
def test_timespans_batch_one(case, layout):
    # ncps.torch handles per-step timespans only for batch 1 (reference-notes point 7).
    family, units, kwargs = ALL_CASES[case]
    t_model, m_model = build(family, units, kwargs)
    ts = np.random.default_rng(4).uniform(0.2, 2.0, size=(1, STEPS)).astype(np.float32)
    if layout == "BT1":
        ts = ts[..., None]
    assert_parity(*run_pair(t_model, m_model, make_inputs(batch=1), timespans=ts))


# --- gradients -------------------------------------------------------------------------------


def torch_loss(model, x, target):
    out, _ = model(x)
    return ((out - target) ** 2).sum() / target.numel()


def mlx_loss(model, x, target):
    out, _ = model(x)
    return mx.sum(mx.square(out - target)) / target.size


GRADIENT_CASES = ["cfc_default", "cfc_backbone2", "cfc_pure", "cfc_mixed", "cfc_wired_autoncp", "ltc_fc", "ltc_ncp_unconstrained", "ltc_mixed"]


@pytest.mark.parametrize(
    "case, kernels",
    [(case, True) for case in GRADIENT_CASES] + [(case, False) for case in GRADIENT_CASES if case in UNMIXED],
    ids=lambda value: {True: "default_paths", False: "without_kernels"}.get(value, value) if isinstance(value, bool) else value,
)
def test_gradient_parity(case, kernels):
    with contextlib.nullcontext() if kernels else ncps_mlx.runtime.cpu.turned_off():
        gradient_parity(case)


def gradient_parity(case):
    family, units, kwargs = ALL_CASES[case]
    t_model, m_model = build(family, units, kwargs)
    x = make_inputs(batch=3, steps=20)
    with torch.no_grad():
        target = t_model(to_torch(x))[0] * 0.5 + 0.1

    t_model.zero_grad()
    torch_loss(t_model, to_torch(x), target).backward()
    t_grads = {name: p.grad.numpy() for name, p in t_model.named_parameters() if p.requires_grad}

    from ncps_mlx.converters.torch_reader import rename_torch_keys

    t_grads = rename_torch_keys(t_grads)
    _, m_grads = nn.value_and_grad(m_model, mlx_loss)(m_model, to_mlx(x), mx.array(target.numpy()))
    m_grads = dict(tree_flatten(m_grads))
    assert set(m_grads) == set(t_grads)
    for name, t_grad in t_grads.items():
        scale = float(np.max(np.abs(t_grad)))
        err = float(np.max(np.abs(np.array(m_grads[name]) - t_grad)))
        assert scale > 0, f"{name}: zero gradient, the comparison would be vacuous"
        assert err <= 1e-4 * scale, f"{name}: max abs err {err:.3g} vs gradient scale {scale:.3g}"
