"""Export a model to ONNX with its time loop as one ``Scan``: any batch size, any length.

    export_onnx(model, "m.onnx")                                   # input -> output, state
    export_onnx(model, "m.onnx", inputs=["initial_state", "timespans"])
    export_onnx(model, "step.onnx", step=True)                     # one step, for streaming

Graph (opset 17, IR version 8), B batch, T time, I input_size, S state_size, F output features:

* inputs: ``input`` (B, T, I), or (T, B, I) for a time-first model; with ``inputs=`` also
  ``initial_state`` (B, S), ``initial_memory`` (B, S) (mixed memory) and ``timespans`` (B, T)
  (time-first: (T, B)). Inputs not asked for are constants (zeros; a timespan of 1), never
  overridable initializers: ``get_inputs()`` lists exactly what the graph takes.
* outputs: ``output`` as the MLX model returns it (B, T, F) / (T, B, F) / last step (B, F);
  ``state`` (B, S); ``memory`` (B, S) with mixed memory.
* ``step=True``: one step, ``input`` (B, I), ``state`` (B, S)[, ``memory`` (B, S)][,
  ``timespan`` (B,) with ``inputs=["timespans"]``, else 1] -> ``output`` (B, F),
  ``next_state``[, ``next_memory``]; fed its own next state T times from zeros, it gives the
  sequence graph's outputs.

The input-only part of each step (the cells' ``project_input``) runs once over the whole
sequence before the ``Scan``; the body holds one step. Sparse wirings are folded into the
weights, run-time constraints (softplus) into constants; the model's config is stored in
``metadata_props`` (``ncps_mlx_config``, and ``ncps_mlx_graph``: sequence, step or graph). Needs the ``onnx`` package (``pip install
'ncps-mlx[onnx]'``). Unbatched (rank-2) input is not part of the ONNX graph's contract.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from ncps_mlx.version import __version__
from ncps_mlx.lowering import CfCLowering, CTGRULowering, CTRNNLowering, LSTMLowering, LTCLowering, Mode, WiredCfCLowering

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
    def __init__(self, cell: CfCLowering):
        weight, bias = _np(cell.first_weight), _np(cell.first_bias)
        self.input_size, self.hidden = cell.input_size, cell.hidden_size
        self.w_input, self.w_state, self.bias = weight[:, : self.input_size], weight[:, self.input_size :], bias
        self.mode, self.ff_tanh, self.activation = cell.mode, cell.ff_tanh, cell.activation.name
        self.backbone = [(_np(w), _np(b)) for w, b in cell.hidden] if cell.heads is not None else None
        self.heads = tuple(_np(a) for a in cell.heads) if cell.heads is not None else None
        if self.mode == Mode.PURE:
            self.A, self.abs_w_tau = _np(cell.A), np.abs(_np(cell.w_tau))

    def project(self, g, x):
        return g.linear(x, self.w_input, self.bias)

    def _act(self, g, x):
        return _activation(g, self.activation, x)

    def step(self, g, u, h, ts):
        z = g.op("Add", u, g.op("MatMul", h, g.const(self.w_state.T, "weight")))
        if self.backbone is not None:
            z = self._act(g, z)
            for weight, bias in self.backbone:
                z = self._act(g, g.linear(z, weight, bias))
            z = g.linear(z, *self.heads)
        if self.mode == Mode.PURE:
            decay = g.op("Exp", g.op("Mul", g.op("Neg", ts), g.op("Add", g.const(self.abs_w_tau), g.op("Abs", z))))
            A = g.const(self.A)
            new = g.op("Add", g.op("Mul", g.op("Mul", g.op("Neg", A), decay), z), A)
            return new, new
        ff1, ff2, t_a, t_b = g.split(z, [self.hidden] * 4)
        if self.ff_tanh:
            ff1, ff2 = g.tanh(ff1), g.tanh(ff2)
        gate = g.sigmoid(g.op("Add", g.op("Mul", t_a, ts), t_b))
        if self.mode == Mode.NO_GATE:
            new = g.op("Add", ff1, g.op("Mul", gate, ff2))
        else:
            new = g.op("Add", g.op("Mul", ff1, g.op("Sub", g.const(1.0), gate)), g.op("Mul", gate, ff2))
        return new, new


class _WiredCfC:
    def __init__(self, cell: WiredCfCLowering):
        self.layers = [_CfC(layer) for layer in cell.layers]
        self.sizes = list(cell.layer_sizes)
        self.output_size = cell.output_size

    def project(self, g, x):
        return self.layers[0].project(g, x)

    def step(self, g, u, h, ts):
        states = g.split(h, self.sizes) if len(self.sizes) > 1 else [h]
        out, state = self.layers[0].step(g, u, states[0], ts)
        new_states = [state]
        for layer, state in zip(self.layers[1:], states[1:]):
            out, state = layer.step(g, layer.project(g, out), state, ts)
            new_states.append(state)
        if self.output_size < self.sizes[-1]:  # motor_output: the motor neurons only
            out = g.op("Slice", out, g.ints([0]), g.ints([self.output_size]), g.ints([-1]))
        h_new = g.op("Concat", *new_states, axis=-1) if len(new_states) > 1 else new_states[0]
        return out, h_new


class _LTC:
    def __init__(self, cell: LTCLowering):
        self.cell = cell
        self.S, self.M, self.unfolds, self.epsilon = cell.state_size, cell.motor_size, cell.ode_unfolds, cell.epsilon
        self.sensory_sigma, self.sensory_mu = _np(cell.sensory_sigma), _np(cell.sensory_mu)
        self.sensory_w = _np(cell.sensory_w)
        self.sensory_w_erev = self.sensory_w * _np(cell.sensory_erev)
        self.sigma, self.mu = _np(cell.sigma), _np(cell.mu)
        self.w = _np(cell.w)
        self.w_erev = self.w * _np(cell.erev)
        self.cm, self.gleak = _np(cell.cm), _np(cell.gleak)
        self.leak = _np(cell.gleak * cell.vleak)

    def project(self, g, x):
        cell = self.cell
        if cell.input_w is not None:
            x = g.op("Mul", x, g.const(_np(cell.input_w)))
        if cell.input_b is not None:
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
        if cell.output_w is not None:
            out = g.op("Mul", out, g.const(_np(cell.output_w)))
        if cell.output_b is not None:
            out = g.op("Add", out, g.const(_np(cell.output_b)))
        return out, v


class _CTRNN:
    def __init__(self, cell: CTRNNLowering):
        weight = _np(cell.weight)
        self.cell, self.I = cell, cell.input_size
        self.w_input, self.w_state, self.bias = weight[:, : self.I], weight[:, self.I :], _np(cell.bias)
        self.tau = float(_np(cell.tau)[0])

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
    def __init__(self, cell: CTGRULowering):
        self.cell = cell
        self.w_input, self.bias = _np(cell.input_weight), _np(cell.input_bias)
        # the lowering's state halves are transposed (U, U M); the exporter multiplies h @ w
        self.w_r, self.w_s, self.w_q = (_np(a).T for a in (cell.w_r, cell.w_s, cell.w_q))

    def project(self, g, x):
        return g.linear(x, self.w_input, self.bias)

    def _scales(self, g, logits):
        diff = g.op("Sub", logits, g.const(np.asarray(self.cell.ln_tau, np.float32)))
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
        decay = np.asarray(cell.decay, np.float32)
        if not cell.mozer:
            decay = g.const(decay)
        else:
            decay = g.op("Exp", g.op("Mul", g.op("Neg", g.op("Unsqueeze", ts, g.ints([2]))), g.const(decay)))
        traces = g.op("Mul", mixed, decay)
        if cell.cell_clip is not None:
            traces = g.op("Clip", traces, g.const(-cell.cell_clip), g.const(cell.cell_clip))
        return g.op("ReduceSum", traces, g.ints([2]), keepdims=0), g.op("Reshape", traces, g.ints([-1, U * M]))


class _LSTM:
    def __init__(self, lstm: LSTMLowering):
        self.w_input, self.bias = _np(lstm.input_weight), _np(lstm.input_bias)
        self.w_state, self.forget_bias = _np(lstm.recurrent_weight), lstm.forget_gate_bias
        self.hidden = self.w_state.shape[1]

    def project(self, g, x):
        return g.linear(x, self.w_input, self.bias)

    def step(self, g, u, h, c):
        z = g.op("Add", u, g.op("MatMul", h, g.const(self.w_state.T, "weight")))
        i, ig, fg, og = g.split(z, [self.hidden] * 4)
        forget = g.sigmoid(g.op("Add", fg, g.const(self.forget_bias)))
        c_new = g.op("Add", g.op("Mul", c, forget), g.op("Mul", g.tanh(i), g.sigmoid(ig)))
        return g.op("Mul", g.tanh(c_new), g.sigmoid(og)), c_new


# Keyed by the lowering's type (``ncps_mlx.lowering``): the exporter reads a cell through it alone.
_EXPORTERS = {CfCLowering: _CfC, WiredCfCLowering: _WiredCfC, LTCLowering: _LTC, CTRNNLowering: _CTRNN, CTGRULowering: _CTGRU}


def _exporters(model):
    """(the cell's exporter, the mixed-memory LSTM's or None), from their lowerings."""
    lowering = model.rnn_cell.lowered()
    exporter_class = _EXPORTERS.get(type(lowering))
    if exporter_class is None:
        raise ValueError(f"cannot export a model whose cell lowers to {type(lowering).__name__} to ONNX")
    return exporter_class(lowering), (_LSTM(model.lstm.lowered()) if model.use_mixed else None)


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

    cell, lstm = _exporters(model)
    S = model.state_size

    time_major = g.op("Transpose", x, perm=[1, 0, 2]) if model.batch_first else x
    shape = g.op("Shape", x)
    batch = g.op("Gather", shape, g.const(np.array([0 if model.batch_first else 1]), "index", dtype=np.int64), axis=0)
    state_shape = g.op("Concat", batch, g.ints([S]), axis=0)
    def zeros():  # made only where used: onnxruntime warns of an initializer no node reads
        return g.const(np.zeros((1, S), np.float32), "zeros")

    h0 = g.op("Expand", initial_state or zeros(), state_shape)
    ts = g.op("Expand", timespans or g.const(np.ones((1, 1), np.float32), "ones"), g.op("Slice", shape, g.ints([0]), g.ints([2])))
    if model.batch_first:
        ts = g.op("Transpose", ts, perm=[1, 0])
    ts = g.op("Unsqueeze", ts, g.ints([2]))  # (T, B, 1)

    states_in, scan_inputs = [h0], []
    if lstm is not None:
        states_in.append(g.op("Expand", initial_memory or zeros(), state_shape))
        scan_inputs.append(lstm.project(g, time_major))
    if lstm is None or model.memory_circuit == "state":
        scan_inputs.append(cell.project(g, time_major))
    scan_inputs.append(ts)

    body = _Graph(root=g, prefix=g.fresh("body") + "_")
    names = [body.fresh(n) for n in ["h_in"] + (["c_in"] if lstm else []) + [f"x{i}_t" for i in range(len(scan_inputs) - 1)] + ["ts_t"]]
    projected = names[2 if lstm else 1 : -1]
    out, h, c = _step(body, model, cell, lstm, projected, names[0], names[1] if lstm else None, names[-1])
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


def _step(g, model, cell, lstm, projected, h, c, ts):
    """One step of the model from its projected inputs (the LSTM's, then the cell's, as
    ``_projections`` makes them): (output before ``fc``, new h, new c or None)."""
    if lstm is not None:
        memory_out, c = lstm.step(g, projected[0], h, c)
        if model.memory_circuit == "state":
            h, u = memory_out, projected[1]
        else:
            u = cell.project(g, memory_out)
    else:
        u = projected[0]
    out, h = cell.step(g, u, h, ts)
    return out, h, c


def _one_step(g, model, x, h, c, ts):
    """The step graph's nodes: x (B, I), h and c (B, S), ts (B, 1) -> (output, h, c)."""
    cell, lstm = _exporters(model)
    projected = ([lstm.project(g, x)] if lstm else []) + ([cell.project(g, x)] if lstm is None or model.memory_circuit == "state" else [])
    out, h, c = _step(g, model, cell, lstm, projected, h, c, ts)
    if model.fc is not None:
        out = g.linear(out, _np(model.fc.weight), _np(model.fc.bias))
    return out, h, c


def _activation(g, name, x):
    if isinstance(name, dict):  # an activation layer's spec
        from ncps_mlx.layers import layer_from_config

        return _plain_layer(g, layer_from_config(name), x)
    if name in (None, "linear"):
        return x
    simple = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softplus": "Softplus", "softsign": "Softsign",
              "elu": "Elu", "selu": "Selu", "exponential": "Exp"}
    if name in simple:
        return g.op(simple[name], x)
    if name == "softmax":
        return g.op("Softmax", x, axis=-1)
    if name == "relu6":
        return g.op("Clip", x, g.const(0.0), g.const(6.0))
    if name == "hard_sigmoid":
        return g.op("HardSigmoid", x, alpha=1 / 6, beta=0.5)
    if name in ("silu", "swish"):
        return g.op("Mul", x, g.sigmoid(x))
    if name == "lecun_tanh":
        return g.op("Mul", g.const(1.7159), g.tanh(g.op("Mul", x, g.const(0.666))))
    if name == "gelu":  # exact (erf) GELU, as mlx.nn.gelu and torch.nn.GELU
        erf = g.op("Erf", g.op("Mul", x, g.const(1 / math.sqrt(2))))
        return g.op("Mul", g.op("Mul", x, g.const(0.5)), g.op("Add", erf, g.const(1.0)))
    raise ValueError(f"cannot export activation {name!r} to ONNX")


# --- a converted Keras graph -----------------------------------------------------------------


def _reverse_time(g, x, batch_first=True):
    return g.op("Slice", x, g.ints([-1]), g.ints([-(2**62)]), g.ints([1 if batch_first else 0]), g.ints([-1]))


def _rnn(g, layer, x):
    """An ``ncps_mlx.layers.RNN``: [output] or [output, *states] in Keras's order."""
    model = layer.model
    if layer.go_backwards:
        x = _reverse_time(g, x, model.batch_first)
    y, h, c = _sequence(g, model, x)
    if not layer.return_state:
        return [y]
    return [y, c, h] if c is not None else [y, h]


def _channels_first(g, x, op_type, weights=(), **attrs):
    """Conv/pooling: Keras is channels-last, ONNX channels-first."""
    rank = len(attrs["kernel_shape"])
    y = g.op(op_type, g.op("Transpose", x, perm=[0, rank + 1, *range(1, rank + 1)]), *weights, **attrs)
    return g.op("Transpose", y, perm=[0, *range(2, rank + 2), 1])


def _conv(g, layer, x):
    from ncps_mlx.layers import Conv, Pooling

    args = layer.get_config()
    if isinstance(layer, Pooling):
        kernel, strides = args["pool_size"], args["strides"]
        attrs = {"kernel_shape": kernel, "strides": strides, "auto_pad": "SAME_UPPER" if args["padding"] == "same" else "VALID"}
        if args["kind"] == "average":
            attrs["count_include_pad"] = 0
        return _channels_first(g, x, "MaxPool" if args["kind"] == "max" else "AveragePool", **attrs)
    assert isinstance(layer, Conv)
    kernel = args["kernel_size"]
    weight = np.moveaxis(_np(layer.weight), -1, 1)  # (F, *k, C) -> (F, C, *k)
    weights = [g.const(weight, "weight")] + ([g.const(_np(layer.bias), "bias")] if "bias" in layer else [])
    attrs = {"kernel_shape": kernel, "strides": args["strides"], "dilations": args["dilation_rate"], "weights": weights}
    if args["padding"] == "same":
        attrs["auto_pad"] = "SAME_UPPER"  # TensorFlow's: the extra padding after
    elif args["padding"] == "causal":
        attrs["pads"] = [(kernel[0] - 1) * args["dilation_rate"][0], 0]
    y = _channels_first(g, x, "Conv", **attrs)
    return _activation(g, args["activation"], y)


def _layer(g, layer, inputs):
    """Nodes for one call of a graph layer; returns its output value names."""
    from ncps_mlx import layers as L

    if getattr(layer, "makes_mask", False):
        raise ValueError("a graph with Keras masks (Masking, Embedding(mask_zero=True)) does not export to ONNX")
    if isinstance(layer, L.Merge):
        kind = layer.get_config()["kind"]
        if kind == "Concatenate":
            return [g.op("Concat", *inputs, axis=layer.get_config()["axis"])]
        if kind == "Average":
            return [g.op("Div", g.op("Sum", *inputs), g.const(float(len(inputs))))]
        op = {"Add": "Sum", "Subtract": "Sub", "Multiply": "Mul", "Maximum": "Max", "Minimum": "Min"}[kind]
        if op in ("Sub", "Mul"):
            result = inputs[0]
            for other in inputs[1:]:
                result = g.op(op, result, other)
            return [result]
        return [g.op(op, *inputs)]
    (x,) = inputs
    if isinstance(layer, L.RNN):
        return _rnn(g, layer, x)
    if isinstance(layer, L.Bidirectional):
        y_forward, *forward_states = _rnn(g, layer.forward, x)
        y_backward, *backward_states = _rnn(g, layer.backward, x)
        if layer.forward.model.return_sequences:
            y_backward = _reverse_time(g, y_backward)
        mode = layer.merge_mode
        if mode == "concat":
            y = g.op("Concat", y_forward, y_backward, axis=-1)
        elif mode == "ave":
            y = g.op("Div", g.op("Add", y_forward, y_backward), g.const(2.0))
        else:
            y = g.op("Add" if mode == "sum" else "Mul", y_forward, y_backward)
        return [y, *forward_states, *backward_states] if layer.return_state else [y]
    if isinstance(layer, L.TimeDistributed):
        shape = g.op("Shape", x)
        flat = g.op("Reshape", x, g.op("Concat", g.ints([-1]), g.op("Slice", shape, g.ints([2]), g.ints([2**62])), axis=0))
        (y,) = _layer(g, layer.layer, [flat])
        rest = g.op("Slice", g.op("Shape", y), g.ints([1]), g.ints([2**62]))
        return [g.op("Reshape", y, g.op("Concat", g.op("Slice", shape, g.ints([0]), g.ints([2])), rest, axis=0))]
    return [_plain_layer(g, layer, x)]


def _plain_layer(g, layer, x):
    from ncps_mlx import layers as L

    args = layer.get_config()
    if isinstance(layer, L.Dense):
        bias = _np(layer.linear.bias) if "bias" in layer.linear else None
        return _activation(g, layer.activation, g.linear(x, _np(layer.linear.weight), bias))
    if isinstance(layer, L.Activation):
        return _activation(g, layer.activation, x)
    if isinstance(layer, L.ReLU):
        threshold = g.const(args["threshold"])
        y = g.op("Where", g.op("GreaterOrEqual", x, threshold), x, g.op("Mul", g.const(args["negative_slope"]), g.op("Sub", x, threshold)))
        return y if args["max_value"] is None else g.op("Min", y, g.const(args["max_value"]))
    if isinstance(layer, L.LeakyReLU):
        return g.op("LeakyRelu", x, alpha=args["negative_slope"])
    if isinstance(layer, L.ELU):
        return g.op("Elu", x, alpha=args["alpha"])
    if isinstance(layer, L.Softmax):
        return g.op("Softmax", x, axis=args["axis"])
    if isinstance(layer, L.Identity):
        return g.op("Identity", x)
    if isinstance(layer, L.Rescaling):
        scale, offset = (g.const(np.asarray(args[k], np.float32)) for k in ("scale", "offset"))
        return g.op("Add", g.op("Mul", x, scale), offset)
    if isinstance(layer, L.Flatten):
        return g.op("Flatten", x, axis=1)
    if isinstance(layer, L.Reshape):
        batch = g.op("Slice", g.op("Shape", x), g.ints([0]), g.ints([1]))
        return g.op("Reshape", x, g.op("Concat", batch, g.ints(args["target_shape"]), axis=0))
    if isinstance(layer, L.Permute):
        return g.op("Transpose", x, perm=[0, *args["dims"]])
    if isinstance(layer, L.RepeatVector):
        return g.op("Expand", g.op("Unsqueeze", x, g.ints([1])), g.ints([1, args["n"], 1]))
    if isinstance(layer, L.Normalization):
        scale = np.maximum(np.sqrt(_np(layer.variance)), np.float32(args["epsilon"]))
        return g.op("Div", g.op("Sub", x, g.const(_np(layer.mean))), g.const(scale))
    if isinstance(layer, L.BatchNormalization):
        inv = (1 / np.sqrt(_np(layer.moving_variance) + np.float32(args["epsilon"]))).astype(np.float32)
        inv = inv * _np(layer.gamma) if "gamma" in layer else inv
        shift = -_np(layer.moving_mean) * inv + (_np(layer.beta) if "beta" in layer else 0)
        inv, shift = g.const(inv), g.const(shift.astype(np.float32))
        axis = args["axis"]
        if axis != -1:  # (F,) -> (F, 1, ..., 1): a positive axis counts up to the rank, known at run time
            if axis < 0:
                ones = g.ints([1] * (-1 - axis))
            else:
                rank = g.op("Reshape", g.op("Size", g.op("Shape", x)), g.ints([1]))
                ones = g.op("ConstantOfShape", g.op("Sub", rank, g.ints([axis + 1])), value=_int64_one())
            shape = g.op("Concat", g.ints([-1]), ones, axis=0)
            inv, shift = g.op("Reshape", inv, shape), g.op("Reshape", shift, shape)
        return g.op("Add", g.op("Mul", x, inv), shift)
    if isinstance(layer, L.LayerNormalization):
        features = args["features"]
        scale = _np(layer.gamma) if "gamma" in layer else np.ones(features, np.float32)
        bias = _np(layer.beta) if "beta" in layer else np.zeros(features, np.float32)
        return g.op("LayerNormalization", x, g.const(scale), g.const(bias), axis=-1, epsilon=args["epsilon"])
    if isinstance(layer, L.Embedding):
        return g.op("Gather", g.const(_np(layer.embeddings), "embeddings"), g.op("Cast", x, to=7), axis=0)  # 7: int64
    if isinstance(layer, L.GlobalPooling):
        axes = list(range(1, 1 + args["rank"]))
        return g.op("ReduceMax" if args["kind"] == "max" else "ReduceMean", x, axes=axes, keepdims=int(args["keepdims"]))
    if isinstance(layer, (L.Conv, L.Pooling)):
        return _conv(g, layer, x)
    raise ValueError(f"cannot export a {type(layer).__name__} layer to ONNX")


def _int64_one():
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ones(1, np.int64))


def _graph_output_shapes(graph) -> list:
    """Each output's shape, None where it follows the batch or a free input size: the graph
    run at two sizes (zeros), dims that differ are free."""
    import mlx.core as mx

    def run(batch, free):
        xs = []
        for spec in graph.input_specs:
            shape = [batch] + [free if d is None else int(d) for d in spec.get("shape") or [None, None]]
            integer = str(spec.get("dtype", "float32")).startswith(("int", "uint"))
            xs.append(mx.zeros(shape, dtype=mx.int32 if integer else mx.float32))
        out = graph(*xs)
        return out if isinstance(out, list) else [out]

    return [[a if a == b else None for a, b in zip(x.shape, y.shape)] for x, y in zip(run(1, 5), run(2, 6))]


def _graph(g, graph):
    """Inputs and outputs (value infos) of a Graph, its nodes added to ``g``: one ONNX input
    per Keras input and one output per Keras output, named after them."""
    from onnx import TensorProto, helper

    from ncps_mlx.graph import Graph

    assert isinstance(graph, Graph)
    dtypes = {"int32": TensorProto.INT32, "int64": TensorProto.INT64}
    inputs, values = [], {}
    for k, spec in enumerate(graph.input_specs):
        declared = spec.get("shape") or [None, None]
        dims = ["batch"] + [f"{spec['name']}_{i + 1}" if d is None else int(d) for i, d in enumerate(declared)]
        inputs.append(helper.make_tensor_value_info(spec["name"], dtypes.get(str(spec.get("dtype")), TensorProto.FLOAT), dims))
        values[("input", k)] = spec["name"]
    config = graph.get_config()
    for c, call in enumerate(config["calls"]):
        results = _layer(g, graph.layers[call["layer"]], [values[tuple(ref)] for ref in call["inputs"]])
        for j, name in enumerate(results):
            values[(c, j)] = name
    outputs = []
    for output, shape in zip(config["outputs"], _graph_output_shapes(graph)):
        g.nodes.append(helper.make_node("Identity", [values[tuple(output["ref"])]], [output["name"]]))
        outputs.append(_value(output["name"], ["batch" if i == 0 else d for i, d in enumerate(shape)]))
    return inputs, outputs


SEQUENCE_INPUTS = ("initial_state", "initial_memory", "timespans")


def _checked_inputs(model, inputs, step):
    inputs = list(dict.fromkeys(inputs or ()))
    allowed = [n for n in SEQUENCE_INPUTS if n != "initial_memory" or model.use_mixed]
    unknown = [n for n in inputs if n not in allowed]
    if unknown:
        raise ValueError(f"unknown ONNX input(s) {unknown} for this model; choose from {allowed}")
    if step and set(inputs) - {"timespans"}:
        raise ValueError("the step graph always takes state (and memory) as inputs; inputs= may only add 'timespans'")
    return inputs


def build_onnx(model, inputs=(), step: bool = False):
    """The ``onnx.ModelProto`` for ``model``: a CfC, LTC, CTRNN, CTGRU, or a converted Keras
    ``Graph`` (its inputs and outputs named as in the Keras model). ``inputs`` and ``step``
    as in ``export_onnx``."""
    try:
        from onnx import helper
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'ncps-mlx[onnx]'") from None
    from ncps_mlx.graph import Graph

    g = _Graph()
    if isinstance(model, Graph):
        if inputs or step:
            raise ValueError("a converted Keras graph exports with the Keras model's own inputs; inputs= and step= do not apply")
        graph_inputs, outputs = _graph(g, model)
        kind = "graph"
    else:
        inputs = _checked_inputs(model, inputs, step)
        S, I = model.state_size, model.input_size
        out_features = model.fc.weight.shape[0] if model.fc is not None else model.rnn_cell.output_size
        mixed = model.use_mixed
        if step:
            graph_inputs = [_value("input", ["batch", I]), _value("state", ["batch", S])]
            graph_inputs += [_value("memory", ["batch", S])] if mixed else []
            if "timespans" in inputs:
                graph_inputs.append(_value("timespan", ["batch"]))
                ts = g.op("Unsqueeze", "timespan", g.ints([1]))
            else:
                ts = g.const(np.ones((1, 1), np.float32), "ones")
            y, h, c = _one_step(g, model, "input", "state", "memory" if mixed else None, ts)
            names = ["output", "next_state"] + (["next_memory"] if mixed else [])
            shapes = [["batch", out_features], ["batch", S], ["batch", S]]
            kind = "step"
        else:
            layout = ["batch", "time"] if model.batch_first else ["time", "batch"]
            graph_inputs = [_value("input", layout + [I])]
            shapes_in = {"initial_state": ["batch", S], "initial_memory": ["batch", S], "timespans": layout}
            graph_inputs += [_value(name, shapes_in[name]) for name in SEQUENCE_INPUTS if name in inputs]
            given = {name: (name if name in inputs else None) for name in SEQUENCE_INPUTS}
            y, h, c = _sequence(g, model, "input", given["initial_state"], given["initial_memory"] if mixed else None, given["timespans"])
            names = ["output", "state"] + (["memory"] if mixed else [])
            out_shape = (layout if model.return_sequences else ["batch"]) + [out_features]
            shapes = [out_shape, ["batch", S], ["batch", S]]
            kind = "sequence"
        outputs = []
        for value, name, shape in zip((y, h, c), names, shapes):
            g.nodes.append(helper.make_node("Identity", [value], [name]))
            outputs.append(_value(name, shape))

    graph = helper.make_graph(g.nodes, type(model).__name__, graph_inputs, outputs, initializer=g.initializers)
    proto = helper.make_model(
        graph, producer_name="ncps-mlx", opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    helper.set_model_props(
        proto,
        {
            "ncps_mlx_config": json.dumps(model.get_config()),
            "ncps_mlx_version": __version__,
            "ncps_mlx_graph": kind,
            "time_loop": "Scan" if kind != "step" else "none: one step a call",
        },
    )
    return proto


def export_onnx(model, path, check: bool = True, inputs=(), step: bool = False) -> Path:
    """Write ``model`` as ONNX to ``path`` atomically; returns the path.

    ``inputs``: optional inputs made real graph inputs (listed by onnxruntime's
    ``get_inputs()``): any of "initial_state", "initial_memory" (mixed memory) and "timespans".
    Those left out are constants: zeros, and a timespan of 1. ``step``: the one-step graph for
    streaming (``input`` (B, I), ``state`` (B, S)[, ``memory``][, ``timespan`` (B,) with
    inputs=["timespans"]] -> ``output`` (B, F), ``next_state``[, ``next_memory``]) instead of
    the sequence. With ``check`` the graph goes through ``onnx.checker.check_model(full_check=True)``.
    """
    import onnx

    from .modelfile import write_atomically

    proto = build_onnx(model, inputs=inputs, step=step)
    if check:
        onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    write_atomically(path, lambda tmp: Path(tmp).write_bytes(proto.SerializeToString()))
    return path
