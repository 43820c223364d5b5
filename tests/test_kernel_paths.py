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

    # Computed one-step inputs, as a controller has them: after the first call with new
    # parameters (which derives their kernel weights) the calls run at once.
    x_steps = [mx.array(np.array(x[:, t : t + 1])) for t in range(x.shape[1])]
    ts_steps = [mx.array(np.array(ts[:, t : t + 1])) for t in range(x.shape[1])]

    def stepwise(model):
        state, outs, at_once = hx, [], 0
        before = loops_run()
        for x_t, ts_t in zip(x_steps, ts_steps):
            out, state = model(x_t, state, ts_t)
            at_once += ready(out, *states_of(state, model.use_mixed))
            mx.eval(out, state)  # as a controller acts on each step's output
            outs.append(out)
        assert loops_run() > before, "the steps did not run in a kernel"
        assert at_once >= len(x_steps) - 1, "the calls after the first did not run at once"
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


def ready(*arrays) -> bool:
    """Whether every array is computed already (a call at once returns computed arrays)."""
    return cpu.loaded().ready([a for a in arrays if a is not None])


def states_of(state, mixed):
    return list(state) if mixed else [state]


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_step_calls_run_at_once_as_the_plain_loop(case):
    """A controller's loop with computed inputs: each call runs at once on the calling thread
    (its results come back computed, no graph node to schedule), through the loop kernel, and
    the steps follow the plain loop over the whole sequence."""
    model = build(case)
    model.eval()  # a dropout model as a controller runs it
    rng = np.random.default_rng(5)
    steps = 5
    x = rng.normal(size=(2, steps, INPUT)).astype(np.float32)
    ts = rng.uniform(0.5, 1.5, size=(2, steps)).astype(np.float32)
    initial = [mx.array(rng.normal(scale=0.5, size=(2, model.state_size)).astype(np.float32)) for _ in range(2)]
    hx = tuple(initial) if model.use_mixed else initial[0]
    mx.eval(model.parameters())
    warm = model(mx.array(x[:, :1]), hx, mx.array(ts[:, :1]))  # derives (and computes) the kernels' weights
    mx.eval(warm)
    state, outs = hx, []
    for t in range(steps):
        before = loops_run()
        out, state = model(mx.array(x[:, t : t + 1]), state, mx.array(ts[:, t : t + 1]))
        assert ready(out, *states_of(state, model.use_mixed)), "the one-step call did not run at once"
        assert loops_run() == before + 1, "the step did not run in the loop kernel"
        outs.append(out)
    ref_out, ref_state = plain_loop(model, mx.array(x), hx, mx.array(ts)[..., None])
    assert_close("outputs", mx.concatenate(outs, axis=1), ref_out, 1e-5)
    for ours, reference in zip(states_of(state, model.use_mixed), states_of(ref_state, model.use_mixed)):
        assert_close("state", ours, reference, 1e-5)


STYLES = {
    "batched": lambda x, h, ts: ((mx.array(x), h), {}),
    "unbatched": lambda x, h, ts: ((mx.array(x[0]), tuple(s[0] for s in h) if isinstance(h, tuple) else h[0]), {}),
    "float timespan": lambda x, h, ts: ((mx.array(x), h), {"timespans": 0.7}),
    "(B, 1) timespans": lambda x, h, ts: ((mx.array(x), h), {"timespans": mx.array(ts)}),
    "(B, 1, 1) timespans": lambda x, h, ts: ((mx.array(x), h), {"timespans": mx.array(ts[..., None])}),
    "mask keeping the step": lambda x, h, ts: ((mx.array(x), h), {"mask": mx.array([[True]])}),
    "NumPy mask keeping the step": lambda x, h, ts: ((mx.array(x), h), {"mask": np.ones((1, 1), np.int32)}),
}


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("case, options", [("cfc", {}), ("cfc_wired", {"return_sequences": False}),
                                           ("cfc_no_backbone", {"proj_size": 3}), ("ltc", {}),
                                           ("ltc_mixed_input", {"return_sequences": False}), ("ctrnn", {})])
def test_one_step_call_styles_run_at_once(case, options, style):
    """Every way of calling one step with computed inputs runs at once (unbatched, time-first,
    each form of timespans, a mask that keeps the step, ``return_sequences=False``, an output
    projection) and gives what MLX's plain loop gives for that step, shaped as that loop shapes it."""
    family, units, kwargs = CASES[case]
    if isinstance(units, tuple):
        units = getattr(ncps_mlx.wirings, units[0])(*units[1], seed=3)
    mx.random.seed(0)
    model = getattr(ncps_mlx, family)(INPUT, units, **kwargs, **options)
    mx.eval(model.parameters())
    rng = np.random.default_rng(8)
    x = rng.normal(size=(1, 1, INPUT)).astype(np.float32)
    ts = rng.uniform(0.5, 1.5, size=(1, 1)).astype(np.float32)
    h = mx.array(rng.normal(scale=0.5, size=(1, model.state_size)).astype(np.float32))
    hx = (h, h * 0.5) if model.use_mixed else h
    mx.eval(hx)
    args, kw = STYLES[style](x, hx, ts)
    mx.eval(model(*args, **kw))  # derives the kernels' weights
    out, state = model(*args, **kw)
    assert ready(out, *states_of(state, model.use_mixed)), "the one-step call did not run at once"
    with cpu.turned_off():
        ref_out, ref_state = model(*args, **kw)
    assert out.shape == ref_out.shape
    assert_close("outputs", out, ref_out, 1e-5)
    for ours, reference in zip(states_of(state, model.use_mixed), states_of(ref_state, model.use_mixed)):
        assert ours.shape == reference.shape
        assert_close("state", ours, reference, 1e-5)


@pytest.mark.parametrize("case", ["cfc", "ltc", "ctgru"])
def test_one_step_masks_that_drop_a_row_take_the_masked_way(case):
    """A one-step call whose mask drops a row (or every row), or is not computed, is not the
    unmasked step: it takes the masked path, and gives what the plain loop gives."""
    model = build(case)
    rng = np.random.default_rng(4)
    x = mx.array(rng.normal(size=(2, 1, INPUT)).astype(np.float32))
    h = mx.array(rng.normal(scale=0.5, size=(2, model.state_size)).astype(np.float32))
    hx = (h, h * 0.5) if model.use_mixed else h
    mx.eval(x, hx)
    for mask in (mx.array([[True], [False]]), mx.array([[False], [False]]), mx.ones((2, 1)) > 0):
        out, state = model(x, hx, mask=mask)
        with cpu.turned_off():
            ref_out, ref_state = model(x, hx, mask=mask)
        pairs = [(out, ref_out)] + list(zip(states_of(state, model.use_mixed), states_of(ref_state, model.use_mixed)))
        for ours, reference in pairs:  # a dropped row's outputs are zeros
            assert ours.shape == reference.shape and np.max(np.abs(np.array(ours) - np.array(reference))) <= 1e-5
    kept = np.array(model(x, hx, mask=mx.array([[True], [False]]))[1] if not model.use_mixed else
                    model(x, hx, mask=mx.array([[True], [False]]))[1][0])
    assert np.array_equal(kept[1], np.array(h[1])) and not np.array_equal(kept[0], np.array(h[0]))


def test_one_step_time_first_runs_at_once():
    model = build("cfc_wired")
    time_first = ncps_mlx.CfC(INPUT, model.rnn_cell.wiring, batch_first=False) if hasattr(model.rnn_cell, "wiring") else None
    if time_first is None:
        pytest.skip("the wired cell does not expose its wiring")
    time_first.update(model.parameters())
    x = mx.array(np.random.default_rng(1).normal(size=(1, 3, INPUT)).astype(np.float32))  # (T = 1, B = 3, I)
    h = mx.zeros((3, model.state_size))
    mx.eval(x, h, time_first.parameters())
    mx.eval(time_first(x, h))
    out, state = time_first(x, h)
    assert ready(out, state) and out.shape == (1, 3, time_first.output_size)
    ref_out, ref_state = model(x.swapaxes(0, 1), h)
    assert_close("outputs", out.swapaxes(0, 1), ref_out, 1e-6)
    assert_close("state", state, ref_state, 1e-6)


@pytest.mark.parametrize("case", ["cfc_wired", "cfc_mixed_input", "ltc_wired_mixed", "ctgru"])
def test_one_step_gradients_with_computed_inputs(case):
    """A one-step call with computed inputs under mx.value_and_grad: traced, so it is not run at
    once but as a node of the graph; the gradients of every parameter, x, hx and timespans
    follow the plain loop's (none is zero)."""
    model = build(case)
    rng = np.random.default_rng(4)
    S = model.state_size
    x = mx.array(rng.normal(size=(BATCH, 1, INPUT)).astype(np.float32))
    hx = [mx.array(rng.normal(scale=0.5, size=(BATCH, S)).astype(np.float32)) for _ in range(2 if model.use_mixed else 1)]
    ts = mx.array(rng.uniform(0.3, 2.0, size=(BATCH, 1)).astype(np.float32))
    out_shape = model(x[:1])[0].shape[2:]
    weights = (mx.array(rng.normal(size=(BATCH, 1, *out_shape)).astype(np.float32)),
               [mx.array(rng.normal(size=(BATCH, S)).astype(np.float32)) for _ in hx])
    mx.eval(x, hx, ts, weights, model.parameters())
    (k_values, k_grads, k_ran), (p_values, p_grads, _) = (
        results(model, [x, *hx, ts], None, weights, plain) for plain in (False, True))
    assert k_ran
    for name, ours, reference in zip(("outputs", "h", "c"), k_values, p_values):
        assert_close(name, ours, reference, 1e-5)
    assert set(k_grads) == set(p_grads)
    for name in sorted(p_grads):
        assert_close(name, k_grads[name], p_grads[name])


def test_one_step_calls_under_compile_and_vmap_and_lazy_inputs():
    """Traced inputs (mx.compile, mx.vmap) take the graph; an input not yet computed is evaluated
    first and the step runs at once; the same numbers."""
    model = build("cfc_wired")
    rng = np.random.default_rng(6)
    x = mx.array(rng.normal(size=(2, 1, INPUT)).astype(np.float32))
    h = mx.array(rng.normal(size=(2, model.state_size)).astype(np.float32))
    mx.eval(x, h, model.parameters())
    mx.eval(model(x, h))
    expected = model(x, h)
    assert ready(*expected)
    compiled = mx.compile(lambda x, h: model(x, h))(x, h)
    mapped = mx.vmap(lambda x, h: model(x[None], h[None]), in_axes=(0, 0))(x, h)
    lazy = model(x * 1.0, h * 1.0)
    assert ready(*lazy), "a call on inputs not yet computed did not evaluate them and run at once"
    for got in (compiled, lazy, tuple(a.reshape(e.shape) for a, e in zip(mapped, expected))):
        for g, e in zip(got, expected):
            assert_close("one step", g, e, 1e-6)


def test_one_step_calls_not_at_once_with_the_kernels_turned_off(monkeypatch):
    model = build("ltc")
    x = mx.array(np.random.default_rng(2).normal(size=(1, 1, INPUT)).astype(np.float32))
    h = mx.zeros((1, model.state_size))
    mx.eval(x, h, model.parameters())
    expected = model(x, h)
    mx.eval(expected)
    before = cpu.evaluations()
    monkeypatch.setenv("NCPS_MLX_RUNTIME", "mlx")
    out, state = model(x, h)
    assert not ready(out, state)
    mx.eval(out, state)
    monkeypatch.delenv("NCPS_MLX_RUNTIME")
    assert cpu.evaluations() == before, "NCPS_MLX_RUNTIME=mlx ran a kernel"
    assert_close("outputs", out, expected[0], 1e-5)
