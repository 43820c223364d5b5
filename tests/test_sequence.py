"""The shared time loop: per-sample timespans, layouts, states, and its error messages."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

import ncps_mlx
from ncps_mlx import CTGRU, CTRNN, LTC, CfC, wirings

MODELS = {
    "cfc": lambda: CfC(5, 8),
    "cfc_pure": lambda: CfC(5, 8, mode="pure"),
    "cfc_wired_mixed": lambda: CfC(5, wirings.AutoNCP(12, 3), mixed_memory=True),
    "ltc": lambda: LTC(5, 8),
    "ltc_ncp_mixed_input": lambda: LTC(5, wirings.NCP(4, 4, 2, 2, 2, 2, 2), mixed_memory=True, memory_circuit="input"),
    "ctrnn": lambda: CTRNN(5, 8),
    "ctgru_mozer": lambda: CTGRU(5, 4, M=4, decay="mozer"),
}


def perturb(model, seed=0):
    from mlx.utils import tree_flatten, tree_unflatten

    rng = np.random.default_rng(seed)
    params = tree_flatten(model.trainable_parameters())
    model.update(tree_unflatten([(k, v + mx.array(0.1 * rng.normal(size=v.shape), dtype=v.dtype)) for k, v in params]))
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("layout", ["BT", "BT1"])
def test_per_sample_timespans_match_running_each_sample_alone(name, layout):
    mx.random.seed(0)
    model = perturb(MODELS[name]())
    rng = np.random.default_rng(1)
    x = mx.array(rng.normal(size=(4, 9, 5)).astype(np.float32))
    ts = rng.uniform(0.1, 3.0, size=(4, 9)).astype(np.float32)
    ts_arg = mx.array(ts[..., None] if layout == "BT1" else ts)
    out, state = model(x, timespans=ts_arg)
    for b in range(4):
        out_b, state_b = model(x[b : b + 1], timespans=mx.array(ts[b : b + 1]))
        assert float(mx.max(mx.abs(out[b] - out_b[0]))) <= 1e-6
        states, states_b = (state, state_b) if isinstance(state, tuple) else ((state,), (state_b,))
        for s, s_b in zip(states, states_b):
            assert float(mx.max(mx.abs(s[b] - s_b[0]))) <= 1e-6
    # The timespans must matter (CTGRU "ltc" ignores them by design; "mozer" is used here).
    assert float(mx.max(mx.abs(out - model(x)[0]))) > 1e-4


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layouts_agree(name):
    """Time-first and unbatched input give the batch-first numbers."""
    mx.random.seed(0)
    model = perturb(MODELS[name]())
    x = mx.random.normal((3, 7, 5))
    ts = mx.random.uniform(0.5, 2.0, (3, 7))
    out, state = model(x, timespans=ts)
    model.batch_first = False
    out_tf, state_tf = model(x.swapaxes(0, 1), timespans=ts.T)
    model.batch_first = True
    assert float(mx.max(mx.abs(out_tf.swapaxes(0, 1) - out))) <= 1e-6
    out_1, state_1 = model(x[1], timespans=ts[1])
    assert float(mx.max(mx.abs(out_1 - out[1]))) <= 1e-6
    h, h_1 = (state[0], state_1[0]) if isinstance(state, tuple) else (state, state_1)
    assert h_1.shape == (model.state_size,)
    assert float(mx.max(mx.abs(h_1 - h[1]))) <= 1e-6


@pytest.mark.parametrize("name", sorted(MODELS))
def test_return_last_and_continue_from_state(name):
    """Running two halves, handing the state over, equals one run; the last output equals
    return_sequences=False."""
    mx.random.seed(0)
    model = perturb(MODELS[name]())
    x = mx.random.normal((2, 10, 5))
    out, state = model(x)
    _, mid = model(x[:, :4])
    out2, state2 = model(x[:, 4:], mid)
    assert float(mx.max(mx.abs(out2 - out[:, 4:]))) <= 1e-6
    model.return_sequences = False
    last, _ = model(x)
    assert float(mx.max(mx.abs(last - out[:, -1]))) <= 1e-7


def test_scalar_timespan_equals_constant_array():
    model = perturb(CfC(5, 8))
    x = mx.random.normal((2, 6, 5))
    a, _ = model(x, timespans=0.5)
    b, _ = model(x, timespans=mx.full((2, 6), 0.5))
    c, _ = model(x, timespans=mx.full((1, 6, 1), 0.5))
    assert float(mx.max(mx.abs(a - b))) == 0.0 and float(mx.max(mx.abs(a - c))) == 0.0


def test_numpy_input_is_accepted():
    model = CfC(5, 8)
    x = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    out, _ = model(x)
    assert float(mx.max(mx.abs(out - model(mx.array(x))[0]))) == 0.0


# --- errors -----------------------------------------------------------------------------------


def test_wrong_feature_size():
    with pytest.raises(ValueError, match="7 features .* input_size=5"):
        CfC(5, 8)(mx.zeros((2, 3, 7)))


def test_wrong_rank():
    with pytest.raises(ValueError, match="4-D input"):
        LTC(5, 8)(mx.zeros((2, 3, 4, 5)))


def test_wrong_hx_shape():
    with pytest.raises(ValueError, match=r"shape \(2, 9\); expected \(2, 8\)"):
        CfC(5, 8)(mx.zeros((2, 3, 5)), mx.zeros((2, 9)))
    with pytest.raises(ValueError, match=r"expected \(8,\)"):
        CfC(5, 8)(mx.zeros((3, 5)), mx.zeros((1, 8)))


def test_mixed_memory_needs_a_tuple():
    with pytest.raises(ValueError, match=r"mixed_memory, so hx must be a tuple \(h, c\)"):
        CfC(5, 8, mixed_memory=True)(mx.zeros((2, 3, 5)), mx.zeros((2, 8)))
    with pytest.raises(ValueError, match="single array"):
        CfC(5, 8)(mx.zeros((2, 3, 5)), (mx.zeros((2, 8)), mx.zeros((2, 8))))


def test_wrong_timespans_shape():
    with pytest.raises(ValueError, match="timespans of shape"):
        CfC(5, 8)(mx.zeros((2, 3, 5)), timespans=mx.ones((2, 4)))
    with pytest.raises(ValueError, match="last axis of size 1"):
        CfC(5, 8)(mx.zeros((2, 3, 5)), timespans=mx.ones((2, 3, 2)))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: CfC(5, 8, mode="fast"), "Unknown CfC mode 'fast'"),
        (lambda: CfC(5, 8, activation="swish"), "Unknown activation 'swish'"),
        (lambda: LTC(5, 8, input_mapping="affin"), "Unknown input_mapping 'affin'"),
        (lambda: LTC(5, 8, output_mapping="log"), "Unknown output_mapping 'log'"),
        (lambda: CfC(5, 8, ff_activation="relu"), "Unknown ff_activation"),
        (lambda: CfC(5, 8, mixed_memory=True, memory_circuit="lstm"), "Unknown memory_circuit"),
        (lambda: CTGRU(5, 4, decay="exp"), "Unknown CTGRU decay"),
        (lambda: CfC(5, wirings.AutoNCP(12, 3), backbone_units=64), "Cannot use backbone_units with a wiring"),
        (lambda: CfC(5, 8, motor_output=True), "motor_output applies to a wired CfC"),
        (lambda: wirings.AutoNCP(64, 64), "output_size must be less than units - 2"),
        (lambda: LTC(5, 8, ode_unfolds=0), "ode_unfolds must be a positive int"),
    ],
)
def test_bad_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_one_wiring_object_per_layer():
    wiring = wirings.AutoNCP(12, 3)
    CfC(5, wiring)
    with pytest.raises(ValueError, match="separate wiring for each layer"):
        CfC(7, wiring)


def test_properties():
    wiring = wirings.AutoNCP(16, 4)
    model = LTC(5, wiring)
    assert (model.state_size, model.output_size) == (16, 4)
    assert model.synapse_count == wiring.synapse_count
    assert model.sensory_synapse_count == int(np.abs(wiring.sensory_adjacency_matrix).sum())
    cfc = CfC(5, 8, proj_size=3)
    assert (cfc.state_size, cfc.output_size, cfc.synapse_count, cfc.sensory_synapse_count) == (8, 8, 64, 40)
    assert CTGRU(5, 4, M=8).state_size == 32 and CTGRU(5, 4).output_size == 4
    assert ncps_mlx.__version__


@pytest.mark.parametrize("mapping", ["affine", "linear", None])
def test_sparse_sensory_projection_matches_the_dense_term(mapping, monkeypatch):
    """An LTC with sparse sensory synapses projects only the existing ones (two one-hot
    products); the dense (..., I, S) term over the masked weights must give the same, and the
    same gradients."""
    from ncps_mlx.cells.ltc import LTCCell
    from ncps_mlx.wirings import AutoNCP

    mx.random.seed(3)
    cell = LTC(7, AutoNCP(16, 3, seed=2), input_mapping=mapping).rnn_cell
    assert cell._sensory_synapses() is not None
    cell.update({name: mx.random.uniform(-1.0, 1.0, value.shape) for name, value in cell.parameters().items()
                 if name in ("input_w", "input_b", "sensory_mu", "sensory_erev")})
    x = mx.random.normal((4, 5, 7))
    weights = mx.random.normal((4, 5, 2 * cell.state_size))

    def projected(parameters):
        cell.update(parameters)
        return mx.sum(cell.project_input(x) * weights)

    parameters = cell.trainable_parameters()
    sparse, sparse_grad = cell.project_input(x), mx.grad(projected)(parameters)
    monkeypatch.setattr(LTCCell, "_sensory_synapses", lambda self: None)
    dense, dense_grad = cell.project_input(x), mx.grad(projected)(parameters)
    assert float(mx.max(mx.abs(dense))) > 0.1
    assert float(mx.max(mx.abs(sparse - dense))) <= 1e-6
    mapped = {"affine": ("input_w", "input_b"), "linear": ("input_w",), None: ()}[mapping]
    for name in ("sensory_w", "sensory_sigma", "sensory_mu", "sensory_erev") + mapped:
        scale = max(float(mx.max(mx.abs(dense_grad[name]))), 1.0)
        assert float(mx.max(mx.abs(sparse_grad[name] - dense_grad[name]))) <= 1e-5 * scale, name


@pytest.mark.parametrize("name", ["cfc", "cfc_no_backbone", "cfc_wired", "cfc_mixed", "ltc", "ctrnn", "ctgru"])
def test_vmap_on_mlx_path_matches_one_slice_at_a_time(name, monkeypatch):
    """mx.vmap over a batch of batches on MLX's path (the kernels off): the same outputs as
    running each slice alone. (A CfC's first step failed inside MLX's vmap of addmm, whose
    addend alone was batched, until the initial zeros were made batched as x is.)"""
    monkeypatch.setenv("NCPS_MLX_RUNTIME", "mlx")
    mx.random.seed(3)
    make = {"cfc": lambda: CfC(5, 8), "cfc_no_backbone": lambda: CfC(5, 8, backbone_layers=0),
            "cfc_wired": lambda: CfC(5, wirings.AutoNCP(10, 3, seed=1)), "cfc_mixed": lambda: CfC(5, 8, mixed_memory=True),
            "ltc": lambda: LTC(5, 6), "ctrnn": lambda: CTRNN(5, 6), "ctgru": lambda: CTGRU(5, 4, M=3)}[name]
    model = make()
    x = mx.random.normal((3, 2, 7, 5))
    vmapped = mx.vmap(lambda a: model(a)[0])(x)
    alone = mx.stack([model(x[i])[0] for i in range(x.shape[0])])
    assert float(mx.max(mx.abs(alone))) > 0
    assert float(mx.max(mx.abs(vmapped - alone))) <= 2e-6
    # an initial state that is not mapped, as x is
    hx = mx.random.normal((2, model.state_size))
    hx = (hx, hx) if model.use_mixed else hx
    vmapped = mx.vmap(lambda a: model(a, hx)[0])(x)
    alone = mx.stack([model(x[i], hx)[0] for i in range(x.shape[0])])
    assert float(mx.max(mx.abs(vmapped - alone))) <= 2e-6
