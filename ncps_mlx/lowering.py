"""The public lowering of a cell: what every fast path and exporter needs, nothing else.

``cell.lowered()`` returns a frozen dataclass of this module: the weights masked, constrained
and fused as the step uses them, computed from the cell's parameters with MLX operations (so a
gradient taken through a lowering reaches the parameters), and the cell's configuration as
plain values and enum members. The runtime's kernels (``ncps_mlx.runtime.cpu``) and the ONNX
exporter read a cell through its lowering alone, never through its private members, and find
the kernel for a cell by the lowering's type.

Each enumeration is defined here once: the CfC modes (``Mode``) and the backbone activations
(``BACKBONE_ACTIVATIONS``), each member with the id the C kernels know it by.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from . import fastmath


class Mode(enum.Enum):
    """A CfC's mode; ``kernel_id`` is ``cfc.c``'s number for it."""

    DEFAULT = "default"
    PURE = "pure"
    NO_GATE = "no_gate"

    @property
    def kernel_id(self) -> int:
        return _MODE_IDS[self]


MODES = tuple(mode.value for mode in Mode)
_MODE_IDS = {mode: i for i, mode in enumerate(Mode)}


def lecun_tanh(x: mx.array) -> mx.array:
    """LeCun's scaled tanh, 1.7159 * tanh(0.666 x), the reference CfC backbone default."""
    return 1.7159 * fastmath.tanh(0.666 * x)


@dataclass(frozen=True)
class BackboneActivation:
    """A CfC backbone activation: its reference name, MLX function, ``cfc.c`` id and the class
    of the ``torch.nn`` module ncps.torch builds for it (how a pickled module names it)."""

    name: str
    function: Callable
    kernel_id: int
    torch_module: str


# torch.nn.GELU defaults to the exact erf form; so does mlx.nn.gelu.
BACKBONE_ACTIVATIONS = {
    activation.name: activation
    for activation in (
        BackboneActivation("lecun_tanh", lecun_tanh, 0, "LeCun"),
        BackboneActivation("tanh", fastmath.tanh, 1, "Tanh"),
        BackboneActivation("relu", nn.relu, 2, "ReLU"),
        BackboneActivation("silu", nn.silu, 3, "SiLU"),
        BackboneActivation("gelu", nn.gelu, 4, "GELU"),
    )
}


def backbone_activation(name: str) -> BackboneActivation:
    if name not in BACKBONE_ACTIVATIONS:
        raise ValueError(f"Unknown activation '{name}'; expected one of {sorted(BACKBONE_ACTIVATIONS)}")
    return BACKBONE_ACTIVATIONS[name]


class Lowering:
    """What every lowering has: ``derived``, the runtime's place for what it makes of one."""

    def derived(self, key: str, make: Callable):
        """``make()``, made once per lowering and kept with it (a lowering never changes): the
        arrays a kernel takes, derived from the lowering's, made once for every call that runs
        this lowering (a model keeps its lowering until a parameter changes)."""
        values = self.__dict__.setdefault("_derived", {})
        if key not in values:
            values[key] = make()
        return values[key]


@dataclass(frozen=True)
class CfCLowering(Lowering):
    """A ``CfCCell``. ``first_weight`` (P, I + H) and ``first_bias`` (P,): the layer that reads
    [x; h], the first backbone layer, or without a backbone the fused heads. ``hidden``:
    (weight, bias) of backbone layers 2..n. ``heads``: (weight (K, units), bias (K,)), rows ff1,
    ff2, time_a, time_b (pure mode: ff1 alone, K = H), the sparsity mask applied; None without a
    backbone. ``w_tau``, ``A`` (H,): pure mode's, else None."""

    mode: Mode
    activation: BackboneActivation
    ff_tanh: bool
    input_size: int
    hidden_size: int
    first_weight: mx.array
    first_bias: mx.array
    hidden: tuple
    heads: tuple | None
    w_tau: mx.array | None
    A: mx.array | None

    # A sequence's input projection laid out feature-major, (T, P, B), as the CfC steps read it.
    features_first = True

    @property
    def state_weight(self) -> mx.array:
        """The first layer's state half (P, H)."""
        return self.first_weight[:, self.input_size :]

    def input_projection(self) -> tuple:
        """(weight (P, I), bias (P,)): a sequence's input half of the first layer is x weight^T + bias."""
        return self.first_weight[:, : self.input_size], self.first_bias


@dataclass(frozen=True)
class WiredCfCLowering(Lowering):
    """A ``WiredCfCCell``: one ``CfCLowering`` per wiring layer (none with a backbone; layer i
    reads layer i - 1's output), the layers' state sizes, and ``output_size`` (the motor neurons
    with ``motor_output``, else the last layer's size)."""

    layers: tuple
    layer_sizes: tuple
    output_size: int

    features_first = True

    @property
    def mode(self) -> Mode:
        return self.layers[0].mode

    @property
    def ff_tanh(self) -> bool:
        return self.layers[0].ff_tanh

    def input_projection(self) -> tuple:
        return self.layers[0].input_projection()


@dataclass(frozen=True)
class LTCLowering(Lowering):
    """An ``LTCCell``, its positive parameters constrained (softplus, or as stored) and its
    synapse weights masked: ``w``, ``sensory_w`` (positive, masked); ``cm``, ``gleak`` positive.
    ``input_w``/``input_b``, ``output_w``/``output_b`` as the mappings have them (None where a
    mapping has none)."""

    state_size: int
    motor_size: int
    ode_unfolds: int
    epsilon: float
    input_w: mx.array | None
    input_b: mx.array | None
    sensory_sigma: mx.array
    sensory_mu: mx.array
    sensory_w: mx.array
    sensory_erev: mx.array
    sigma: mx.array
    mu: mx.array
    w: mx.array
    erev: mx.array
    cm: mx.array
    gleak: mx.array
    vleak: mx.array
    output_w: mx.array | None
    output_b: mx.array | None

    def map_input(self, x: mx.array) -> mx.array:
        return _mapped(x, self.input_w, self.input_b)

    def map_outputs(self, v: mx.array) -> mx.array:
        """States (..., S) -> outputs (..., M): the motor neurons, mapped."""
        out = v[..., : self.motor_size] if self.motor_size < self.state_size else v
        return _mapped(out, self.output_w, self.output_b)

    def sensory_synapse_arrays(self) -> tuple:
        """(sigma, mu, w * erev, w), the sensory synapses as the kernels take them (I, S)."""
        return self.sensory_sigma, self.sensory_mu, self.sensory_w * self.sensory_erev, self.sensory_w


# One fused node a call instead of a broadcast, a product and a sum each (a one-step call's cost
# is mostly its nodes).
_scaled_shifted = mx.compile(lambda x, w, b: x * w + b)
_scaled = mx.compile(lambda x, w: x * w)


def _mapped(x, w, b):
    """An LTC's affine, linear or absent input or output mapping."""
    if w is None:
        return x if b is None else x + b
    return _scaled(x, w) if b is None else _scaled_shifted(x, w, b)


@dataclass(frozen=True)
class LSTMLowering(Lowering):
    """Mixed memory's ``LSTMCell``: ``input_weight`` (4H, I), ``input_bias`` (4H,),
    ``recurrent_weight`` (4H, H), ``forget_gate_bias``."""

    input_weight: mx.array
    input_bias: mx.array
    recurrent_weight: mx.array
    forget_gate_bias: float

    features_first = False

    def input_projection(self) -> tuple:
        return self.input_weight, self.input_bias


@dataclass(frozen=True)
class CTRNNLowering(Lowering):
    """A ``CTRNNCell``: ``weight`` (U, I + U) and ``bias`` (U,) of its one layer, ``tau`` (1,)
    (learned: softplus of its raw value)."""

    input_size: int
    units: int
    weight: mx.array
    bias: mx.array
    tau: mx.array
    ode_unfolds: int
    delta_t: float
    cell_clip: float | None
    global_feedback: bool

    features_first = False

    def input_projection(self) -> tuple:
        return self.weight[:, : self.input_size], self.bias


@dataclass(frozen=True)
class CTGRULowering(Lowering):
    """A ``CTGRUCell``: the input halves of tau_r, tau_s and detect stacked (``input_weight``
    (2UM + U, I), ``input_bias``), their state halves transposed (``w_r``, ``w_s`` (U, U M),
    ``w_q`` (U, U)), and the time scales as constants: ``ln_tau`` (M,) and ``decay`` (M,), the
    LTC-style decay per step or, with ``mozer``, 1 / tau to be scaled by the timespan."""

    input_size: int
    units: int
    M: int
    mozer: bool
    cell_clip: float | None
    input_weight: mx.array
    input_bias: mx.array
    w_r: mx.array
    w_s: mx.array
    w_q: mx.array
    ln_tau: tuple
    decay: tuple

    features_first = False

    def input_projection(self) -> tuple:
        return self.input_weight, self.input_bias
