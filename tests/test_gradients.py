"""Gradients with respect to every input: parameters, x, hx and timespans, on every path.

Paths: ``default`` (the CPU kernels where they apply, else MLX's compiled differentiable
pass), ``mlx`` (kernels off: the compiled custom-function passes, generic and residual),
``eager`` (the plain loop, as inside an outer ``mx.compile``, where nothing may be evaluated).

Oracles: ncps.torch autograd for CfC and LTC, run one sample at a time (its per-step
timespans work at batch 1 only, reference-notes point 7; the loss is a sum over samples, so
the per-sample gradients are the batch's); central differences of the float64 model for
CTRNN and CTGRU. Tolerance: 1e-4 of each gradient's largest magnitude, which must be
non-zero (a path returning zeros fails).
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
from helpers import load_torch_weights, perturb_, torch  # noqa: E402

ncps_torch = pytest.importorskip("ncps.torch")
ncps_wirings = pytest.importorskip("ncps.wirings")

INPUT, STEPS = 4, 9
PATHS = ("default", "mlx", "eager")
TORCH_CASES = {
    "cfc_default": ("CfC", 8, {"backbone_units": 12}),
    "cfc_no_gate": ("CfC", 8, {"backbone_units": 12, "mode": "no_gate"}),
    "cfc_pure": ("CfC", 8, {"backbone_units": 12, "mode": "pure"}),
    "cfc_backbone0": ("CfC", 8, {"backbone_layers": 0}),
    "cfc_backbone2_silu": ("CfC", 8, {"backbone_layers": 2, "backbone_units": 10, "activation": "silu"}),
    "cfc_mixed": ("CfC", 8, {"backbone_units": 12, "mixed_memory": True}),
    "cfc_wired": ("CfC", ("AutoNCP", (10, 3), {"seed": 2}), {}),
    "cfc_wired_no_gate_mixed": ("CfC", ("AutoNCP", (10, 3), {"seed": 2}), {"mode": "no_gate", "mixed_memory": True}),
    "ltc": ("LTC", 7, {}),
    "ltc_wired": ("LTC", ("NCP", (3, 3, 2, 2, 2, 2, 2), {"seed": 4}), {}),
    "ltc_mixed": ("LTC", 7, {"mixed_memory": True}),
}


def path_context(path):
    return ncps_mlx.runtime.cpu.turned_off() if path == "mlx" else contextlib.nullcontext()


def mlx_gradients(model, loss, inputs, path):
    """(parameter gradients by name, [d x, d hx..., d timespans]) of ``loss(model, *inputs)``."""

    def of_all(parameters, *arrays):
        model.update(parameters)
        return loss(model, *arrays)

    function = mx.grad(of_all, argnums=tuple(range(1 + len(inputs))))
    if path == "eager":
        function = mx.compile(function)  # traced: the loop runs as written, step by step
    original = model.parameters()
    with path_context(path):
        grads = function(model.trainable_parameters(), *inputs)
    model.update(original)
    return dict(tree_flatten(grads[0])), [np.array(g) for g in grads[1:]]


def assert_close(name, ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, f"{name}: shape {ours.shape} != {reference.shape}"
    scale = float(np.max(np.abs(reference)))
    err = float(np.max(np.abs(ours - reference)))
    assert scale > 0, f"{name}: the reference gradient is zero, the comparison would be vacuous"
    assert err <= 1e-4 * scale, f"{name}: max abs err {err:.3g} vs gradient scale {scale:.3g}"


def build_pair(family, units, kwargs, seed=0):
    if isinstance(units, tuple):
        name, args, wiring_kwargs = units
        t_units = getattr(ncps_wirings, name)(*args, **wiring_kwargs)
        m_units = getattr(ncps_mlx.wirings, name)(*args, **wiring_kwargs)
    else:
        t_units = m_units = units
    torch.manual_seed(seed)
    t_model = getattr(ncps_torch, family)(INPUT, t_units, **kwargs)
    m_model = getattr(ncps_mlx, family)(INPUT, m_units, **kwargs)
    perturb_(t_model, seed + 1, 0.5)
    load_torch_weights(m_model, t_model)
    return t_model, m_model


def torch_reference(t_model, x, hx, ts, w_out, w_state):
    """Gradients of sum(out * w_out) + sum(state * w_state) summed over samples, each run alone."""
    from ncps_mlx.converters.torch_reader import rename_torch_keys

    t_model.zero_grad()
    x_t = torch.tensor(x, requires_grad=True)
    hx_t = [torch.tensor(h, requires_grad=True) for h in hx]
    ts_t = torch.tensor(ts, requires_grad=True)
    for b in range(x.shape[0]):
        state = tuple(h[b : b + 1] for h in hx_t)
        out, final = t_model(x_t[b : b + 1], state if len(state) == 2 else state[0], ts_t[b : b + 1])
        finals = final if isinstance(final, tuple) else (final,)
        loss = (out * torch.tensor(w_out[b : b + 1])).sum()
        loss = loss + sum((f * torch.tensor(w[b : b + 1])).sum() for f, w in zip(finals, w_state))
        loss.backward()
    params = {n: p.grad.numpy() for n, p in t_model.named_parameters() if p.requires_grad}
    return rename_torch_keys(params), [x_t.grad.numpy()] + [h.grad.numpy() for h in hx_t] + [ts_t.grad.numpy()]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch, ts_rank", [(1, 3), (3, 2)], ids=["B1_ts(B,T,1)", "B3_ts(B,T)"])
@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_gradients_match_ncps_torch(case, batch, ts_rank, path):
    family, units, kwargs = TORCH_CASES[case]
    t_model, m_model = build_pair(family, units, kwargs)
    rng = np.random.default_rng(7)
    mixed = kwargs.get("mixed_memory", False)
    S = m_model.state_size
    x = rng.normal(size=(batch, STEPS, INPUT)).astype(np.float32)
    hx = [rng.normal(scale=0.5, size=(batch, S)).astype(np.float32) for _ in range(2 if mixed else 1)]
    ts = rng.uniform(0.3, 2.0, size=(batch, STEPS)).astype(np.float32)
    with torch.no_grad():
        out_shape = t_model(torch.tensor(x[:1]))[0].shape
    w_out = rng.normal(size=(batch, *out_shape[1:])).astype(np.float32)
    w_state = [rng.normal(size=(batch, S)).astype(np.float32) for _ in hx]
    t_params, t_inputs = torch_reference(t_model, x, hx, ts, w_out, w_state)

    def loss(model, x, *rest):
        *states, ts = rest
        out, final = model(x, tuple(states) if mixed else states[0], ts)
        finals = final if isinstance(final, tuple) else (final,)
        return mx.sum(out * mx.array(w_out)) + sum(mx.sum(f * mx.array(w)) for f, w in zip(finals, w_state))

    ts_in = ts[..., None] if ts_rank == 3 else ts
    m_params, m_inputs = mlx_gradients(m_model, loss, [mx.array(a) for a in [x, *hx, ts_in]], path)
    m_inputs[-1] = m_inputs[-1].reshape(ts.shape)
    assert set(m_params) == set(t_params)
    for name, grad in t_params.items():
        assert_close(name, m_params[name], grad)
    for name, ours, reference in zip(["x"] + [f"hx[{i}]" for i in range(len(hx))] + ["timespans"], m_inputs, t_inputs):
        assert_close(name, ours, reference)


# --- CTRNN and CTGRU: central differences of a float64 numpy oracle ------------------------------
# (MLX's own float64 is no oracle: on the CPU its exp, sigmoid and softmax are float32-accurate.)


def ctrnn_numpy(p, cell, x, h, ts):
    """ctrnn.py's loop in float64: explicit Euler, ode_unfolds sub-steps of delta_t * ts."""
    W, b, I = p["rnn_cell.step.weight"], p["rnn_cell.step.bias"], x.shape[-1]
    tau = np.log1p(np.exp(p["rnn_cell.tau_raw"])) if cell.learn_tau else cell.tau
    outs = []
    for t in range(x.shape[1]):
        u, eps = x[:, t] @ W[:, :I].T + b, cell.delta_t * ts[:, t : t + 1]
        for _ in range(cell.ode_unfolds):
            f = np.tanh(u + h @ W[:, I:].T) if cell.global_feedback else np.tanh(u)
            h = h + eps * (f - h / tau)
            if cell.cell_clip is not None:
                h = np.clip(h, -cell.cell_clip, cell.cell_clip)
        outs.append(h)
    return np.stack(outs, axis=1), h


def ctgru_numpy(p, cell, x, state, ts):
    """ctgru.py's loop in float64 (shared/docs/ctrnn-ctgru.md sections 2 and 4)."""
    U, M = cell.units, cell.M
    ln_tau = np.arange(M) / 2.0 * np.log(10.0)
    decay_ltc = np.concatenate([[0.0], np.exp(-1.0 / ln_tau[1:])])

    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def linear(name, v):
        return v @ p[f"rnn_cell.{name}.weight"].T + p[f"rnn_cell.{name}.bias"]

    traces, outs = state.reshape(-1, U, M), []
    for t in range(x.shape[1]):
        xh = np.concatenate([x[:, t], traces.sum(-1)], axis=-1)
        retrieve = softmax(-((linear("tau_r", xh).reshape(-1, U, M) - ln_tau) ** 2))
        q = np.tanh(linear("detect", np.concatenate([x[:, t], (retrieve * traces).sum(-1)], axis=-1)))
        store = softmax(-((linear("tau_s", xh).reshape(-1, U, M) - ln_tau) ** 2))
        mixed = (1 - store) * traces + store * q[:, :, None]
        decay = decay_ltc if cell.decay == "ltc" else np.exp(-ts[:, t, None, None] / 10.0 ** (np.arange(M) / 2.0))
        traces = mixed * decay
        if cell.cell_clip is not None:
            traces = np.clip(traces, -cell.cell_clip, cell.cell_clip)
        outs.append(traces.sum(-1))
    return np.stack(outs, axis=1), traces.reshape(-1, U * M)


FD_CASES = {
    "ctrnn": (lambda: ncps_mlx.CTRNN(INPUT, 6), ctrnn_numpy),
    "ctrnn_learn_tau_clip": (lambda: ncps_mlx.CTRNN(INPUT, 6, learn_tau=True, cell_clip=0.6), ctrnn_numpy),
    "ctrnn_no_feedback": (lambda: ncps_mlx.CTRNN(INPUT, 6, global_feedback=False, ode_unfolds=3), ctrnn_numpy),
    "ctgru_mozer": (lambda: ncps_mlx.CTGRU(INPUT, 5, M=4, decay="mozer"), ctgru_numpy),
    "ctgru_ltc": (lambda: ncps_mlx.CTGRU(INPUT, 5, M=4), ctgru_numpy),
    "ctgru_mozer_clip": (lambda: ncps_mlx.CTGRU(INPUT, 5, M=4, decay="mozer", cell_clip=0.4), ctgru_numpy),
}


def perturbed(make, seed=0):
    mx.random.seed(seed)
    model = make()
    rng = np.random.default_rng(seed)
    model.update(
        nn.utils.tree_map(lambda p: p + mx.array(rng.normal(scale=0.3, size=p.shape).astype(np.float32)), model.parameters())
    )
    return model


def central_differences(function, arrays, eps=1e-6):
    """d function / d each of ``arrays`` (float64 numpy), one entry at a time."""
    grads = []
    for i, array in enumerate(arrays):
        grad = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            up, down = [a.copy() for a in arrays], [a.copy() for a in arrays]
            up[i][index] += eps
            down[i][index] -= eps
            grad[index] = (function(*up) - function(*down)) / (2 * eps)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch, ts_rank", [(1, 3), (3, 2)], ids=["B1_ts(B,T,1)", "B3_ts(B,T)"])
@pytest.mark.parametrize("case", sorted(FD_CASES))
def test_gradients_match_central_differences(case, batch, ts_rank, path):
    make, oracle = FD_CASES[case]
    model = perturbed(make)
    rng = np.random.default_rng(3)
    steps = 6
    x = rng.normal(size=(batch, steps, INPUT))
    hx = rng.normal(scale=0.5, size=(batch, model.state_size))
    ts = rng.uniform(0.3, 2.0, size=(batch, steps))
    w_out = rng.normal(size=(batch, steps, model.rnn_cell.output_size))
    w_state = rng.normal(size=(batch, model.state_size))
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    params = [np.array(v, np.float64) for _, v in tree_flatten(model.trainable_parameters())]

    def loss64(*arrays):
        p = dict(zip(names, arrays[: len(names)]))
        out, final = oracle(p, model.rnn_cell, *arrays[len(names) :])
        return float(np.sum(out * w_out) + np.sum(final * w_state))

    def loss(model, x, hx, ts):
        out, final = model(x, hx, ts)
        return mx.sum(out * mx.array(w_out, mx.float32)) + mx.sum(final * mx.array(w_state, mx.float32))

    ts_in = ts[..., None] if ts_rank == 3 else ts
    inputs = [mx.array(a, mx.float32) for a in (x, hx, ts_in)]
    value = loss(model, *inputs).item()
    assert abs(value - loss64(*params, x, hx, ts)) <= 1e-4 * abs(value)  # the oracle is the model
    expected = central_differences(loss64, params + [x, hx, ts])
    m_params, m_inputs = mlx_gradients(model, loss, inputs, path)
    m_inputs[-1] = m_inputs[-1].reshape(ts.shape)
    for name, reference in zip(names, expected):
        assert_close(name, m_params[name], reference)
    assert_close("x", m_inputs[0], expected[len(names)])
    assert_close("hx", m_inputs[1], expected[len(names) + 1])
    if case == "ctgru_ltc":  # the LTC code's CTGRU ignores timespans: its gradient is exactly zero
        assert np.max(np.abs(expected[-1])) == 0.0 and np.max(np.abs(m_inputs[2])) == 0.0
    else:
        assert_close("timespans", m_inputs[2], expected[-1])


@pytest.mark.parametrize("path", PATHS)
def test_a_scalar_timespan_gets_its_gradient(path):
    """A 0-d timespan array: the sum of what every sample and step would get."""
    _, model = build_pair("CfC", 8, {"backbone_units": 12})
    x = mx.array(np.random.default_rng(0).normal(size=(3, STEPS, INPUT)).astype(np.float32))

    def loss(model, x, ts):
        return mx.sum(model(x, timespans=ts)[0] ** 2)

    _, (_, d_scalar) = mlx_gradients(model, loss, [x, mx.array(0.7)], path)
    _, (_, d_full) = mlx_gradients(model, loss, [x, mx.full((3, STEPS), 0.7)], path)
    assert d_scalar.shape == ()
    assert abs(float(d_scalar) - float(d_full.sum())) <= 1e-4 * abs(float(d_full.sum())) and float(d_scalar) != 0.0


def test_with_every_switch_off():
    """The batch-3 cases again in a process started with ``NCPS_MLX_RUNTIME=mlx``: MLX's
    operations only, no CPU kernels."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NCPS_MLX_RUNTIME="mlx")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "B3 and default and not switch"],
        env=env, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


@pytest.mark.parametrize("family", ["CfC", "LTC"])
def test_a_mask_skips_steps_forward_and_backward(family):
    """A masked step is skipped (Keras's masking): outputs, final state and the gradients with
    respect to x and timespans equal those of the sequence without the masked steps."""
    _, model = build_pair(family, 7, {})
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, STEPS, INPUT)).astype(np.float32)
    ts = rng.uniform(0.3, 2.0, size=(1, STEPS)).astype(np.float32)
    keep = np.ones((1, STEPS), bool)
    keep[0, [1, 4, STEPS - 1]] = False
    kept = np.flatnonzero(keep[0])

    def loss(model, x, ts, mask=None):
        out, state = model(x, timespans=ts, mask=mask)
        return mx.sum(state**2) + mx.sum(out[:, -1] * mx.arange(out.shape[-1]))

    grad = mx.grad(lambda x, ts: loss(model, x, ts, mx.array(keep)), argnums=(0, 1))
    d_x, d_ts = (np.array(g) for g in grad(mx.array(x), mx.array(ts)))
    d_x_short, d_ts_short = (np.array(g) for g in mx.grad(lambda x, ts: loss(model, x, ts), argnums=(0, 1))(
        mx.array(x[:, kept]), mx.array(ts[:, kept])))
    assert np.max(np.abs(d_x[:, kept] - d_x_short)) <= 1e-5 and np.all(d_x[:, ~keep[0]] == 0)
    assert np.max(np.abs(d_ts[:, kept] - d_ts_short)) <= 1e-5 and np.abs(d_ts_short).max() > 0
    out, state = model(mx.array(x), timespans=mx.array(ts), mask=mx.array(keep))
    short_out, short_state = model(mx.array(x[:, kept]), timespans=mx.array(ts[:, kept]))
    assert float(mx.max(mx.abs(state - short_state))) <= 1e-5
    assert float(mx.max(mx.abs(out[:, 1] - out[:, 0]))) == 0.0  # a masked step repeats the output
