"""The continuous-time GRU of the LTC paper's code (``ctrnn_model.CTGRU``, after Mozer et al. 2017).

Specification: the LTC paper's CT-GRU code (README, "Options"). Each of U units keeps M traces
with time scales tau_i = 10^(i/2); the state is the (U, M) trace matrix stored flat,
unit-major (index u * M + i).
"""

from __future__ import annotations

import math

import numpy as np
import mlx.core as mx
import mlx.nn as nn

from .. import fastmath
from ..lowering import CTGRULowering
from ._common import check_choice, glorot_uniform

DECAYS = ("ltc", "mozer")


class CTGRUCell(nn.Module):
    """CTGRU cell: input (B, I), state (B, U * M), output (B, U) = the traces summed.

    Args:
        input_size: I.
        units: U.
        M: number of time scales (traces per unit).
        cell_clip: clip the traces to [-cell_clip, cell_clip] (None: off).
        decay: "ltc" (default) decays trace i by exp(-1 / ln tau_i) per step, trace 0 by 0,
            and ignores timespans: bit-faithful to the TF1 code behind the paper's numbers.
            "mozer" decays by exp(-ts / tau_i), the published CT-GRU, and uses timespans.

    Parameters: ``tau_r``, ``tau_s`` (Linear, (U * M, I + U)) and ``detect`` (Linear,
    (U, I + U)); glorot-uniform weights, zero biases.
    """

    def __init__(self, input_size: int, units: int, M: int = 8, cell_clip: float | None = None, decay: str = "ltc"):
        super().__init__()
        check_choice("CTGRU decay", decay, DECAYS)
        if int(M) < 1:
            raise ValueError(f"M (number of time scales) must be a positive integer, got {M}")
        if cell_clip is not None and cell_clip <= 0:
            raise ValueError(f"cell_clip must be positive or None (off), got {cell_clip}")
        self.input_size = int(input_size)
        self.units = int(units)
        self.M = int(M)
        self.cell_clip = cell_clip
        self.decay = decay
        concat = self.input_size + self.units
        self.tau_r = nn.Linear(concat, self.units * self.M)
        self.tau_s = nn.Linear(concat, self.units * self.M)
        self.detect = nn.Linear(concat, self.units)
        for layer in (self.tau_r, self.tau_s, self.detect):
            layer.weight = glorot_uniform(layer.weight.shape)
            layer.bias = mx.zeros(layer.bias.shape)

        # Fixed constants of the configuration, not weights: computed in float64. ln tau_0 = 0,
        # so trace 0's "ltc" decay exp(-1/0) is set to 0 explicitly rather than evaluated. Kept
        # in the instance's __dict__, outside the module's tree: mx.value_and_grad (through
        # nn.value_and_grad, which passes the model along) swaps every array of that tree for
        # its tracer while it traces, and the differentiable pass, run on its own thread
        # (runtime.stepping), cannot evaluate the caller's tracers. The host copies are read
        # without evaluating (inside mx.compile), by the CPU kernel.
        tau_table = 10.0 ** (np.arange(self.M) / 2.0)
        ln_tau = np.arange(self.M) / 2.0 * math.log(10.0)
        ltc_decay = np.zeros(self.M)
        ltc_decay[1:] = np.exp(-1.0 / ln_tau[1:])
        scales = {"ln_tau": ln_tau.astype(np.float32), "inv_tau": (1.0 / tau_table).astype(np.float32),
                  "ltc_decay": ltc_decay.astype(np.float32)}
        self.__dict__["_time_scales"] = scales
        for name, value in scales.items():
            self.__dict__[f"_{name}"] = mx.array(value)

    @property
    def state_size(self) -> int:
        return self.units * self.M

    @property
    def output_size(self) -> int:
        return self.units

    def lowered(self) -> CTGRULowering:
        """What the kernels and the ONNX exporter read of this cell (``ncps_mlx.lowering``)."""
        weight, bias = self.input_projection()
        w_r, w_s, w_q = self.prepare()
        mozer = self.decay == "mozer"
        scales = self.__dict__["_time_scales"]
        return CTGRULowering(self.input_size, self.units, self.M, mozer, self.cell_clip, weight, bias, w_r, w_s, w_q,
                             tuple(scales["ln_tau"].tolist()), tuple(scales["inv_tau" if mozer else "ltc_decay"].tolist()))

    def input_projection(self):
        """(weight (2 U M + U, I), bias (2 U M + U,)): the input halves of tau_r, tau_s and
        detect; ``project_input`` is x weight^T + bias."""
        I = self.input_size
        weight = mx.concatenate([self.tau_r.weight[:, :I], self.tau_s.weight[:, :I], self.detect.weight[:, :I]])
        return weight, mx.concatenate([self.tau_r.bias, self.tau_s.bias, self.detect.bias])

    def project_input(self, x: mx.array) -> mx.array:
        """(..., I) -> (..., 2 U M + U): input halves of tau_r, tau_s and detect, biases included."""
        weight, bias = self.input_projection()
        return mx.addmm(bias, x, weight.T)

    def _scale_weights(self, logits: mx.array) -> mx.array:
        return mx.softmax(-mx.square(logits - _like(self._ln_tau, logits)), axis=-1, precise=True)

    def prepare(self):
        """The state halves of tau_r, tau_s and detect, transposed, once per sequence."""
        I = self.input_size
        return tuple(layer.weight[:, I:].T for layer in (self.tau_r, self.tau_s, self.detect))

    def recurrent_step(self, u: mx.array, state: mx.array, ts=1.0, prepared=None):
        """u (B, 2UM + U), state (B, U M), ts float or (B, 1) -> (output (B, U), new state (B, U M))."""
        w_r, w_s, w_q = self.prepare() if prepared is None else prepared
        U, M = self.units, self.M
        batch = state.shape[0]
        traces = state.reshape(batch, U, M)
        u_r, u_s, u_q = mx.split(u, [U * M, 2 * U * M], axis=-1)
        h = mx.sum(traces, axis=-1)
        retrieve = self._scale_weights((u_r + h @ w_r).reshape(batch, U, M))
        q = fastmath.tanh(u_q + mx.sum(retrieve * traces, axis=-1) @ w_q)
        store = self._scale_weights((u_s + h @ w_s).reshape(batch, U, M))
        mixed = (1.0 - store) * traces + store * q[:, :, None]
        if self.decay == "ltc":
            decay = _like(self._ltc_decay, mixed)
        else:
            ts = ts if isinstance(ts, (int, float)) else ts.reshape(-1, 1, 1)
            decay = mx.exp(-ts * _like(self._inv_tau, mixed))
        traces = mixed * decay
        if self.cell_clip is not None:
            traces = mx.clip(traces, -self.cell_clip, self.cell_clip)
        return mx.sum(traces, axis=-1), traces.reshape(batch, U * M)

    def __call__(self, x: mx.array, state: mx.array, ts=1.0):
        return self.recurrent_step(self.project_input(x), state, ts)


def _like(constant: mx.array, value: mx.array) -> mx.array:
    """A float32 constant in ``value``'s dtype (a float16 or bfloat16 model stays in it)."""
    return constant if constant.dtype == value.dtype else constant.astype(value.dtype)
