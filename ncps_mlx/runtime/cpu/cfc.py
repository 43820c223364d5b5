"""A CfC's loop in ``cfc.c``, as the ``CfCSequence`` and ``WiredCfCSequence`` primitives
(``primitives.cpp``)."""

from __future__ import annotations

import mlx.core as mx

from ...lowering import CfCLowering, Mode, WiredCfCLowering
from .. import blas
from .loader import all_float32, by_row, cfc_applies, library
from .projection import input_projection

def cfc_states(x, initial, timespans, mode, activation, ff_tanh, input_weight, input_bias, state_weight, hidden,
               head_weight, head_bias, w_tau=None, A=None, memory=None):  # fmt: skip
    """Every step's state of a CfCCell with a backbone, feature-major.

    x (B, T, I), the sequence: the kernel computes the first backbone layer's input half,
    input_weight (units, I) and input_bias (units,), block by block; initial (H, B); timespans
    None (1.0 a step), 0-d or (B, T, 1); state_weight (units, H); hidden: (weight
    (units, units), bias (units,)) of backbone layers 2..n; head_weight (K, units) and head_bias
    (K,), the heads fused in the order ff1, ff2, time_a, time_b (pure mode: ff1 alone); w_tau, A
    (H,) in pure mode. -> (T, H, B). With ``memory`` (mixed memory, the "state" circuit: an LSTM
    before every step whose output replaces the state): (lstm inputs (T, 4H, B), initial memory
    (H, B), recurrent weight (4H, H), forget-gate bias) -> (states, every step's memory (T, H, B)).

    Without timespans the time gate's two heads are one, time_a + time_b, as in the MLX path:
    a quarter of the heads' product less.

    The batch's columns are split over the cores, each block a sequence of matrix products on
    one BLAS thread."""
    batch, steps = x.shape[:2]
    if timespans is None and mode != Mode.PURE:
        head_weight = _fused_gate(head_weight, state_weight.shape[1])
        head_bias = _fused_gate(head_bias, state_weight.shape[1])
    ts = None if timespans is None else by_row(timespans, batch, steps).T  # (T, B), the CfC kernels' layout
    arrays = [x, initial] + ([] if ts is None else [ts]) + [state_weight, head_weight, head_bias]
    arrays += [a for layer in hidden for a in layer] + ([w_tau, A] if mode == Mode.PURE else [])
    if memory is not None:
        lstm_inputs, initial_c, recurrent, forget_bias = memory
        arrays += [lstm_inputs, initial_c, recurrent]
    arrays += [input_weight, input_bias]
    outputs = library().cfc_sequence(arrays, mode.kernel_id, activation.kernel_id, bool(ff_tanh), ts is not None,
                                     len(hidden), memory is not None, 0.0 if memory is None else float(forget_bias),
                                     blas.sgemm_address())  # fmt: skip
    return outputs[0] if memory is None else (outputs[0], outputs[-1])


def _fused_gate(rows, hidden_size, axis=0):
    """Head rows ff1, ff2, time_a, time_b (4H along ``axis``) -> ff1, ff2, time_a + time_b."""
    H = hidden_size

    def part(start, stop):
        return rows[(slice(None),) * axis + (slice(start, stop),)]

    return mx.concatenate([part(0, 2 * H), part(2 * H, 3 * H) + part(3 * H, 4 * H)], axis=axis)


def wired_cfc_states(inputs, initial, timespans, mode, ff_tanh, layers, memory=None):
    """Every step's state of a wired CfC (or a CfCCell without a backbone: one layer),
    feature-major.

    inputs (T, K_0, B): layer 0's input product, bias included (``project_input``'s view,
    transposed back); initial (S, B), the layers' states stacked; timespans None, 0-d or
    (B, T, 1); layers: per layer (input weight (K, H_prev) and bias (K,), None for layer 0;
    state weight (K, H); w_tau and A (H,) in pure mode, else None), the heads in the order ff1,
    ff2, time_a, time_b (K = 4H; pure mode ff1 alone). -> (T, S, B). Without timespans the time
    gate's two heads are fused, as in ``cfc_states``. ``memory``: mixed memory over the S state
    rows, as in ``cfc_states`` -> (states, every step's memory (T, S, B))."""
    steps, _, batch = inputs.shape
    sizes = [int(layer[2].shape[1]) for layer in layers]
    if timespans is None and mode != Mode.PURE:
        inputs = _fused_gate(inputs, sizes[0], axis=1)
        layers = [(None if w is None else _fused_gate(w, H), None if b is None else _fused_gate(b, H), _fused_gate(s, H), tau, A)
                  for (w, b, s, tau, A), H in zip(layers, sizes)]  # fmt: skip
    ts = None if timespans is None else by_row(timespans, batch, steps).T  # (T, B), the CfC kernels' layout
    arrays = [inputs, initial] + ([] if ts is None else [ts])
    for i, (w, b, state_weight, tau, A) in enumerate(layers):
        arrays += [state_weight] + ([w, b] if i > 0 else []) + ([tau, A] if mode == Mode.PURE else [])
    if memory is not None:
        arrays += list(memory[:3])
    outputs = library().wired_cfc_sequence(arrays, mode.kernel_id, bool(ff_tanh), ts is not None, len(layers),
                                           memory is not None, 0.0 if memory is None else float(memory[3]),
                                           blas.sgemm_address())  # fmt: skip
    return outputs[0] if memory is None else (outputs[0], outputs[-1])


def _memory_arrays(memory, x):
    """Mixed memory's (LSTMLowering, memory (B, S)) for the sequence x as the kernels take it: (the
    LSTM's input projection (T, 4S, B), memory (S, B), recurrent weight (4S, S), forget-gate
    bias); None without."""
    if memory is None:
        return None
    lstm, c = memory
    inputs = input_projection(lstm, x, features_first=True).transpose(1, 2, 0)  # a view of a (T, 4S, B) array
    return inputs, c.T, lstm.recurrent_weight, lstm.forget_gate_bias


def _batch_major(states, memory):
    """(outputs, states[, memories]) as (B, T, .) views of the kernels' (T, ., B) results."""
    if memory is None:
        y = states.transpose(2, 0, 1)
        return y, y
    states, memories = states
    y = states.transpose(2, 0, 1)
    return y, y, memories.transpose(2, 0, 1)


def _kernel_applies(*arrays) -> bool:
    """Whether the CfC kernels run this loop: float32 arrays (None skipped), the kernels applying here."""
    return all_float32(*arrays) and cfc_applies()


def _pure(cell: CfCLowering) -> tuple:
    return (cell.w_tau, cell.A) if cell.mode == Mode.PURE else (None, None)


def cfc_sequence(cell: CfCLowering, x, h, ts=None, memory=None):
    """A ``CfCCell``'s whole loop in the kernel, from its lowering: the sequence x (B, T, I),
    h (B, H), ts None, 0-d or (B, T, 1) -> (outputs, every step's state), both the same (B, T, H)
    view of a (T, H, B) array; None where the kernel does not apply: for arrays that are not
    float32, and where ``cfc_applies()`` is False. ``memory``: (LSTMLowering, memory (B, H)),
    mixed memory's "state" circuit: -> (outputs, states, every step's memory (B, T, H)).
    """
    if not _kernel_applies(x, h, cell.first_weight, ts, *(memory[1:] if memory else ())):
        return None
    weight, bias = cell.first_weight, cell.first_bias
    if cell.heads is None:  # the heads read [x; h]: a wired CfC of one layer
        inputs = input_projection(cell, x).transpose(1, 2, 0)
        states = wired_cfc_states(inputs, h.T, ts, cell.mode, cell.ff_tanh, [(None, None, cell.state_weight, *_pure(cell))],
                                  memory=_memory_arrays(memory, x))  # fmt: skip
    else:
        states = cfc_states(x, h.T, ts, cell.mode, cell.activation, cell.ff_tanh, weight[:, : cell.input_size], bias,
                            cell.state_weight, list(cell.hidden), *cell.heads, *_pure(cell),
                            memory=_memory_arrays(memory, x))  # fmt: skip
    return _batch_major(states, memory)


def wired_cfc_sequence(cell: WiredCfCLowering, x, h, ts=None, memory=None):
    """``cfc_sequence`` for a ``WiredCfCCell``: x (B, T, I), h (B, units) -> (outputs
    (B, T, F), every step's state (B, T, units)), views of one (T, units, B) array; None where
    the kernel does not apply (as there). ``memory``: as there, over the units' state."""
    first = cell.layers[0]
    if not _kernel_applies(x, h, first.first_weight, ts, *(memory[1:] if memory else ())):
        return None
    inputs = input_projection(cell, x)
    layers = []
    for i, layer in enumerate(cell.layers):
        weight, bias, width = layer.first_weight, layer.first_bias, layer.input_size
        inputs_part = (None, None) if i == 0 else (weight[:, :width], bias)
        layers.append(inputs_part + (weight[:, width:],) + _pure(layer))
    states = wired_cfc_states(inputs.transpose(1, 2, 0), h.T, ts, cell.mode, cell.ff_tanh, layers,
                              memory=_memory_arrays(memory, x))  # fmt: skip
    start = sum(cell.layer_sizes[:-1])
    memories = None
    if memory is not None:
        states, memories = states
    out = states[:, start : start + cell.output_size]
    result = out.transpose(2, 0, 1), states.transpose(2, 0, 1)
    return result if memory is None else result + (memories.transpose(2, 0, 1),)
