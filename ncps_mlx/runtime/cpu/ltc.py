"""The LTC's loop in ``ltc.c``, as the ``LTCSequence`` primitive (``primitives.cpp``)."""

from __future__ import annotations

import mlx.core as mx

from ...lowering import LTCLowering
from . import now as at_once
from .loader import all_float32, applies, by_row, loaded
from .projection import input_projection


def ltc_states(inputs, initial, timespans, unfolds, epsilon, sigma, mu, w, w_erev, cm, gleak, leak, memory=None,
               sensory=None, now=False):
    """Every step's state of an LTC, differentiable in every input.

    inputs (B, T, 2S): the sensory numerator and denominator terms (``LTCCell.project_input``);
    initial (B, S); timespans None (1.0 a step), 0-d or (B, T, 1); sigma, mu (S, S); w, w_erev
    (S, S), the masked, constrained weights and their product with erev; cm, gleak, gleak * vleak
    (S,), constrained. -> (B, T, S). With ``memory`` (mixed memory, the "state" circuit: an LSTM
    before every step whose output replaces the state): (lstm inputs (B, T, 4S), initial memory
    (B, S), recurrent weight transposed (S, 4S), forget-gate bias) -> (states, every step's memory (B, T, S)).
    ``sensory``: mixed memory's "input" circuit, the LSTM's output is the cell's input: (sigma,
    mu, w * erev, w (S, S), input_w, input_b (S,)), the sensory synapses and the input mapping it
    goes through; then ``inputs`` is (B, T, 0), unread. ``now``: computed at once where every
    array is ready (``now.py``)."""
    batch, steps = inputs.shape[:2]
    arrays = [inputs, initial]
    if timespans is not None:
        ready = at_once.filled(timespans, (batch, steps)) if now else None
        arrays.append(by_row(timespans, batch, steps) if ready is None else ready)
    arrays += [sigma, mu, w, w_erev, cm, gleak, leak]
    if memory is not None:
        lstm_inputs, initial_c, recurrent_t, _ = memory
        arrays += [lstm_inputs, initial_c, recurrent_t]
    forget_bias = 0.0 if memory is None else float(memory[3])
    arrays += [] if sensory is None else list(sensory)
    outputs = loaded().ltc_sequence(arrays, int(unfolds), float(epsilon), timespans is not None, memory is not None,
                                    forget_bias, sensory is not None, now)
    return outputs[0] if memory is None else (outputs[0], outputs[-1])


def ltc_sequence(cell: LTCLowering, x, v, ts=None, memory=None, memory_circuit="state", now=False):
    """An ``LTCCell``'s whole loop in the kernel, from its lowering, differentiable: the sequence
    x (B, T, I), v (B, S), ts None, 0-d or (B, T, 1) -> (outputs (B, T, M), every step's state
    (B, T, S)); None where the kernel does not apply (``applies()``) or the arrays are not
    float32. Every synapse is computed, masked, as in the dense step. ``memory``:
    (LSTMLowering, memory (B, S)), mixed memory's "state" circuit: -> (outputs, states, every
    step's memory (B, T, S)), in its ``memory_circuit``: "state", or "input" (the LSTM's output
    is the cell's input). ``now``: computed at once where every array is ready (``now.py``),
    for a one-step call."""
    if not all_float32(x, v, cell.sigma, cell.mu, cell.w, cell.cm, ts, *(memory[1:] if memory else ())) or not (now or applies()):
        return None
    sensory = None
    if memory is not None and memory_circuit == "input":
        # its shape only: the sensory sums are the LSTM output's, step by step
        empty = at_once.filled(x, (x.shape[0], x.shape[1], 0)) if now else None
        inputs = x[..., :0] if empty is None else empty
        sensory = cell.derived("ltc.input circuit", lambda: _input_circuit(cell))
    else:
        inputs = input_projection(cell, x, now=now)  # (B, T, 2S): the sensory numerator and denominator terms
    lstm = None
    if memory is not None:
        lowered_lstm, c = memory
        recurrent_t = lowered_lstm.derived("ltc.recurrent_t", lambda: mx.contiguous(lowered_lstm.recurrent_weight.T))
        lstm = (input_projection(lowered_lstm, x, now=now), c, recurrent_t, lowered_lstm.forget_gate_bias)
    if inputs is None or (lstm is not None and lstm[0] is None):
        return None
    w_erev, leak = cell.derived("ltc.products", lambda: (cell.w * cell.erev, cell.gleak * cell.vleak))
    states = ltc_states(inputs, v, ts, cell.ode_unfolds, cell.epsilon, cell.sigma, cell.mu, cell.w, w_erev, cell.cm,
                        cell.gleak, leak, memory=lstm, sensory=sensory, now=now)
    states, memories = (states, None) if memory is None else states
    outputs = at_once.features(states, False, 0, cell.motor_size, True, cell.output_w, cell.output_b) if now else None
    outputs = cell.map_outputs(states) if outputs is None else outputs
    return (outputs, states) if memory is None else (outputs, states, memories)


def _input_circuit(cell: LTCLowering) -> tuple:
    """The "input" circuit's sensory arrays (``sensory_synapse_arrays``) and input mapping, a
    missing weight as ones and bias as zeros."""
    S = cell.state_size
    w = mx.ones((S,), mx.float32) if cell.input_w is None else cell.input_w
    b = mx.zeros((S,), mx.float32) if cell.input_b is None else cell.input_b
    return tuple(mx.contiguous(a) for a in (*cell.sensory_synapse_arrays(), w, b))
