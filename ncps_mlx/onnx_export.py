"""Export a model to ONNX with its time loop as one ``Scan``: any batch size, any length.

    export_onnx(model, "m.onnx")

Graph (opset 17, IR version 8), B batch, T time, I input_size, S state_size, F output features:

* inputs: ``input`` (B, T, I), or (T, B, I) for a time-first model; ``initial_state`` (B, S),
  defaults to zeros; ``initial_memory`` (B, S) with mixed memory, defaults to zeros;
  ``timespans`` (B, T) (time-first: (T, B)), defaults to 1. Defaults are initializers that a
  caller may override by feeding the input.
* outputs: ``output`` as the MLX model returns it (B, T, F) / (T, B, F) / last step (B, F);
  ``state`` (B, S); ``memory`` (B, S) with mixed memory.

The input-only part of each step (the cells' ``project_input``) runs once over the whole
sequence before the ``Scan``; the body holds one step. Sparse wirings are folded into the
weights, run-time constraints (softplus) into constants; the model's config is stored in
``metadata_props`` (``ncps_mlx_config``). Needs the ``onnx`` package (``pip install
'ncps-mlx[onnx]'``). Unbatched (rank-2) input is not part of the ONNX graph's contract.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import mlx.nn as nn

from .cells import CfCCell, CTGRUCell, CTRNNCell, LTCCell, WiredCfCCell

OPSET = 17
IR_VERSION = 8


def _np(array) -> np.ndarray:
    return np.array(array, dtype=np.float32)


class _Graph:
    """Collects nodes; constants go to the root graph so a Scan body refers to them by name."""

    def __init__(self, root: "_Graph | None" = None, prefix: str = ""):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.root = root or self
        self.prefix = prefix
        self.nodes = []
        if root is None:
            self.initializers = []
            self.counter = itertools.count()
            self.cache = {}

    def fresh(self, hint: str) -> str:
        return f"{self.prefix}{hint}_{next(self.root.counter)}"

    def const(self, value, hint: str = "const", dtype=np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (hint, array.dtype.str, array.shape, array.tobytes())
        if key not in self.root.cache:
            name = f"{hint}_{next(self.root.counter)}"
            self.root.initializers.append(self.numpy_helper.from_array(array, name))
            self.root.cache[key] = name
        return self.root.cache[key]

    def ints(self, values) -> str:
        return self.const(values, "ints", dtype=np.int64)

    def op(self, op_type: str, *inputs, outputs: int = 1, **attrs):
        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    # small vocabulary
    def linear(self, x, weight, bias=None):
        """x @ weight.T + bias, weight given as (out, in) numpy."""
        y = self.op("MatMul", x, self.const(weight.T, "weight"))
        return y if bias is None else self.op("Add", y, self.const(bias, "bias"))

    def split(self, x, sizes, axis=-1):
        return self.op("Split", x, self.ints(sizes), outputs=len(sizes), axis=axis)

    def sigmoid(self, x):
        return self.op("Sigmoid", x)

    def tanh(self, x):
        return self.op("Tanh", x)


# --- cells -----------------------------------------------------------------------------------


class _CfC:
    def __init__(self, cell: CfCCell):
        weight, bias = (_np(a) for a in cell._first_layer())
        self.input_size, self.hidden = cell.input_size, cell.hidden_size
        self.w_input, self.w_state, self.bias = weight[:, : self.input_size], weight[:, self.input_size :], bias
        self.mode, self.ff_activation, self.activation = cell.mode, cell.ff_activation, cell.activation_name
        self.backbone = [(_np(l.weight), _np(l.bias)) for l in cell.backbone[1:]] if cell.backbone_layers > 0 else None
        self.heads = tuple(_np(a) for a in cell._heads()) if cell.backbone_layers > 0 else None
        if self.mode == "pure":
            self.A, self.abs_w_tau = _np(cell.A), np.abs(_np(cell.w_tau))

    def project(self, g, x):
        return g.linear(x, self.w_input, self.bias)

    def _act(self, g, x):
        if self.activation == "lecun_tanh":
            return g.op("Mul", g.const(1.7159), g.tanh(g.op("Mul", x, g.const(0.666))))
        if self.activation == "tanh":
            return g.tanh(x)
        if self.activation == "relu":
            return g.op("Relu", x)
        if self.activation == "silu":
            return g.op("Mul", x, g.sigmoid(x))
        # exact (erf) GELU, as mlx.nn.gelu and torch.nn.GELU
        erf = g.op("Erf", g.op("Mul", x, g.const(1 / math.sqrt(2))))
        return g.op("Mul", g.op("Mul", x, g.const(0.5)), g.op("Add", erf, g.const(1.0)))

    def step(self, g, u, h, ts):
        z = g.op("Add", u, g.op("MatMul", h, g.const(self.w_state.T, "weight")))
        if self.backbone is not None:
            z = self._act(g, z)
            for weight, bias in self.backbone:
                z = self._act(g, g.linear(z, weight, bias))
            z = g.linear(z, *self.heads)
        if self.mode == "pure":
            decay = g.op("Exp", g.op("Mul", g.op("Neg", ts), g.op("Add", g.const(self.abs_w_tau), g.op("Abs", z))))
            A = g.const(self.A)
            new = g.op("Add", g.op("Mul", g.op("Mul", g.op("Neg", A), decay), z), A)
            return new, new
        ff1, ff2, t_a, t_b = g.split(z, [self.hidden] * 4)
        if self.ff_activation == "tanh":
            ff1, ff2 = g.tanh(ff1), g.tanh(ff2)
        gate = g.sigmoid(g.op("Add", g.op("Mul", t_a, ts), t_b))
        if self.mode == "no_gate":
            new = g.op("Add", ff1, g.op("Mul", gate, ff2))
        else:
            new = g.op("Add", g.op("Mul", ff1, g.op("Sub", g.const(1.0), gate)), g.op("Mul", gate, ff2))
        return new, new


class _WiredCfC:
    def __init__(self, cell: WiredCfCCell):
        self.layers = [_CfC(layer) for layer in cell.layers]
        self.sizes = list(cell.layer_sizes)
        self.motor = cell.wiring.output_dim if cell.motor_output else None

    def project(self, g, x):
        return self.layers[0].project(g, x)

    def step(self, g, u, h, ts):
        states = g.split(h, self.sizes) if len(self.sizes) > 1 else [h]
        out, state = self.layers[0].step(g, u, states[0], ts)
        new_states = [state]
        for layer, state in zip(self.layers[1:], states[1:]):
            out, state = layer.step(g, layer.project(g, out), state, ts)
            new_states.append(state)
        if self.motor is not None:
            out = g.op("Slice", out, g.ints([0]), g.ints([self.motor]), g.ints([-1]))
        h_new = g.op("Concat", *new_states, axis=-1) if len(new_states) > 1 else new_states[0]
        return out, h_new


class _LTC:
    def __init__(self, cell: LTCCell):
        pos = cell._positive
        self.cell = cell
        self.S, self.M, self.unfolds, self.epsilon = cell.state_size, cell.motor_size, cell.ode_unfolds, cell.epsilon
        self.sensory_sigma, self.sensory_mu = _np(cell.sensory_sigma), _np(cell.sensory_mu)
        self.sensory_w = _np(pos(cell.sensory_w) * cell.sensory_sparsity_mask)
        self.sensory_w_erev = self.sensory_w * _np(cell.sensory_erev)
        self.sigma, self.mu = _np(cell.sigma), _np(cell.mu)
        self.w = _np(pos(cell.w) * cell.sparsity_mask)
        self.w_erev = self.w * _np(cell.erev)
        self.cm, self.gleak = _np(pos(cell.cm)), _np(pos(cell.gleak))
        self.leak = _np(pos(cell.gleak) * cell.vleak)

    def project(self, g, x):
        cell = self.cell
        if cell.input_mapping in ("affine", "linear"):
            x = g.op("Mul", x, g.const(_np(cell.input_w)))
        if cell.input_mapping == "affine":
            x = g.op("Add", x, g.const(_np(cell.input_b)))
        pre = g.op("Sub", g.op("Unsqueeze", x, g.ints([-1])), g.const(self.sensory_mu))
        activation = g.sigmoid(g.op("Mul", g.const(self.sensory_sigma), pre))
        numerator = g.op("ReduceSum", g.op("Mul", activation, g.const(self.sensory_w_erev)), g.ints([-2]), keepdims=0)
        denominator = g.op("ReduceSum", g.op("Mul", activation, g.const(self.sensory_w)), g.ints([-2]), keepdims=0)
        return g.op("Concat", numerator, denominator, axis=-1)

    def step(self, g, u, v, ts):
        sensory_num, sensory_den = g.split(u, [self.S, self.S])
        cm_t = g.op("Div", g.const(self.cm), g.op("Div", ts, g.const(float(self.unfolds))))
        leak, gleak = g.const(self.leak), g.const(self.gleak)
        for _ in range(self.unfolds):
            pre = g.op("Sub", g.op("Unsqueeze", v, g.ints([2])), g.const(self.mu))
            activation = g.sigmoid(g.op("Mul", g.const(self.sigma), pre))
            w_num = g.op("ReduceSum", g.op("Mul", activation, g.const(self.w_erev)), g.ints([1]), keepdims=0)
            w_den = g.op("ReduceSum", g.op("Mul", activation, g.const(self.w)), g.ints([1]), keepdims=0)
            numerator = g.op("Add", g.op("Add", g.op("Mul", cm_t, v), leak), g.op("Add", w_num, sensory_num))
            denominator = g.op("Add", g.op("Add", cm_t, gleak), g.op("Add", w_den, sensory_den))
            v = g.op("Div", numerator, g.op("Add", denominator, g.const(self.epsilon)))
        out = v
        if self.M < self.S:
            out = g.op("Slice", out, g.ints([0]), g.ints([self.M]), g.ints([-1]))
        cell = self.cell
        if cell.output_mapping in ("affine", "linear"):
            out = g.op("Mul", out, g.const(_np(cell.output_w)))
        if cell.output_mapping == "affine":
            out = g.op("Add", out, g.const(_np(cell.output_b)))
        return out, v


class _CTRNN:
    def __init__(self, cell: CTRNNCell):
        weight = _np(cell.step.weight)
        self.cell, self.I = cell, cell.input_size
        self.w_input, self.w_state, self.bias = weight[:, : self.I], weight[:, self.I :], _np(cell.step.bias)
        self.tau = float(np.array(nn.softplus(cell.tau_raw))[0]) if cell.learn_tau else cell.tau

    def project(self, g, x):
        return g.linear(x, self.w_input, self.bias)

    def step(self, g, u, h, ts):
        cell = self.cell
        eps = g.op("Mul", ts, g.const(cell.delta_t))
        f = None if cell.global_feedback else g.tanh(u)
        for _ in range(cell.ode_unfolds):
            if cell.global_feedback:
                f = g.tanh(g.op("Add", u, g.op("MatMul", h, g.const(self.w_state.T, "weight"))))
            h = g.op("Add", h, g.op("Mul", eps, g.op("Sub", f, g.op("Div", h, g.const(self.tau)))))
            if cell.cell_clip is not None:
                h = g.op("Clip", h, g.const(-cell.cell_clip), g.const(cell.cell_clip))
        return h, h


class _CTGRU:
    def __init__(self, cell: CTGRUCell):
        self.cell, I = cell, cell.input_size
        w = [_np(layer.weight) for layer in (cell.tau_r, cell.tau_s, cell.detect)]
        self.w_input = np.concatenate([a[:, :I] for a in w])
        self.bias = np.concatenate([_np(layer.bias) for layer in (cell.tau_r, cell.tau_s, cell.detect)])
        self.w_r, self.w_s, self.w_q = (a[:, I:] for a in w)

    def project(self, g, x):
        return g.linear(x, self.w_input, self.bias)

    def _scales(self, g, logits):
        diff = g.op("Sub", logits, g.const(_np(self.cell._ln_tau)))
        return g.op("Softmax", g.op("Neg", g.op("Mul", diff, diff)), axis=-1)

    def step(self, g, u, state, ts):
        cell = self.cell
        U, M = cell.units, cell.M
        shape = g.ints([-1, U, M])
        traces = g.op("Reshape", state, shape)
        u_r, u_s, u_q = g.split(u, [U * M, U * M, U])
        h = g.op("ReduceSum", traces, g.ints([2]), keepdims=0)
        retrieve = self._scales(g, g.op("Reshape", g.op("Add", u_r, g.op("MatMul", h, g.const(self.w_r.T, "weight"))), shape))
        retrieved = g.op("ReduceSum", g.op("Mul", retrieve, traces), g.ints([2]), keepdims=0)
        q = g.tanh(g.op("Add", u_q, g.op("MatMul", retrieved, g.const(self.w_q.T, "weight"))))
        store = self._scales(g, g.op("Reshape", g.op("Add", u_s, g.op("MatMul", h, g.const(self.w_s.T, "weight"))), shape))
        mixed = g.op(
            "Add",
            g.op("Mul", g.op("Sub", g.const(1.0), store), traces),
            g.op("Mul", store, g.op("Unsqueeze", q, g.ints([2]))),
        )
        if cell.decay == "ltc":
            decay = g.const(_np(cell._ltc_decay))
        else:
            decay = g.op("Exp", g.op("Mul", g.op("Neg", g.op("Unsqueeze", ts, g.ints([2]))), g.const(_np(cell._inv_tau))))
        traces = g.op("Mul", mixed, decay)
        if cell.cell_clip is not None:
            traces = g.op("Clip", traces, g.const(-cell.cell_clip), g.const(cell.cell_clip))
        return g.op("ReduceSum", traces, g.ints([2]), keepdims=0), g.op("Reshape", traces, g.ints([-1, U * M]))


class _LSTM:
    def __init__(self, lstm):
        self.w_input, self.bias = _np(lstm.input_map.weight), _np(lstm.input_map.bias)
        self.w_state, self.hidden, self.forget_bias = _np(lstm.recurrent_map.weight), lstm.hidden_size, lstm.forget_gate_bias

    def project(self, g, x):
        return g.linear(x, self.w_input, self.bias)

    def step(self, g, u, h, c):
        z = g.op("Add", u, g.op("MatMul", h, g.const(self.w_state.T, "weight")))
        i, ig, fg, og = g.split(z, [self.hidden] * 4)
        forget = g.sigmoid(g.op("Add", fg, g.const(self.forget_bias)))
        c_new = g.op("Add", g.op("Mul", c, forget), g.op("Mul", g.tanh(i), g.sigmoid(ig)))
        return g.op("Mul", g.tanh(c_new), g.sigmoid(og)), c_new


_EXPORTERS = {CfCCell: _CfC, WiredCfCCell: _WiredCfC, LTCCell: _LTC, CTRNNCell: _CTRNN, CTGRUCell: _CTGRU}


# --- the model -------------------------------------------------------------------------------


def _value(name, shape=None):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _sequence(g, model, x, initial_state=None, initial_memory=None, timespans=None):
    """Nodes running ``model`` over the sequence ``x`` (the model's own layout).

    Returns (output, final state, final memory or None) as value names. Missing initial
    states start from zeros, missing timespans are 1.
    """
    from onnx import helper

    exporter_class = _EXPORTERS.get(type(model.rnn_cell))
    if exporter_class is None:
        raise ValueError(f"cannot export a {type(model.rnn_cell).__name__} to ONNX")
    cell = exporter_class(model.rnn_cell)
    lstm = _LSTM(model.lstm) if model.use_mixed else None
    S = model.state_size

    time_major = g.op("Transpose", x, perm=[1, 0, 2]) if model.batch_first else x
    shape = g.op("Shape", x)
    batch = g.op("Gather", shape, g.const(np.array([0 if model.batch_first else 1]), "index", dtype=np.int64), axis=0)
    state_shape = g.op("Concat", batch, g.ints([S]), axis=0)
    zeros = g.const(np.zeros((1, S), np.float32), "zeros")
    h0 = g.op("Expand", initial_state or zeros, state_shape)
    ts = g.op("Expand", timespans or g.const(np.ones((1, 1), np.float32), "ones"), g.op("Slice", shape, g.ints([0]), g.ints([2])))
    if model.batch_first:
        ts = g.op("Transpose", ts, perm=[1, 0])
    ts = g.op("Unsqueeze", ts, g.ints([2]))  # (T, B, 1)

    states_in, scan_inputs = [h0], []
    if lstm is not None:
        states_in.append(g.op("Expand", initial_memory or zeros, state_shape))
        scan_inputs.append(lstm.project(g, time_major))
    if lstm is None or model.memory_circuit == "state":
        scan_inputs.append(cell.project(g, time_major))
    scan_inputs.append(ts)

    body = _Graph(root=g, prefix=g.fresh("body") + "_")
    names = [body.fresh(n) for n in ["h_in"] + (["c_in"] if lstm else []) + [f"x{i}_t" for i in range(len(scan_inputs) - 1)] + ["ts_t"]]
    h, step_ts = names[0], names[-1]
    if lstm is not None:
        memory_out, c = lstm.step(body, names[2], h, names[1])
        if model.memory_circuit == "state":
            h, u = memory_out, names[3]
        else:
            u = cell.project(body, memory_out)
    else:
        u = names[1]
    out, h = cell.step(body, u, h, step_ts)
    body_outputs = [body.op("Identity", h)] + ([body.op("Identity", c)] if lstm else []) + [body.op("Identity", out)]
    # Every body value is (batch, features); only the rank is declared.
    body_graph = helper.make_graph(
        body.nodes, "step", [_value(n, [None, None]) for n in names], [_value(n, [None, None]) for n in body_outputs]
    )
    results = g.op("Scan", *states_in, *scan_inputs, outputs=len(states_in) + 1, body=body_graph, num_scan_inputs=len(scan_inputs))
    outputs_tm = results[-1]
    if model.return_sequences:
        y = g.op("Transpose", outputs_tm, perm=[1, 0, 2]) if model.batch_first else outputs_tm
    else:
        y = g.op("Gather", outputs_tm, g.const(np.array(-1), "index", dtype=np.int64), axis=0)
    if model.fc is not None:
        y = g.linear(y, _np(model.fc.weight), _np(model.fc.bias))
    return y, results[0], (results[1] if lstm is not None else None)


def _activation(g, name, x):
    if name in (None, "linear"):
        return x
    simple = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softplus": "Softplus", "elu": "Elu", "selu": "Selu", "exponential": "Exp"}
    if name in simple:
        return g.op(simple[name], x)
    if name == "softmax":
        return g.op("Softmax", x, axis=-1)
    if name in ("silu", "swish"):
        return g.op("Mul", x, g.sigmoid(x))
    if name == "lecun_tanh":
        return g.op("Mul", g.const(1.7159), g.tanh(g.op("Mul", x, g.const(0.666))))
    if name == "gelu":
        erf = g.op("Erf", g.op("Mul", x, g.const(1 / math.sqrt(2))))
        return g.op("Mul", g.op("Mul", x, g.const(0.5)), g.op("Add", erf, g.const(1.0)))
    raise ValueError(f"cannot export activation {name!r} to ONNX")


def _stack(g, stack, x):
    """Nodes for an ``ncps_mlx.Stack``: its layers in order. Returns its output value names."""
    from .stack import RNN, Activation, Dense, Dropout, Flatten, Normalization

    for layer in stack.layers:
        if isinstance(layer, RNN):
            model = layer.model
            if layer.go_backwards:
                axis = 1 if model.batch_first else 0
                x = g.op("Slice", x, g.ints([-1]), g.ints([-(2**62)]), g.ints([axis]), g.ints([-1]))
            y, h, c = _sequence(g, model, x)
            if layer.return_state:
                return [y] + ([c, h] if c is not None else [h])
            x = y
        elif isinstance(layer, Dense):
            bias = _np(layer.linear.bias) if "bias" in layer.linear else None
            x = _activation(g, layer.activation, g.linear(x, _np(layer.linear.weight), bias))
        elif isinstance(layer, Activation):
            x = _activation(g, layer.activation, x)
        elif isinstance(layer, Flatten):
            x = g.op("Flatten", x, axis=1)
        elif isinstance(layer, Normalization):
            scale = g.op("Max", g.op("Sqrt", g.const(_np(layer.variance))), g.const(layer._config["epsilon"]))
            x = g.op("Div", g.op("Sub", x, g.const(_np(layer.mean))), scale)
        elif not isinstance(layer, Dropout):
            raise ValueError(f"cannot export a {type(layer).__name__} layer to ONNX")
    return [x]


def _stack_output_ranks(stack):
    """Ranks of a Stack's outputs, which the graph must declare: 3 while time remains."""
    from .stack import RNN, Flatten

    rank = 3
    for layer in stack.layers:
        if isinstance(layer, RNN):
            rank = 3 if layer.model.return_sequences else 2
            if layer.return_state:
                return [rank, 2] + ([2] if layer.model.use_mixed else [])
        elif isinstance(layer, Flatten):
            rank = 2
    return [rank]


def build_onnx(model):
    """The ``onnx.ModelProto`` for ``model``: a CfC, LTC, CTRNN, CTGRU, or a ``Stack`` of them
    with plain layers (whose graph takes ``input`` alone, as the Keras model did)."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'ncps-mlx[onnx]'") from None
    from . import __version__
    from .stack import Stack

    g = _Graph()
    defaults = []
    if isinstance(model, Stack):
        first = model.layers[0]
        features = first.model.input_size if hasattr(first, "model") else None
        inputs = [_value("input", ["batch", "time", features])]
        results = _stack(g, model, "input")
        names = ["output"] + [f"state_{i}" for i in range(len(results) - 1)]
        outputs = [_value(name, [None] * rank) for name, rank in zip(names, _stack_output_ranks(model))]
        for result, name in zip(results, names):
            g.nodes.append(helper.make_node("Identity", [result], [name]))
    else:
        S, I = model.state_size, model.input_size
        y, h, c = _sequence(
            g, model, "input", "initial_state", "initial_memory" if model.use_mixed else None, "timespans"
        )
        g.nodes.append(helper.make_node("Identity", [y], ["output"]))
        g.nodes.append(helper.make_node("Identity", [h], ["state"]))
        out_features = model.fc.weight.shape[0] if model.fc is not None else model.rnn_cell.output_size
        if model.return_sequences:
            out_shape = ["batch", "time", out_features] if model.batch_first else ["time", "batch", out_features]
        else:
            out_shape = ["batch", out_features]
        outputs = [_value("output", out_shape), _value("state", ["batch", S])]
        inputs = [
            _value("input", ["batch", "time", I] if model.batch_first else ["time", "batch", I]),
            _value("initial_state", ["state_batch", S]),
            _value("timespans", ["timespans_0", "timespans_1"]),
        ]
        defaults = [
            onnx.numpy_helper.from_array(np.zeros((1, S), np.float32), "initial_state"),
            onnx.numpy_helper.from_array(np.ones((1, 1), np.float32), "timespans"),
        ]
        if c is not None:
            g.nodes.append(helper.make_node("Identity", [c], ["memory"]))
            outputs.append(_value("memory", ["batch", S]))
            inputs.insert(2, _value("initial_memory", ["state_batch", S]))
            defaults.append(onnx.numpy_helper.from_array(np.zeros((1, S), np.float32), "initial_memory"))

    graph = helper.make_graph(g.nodes, type(model).__name__, inputs, outputs, initializer=defaults + g.initializers)
    proto = helper.make_model(
        graph, producer_name="ncps-mlx", opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    helper.set_model_props(
        proto,
        {"ncps_mlx_config": json.dumps(model.get_config()), "ncps_mlx_version": __version__, "time_loop": "Scan"},
    )
    return proto


def export_onnx(model, path, check: bool = True) -> Path:
    """Write ``model`` as ONNX to ``path`` atomically; returns the path.

    With ``check`` the graph goes through ``onnx.checker.check_model(full_check=True)`` first.
    """
    import onnx

    from .modelfile import write_atomically

    proto = build_onnx(model)
    if check:
        onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    write_atomically(path, lambda tmp: Path(tmp).write_bytes(proto.SerializeToString()))
    return path
