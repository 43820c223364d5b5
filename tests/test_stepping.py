"""The three ways the time loop runs (ncps_mlx.runtime.stepping): compiled forward, the differentiable
custom function with its compiled backward pass, and eager. Each must give the same numbers."""

from __future__ import annotations

import os
import subprocess
import threading
import sys
import textwrap

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ncps_mlx import CTGRU, CTRNN, LTC, CfC
from ncps_mlx.runtime import cpu, stepping
from ncps_mlx.wirings import NCP, AutoNCP, FullyConnected

B, T, I = 3, 9, 5


@pytest.fixture(autouse=True)
def mlx_path_only():
    """These tests are about MLX's time loop, which the LTC's CPU kernel would replace where it
    applies (tests/test_native.py compares the two)."""
    with cpu.turned_off():
        yield


def models():
    mx.random.seed(1)
    return {
        "cfc": CfC(I, 8, backbone_units=16),
        "cfc_pure_proj": CfC(I, 8, mode="pure", proj_size=3),
        "cfc_wired": CfC(I, AutoNCP(10, 3, seed=4)),
        "cfc_wired_mixed": CfC(I, AutoNCP(10, 3, seed=2), mixed_memory=True),
        "cfc_mixed_input_circuit": CfC(I, 8, mixed_memory=True, memory_circuit="input"),
        "ltc": LTC(I, 8, ode_unfolds=3),
        "ltc_ncp_mixed": LTC(I, NCP(3, 3, 2, 2, 2, 2, 2, seed=3), mixed_memory=True),
        "ctrnn": CTRNN(I, 8),
        "ctgru": CTGRU(I, 8),
    }


MODELS = sorted(models())


def inputs():
    rng = np.random.default_rng(0)
    return (
        mx.array(rng.normal(size=(B, T, I)).astype(np.float32)),
        mx.array(rng.uniform(0.3, 1.5, size=(B, T)).astype(np.float32)),
    )


def loss(model, x, ts, hx):
    y, state = model(x, hx=hx, timespans=ts)
    h = state[0] if isinstance(state, tuple) else state
    return mx.sum(y * y) + 0.5 * mx.sum(h * h)


def gradients(model, x, ts, hx):
    value, grads = nn.value_and_grad(model, loss)(model, x, ts, hx)
    return float(value), dict(tree_flatten(grads))


def initial_state(model):
    h = mx.array(np.random.default_rng(5).normal(size=(B, model.state_size)).astype(np.float32))
    return (h, 0.5 * h) if model.use_mixed else h


@pytest.mark.parametrize("row_budget", [512, 2], ids=["rows_pass", "per_step_vjp"])
@pytest.mark.parametrize("name", MODELS)
def test_differentiable_path_matches_eager_gradients(name, row_budget, monkeypatch):
    # A batch of at least row_budget() rows takes one full vjp per step; smaller ones a
    # state-only reverse pass, then vjps over chunks of batch x time rows.
    monkeypatch.setattr(stepping.Steps, "row_budget", lambda self: row_budget)
    model = models()[name]
    x, ts = inputs()
    hx = initial_state(model)
    value, fast = gradients(model, x, ts, hx)
    # can_evaluate False is what an outer mx.compile / mx.vmap looks like: the eager loop.
    monkeypatch.setattr(stepping, "can_evaluate", lambda arrays: False)
    eager_value, eager = gradients(model, x, ts, hx)
    assert set(fast) == set(eager)
    assert abs(value - eager_value) <= 1e-5 * abs(eager_value)
    for key, reference in eager.items():
        scale = float(mx.max(mx.abs(reference)))
        error = float(mx.max(mx.abs(fast[key] - reference)))
        assert error <= 1e-5 * max(scale, 1.0), f"{key}: {error:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("timespans", [False, True], ids=["unit_timespan", "timespans"])
@pytest.mark.parametrize("name", MODELS)
def test_compiled_forward_matches_eager(name, timespans, monkeypatch):
    # T = 9: two compiled chunks; CfC cells run them feature-major.
    model = models()[name]
    x, ts = inputs()
    ts = ts if timespans else None
    hx = initial_state(model)
    compiled = model(x, hx=hx, timespans=ts)
    monkeypatch.setattr(stepping, "under_transformation", lambda arrays: True)
    monkeypatch.setattr(stepping, "can_evaluate", lambda arrays: False)
    eager = model(x, hx=hx, timespans=ts)
    # The compiled step uses the rational tanh/sigmoid, the eager one MLX's own.
    for fast, reference in zip(tree_flatten(compiled), tree_flatten(eager)):
        assert fast[1].shape == reference[1].shape
        assert float(mx.max(mx.abs(fast[1] - reference[1]))) <= 5e-6


def test_gradient_of_the_input_and_the_initial_state():
    model = models()["cfc_wired_mixed"]
    x, ts = inputs()
    hx = initial_state(model)

    def of_inputs(x, h, c):
        return loss(model, x, ts, (h, c))

    fast = mx.grad(of_inputs, argnums=(0, 1, 2))(x, *hx)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stepping, "can_evaluate", lambda arrays: False)
        eager = mx.grad(of_inputs, argnums=(0, 1, 2))(x, *hx)
    for a, b in zip(fast, eager):
        assert float(mx.max(mx.abs(a - b))) <= 1e-5 * max(float(mx.max(mx.abs(b))), 1.0)


def test_training_step_compiled_by_the_user_matches():
    """value_and_grad inside the user's own mx.compile runs the eager loop and agrees."""
    model = models()["cfc"]
    x, ts = inputs()
    step = nn.value_and_grad(model, lambda m, x: loss(m, x, ts, None))
    value, grads = step(model, x)
    compiled = mx.compile(lambda x: step(model, x), inputs=model.state, outputs=model.state)
    compiled(x)
    compiled_value, compiled_grads = compiled(x)  # the second call replays the compiled graph
    assert abs(float(value) - float(compiled_value)) <= 1e-5 * abs(float(value))
    for (key, a), (_, b) in zip(tree_flatten(grads), tree_flatten(compiled_grads)):
        assert float(mx.max(mx.abs(a - b))) <= 1e-5 * max(float(mx.max(mx.abs(a))), 1.0), key


def test_mlx_vjp_keeps_one_cotangent_of_a_repeated_output():
    """Why stepping._vjp differentiates sum(output * cotangent): if MLX fixes this, _vjp can go."""

    def twice(a):
        y = 2.0 * a
        return [y, y]

    _, (grad,) = mx.vjp(twice, [mx.ones(3)], [mx.ones(3), mx.ones(3)])
    ours = stepping._vjp(twice, [mx.ones(3)], [mx.ones(3), mx.ones(3)])[0]
    assert np.allclose(np.array(ours), 4.0)
    assert np.allclose(np.array(grad), 2.0)


def test_leaves_that_appear_twice_get_both_gradients():
    # The backbone bias is a parameter and also part of prepare()'s output.
    model = models()["cfc"]
    x, ts = inputs()
    _, grads = gradients(model, x, ts, None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stepping, "can_evaluate", lambda arrays: False)
        _, eager = gradients(model, x, ts, None)
    key = "rnn_cell.backbone.0.bias"
    assert float(mx.max(mx.abs(grads[key] - eager[key]))) <= 1e-5 * float(mx.max(mx.abs(eager[key])))


def test_copies_and_pickles_do_not_share_compiled_steps():
    import copy
    import pickle

    model = models()["cfc"]
    x, _ = inputs()
    before = model(x)[0]
    twin = copy.deepcopy(model)
    twin.rnn_cell.ff1.weight = twin.rnn_cell.ff1.weight * 2.0
    assert float(mx.max(mx.abs(twin(x)[0] - before))) > 1e-3
    assert float(mx.max(mx.abs(model(x)[0] - before))) == 0.0
    restored = pickle.loads(pickle.dumps(model))
    assert float(mx.max(mx.abs(restored(x)[0] - before))) == 0.0


def test_dropout_in_training_draws_afresh_each_call():
    model = CfC(I, 8, backbone_dropout=0.5, backbone_layers=2)
    x, _ = inputs()
    model.train()
    assert float(mx.max(mx.abs(model(x)[0] - model(x)[0]))) > 0.0
    model.eval()
    assert float(mx.max(mx.abs(model(x)[0] - model(x)[0]))) == 0.0


def test_a_process_that_took_gradients_exits_cleanly():
    script = textwrap.dedent(
        """
        import ncps_mlx, mlx.core as mx, mlx.nn as nn
        model = ncps_mlx.CfC(4, 6)
        x = mx.ones((2, 5, 4))
        value, grads = nn.value_and_grad(model, lambda m, x: mx.sum(m(x)[0]))(model, x)
        mx.eval(value, grads)
        print("done")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"


RESIDUAL_MODELS = {
    "default": lambda: CfC(I, 8, backbone_units=16),
    "two_layers_silu": lambda: CfC(I, 8, backbone_units=16, backbone_layers=2, activation="silu"),
    "no_gate_gelu": lambda: CfC(I, 8, backbone_units=16, mode="no_gate", activation="gelu"),
    "three_layers_proj": lambda: CfC(I, 8, backbone_units=16, backbone_layers=3, proj_size=2),
    "wired_autoncp": lambda: CfC(I, AutoNCP(12, 3, seed=5)),
    "wired_ncp_no_gate": lambda: CfC(I, NCP(4, 3, 2, 2, 2, 2, 2, seed=6), mode="no_gate"),
    # One layer of 10 of which 3 are motor neurons: the output is a slice of the state.
    "wired_motor_raw_heads": lambda: CfC(I, FullyConnected(10, 3), motor_output=True, ff_activation=None),
}


@pytest.mark.parametrize("columns", [1024, 6], ids=["one_gradient_block", "blocks_of_1_and_2_steps"])
@pytest.mark.parametrize("timespans", [False, True], ids=["unit_timespan", "timespans"])
@pytest.mark.parametrize("name", sorted(RESIDUAL_MODELS))
def test_residual_backward_matches_eager_gradients(name, timespans, columns, monkeypatch):
    """A CfC backpropagates from the residuals its forward pass saved (no step is
    recomputed): every gradient, the input's and the initial state's included, must equal
    plain MLX autodiff of the eager loop. The weight gradients are summed over blocks of
    steps: with 6 columns at batch 3, blocks of 2 steps and a last one of 1."""
    monkeypatch.setattr(stepping.Steps, "GRADIENT_COLUMNS", columns)
    taken = []
    original = stepping.Steps._residual_pass
    monkeypatch.setattr(stepping.Steps, "_residual_pass", lambda self, *a: taken.append(1) or original(self, *a))
    mx.random.seed(4)
    model = RESIDUAL_MODELS[name]()
    x, ts = inputs()
    ts = ts if timespans else None
    hx = initial_state(model)

    def full_loss(model, x, hx):
        return loss(model, x, ts, hx) + mx.sum(mx.sin(x)) * 0.0

    def all_gradients():
        value, (grads, dx, dh) = mx.value_and_grad(
            lambda params, x, hx: (model.update(params), full_loss(model, x, hx))[1], argnums=(0, 1, 2)
        )(model.trainable_parameters(), x, hx)
        flat = dict(tree_flatten(grads))
        flat.update(dx=dx, dh=dh)
        return float(value), flat

    value, fast = all_gradients()
    assert taken, "the residual backward was not used"
    # Again: the compiled chunks (8 steps, then 1 of T = 9) now come from the cache.
    again_value, again = all_gradients()
    assert again_value == value
    assert all(bool(mx.array_equal(again[key], fast[key])) for key in fast)
    monkeypatch.setattr(stepping, "can_evaluate", lambda arrays: False)
    eager_value, eager = all_gradients()
    assert abs(value - eager_value) <= 1e-5 * abs(eager_value)
    for key, reference in eager.items():
        scale = float(mx.max(mx.abs(reference)))
        error = float(mx.max(mx.abs(fast[key] - reference)))
        assert error <= 1e-5 * max(scale, 1.0), f"{key}: {error:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("backbone", [1, 0], ids=["backbone", "no_backbone"])
@pytest.mark.parametrize("timespan", ["unit", "array"])
@pytest.mark.parametrize("config", [{}, {"mode": "no_gate"}, {"ff_activation": None}], ids=["default", "no_gate", "raw_heads"])
def test_written_out_tail_jacobian_is_mlx_autodiff(config, timespan, backbone):
    """The residual backward uses a hand-written Jacobian of the CfC step's elementwise tail
    (with a backbone the gate's terms are halved in prepare(), without at run time)."""
    from ncps_mlx.cells.cfc import CfCCell

    cell = CfCCell(I, 8, backbone_units=16, backbone_layers=backbone, **config)
    rng = np.random.default_rng(7)
    K = 3 * 8 if timespan == "unit" and backbone else 4 * 8
    y = mx.array(rng.normal(scale=2.0, size=(K, 6)).astype(np.float32))
    ts = 1.0 if timespan == "unit" else mx.array(rng.uniform(0.2, 2.0, size=(1, 6)).astype(np.float32))
    ours = cell._tail_jacobian(cell._tail_parts(y, ts), ts)
    ones = mx.ones((8, 6))
    reference = mx.vjp(lambda v: [cell._tail(v, ts)], [y], [ones])[1][0]
    assert float(mx.max(mx.abs(ours - reference))) <= 1e-6


def test_many_forward_passes_before_their_backward_passes():
    """Residuals are kept for KEEP forward passes; one whose residuals were dropped runs its
    forward pass again. Six calls of one model in one loss: the same gradients as eager."""
    mx.random.seed(8)
    model = CfC(I, 8, backbone_units=16)
    x, _ = inputs()

    def loss_of_pieces(model, x):
        return sum(mx.sum(model(x[:, i : i + 3] * (1 + i))[0] ** 2) for i in range(6))

    fast = dict(tree_flatten(nn.value_and_grad(model, loss_of_pieces)(model, x)[1]))
    assert len(model._steps().kept) <= stepping.Steps.KEEP
    import unittest.mock

    with unittest.mock.patch.object(stepping, "can_evaluate", lambda arrays: False):
        eager = dict(tree_flatten(nn.value_and_grad(model, loss_of_pieces)(model, x)[1]))
    for key, reference in eager.items():
        scale = float(mx.max(mx.abs(reference)))
        assert float(mx.max(mx.abs(fast[key] - reference))) <= 1e-5 * max(scale, 1.0), key


def test_forward_backward_reuses_its_buffers_after_the_cache_filled_up():
    """MLX's CPU buffer cache stops taking buffers once full and keeps those that filled it;
    full of sizes no later allocation fits, every temporary of a forward+backward pass went
    back to the system and returned as fresh pages (64k page faults a pass here; a dense LTC
    at batch 32 x 100 ran 2x slower). A model's first sequence pass clears the cache."""
    code = textwrap.dedent(
        """
        import resource, ncps_mlx, mlx.core as mx, mlx.nn as nn
        mx.random.seed(0)
        model = ncps_mlx.LTC(20, 64)
        x = mx.random.normal((32, 20, 20))
        mx.eval(model.parameters(), x)
        grad = nn.value_and_grad(model, lambda m, x: mx.sum(m(x)[0] ** 2))
        stale = [mx.zeros((37 + i, 1001)) for i in range(300)]
        mx.eval(stale)
        del stale
        assert mx.get_cache_memory() > 16 << 20
        for _ in range(2):
            mx.eval(grad(model, x))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        mx.eval(grad(model, x))
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        """
    )
    environment = {**os.environ, "NCPS_MLX_RUNTIME": "mlx"}  # MLX's path, as the fixture above
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 2000


@pytest.mark.skipif(not stepping.compile_caches(), reason="mx.compile traces every call here (no C++ compiler for "
                    "MLX's CPU kernels): every pass is the differentiable one, and the forward pass is not its own")
def test_the_cache_is_cleared_when_the_pass_changes(monkeypatch):
    """Cleared before a model's first sequence pass, the first after a forward pass of its own
    and the first at new shapes; kept between equal passes, whose buffers it then holds."""
    model = models()["ltc"]
    x, _ = inputs()
    grad = nn.value_and_grad(model, lambda m, x: mx.sum(m(x)[0] ** 2))
    cleared = []
    clear = mx.clear_cache
    monkeypatch.setattr(mx, "clear_cache", lambda: cleared.append(1) or clear())

    def passes(n, x=x):
        before = len(cleared)
        for _ in range(n):
            mx.eval(grad(model, x))
        return len(cleared) - before

    assert passes(3) == 1
    mx.eval(model(x)[0])
    assert passes(2) == 1
    assert passes(2, x[:2]) == 1
    assert passes(1) == 1
