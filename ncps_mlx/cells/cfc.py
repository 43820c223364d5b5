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
from ..lowering import MODES, CfCLowering, Mode, WiredCfCLowering
from ..lowering import backbone_activation as backbone_activation_of
from ._common import check_choice, glorot_uniform

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
        self.activation = backbone_activation_of(backbone_activation).function

        self.backbone_units = int(backbone_units)
        self.dropout_rate = float(backbone_dropout)
        self.dropout = None
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

    def lowered(self) -> CfCLowering:
        """What the kernels and the ONNX exporter read of this cell (``ncps_mlx.lowering``)."""
        weight, bias = self._first_layer()
        pure = self.mode == "pure"
        return CfCLowering(
            mode=Mode(self.mode),
            activation=backbone_activation_of(self.activation_name),
            ff_tanh=self.ff_activation == "tanh",
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            first_weight=weight,
            first_bias=bias,
            hidden=tuple((layer.weight, layer.bias) for layer in self.backbone[1:]) if self.backbone_layers else (),
            heads=self._heads() if self.backbone_layers else None,
            w_tau=self.w_tau.reshape(-1) if pure else None,
            A=self.A.reshape(-1) if pure else None,
        )

    def _first_layer(self):
        """The layer that reads [x; h]: the first backbone layer, or the fused heads."""
        if self.backbone_layers > 0:
            return self.backbone[0].weight, self.backbone[0].bias
        return self._heads()

    # ``project_input`` of a sequence is a transposed view of a (T, P, B) array.
    features_first_inputs = True

    def input_projection(self):
        """(weight (P, I), bias (P,)): ``project_input`` is x weight^T + bias."""
        weight, bias = self._first_layer()
        return weight[:, : self.input_size], bias

    def project_input(self, x: mx.array) -> mx.array:
        """(..., I) -> (..., P): the input half of the first layer, bias included.

        A sequence (B, T, I) gives (B, T, P) laid out feature-major, a transposed view of
        (T, P, B), so that each step's input is contiguous for ``step_features``. The bias is
        added after the product: ``mx.addmm`` would first copy it, broadcast, into the output
        with MLX's slower general strided copy."""
        weight, bias = self._first_layer()
        weight = weight[:, : self.input_size]
        if x.ndim == 3:
            return (weight @ x.transpose(1, 2, 0) + bias[:, None]).transpose(2, 0, 1)
        return mx.addmm(bias, x, weight.T)

    def prepare(self):
        """Loop-invariant tensors: (input weight (P, I), bias (P, 1), state weight (P, H), heads,
        hidden layers).

        The first layer split into its input and state halves, (out, in) and contiguous, as
        ``step_features`` multiplies them. ``heads`` is None without a backbone, else the fused
        head layer twice, (weight (K, units), bias (K, 1)) each, rows ff1, ff2 and then the
        time gate's halved terms (exact: a power of two): (t_a + t_b) / 2 for a timespan of
        1.0 (K = 3H; sigmoid(v) = 1/2 + tanh(v / 2) / 2, so the gate is one tanh), else t_a / 2
        and t_b / 2 (K = 4H). Pure mode has the ff1 head alone, in both. ``hidden layers``:
        (weight, bias (units, 1)) of backbone layers 2..n.
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
                halved = mx.concatenate([mx.ones((2 * H, 1), head_weight.dtype), mx.full((2 * H, 1), 0.5, head_weight.dtype)])
                weight_4, bias_4 = head_weight * halved, head_bias * halved
                fused = [weight_4[: 2 * H], weight_4[2 * H : 3 * H] + weight_4[3 * H :]]
                fused_bias = [bias_4[: 2 * H], bias_4[2 * H : 3 * H] + bias_4[3 * H :]]
                heads = (mx.concatenate(fused), mx.concatenate(fused_bias), weight_4, bias_4)
        hidden = tuple((layer.weight, layer.bias[:, None]) for layer in self.backbone[1:]) if self.backbone_layers else ()
        I = self.input_size
        return mx.contiguous(weight[:, :I]), bias[:, None], mx.contiguous(weight[:, I:]), heads, hidden

    def expand_biases(self, prepared, batch: int):
        """``prepare()``'s output with the biases of its products contiguous (features, batch)
        arrays, made once for a loop that is not differentiated (``ncps_mlx.runtime.stepping``). Given
        a (K, 1) bias, ``mx.addmm`` copies it, broadcast, into its output at every step with
        MLX's general strided copy."""

        def expanded(bias):
            return mx.contiguous(mx.broadcast_to(bias, (bias.shape[0], batch)))

        weight, bias, state_weight, heads, hidden = prepared
        if heads is not None:
            heads = (heads[0], expanded(heads[1]), heads[2], expanded(heads[3]))
        hidden = tuple((w, expanded(b)) for w, b in hidden)
        return weight, expanded(bias), state_weight, heads, hidden

    def recurrent_step(self, u: mx.array, h: mx.array, ts=1.0, prepared=None, keep=None):
        """u (B, P), h (B, H), ts float or (B, 1) -> (output (B, H), new state (B, H)).
        ``keep``: this step's dropout masks (layers - 1, B, units), a step of ``dropout_keep``'s;
        None: the cell's own ``Dropout`` draws them (an identity outside training)."""
        out, h = self.step_features(u.T, h.T, _features_first(ts), prepared, keep)
        return out.T, h.T

    def dropout_keep(self, batch: int, steps: int, dtype=mx.float32, draw=None):
        """A sequence's dropout masks, (T, layers - 1, B, units): 0, or 1 / (1 - rate) (as
        ``nn.Dropout`` scales), one per activation of backbone layers 2..n (reference-notes
        point 4), drawn with ``mx.random`` (``mx.random.seed`` repeats them), or by
        ``draw(shape, kept) -> masks`` (the kernels' faster generator, keyed by ``mx.random``).
        None where the cell has no dropout."""
        if self.dropout is None or self.backbone_layers < 2:
            return None
        kept = 1.0 - self.dropout_rate
        shape = (steps, self.backbone_layers - 1, batch, self.backbone_units)
        if draw is not None:
            return draw(shape, kept)
        return mx.random.bernoulli(kept, shape).astype(dtype) * mx.array(1.0 / kept, dtype)

    def step_features(self, u: mx.array, h: mx.array, ts=1.0, prepared=None, keep=None):
        """The step feature-major: u (P, B), h (H, B), ts a float or (1, B) -> (output (H, B),
        new state (H, B)).

        The heads are then row blocks of one matrix product, so every elementwise operation
        reads whole contiguous rows. MLX vectorises a compiled loop only over contiguous
        inputs; batch-major, the heads are column slices read with strides, in scalar loops.
        ``recurrent_step`` and the sequence loop pass transposed views, so the state stays
        feature-major from step to step without a copy.
        """
        prepared = self.prepare() if prepared is None else prepared
        y, _, _ = self._layers(u, h, ts, prepared, keep)
        new_h = self._tail(y, ts)
        return new_h, new_h

    def _layers(self, u, h, ts, prepared, keep=None):
        """The matrix products of a step, feature-major: (head input y (K, B), the backbone's
        pre-activations and activations). Without a backbone y is the first layer's output."""
        _, _, state_weight, heads, hidden = prepared
        z = mx.addmm(u, state_weight, h)
        if self.backbone_layers == 0:
            return z, [], []
        zs, activations = [z], [self.activation(z)]
        for i, (weight, bias) in enumerate(hidden):
            zs.append(mx.addmm(bias, weight, activations[-1]))
            activations.append(self.activation(zs[-1]))
            if keep is not None:
                activations[-1] = activations[-1] * keep[i].T
            elif self.dropout is not None:
                # Drawn batch-major, so a seed gives the masks it gave before this layout.
                activations[-1] = self.dropout(activations[-1].T).T
        weight, bias = heads[:2] if _unit(ts) else heads[2:]
        return mx.addmm(bias, weight, activations[-1]), zs, activations

    def _tail(self, y, ts):
        """The elementwise rest of a step: head input y (K, B) -> new state (H, B)."""
        if self.mode == "pure":
            w_tau, A = self.w_tau.T, self.A.T
            return -A * mx.exp(-ts * (mx.abs(w_tau) + mx.abs(y))) * y + A
        return self._combine(self._tail_parts(y, ts))

    def _combine(self, parts):
        ff1, ff2, gate = parts
        # t_interp = sigmoid(t_a ts + t_b) = 1/2 + gate / 2
        if self.mode == "no_gate":
            return ff1 + (0.5 + 0.5 * gate) * ff2
        return ff1 * (0.5 - 0.5 * gate) + (0.5 + 0.5 * gate) * ff2

    def _tail_parts(self, y, ts):
        """(ff1, ff2, gate) (H, B) of head input y (K, B), not pure mode; the time gate
        t_interp is 1/2 + gate / 2."""
        H = self.hidden_size
        halved = self.backbone_layers > 0  # prepare() halved the gate rows of the heads
        if halved and _unit(ts) and self.ff_activation == "tanh":
            t = fastmath.tanh(y)  # ff1, ff2 and the gate in one call
            return t[:H], t[H : 2 * H], t[2 * H :]
        ff1, ff2 = y[:H], y[H : 2 * H]
        if self.ff_activation == "tanh":
            both = fastmath.tanh(y[: 2 * H])
            ff1, ff2 = both[:H], both[H:]
        if halved and _unit(ts):
            argument = y[2 * H :]
        else:
            argument = y[2 * H : 3 * H] * ts + y[3 * H :]
            argument = argument if halved else 0.5 * argument
        return ff1, ff2, fastmath.tanh(argument)

    def _tail_jacobian(self, parts, ts):
        """d new state / d y (K, B) of ``_tail`` (not pure mode), from its ``_tail_parts``: the
        tail is row-local (head input row k reaches only state row k mod H), so this is its
        whole Jacobian. Written out rather than taken from ``mx.vjp``, whose slices' vjps pad
        full-size zeros; ``tests/test_stepping.py`` checks it against ``mx.vjp``."""
        ff1, ff2, gate = parts
        halved = self.backbone_layers > 0  # as in _tail_parts
        # d t_interp / d argument; without a backbone the argument is halved at run time
        d_argument = (0.5 if halved else 0.25) * (1.0 - gate * gate)
        if self.mode == "no_gate":
            d_ff1, d_ff2, d_argument = mx.ones_like(ff1), 0.5 + 0.5 * gate, d_argument * ff2
        else:
            d_ff1, d_ff2, d_argument = 0.5 - 0.5 * gate, 0.5 + 0.5 * gate, d_argument * (ff2 - ff1)
        if self.ff_activation == "tanh":
            d_ff1, d_ff2 = d_ff1 * (1.0 - ff1 * ff1), d_ff2 * (1.0 - ff2 * ff2)
        gate_rows = [d_argument] if halved and _unit(ts) else [d_argument * ts, d_argument]
        return mx.concatenate([d_ff1, d_ff2] + gate_rows)

    # Backpropagation through time from saved residuals (``ncps_mlx.runtime.stepping.Steps``): a CfC
    # step is matrix products between elementwise functions, so its vjp needs only what the
    # forward pass computed, where a generic vjp recomputes the step. The protocol, every
    # array feature-major (features, B):
    #   residual_step(u, h, ts, prepared) -> (out, new h, step residuals, gradient residuals):
    #       the step residuals are the derivatives that step's vjp needs (with d new h / d ts
    #       where the timespan is an array, so that it gets its gradient)
    #   residual_vjp(step residuals, ts, d out, d new h, prepared) -> (d h, d u, cotangents,
    #       d ts (1, B) or None); d out is 0.0 when the output is the new state (the state's
    #       cotangent has it)
    #   residual_gradients(ts, previous states, gradient residuals, cotangents, prepared)
    #       -> the gradient of ``prepared``, from (F, N) columns of N = steps x B.

    @property
    def residual_backward(self) -> bool:
        """Whether the residual protocol applies: a backbone and a tail without parameters (not
        pure mode), and no dropout."""
        return self.backbone_layers > 0 and self.mode != "pure" and self.dropout is None

    def residual_step(self, u, h, ts, prepared):
        """``step_features`` and its residuals: for the vjp d new h / d head input (K, B) and
        d activation / d pre-activation per backbone layer (units, B), for the gradients the
        activations (units, B)."""
        y, zs, activations = self._layers(u, h, ts, prepared)
        parts = self._tail_parts(y, ts)
        new_h = self._combine(parts)
        # Through tanh/sigmoid's own gradient (``fastmath``: 1 - t^2 of its output), not the
        # derivative of the inline rational that the forward pass traced.
        with fastmath.custom_gradients():
            d_activations = [mx.vjp(lambda v: [self.activation(v)], [z], [mx.ones_like(z)])[1][0] for z in zs]
        jacobian = self._tail_jacobian(parts, ts)
        return new_h, new_h, (jacobian, d_activations, self._timespan_derivative(jacobian, y, ts)), activations

    def _timespan_derivative(self, jacobian, y, ts):
        """d new state / d ts (H, B) where ts is an array (None for a number): the gate's
        argument is t_a ts + t_b, so it is d new state / d t_b (the Jacobian's last rows) t_a."""
        if isinstance(ts, (int, float)):
            return None
        H = self.hidden_size
        return jacobian[-H:] * y[2 * H : 3 * H]

    def residual_vjp(self, derivatives, ts, d_out, d_state, prepared):
        """A step's vjp: (d previous state (H, B), d input (P, B), [d head input (K, B), d
        pre-activation per layer (units, B)])."""
        d_tail, d_activations, d_new_d_ts = derivatives
        _, _, state_weight, heads, hidden = prepared
        d_new = d_out + d_state
        dy = _rows_times(d_tail, d_new)
        d_ts = None if d_new_d_ts is None else mx.sum(d_new_d_ts * d_new, axis=0, keepdims=True)
        d_first, dzs = dy, []
        if d_activations:
            da = (heads[0] if _unit(ts) else heads[2]).T @ dy
            dzs = [None] * len(d_activations)
            for i in reversed(range(len(dzs))):
                dzs[i] = d_activations[i] * da
                if i > 0:
                    da = hidden[i - 1][0].T @ dzs[i]
            d_first = dzs[0]
        return state_weight.T @ d_first, d_first, [dy] + dzs, d_ts

    def residual_gradients(self, ts, states, activations, cotangents, prepared):
        """The gradient of ``prepared`` (its structure, None where there is none) from (F, N)
        columns, N = steps x batch: previous states, activations, and the cotangents of
        ``residual_vjp``. One matrix product per weight."""
        dy, *dzs = cotangents
        if not dzs:
            return None, None, dy @ states.T, None, ()
        d_heads = _summed(dy, activations[-1])
        d_heads = d_heads + (None, None) if _unit(ts) else (None, None) + d_heads
        d_hidden = tuple(_summed(dz, a) for dz, a in zip(dzs[1:], activations[:-1]))
        return None, None, dzs[0] @ states.T, d_heads, d_hidden

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

    def lowered(self) -> WiredCfCLowering:
        """Each layer's ``CfCCell.lowered()``, the layers' sizes and the output size."""
        return WiredCfCLowering(tuple(layer.lowered() for layer in self.layers), self.layer_sizes, self.output_size)

    @property
    def state_size(self) -> int:
        return self.wiring.units

    @property
    def output_size(self) -> int:
        """Features this cell returns: the motor neurons, or the whole last layer."""
        return self.wiring.output_dim if self.motor_output else self.layer_sizes[-1]

    features_first_inputs = True  # as CfCCell's

    def input_projection(self):
        return self.layer_0.input_projection()

    def project_input(self, x: mx.array) -> mx.array:
        return self.layer_0.project_input(x)

    def prepare(self):
        return [layer.prepare() for layer in self.layers]

    def expand_biases(self, prepared, batch: int):
        """``CfCCell.expand_biases`` layer by layer."""
        return [layer.expand_biases(weights, batch) for layer, weights in zip(self.layers, prepared)]

    def recurrent_step(self, u: mx.array, h: mx.array, ts=1.0, prepared=None):
        """u (B, P), h (B, units), ts float or (B, 1) -> (output (B, F), new state (B, units)).
        Computed feature-major, as ``CfCCell.step_features``: each layer's state is then a
        block of rows."""
        out, h = self.step_features(u.T, h.T, _features_first(ts), prepared)
        return out.T, h.T

    def step_features(self, u: mx.array, h: mx.array, ts=1.0, prepared=None):
        """The step feature-major: u (P, B), h (units, B), ts a float or (1, B) -> (output
        (F, B), new state (units, B))."""
        prepared = self.prepare() if prepared is None else prepared
        return self._walk(u, h, ts, prepared, residuals=False)[:2]

    def _walk(self, u, h, ts, prepared, residuals):
        """The layers in turn, feature-major: (out, new h, [d new layer state / d head input
        per layer], [each layer's input after the first]); the two lists only with
        ``residuals``."""
        states = mx.split(h, self._offsets(), axis=0)
        out, new_states, jacobians, layer_inputs, d_ts = u, [], [], [], []
        for i, (layer, state, weights) in enumerate(zip(self.layers, states, prepared)):
            if i > 0:
                layer_inputs.append(out)
                out = mx.addmm(weights[1], weights[0], out)
            y = layer._layers(out, state, ts, weights)[0]
            if residuals:  # not pure mode (``residual_backward``)
                parts = layer._tail_parts(y, ts)
                out = layer._combine(parts)
                jacobians.append(layer._tail_jacobian(parts, ts))
                d_ts.append(layer._timespan_derivative(jacobians[-1], y, ts))
            else:
                out = layer._tail(y, ts)
            new_states.append(out)
        if self.motor_output:
            out = out[: self.wiring.output_dim]
        return out, mx.concatenate(new_states, axis=0), (jacobians, d_ts), layer_inputs

    # The residual protocol of ``CfCCell`` (see there), layer by layer: a layer's output is
    # its new state, and the next layer's input.

    @property
    def residual_backward(self) -> bool:
        return self.layer_0.mode != "pure"

    def _offsets(self):
        return np.cumsum(self.layer_sizes)[:-1].tolist()

    def residual_step(self, u, h, ts, prepared):
        """-> (out, new h, ([d new layer state / d head input per layer], [d new layer state /
        d ts per layer, or None each]), [each layer's input after the first])."""
        return self._walk(u, h, ts, prepared, residuals=True)

    def residual_vjp(self, derivatives, ts, d_out, d_state, prepared):
        """-> (d previous state (units, B), d input (P, B), [d head input per layer], d ts (1, B)
        or None)."""
        jacobians, d_new_d_ts = derivatives
        d_states = mx.split(d_state, self._offsets(), axis=0)
        if d_out.shape[0] < d_states[-1].shape[0]:  # motor_output: the first neurons
            d_out = mx.concatenate([d_out, mx.zeros((d_states[-1].shape[0] - d_out.shape[0], d_out.shape[1]))])
        d_states[-1] = d_states[-1] + d_out
        d_previous, dys, carried, d_ts = [None] * len(d_states), [None] * len(d_states), None, None
        for i in reversed(range(len(d_states))):
            d_new = d_states[i] if carried is None else d_states[i] + carried
            dys[i] = _rows_times(jacobians[i], d_new)
            if d_new_d_ts[i] is not None:
                part = mx.sum(d_new_d_ts[i] * d_new, axis=0, keepdims=True)
                d_ts = part if d_ts is None else d_ts + part
            d_previous[i] = prepared[i][2].T @ dys[i]
            if i > 0:
                carried = prepared[i][0].T @ dys[i]
        return mx.concatenate(d_previous, axis=0), dys[0], dys, d_ts

    def residual_gradients(self, ts, states, layer_inputs, cotangents, prepared):
        """Per layer (input weight, input bias, state weight) gradients; layer 0's input
        weight and bias reach their gradients through ``project_input``."""
        previous = mx.split(states, self._offsets(), axis=0)
        gradients = [(None, None, cotangents[0] @ previous[0].T, None, ())]
        for dy, state, inputs in zip(cotangents[1:], previous[1:], layer_inputs):
            d_weight, d_bias = _summed(dy, inputs)
            gradients.append((d_weight, d_bias, dy @ state.T, None, ()))
        return gradients

    def __call__(self, x: mx.array, h: mx.array, ts=1.0):
        return self.recurrent_step(self.project_input(x), h, ts)


def _rows_times(jacobian, cotangent):
    """jacobian (k H, B) times cotangent (H, B) repeated k times along the rows."""
    K, H = jacobian.shape[0], cotangent.shape[0]
    return (jacobian.reshape(K // H, H, -1) * cotangent).reshape(K, -1)


def _summed(cotangent, inputs):
    """A layer's weight and bias (column) gradients from (F, N) columns."""
    return cotangent @ inputs.T, mx.sum(cotangent, axis=1, keepdims=True)


def _unit(ts) -> bool:
    """A timespan of exactly 1 given as a number (the default): the gate's terms are fused."""
    return isinstance(ts, (int, float)) and ts == 1


def _features_first(ts):
    """A timespan for ``step_features``: a number or 0-d array as it is, (B, 1) as (1, B)."""
    return ts.T if isinstance(ts, mx.array) and ts.ndim == 2 else ts
