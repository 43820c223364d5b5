"""The LTC's loop in ``ltc.c``, as the ``LTCSequence`` primitive (``primitives.cpp``)."""

from __future__ import annotations

from . import all_float32, applies, by_row, library
from .projection import projected


def ltc_states(inputs, initial, timespans, unfolds, epsilon, sigma, mu, w, w_erev, cm, gleak, leak):
    """Every step's state of an LTC, differentiable in every input.

    inputs (B, T, 2S): the sensory numerator and denominator terms (``LTCCell.project_input``);
    initial (B, S); timespans None (1.0 a step), 0-d or (B, T, 1); sigma, mu (S, S); w, w_erev
    (S, S), the masked, constrained weights and their product with erev; cm, gleak, gleak * vleak
    (S,), constrained. -> (B, T, S)."""
    batch, steps = inputs.shape[:2]
    arrays = [inputs, initial]
    if timespans is not None:
        arrays.append(by_row(timespans, batch, steps))
    arrays += [sigma, mu, w, w_erev, cm, gleak, leak]
    return library().ltc_sequence(arrays, int(unfolds), float(epsilon), timespans is not None)


def ltc_cell_sequence(cell, x, v, ts=None, differentiable=False):
    """An ``LTCCell``'s whole loop in the kernel, differentiable: the sequence x (B, T, I), v (B, S), ts None, 0-d or (B, T, 1) -> (outputs (B, T, M), every step's
    state (B, T, S)); None where the kernel does not apply (``applies()``) or the arrays are not
    float32. Every synapse is computed, masked, as in the dense step."""
    if not all_float32(x, v, cell.sigma, cell.mu, cell.w, cell.cm, ts) or not applies():
        return None
    inputs = projected(cell, x)  # (B, T, 2S): the sensory numerator and denominator terms
    gleak = cell._positive(cell.gleak)
    w = cell._positive(cell.w) * cell.sparsity_mask
    states = ltc_states(inputs, v, ts, cell.ode_unfolds, cell.epsilon, cell.sigma, cell.mu, w,
                        w * cell.erev, cell._positive(cell.cm), gleak, gleak * cell.vleak)  # fmt: skip
    return cell._map_outputs(states), states
