"""Closed-form Continuous-time cells: ``CfCCell`` and ``WiredCfCCell``.

Every cell here splits one step into two parts so the sequence loop can hoist work out of the
time loop:

* ``project_input(x)``: the part that depends on the input only, ``(..., input_size) -> (..., P)``,
  computed once for a whole ``(B, T, input_size)`` sequence;
* ``recurrent_step(u, h, ts, prepared=None)``: the rest, ``u (B, P)``, ``h (B, state_size)``,
  ``ts`` a float or ``(B, 1)`` -> ``(output (B, output_size), new h (B, state_size))``;
* ``prepare()``: the loop-invariant tensors ``recurrent_step`` needs (masked, fused and
  transposed weights), which the sequence loop computes once and passes as ``prepared``.

``cell(x, h, ts)`` runs both, like a ``ncps.torch`` cell's ``forward``.
"""

from __future__ import annotations

import numpy as np
import mlx.core as mx
import mlx.nn as nn

from .. import fastmath
from ._common import check_choice, get_activation, glorot_uniform

MODES = ("default", "pure", "no_gate")
FF_ACTIVATIONS = ("tanh", None)


class CfCCell(nn.Module):
    """A CfC cell (Hasani et al. 2022), parameter for parameter ``ncps.torch.CfCCell``.

    Args:
        input_size: input features I.
        hidden_size: state size H.
        mode: "default" (gated), "pure" (direct closed-form solution) or "no_gate".
        backbone_activation: lecun_tanh, silu, relu, tanh or gelu.
        backbone_units, backbone_layers, backbone_dropout: the MLP on [x; h] before the heads.
            With ``backbone_layers=0`` the heads read [x; h] directly.
        sparsity_mask: optional (I + H, H) adjacency (signs ignored) masking ``ff1``/``ff2``;
            stored frozen as ``sparsity_mask`` (H, I + H), as the reference does.
        ff_activation: "tanh" applies tanh to the ``ff1``/``ff2`` heads (``ncps.torch``); None
            uses them raw, as ``ncps.tf``/``ncps.keras`` do (reference-notes point 0).

    Parameters: ``backbone.k`` (Linear), ``ff1``, ``ff2``, ``time_a``, ``time_b`` (Linear, (out, in));
    in pure mode ``ff1``, ``w_tau`` (1, H), ``A`` (1, H).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        mode: str = "default",
        backbone_activation: str = "lecun_tanh",
        backbone_units: int = 128,
        backbone_layers: int = 1,
        backbone_dropout: float = 0.0,
        sparsity_mask=None,
        ff_activation: str | None = "tanh",
    ):
        super().__init__()
        check_choice("CfC mode", mode, MODES)
        check_choice("ff_activation", ff_activation, FF_ACTIVATIONS)
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.mode = mode
        self.ff_activation = ff_activation
        self.backbone_layers = int(backbone_layers)
        self.activation_name = backbone_activation
        self.activation = get_activation(backbone_activation)

        concat = self.input_size + self.hidden_size
        if self.backbone_layers > 0:
            sizes = [concat] + [backbone_units] * self.backbone_layers
            self.backbone = [nn.Linear(sizes[i], sizes[i + 1]) for i in range(self.backbone_layers)]
            # ncps.torch puts dropout only after backbone layers 2..n (reference-notes point 4).
            self.dropout = nn.Dropout(backbone_dropout) if backbone_dropout > 0.0 else None
            head_in = backbone_units
        else:
            head_in = concat

        self.ff1 = nn.Linear(head_in, self.hidden_size)
        if mode == "pure":
            self.w_tau = mx.zeros((1, self.hidden_size))
            self.A = mx.ones((1, self.hidden_size))
        else:
            self.ff2 = nn.Linear(head_in, self.hidden_size)
            self.time_a = nn.Linear(head_in, self.hidden_size)
            self.time_b = nn.Linear(head_in, self.hidden_size)
        self._init_weights()

        if sparsity_mask is not None:
            mask = np.abs(np.asarray(sparsity_mask)).T.astype(np.float32)
            if mask.shape != (self.hidden_size, head_in):
                raise ValueError(
                    f"sparsity_mask must have shape ({head_in}, {self.hidden_size}) = (inputs + units, units); "
                    f"got {tuple(mask.shape[::-1])}"
                )
            self.sparsity_mask = mx.array(mask)
            self.freeze(keys=["sparsity_mask"], recurse=False)
        else:
            self.sparsity_mask = None

    @property
    def state_size(self) -> int:
        return self.hidden_size

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def _init_weights(self):
        # As ncps.torch: xavier-uniform for every 2-D trainable tensor, which includes the
        # (1, H) w_tau and A of pure mode; biases keep the Linear default.
        for layer in self._linears():
            layer.weight = glorot_uniform(layer.weight.shape)
        if self.mode == "pure":
            self.w_tau = glorot_uniform(self.w_tau.shape)
            self.A = glorot_uniform(self.A.shape)

    def _linears(self):
        layers = list(self.backbone) if self.backbone_layers > 0 else []
        layers.append(self.ff1)
        if self.mode != "pure":
            layers += [self.ff2, self.time_a, self.time_b]
        return layers

    def _heads(self):
        """The head layers fused into one (K, in) weight and (K,) bias, with the mask applied."""
        if self.mode == "pure":
            weights, biases = [self.ff1.weight], [self.ff1.bias]
        else:
            weights = [self.ff1.weight, self.ff2.weight, self.time_a.weight, self.time_b.weight]
            biases = [self.ff1.bias, self.ff2.bias, self.time_a.bias, self.time_b.bias]
        if self.sparsity_mask is not None:
            # time_a and time_b stay dense, as in every reference flavour.
            weights[0] = weights[0] * self.sparsity_mask
            if self.mode != "pure":
                weights[1] = weights[1] * self.sparsity_mask
        if len(weights) == 1:
            return weights[0], biases[0]
        return mx.concatenate(weights, axis=0), mx.concatenate(biases, axis=0)

    def _first_layer(self):
        """The layer that reads [x; h]: the first backbone layer, or the fused heads."""
        if self.backbone_layers > 0:
            return self.backbone[0].weight, self.backbone[0].bias
        return self._heads()

    def project_input(self, x: mx.array) -> mx.array:
        """(..., I) -> (..., P): the input half of the first layer, bias included."""
        weight, bias = self._first_layer()
        return mx.addmm(bias, x, weight[:, : self.input_size].T)

    def prepare(self):
        """Loop-invariant tensors: (input weight (P, I), bias (P,), state weight (P, H), heads).

        The first layer split into its input and state halves, (out, in) and contiguous, as
        ``step_features`` multiplies them. ``heads`` is None without a backbone, else the fused
        head layer twice, (weight (K, units), bias (K, 1)) each, rows ff1, ff2 and then the
        time gate's halved terms (exact: a power of two): (t_a + t_b) / 2 for a timespan of
        1.0 (K = 3H; sigmoid(v) = 1/2 + tanh(v / 2) / 2, so the gate is one tanh), else t_a / 2
        and t_b / 2 (K = 4H). Pure mode has the ff1 head alone, in both.
        """
        weight, bias = self._first_layer()
        heads = None
        if self.backbone_layers > 0:
            head_weight, head_bias = self._heads()
            head_bias = head_bias[:, None]
            if self.mode == "pure":
                heads = (head_weight, head_bias) * 2
            else:
                H = self.hidden_size
                halved = mx.concatenate([mx.ones((2 * H, 1)), mx.full((2 * H, 1), 0.5)])
                weight_4, bias_4 = head_weight * halved, head_bias * halved
                fused = [weight_4[: 2 * H], weight_4[2 * H : 3 * H] + weight_4[3 * H :]]
                fused_bias = [bias_4[: 2 * H], bias_4[2 * H : 3 * H] + bias_4[3 * H :]]
                heads = (mx.concatenate(fused), mx.concatenate(fused_bias), weight_4, bias_4)
        I = self.input_size
        return mx.contiguous(weight[:, :I]), bias, mx.contiguous(weight[:, I:]), heads

    def recurrent_step(self, u: mx.array, h: mx.array, ts=1.0, prepared=None):
        """u (B, P), h (B, H), ts float or (B, 1) -> (output (B, H), new state (B, H))."""
        out, h = self.step_features(u.T, h.T, _features_first(ts), prepared)
        return out.T, h.T

    def step_features(self, u: mx.array, h: mx.array, ts=1.0, prepared=None):
        """The step feature-major: u (P, B), h (H, B), ts a float or (1, B) -> (output (H, B),
        new state (H, B)).

        The heads are then row blocks of one matrix product, so every elementwise operation
        reads whole contiguous rows. MLX vectorises a compiled loop only over contiguous
        inputs; batch-major, the heads are column slices read with strides, in scalar loops
        (a CfC step at batch 1024 takes half the time this way). ``recurrent_step`` and the
        sequence loop pass transposed views, so the state stays feature-major from step to
        step without a copy.
        """
        _, _, state_weight, heads = self.prepare() if prepared is None else prepared
        z = mx.addmm(u, state_weight, h)
        halved = False
        unit_timespan = isinstance(ts, (int, float)) and ts == 1
        if self.backbone_layers > 0:
            z = self.activation(z)
            for layer in self.backbone[1:]:
                z = self.activation(mx.addmm(layer.bias[:, None], layer.weight, z))
                if self.dropout is not None:
                    # Drawn batch-major, so a seed gives the masks it gave before this layout.
                    z = self.dropout(z.T).T
            weight, bias = heads[:2] if unit_timespan else heads[2:]
            z = mx.addmm(bias, weight, z)
            halved = True

        H = self.hidden_size
        if self.mode == "pure":
            ff1 = z
            w_tau, A = self.w_tau.T, self.A.T
            new_h = -A * mx.exp(-ts * (mx.abs(w_tau) + mx.abs(ff1))) * ff1 + A
            return new_h, new_h
        if halved and unit_timespan and self.ff_activation == "tanh":
            t = fastmath.tanh(z)  # ff1, ff2 and the gate in one call
            ff1, ff2, gate = t[:H], t[H : 2 * H], t[2 * H :]
        else:
            ff1, ff2 = z[:H], z[H : 2 * H]
            if self.ff_activation == "tanh":
                both = fastmath.tanh(z[: 2 * H])
                ff1, ff2 = both[:H], both[H:]
            if halved and unit_timespan:
                argument = z[2 * H :]
            else:
                argument = z[2 * H : 3 * H] * ts + z[3 * H :]
                argument = argument if halved else 0.5 * argument
            gate = fastmath.tanh(argument)
        # t_interp = sigmoid(t_a ts + t_b) = 1/2 + gate / 2
        if self.mode == "no_gate":
            new_h = ff1 + (0.5 + 0.5 * gate) * ff2
        else:
            new_h = ff1 * (0.5 - 0.5 * gate) + (0.5 + 0.5 * gate) * ff2
        return new_h, new_h

    def __call__(self, x: mx.array, h: mx.array, ts=1.0):
        return self.recurrent_step(self.project_input(x), h, ts)


class WiredCfCCell(nn.Module):
    """A CfC whose neurons follow a wiring: one masked ``CfCCell`` per wiring layer.

    Layer ``l`` (``layer_0``, ``layer_1``, ...) reads the previous layer's output (layer 0 the
    input) through the wiring's adjacency and its own state densely. The state is the layers'
    states concatenated, (B, wiring.units).

    Args:
        input_size: input features; builds the wiring (None if the wiring is already built).
        wiring: an ``ncps_mlx.wirings.Wiring``.
        mode: "default", "pure" or "no_gate".
        ff_activation: "tanh" (ncps.torch) or None (ncps.tf/keras), see ``CfCCell``.
        motor_output: False returns the last layer's neurons (ncps.torch); True slices them to
            the wiring's ``output_dim`` motor neurons, as ncps.tf/keras do (reference-notes
            point 5). The two agree for NCP/AutoNCP, whose last layer is the motor layer.
    """

    def __init__(self, input_size, wiring, mode: str = "default", ff_activation="tanh", motor_output: bool = False):
        super().__init__()
        if input_size is not None:
            wiring.build(input_size)
        if not wiring.is_built():
            raise ValueError(
                "The wiring does not know its number of input features: pass input_size or call wiring.build()"
            )
        self.wiring = wiring
        self.motor_output = motor_output
        in_features = wiring.input_dim
        for layer_id in range(wiring.num_layers):
            neurons = wiring.get_neurons_of_layer(layer_id)
            if layer_id == 0:
                input_sparsity = wiring.sensory_adjacency_matrix[:, neurons]
            else:
                previous = wiring.get_neurons_of_layer(layer_id - 1)
                input_sparsity = wiring.adjacency_matrix[:, neurons][previous, :]
            mask = np.concatenate([input_sparsity, np.ones((len(neurons), len(neurons)))], axis=0)
            cell = CfCCell(
                in_features,
                len(neurons),
                mode,
                backbone_layers=0,
                backbone_units=0,
                sparsity_mask=mask,
                ff_activation=ff_activation,
            )
            setattr(self, f"layer_{layer_id}", cell)
            in_features = len(neurons)
        self.layer_sizes = tuple(len(wiring.get_neurons_of_layer(i)) for i in range(wiring.num_layers))

    @property
    def layers(self):
        return [getattr(self, f"layer_{i}") for i in range(len(self.layer_sizes))]

    @property
    def state_size(self) -> int:
        return self.wiring.units

    @property
    def output_size(self) -> int:
        """Features this cell returns: the motor neurons, or the whole last layer."""
        return self.wiring.output_dim if self.motor_output else self.layer_sizes[-1]

    def project_input(self, x: mx.array) -> mx.array:
        return self.layer_0.project_input(x)

    def prepare(self):
        return [layer.prepare() for layer in self.layers]

    def recurrent_step(self, u: mx.array, h: mx.array, ts=1.0, prepared=None):
        """u (B, P), h (B, units), ts float or (B, 1) -> (output (B, F), new state (B, units)).
        Computed feature-major, as ``CfCCell.step_features``: each layer's state is then a
        block of rows."""
        prepared = self.prepare() if prepared is None else prepared
        ts = _features_first(ts)
        offsets = np.cumsum(self.layer_sizes)[:-1].tolist()
        states = mx.split(h.T, offsets, axis=0)
        new_states = []
        out, state = self.layer_0.step_features(u.T, states[0], ts, prepared[0])
        new_states.append(state)
        for layer, state, weights in zip(self.layers[1:], states[1:], prepared[1:]):
            input_weight, bias = weights[:2]
            out, state = layer.step_features(mx.addmm(bias[:, None], input_weight, out), state, ts, weights)
            new_states.append(state)
        if self.motor_output:
            out = out[: self.wiring.output_dim]
        return out.T, mx.concatenate(new_states, axis=0).T

    def __call__(self, x: mx.array, h: mx.array, ts=1.0):
        return self.recurrent_step(self.project_input(x), h, ts)


def _features_first(ts):
    """A timespan for ``step_features``: a number or 0-d array as it is, (B, 1) as (1, B)."""
    return ts.T if isinstance(ts, mx.array) and ts.ndim == 2 else ts
