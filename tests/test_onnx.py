"""ONNX export: onnxruntime equals the MLX model on lengths and batch sizes never seen at export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

import ncps_mlx
from ncps_mlx import CTGRU, CTRNN, LTC, CfC, wirings as W

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOL = 1e-5
I = 5

MODELS = {
    "cfc": lambda: CfC(I, 8, backbone_units=16),
    "cfc_pure": lambda: CfC(I, 8, mode="pure", backbone_units=16),
    "cfc_no_gate_backbone0": lambda: CfC(I, 8, mode="no_gate", backbone_layers=0),
    "cfc_backbone2_gelu": lambda: CfC(I, 8, backbone_layers=2, backbone_units=12, activation="gelu"),
    "cfc_silu_proj": lambda: CfC(I, 8, activation="silu", backbone_units=12, proj_size=3),
    "cfc_relu_last": lambda: CfC(I, 8, activation="relu", backbone_units=12, return_sequences=False),
    "cfc_tanh_time_first": lambda: CfC(I, 8, activation="tanh", backbone_units=12, batch_first=False),
    "cfc_mixed": lambda: CfC(I, 8, backbone_units=12, mixed_memory=True),
    "cfc_keras_flavour": lambda: CfC(I, 8, backbone_units=12, mixed_memory=True, memory_circuit="input", ff_activation=None),
    "cfc_wired_fc": lambda: CfC(I, W.FullyConnected(8, 3)),
    "cfc_wired_fc_motor": lambda: CfC(I, W.FullyConnected(8, 3), motor_output=True, ff_activation=None),
    "cfc_wired_random_pure": lambda: CfC(I, W.Random(8, 3, sparsity_level=0.5), mode="pure"),
    "cfc_wired_ncp_no_gate": lambda: CfC(I, W.NCP(4, 3, 2, 2, 2, 2, 2), mode="no_gate"),
    "cfc_wired_autoncp_mixed_proj": lambda: CfC(I, W.AutoNCP(12, 3), mixed_memory=True, proj_size=2),
    "ltc": lambda: LTC(I, 8),
    "ltc_ncp": lambda: LTC(I, W.NCP(4, 3, 2, 2, 2, 2, 2)),
    "ltc_linear_none_unfolds3": lambda: LTC(I, 8, input_mapping="linear", output_mapping=None, ode_unfolds=3),
    "ltc_unconstrained_autoncp": lambda: LTC(I, W.AutoNCP(10, 3), implicit_param_constraints=False),
    "ltc_mixed_last": lambda: LTC(I, 8, mixed_memory=True, return_sequences=False),
    "ltc_mixed_input_time_first": lambda: LTC(I, 8, mixed_memory=True, memory_circuit="input", batch_first=False),
    "ctrnn": lambda: CTRNN(I, 8),
    "ctrnn_no_feedback_delta": lambda: CTRNN(I, 8, global_feedback=False, delta_t=1 / 6),
    "ctrnn_learn_tau_clip_proj": lambda: CTRNN(I, 8, learn_tau=True, cell_clip=0.3, proj_size=2),
    "ctgru": lambda: CTGRU(I, 4, M=3),
    "ctgru_mozer_clip_mixed": lambda: CTGRU(I, 3, M=4, decay="mozer", cell_clip=0.2, mixed_memory=True),
}


def perturbed(name, seed=0):
    mx.random.seed(seed)
    model = MODELS[name]()
    rng = np.random.default_rng(seed)
    params = tree_flatten(model.trainable_parameters())
    # Without the head tanh (the tf/keras flavour) a CfC's state is unbounded: random weights
    # make it grow or turn chaotic over 300 steps, where float32 itself (MLX or onnxruntime)
    # drifts 2e-5 from float64. Halving its weights keeps it contractive and the test meaningful.
    scale = 0.5 if getattr(getattr(model.rnn_cell, "layers", [model.rnn_cell])[0], "ff_activation", "tanh") is None else 1.0
    model.update(
        tree_unflatten([(k, scale * v + mx.array(0.2 * scale * rng.normal(size=v.shape), dtype=v.dtype)) for k, v in params])
    )
    if isinstance(model, LTC) and not model.rnn_cell.implicit_param_constraints:
        model.apply_weight_constraints()
    model.eval()
    return model


def session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def all_inputs(model):
    return ["initial_state", "timespans"] + (["initial_memory"] if model.use_mixed else [])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnxruntime_matches_mlx(name, tmp_path):
    """With every optional input a graph input, fed by name (defaults fed where a case has none)."""
    model = perturbed(name)
    path = ncps_mlx.export_onnx(model, tmp_path / "m.onnx", inputs=all_inputs(model))  # runs check_model(full_check=True)
    sess = session(path)
    assert sorted(i.name for i in sess.get_inputs()) == sorted(["input", *all_inputs(model)])
    outputs = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(1)
    for steps, batch, feed_ts, feed_state in ((1, 1, False, False), (7, 13, True, True), (300, 1, True, False), (300, 13, False, True)):
        x = rng.normal(size=(batch, steps, I)).astype(np.float32)
        ts = rng.uniform(0.3, 2.0, size=(batch, steps)).astype(np.float32) if feed_ts else np.ones((batch, steps), np.float32)
        if not model.batch_first:
            x, ts = np.ascontiguousarray(x.swapaxes(0, 1)), np.ascontiguousarray(ts.T)
        h = np.zeros((batch, model.state_size), np.float32)
        c = np.zeros((batch, model.state_size), np.float32)
        hx = None
        if feed_state:
            h = rng.normal(scale=0.5, size=(batch, model.state_size)).astype(np.float32)
            c = rng.normal(scale=0.5, size=(batch, model.state_size)).astype(np.float32)
            hx = (mx.array(h), mx.array(c)) if model.use_mixed else mx.array(h)
        feeds = {"input": x, "timespans": ts, "initial_state": h, **({"initial_memory": c} if model.use_mixed else {})}
        results = dict(zip(outputs, sess.run(None, feeds)))
        out, state = model(mx.array(x), hx, mx.array(ts) if feed_ts else None)
        states = state if isinstance(state, tuple) else (state,)
        assert results["output"].shape == tuple(out.shape)
        assert np.max(np.abs(results["output"] - np.array(out))) <= TOL, (steps, batch)
        assert np.max(np.abs(results["state"] - np.array(states[0]))) <= TOL, (steps, batch)
        if model.use_mixed:
            assert np.max(np.abs(results["memory"] - np.array(states[1]))) <= TOL
    assert np.std(results["output"]) > 1e-3


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_export_takes_input_alone(name, tmp_path):
    model = perturbed(name)
    sess = session(ncps_mlx.export_onnx(model, tmp_path / "m.onnx"))
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["output", "state"] + (["memory"] if model.use_mixed else [])
    x = np.random.default_rng(2).normal(size=(13, 7, I) if model.batch_first else (7, 13, I)).astype(np.float32)
    got = sess.run(None, {"input": x})
    out, state = model(mx.array(x))
    states = state if isinstance(state, tuple) else (state,)
    for value, expected in zip(got, [out, *states]):
        assert np.max(np.abs(value - np.array(expected))) <= TOL


@pytest.mark.parametrize("name", sorted(MODELS))
def test_step_export_streams_the_sequence(name, tmp_path):
    """The one-step graph fed T times, from a random state, with timespans: the MLX model's
    sequence output and final state(s)."""
    model = perturbed(name)
    sess = session(ncps_mlx.export_onnx(model, tmp_path / "step.onnx", step=True, inputs=["timespans"]))
    mixed = model.use_mixed
    assert [i.name for i in sess.get_inputs()] == ["input", "state"] + (["memory"] if mixed else []) + ["timespan"]
    assert [o.name for o in sess.get_outputs()] == ["output", "next_state"] + (["next_memory"] if mixed else [])
    rng = np.random.default_rng(4)
    batch, steps, S = 5, 9, model.state_size
    x = rng.normal(size=(batch, steps, I)).astype(np.float32)
    ts = rng.uniform(0.3, 2.0, size=(batch, steps)).astype(np.float32)
    state = {"state": rng.normal(scale=0.5, size=(batch, S)).astype(np.float32)}
    if mixed:
        state["memory"] = rng.normal(scale=0.5, size=(batch, S)).astype(np.float32)
    hx = (mx.array(state["state"]), mx.array(state["memory"])) if mixed else mx.array(state["state"])
    outs = []
    for t in range(steps):
        out_t, *next_states = sess.run(None, {"input": x[:, t], "timespan": ts[:, t], **state})
        outs.append(out_t)
        state = dict(zip(["state", "memory"], next_states))
    layout = (lambda a: a) if model.batch_first else (lambda a: np.ascontiguousarray(a.swapaxes(0, 1)))
    out, final = model(mx.array(layout(x)), hx, mx.array(layout(ts)))
    streamed = np.stack(outs, axis=1)  # (B, T, F)
    if model.return_sequences:
        assert np.max(np.abs(streamed - layout(np.array(out)))) <= TOL
    else:
        assert np.max(np.abs(streamed[:, -1] - np.array(out))) <= TOL
    finals = final if isinstance(final, tuple) else (final,)
    for name_, value in zip(["state", "memory"], finals):
        assert np.max(np.abs(state[name_] - np.array(value))) <= TOL


def test_bad_onnx_inputs_are_refused():
    model = perturbed("cfc")
    with pytest.raises(ValueError, match=r"unknown ONNX input\(s\) \['initial_memory'\].*choose from \['initial_state', 'timespans'\]"):
        ncps_mlx.converters.onnx_export.build_onnx(model, inputs=["initial_memory"])
    with pytest.raises(ValueError, match="inputs= may only add 'timespans'"):
        ncps_mlx.converters.onnx_export.build_onnx(model, inputs=["initial_state"], step=True)


@pytest.mark.parametrize("name", ["cfc_wired_autoncp_mixed_proj", "ltc_ncp", "ctgru"])
def test_graph_structure_and_metadata(name):
    model = perturbed(name)
    proto = ncps_mlx.converters.onnx_export.build_onnx(model, inputs=["timespans", "initial_state"])
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == ncps_mlx.converters.onnx_export.OPSET == 17
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("Scan") == 1 and "Loop" not in ops
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["ncps_mlx_config"]) == json.loads(json.dumps(model.get_config()))
    assert props["ncps_mlx_version"] == ncps_mlx.__version__ and props["ncps_mlx_graph"] == "sequence"
    assert [i.name for i in proto.graph.input] == ["input", "initial_state", "timespans"]
    assert not {i.name for i in proto.graph.input} & {t.name for t in proto.graph.initializer}


BIG = {
    "cfc_64": lambda: CfC(20, 64),
    "cfc_autoncp_64_mixed": lambda: CfC(20, W.AutoNCP(64, 8), mixed_memory=True),
    "ltc_64": lambda: LTC(20, 64),
    "ltc_autoncp_64": lambda: LTC(20, W.AutoNCP(64, 8)),
    # CTRNN(20, 64) has only 22 KB of weights, so the ~4 KB graph would be 18% of it; at 128
    # units the weights are 76 KB. The graph's own size is checked for every model below.
    "ctrnn_128": lambda: CTRNN(20, 128),
    "ctgru_32": lambda: CTGRU(20, 32),
}


@pytest.mark.parametrize("name", sorted(BIG))
def test_file_size_close_to_the_weights(name, tmp_path):
    """No copies per step: the file is the weights plus a small graph (at most +10%)."""
    model = BIG[name]()
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    size = ncps_mlx.export_onnx(model, tmp_path / "m.onnx").stat().st_size
    assert size <= 1.10 * weights, f"{size} bytes for {weights} bytes of weights"
    assert size - weights < 16 * 1024  # what is not weights is one step's graph, whatever the length


KERAS_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "keras"


@pytest.mark.parametrize(
    "name", ["cfc_norm_backbone2_timedistributed", "cfc_go_backwards", "cfc_return_state", "cfc_flatten_dense", "ltc_mixed_dense"]
)
def test_graph_from_keras_exports(name, tmp_path):
    pytest.importorskip("h5py")
    from ncps_mlx.converters import readers

    graph = readers.read(KERAS_FIXTURES / f"{name}.keras").module().build()
    sess = session(ncps_mlx.export_onnx(graph, tmp_path / "graph.onnx"))
    x = np.load(KERAS_FIXTURES / f"{name}.npz")["x"]
    if name != "cfc_flatten_dense":  # Flatten fixes the length; the others take any
        x = np.random.default_rng(3).normal(size=(13, 40, x.shape[-1])).astype(np.float32)
    expected = graph(mx.array(x))
    expected = expected if isinstance(expected, list) else [expected]
    assert [i.name for i in sess.get_inputs()] == [spec["name"] for spec in graph.input_specs]
    assert [o.name for o in sess.get_outputs()] == graph.output_names
    got = sess.run(None, {sess.get_inputs()[0].name: x})
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert np.max(np.abs(a - np.array(b))) <= TOL
