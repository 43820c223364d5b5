"""The LTC's loop in ``ltc.c``: the host side, and an MLX custom function with its vjp."""

from __future__ import annotations

import ctypes
import functools

import mlx.core as mx
import numpy as np

from . import applies, as_host, library, pointer, run_rows


class _Arguments(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int32), ("steps", ctypes.c_int32), ("units", ctypes.c_int32), ("unfolds", ctypes.c_int32),
        ("epsilon", ctypes.c_float),
        ("sigma", ctypes.c_void_p), ("mu", ctypes.c_void_p), ("w", ctypes.c_void_p), ("w_erev", ctypes.c_void_p),
        ("cm", ctypes.c_void_p), ("gleak", ctypes.c_void_p), ("leak", ctypes.c_void_p),
        ("inputs", ctypes.c_void_p), ("timespans", ctypes.c_void_p),
    ]  # fmt: skip


def _arguments(unfolds, epsilon, inputs, timespans, parameters):
    """(ctypes arguments, the host arrays they point into: keep them alive)."""
    host = [as_host(a) for a in (inputs, *parameters)] + ([as_host(timespans)] if timespans is not None else [])
    inputs_h, sigma, mu, w, w_erev, cm, gleak, leak = host[:8]
    batch, steps, _ = inputs_h.shape
    arguments = _Arguments(batch, steps, sigma.shape[0], unfolds, epsilon,
                           *(pointer(a) for a in (sigma, mu, w, w_erev, cm, gleak, leak, inputs_h)),
                           pointer(host[8]) if timespans is not None else None)  # fmt: skip
    return arguments, host


def forward(unfolds, epsilon, inputs, initial, timespans, parameters) -> np.ndarray:
    """Every step's state (B, T, S) as a host array; see ``ltc_states``."""
    lib = library()
    arguments, keep = _arguments(unfolds, epsilon, inputs, timespans, parameters)
    initial = as_host(initial)
    batch, steps, units = arguments.batch, arguments.steps, arguments.units
    states = np.empty((batch, steps, units), np.float32)

    def rows(first, last):
        scratch = np.empty(5 * units, np.float32)
        lib.ltc_forward(ctypes.byref(arguments), pointer(initial), pointer(states), first, last, pointer(scratch))

    run_rows(rows, batch)
    del keep
    return states


def backward(unfolds, epsilon, inputs, initial, timespans, parameters, d_states):
    """(d inputs (B, T, 2S), d initial (B, S), d timespans (B, T) or None, d parameters) as host
    arrays, the parameters' summed over the batch."""
    lib = library()
    arguments, keep = _arguments(unfolds, epsilon, inputs, timespans, parameters)
    initial, d_states = as_host(initial), as_host(d_states)
    batch, steps, units = arguments.batch, arguments.steps, arguments.units
    d_inputs = np.empty((batch, steps, 2 * units), np.float32)
    d_initial = np.empty((batch, units), np.float32)
    d_timespans = np.empty((batch, steps), np.float32) if timespans is not None else None

    def rows(first, last):
        scratch = np.empty(((steps * unfolds + 1) + 9) * units, np.float32)
        matrices = [np.zeros((units, units), np.float32) for _ in range(4)]
        vectors = [np.zeros(units, np.float32) for _ in range(3)]
        lib.ltc_backward(ctypes.byref(arguments), pointer(initial), pointer(d_states), pointer(d_inputs),
                         pointer(d_initial), pointer(d_timespans) if d_timespans is not None else None,
                         *(pointer(a) for a in matrices + vectors), first, last, pointer(scratch))  # fmt: skip
        return matrices + vectors

    parts = run_rows(rows, batch)
    del keep
    d_parameters = [functools.reduce(np.add, grads) for grads in zip(*parts)]
    return d_inputs, d_initial, d_timespans, d_parameters


@functools.lru_cache(maxsize=None)
def _states_function(unfolds: int, epsilon: float, timed: bool):
    """The kernel as an MLX custom function with its vjp: (inputs (B, T, 2S), initial (B, S),
    [timespans (B, T)], sigma, mu, w, w_erev (S, S), cm, gleak, leak (S,)) -> states (B, T, S)."""

    def split(arrays):
        inputs, initial, *rest = arrays
        timespans = rest.pop(0) if timed else None
        return inputs, initial, timespans, rest

    @mx.custom_function
    def states(*arrays):
        inputs, initial, timespans, parameters = split(arrays)
        return mx.array(forward(unfolds, epsilon, inputs, initial, timespans, parameters))

    @states.vjp
    def states_vjp(primals, cotangent, output):
        inputs, initial, timespans, parameters = split(primals)
        d_inputs, d_initial, d_timespans, d_parameters = backward(unfolds, epsilon, inputs, initial, timespans,
                                                                  parameters, cotangent)  # fmt: skip
        grads = [d_inputs, d_initial] + ([d_timespans] if timed else []) + d_parameters
        return tuple(mx.array(g) for g in grads)

    return states


def ltc_states(inputs, initial, timespans, unfolds, epsilon, sigma, mu, w, w_erev, cm, gleak, leak):
    """Every step's state of an LTC, differentiable (MLX calls the kernel's backward pass).

    inputs (B, T, 2S): the sensory numerator and denominator terms (``LTCCell.project_input``);
    initial (B, S); timespans None (1.0 a step), 0-d or (B, T, 1); sigma, mu (S, S); w, w_erev
    (S, S), the masked, constrained weights and their product with erev; cm, gleak, gleak * vleak
    (S,), constrained. -> (B, T, S)."""
    batch, steps = inputs.shape[:2]
    arrays = [inputs, initial]
    if timespans is not None:
        arrays.append(mx.broadcast_to(timespans.reshape(timespans.shape[:2]) if timespans.ndim == 3 else timespans,
                                      (batch, steps)))  # fmt: skip
    function = _states_function(int(unfolds), float(epsilon), timespans is not None)
    return function(*arrays, sigma, mu, w, w_erev, cm, gleak, leak)


def ltc_cell_sequence(cell, inputs, v, ts=None, differentiable=False):
    """An ``LTCCell``'s whole loop in the kernel, differentiable: inputs (B, T, 2S) from
    ``project_input``, v (B, S), ts None, 0-d or (B, T, 1) -> (outputs (B, T, M), every step's
    state (B, T, S)); None where the kernel does not apply (``applies()``) or the arrays are not
    float32. Every synapse is computed, masked, as in the dense step."""
    arrays = (inputs, v, cell.sigma, cell.mu, cell.w, cell.cm) + (() if ts is None else (ts,))
    if any(a.dtype != mx.float32 for a in arrays) or not applies():
        return None
    gleak = cell._positive(cell.gleak)
    w = cell._positive(cell.w) * cell.sparsity_mask
    states = ltc_states(inputs, v, ts, cell.ode_unfolds, cell.epsilon, cell.sigma, cell.mu, w,
                        w * cell.erev, cell._positive(cell.cm), gleak, gleak * cell.vleak)  # fmt: skip
    return cell._map_outputs(states), states
