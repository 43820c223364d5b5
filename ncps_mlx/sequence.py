"""The one time loop that CfC, LTC, CTRNN and CTGRU share.

``SequenceModel`` wraps a cell (see ``ncps_mlx.cells``) and handles everything about sequences:
batch-first or time-first layout, unbatched input, the initial state, timespans,
``return_sequences``, mixed memory (both reference circuits) and the output projection.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn

from . import fastmath, runtime
from .runtime import stepping
from .cells._common import check_choice, check_int
from .cells.memory import MEMORY_CIRCUITS, LSTMCell
from .memo import ParameterMemo


class SequenceModel(nn.Module):
    """Runs ``rnn_cell`` over a sequence.

    ``model(x, hx=None, timespans=None) -> (output, state)``

    Shapes (B batch, T time, I input_size, S state_size, F output features):

    * ``x``: (B, T, I) with ``batch_first``, (T, B, I) without, or unbatched (T, I).
    * ``hx``: (B, S), or unbatched (S,); with mixed memory a tuple ``(h, c)`` of two such.
      None starts from zeros.
    * ``timespans``: elapsed time per step. A scalar, or (B, T) / (B, T, 1) (time-first:
      (T, B) / (T, B, 1); unbatched: (T,) / (T, 1)). A leading batch axis of 1 broadcasts.
      Any batch size works (ncps.torch breaks for batch > 1: reference-notes point 7).
    * ``output``: (B, T, F) / (T, B, F) / (T, F) with ``return_sequences``, else the last
      step's (B, F) / (F,). F is ``proj_size`` when given.
    * ``state``: the final ``h`` (B, S), or ``(h, c)`` with mixed memory.
    * ``mask`` (batched input only): None, or (B, T) booleans (time-first: (T, B)); a False
      step is skipped, as Keras skips a masked step: the state is kept and the output is the
      previous step's (zeros before the first). A masked call runs each sample's kept steps
      alone, in the kernels where they apply.

    Mixed memory adds ``lstm`` (``ncps_mlx.cells.LSTMCell``); ``memory_circuit`` picks where its
    output goes: "state" (ncps.torch, default) or "input" (ncps.tf/keras MixedMemoryRNN).
    """

    def __init__(
        self,
        rnn_cell: nn.Module,
        *,
        input_size: int,
        return_sequences: bool = True,
        batch_first: bool = True,
        mixed_memory: bool = False,
        memory_circuit: str = "state",
        proj_size: int | None = None,
    ):
        super().__init__()
        check_choice("memory_circuit", memory_circuit, MEMORY_CIRCUITS)
        if proj_size is not None:
            check_int("proj_size", proj_size)
        self.input_size = int(input_size)
        self.return_sequences = bool(return_sequences)
        self.batch_first = bool(batch_first)
        self.use_mixed = bool(mixed_memory)
        self.memory_circuit = memory_circuit
        self.proj_size = proj_size
        self.rnn_cell = rnn_cell
        if self.use_mixed:
            self.lstm = LSTMCell(self.input_size, self.state_size)
        self.fc = nn.Linear(rnn_cell.output_size, proj_size) if proj_size is not None else None

    @staticmethod
    def cell_input_size(input_size: int, state_size: int, mixed_memory: bool, memory_circuit: str) -> int:
        """Input features the cell sees: the LSTM's output (state_size) in the "input" circuit."""
        return state_size if mixed_memory and memory_circuit == "input" else input_size

    @property
    def state_size(self) -> int:
        return self.rnn_cell.state_size

    def get_config(self) -> dict:
        """JSON-ready constructor arguments plus ``"class"``; a wiring becomes its exact
        description (``wirings.describe``), so ``model_from_config`` needs no seed."""
        from .wirings import Wiring, describe

        config = {"class": type(self).__name__}
        for key, value in self._arguments.items():
            config[key] = describe(value) if isinstance(value, Wiring) else value
        return config

    def __call__(self, x, hx=None, timespans=None, mask=None):
        x = mx.array(x) if not isinstance(x, mx.array) else x
        if x.ndim not in (2, 3):
            raise ValueError(
                f"Expected input of shape (batch, time, features){'' if self.batch_first else ' time-first'} "
                f"or unbatched (time, features); got {x.ndim}-D input of shape {tuple(x.shape)}"
            )
        batched = x.ndim == 3
        # One step (a controller's call) runs at once where it can (runtime.at_once): the views
        # below, computed copies where their arrays are computed.
        at_once = x.shape[0 if not batched or not self.batch_first else 1] == 1 and runtime.at_once()
        if not batched:
            x = runtime.reshaped(x, (1, *x.shape)) if at_once else x[None]
        elif not self.batch_first:
            x = runtime.reshaped(x, (x.shape[1], 1, x.shape[2])) if at_once else x.swapaxes(0, 1)
        batch, steps, features = x.shape
        if features != self.input_size:
            raise ValueError(
                f"Input has {features} features (last axis) but the model was built for input_size={self.input_size}"
            )
        if steps == 0:
            raise ValueError("Input sequence is empty (0 time steps)")

        ts = self._timespans(timespans, batch, steps, batched, at_once)
        if ts is not None and mx.issubdtype(x.dtype, mx.floating) and ts.dtype != x.dtype:
            ts = ts.astype(x.dtype)  # a float16/bfloat16 input keeps its dtype through the time gate
        h, c = self._initial_state(hx, x, batched, at_once)
        mask = self._mask(mask, batch, steps, batched, at_once)
        y, h, c = self._run(x, h, c, ts, mask, at_once and mask is None)
        if not batched:
            y, h = (runtime.reshaped(a, a.shape[1:]) if at_once else a[0] for a in (y, h))
            c = None if c is None else runtime.reshaped(c, c.shape[1:]) if at_once else c[0]
        elif self.return_sequences and not self.batch_first:
            y = runtime.reshaped(y, (1, *y.shape[::2])) if at_once else y.swapaxes(0, 1)
        return y, ((h, c) if self.use_mixed else h)

    def _mask(self, mask, batch: int, steps: int, batched: bool, at_once: bool = False):
        """None, or the mask as (B, T, 1) booleans. None also for a one-step call (``at_once``)
        whose mask is computed and keeps every row: that step is the unmasked step."""
        if mask is None:
            return None
        mask = mask if isinstance(mask, mx.array) else mx.array(mask)
        expected = (batch, steps) if self.batch_first else (steps, batch)
        if not batched or tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape {expected} (one boolean per sample and step) for batched input; got {tuple(mask.shape)}")
        if at_once and steps == 1 and runtime.keeps_every_row(mask):
            return None
        mask = mask if self.batch_first else mask.T
        return mask.astype(mx.bool_)[..., None]

    def _run(self, x, h, c, ts, mask=None, at_once=False):
        """x (B, T, I), h and c (B, S), ts None or (B, T, 1) or 0-d -> (y, h, c); picks how
        to run the loop (see ``ncps_mlx.runtime.stepping``). ``at_once``: a one-step call, run
        at once where the kernels can (``runtime.at_once``)."""
        lowering, lstm_lowering, has_dropout = self._lowered()
        # The sequence's dropout masks, drawn here for the kernel and the plain loop alike (drawn
        # inside a compiled step, they would be frozen into its graph).
        keep = None
        if self.training and has_dropout:
            draw = runtime.dropout_masks if x.dtype == mx.float32 and runtime.dropout_masks_apply() else None
            keep = self.rnn_cell.dropout_keep(x.shape[0], x.shape[1], x.dtype, draw)
        cell_reads_x = not (self.use_mixed and self.memory_circuit == "input")

        if at_once and keep is None:  # a one-step call, computed now where its arrays are
            done = runtime.step_at_once(lowering, x, h, ts, memory=(lstm_lowering, c) if self.use_mixed else None,
                                        memory_circuit=self.memory_circuit)
            if done is not None:
                outs, h, memory = done
                y = outs if self.return_sequences else runtime.last_step(outs, now=True)
                return self._projected_output(y, at_once=True), h, (memory if self.use_mixed else c)

        # A cell's whole loop in one kernel node, where one applies (None where not); an ordinary
        # node of MLX's graph, so also under mx.vmap and mx.compile.
        def run(x, h, c, ts, keep):
            memory = (lstm_lowering, c) if self.use_mixed else None
            return runtime.sequence_kernel(lowering, x, h, ts, memory=memory, keep=keep, memory_circuit=self.memory_circuit)

        kernel = run(x, h, c, ts, keep) if mask is None else _kept_steps_only(run, x, h, c, ts, keep, mask[..., 0])
        if kernel is not None:
            outs, states = kernel[:2]
            y, h = (outs if self.return_sequences else runtime.last_step(outs)), runtime.last_step(states)
            c = runtime.last_step(kernel[2]) if self.use_mixed else c
            return self._projected_output(y), h, c

        h, c = _batched_as(x, h), _batched_as(x, c)
        parameters = self.parameters()
        leaves = [x, h] + ([] if c is None else [c]) + ([] if ts is None else [ts])
        stepping.flatten(parameters, leaves)
        traced = stepping.under_transformation(leaves)
        # runtime.stepping's worker thread cannot run a bfloat16 backward pass yet ("There is no
        # Stream(cpu, 0) in current thread"): there the plain loop, with MLX's own gradient.
        bfloat16_traced = traced and x.dtype == mx.bfloat16
        if mask is not None or keep is not None or bfloat16_traced or (traced and not stepping.can_evaluate(leaves)):
            mode = "eager"
        else:
            mode = "differentiable" if traced else "compiled"

        with fastmath.exact_functions(mode == "eager"):
            # Compiled, a projection that is not differentiated takes the bare rational, as the
            # steps do: around the custom-gradient sigmoid the LTC's sensory term did not fuse.
            with fastmath.inline_functions() if mode == "compiled" else contextlib.nullcontext():
                # A (B, T, 4H) view of a feature-major array, as it was when the CfC kernel read
                # it: the MLX path computes the numbers it computed.
                lstm_inputs = _projected(self.lstm, lstm_lowering, x, features_first=True) if self.use_mixed else None
                cell_inputs = _projected(self.rnn_cell, lowering, x) if cell_reads_x else None
            # Loop-invariant weights (masked, fused, transposed, constrained) are made once here.
            prepared = self.rnn_cell.prepare()
            lstm_prepared = self.lstm.prepare() if self.use_mixed else None

            if mode in ("compiled", "differentiable"):
                fixed_leaves = []
                fixed = stepping.flatten((parameters, prepared, lstm_prepared), fixed_leaves)
            if mode == "differentiable":
                sequence_leaves = []
                features_first = cell_inputs is not None and getattr(self.rnn_cell, "features_first_inputs", False)
                inputs = cell_inputs.transpose(1, 2, 0) if features_first else cell_inputs
                sequence_args = stepping.flatten((inputs, lstm_inputs, h, c, ts), sequence_leaves)
                outs, h, c = self._steps().sequence(fixed, sequence_args, fixed_leaves + sequence_leaves, features_first)
                y = outs if self.return_sequences else outs[:, -1]
            elif mode == "compiled":
                y, h, c = self._steps().run_forward(fixed, fixed_leaves, cell_inputs, lstm_inputs, h, c, ts, x=x)
                y = y if self.return_sequences else y[:, -1]
            elif mode == "eager":

                def step(u, lstm_u, h, c, ts, keep=None):
                    return self.model_step(u, lstm_u, h, c, ts, prepared, lstm_prepared, keep)

                outs, hs, cs = self.time_loop(step, cell_inputs, lstm_inputs, h, c, ts, mask, keep)
                h, c = hs[-1], cs[-1]
                y = mx.stack(outs, axis=1) if self.return_sequences else outs[-1]
        if self.fc is not None:
            y = self.fc(y)
        return y, h, c

    def _projected_output(self, y, at_once=False):
        """``fc(y)`` (``proj_size``), at once where y was computed at once (a one-step call)."""
        if self.fc is None:
            return y
        projected = runtime.linear_at_once(y, self.fc.weight, self.fc.bias) if at_once and "bias" in self.fc else None
        return self.fc(y) if projected is None else projected

    @staticmethod
    def time_loop(step, cell_inputs, lstm_inputs, h, c, ts, mask=None, dropout=None):
        """Runs ``step(u_t, lstm_u_t, h, c, ts_t) -> (out, h, c)`` over T steps (with
        ``dropout``, the dropout masks (T, ...), ``step(..., dropout[t])``).

        cell_inputs / lstm_inputs: (B, T, P) or None; h, c: (B, S) (c None without mixed memory);
        ts: None (1.0 per step), a 0-d array, or (B, T, 1); mask: None or (B, T, 1) booleans, where
        a False step is skipped as Keras skips a masked step: the state is kept and the output is
        the previous step's (zeros before the first). Returns the lists of outs, hs, cs.
        """
        steps = (cell_inputs if cell_inputs is not None else lstm_inputs).shape[1]
        outs, hs, cs = [], [], []
        for t in range(steps):
            ts_t = SequenceModel.timespan_at(ts, t)
            u_t = None if cell_inputs is None else cell_inputs[:, t]
            lstm_u_t = None if lstm_inputs is None else lstm_inputs[:, t]
            new_out, new_h, new_c = step(u_t, lstm_u_t, h, c, ts_t) if dropout is None else step(u_t, lstm_u_t, h, c, ts_t, dropout[t])
            if mask is None:
                out, h, c = new_out, new_h, new_c
            else:
                keep = mask[:, t]
                out = mx.where(keep, new_out, outs[-1] if outs else mx.zeros_like(new_out))
                h = mx.where(keep, new_h, h)
                c = None if c is None else mx.where(keep, new_c, c)
            outs.append(out)
            hs.append(h)
            cs.append(c)
        return outs, hs, cs

    @staticmethod
    def timespan_at(ts, t):
        """Step t's timespan from the loop's ts (None, a 0-d array, or (B, T, 1)): 1.0, the 0-d
        array, or (B, 1)."""
        if ts is None:
            return 1.0
        return ts if ts.ndim < 3 else ts[:, t]

    def _lowered(self) -> tuple:
        """(the cell's lowering, the LSTM's or None, whether the model has a Dropout), made again
        only when a parameter or submodule changed (``ncps_mlx.memo``): a call with one step
        does not re-derive the kernels' weights."""
        memo = self.__dict__.get("_lowering_memo")
        if memo is None:
            memo = self.__dict__["_lowering_memo"] = ParameterMemo(_lowerings)
        return memo(self)

    def _steps(self) -> stepping.Steps:
        steps = self.__dict__.get("_compiled_steps")
        if steps is None:
            steps = self.__dict__["_compiled_steps"] = stepping.Steps(self)
        return steps

    def model_step(self, u, lstm_u, h, c, ts, prepared, lstm_prepared, keep=None):
        """One time step of the whole model: (output, h, c); c is None without mixed memory;
        ``keep``: the step's dropout masks (``CfCCell.dropout_keep``)."""
        if self.use_mixed:
            memory_out, c = self.lstm.recurrent_step(lstm_u, h, c, lstm_prepared)
            if self.memory_circuit == "state":
                h = memory_out
            else:
                u = self.rnn_cell.project_input(memory_out)
        out, h = self.rnn_cell.recurrent_step(u, h, ts, prepared) if keep is None else self.rnn_cell.recurrent_step(u, h, ts, prepared, keep)
        return out, h, c

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_compiled_steps", None)
        state.pop("_lowering_memo", None)
        return state

    def _timespans(self, timespans, batch: int, steps: int, batched: bool, at_once: bool = False):
        """None, a 0-d array, or (B, T, 1); computed at once where ``at_once`` and they are."""
        if timespans is None:
            return None
        if isinstance(timespans, (int, float)):
            return mx.array(float(timespans))
        ts = mx.array(timespans) if not isinstance(timespans, mx.array) else timespans
        ts = given = ts.astype(mx.float32) if not mx.issubdtype(ts.dtype, mx.floating) else ts
        if ts.ndim == 0:
            return ts
        shape = tuple(ts.shape)
        if not batched:
            if ts.ndim == 2 and shape[1] == 1:
                ts = ts[:, 0]
            if ts.ndim != 1 or ts.shape[0] != steps:
                raise ValueError(f"timespans for unbatched input must have shape ({steps},) or ({steps}, 1); got {shape}")
            return runtime.reshaped(given, (1, 1, 1)) if at_once else ts.reshape(1, steps, 1)
        if ts.ndim == 3:
            if shape[2] != 1:
                raise ValueError(f"3-D timespans must have a last axis of size 1; got shape {shape}")
            ts = ts[..., 0]
        if ts.ndim != 2:
            raise ValueError(f"timespans must be a scalar, (batch, time) or (batch, time, 1); got shape {shape}")
        if not self.batch_first:
            ts = ts.T
        if ts.shape[1] != steps or ts.shape[0] not in (1, batch):
            expected = f"({batch}, {steps})" if self.batch_first else f"({steps}, {batch})"
            raise ValueError(
                f"timespans of shape {shape} do not match the input: expected {expected}, optionally with a "
                "trailing axis of 1 (a batch axis of 1 broadcasts)"
            )
        if at_once and given.size == batch:  # a one-step call's, in (B, 1, 1) order already
            return runtime.reshaped(given, (batch, 1, 1))
        return mx.broadcast_to(ts, (batch, steps))[..., None]

    def _initial_state(self, hx, x, batched: bool, at_once: bool = False):
        """(h, c) as given (checked), or zeros of x's dtype; c None without mixed memory;
        computed at once where ``at_once`` and they are."""
        batch = x.shape[0]
        if hx is None:
            dtype = x.dtype if mx.issubdtype(x.dtype, mx.floating) else mx.float32
            zeros = mx.zeros((batch, self.state_size), dtype)
            return zeros, (zeros if self.use_mixed else None)
        if self.use_mixed:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise ValueError(
                    "This model uses mixed_memory, so hx must be a tuple (h, c) of two arrays; "
                    f"got {type(hx).__name__}. Pass hx=(h, c), or hx=None to start from zeros."
                )
            h, c = (self._check_state(s, name, batch, batched, at_once) for s, name in zip(hx, ("h", "c")))
            return h, c
        if isinstance(hx, (tuple, list)):
            raise ValueError("hx must be a single array for a model without mixed_memory; got a tuple")
        return self._check_state(hx, "hx", batch, batched, at_once), None

    def _check_state(self, state, name: str, batch: int, batched: bool, at_once: bool = False) -> mx.array:
        state = mx.array(state) if not isinstance(state, mx.array) else state
        expected = (batch, self.state_size) if batched else (self.state_size,)
        if tuple(state.shape) != expected:
            raise ValueError(
                f"Initial state {name} has shape {tuple(state.shape)}; expected {expected} "
                f"({'(batch, state_size)' if batched else '(state_size,) for unbatched input'})"
            )
        if batched:
            return state
        return runtime.reshaped(state, (1, *state.shape)) if at_once else state[None]


def _batched_as(x, state):
    """The initial state for MLX's path: batched under mx.vmap as x is, also a given one that is
    not (MLX's vmap of addmm fails where only the addend is batched: a CfC's first step), in x's
    floating dtype as a sum would promote it. A select on a condition read from x does it
    (either branch is the state, NaN or not). The kernels' nodes batch what vmap gives them."""
    if state is None:
        return None
    if mx.issubdtype(x.dtype, mx.floating) and state.dtype != x.dtype:
        state = state + mx.zeros((), x.dtype)
    return mx.where(x[:, :1, 0] == 0, state, state)


def _kept_steps_only(run, x, h, c, ts, keep, mask):
    """A masked loop as ``run(x, h, c, ts, keep)`` (a kernel: -> (outputs, states[, memories]),
    each (B, T, .), or None; keep: dropout masks (T, ..., B, .) or None) over each sample's kept
    steps alone, moved to the front; the results
    spread back so that a masked step keeps the state and repeats the output (zeros before the
    first kept step), as ``time_loop`` does with ``mask``. mask (B, T) booleans. The steps after
    a sample's kept ones are run on zeros (timespan 1) and their results never read."""
    batch, steps = mask.shape
    t = mx.arange(steps)
    order = mx.argsort(mx.where(mask, t, t + steps), axis=1)  # each sample's kept steps first, in order
    kept = mx.cumsum(mask.astype(mx.int32), axis=1)  # (B, T): kept steps up to t
    real = (t < kept[:, -1:])[..., None]  # (B, T, 1): a kept step at this place of the compacted sequence
    x = mx.where(real, mx.take_along_axis(x, order[..., None], axis=1), 0)
    if ts is not None and ts.ndim == 3:
        ts = mx.where(real, mx.take_along_axis(ts, order[..., None], axis=1), 1)
    if keep is not None:  # each sample's masks move with its steps
        keep = mx.take_along_axis(keep, order.T.reshape(steps, 1, batch, 1), axis=0)
    result = run(x, h, c, ts, keep)
    if result is None:
        return None
    last = mx.maximum(kept - 1, 0)[..., None]  # (B, T, 1): the compacted step that step t repeats
    started = (kept > 0)[..., None]
    outs = mx.where(started, mx.take_along_axis(result[0], last, axis=1), 0)
    spread = [mx.where(started, mx.take_along_axis(r, last, axis=1), initial[:, None]) for r, initial in zip(result[1:], (h, c))]
    return (outs, *spread)


def _projected(cell, lowering, x, features_first=False):
    """``cell.project_input(x)`` of a sequence, in the runtime's kernels where they apply."""
    y = runtime.project_input(lowering, x, features_first)
    return cell.project_input(x) if y is None else y


def _lowerings(model: SequenceModel) -> tuple:
    lstm = model.lstm.lowered() if model.use_mixed else None
    return model.rnn_cell.lowered(), lstm, any(isinstance(m, nn.Dropout) for m in model.modules())
