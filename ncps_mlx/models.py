"""The sequence models: ``CfC``, ``LTC``, ``CTRNN``, ``CTGRU``.

Each is a cell plus the shared time loop (``ncps_mlx.sequence.SequenceModel``); see that class
for shapes. Constructor arguments mirror ``ncps.torch`` with the same names and defaults; the
options after ``*`` select reference flavours (ncps.tf/keras) so converted models compute the
same function as their source.
"""

from __future__ import annotations

from . import configs, wirings
from .cells import CfCCell, CTGRUCell, CTRNNCell, LTCCell, WiredCfCCell
from .cells._common import check_int
from .sequence import SequenceModel


def _units(units, wired_allowed=True):
    """``units`` checked: a positive int (or a Wiring where allowed)."""
    if wired_allowed and isinstance(units, wirings.Wiring):
        return units
    try:
        return check_int("units", units)
    except TypeError:
        raise TypeError(f"units must be a positive int{' or a Wiring' if wired_allowed else ''}, got {units!r}") from None


def _arguments(frame_locals: dict) -> dict:
    """The constructor's arguments, recorded so ``get_config`` can rebuild the model."""
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}


class CfC(SequenceModel):
    """Closed-form Continuous-time RNN (Hasani et al. 2022), as ``ncps.torch.CfC``.

    Args:
        input_size: input features I.
        units: number of neurons, or an ``ncps_mlx.wirings.Wiring`` for a wired CfC.
        proj_size: if given, a Linear maps each output to ``proj_size`` features (``fc``).
        return_sequences: return every step's output (True) or the last one.
        batch_first: input is (B, T, I) (True) or (T, B, I).
        mixed_memory: add an LSTM memory (state becomes a tuple (h, c)).
        mode: "default", "pure" or "no_gate".
        activation: backbone activation: lecun_tanh, silu, relu, tanh or gelu.
        backbone_units, backbone_layers, backbone_dropout: backbone MLP (defaults 128, 1, 0.0);
            not allowed with a wiring.
        ff_activation: "tanh" on the ff1/ff2 heads (ncps.torch) or None (ncps.tf/keras).
        memory_circuit: "state" (ncps.torch) or "input" (ncps.tf/keras MixedMemoryRNN).
        motor_output: wired only; True slices the output to the wiring's motor neurons
            (ncps.tf/keras). False (ncps.torch) returns the last layer's neurons, which for a
            ``FullyConnected(16, 4)`` wiring is all 16 (reference-notes point 5).

    ``output_size`` follows ncps.torch: the wiring's ``output_dim`` when wired, else ``units``.
    """

    def __init__(
        self,
        input_size: int,
        units,
        proj_size: int | None = None,
        return_sequences: bool = True,
        batch_first: bool = True,
        mixed_memory: bool = False,
        mode: str = "default",
        activation: str = "lecun_tanh",
        backbone_units: int | None = None,
        backbone_layers: int | None = None,
        backbone_dropout: float | None = None,
        *,
        ff_activation: str | None = "tanh",
        memory_circuit: str = "state",
        motor_output: bool = False,
    ):
        arguments = _arguments(locals())
        input_size = check_int("input_size", input_size)
        units = _units(units)
        wired = isinstance(units, wirings.Wiring)
        state_size = units.units if wired else units
        if not wired:
            backbone_units = None if backbone_units is None else check_int("backbone_units", backbone_units)
            backbone_layers = None if backbone_layers is None else check_int("backbone_layers", backbone_layers, 0)
            if backbone_dropout is not None and not 0.0 <= backbone_dropout < 1.0:
                raise ValueError(f"backbone_dropout must be in [0, 1), got {backbone_dropout!r}")
        cell_inputs = SequenceModel.cell_input_size(input_size, state_size, mixed_memory, memory_circuit)
        if wired:
            for name, value in (
                ("backbone_units", backbone_units),
                ("backbone_layers", backbone_layers),
                ("backbone_dropout", backbone_dropout),
            ):
                if value is not None:
                    raise ValueError(f"Cannot use {name} with a wiring: a wired CfC has no backbone")
            cell = WiredCfCCell(cell_inputs, units, mode, ff_activation=ff_activation, motor_output=motor_output)
        else:
            if motor_output:
                raise ValueError("motor_output applies to a wired CfC only; pass a wiring as units")
            cell = CfCCell(
                cell_inputs,
                state_size,
                mode,
                activation,
                128 if backbone_units is None else backbone_units,
                1 if backbone_layers is None else backbone_layers,
                0.0 if backbone_dropout is None else backbone_dropout,
                ff_activation=ff_activation,
            )
        super().__init__(
            cell,
            input_size=input_size,
            return_sequences=return_sequences,
            batch_first=batch_first,
            mixed_memory=mixed_memory,
            memory_circuit=memory_circuit,
            proj_size=proj_size,
        )
        self.wiring = units if wired else None
        self.units = state_size
        self._arguments = arguments

    @property
    def output_size(self) -> int:
        return self.wiring.output_dim if self.wiring is not None else self.units

    @property
    def synapse_count(self) -> int:
        """Synapses between neurons; an unwired CfC counts as fully connected."""
        return self.wiring.synapse_count if self.wiring is not None else self.units * self.units

    @property
    def sensory_synapse_count(self) -> int:
        """Synapses from the input features; an unwired CfC counts as fully connected."""
        if self.wiring is not None:
            return self.wiring.sensory_synapse_count
        return self.rnn_cell.input_size * self.units


class LTC(SequenceModel):
    """Liquid Time-Constant RNN (Hasani et al. 2021), as ``ncps.torch.LTC``.

    Args:
        input_size: input features I.
        units: number of neurons (a ``FullyConnected`` wiring), or a wiring (e.g. ``NCP``).
        return_sequences, batch_first, mixed_memory: as for ``CfC``.
        input_mapping, output_mapping: "affine", "linear" or None.
        ode_unfolds: solver sub-steps per time step.
        epsilon: keeps the solver's denominator away from 0.
        implicit_param_constraints: softplus on gleak, cm, w, sensory_w (ncps.torch.LTC
            default True); False uses them as stored (ncps.tf/keras NonNeg constraints, and
            ncps.torch.LTCCell's default) and ``apply_weight_constraints()`` clips them.
        memory_circuit: "state" (ncps.torch) or "input" (ncps.tf/keras MixedMemoryRNN).

    The output is the wiring's motor neurons (``output_size`` = ``wiring.output_dim``).
    """

    def __init__(
        self,
        input_size: int,
        units,
        return_sequences: bool = True,
        batch_first: bool = True,
        mixed_memory: bool = False,
        input_mapping="affine",
        output_mapping="affine",
        ode_unfolds: int = 6,
        epsilon: float = 1e-8,
        implicit_param_constraints: bool = True,
        *,
        memory_circuit: str = "state",
    ):
        arguments = _arguments(locals())
        input_size = check_int("input_size", input_size)
        units = _units(units)
        wiring = units if isinstance(units, wirings.Wiring) else wirings.FullyConnected(units)
        cell = LTCCell(
            wiring=wiring,
            in_features=SequenceModel.cell_input_size(input_size, wiring.units, mixed_memory, memory_circuit),
            input_mapping=input_mapping,
            output_mapping=output_mapping,
            ode_unfolds=ode_unfolds,
            epsilon=epsilon,
            implicit_param_constraints=implicit_param_constraints,
        )
        super().__init__(
            cell,
            input_size=input_size,
            return_sequences=return_sequences,
            batch_first=batch_first,
            mixed_memory=mixed_memory,
            memory_circuit=memory_circuit,
        )
        self.wiring = wiring
        self._arguments = arguments

    @property
    def output_size(self) -> int:
        return self.wiring.output_dim

    @property
    def synapse_count(self) -> int:
        return self.wiring.synapse_count

    @property
    def sensory_synapse_count(self) -> int:
        # ncps.torch.LTC returns the inter-neuron count here; we count the sensory synapses.
        return self.wiring.sensory_synapse_count

    def apply_weight_constraints(self) -> None:
        """Clip w, sensory_w, cm, gleak at 0 when ``implicit_param_constraints`` is False."""
        self.rnn_cell.apply_weight_constraints()


class CTRNN(SequenceModel):
    """Continuous-time RNN of the LTC paper's code; see ``ncps_mlx.cells.CTRNNCell``.

    Args:
        input_size, units: I and U.
        return_sequences, batch_first, mixed_memory, proj_size, memory_circuit: as for ``CfC``.
        global_feedback, tau, ode_unfolds, delta_t, cell_clip, learn_tau: see ``CTRNNCell``.
            Timespans scale the Euler step: eps = delta_t * ts.
    """

    def __init__(
        self,
        input_size: int,
        units: int,
        proj_size: int | None = None,
        return_sequences: bool = True,
        batch_first: bool = True,
        mixed_memory: bool = False,
        global_feedback: bool = True,
        tau: float = 1.0,
        ode_unfolds: int = 6,
        delta_t: float = 0.1,
        cell_clip: float | None = None,
        learn_tau: bool = False,
        *,
        memory_circuit: str = "state",
    ):
        arguments = _arguments(locals())
        input_size = check_int("input_size", input_size)
        units = _units(units, wired_allowed=False)
        cell = CTRNNCell(
            SequenceModel.cell_input_size(input_size, units, mixed_memory, memory_circuit),
            units,
            global_feedback=global_feedback,
            tau=tau,
            ode_unfolds=ode_unfolds,
            delta_t=delta_t,
            cell_clip=cell_clip,
            learn_tau=learn_tau,
        )
        super().__init__(
            cell,
            input_size=input_size,
            return_sequences=return_sequences,
            batch_first=batch_first,
            mixed_memory=mixed_memory,
            memory_circuit=memory_circuit,
            proj_size=proj_size,
        )
        self.units = int(units)
        self._arguments = arguments

    @property
    def output_size(self) -> int:
        return self.units


class CTGRU(SequenceModel):
    """Continuous-time GRU of the LTC paper's code; see ``ncps_mlx.cells.CTGRUCell``.

    The state is (B, units * M); the output (B, units) before ``proj_size``.

    Args:
        input_size, units: I and U.
        return_sequences, batch_first, mixed_memory, proj_size, memory_circuit: as for ``CfC``.
        M, cell_clip, decay: see ``CTGRUCell``. Timespans matter only with decay="mozer".
    """

    def __init__(
        self,
        input_size: int,
        units: int,
        proj_size: int | None = None,
        return_sequences: bool = True,
        batch_first: bool = True,
        mixed_memory: bool = False,
        M: int = 8,
        cell_clip: float | None = None,
        decay: str = "ltc",
        *,
        memory_circuit: str = "state",
    ):
        arguments = _arguments(locals())
        input_size = check_int("input_size", input_size)
        units, M = _units(units, wired_allowed=False), check_int("M", M)
        state_size = units * M
        cell = CTGRUCell(
            SequenceModel.cell_input_size(input_size, state_size, mixed_memory, memory_circuit),
            units,
            M=M,
            cell_clip=cell_clip,
            decay=decay,
        )
        super().__init__(
            cell,
            input_size=input_size,
            return_sequences=return_sequences,
            batch_first=batch_first,
            mixed_memory=mixed_memory,
            memory_circuit=memory_circuit,
            proj_size=proj_size,
        )
        self.units = int(units)
        self._arguments = arguments

    @property
    def output_size(self) -> int:
        return self.units


MODEL_CLASSES = {cls.__name__: cls for cls in (CfC, LTC, CTRNN, CTGRU)}


def model_from_config(config: dict):
    """Rebuild a model (or a converted graph) from its ``get_config()``; a wiring in it is
    restored exactly."""
    return configs.build(config)


@configs.register(*MODEL_CLASSES)
def _sequence_model(config: dict) -> SequenceModel:
    name = config.pop("class")
    if isinstance(config.get("units"), dict):
        config["units"] = wirings.wiring_from_description(config["units"])
    try:
        return MODEL_CLASSES[name](**config)
    except TypeError as error:
        raise ValueError(f"Invalid {name} config: {error}") from None
