"""The LTC's loop in ``ltc.c``, as the ``LTCSequence`` primitive (``primitives.cpp``)."""

from __future__ import annotations

from ...lowering import LTCLowering
from .loader import all_float32, applies, by_row, library
from .projection import input_projection


def ltc_states(inputs, initial, timespans, unfolds, epsilon, sigma, mu, w, w_erev, cm, gleak, leak, memory=None):
    """Every step's state of an LTC, differentiable in every input.

    inputs (B, T, 2S): the sensory numerator and denominator terms (``LTCCell.project_input``);
    initial (B, S); timespans None (1.0 a step), 0-d or (B, T, 1); sigma, mu (S, S); w, w_erev
    (S, S), the masked, constrained weights and their product with erev; cm, gleak, gleak * vleak
    (S,), constrained. -> (B, T, S). With ``memory`` (mixed memory, the "state" circuit: an LSTM
    before every step whose output replaces the state): (lstm inputs (B, T, 4S), initial memory
    (B, S), recurrent weight (4S, S), forget-gate bias) -> (states, every step's memory (B, T, S))."""
    batch, steps = inputs.shape[:2]
    arrays = [inputs, initial]
    if timespans is not None:
        arrays.append(by_row(timespans, batch, steps))
    arrays += [sigma, mu, w, w_erev, cm, gleak, leak]
    if memory is not None:
        lstm_inputs, initial_c, recurrent, _ = memory
        arrays += [lstm_inputs, initial_c, recurrent.T]  # the kernel reads it (S, 4S)
    forget_bias = 0.0 if memory is None else float(memory[3])
    outputs = library().ltc_sequence(arrays, int(unfolds), float(epsilon), timespans is not None, memory is not None,
                                     forget_bias)  # fmt: skip
    return outputs[0] if memory is None else (outputs[0], outputs[-1])


def ltc_sequence(cell: LTCLowering, x, v, ts=None, memory=None):
    """An ``LTCCell``'s whole loop in the kernel, from its lowering, differentiable: the sequence
    x (B, T, I), v (B, S), ts None, 0-d or (B, T, 1) -> (outputs (B, T, M), every step's state
    (B, T, S)); None where the kernel does not apply (``applies()``) or the arrays are not
    float32. Every synapse is computed, masked, as in the dense step. ``memory``:
    (LSTMLowering, memory (B, S)), mixed memory's "state" circuit: -> (outputs, states, every
    step's memory (B, T, S))."""
    if not all_float32(x, v, cell.sigma, cell.mu, cell.w, cell.cm, ts, *(memory[1:] if memory else ())) or not applies():
        return None
    inputs = input_projection(cell, x)  # (B, T, 2S): the sensory numerator and denominator terms
    lstm = None
    if memory is not None:
        lowered_lstm, c = memory
        lstm = (input_projection(lowered_lstm, x), c, lowered_lstm.recurrent_weight, lowered_lstm.forget_gate_bias)
    if inputs is None or (lstm is not None and lstm[0] is None):
        return None
    w_erev, leak = cell.derived("ltc.products", lambda: (cell.w * cell.erev, cell.gleak * cell.vleak))
    states = ltc_states(inputs, v, ts, cell.ode_unfolds, cell.epsilon, cell.sigma, cell.mu, cell.w, w_erev, cell.cm,
                        cell.gleak, leak, memory=lstm)  # fmt: skip
    if memory is None:
        return cell.map_outputs(states), states
    states, memories = states
    return cell.map_outputs(states), states, memories
