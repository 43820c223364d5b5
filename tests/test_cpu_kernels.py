"""The CPU kernels (ncps_mlx.runtime.cpu), the LTC's and the CfC's loops: the same outputs and
gradients as the MLX path, their build of the rational tanh and sigmoid within fastmath's bounds,
used where they apply and nowhere else, and a clean fall-back where they cannot be built."""

from __future__ import annotations

import dataclasses
import json

import os
import subprocess
import sys

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

import ncps_mlx
from ncps_mlx import wirings
from ncps_mlx.runtime import blas, cpu

applies = pytest.mark.skipif(
    cpu.library() is None, reason=f"the kernels do not apply here: {cpu.status()}"
)


@pytest.fixture
def kernel_calls():
    """How often the kernels' nodes ran during the test: each loop's forward and backward passes
    (counted by the extension as they evaluate)."""
    names = {"forward": "LTCSequence", "backward": "LTCSequenceVJP", "cfc_states": "CfCSequence",
             "wired_cfc_states": "WiredCfCSequence", "cfc_backward": "CfCSequenceVJP",
             "wired_backward": "WiredCfCSequenceVJP", "ctrnn": "CTRNNSequence", "ctrnn_backward": "CTRNNSequenceVJP",
             "ctgru": "CTGRUSequence", "ctgru_backward": "CTGRUSequenceVJP", "projection": "InputProjection",
             "projection_backward": "InputProjectionVJP", "sensory": "LTCSensory", "sensory_backward": "LTCSensoryVJP"}
    before = cpu.evaluations()

    class Calls(dict):
        def __getitem__(self, name):
            return cpu.evaluations().get(names[name], 0) - before.get(names[name], 0)

        def values(self):
            return [self[name] for name in names]

    return Calls()


def perturbed_ltc(units, seed=0, **kwargs):
    """An LTC whose parameters are moved well off their initial ranges (so that sigmoids
    saturate on both sides and erev has both signs)."""
    mx.random.seed(seed)
    model = ncps_mlx.LTC(5, units, **kwargs)
    rng = np.random.default_rng(seed)
    moved = []
    for name, value in tree_flatten(model.trainable_parameters()):
        noise = rng.normal(scale=0.3, size=value.shape).astype(np.float32)
        moved.append((name, value * (1 + noise) + 0.1 * noise))
    model.update(tree_unflatten(moved))
    return model


MODELS = {
    "fc16": lambda: perturbed_ltc(16),
    "fc13_unconstrained": lambda: perturbed_ltc(13, implicit_param_constraints=False, ode_unfolds=3),
    "ncp": lambda: perturbed_ltc(wirings.NCP(6, 5, 3, 3, 3, 4, 2, seed=7)),
    "autoncp_linear": lambda: perturbed_ltc(wirings.AutoNCP(20, 4, seed=11), input_mapping="linear", output_mapping=None),
}


def both_paths(function):
    """function() with the kernel, then with it turned off, both evaluated (the kernels' nodes
    are counted as they run)."""
    with_kernel = function()
    mx.eval(with_kernel)
    with cpu.turned_off():
        without = function()
        mx.eval(without)
    return with_kernel, without


def max_diff(a, b):
    return float(np.max(np.abs(np.array(a) - np.array(b))))


def assert_match(got: dict, expected: dict):
    """Every array of the MLX path's (sparsity masks aside) nonzero, and the kernels' within 1e-5
    of its scale."""
    for key in expected:
        if key.endswith("sparsity_mask"):
            continue
        scale = float(np.max(np.abs(np.array(expected[key]))))
        assert scale > 0, f"{key}: zero, the comparison would be vacuous"
        assert max_diff(got[key], expected[key]) <= 1e-5 * max(scale, 1.0), f"{key}: {max_diff(got[key], expected[key]):.3g}"


@applies
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("timespans", [None, "scalar", "per_step"])
def test_forward_equals_mlx_path(name, timespans, kernel_calls):
    model = MODELS[name]()
    rng = np.random.default_rng(1)
    batch, steps = 5, 30
    x = mx.array(rng.normal(size=(batch, steps, 5)).astype(np.float32))
    hx = mx.array(rng.normal(scale=0.5, size=(batch, model.state_size)).astype(np.float32))
    ts = {None: None, "scalar": 0.7, "per_step": mx.array(rng.uniform(0.2, 2.0, (batch, steps)).astype(np.float32))}[timespans]
    (y, h), (y_mlx, h_mlx) = both_paths(lambda: model(x, hx, ts))
    assert kernel_calls["forward"] == 1
    assert float(np.std(np.array(y))) > 1e-2  # the outputs move
    assert max_diff(y, y_mlx) <= 2e-6 and max_diff(h, h_mlx) <= 2e-6


@applies
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_equal_mlx_path(name, kernel_calls):
    model = MODELS[name]()
    rng = np.random.default_rng(2)
    batch, steps = 3, 20
    x = mx.array(rng.normal(size=(batch, steps, 5)).astype(np.float32))
    hx = mx.array(rng.normal(scale=0.5, size=(batch, model.state_size)).astype(np.float32))
    ts = mx.array(rng.uniform(0.2, 2.0, (batch, steps, 1)).astype(np.float32))
    target = mx.array(rng.normal(size=(batch, steps, model.rnn_cell.output_size)).astype(np.float32))

    def loss(model, x, hx, ts):
        y, h = model(x, hx, ts)
        return mx.mean(mx.square(y - target)) + mx.mean(h)

    def gradients():
        value, grads = nn.value_and_grad(model, loss)(model, x, hx, ts)
        inputs = mx.grad(lambda x, hx: loss(model, x, hx, ts), argnums=(0, 1))(x, hx)
        return value, dict(tree_flatten(grads)), inputs

    (value, grads, inputs), (value_mlx, grads_mlx, inputs_mlx) = both_paths(gradients)
    assert kernel_calls["backward"] == 2
    assert abs(value.item() - value_mlx.item()) <= 1e-6
    assert set(grads) == set(grads_mlx)
    assert_match({**grads, "x": inputs[0], "hx": inputs[1]}, {**grads_mlx, "x": inputs_mlx[0], "hx": inputs_mlx[1]})

    # The timespans' gradient, which MLX's compiled backward pass does not give (it returns
    # zeros), against plain autodiff through the cell's steps.
    cell = model.rnn_cell

    def unrolled(ts):
        inputs, prepared, v, outs = cell.project_input(x), cell.prepare(), hx, []
        for t in range(steps):
            out, v = cell.recurrent_step(inputs[:, t], v, ts[:, t], prepared)
            outs.append(out)
        return mx.mean(mx.square(mx.stack(outs, axis=1) - target)) + mx.mean(v)

    d_ts = mx.grad(lambda ts: loss(model, x, hx, ts))(ts)
    d_ts_unrolled = mx.grad(unrolled)(ts)
    scale = float(np.max(np.abs(np.array(d_ts_unrolled))))
    assert scale > 0 and max_diff(d_ts, d_ts_unrolled) <= 1e-5 * max(scale, 1.0)


@applies
def test_row_splits_and_layouts(kernel_calls):
    """Batches of 1 and odd sizes (rows split over the cores unevenly), unbatched, time-first,
    and the last output only: all equal to the MLX path."""
    model = MODELS["ncp"]()
    rng = np.random.default_rng(3)
    for batch in (1, 2, 7):
        x = mx.array(rng.normal(size=(batch, 9, 5)).astype(np.float32))
        (y, h), (y_mlx, h_mlx) = both_paths(lambda: model(x))
        assert max_diff(y, y_mlx) <= 2e-6 and max_diff(h, h_mlx) <= 2e-6
    x = mx.array(rng.normal(size=(9, 5)).astype(np.float32))
    (y, h), (y_mlx, h_mlx) = both_paths(lambda: model(x))
    assert y.shape == y_mlx.shape == (9, 3) and max_diff(y, y_mlx) <= 2e-6 and max_diff(h, h_mlx) <= 2e-6
    mx.random.seed(0)
    other = ncps_mlx.LTC(5, 10, batch_first=False, return_sequences=False)
    x = mx.array(rng.normal(size=(9, 4, 5)).astype(np.float32))
    (y, h), (y_mlx, h_mlx) = both_paths(lambda: other(x))
    assert y.shape == (4, 10) and max_diff(y, y_mlx) <= 2e-6 and max_diff(h, h_mlx) <= 2e-6
    assert kernel_calls["forward"] == 5


@applies
def test_kernels_not_used_where_they_do_not_apply(kernel_calls):
    rng = np.random.default_rng(4)
    x = mx.array(rng.normal(size=(2, 6, 5)).astype(np.float32))
    mx.random.seed(0)
    model = ncps_mlx.LTC(5, 8)
    model.set_dtype(mx.float16)
    mx.eval(model(x.astype(mx.float16)))
    half_cfc = ncps_mlx.CfC(5, 8, mixed_memory=True, memory_circuit="input")
    half_cfc.set_dtype(mx.float16)
    mx.eval(half_cfc(x.astype(mx.float16)))
    # No loop ran in a kernel.
    assert {kernel_calls[name] for name in ("forward", "cfc_states", "wired_cfc_states")} == {0}
    for circuit in ("state", "input"):  # with and without a backbone
        mx.eval(ncps_mlx.CfC(5, 8, mixed_memory=True, memory_circuit=circuit)(x))
        mx.eval(ncps_mlx.CfC(5, wirings.AutoNCP(10, 3, seed=1), mixed_memory=True, memory_circuit=circuit)(x))
        mx.eval(ncps_mlx.CfC(5, 8, mixed_memory=True, backbone_layers=0, memory_circuit=circuit)(x))
    assert kernel_calls["cfc_states"] == 2 and kernel_calls["wired_cfc_states"] == 4
    mx.eval(ncps_mlx.LTC(5, 8, mixed_memory=True)(x))
    mx.eval(ncps_mlx.LTC(5, 8, mixed_memory=True, memory_circuit="input")(x))  # both circuits
    assert kernel_calls["forward"] == 2
    with mx.stream(mx.cpu):  # the default stream, named: still the kernel's
        mx.eval(ncps_mlx.LTC(5, 8)(x))
    assert kernel_calls["forward"] == 3


@applies
@pytest.mark.parametrize("make", [lambda: perturbed_ltc(8), lambda: perturbed_cfc(8, backbone_layers=2, backbone_units=12),
                                  lambda: perturbed_cfc(wirings.AutoNCP(10, 3, seed=2)),
                                  lambda: perturbed_cfc(8, backbone_units=12, mixed_memory=True),
                                  lambda: ncps_mlx.CTRNN(5, 8, learn_tau=True),
                                  lambda: ncps_mlx.CTGRU(5, 6, M=4, decay="mozer")],
                         ids=["ltc", "cfc", "wired_cfc", "cfc_mixed", "ctrnn", "ctgru"])
def test_kernels_are_graph_nodes_under_vmap_compile_and_grad(make, kernel_calls):
    """The kernels are MLX primitives: mx.vmap (over a batch of batches), mx.compile and
    mx.grad of mx.vmap run them, and agree with MLX's path, one slice at a time."""
    model = make()
    rng = np.random.default_rng(5)
    x = mx.array(rng.normal(size=(3, 2, 7, 5)).astype(np.float32))
    ts = mx.array(rng.uniform(0.3, 1.7, (3, 2, 7, 1)).astype(np.float32))

    def outputs(x, ts):
        return model(x, timespans=ts)[0]

    def sliced(x, ts):
        return mx.stack([outputs(x[i], ts[i]) for i in range(x.shape[0])])

    vmapped = mx.vmap(outputs)(x, ts)
    compiled = mx.compile(outputs)(x[0], ts[0])
    grads = mx.grad(lambda x, ts: mx.sum(mx.sin(mx.vmap(outputs)(x, ts))), argnums=(0, 1))(x, ts)
    mx.eval(vmapped, compiled, grads)
    assert sum(kernel_calls.values()) >= 4  # vmapped, compiled, and the gradient's forward and backward passes
    with cpu.turned_off():
        reference = sliced(x, ts)
        grads_mlx = mx.grad(lambda x, ts: mx.sum(mx.sin(sliced(x, ts))), argnums=(0, 1))(x, ts)
    assert max_diff(vmapped, reference) <= 2e-6 and max_diff(compiled, reference[0]) <= 2e-6
    for g, g_mlx in zip(grads, grads_mlx):
        assert float(mx.max(mx.abs(g_mlx))) > 0 and max_diff(g, g_mlx) <= 1e-5


@applies
def test_training_follows_the_mlx_path(kernel_calls):
    """30 Adam steps with the kernel's gradients: the same losses as with MLX's, falling."""
    import mlx.optimizers as optim

    rng = np.random.default_rng(5)
    x = mx.array(rng.normal(size=(8, 15, 3)).astype(np.float32))
    target = mx.array(np.sin(np.cumsum(rng.normal(size=(8, 15, 2)), axis=1)).astype(np.float32) * 0.5)

    def train():
        mx.random.seed(0)
        model = ncps_mlx.LTC(3, wirings.AutoNCP(12, 2, seed=1))
        optimizer = optim.Adam(learning_rate=0.02)
        step = nn.value_and_grad(model, lambda m: mx.mean(mx.square(m(x)[0] - target)))
        losses = []
        for _ in range(30):
            loss, grads = step(model)
            optimizer.update(model, grads)
            mx.eval(model.parameters())
            losses.append(loss.item())
        return np.array(losses)

    losses, losses_mlx = both_paths(train)
    assert kernel_calls["backward"] == 30
    assert losses[-1] < 0.8 * losses[0]
    assert np.max(np.abs(losses - losses_mlx)) <= 1e-5


CFC_CASES = {
    "default": (11, {}),
    "no_gate": (11, {"mode": "no_gate"}),
    "pure": (11, {"mode": "pure"}),
    "two_layers_silu": (11, {"backbone_layers": 2, "backbone_units": 24, "activation": "silu"}),
    "relu_raw_heads": (11, {"activation": "relu", "ff_activation": None}),
    "gelu": (11, {"activation": "gelu"}),
    "tanh_units_13": (11, {"activation": "tanh", "backbone_units": 13}),
    "no_backbone": (11, {"backbone_layers": 0}),
    "no_backbone_pure": (11, {"backbone_layers": 0, "mode": "pure"}),
    "wired_autoncp": (lambda: wirings.AutoNCP(16, 3, seed=2), {}),
    "wired_ncp_no_gate": (lambda: wirings.NCP(6, 5, 3, 3, 3, 4, 2, seed=7), {"mode": "no_gate"}),
    "wired_random_pure": (lambda: wirings.Random(10, 4, sparsity_level=0.5, random_seed=5), {"mode": "pure"}),
    "wired_autoncp_raw_heads": (lambda: wirings.AutoNCP(16, 3, seed=2), {"ff_activation": None}),
}


def perturbed_cfc(units, seed=0, **kwargs):
    mx.random.seed(seed)
    ff_activation = kwargs.pop("ff_activation", "tanh")
    model = ncps_mlx.CfC(5, units() if callable(units) else units, **kwargs)
    cell = model.rnn_cell
    for layer in getattr(cell, "layers", [cell]):  # an ncps.tf/keras CfC has raw ff1/ff2 heads
        layer.ff_activation = ff_activation
    rng = np.random.default_rng(seed)
    moved = [(name, value * (1 + rng.normal(scale=0.3, size=value.shape).astype(np.float32)))
             for name, value in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten(moved))
    return model


def cfc_case(name, batch, steps, seed):
    """(model, x (B, T, 5), hx (B, S), the generator that made them) of a CFC_CASES entry."""
    units, kwargs = CFC_CASES[name]
    model = perturbed_cfc(units, **kwargs)
    rng = np.random.default_rng(seed)
    x = mx.array(rng.normal(size=(batch, steps, 5)).astype(np.float32))
    hx = mx.array(rng.normal(scale=0.5, size=(batch, model.state_size)).astype(np.float32))
    return model, x, hx, rng


@applies
@pytest.mark.parametrize("name", sorted(CFC_CASES))
@pytest.mark.parametrize("timespans", [None, "scalar", "per_step"])
def test_cfc_forward_equals_mlx_path(name, timespans, kernel_calls):
    if blas.sgemm_address() is None:
        pytest.skip("the CfC kernel needs the BLAS that ncps_mlx.runtime.blas loads")
    batch, steps = 7, 25
    model, x, hx, rng = cfc_case(name, batch, steps, seed=6)
    ts = {None: None, "scalar": 0.6, "per_step": mx.array(rng.uniform(0.2, 2.0, (batch, steps, 1)).astype(np.float32))}[timespans]
    (y, h), (y_mlx, h_mlx) = both_paths(lambda: model(x, hx, ts))
    assert kernel_calls["cfc_states"] + kernel_calls["wired_cfc_states"] == 1
    assert float(np.std(np.array(y))) > 1e-2
    assert max_diff(y, y_mlx) <= 3e-6 and max_diff(h, h_mlx) <= 3e-6


@applies
def test_cfc_kernels_where_they_apply(kernel_calls):
    """Every CfC in the kernels, forward and under a gradient, in every mode; none in float16;
    every batch size and layout."""
    if blas.sgemm_address() is None:
        pytest.skip("the CfC kernels need the BLAS that ncps_mlx.runtime.blas loads")
    rng = np.random.default_rng(7)
    x = mx.array(rng.normal(size=(3, 6, 5)).astype(np.float32))
    mx.random.seed(0)
    model = ncps_mlx.CfC(5, 8)
    wired = ncps_mlx.CfC(5, wirings.AutoNCP(10, 3, seed=1))
    pure = ncps_mlx.CfC(5, 8, mode="pure")
    wired_pure = ncps_mlx.CfC(5, wirings.AutoNCP(10, 3, seed=1), mode="pure")
    for each in (model, wired, pure, wired_pure):
        value, grads = nn.value_and_grad(each, lambda m: mx.sum(m(x)[0]))(each)
        mx.eval(value, grads)
    assert kernel_calls["cfc_states"] == kernel_calls["cfc_backward"] == 2
    assert kernel_calls["wired_cfc_states"] == kernel_calls["wired_backward"] == 2
    half = ncps_mlx.CfC(5, 8)
    half.set_dtype(mx.float16)
    half(x.astype(mx.float16))
    assert kernel_calls["cfc_states"] == kernel_calls["wired_cfc_states"] == 2
    for batch in (1, 2, 5):
        xs = mx.array(rng.normal(size=(batch, 6, 5)).astype(np.float32))
        for each in (model, wired):
            (y, h), (y_mlx, h_mlx) = both_paths(lambda: each(xs))
            assert max_diff(y, y_mlx) <= 2e-6 and max_diff(h, h_mlx) <= 2e-6
    other = ncps_mlx.CfC(5, 8, batch_first=False, return_sequences=False, proj_size=3)
    xt = mx.array(rng.normal(size=(6, 4, 5)).astype(np.float32))
    (y, h), (y_mlx, h_mlx) = both_paths(lambda: other(xt))
    assert y.shape == (4, 3) and max_diff(y, y_mlx) <= 2e-6 and max_diff(h, h_mlx) <= 2e-6
    (y, h), (y_mlx, h_mlx) = both_paths(lambda: wired(x[0]))  # unbatched
    assert y.shape == (6, 3) and h.shape == (10,) and max_diff(y, y_mlx) <= 2e-6 and max_diff(h, h_mlx) <= 2e-6
    assert kernel_calls["cfc_states"] == 6 and kernel_calls["wired_cfc_states"] == 6


GRADIENT_CFC_CASES = ["default", "no_gate", "pure", "two_layers_silu", "relu_raw_heads", "gelu", "tanh_units_13",
                      "no_backbone", "no_backbone_pure", "wired_autoncp", "wired_ncp_no_gate", "wired_random_pure",
                      "wired_autoncp_raw_heads"]


@applies
@pytest.mark.parametrize("name", GRADIENT_CFC_CASES)
@pytest.mark.parametrize("timespans", [None, "per_step"])
def test_cfc_gradients_equal_mlx_path(name, timespans, kernel_calls):
    if blas.sgemm_address() is None:
        pytest.skip("the CfC kernels need the BLAS that ncps_mlx.runtime.blas loads")
    batch, steps = 5, 16
    model, x, hx, rng = cfc_case(name, batch, steps, seed=8)
    ts = None if timespans is None else mx.array(rng.uniform(0.2, 2.0, (batch, steps, 1)).astype(np.float32))
    target = mx.array(rng.normal(size=(batch, steps, model.rnn_cell.output_size)).astype(np.float32))

    def loss(model, x, hx):
        y, h = model(x, hx, ts)
        return mx.mean(mx.square(y - target)) + mx.mean(mx.sin(h))

    def gradients():
        value, grads = nn.value_and_grad(model, loss)(model, x, hx)
        inputs = mx.grad(lambda x, hx: loss(model, x, hx), argnums=(0, 1))(x, hx)
        return value, {**dict(tree_flatten(grads)), "x": inputs[0], "hx": inputs[1]}

    (value, grads), (value_mlx, grads_mlx) = both_paths(gradients)
    # the parameters' gradients, then the inputs'
    assert kernel_calls["cfc_states"] + kernel_calls["wired_cfc_states"] == 2
    assert kernel_calls["cfc_backward"] + kernel_calls["wired_backward"] == 2
    assert abs(value.item() - value_mlx.item()) <= 1e-6
    assert set(grads) == set(grads_mlx)
    for key, expected in grads_mlx.items():
        scale = float(np.max(np.abs(np.array(expected))))
        assert scale > 0, f"{key}: zero gradient, the comparison would be vacuous"
        assert max_diff(grads[key], expected) <= 1e-5 * max(scale, 1.0), f"{key}: {max_diff(grads[key], expected):.3g}"


MIXED_CASES = {
    **{f"cfc_{name}": name for name in ("two_layers_silu", "pure", "no_backbone", "wired_autoncp", "wired_random_pure")},
    "ltc_fc16": lambda: perturbed_ltc(16, mixed_memory=True),
    "ltc_ncp_unconstrained": lambda: perturbed_ltc(wirings.NCP(6, 5, 3, 3, 3, 4, 2, seed=7), mixed_memory=True,
                                                   implicit_param_constraints=False, ode_unfolds=3),
}


@applies
@pytest.mark.parametrize("name", sorted(MIXED_CASES))
@pytest.mark.parametrize("timespans", [None, "per_step"])
def test_mixed_memory_kernels_equal_mlx_path(name, timespans, kernel_calls):
    """Mixed memory's "state" circuit in the LTC and CfC kernels (with or without a backbone,
    wired): outputs, both final states, and the gradients of every parameter, of x, of both
    initial states and of the timespans, as MLX's path gives them."""
    if name.startswith("cfc") and blas.sgemm_address() is None:
        pytest.skip("the CfC kernels need the BLAS that ncps_mlx.runtime.blas loads")
    case = MIXED_CASES[name]
    if callable(case):
        model = case()
    else:
        units, kwargs = CFC_CASES[case]
        model = perturbed_cfc(units, mixed_memory=True, **kwargs)
    rng = np.random.default_rng(12)
    batch, steps, S = 5, 13, model.state_size
    x = mx.array(rng.normal(size=(batch, steps, 5)).astype(np.float32))
    h0, c0 = (mx.array(rng.normal(scale=0.5, size=(batch, S)).astype(np.float32)) for _ in range(2))
    ts = None if timespans is None else mx.array(rng.uniform(0.2, 2.0, (batch, steps, 1)).astype(np.float32))
    with cpu.turned_off():
        target = mx.array(rng.normal(size=model(x, (h0, c0))[0].shape).astype(np.float32))

    def loss(model, x, h0, c0, ts):
        y, (h, c) = model(x, (h0, c0), ts)
        return mx.mean(mx.square(y - target)) + mx.mean(mx.sin(h)) + mx.mean(mx.cos(c))

    def run():
        y, (h, c) = model(x, (h0, c0), ts)
        value, grads = nn.value_and_grad(model, loss)(model, x, h0, c0, ts)
        args = (x, h0, c0) + (() if ts is None else (ts,))
        d_inputs = mx.grad(lambda x, h0, c0, ts=None: loss(model, x, h0, c0, ts), argnums=tuple(range(len(args))))(*args)
        names = ["x", "h0", "c0", "ts"]
        return (y, h, c), value, {**dict(tree_flatten(grads)), **dict(zip(names, d_inputs))}

    (outs, value, grads), (outs_mlx, value_mlx, grads_mlx) = both_paths(run)
    assert kernel_calls["forward"] + kernel_calls["cfc_states"] + kernel_calls["wired_cfc_states"] == 3
    assert kernel_calls["backward"] + kernel_calls["cfc_backward"] + kernel_calls["wired_backward"] == 2
    for a, b in zip(outs, outs_mlx):
        assert max_diff(a, b) <= 3e-6
    assert abs(value.item() - value_mlx.item()) <= 1e-6
    assert set(grads) == set(grads_mlx) and {"lstm.recurrent_map.weight", "c0"} <= set(grads)
    for key, expected in grads_mlx.items():
        scale = float(np.max(np.abs(np.array(expected))))
        assert scale > 0, f"{key}: zero gradient, the comparison would be vacuous"
        assert max_diff(grads[key], expected) <= 1e-5 * max(scale, 1.0), f"{key}: {max_diff(grads[key], expected):.3g}"


@applies
@pytest.mark.parametrize("name", ["two_layers_silu", "pure", "no_backbone_pure", "wired_random_pure"])
def test_cfc_timespans_gradient(name, kernel_calls):
    """The timespans' gradient, which MLX's residual backward pass does not give (zeros),
    against plain autodiff through the cell's steps."""
    if blas.sgemm_address() is None:
        pytest.skip("the CfC kernels need the BLAS that ncps_mlx.runtime.blas loads")
    units, kwargs = CFC_CASES[name]
    model = perturbed_cfc(units, **kwargs)
    cell = model.rnn_cell
    rng = np.random.default_rng(9)
    batch, steps = 4, 12
    x = mx.array(rng.normal(size=(batch, steps, 5)).astype(np.float32))
    ts = mx.array(rng.uniform(0.2, 2.0, (batch, steps, 1)).astype(np.float32))

    def unrolled(ts):
        inputs, h, outs = cell.project_input(x), mx.zeros((batch, model.state_size)), []
        for t in range(steps):
            out, h = cell.recurrent_step(inputs[:, t], h, ts[:, t])
            outs.append(out)
        return mx.sum(mx.sin(mx.stack(outs, axis=1)))

    d_ts = mx.grad(lambda ts: mx.sum(mx.sin(model(x, timespans=ts)[0])))(ts)
    expected = mx.grad(unrolled)(ts)
    scale = float(np.max(np.abs(np.array(expected))))
    assert scale > 0 and max_diff(d_ts, expected) <= 1e-5 * max(scale, 1.0)
    assert kernel_calls["cfc_states"] + kernel_calls["wired_cfc_states"] == 1


SUBPROCESS = """
import sys
{preamble}
import numpy as np, mlx.core as mx, ncps_mlx
mx.random.seed(0)
model = ncps_mlx.LTC(5, 8)
y, _ = model(mx.array(np.ones((2, 4, 5), np.float32)))
from ncps_mlx.runtime import cpu
print(cpu.status())
print(float(mx.sum(y)))
"""


def run_python(tmp_path, preamble="", **env):
    done = subprocess.run([sys.executable, "-c", SUBPROCESS.format(preamble=preamble)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines(), done.stderr


@applies
def test_built_at_install_nothing_compiled_or_cached_at_run_time(tmp_path):
    """No compiler on PATH and an empty cache: the kernels run (they were built at install time),
    nothing is written to the cache, nothing printed; NCPS_MLX_RUNTIME=mlx turns them off."""
    empty = tmp_path / "bin"
    empty.mkdir()
    (status, total), stderr = run_python(tmp_path, PATH=str(empty))
    assert status.startswith("LTC, CfC, CTRNN and CTGRU time loops run in CPU kernels") and stderr == ""
    assert not (tmp_path / "cache").exists()
    (off, total_off), _ = run_python(tmp_path, NCPS_MLX_RUNTIME="mlx")
    assert off == "turned off by NCPS_MLX_RUNTIME=mlx" and abs(float(total_off) - float(total)) < 1e-5


@applies
def test_falls_back_where_the_kernels_are_not_built(tmp_path):
    """An install without the extension (built where no compiler was): the LTC still runs, on
    MLX's operations, and the status says why and what to do."""
    (status, total), stderr = run_python(tmp_path, preamble='sys.modules["ncps_mlx.runtime.cpu._kernels"] = None')
    assert status.startswith("the CPU kernels are not built") and "reinstall" in status and stderr == ""
    (ok_status, ok_total), _ = run_python(tmp_path)
    assert abs(float(total) - float(ok_total)) < 1e-5


def kernel_function(name, x):
    """rational.h's tanh or sigmoid (``name``) of a float32 array, as the kernels compute it."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    y = np.empty_like(x)
    getattr(cpu.library(), f"{name}_array")(x, y)
    return y


@applies
def test_the_kernels_tanh_and_sigmoid_over_the_float_range():
    """The kernels' own build of fastmath's rational (FMA-contracted where the processor has
    FMA), held to fastmath's bounds: every binade, every float near the clip, special values."""
    from test_fastmath import every_float_near_the_clip, sweep

    x = np.concatenate([sweep(), every_float_near_the_clip()])
    x64 = x.astype(np.float64)
    tanh = kernel_function("tanh", x)
    assert np.all(np.abs(tanh) <= 1.0)
    assert np.max(np.abs(tanh - np.tanh(x64))) <= 4e-7
    relative = np.abs(x) >= 1e-30  # no flush to zero here: x P / Q down to the smallest floats
    assert np.max(np.abs(tanh[relative] - np.tanh(x64[relative])) / np.abs(np.tanh(x64[relative]))) <= 4e-7
    with np.errstate(over="ignore"):
        reference = 1.0 / (1.0 + np.exp(-x64))
    sigmoid = kernel_function("sigmoid", x)
    assert np.all((sigmoid >= 0.0) & (sigmoid <= 1.0))
    assert np.max(np.abs(sigmoid - reference)) <= 2e-7
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32)
    got = kernel_function("tanh", special)
    assert np.isnan(got[0]) and np.max(np.abs(got[1:] - [1.0, -1.0, 0.0, 0.0])) <= 6e-8
    got = kernel_function("sigmoid", special)
    assert np.isnan(got[0]) and np.max(np.abs(got[1:] - [1.0, 0.0, 0.5, 0.5])) <= 6e-8


@applies
def test_an_empty_batch(kernel_calls):
    """Batch 0: empty outputs and zero gradients, as MLX's path gives (the kernels do nothing)."""
    x = mx.zeros((0, 4, 5))
    mx.random.seed(0)
    for model in (ncps_mlx.LTC(5, 6), ncps_mlx.CfC(5, 6), ncps_mlx.CfC(5, wirings.AutoNCP(8, 2, seed=1))):
        (y, h), (y_mlx, h_mlx) = both_paths(lambda: model(x))
        assert y.shape == y_mlx.shape and h.shape == h_mlx.shape == (0, model.state_size)
        _, grads = nn.value_and_grad(model, lambda m: mx.sum(m(x)[0]))(model)
        assert all(float(mx.max(mx.abs(g))) == 0.0 for _, g in tree_flatten(grads) if g.size)
    assert kernel_calls["forward"] + kernel_calls["cfc_states"] + kernel_calls["wired_cfc_states"] == 6


IMPORT_ORDER_PROBE = """
import json, sys
{imports}
from ncps_mlx.runtime import cpu
model = ncps_mlx.CfC(5, 16, backbone_units=12)
x = mx.random.normal((4, 9, 5))
y, _ = model(x)
mx.eval(y)
with cpu.turned_off():
    reference, _ = model(x)
print(json.dumps({{"applies": cpu.cfc_applies(), "kernel_ran": cpu.evaluations()["CfCSequence"] == 1,
                   "err": float(mx.max(mx.abs(y - reference)))}}))
"""


@applies
def test_the_kernels_do_not_depend_on_the_import_order():
    """`import mlx.core` first (as users write it) or `import ncps_mlx` first, in fresh
    processes: the CfC kernel is chosen and runs either way, with the same results."""
    import json

    found = {}
    for name, imports in (("mlx first", "import mlx.core as mx\nimport ncps_mlx"), ("ncps_mlx first", "import ncps_mlx\nimport mlx.core as mx")):
        done = subprocess.run([sys.executable, "-c", IMPORT_ORDER_PROBE.format(imports=imports)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        found[name] = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in found.items():
        assert result["applies"] and result["kernel_ran"], (name, result)
        assert result["err"] <= 3e-6, (name, result)


@applies
def test_input_projection_in_the_kernels_blas(kernel_calls):
    """A sequence's affine input projection runs in the kernels' BLAS (InputProjection): the same
    values and layout as the cell's own ``project_input``, forward and backward, for every cell
    that has one (and the mixed-memory LSTM's)."""
    from ncps_mlx import runtime

    rng = np.random.default_rng(8)
    x = mx.array(rng.normal(size=(6, 9, 5)).astype(np.float32))
    cells = [perturbed_cfc(8, backbone_units=12).rnn_cell, perturbed_cfc(wirings.AutoNCP(10, 3, seed=2)).rnn_cell,
             ncps_mlx.CTRNN(5, 7).rnn_cell, ncps_mlx.CTGRU(5, 4, M=3).rnn_cell, ncps_mlx.CfC(5, 8, mixed_memory=True).lstm]
    for cell in cells:
        lowering = cell.lowered()
        weight, bias = lowering.input_projection()
        cotangent = mx.array(rng.normal(size=cell.project_input(x).shape).astype(np.float32))

        @dataclasses.dataclass(frozen=True)
        class Affine:  # a lowering's input projection with the weight and bias being differentiated
            weight: mx.array
            bias: mx.array
            features_first: bool

            def input_projection(self):
                return self.weight, self.bias

        def loss(x, weight, bias, project):
            return mx.sum(project(x, weight, bias) * cotangent)

        def kernel(x, weight, bias):
            return runtime.project_input(Affine(weight, bias, lowering.features_first), x)

        y = runtime.project_input(lowering, x)
        grads = mx.grad(lambda *a: loss(*a, kernel), argnums=(0, 1, 2))(x, weight, bias)
        mx.eval(y, grads)
        expected = cell.project_input(x)
        assert y.shape == expected.shape and max_diff(y, expected) <= 2e-6
        expected_grads = mx.grad(lambda *a: loss(*a, lambda x, w, b: x @ w.T + b), argnums=(0, 1, 2))(x, weight, bias)
        for g, e in zip(grads, expected_grads):
            assert float(mx.max(mx.abs(e))) > 0 and max_diff(g, e) <= 1e-5
    assert kernel_calls["projection"] >= len(cells) and kernel_calls["projection_backward"] == len(cells)


@applies
@pytest.mark.parametrize("name", sorted(MODELS))
def test_ltc_sensory_synapses_kernel(name, kernel_calls):
    """An LTC's sensory synapses in the LTCSensory kernel: the cell's own ``project_input`` values
    (dense or sparse wirings, every input mapping), and the gradients of x and of every sensory
    parameter as MLX's path gives them."""
    from ncps_mlx import runtime

    model = MODELS[name]()
    cell = model.rnn_cell
    rng = np.random.default_rng(2)
    x = mx.array(rng.normal(size=(3, 7, 5)).astype(np.float32))
    y = runtime.project_input(cell.lowered(), x)
    mx.eval(y)
    assert kernel_calls["sensory"] == 1
    assert max_diff(y, cell.project_input(x)) <= 2e-6
    cotangent = mx.array(rng.normal(size=y.shape).astype(np.float32))

    def grads(project):
        def loss(parameters, x):
            cell.update(parameters)
            return mx.sum(project(x) * cotangent)

        return mx.grad(loss, argnums=(0, 1))(cell.trainable_parameters(), x)

    d_params, d_x = grads(lambda x: runtime.project_input(cell.lowered(), x))
    mx.eval(d_params, d_x)
    assert kernel_calls["sensory_backward"] == 1
    d_params_mlx, d_x_mlx = grads(cell.project_input)
    assert max_diff(d_x, d_x_mlx) <= 1e-5 * max(1.0, float(mx.max(mx.abs(d_x_mlx))))
    for (key, g), (_, g_mlx) in zip(tree_flatten(d_params), tree_flatten(d_params_mlx)):
        if key.startswith("sensory") or key.startswith("input"):
            scale = float(mx.max(mx.abs(g_mlx)))
            assert scale > 0 and max_diff(g, g_mlx) <= 1e-5 * max(1.0, scale), key


# Models and sizes whose batches the kernels split over the cores (a batch's estimated work past
# the split threshold, primitives.cpp's over_batch): forward and backward passes.
SPLIT = {
    "ltc": (lambda: perturbed_ltc(32), 4, 30, 5),
    "ltc_sensory": (lambda: ncps_mlx.LTC(20, 64), 4, 80, 20),
    "cfc": (lambda: ncps_mlx.CfC(20, 64), 4, 100, 20),
    "wired_cfc": (lambda: ncps_mlx.CfC(20, wirings.AutoNCP(64, 8)), 8, 100, 20),
    "ctrnn": (lambda: ncps_mlx.CTRNN(20, 64), 8, 60, 20),
    "ctgru": (lambda: ncps_mlx.CTGRU(20, 64), 8, 60, 20),
}


@applies
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: the kernels split no batch")
@pytest.mark.parametrize("name", sorted(SPLIT))
def test_split_batches_equal_mlx_path(name, kernel_calls):
    """Where a batch's work is large enough to split over the cores, the parts run on the kept
    workers: outputs and the gradients of every parameter, x and hx as the MLX path's."""
    make, batch, steps, features = SPLIT[name]
    mx.random.seed(5)
    model = make()
    rng = np.random.default_rng(5)
    x = mx.array(rng.normal(size=(batch, steps, features)).astype(np.float32))
    hx = mx.array(rng.normal(scale=0.5, size=(batch, model.state_size)).astype(np.float32))

    def loss(model, x, hx):
        y, h = model(x, hx)
        return mx.mean(mx.square(y)) + mx.mean(mx.square(h))

    def outputs_and_gradients():
        y, h = model(x, hx)
        _, grads = nn.value_and_grad(model, loss)(model, x, hx)
        inputs = mx.grad(lambda x, hx: loss(model, x, hx), argnums=(0, 1))(x, hx)
        return {"y": y, "h": h, "x": inputs[0], "hx": inputs[1], **dict(tree_flatten(grads))}

    before = cpu.loaded().splits()
    got, expected = both_paths(outputs_and_gradients)
    assert cpu.loaded().splits()["workers"] >= before["workers"] + 2  # a forward and a backward pass split at least
    assert_match(got, expected)


@applies
def test_small_batches_are_not_split_and_a_forked_child_splits(tmp_path):
    """A one-step call at batch 64 of a small model runs on the calling thread (starting threads
    for it cost several times its work); a child forked after the workers started runs its split
    batches and ends. Its calls run at once: MLX's scheduler does not
    survive a fork."""
    script = tmp_path / "fork.py"
    script.write_text(
        """
import os, sys
import mlx.core as mx, numpy as np, ncps_mlx
from ncps_mlx.runtime import cpu
kernels = cpu.loaded()
small = ncps_mlx.CfC(4, 4)
x = mx.array(np.ones((64, 1, 4), np.float32)); mx.eval(small(x))
assert kernels.splits() == {"workers": 0, "caller": 0}, kernels.splits()
big = ncps_mlx.LTC(20, 64)  # one step at batch 64: split, and run at once (MLX's own threads are not forked)
x = mx.array(np.random.default_rng(0).normal(size=(64, 1, 20)).astype(np.float32))
h = mx.zeros((64, 64))
mx.eval(x, h, big.parameters())
expected = np.array(big(x, h)[0])
assert kernels.splits()["workers"] >= 1, kernels.splits()
pid = os.fork()
if pid == 0:
    ok = np.array_equal(np.array(big(x, h)[0]), expected) and kernels.splits()["workers"] >= 2
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@applies
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: the kernels split no batch")
def test_split_batches_from_two_threads_at_once(tmp_path):
    """Two threads splitting batches at once (a graph on a stream of its own, one-step calls on
    the calling thread): one has the workers, the other runs its parts itself; both compute what
    each computes alone."""
    script = tmp_path / "threads.py"
    script.write_text(
        """
import json, threading
import mlx.core as mx, numpy as np, ncps_mlx
from ncps_mlx.runtime import cpu
mx.random.seed(0)
model = ncps_mlx.LTC(20, 64)
rng = np.random.default_rng(0)
sequence = mx.array(rng.normal(size=(8, 20, 20)).astype(np.float32))
step, h = mx.array(rng.normal(size=(64, 1, 20)).astype(np.float32)), mx.zeros((64, 64))
mx.eval(sequence, step, h, model.parameters())
alone = np.array(model(sequence)[0]), np.array(model(step, h)[0])
before, differ = cpu.loaded().splits(), []

def sequences():
    with mx.stream(mx.new_stream(mx.cpu)):
        for _ in range(15):
            differ.append(not np.array_equal(np.array(model(sequence)[0]), alone[0]))
    mx.clear_streams()  # mlx 0.32: a thread clears its compile cache before it ends (ml-explore/mlx#4373)

def steps():
    for _ in range(60):
        differ.append(not np.array_equal(np.array(model(step, h)[0]), alone[1]))
    mx.clear_streams()

threads = [threading.Thread(target=sequences), threading.Thread(target=steps)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
after = cpu.loaded().splits()
print(json.dumps({"differ": sum(differ), "calls": len(differ),
                  "split": {k: after[k] - before[k] for k in after}}))
"""
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["calls"] == 75 and found["differ"] == 0, found
    assert sum(found["split"].values()) >= 75, found  # every call split, on the workers or by its caller
