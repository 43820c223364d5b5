"""The continuous-time RNN of the LTC paper's code (``ctrnn_model.CTRNN``).

Specification: the LTC paper's CTRNN code (README, "Options"). Explicit Euler, ``ode_unfolds``
sub-steps of ``delta_t * ts`` each, input held constant over the step:
``h <- h + eps * (tanh(W [x; h] + b) - h / tau)``. At ts = 1 this is the TF1 code exactly.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import fastmath
from ..lowering import CTRNNLowering
from ._common import check_int, glorot_uniform


class CTRNNCell(nn.Module):
    """CTRNN cell: input (B, I), state and output (B, U).

    Args:
        input_size: I.
        units: U.
        global_feedback: if True (every experiment of the paper) the state feeds back into
            the tanh at every sub-step; if False the tanh sees the input only.
        tau: fixed time constant (used unless ``learn_tau``).
        ode_unfolds: Euler sub-steps per time step (TF1: 6).
        delta_t: sub-step length per unit of elapsed time (TF1: 0.1; 1/6 gives the paper
            text's and ncps-LTC's time base).
        cell_clip: clip the state to [-cell_clip, cell_clip] after every sub-step (None: off).
        learn_tau: learn tau = softplus(tau_raw), tau_raw initialised to 1.0 (the MLXPorts
            behaviour; the TF1 code created this variable but never used it).

    Parameters: ``step`` (Linear, (U, I + U), or (U, I) without global feedback;
    glorot-uniform weight, zero bias), and ``tau_raw`` (1,) when ``learn_tau``.
    """

    def __init__(
        self,
        input_size: int,
        units: int,
        global_feedback: bool = True,
        tau: float = 1.0,
        ode_unfolds: int = 6,
        delta_t: float = 0.1,
        cell_clip: float | None = None,
        learn_tau: bool = False,
    ):
        super().__init__()
        check_int("ode_unfolds", ode_unfolds)
        if cell_clip is not None and cell_clip <= 0:
            raise ValueError(f"cell_clip must be positive or None (off), got {cell_clip}")
        self.input_size = int(input_size)
        self.units = int(units)
        self.global_feedback = bool(global_feedback)
        self.tau = float(tau)
        self.ode_unfolds = int(ode_unfolds)
        self.delta_t = float(delta_t)
        self.cell_clip = cell_clip
        self.learn_tau = bool(learn_tau)
        in_features = self.input_size + (self.units if self.global_feedback else 0)
        self.step = nn.Linear(in_features, self.units)
        self.step.weight = glorot_uniform(self.step.weight.shape)
        self.step.bias = mx.zeros((self.units,))
        if self.learn_tau:
            self.tau_raw = mx.array([1.0])

    def lowered(self) -> CTRNNLowering:
        """What the kernels and the ONNX exporter read of this cell (``ncps_mlx.lowering``)."""
        tau = nn.softplus(self.tau_raw).reshape(1) if self.learn_tau else mx.array([self.tau], mx.float32)
        return CTRNNLowering(self.input_size, self.units, self.step.weight, self.step.bias, tau, self.ode_unfolds,
                             self.delta_t, self.cell_clip, self.global_feedback)

    @property
    def state_size(self) -> int:
        return self.units

    @property
    def output_size(self) -> int:
        return self.units

    def input_projection(self):
        """(weight (U, I), bias (U,)): ``project_input`` is x weight^T + bias."""
        return self.step.weight[:, : self.input_size], self.step.bias

    def project_input(self, x: mx.array) -> mx.array:
        """(..., I) -> (..., U): the input half of the tanh argument, bias included."""
        return mx.addmm(self.step.bias, x, self.step.weight[:, : self.input_size].T)

    def prepare(self):
        """(recurrent weight.T or None, tau), once per sequence."""
        recurrent_weight = self.step.weight[:, self.input_size :].T if self.global_feedback else None
        return recurrent_weight, nn.softplus(self.tau_raw) if self.learn_tau else self.tau

    def recurrent_step(self, u: mx.array, h: mx.array, ts=1.0, prepared=None):
        """u (B, U), h (B, U), ts float or (B, 1) -> (output (B, U), new state (B, U))."""
        recurrent_weight, tau = self.prepare() if prepared is None else prepared
        eps = self.delta_t * ts
        f = None if self.global_feedback else fastmath.tanh(u)
        for _ in range(self.ode_unfolds):
            if self.global_feedback:
                f = fastmath.tanh(u + h @ recurrent_weight)
            h = h + eps * (f - h / tau)
            if self.cell_clip is not None:
                h = mx.clip(h, -self.cell_clip, self.cell_clip)
        return h, h

    def __call__(self, x: mx.array, h: mx.array, ts=1.0):
        return self.recurrent_step(self.project_input(x), h, ts)
