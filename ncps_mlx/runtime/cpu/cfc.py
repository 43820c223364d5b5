"""A CfC's loop in ``cfc.c``, as the ``CfCSequence`` and ``WiredCfCSequence`` primitives
(``primitives.cpp``)."""

from __future__ import annotations

import mlx.core as mx

from ...lowering import CfCLowering, Mode, WiredCfCLowering
from .. import blas
from . import now as at_once
from .loader import all_float32, by_row, cfc_applies, loaded
from .projection import features_first_projection

def cfc_states(x, initial, timespans, weights, memory=None, keep=None, input_circuit=False):
    """Every step's state of a CfCCell with a backbone, feature-major.

    x (B, T, I), the sequence: the kernel computes the first backbone layer's input half
    block by block; initial (B, H); timespans None (1.0 a step), 0-d or (B, T, 1); weights:
    ``_backbone_weights``' (the lowering's arrays in the kernel's order). -> (T, H, B). With
    ``memory`` (mixed memory, the "state" circuit: an LSTM before every step whose output
    replaces the state): (lstm inputs (T, 4H, B), initial memory (B, H), recurrent weight
    (4H, H), forget-gate bias) -> (states, every step's memory (T, H, B)). ``keep``: dropout,
    (T, layers - 1, units, B), each backbone layer's activation after the first times its entry.
    ``input_circuit``: mixed memory's "input" circuit, the LSTM's output is the first layer's
    input (``weights.input_half`` reads it), the state is left alone; x is not read.

    The batch's columns are split over the cores, each block a sequence of matrix products on
    one BLAS thread."""
    batch, steps = x.shape[:2]
    ts = None if timespans is None else by_row(timespans, batch, steps).T  # (T, B), the CfC kernels' layout
    x = _no_features(x) if input_circuit else x  # its shape only: the LSTM's input projection has read it
    outputs = weights.run(x, initial, ts, memory, keep, input_circuit, False)
    return outputs[0] if memory is None else (outputs[0], outputs[-1])


def _no_features(x, now: bool = False):
    """x (B, T, I) as (B, T, 0), its shape only (the kernel reads no x)."""
    empty = at_once.filled(x, (x.shape[0], x.shape[1], 0)) if now else None
    return x[..., :0] if empty is None else empty


class _BackboneWeights:
    """A backboned ``CfCLowering``'s arrays as ``cfc.c`` takes them, ``timed`` or not: without
    timespans the time gate's two heads are one, time_a + time_b, as in the MLX path (a quarter
    of the heads' product less). ``before_memory``: the state half of the first layer (units,
    H), the heads (K, units) and (K,) fused in the order ff1, ff2, time_a, time_b (pure mode:
    ff1 alone), the backbone layers 2..n as (weight, bias), pure mode's w_tau and A (H,);
    ``input_half``: the first layer's input half (units, I) and bias (units,)."""

    def __init__(self, cell: CfCLowering, timed: bool):
        head_weight, head_bias = cell.heads
        if not timed and cell.mode != Mode.PURE:
            head_weight, head_bias = _fused_gate(head_weight, cell.hidden_size), _fused_gate(head_bias, cell.hidden_size)
        self.before_memory = [cell.state_weight, head_weight, head_bias] + [a for layer in cell.hidden for a in layer]
        self.before_memory += [cell.w_tau, cell.A] if cell.mode == Mode.PURE else []
        self.input_half = [cell.first_weight[:, : cell.input_size], cell.first_bias]
        # Row-contiguous, as the kernels read them: slices would be copied by a node every call.
        self.before_memory, self.input_half = _contiguous(self.before_memory), _contiguous(self.input_half)
        self.mode, self.activation, self.ff_tanh, self.hidden_layers = cell.mode, cell.activation, bool(cell.ff_tanh), len(cell.hidden)
        self.options = (self.mode.kernel_id, self.activation.kernel_id, self.ff_tanh)

    def run(self, x, initial, ts, memory, keep, input_circuit, now):
        """``cfc_sequence``'s node (or its outputs at once) over these weights: x (B, T, I),
        initial (B, H), ts None or (T, B), memory as ``cfc_states`` takes it, keep None or
        (T, layers - 1, units, B)."""
        arrays = [x, initial] + ([] if ts is None else [ts]) + self.before_memory
        if memory is not None:
            arrays += memory[:3]
        arrays += self.input_half + ([] if keep is None else [keep])
        return loaded().cfc_sequence(arrays, *self.options, ts is not None, self.hidden_layers, memory is not None,
                                     0.0 if memory is None else float(memory[3]), keep is not None, bool(input_circuit),
                                     blas.sgemm_address(), now)


def _fused_gate(rows, hidden_size):
    """Head rows ff1, ff2, time_a, time_b (4H) -> ff1, ff2, time_a + time_b."""
    H = hidden_size
    return mx.concatenate([rows[: 2 * H], rows[2 * H : 3 * H] + rows[3 * H :]])


def _contiguous(arrays):
    return [None if a is None else mx.contiguous(a) for a in arrays]


def wired_cfc_states(inputs, initial, timespans, weights, memory=None, input_circuit=False):
    """Every step's state of a wired CfC (or a CfCCell without a backbone: one layer),
    feature-major.

    inputs (T, K_0, B): layer 0's input product, bias included (``_LayerWeights.project``);
    initial (B, S), the layers'
    states stacked; timespans None, 0-d or (B, T, 1); weights: ``_LayerWeights``'. -> (T, S, B).
    ``memory``: mixed memory over the S state rows, as in ``cfc_states`` -> (states, every step's
    memory (T, S, B)). ``input_circuit``: its "input" circuit, layer 0's input is the LSTM's
    output through ``weights``' layer-0 input weight (K_0, S); then ``inputs`` is (T, 0, B)."""
    steps, _, batch = inputs.shape
    ts = None if timespans is None else by_row(timespans, batch, steps).T  # (T, B), the CfC kernels' layout
    outputs = weights.run(inputs, initial, ts, memory, input_circuit, False)
    return outputs[0] if memory is None else (outputs[0], outputs[-1])


class _LayerWeights:
    """The layers of a wired CfC (or of a CfCCell without a backbone) as ``cfc.c`` takes them,
    ``timed`` or not. Per layer: its state weight (K, H), for layers after the first its input
    weight (K, H_prev) and bias (K,), pure mode's w_tau and A (H,); the heads in the order ff1,
    ff2, time_a, time_b (K = 4H; pure mode ff1 alone). Without timespans (``fused``) the time
    gate's two heads are one, as in ``_BackboneWeights``."""

    def __init__(self, layers, timed: bool):
        first = layers[0]
        self.mode, self.ff_tanh, self.layers = first.mode, bool(first.ff_tanh), len(layers)
        fused = not timed and self.mode != Mode.PURE
        fuse = (lambda rows, H: _fused_gate(rows, H)) if fused else (lambda rows, H: rows)
        width = first.input_size
        self.input_weight, self.input_bias = fuse(first.first_weight[:, :width], first.hidden_size), fuse(first.first_bias, first.hidden_size)
        self.arrays = []
        for i, layer in enumerate(layers):
            H, width = layer.hidden_size, layer.input_size
            self.arrays.append(fuse(layer.first_weight[:, width:], H))
            if i > 0:
                self.arrays += [fuse(layer.first_weight[:, :width], H), fuse(layer.first_bias, H)]
            self.arrays += [layer.w_tau, layer.A] if self.mode == Mode.PURE else []
        self.arrays = _contiguous(self.arrays)
        self.input_weight, self.input_bias = _contiguous([self.input_weight, self.input_bias])
        self.options = (self.mode.kernel_id, self.ff_tanh)

    def run(self, inputs, initial, ts, memory, input_circuit, now):
        """``wired_cfc_sequence``'s node (or its outputs at once) over these weights: inputs
        (T, K_0, B), initial (B, S), ts None or (T, B), memory None or (lstm inputs (T, 4S, B),
        memory (B, S), recurrent weight (4S, S), forget-gate bias)."""
        arrays = [inputs, initial] + ([] if ts is None else [ts]) + self.arrays
        if memory is not None:
            arrays += memory[:3]
        if input_circuit:
            arrays += [self.input_weight, self.input_bias]
        return loaded().wired_cfc_sequence(arrays, *self.options, ts is not None, self.layers, memory is not None,
                                           0.0 if memory is None else float(memory[3]), bool(input_circuit),
                                           blas.sgemm_address(), now)

    def project(self, x, now=False):
        """Layer 0's input product of the sequence x (B, T, I), bias included, as the kernel
        reads it: (T, K_0, B), its heads fused as these weights fuse them."""
        return loaded().input_projection(x, self.input_weight, self.input_bias, True, blas.sgemm_address(), now)


def _no_inputs(x, now=False):
    """(T, 0, B): the wired kernel's layer-0 inputs where it makes them itself (the "input"
    circuit), for their shape."""
    empty = at_once.filled(x, (x.shape[1], 0, x.shape[0])) if now else None
    return mx.zeros((x.shape[1], 0, x.shape[0]), x.dtype) if empty is None else empty


def _memory_arrays(memory, x, now=False):
    """Mixed memory's (LSTMLowering, memory (B, S)) for the sequence x as the kernels take it: (the
    LSTM's input projection (T, 4S, B), memory (B, S), recurrent weight (4S, S), forget-gate
    bias); None without."""
    if memory is None:
        return None
    lstm, c = memory
    recurrent = lstm.derived("contiguous recurrent", lambda: mx.contiguous(lstm.recurrent_weight))
    return features_first_projection(lstm, x, now), c, recurrent, lstm.forget_gate_bias


def _batch_major(states, memory, start=0, stop=None):
    """(outputs (features [start, stop)), states[, memories]) as (B, T, .) views of the
    kernels' (T, ., B) results."""
    states, memories = (states, None) if memory is None else states
    views = [states[:, start:stop].transpose(2, 0, 1), states.transpose(2, 0, 1)]
    return tuple(views + ([] if memories is None else [memories.transpose(2, 0, 1)]))


def _kernel_applies(*arrays) -> bool:
    """Whether the CfC kernels run this loop: float32 arrays (None skipped), the kernels applying here."""
    return all_float32(*arrays) and cfc_applies()


def cfc_sequence(cell: CfCLowering, x, h, ts=None, memory=None, keep=None, memory_circuit="state"):
    """A ``CfCCell``'s whole loop in the kernel, from its lowering: the sequence x (B, T, I),
    h (B, H), ts None, 0-d or (B, T, 1) -> (outputs, every step's state), both (B, T, H) (views
    of a (T, H, B) array); None where the kernel does not apply: for arrays that are not
    float32, and where ``cfc_applies()`` is False. ``memory``: (LSTMLowering, memory (B, H)),
    mixed memory's "state" circuit: -> (outputs, states, every step's memory (B, T, H)).
    ``memory_circuit`` "input": mixed memory's other circuit (the LSTM's output is the cell's
    input), with a backbone. ``keep``: dropout masks (T, layers - 1, B, units), as
    ``CfCCell.dropout_keep`` draws them. A one-step call at once: ``cfc_step``.
    """
    if not _kernel_applies(x, h, cell.first_weight, ts, keep, *(memory[1:] if memory else ())):
        return None
    timed = ts is not None
    input_circuit = memory is not None and memory_circuit == "input"
    memory_arrays = _memory_arrays(memory, x)
    if cell.heads is None:  # the heads read [x; h]: a wired CfC of one layer
        weights = cell.derived(f"cfc.layers timed={timed}", lambda: _LayerWeights((cell,), timed))
        inputs = _no_inputs(x) if input_circuit else weights.project(x)
        states = wired_cfc_states(inputs, h, ts, weights, memory=memory_arrays, input_circuit=input_circuit)
    else:
        weights = cell.derived(f"cfc.backbone timed={timed}", lambda: _BackboneWeights(cell, timed))
        keep = None if keep is None else keep.transpose(0, 1, 3, 2)  # (T, layers - 1, units, B), as the kernel reads it
        states = cfc_states(x, h, ts, weights, memory=memory_arrays, keep=keep, input_circuit=input_circuit)
    return _batch_major(states, memory)


def wired_cfc_sequence(cell: WiredCfCLowering, x, h, ts=None, memory=None, memory_circuit="state"):
    """``cfc_sequence`` for a ``WiredCfCCell``: x (B, T, I), h (B, units) -> (outputs
    (B, T, F), every step's state (B, T, units)), views of one (T, units, B) array; None where
    the kernel does not apply (as there). ``memory``, ``memory_circuit``: as there,
    over the units' state."""
    if not _kernel_applies(x, h, cell.layers[0].first_weight, ts, *(memory[1:] if memory else ())):
        return None
    timed = ts is not None
    input_circuit = memory is not None and memory_circuit == "input"
    weights = cell.derived(f"cfc.layers timed={timed}", lambda: _LayerWeights(cell.layers, timed))
    inputs = _no_inputs(x) if input_circuit else weights.project(x)
    states = wired_cfc_states(inputs, h, ts, weights, memory=_memory_arrays(memory, x), input_circuit=input_circuit)
    start = sum(cell.layer_sizes[:-1])
    return _batch_major(states, memory, start, start + cell.output_size)


def cfc_step(cell, x, h, ts=None, memory=None, memory_circuit="state"):
    """A one-step call of a ``CfCCell``'s or ``WiredCfCCell``'s loop at once, on this thread
    (``now.py``), from its lowering: x (B, 1, I), h (B, S), ts None, 0-d or (B, 1, 1), memory as
    ``cfc_sequence`` takes it -> (outputs (B, 1, F), state (B, S), memory (B, S) or None), each
    computed; None where an array is not ready (then ``cfc_sequence`` runs it). For calls where
    ``runtime.at_once()`` said yes: the arguments as ``cfc_sequence`` makes them, without its
    views and checks (a controller's call costs mostly such Python). Given arrays and weights
    not yet computed are evaluated first (``settle``: outside any transformation)."""
    kernels = loaded()
    timed, input_circuit = ts is not None, memory is not None and memory_circuit == "input"
    weights = cell.derived(_STEP_WEIGHTS[timed], lambda: _step_weights(cell, timed))
    given = [x, h] if ts is None and memory is None else [a for a in (x, h, ts, memory and memory[1]) if a is not None]
    if x.shape[1] != 1 or not kernels.settle(given + weights.kernel_arrays):
        return None
    column = kernels.filled_now(ts, [1, x.shape[0]]) if timed else None  # (T, B) of one step
    lstm = None if memory is None else _memory_arrays(memory, x, True)
    if weights.wired:
        inputs = _no_inputs(x, True) if input_circuit else weights.project(x, True)
        outputs = weights.run(inputs, h, column, lstm, input_circuit, True)
    else:
        outputs = weights.run(_no_features(x, True) if input_circuit else x, h, column, lstm, None, input_circuit, True)
    if not kernels.ready(outputs):
        return None
    states, (start, stop), size = outputs[0], weights.output_range, weights.size
    y = kernels.features_now(states, True, start, stop, True, None, None)
    memories = None if memory is None else kernels.features_now(outputs[-1], True, 0, size, False, None, None)
    return y, kernels.features_now(states, True, 0, size, False, None, None), memories


_STEP_WEIGHTS = {False: "cfc.step weights timed=False", True: "cfc.step weights timed=True"}


def _step_weights(cell, timed: bool):
    """``cfc_sequence``'s weights for the cell, with what ``cfc_step`` reads of them: ``wired``
    (the wired loop), the state's ``size``, the outputs' ``output_range`` and every array the
    kernel reads (``kernel_arrays``)."""
    if isinstance(cell, WiredCfCLowering) or cell.heads is None:
        layers = cell.layers if isinstance(cell, WiredCfCLowering) else (cell,)
        weights = cell.derived(f"cfc.layers timed={timed}", lambda: _LayerWeights(layers, timed))
        weights.wired, weights.size = True, sum(layer.hidden_size for layer in layers)
        start = weights.size - layers[-1].hidden_size if isinstance(cell, WiredCfCLowering) else 0
        weights.output_range = (start, start + cell.output_size) if isinstance(cell, WiredCfCLowering) else (0, weights.size)
    else:
        weights = cell.derived(f"cfc.backbone timed={timed}", lambda: _BackboneWeights(cell, timed))
        weights.wired, weights.size = False, cell.hidden_size
        weights.output_range = (0, cell.hidden_size)
    weights.kernel_arrays = ([weights.input_weight, weights.input_bias] + weights.arrays if weights.wired
                             else weights.before_memory + weights.input_half)
    return weights
