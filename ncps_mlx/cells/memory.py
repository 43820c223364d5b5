"""The LSTM of mixed-memory models (Lechner & Hasani 2020, "ODE-LSTM").

Both reference circuits use the same LSTM: an input map with bias, a recurrent map without,
gates ordered (input, input gate, forget gate, output gate) and a constant forget-gate bias.
They differ only in where its output goes (reference-notes point 3), which the sequence loop
decides (``memory_circuit``):

* "state" (ncps.torch): the LSTM output replaces the ODE cell's state before the cell runs on
  the original input.
* "input" (ncps.tf / ncps.keras ``MixedMemoryRNN``): the LSTM output is the ODE cell's input;
  the cell's state is left alone. A keras ``input_kernel`` / ``recurrent_kernel`` / ``bias``
  map to ``input_map.weight.T`` / ``recurrent_map.weight.T`` / ``input_map.bias``.

In both, the LSTM's recurrent input is the ODE cell's state.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import fastmath
from ..lowering import LSTMLowering
from ._common import glorot_uniform

MEMORY_CIRCUITS = ("state", "input")


class LSTMCell(nn.Module):
    """LSTM over (B, input_size) inputs with state (h, c), each (B, hidden_size)."""

    def __init__(self, input_size: int, hidden_size: int, forget_gate_bias: float = 1.0):
        super().__init__()
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.forget_gate_bias = float(forget_gate_bias)
        self.input_map = nn.Linear(input_size, 4 * hidden_size, bias=True)
        self.recurrent_map = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        # ncps.torch initialisation: xavier input kernel, orthogonal recurrent kernel,
        # biases uniform in (-0.1, 0.1).
        self.input_map.weight = glorot_uniform(self.input_map.weight.shape)
        self.input_map.bias = mx.random.uniform(-0.1, 0.1, self.input_map.bias.shape)
        self.recurrent_map.weight = nn.init.orthogonal()(self.recurrent_map.weight)

    def lowered(self) -> LSTMLowering:
        """What the kernels and the ONNX exporter read of this cell (``ncps_mlx.lowering``)."""
        return LSTMLowering(self.input_map.weight, self.input_map.bias, self.recurrent_map.weight, self.forget_gate_bias)

    def input_projection(self):
        """(weight (4H, I), bias (4H,)): ``project_input`` is x weight^T + bias."""
        return self.input_map.weight, self.input_map.bias

    def project_input(self, x: mx.array) -> mx.array:
        """(..., input_size) -> (..., 4 * hidden_size)."""
        return self.input_map(x)

    def prepare(self):
        return self.recurrent_map.weight.T

    def recurrent_step(self, u: mx.array, h: mx.array, c: mx.array, prepared=None):
        """u (B, 4H) from ``project_input``, h and c (B, H) -> (new h, new c)."""
        z = u + h @ (self.prepare() if prepared is None else prepared)
        i, ig, fg, og = mx.split(z, 4, axis=-1)
        new_c = c * fastmath.sigmoid(fg + self.forget_gate_bias) + fastmath.tanh(i) * fastmath.sigmoid(ig)
        new_h = fastmath.tanh(new_c) * fastmath.sigmoid(og)
        return new_h, new_c

    def __call__(self, x: mx.array, state):
        h, c = state
        return self.recurrent_step(self.project_input(x), h, c)
