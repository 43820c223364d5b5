"""The configurations the kernels took over from the plain loop, against that loop.

Masked sequences run in the CPU kernels (each sample's kept steps moved to the front, the
results spread back), a CfC's dropout in training too (the masks drawn by the model, the same
for both with the same seed), and a model called one step at a time reuses the lowering it
derived until a parameter changes. Each is compared with MLX's plain loop (the kernels turned off, the
mask applied step by step): outputs, final states and the gradients with respect to every
parameter, x, hx and timespans, to the tolerances of ``test_gradients.py`` (1e-4 of each
gradient's largest magnitude, which must be non-zero).
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

import ncps_mlx
from ncps_mlx.runtime import cpu

pytestmark = pytest.mark.skipif(not cpu.cfc_applies(), reason=f"the CPU kernels do not apply here: {cpu.status()}")

INPUT, STEPS, BATCH = 4, 9, 4
CASES = {
    "cfc": ("CfC", 8, {"backbone_units": 12}),
    "cfc_no_backbone": ("CfC", 8, {"backbone_layers": 0}),
    "cfc_wired": ("CfC", ("AutoNCP", (10, 3)), {}),
    "cfc_mixed": ("CfC", 8, {"backbone_units": 12, "mixed_memory": True}),
    "cfc_mixed_input": ("CfC", 8, {"backbone_units": 12, "mixed_memory": True, "memory_circuit": "input"}),
    "cfc_mixed_input_pure_dropout": ("CfC", 8, {"backbone_units": 12, "backbone_layers": 2, "backbone_dropout": 0.2,
                                                "mixed_memory": True, "memory_circuit": "input", "mode": "pure"}),
    "cfc_wired_mixed_input": ("CfC", ("AutoNCP", (10, 3)), {"mixed_memory": True, "memory_circuit": "input"}),
    "cfc_no_backbone_mixed_input_no_gate": ("CfC", 8, {"backbone_layers": 0, "mixed_memory": True,
                                                       "memory_circuit": "input", "mode": "no_gate"}),
    "cfc_dropout": ("CfC", 8, {"backbone_units": 12, "backbone_layers": 3, "backbone_dropout": 0.3}),
    "cfc_dropout_mixed_silu": ("CfC", 8, {"backbone_units": 12, "backbone_layers": 2, "backbone_dropout": 0.5,
                                          "mixed_memory": True, "activation": "silu"}),
    "ltc": ("LTC", 7, {}),
    "ltc_wired_mixed": ("LTC", ("AutoNCP", (9, 3)), {"mixed_memory": True}),
    "ltc_mixed_input": ("LTC", 7, {"mixed_memory": True, "memory_circuit": "input"}),
    "ltc_wired_mixed_input_affine": ("LTC", ("AutoNCP", (9, 3)), {"mixed_memory": True, "memory_circuit": "input",
                                                                  "input_mapping": "linear", "output_mapping": "affine"}),
    "ctrnn": ("CTRNN", 8, {}),
    "ctgru": ("CTGRU", 8, {"decay": "mozer"}),
}


def build(case, seed=0):
    family, units, kwargs = CASES[case]
    mx.random.seed(seed)
    if isinstance(units, tuple):
        name, args = units
        units = getattr(ncps_mlx.wirings, name)(*args, seed=seed + 3)
    model = getattr(ncps_mlx, family)(INPUT, units, **kwargs)
    rng = np.random.default_rng(seed + 1)
    perturbed = [(k, v + mx.array(rng.normal(scale=0.3, size=v.shape), v.dtype)) for k, v in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten(perturbed))
    return model


def loops_run() -> int:
    """How many loop kernels' forward nodes have run (not the input projections')."""
    return sum(n for name, n in cpu.evaluations().items() if name.endswith("Sequence"))


def assert_close(name, ours, reference, tolerance=1e-4):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, f"{name}: shape {ours.shape} != {reference.shape}"
    scale = float(np.max(np.abs(reference)))
    err = float(np.max(np.abs(ours - reference)))
    assert scale > 0, f"{name}: the reference is zero, the comparison would be vacuous"
    assert err <= tolerance * scale, f"{name}: max abs err {err:.3g} vs scale {scale:.3g}"


def results(model, inputs, mask, weights, plain):
    """(outputs, final states, gradients by name) of a weighted sum of outputs and final states."""
    mixed = model.use_mixed
    w_out, w_states = weights

    def loss(parameters, x, *rest):
        model.update(parameters)
        *states, ts = rest
        out, final = model(x, tuple(states) if mixed else states[0], ts, mask=mask)
        finals = final if isinstance(final, tuple) else (final,)
        return mx.sum(out * w_out) + sum(mx.sum(f * w) for f, w in zip(finals, w_states)), (out, *finals)

    original = model.parameters()
    before = loops_run()
    mx.random.seed(3)  # the same dropout masks for both
    with cpu.turned_off() if plain else _nothing():
        (_, values), grads = mx.value_and_grad(loss, argnums=tuple(range(len(inputs) + 1)))(model.trainable_parameters(), *inputs)
        mx.eval(values, grads)
    ran_kernel = loops_run() > before
    model.update(original)
    named = dict(tree_flatten(grads[0]))
    named.update({f"d_input{i}": g for i, g in enumerate(grads[1:])})
    return values, named, ran_kernel


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_kernels_run_masks_and_dropout_as_the_plain_loop(case, masked):
    model = build(case)
    model.train()
    rng = np.random.default_rng(11)
    S = model.state_size
    x = rng.normal(size=(BATCH, STEPS, INPUT)).astype(np.float32)
    x[:, 3] = 50.0  # what a masked step holds does not matter: step 3 is masked everywhere
    hx = [rng.normal(scale=0.5, size=(BATCH, S)).astype(np.float32) for _ in range(2 if model.use_mixed else 1)]
    ts = rng.uniform(0.3, 2.0, size=(BATCH, STEPS)).astype(np.float32)
    ts[:, 3] = 7.0
    keep = rng.random((BATCH, STEPS)) > 0.35
    keep[:, 3] = False
    keep[0, :2] = False  # the first steps masked: zeros out, the initial state kept
    keep[1] = False  # every step masked
    keep[2] = True
    keep[2, 3] = False
    mask = mx.array(keep) if masked else None
    if not masked:
        keep[:] = True
    out_shape = model(mx.array(x[:1, :1]))[0].shape[2:]
    w_out = mx.array(rng.normal(size=(BATCH, STEPS, *out_shape)).astype(np.float32))
    w_states = [mx.array(rng.normal(size=(BATCH, S)).astype(np.float32)) for _ in hx]
    inputs = [mx.array(a) for a in (x, *hx, ts)]

    (k_values, k_grads, k_ran), (p_values, p_grads, _) = (
        results(model, inputs, mask, (w_out, w_states), plain) for plain in (False, True)
    )
    assert k_ran, "the call did not run in a kernel"
    for name, ours, reference in zip(("outputs", "h", "c"), k_values, p_values):
        assert_close(name, ours, reference, 1e-5)
    if masked:
        assert np.all(np.asarray(k_values[0])[1] == 0), "a sample with every step masked outputs zeros"
    assert set(k_grads) == set(p_grads)
    for name in sorted(p_grads):
        if name == "d_input0":  # masked steps get no gradient
            assert np.all(np.asarray(k_grads[name])[~keep] == 0)
            assert_close(name, np.asarray(k_grads[name])[keep], np.asarray(p_grads[name])[keep])
        elif name == f"d_input{len(inputs) - 1}":  # timespans
            assert_close(name, np.asarray(k_grads[name])[keep], np.asarray(p_grads[name])[keep])
            assert np.all(np.asarray(k_grads[name])[~keep] == 0)
        else:
            assert_close(name, k_grads[name], p_grads[name])


def plain_loop(model, x, hx, ts=None):
    """MLX's plain loop (the kernels off, an all-True mask: the step-by-step loop)."""
    with cpu.turned_off():
        return model(x, hx, ts, mask=mx.ones(x.shape[:2], mx.bool_))


@pytest.mark.parametrize("case", ["cfc_wired", "cfc_mixed", "cfc_mixed_input", "ltc", "ltc_mixed_input", "ctgru"])
def test_one_step_calls_follow_the_plain_loop_across_parameter_updates(case):
    """A controller's loop: one step a call, the state carried. The model keeps what it derived
    from its parameters between calls; an optimizer step, and a change of one parameter alone,
    are seen at the next call. Outputs, states and gradients against the plain loop."""
    import mlx.optimizers as optim

    model = build(case)
    rng = np.random.default_rng(2)
    x = mx.array(rng.normal(size=(1, 6, INPUT)).astype(np.float32))
    ts = mx.array(rng.uniform(0.5, 1.5, size=(1, 6, 1)).astype(np.float32))
    initial = [mx.array(rng.normal(scale=0.5, size=(1, model.state_size)).astype(np.float32)) for _ in range(2)]
    hx = tuple(initial) if model.use_mixed else initial[0]

    def stepwise(model):
        state, outs = hx, []
        before = loops_run()
        for t in range(x.shape[1]):
            out, state = model(x[:, t : t + 1], state, ts[:, t : t + 1])
            mx.eval(out, state)  # as a controller acts on each step's output
            outs.append(out)
        assert loops_run() > before, "the steps did not run in a kernel"
        return mx.concatenate(outs, axis=1), state

    def check(model):
        out, state = stepwise(model)
        ref_out, ref_state = plain_loop(model, x, hx, ts)
        assert_close("outputs", out, ref_out, 1e-5)
        for s, r in zip(state if model.use_mixed else [state], ref_state if model.use_mixed else [ref_state]):
            assert_close("state", s, r, 1e-5)

    def loss(model, x, plain):
        out, _ = plain_loop(model, x, hx, ts[:, :1]) if plain else model(x, hx, ts[:, :1])
        return mx.sum(out * mx.arange(out.shape[-1]))

    check(model)
    optimizer = optim.SGD(learning_rate=0.05)
    for _ in range(2):
        _, grads = nn.value_and_grad(model, lambda m: loss(m, x[:, :1], False))(model)
        _, reference = nn.value_and_grad(model, lambda m: loss(m, x[:, :1], True))(model)
        ours, theirs = dict(tree_flatten(grads)), dict(tree_flatten(reference))
        for name in theirs:
            assert_close(name, ours[name], theirs[name])
        optimizer.update(model, grads)
        check(model)  # the step after the update runs the new parameters
    name, value = max(tree_flatten(model.trainable_parameters()), key=lambda kv: kv[1].size)
    model.update(tree_unflatten([(name, value * 1.5)]))  # one parameter alone
    check(model)
