"""A CfC's loop in ``cfc.c``: the host side, and for a CfC with a backbone an MLX custom function
with its vjp."""

from __future__ import annotations

import ctypes
import functools
import threading

import mlx.core as mx
import numpy as np

from .. import blas
from . import as_host, cfc_applies, library, pointer, run_rows


class _CfCArguments(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int32), ("steps", ctypes.c_int32), ("hidden", ctypes.c_int32), ("units", ctypes.c_int32),
        ("layers", ctypes.c_int32), ("mode", ctypes.c_int32), ("activation", ctypes.c_int32), ("ff_tanh", ctypes.c_int32),
        ("heads", ctypes.c_int32),
        ("inputs", ctypes.c_void_p), ("timespans", ctypes.c_void_p), ("state_weight", ctypes.c_void_p),
        ("hidden_weights", ctypes.POINTER(ctypes.c_void_p)), ("hidden_biases", ctypes.POINTER(ctypes.c_void_p)),
        ("head_weight", ctypes.c_void_p), ("head_bias", ctypes.c_void_p), ("w_tau", ctypes.c_void_p), ("A", ctypes.c_void_p),
        ("sgemm", ctypes.c_void_p),
    ]  # fmt: skip


def _addresses(arrays):
    """A C array of the data addresses of host arrays (NULL for None), for a pointer-array field."""
    arrays = [None if a is None else a.ctypes.data for a in arrays]
    return (ctypes.c_void_p * max(1, len(arrays)))(*arrays)


def _over_columns(call, batch):
    """``run_rows`` for the CfC kernels: each block of columns on one core (the BLAS is
    single-threaded)."""
    return run_rows(call, batch)


CFC_MODES = {"default": 0, "pure": 1, "no_gate": 2}
CFC_ACTIVATIONS = {"lecun_tanh": 0, "tanh": 1, "relu": 2, "silu": 3, "gelu": 4}


def cfc_states(inputs, initial, timespans, mode, activation, ff_tanh, state_weight, hidden, head_weight, head_bias,
               w_tau=None, A=None, differentiable=False):  # fmt: skip
    """Every step's state of a CfCCell with a backbone, feature-major.

    inputs (T, units, B): the input half of the first backbone layer, bias included
    (``CfCCell.project_input``'s (B, T, units) view, transposed back); initial (H, B);
    timespans None (1.0 a step), 0-d or (B, T, 1); state_weight (units, H); hidden: (weight
    (units, units), bias (units,)) of backbone layers 2..n; head_weight (K, units) and head_bias
    (K,), the heads fused in the order ff1, ff2, time_a, time_b (pure mode: ff1 alone); w_tau, A
    (H,) in pure mode. -> (T, H, B).

    Without timespans the time gate's two heads are one, time_a + time_b, as in the MLX path:
    a quarter of the heads' product less. ``differentiable``: an MLX custom function whose vjp
    is the kernel's backward pass (not pure mode), else the forward pass alone, evaluated.

    The batch's columns are split over the cores, each block a sequence of matrix products on
    one BLAS thread."""
    steps, units, batch = inputs.shape
    if timespans is None and mode != "pure":
        head_weight = _fused_gate(head_weight, state_weight.shape[1])
        head_bias = _fused_gate(head_bias, state_weight.shape[1])
    ts = _by_step(timespans, steps, batch)
    arrays = [inputs, initial] + ([] if ts is None else [ts]) + [state_weight, head_weight, head_bias]
    arrays += [a for layer in hidden for a in layer] + ([w_tau, A] if mode == "pure" else [])
    key = (mode, activation, bool(ff_tanh), ts is not None, len(hidden))
    if differentiable:
        _check_gated(mode)
        return _cfc_function(*key)(*arrays)[0]
    return mx.array(_CfCRun(key, arrays).forward())


class _CfCRun:
    """The CfC kernel's arguments for one call, from ``cfc_states``' arrays (host copies kept)."""

    def __init__(self, key, arrays):
        mode, activation, ff_tanh, timed, n_hidden = key
        host = [as_host(a) for a in arrays]
        inputs, initial = host[:2]
        rest = host[2:]
        ts = rest.pop(0) if timed else None
        state_weight, head_weight, head_bias = rest[:3]
        hidden = [(rest[3 + 2 * i], rest[4 + 2 * i]) for i in range(n_hidden)]
        pure = rest[3 + 2 * n_hidden :] if mode == "pure" else [None, None]
        self.host, self.hidden, self.initial = host, hidden, initial
        self.shape = (inputs.shape[0], state_weight.shape[1], inputs.shape[2], inputs.shape[1], head_weight.shape[0])
        self.arguments = _CfCArguments(
            inputs.shape[2], inputs.shape[0], state_weight.shape[1], inputs.shape[1], n_hidden + 1, CFC_MODES[mode],
            CFC_ACTIVATIONS[activation], int(ff_tanh), head_weight.shape[0], pointer(inputs),
            pointer(ts) if ts is not None else None, pointer(state_weight), _addresses(w for w, _ in hidden),
            _addresses(b for _, b in hidden), pointer(head_weight), pointer(head_bias),
            *(pointer(a) if a is not None else None for a in pure), blas.sgemm_address(),
        )  # fmt: skip

    def forward(self, keep=False):
        """Every step's state (T, H, B); with ``keep`` also the residuals that spare
        ``backward`` recomputing each step's products, (T, layers x units + K, B)."""
        steps, hidden_size, batch, units, heads = self.shape
        states = np.empty((steps, hidden_size, batch), np.float32)
        residuals = np.empty((steps, (len(self.hidden) + 1) * units + heads, batch), np.float32) if keep else None

        def columns(first, last):
            scratch = np.empty((hidden_size + 2 * units + heads) * (last - first), np.float32)
            library().cfc_forward(ctypes.byref(self.arguments), pointer(self.initial), pointer(states),
                                  pointer(residuals) if keep else None, first, last, pointer(scratch))  # fmt: skip

        _over_columns(columns, batch)
        return (states, residuals) if keep else states

    def residual_bytes(self) -> int:
        steps, _, batch, units, heads = self.shape
        return 4 * steps * batch * ((len(self.hidden) + 1) * units + heads)

    def backward(self, states, d_states, residuals=None):
        """(d inputs, d initial, d timespans or None, d state weight, d head weight, d head
        bias, then d weight and d bias of each hidden layer), host arrays."""
        steps, hidden_size, batch, units, heads = self.shape
        states, d_states = as_host(states), as_host(d_states)
        residuals = None if residuals is None else as_host(residuals)
        layers = len(self.hidden) + 1
        d_inputs = np.empty((steps, units, batch), np.float32)
        d_initial = np.empty((hidden_size, batch), np.float32)
        d_timespans = np.empty((steps, batch), np.float32) if self.arguments.timespans else None

        def columns(first, last):
            shapes = [(units, hidden_size), (heads, units), (heads,)] + [(units, units), (units,)] * len(self.hidden)
            grads = [np.zeros(shape, np.float32) for shape in shapes]
            scratch = np.empty((2 * hidden_size + (2 * layers + 1) * units + 2 * heads + 1) * (last - first), np.float32)
            library().cfc_backward(
                ctypes.byref(self.arguments), pointer(self.initial), pointer(states),
                pointer(residuals) if residuals is not None else None, pointer(d_states),
                pointer(d_inputs), pointer(d_initial), pointer(d_timespans) if d_timespans is not None else None,
                pointer(grads[0]), _addresses(grads[3::2]), _addresses(grads[4::2]), pointer(grads[1]),
                pointer(grads[2]), first, last, pointer(scratch),
            )  # fmt: skip
            return grads

        parts = _over_columns(columns, batch)
        summed = [functools.reduce(np.add, grads) for grads in zip(*parts)]
        return [d_inputs, d_initial, d_timespans] + summed


# The forward pass keeps each step's pre-activations and head outputs for the backward pass when
# they take at most this many bytes (W6, batch 1024 x 50: 66 MB); beyond, the backward pass
# recomputes them. They stay host arrays, found through a token the custom function returns:
# returned as MLX arrays they were copied and paged in. W6 forward+backward, alternating: 147-152
# ms recomputing, 163-174 keeping them as MLX arrays, 131-139 this way. A forward pass that is
# never differentiated leaves its residuals; beyond KEEP the oldest go, and a backward pass that
# finds its residuals gone recomputes.
KEEP_BYTES = 256 << 20
KEEP = 4
_KEPT_LOCK = threading.Lock()
_kept: dict = {}
_tokens = [0]


def _keep(residuals) -> mx.array:
    with _KEPT_LOCK:
        _tokens[0] += 1
        _kept[_tokens[0]] = residuals
        while len(_kept) > KEEP:
            _kept.pop(next(iter(_kept)))
        return mx.array(_tokens[0])


def _kept_residuals(token):
    with _KEPT_LOCK:
        return _kept.pop(int(token.item()), None)


@functools.lru_cache(maxsize=None)
def _cfc_function(mode, activation, ff_tanh, timed, n_hidden):
    """The CfC kernel as an MLX custom function of ``cfc_states``' arrays, with its vjp: ->
    (states, a token for the residuals kept, or -1)."""
    key = (mode, activation, ff_tanh, timed, n_hidden)

    @mx.custom_function
    def states(*arrays):
        run = _CfCRun(key, arrays)
        if run.residual_bytes() > KEEP_BYTES:
            return mx.array(run.forward()), mx.array(-1)
        states, residuals = run.forward(keep=True)
        return mx.array(states), _keep(residuals)

    @states.vjp
    def states_vjp(primals, cotangents, outputs):
        residuals = _kept_residuals(outputs[1])
        d_inputs, d_initial, d_timespans, *d_weights = _CfCRun(key, primals).backward(outputs[0], cotangents[0], residuals)
        d_state_weight, d_head_weight, d_head_bias, *d_hidden = d_weights
        grads = [d_inputs, d_initial] + ([d_timespans] if timed else []) + [d_state_weight, d_head_weight, d_head_bias]
        return tuple(mx.array(g) for g in grads + d_hidden)

    return states


class _WiredArguments(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int32), ("steps", ctypes.c_int32), ("layers", ctypes.c_int32), ("mode", ctypes.c_int32),
        ("ff_tanh", ctypes.c_int32), ("sizes", ctypes.POINTER(ctypes.c_int32)), ("heads", ctypes.POINTER(ctypes.c_int32)),
        ("inputs", ctypes.c_void_p), ("timespans", ctypes.c_void_p), ("input_weights", ctypes.POINTER(ctypes.c_void_p)),
        ("biases", ctypes.POINTER(ctypes.c_void_p)), ("state_weights", ctypes.POINTER(ctypes.c_void_p)),
        ("w_tau", ctypes.POINTER(ctypes.c_void_p)), ("A", ctypes.POINTER(ctypes.c_void_p)), ("sgemm", ctypes.c_void_p),
    ]  # fmt: skip


def _check_gated(mode):
    if mode == "pure":
        raise ValueError("The CfC kernels have no backward pass for pure mode: run it on MLX's path")


def _by_step(timespans, steps, batch):
    """None, or timespans (0-d or (B, T, 1)) as a (T, B) array, the kernels' layout."""
    if timespans is None:
        return None
    return mx.broadcast_to(timespans.reshape(timespans.shape[:2]).T if timespans.ndim == 3 else timespans, (steps, batch))


def _fused_gate(rows, hidden_size, axis=0):
    """Head rows ff1, ff2, time_a, time_b (4H along ``axis``) -> ff1, ff2, time_a + time_b."""
    H = hidden_size

    def part(start, stop):
        return rows[(slice(None),) * axis + (slice(start, stop),)]

    return mx.concatenate([part(0, 2 * H), part(2 * H, 3 * H) + part(3 * H, 4 * H)], axis=axis)


def wired_cfc_states(inputs, initial, timespans, mode, ff_tanh, layers, differentiable=False):
    """Every step's state of a wired CfC (or a CfCCell without a backbone: one layer),
    feature-major.

    inputs (T, K_0, B): layer 0's input product, bias included (``project_input``'s view,
    transposed back); initial (S, B), the layers' states stacked; timespans None, 0-d or
    (B, T, 1); layers: per layer (input weight (K, H_prev) and bias (K,), None for layer 0;
    state weight (K, H); w_tau and A (H,) in pure mode, else None), the heads in the order ff1,
    ff2, time_a, time_b (K = 4H; pure mode ff1 alone). -> (T, S, B). Without timespans the time
    gate's two heads are fused, as in ``cfc_states``. ``differentiable``: an MLX custom function
    whose vjp is the kernel's backward pass (not pure mode), else the forward pass, evaluated."""
    steps, _, batch = inputs.shape
    sizes = [int(layer[2].shape[1]) for layer in layers]
    if timespans is None and mode != "pure":
        inputs = _fused_gate(inputs, sizes[0], axis=1)
        layers = [(None if w is None else _fused_gate(w, H), None if b is None else _fused_gate(b, H), _fused_gate(s, H), tau, A)
                  for (w, b, s, tau, A), H in zip(layers, sizes)]  # fmt: skip
    ts = _by_step(timespans, steps, batch)
    arrays = [inputs, initial] + ([] if ts is None else [ts])
    for i, (w, b, state_weight, tau, A) in enumerate(layers):
        arrays += [state_weight] + ([w, b] if i > 0 else []) + ([tau, A] if mode == "pure" else [])
    key = (mode, bool(ff_tanh), ts is not None, len(layers))
    if differentiable:
        _check_gated(mode)
        return _wired_function(*key)(*arrays)
    return mx.array(_WiredRun(key, arrays).forward())


class _WiredRun:
    """The wired CfC kernel's arguments for one call, from ``wired_cfc_states``' arrays."""

    def __init__(self, key, arrays):
        mode, ff_tanh, timed, n_layers = key
        host = [as_host(a) for a in arrays]
        inputs, initial, *rest = host
        ts = rest.pop(0) if timed else None
        layers = []  # (input weight, bias, state weight, w_tau, A)
        for i in range(n_layers):
            state_weight = rest.pop(0)
            w, b = (rest.pop(0), rest.pop(0)) if i > 0 else (None, None)
            tau, A = (rest.pop(0), rest.pop(0)) if mode == "pure" else (None, None)
            layers.append((w, b, state_weight, tau, A))
        self.host, self.layers, self.initial = host, layers, initial
        self.sizes = [int(layer[2].shape[1]) for layer in layers]
        self.heads = [int(layer[2].shape[0]) for layer in layers]
        self.steps, self.batch = inputs.shape[0], inputs.shape[2]

        self.arguments = _WiredArguments(
            self.batch, self.steps, n_layers, CFC_MODES[mode], int(ff_tanh), (ctypes.c_int32 * n_layers)(*self.sizes),
            (ctypes.c_int32 * n_layers)(*self.heads), pointer(inputs), pointer(ts) if ts is not None else None,
            *(_addresses(layer[i] for layer in layers) for i in range(5)), blas.sgemm_address(),
        )  # fmt: skip

    def forward(self) -> np.ndarray:
        states = np.empty((self.steps, sum(self.sizes), self.batch), np.float32)

        def columns(first, last):
            scratch = np.empty((sum(self.sizes) + max(self.heads)) * (last - first), np.float32)
            library().wired_cfc_forward(ctypes.byref(self.arguments), pointer(self.initial), pointer(states), first, last,
                                        pointer(scratch))  # fmt: skip

        _over_columns(columns, self.batch)
        return states

    def backward(self, states, d_states):
        """(d inputs, d initial, d timespans or None, then per layer d state weight and, after
        layer 0, d input weight and d bias), host arrays."""
        states, d_states = as_host(states), as_host(d_states)
        S = sum(self.sizes)
        d_inputs = np.empty((self.steps, self.heads[0], self.batch), np.float32)
        d_initial = np.empty((S, self.batch), np.float32)
        d_timespans = np.empty((self.steps, self.batch), np.float32) if self.arguments.timespans else None

        def columns(first, last):
            grads = []
            for i, (w, b, state_weight, _, _) in enumerate(self.layers):
                grads.append([np.zeros_like(state_weight)] + ([np.zeros_like(w), np.zeros_like(b)] if i > 0 else [None, None]))

            scratch = np.empty((4 * S + sum(self.heads) + max(self.heads) + 1) * (last - first), np.float32)
            library().wired_cfc_backward(
                ctypes.byref(self.arguments), pointer(self.initial), pointer(states), pointer(d_states), pointer(d_inputs),
                pointer(d_initial), pointer(d_timespans) if d_timespans is not None else None,
                *(_addresses(g[i] for g in grads) for i in (1, 2, 0)), first, last, pointer(scratch),
            )  # fmt: skip
            return [g for layer in grads for g in layer if g is not None]

        parts = _over_columns(columns, self.batch)
        return [d_inputs, d_initial, d_timespans] + [functools.reduce(np.add, grads) for grads in zip(*parts)]


@functools.lru_cache(maxsize=None)
def _wired_function(mode, ff_tanh, timed, n_layers):
    """The wired CfC kernel as an MLX custom function of ``wired_cfc_states``' arrays, with its
    vjp."""
    key = (mode, ff_tanh, timed, n_layers)

    @mx.custom_function
    def states(*arrays):
        return mx.array(_WiredRun(key, arrays).forward())

    @states.vjp
    def states_vjp(primals, cotangent, output):
        d_inputs, d_initial, d_timespans, *d_weights = _WiredRun(key, primals).backward(output, cotangent)
        grads = [d_inputs, d_initial] + ([d_timespans] if timed else []) + d_weights
        return tuple(mx.array(g) for g in grads)

    return states


def _kernel_applies(mode, differentiable, *arrays) -> bool:
    """Whether the CfC kernels run this loop: float32 arrays (None skipped), the kernels applying
    here, and under a gradient a gated mode (their backward passes are those modes')."""
    if differentiable and mode == "pure":
        return False
    return all(a.dtype == mx.float32 for a in arrays if a is not None) and cfc_applies()


def cfc_cell_sequence(cell, inputs, h, ts=None, differentiable=False):
    """A ``CfCCell``'s whole loop in the kernel: inputs (B, T, P) from ``project_input``, h (B, H),
    ts None, 0-d or (B, T, 1) -> (outputs, every step's state), both the same (B, T, H) view of
    a (T, H, B) array; None where the kernel does not apply: for arrays that are not float32,
    where ``cfc_applies()`` is False, and in pure mode under a gradient (only MLX's path has
    that backward pass)."""
    weight, _ = cell._first_layer()
    if not _kernel_applies(cell.mode, differentiable, inputs, h, weight, ts):
        return None
    state_weight, ff_tanh = weight[:, cell.input_size :], cell.ff_activation == "tanh"
    pure = (cell.w_tau.reshape(-1), cell.A.reshape(-1)) if cell.mode == "pure" else (None, None)
    if cell.backbone_layers == 0:  # the heads read [x; h]: a wired CfC of one layer
        states = wired_cfc_states(inputs.transpose(1, 2, 0), h.T, ts, cell.mode, ff_tanh,
                                  [(None, None, state_weight, *pure)], differentiable=differentiable)  # fmt: skip
    else:
        hidden = [(layer.weight, layer.bias) for layer in cell.backbone[1:]]
        states = cfc_states(inputs.transpose(1, 2, 0), h.T, ts, cell.mode, cell.activation_name, ff_tanh,
                            state_weight, hidden, *cell._heads(), *pure, differentiable=differentiable)  # fmt: skip
    y = states.transpose(2, 0, 1)
    return y, y


def wired_cfc_cell_sequence(cell, inputs, h, ts=None, differentiable=False):
    """``cfc_cell_sequence`` for a ``WiredCfCCell``: inputs (B, T, P), h (B, units) -> (outputs
    (B, T, F), every step's state (B, T, units)), views of one (T, units, B) array; None where
    the kernel does not apply (as there)."""
    first = cell.layer_0
    if not _kernel_applies(first.mode, differentiable, inputs, h, first.ff1.weight, ts):
        return None
    layers = []
    for i, layer in enumerate(cell.layers):
        weight, bias = layer._heads()
        width = layer.input_size
        pure = (layer.w_tau.reshape(-1), layer.A.reshape(-1)) if layer.mode == "pure" else (None, None)
        inputs_part = (None, None) if i == 0 else (weight[:, :width], bias)
        layers.append(inputs_part + (weight[:, width:],) + pure)
    states = wired_cfc_states(inputs.transpose(1, 2, 0), h.T, ts, first.mode, first.ff_activation == "tanh", layers,
                              differentiable=differentiable)  # fmt: skip
    start = sum(cell.layer_sizes[:-1])
    out = states[:, start : start + cell.output_size]
    return out.transpose(2, 0, 1), states.transpose(2, 0, 1)
