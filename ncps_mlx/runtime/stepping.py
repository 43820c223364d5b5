"""How ``SequenceModel`` runs its time loop quickly on MLX: compiled steps, and a compiled
backward pass through time.

On MLX's CPU backend a time step is many small operations that cost more to dispatch than
to compute. Compiled (``mx.compile``), the elementwise ones fuse into a few vectorised loops.
Three ways to run the model's one time loop (``SequenceModel.time_loop``), chosen by ``SequenceModel``:

* ``eager``: the step as written; for active dropout (random draws must not be frozen into
  a graph) and inside ``mx.vmap`` or an outer ``mx.compile``.
* ``compiled``: compiled calls of a few steps each (``Steps.run_forward``). Plain inference.
* ``differentiable``: under ``mx.grad``/``value_and_grad`` the model runs as one
  ``mx.custom_function`` over the whole sequence (``Steps.sequence``). MLX retraces any
  compiled function called while a gradient is being traced, so its forward loop and its
  backward pass run on a worker thread (MLX's tracing state is per thread) over evaluated
  inputs, where the compiled functions come from the cache. Two backward passes:

  - residual (CfC cells, ``Steps._residual_pass``): the forward pass keeps what each step's
    vjp needs (the protocol is in ``ncps_mlx.cells.cfc``), the reverse pass is a few matrix
    products a step, and the weight gradients products over blocks of time x batch columns;
  - generic (every other cell): the steps walked in reverse propagating only the state
    cotangents (a compiled vjp per step, which recomputes that step), then the parameter and
    input gradients of all steps at once from one vjp of the step over all batch x time
    rows: the step treats rows independently, so that vjp is exactly the sum over time,
    done with a few large operations.

  Higher-order gradients through this path are not supported.

Where a cell's loop has a CPU kernel that applies (``runtime.cpu``: on Linux the LTC's, a
CfC's, the CTRNN's, the CTGRU's), ``SequenceModel`` runs that instead of the compiled and
differentiable loops here.

A step function here takes flat lists of arrays ("leaves"): the fixed ones (parameters and
the cell's ``prepare()`` output, the same at every step) and the step's own (input slice,
state, timespan); ``_flatten`` records the rest of their structure (None, numbers) as a
hashable key, one compiled function per key. The parameters are swapped into the model only
while a step is traced, so compiled graphs always read the current ones.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import queue
import threading
import weakref

import mlx.core as mx
import numpy as np

from .. import fastmath


class Steps:
    """The compiled step functions of one model, by the structure of their arguments.

    ``model_step(u, lstm_u, h, c, ts, prepared, lstm_prepared) -> (out, h, c)`` is the model's
    step; ``fixed`` is the structure of (parameters, prepared, lstm_prepared).
    """

    def __init__(self, model):
        self.model = weakref.ref(model)  # no cycle: the model holds this object
        self.cache = {}
        self.kept, self.tokens = {}, 0
        self.last_pass = None  # what this model ran last: a sequence pass's key and shapes

    # Rows (batch x time) per parameter-gradient vjp call, unless the cell says otherwise
    # (``backward_rows``). Measured on 2 cores, batch 32: CfC f+b 436 / 590 / 634 / 606 seq/s
    # at 32 / 128 / 512 / 2048 rows.
    ROW_BUDGET = 512

    def row_budget(self) -> int:
        return getattr(self.model().rnn_cell, "backward_rows", None) or self.ROW_BUDGET

    def _cached(self, key, build):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    @contextlib.contextmanager
    def _model_from(self, fixed, leaves, inline):
        """While tracing a compiled function: the model with the parameters taken from
        ``leaves`` (an iterator over the function's arguments) swapped in, and the cell's and
        LSTM's prepared tensors: (model, prepared, lstm_prepared). ``inline`` traces with the
        bare rational tanh/sigmoid, which fuses better, for what is not differentiated."""
        this = self.model()
        parameters, prepared, lstm_prepared = _unflatten(fixed, leaves)
        current = this.parameters()
        this.update(parameters)
        try:
            with fastmath.inline_functions() if inline else contextlib.nullcontext():
                yield this, prepared, lstm_prepared
        finally:
            this.update(current)

    def _plain_step(self, fixed, step_args, differentiated=True):
        """The step as a function of leaves -> (out, h) or (out, h, c)."""

        def step(*leaves):
            leaves = iter(leaves)
            with self._model_from(fixed, leaves, inline=not differentiated) as (this, prepared, lstm_prepared):
                out, h, c = this.model_step(*_unflatten(step_args, leaves), prepared, lstm_prepared)
            return (out, h) if c is None else (out, h, c)

        return step

    # Steps per compiled call of a forward pass, unless the cell says otherwise
    # (``steps_per_call``): a call's own cost (slicing, flattening, building its graph) is paid
    # once a chunk; beyond 8 a wired CfC's chunks slowed.
    CHUNK = 8

    def chunk(self) -> int:
        return getattr(self.model().rnn_cell, "steps_per_call", None) or self.CHUNK

    def run_forward(self, fixed, fixed_leaves, cell_inputs, lstm_inputs, h, c, ts, every_state=False, x=None):
        """The loop, not differentiated, in compiled chunks of ``chunk()`` steps (each chunk runs
        the model's ``time_loop``, or a cell's ``step_features`` feature-major): -> (Y (B, T, F),
        h, c), h and c the last states (B, S), or with ``every_state`` every step's (B, T, S). c
        is None without mixed memory. ``x`` is given by a forward pass of its own (not a
        sequence pass's)."""
        cell = self.model().rnn_cell
        if x is not None:  # a forward pass of its own, not a sequence pass's
            self.last_pass = None
        projected_only = lstm_inputs is None and cell_inputs is not None  # no mixed memory
        fixed_leaves = self._expanded(fixed, fixed_leaves, h.shape[0])
        if projected_only and getattr(cell, "features_first_inputs", False):
            # Feature-major from end to end: each step's input is a contiguous (P, B) block and
            # the state stays (H, B), where batch-major every step transposed its input, its
            # state and its output (CfC at batch 8: 14 dispatched operations a step, not 18).
            ts = _features_timespans(ts)
            y, h, states = self._chunks(fixed, fixed_leaves, cell_inputs.transpose(1, 2, 0), None, h.T, None, ts,
                                        every_state, features_first=True)
            h = states[0].transpose(2, 0, 1) if every_state else h.T
            return y.transpose(2, 0, 1), h, None
        y, h, states = self._chunks(fixed, fixed_leaves, cell_inputs, lstm_inputs, h, c, ts, every_state)
        c = states[1] if every_state else states
        return y, (states[0] if every_state else h), c

    def _expanded(self, fixed, fixed_leaves, batch: int):
        """``fixed_leaves`` with the cell's ``expand_biases`` applied to its prepared tensors,
        once for a loop that is not differentiated (the structure ``fixed`` is kept)."""
        expand = getattr(self.model().rnn_cell, "expand_biases", None)
        if expand is None:
            return fixed_leaves
        parameters, prepared, lstm_prepared = _unflatten(fixed, iter(fixed_leaves))
        leaves = []
        _flatten((parameters, expand(prepared, batch), lstm_prepared), leaves)
        return leaves

    def _chunks(self, fixed, fixed_leaves, cell_inputs, lstm_inputs, h, c, ts, every_state, features_first=False):
        """The compiled chunks in turn, along the time axis (0 when ``features_first``, else 1):
        -> (outputs, last h, (every h, every c) if ``every_state`` else last c)."""
        axis = 0 if features_first else 1
        steps = (cell_inputs if cell_inputs is not None else lstm_inputs).shape[axis]
        fixed_key = _Key(fixed)
        ys, hs, cs = [], [], []
        chunk = self.chunk()
        for start in range(0, steps, chunk):
            span = (slice(None),) * axis + (slice(start, min(start + chunk, steps)),)

            def part(a):
                return None if a is None else a[span]

            leaves = list(fixed_leaves)
            structure = _flatten((part(cell_inputs), part(lstm_inputs), h, c, ts if ts is None or ts.ndim < 3 else part(ts)), leaves)
            key = ("chunk", fixed_key, structure, every_state, features_first)
            compiled = self._cached(key, lambda: mx.compile(self._chunk(fixed, structure, every_state, features_first)))
            if features_first and not every_state:  # each step's output, then the last state
                *outputs, h = compiled(*leaves)
                ys += outputs if len(outputs) == span[axis].stop - start else outputs + [h]
                continue
            y, h, *rest = compiled(*leaves)
            c = rest.pop(0) if c is not None else None
            ys.append(y)
            if every_state:
                hs.append(rest.pop(0))
                cs.append(rest.pop(0) if c is not None else None)

        def joined(parts):
            return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)

        states = (joined(hs), joined(cs) if c is not None else None) if every_state else c
        if features_first and not every_state:
            # One concatenation of every step's output: joining each chunk's and then the
            # chunks copied them twice.
            return _join_rows(ys), h, states
        return joined(ys), h, states

    def _chunk(self, fixed, structure, every_state, features_first):
        """A chunk of steps as a function of leaves -> [Y, h, (c,) (H, (C,))]; time is axis 0
        of Y and H when ``features_first``, else axis 1."""

        def chunk(*leaves):
            leaves = iter(leaves)
            with self._model_from(fixed, leaves, inline=True) as (this, prepared, lstm_prepared):
                cell_inputs, lstm_inputs, h, c, ts = _unflatten(structure, leaves)
                if features_first:
                    # The steps join in one concatenation, where stacking expands each first.
                    outs, hs = [], []
                    for t, u in enumerate(_step_blocks(cell_inputs)):
                        out, h = this.rnn_cell.step_features(u, h, _timespan_row(ts, t), prepared)
                        outs.append(out)
                        hs.append(h)
                    if not every_state:  # the state once: it is often the last output too
                        return outs if outs[-1] is h else outs + [h]
                    return [_join_rows(outs), h, _join_rows(hs)]

                def step(u, lstm_u, h, c, ts_t):
                    return this.model_step(u, lstm_u, h, c, ts_t, prepared, lstm_prepared)

                outs, hs, cs = this.time_loop(step, cell_inputs, lstm_inputs, h, c, ts)
            mixed = c is not None
            result = [mx.stack(outs, axis=1), hs[-1]] + ([cs[-1]] if mixed else [])
            if every_state:
                result += [mx.stack(hs, axis=1)] + ([mx.stack(cs, axis=1)] if mixed else [])
            return result

        return chunk

    def sequence(self, fixed, sequence_args, leaves, features_first=False):
        """The whole loop as a differentiable function, applied to ``leaves`` (the fixed
        leaves, then those of ``sequence_args`` = (cell_inputs, lstm_inputs, h0, c0, ts)):
        -> (Y (B, T, F) every step's output, the last h (B, S), the last c (B, S) or None).
        ``features_first``: cell_inputs come as the (T, P, B) array of which the cell's
        feature-major projection is a view; the worker thread copies its inputs, and that
        array copies as it lies, where the (B, T, P) view would be transposed by the copy."""
        # An array may appear twice (a bias both as a parameter and in prepare()'s output);
        # MLX matches a custom function's cotangents to its distinct inputs, so pass each once.
        unique, index, seen = [], [], {}
        for leaf in leaves:
            index.append(seen.setdefault(id(leaf), len(unique)))
            if index[-1] == len(unique):
                unique.append(leaf)
        key = ("sequence", fixed, sequence_args, tuple(index), features_first)
        build = lambda: self._build_sequence(fixed, sequence_args, index, len(unique), features_first)  # noqa: E731
        this_pass = (key, tuple(leaf.shape for leaf in unique))
        if self.last_pass != this_pass:
            # MLX's buffer cache keeps the buffers that filled it: full of another shape's, every
            # temporary of this pass would come back as fresh pages. Cleared when the shapes
            # change, kept while they do not.
            mx.clear_cache()
            self.last_pass = this_pass
        return self._cached(key, build)(*unique)

    def _build_sequence(self, fixed, sequence_args, index, n_unique, features_first):
        n_fixed = _count(fixed)
        fixed_key = _Key(fixed)

        def split(unique):
            leaves = iter([unique[i] for i in index])
            fixed_leaves = [next(leaves) for _ in range(n_fixed)]
            cell_inputs, *rest = _unflatten(sequence_args, leaves)
            return fixed_leaves, (cell_inputs.transpose(2, 0, 1) if features_first else cell_inputs, *rest)

        split.index, split.n_unique, split.features_first = index, n_unique, features_first

        def forward(*leaves):
            fixed_leaves, (cell_inputs, lstm_inputs, h, c, ts) = split(leaves)
            y, hs, cs = self.run_forward(fixed, fixed_leaves, cell_inputs, lstm_inputs, h, c, ts, every_state=True)
            return (y, hs) if c is None else (y, hs, cs)

        n_outputs = 2 if sequence_args[1][3] == ("constant", None) else 3
        cell = self.model().rnn_cell
        mixed_or_unprojected = sequence_args[1][3] != ("constant", None) or sequence_args[1][0] == ("constant", None)
        residual = getattr(cell, "residual_backward", False) and not mixed_or_unprojected
        if residual:
            forward, backward = self._residual_pass(fixed, fixed_key, split, cell)
        else:
            backward = self._generic_backward(fixed, fixed_key, split)

        @mx.custom_function
        def sequence(leaves):
            return WORKER.run(forward, *leaves)

        @sequence.vjp
        def sequence_vjp(primals, cotangents, outputs):
            # (Y, H[, C]), or (Y, last h) and a token, have cotangents; the token has none.
            n = 2 if residual else n_outputs
            cotangents = [mx.zeros_like(o) if g is None else g for g, o in zip(cotangents[:n], outputs)]
            if residual:  # it needs no outputs but the token
                return list(WORKER.run(backward, list(primals), cotangents, [outputs[-1]]))
            return list(WORKER.run(backward, list(primals), cotangents, list(outputs)))

        def run(*leaves):
            out = sequence(list(leaves))
            if residual:
                return out[0], out[1], None
            return out[0], out[1][:, -1], (out[2][:, -1] if n_outputs == 3 else None)

        return run

    def _residual_pass(self, fixed, fixed_key, split, cell):
        """(forward, backward) of the sequence for a cell that backpropagates from saved
        residuals (the protocol in ``ncps_mlx.cells.cfc``): the forward pass keeps each step's
        residuals and returns after (Y, last h) a token for them; the reverse pass is then a few
        matrix products and elementwise products a step, with no step recomputed, and the
        weight gradients are matrix products over blocks of ``GRADIENT_COLUMNS`` batch x time
        columns. Both passes run ``chunk()`` steps per compiled call (``_residual_steps``,
        ``_reverse_steps``), so that a long sequence does not pay a call's Python cost a step."""

        def forward(*leaves):
            fixed_leaves, (cell_inputs, _, h, _, ts) = split(leaves)
            rows, ts = cell_inputs.transpose(1, 2, 0), _features_timespans(ts)  # (T, P, B), (T, 1, B)
            steps, chunk = rows.shape[0], self.chunk()
            outs, states, step_residuals, gradient_residuals = [], [h.T], [], []
            for start in range(0, steps, chunk):
                span = slice(start, min(start + chunk, steps))
                # The step count is part of the call's structure: the result's depends on it.
                args = (span.stop - start, rows[span], states[-1], ts if ts is None or ts.ndim < 3 else ts[span])
                result = self._cell_call(_residual_steps, fixed, fixed_key, fixed_leaves, args, True, flat=False)
                outs += result[0] or []
                states += result[1]
                step_residuals += result[2]
                gradient_residuals += result[3]
            # Y leaves as a (B, T, F) view of a (T, F, B) stack: stacking feature-major states
            # is a plain copy, where a batch-major stack transposes (CfC at batch 1024 x 50:
            # ~5 ns an element). Elementwise cotangents of such a view keep its layout, so the
            # reverse pass reads each step's as contiguous rows. Of the states only the last
            # leaves: every one, as the generic path returns them, cost a copy of Y (a CfC's
            # output is its state, and a custom function's outputs must be distinct arrays)
            # and a cotangent as large, of zeros when unused, copied to this thread.
            ys = mx.stack(states[1:] if not outs else outs)
            kept = (not outs, states[:-1], step_residuals, gradient_residuals)
            return ys.transpose(2, 0, 1), states[-1].T, self._keep(kept)

        def backward(primals, cotangents, outputs):
            fixed_leaves, (cell_inputs, _, h0, _, ts) = split(primals)
            kept = self.kept.pop(int(outputs[0].item()), None)
            if kept is None:  # dropped (more than KEEP forward passes awaited their backward)
                kept = self.kept.pop(int(forward(*primals)[-1].item()))
            output_is_state, previous, step_residuals, gradient_residuals = kept
            steps, chunk, ts = len(previous), self.chunk(), _features_timespans(ts)
            # (T, F, B) views of Y's cotangent (usually of such an array: its rows contiguous);
            # the last state's is carried into the last step.
            d_ys, dh = cotangents[0].transpose(1, 2, 0), cotangents[1].T
            d_outs, d_states = (None, d_ys) if output_is_state else (d_ys, None)
            d_inputs, per_step, d_times = [], [], []
            for start in reversed(range(0, steps, chunk)):
                span = slice(start, min(start + chunk, steps))
                args = (
                    step_residuals[span],
                    ts if ts is None or ts.ndim < 3 else ts[span],
                    None if d_outs is None else d_outs[span],
                    None if d_states is None else d_states[span],
                    dh,
                )
                dh, d_in, cots, d_t = self._cell_call(_reverse_steps, fixed, fixed_key, fixed_leaves, args, False, flat=False)
                d_inputs, per_step, d_times = d_in + d_inputs, cots + per_step, d_t + d_times

            def columns(arrays):  # n arrays (F, B) -> (F, n x B)
                return arrays[0] if len(arrays) == 1 else mx.stack(arrays, axis=1).reshape(arrays[0].shape[0], -1)

            d_prepared = None
            block = -(-self.GRADIENT_COLUMNS // h0.shape[0])
            for start in range(0, steps, block):
                span = range(start, min(start + block, steps))
                gradient_args = (
                    1.0 if ts is None else ts,
                    columns([previous[t] for t in span]),
                    [columns(list(r)) for r in zip(*(gradient_residuals[t] for t in span))],
                    [columns(list(g)) for g in zip(*(per_step[t] for t in span))],
                )
                part = self._cell_call("residual_gradients", fixed, fixed_key, fixed_leaves, gradient_args, False, flat=False)
                d_prepared = part if d_prepared is None else _tree_sum(d_prepared, part)
            d_fixed = []
            _flatten(_zeros_where_none(_unflatten(fixed, iter(fixed_leaves)), (None, d_prepared, None)), d_fixed)
            d_cell_inputs = mx.stack(d_inputs)  # (T, P, B)
            d_cell_inputs = d_cell_inputs if split.features_first else d_cell_inputs.transpose(2, 0, 1)
            d_sequence = [d_cell_inputs, dh.T]
            if ts is not None:  # per step (1, B) -> the loop's (B, T, 1), or summed for a 0-d timespan
                d_ts = mx.stack(d_times)
                d_sequence.append(d_ts.transpose(2, 0, 1) if ts.ndim == 3 else mx.sum(d_ts))
            return _gather_unique(d_fixed + d_sequence, split)

        return forward, backward

    # Batch x time columns per weight-gradient product of the residual backward pass: at
    # least a step's batch, several steps when the batch is smaller (their columns are then
    # stacked, a copy). CfC f+b, ms, by columns 256 / 1024 / 4096 / all in one product: at
    # batch 32 x 100 steps 30.9 / 28.5 / 28.3 / 28.1, at batch 1024 x 50 154.7 / 155.5 /
    # 173.3 / 213.3.
    GRADIENT_COLUMNS = 1024

    # Residuals of forward passes whose backward pass has not run yet, by token: they stay
    # on the worker thread, where they were made (passing them through the custom function's
    # outputs would copy them in and out of it).
    # A forward pass that is never differentiated leaves its residuals; beyond KEEP the oldest
    # go, and a backward pass that finds its residuals gone runs its forward pass again.
    KEEP = 4

    def _keep(self, residuals) -> mx.array:
        self.tokens += 1
        self.kept[self.tokens] = residuals
        while len(self.kept) > self.KEEP:
            self.kept.pop(next(iter(self.kept)))
        return mx.array(self.tokens)

    def _cell_call(self, name, fixed, fixed_key, fixed_leaves, args, inline, flat=True):
        """``cell.<name>(*args, prepared)``, or ``name(cell, *args, prepared)`` for a function,
        compiled once per argument structure (the structure of its result may depend on
        nothing else), its result as a flat list of arrays (``flat``) or as the structure it
        returned; ``inline`` traces it with the bare rational tanh/sigmoid (for a function
        that is not differentiated)."""
        leaves = list(fixed_leaves)
        structure = _flatten(args, leaves)

        def build():
            model = self.model

            def function(*all_leaves):
                leaves = iter(all_leaves)
                _, prepared, _ = _unflatten(fixed, leaves)
                args = _unflatten(structure, leaves)
                cell = model().rnn_cell
                call = getattr(cell, name) if isinstance(name, str) else functools.partial(name, cell)
                with fastmath.inline_functions() if inline else contextlib.nullcontext():
                    result = call(*args, prepared)
                out = []
                shapes[0] = _flatten(result, out)
                return out

            return mx.compile(function)

        shapes = self.cache.setdefault(("result", name, fixed_key, structure), [None])
        result = self._cached((name, fixed_key, structure), build)(*leaves)
        return result if flat else _unflatten(shapes[0], iter(result))

    def _generic_backward(self, fixed, fixed_key, split):
        timespan_at = self.model().timespan_at

        def backward(primals, cotangents, outputs):
            fixed_leaves, (cell_inputs, lstm_inputs, h0, c0, ts) = split(primals)
            mixed = c0 is not None
            d_outs, d_hs = cotangents[0], cotangents[1]
            d_cs = cotangents[2] if mixed else None
            hs, cs = outputs[1], (outputs[2] if mixed else None)
            steps = hs.shape[1]

            def step_args(t):
                return (
                    None if cell_inputs is None else cell_inputs[:, t],
                    None if lstm_inputs is None else lstm_inputs[:, t],
                    h0 if t == 0 else hs[:, t - 1],
                    (c0 if t == 0 else cs[:, t - 1]) if mixed else None,
                    timespan_at(ts, t),
                )

            def by_time(per_step, like):
                return None if like is None else mx.stack(per_step, axis=1)

            dh, dc = mx.zeros_like(h0), (mx.zeros_like(c0) if mixed else None)
            budget = self.row_budget()
            if h0.shape[0] >= budget:
                # A large batch has rows enough at every step: one full vjp a step.
                d_fixed, d_cells, d_lstms, d_times = None, [None] * steps, [None] * steps, [None] * steps
                for t in reversed(range(steps)):
                    cots = [d_outs[:, t], d_hs[:, t] + dh] + ([d_cs[:, t] + dc] if mixed else [])
                    d_step, d_cells[t], d_lstms[t], dh, dc, d_times[t] = self._rows_vjp(
                        fixed, fixed_key, fixed_leaves, step_args(t), cots, with_state=True
                    )
                    d_fixed = d_step if d_fixed is None else [a + b for a, b in zip(d_fixed, d_step)]
                d_cell_inputs, d_lstm_inputs = by_time(d_cells, cell_inputs), by_time(d_lstms, lstm_inputs)
                if ts is not None:  # per step (B, 1) -> (B, T, 1); a 0-d timespan's summed
                    d_ts = mx.stack(d_times, axis=1) if ts.ndim == 3 else sum(d_times[1:], d_times[0])
            else:
                # Reverse pass: only the state cotangents travel back through time.
                g_outs, g_hs, g_cs = [None] * steps, [None] * steps, [None] * steps
                for t in reversed(range(steps)):
                    g_outs[t], g_hs[t] = d_outs[:, t], d_hs[:, t] + dh
                    g_cs[t] = d_cs[:, t] + dc if mixed else None
                    dh, dc = self._state_vjp(fixed, fixed_key, fixed_leaves, step_args(t), (g_outs[t], g_hs[t], g_cs[t]))

                # Everything else from vjps over many batch x time rows at once, a chunk of
                # steps at a time so that cells with large per-row intermediates (the LTC's
                # synapses) stay within memory.
                def rows(a):
                    return a.reshape(-1, a.shape[-1])

                previous_h = mx.concatenate([h0[:, None], hs[:, :-1]], axis=1)
                previous_c = mx.concatenate([c0[:, None], cs[:, :-1]], axis=1) if mixed else None
                cotangents = [mx.stack(g, axis=1) for g in ((g_outs, g_hs, g_cs) if mixed else (g_outs, g_hs))]
                chunk = max(1, budget // hs.shape[0])
                d_fixed, d_cells, d_lstms, d_times = None, [], [], []
                for start in range(0, steps, chunk):
                    span = slice(start, min(start + chunk, steps))
                    row_args = (
                        None if cell_inputs is None else rows(cell_inputs[:, span]),
                        None if lstm_inputs is None else rows(lstm_inputs[:, span]),
                        rows(previous_h[:, span]),
                        rows(previous_c[:, span]) if mixed else None,
                        1.0 if ts is None else (ts if ts.ndim < 3 else rows(ts[:, span])),
                    )
                    cots = [rows(g[:, span]) for g in cotangents]
                    d_chunk, d_cell, d_lstm, d_time = self._rows_vjp(fixed, fixed_key, fixed_leaves, row_args, cots)
                    d_fixed = d_chunk if d_fixed is None else [a + b for a, b in zip(d_fixed, d_chunk)]
                    d_cells.append(d_cell)
                    d_lstms.append(d_lstm)
                    d_times.append(d_time)

                def joined(chunks, like):
                    if like is None:
                        return None
                    return mx.concatenate([d.reshape(like.shape[0], -1, like.shape[-1]) for d in chunks], axis=1)

                d_cell_inputs, d_lstm_inputs = joined(d_cells, cell_inputs), joined(d_lstms, lstm_inputs)
                if ts is not None:
                    d_ts = joined(d_times, ts) if ts.ndim == 3 else sum(d_times[1:], d_times[0])
            if split.features_first:
                d_cell_inputs = d_cell_inputs.transpose(1, 2, 0)

            d_sequence = [
                d_cell_inputs,
                d_lstm_inputs,
                dh,
                dc,
                None if ts is None else d_ts,
            ]
            return _gather_unique(list(d_fixed) + [d for d in d_sequence if d is not None], split)

        return backward

    def _step_vjp(self, fixed, fixed_key, fixed_leaves, args, cotangents, parameters: bool, state: bool):
        """The vjp of one step call (any number of rows) for the cotangents of its outputs,
        compiled: the gradients of the fixed leaves, the inputs and the timespan (where it is
        an array) if ``parameters``, then of the states (h, c) if ``state``, in that order."""
        leaves = list(fixed_leaves)
        step_args = _flatten(args, leaves)
        n_fixed, n = len(fixed_leaves), len(leaves)
        wrt = list(range(n_fixed)) + _positions(step_args, n_fixed, (0, 1, 4)) if parameters else []
        wrt += _positions(step_args, n_fixed, (2, 3)) if state else []

        def build():
            step = self._plain_step(fixed, step_args)

            def step_vjp(*all_leaves):
                leaves, cots = list(all_leaves[:n]), list(all_leaves[n:])

                def of_wrt(*values):
                    for position, value in zip(wrt, values):
                        leaves[position] = value
                    return step(*leaves)

                return _vjp(of_wrt, [leaves[p] for p in wrt], cots)

            return mx.compile(step_vjp)

        key = ("vjp", fixed_key, step_args, len(cotangents), parameters, state)
        return list(self._cached(key, build)(*leaves, *cotangents))

    def _state_vjp(self, fixed, fixed_key, fixed_leaves, args, cotangents):
        """(dh, dc) of one step for the cotangents of its (out, h, c)."""
        grads = self._step_vjp(fixed, fixed_key, fixed_leaves, args, [g for g in cotangents if g is not None], False, True)
        return grads[0], (grads[1] if args[3] is not None else None)

    def _rows_vjp(self, fixed, fixed_key, fixed_leaves, args, cotangent_rows, with_state=False):
        """Gradients of the fixed leaves, the input rows and the timespan (None where it is a
        number), for all rows at once; with ``with_state`` also those of the state rows:
        (d_fixed, d_cell, d_lstm[, dh, dc], d_ts)."""
        grads = self._step_vjp(fixed, fixed_key, fixed_leaves, args, cotangent_rows, True, with_state)
        n_fixed = len(fixed_leaves)
        d_fixed, rest = grads[:n_fixed], grads[n_fixed:]
        d_cell = rest.pop(0) if args[0] is not None else None
        d_lstm = rest.pop(0) if args[1] is not None else None
        d_ts = rest.pop(0) if isinstance(args[4], mx.array) else None
        if with_state:
            dh = rest.pop(0)
            dc = rest.pop(0) if args[3] is not None else None
            return d_fixed, d_cell, d_lstm, dh, dc, d_ts
        return d_fixed, d_cell, d_lstm, d_ts


def _gather_unique(gradients, split):
    """Gradients of the leaves (in ``split``'s order, a leaf possibly more than once) summed
    onto the distinct leaves the custom function was given."""
    d_unique = [None] * split.n_unique
    for i, d in zip(split.index, gradients):
        d_unique[i] = d if d_unique[i] is None else d_unique[i] + d
    return tuple(d_unique)


def _zeros_where_none(like, gradients):
    """``gradients`` shaped as the tree ``like``, with zeros for its arrays that have none."""
    if isinstance(like, mx.array):
        return mx.zeros_like(like) if gradients is None else gradients
    if isinstance(like, dict):
        return {k: _zeros_where_none(v, None if gradients is None else gradients.get(k)) for k, v in like.items()}
    if isinstance(like, (list, tuple)):
        parts = [None] * len(like) if gradients is None else gradients
        return type(like)(_zeros_where_none(v, g) for v, g in zip(like, parts))
    return like


def _residual_steps(cell, n, inputs, state, ts, prepared):
    """A chunk of the residual forward pass as one compiled call: ``cell.residual_step`` over
    n steps, inputs (n, P, B) from state (H, B), ts None, 0-d or (n, 1, B) -> (each step's
    output, or None where the outputs are the states; states; step residuals; gradient
    residuals). n is passed to put it in the call's structure, on which the result's depends."""
    outs, states, step_residuals, gradient_residuals = [], [], [], []
    for t, u in enumerate(_step_blocks(inputs)):
        out, state, residuals, gradient = cell.residual_step(u, state, _timespan_row(ts, t), prepared)
        outs.append(out)
        states.append(state)
        step_residuals.append(residuals)
        gradient_residuals.append(gradient)
    return (None if outs[0] is states[0] else outs), states, step_residuals, gradient_residuals


def _reverse_steps(cell, step_residuals, ts, d_outs, d_states, dh, prepared):
    """A chunk of the reverse pass as one compiled call: ``cell.residual_vjp`` from the last
    of n steps to the first, d outs and d states None (zeros) or (n, F, B), dh (H, B) the
    cotangent carried into the last -> (dh into the first, [d input], [cotangents])."""
    n = len(step_residuals)
    d_inputs, cotangents, d_times = [None] * n, [None] * n, [None] * n
    for t in reversed(range(n)):
        d_out = 0.0 if d_outs is None else _row_block(d_outs, t)
        d_state = dh if d_states is None else _row_block(d_states, t) + dh
        args = (step_residuals[t], _timespan_row(ts, t), d_out, d_state)
        dh, d_inputs[t], cotangents[t], d_times[t] = cell.residual_vjp(*args, prepared)
    return dh, d_inputs, cotangents, d_times


def _step_blocks(stack):
    """Each step's (F, B) block of a contiguous (n, F, B) chunk, as slices of its rows: indexing
    the chunk is a gather and a squeeze a step, a slice of the (n F, B) rows one operation."""
    n, F, B = stack.shape
    rows = stack.reshape(n * F, B)
    return [rows[t * F : (t + 1) * F] for t in range(n)]


def _row_block(stack, t):
    """stack[t] of an (n, F, B) array as a view in any layout (indexing is a gather, and
    reshaping an array that is not contiguous copies it)."""
    return stack[t : t + 1].squeeze(0)


def _timespan_row(ts, t):
    """Step t's timespan in a chunk: 1.0, the 0-d array, or (1, B) of (n, 1, B)."""
    if ts is None:
        return 1.0
    return ts if ts.ndim < 3 else _row_block(ts, t)


def _features_timespans(ts):
    """The loop's ts (None, 0-d or (B, T, 1)) with per-step timespans as (T, 1, B)."""
    return ts if ts is None or ts.ndim < 3 else ts[:, :, 0].T[:, None, :]


def _tree_sum(a, b):
    """The sum of two gradients of the same structure (lists, tuples, arrays, None)."""
    if a is None:
        return None
    if isinstance(a, (list, tuple)):
        return type(a)(_tree_sum(x, y) for x, y in zip(a, b))
    return a + b


def _join_rows(arrays):
    """n arrays (F, B) -> (n, F, B), as one concatenation."""
    return mx.concatenate(arrays, axis=0).reshape(len(arrays), *arrays[0].shape)


def _vjp(function, primals, cotangents):
    """``mx.vjp`` through the scalar sum(output * cotangent): a step may return the same array
    twice (CfC's output is its state), and ``mx.vjp`` then keeps only one of the two
    cotangents (MLX 0.32: ``y = 2 a; return [y, y]`` gets 2, not 4, for cotangents 1 and 1)."""

    def weighted(*values):
        return [sum(mx.sum(output * cotangent) for output, cotangent in zip(function(*values), cotangents))]

    return tuple(mx.vjp(weighted, primals, [mx.array(1.0)])[1])


def _positions(step_args, n_fixed, which):
    """Leaf positions of the step arguments numbered in ``which`` (0 u, 1 lstm_u, 2 h, 3 c, 4 ts)."""
    positions, position = [], n_fixed
    for index, structure in enumerate(step_args[1]):
        count = _count(structure)
        if index in which and count:
            positions.append(position)
        position += count
    return positions


class _Worker:
    """One thread with its own MLX stream, where no gradient is being traced."""

    def __init__(self):
        self.jobs = None
        self.thread = None

    def run(self, function, *args):
        # Evaluated, then copied: arrays that still belong to the caller's graph (tracers
        # among them) must not be shared with another thread's graph.
        mx.eval(args)
        args = _map_arrays(lambda a: mx.array(np.asarray(a)), args)
        if self.thread is None:
            self.jobs = queue.Queue()
            self.thread = threading.Thread(target=self._serve, name="ncps-mlx", daemon=True)
            self.thread.start()
            atexit.register(self.close)
        done = queue.Queue(maxsize=1)
        self.jobs.put((function, args, done))
        ok, result = done.get()
        if not ok:
            raise result
        return result

    def close(self):
        """Ends the thread; its MLX stream must be gone before MLX's own teardown at exit."""
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None

    def _serve(self):
        stream = mx.new_stream(mx.default_device())
        while (job := self.jobs.get()) is not None:
            function, args, done = job
            try:
                with mx.stream(stream):
                    result = function(*args)
                    mx.eval(result)
                done.put((True, result))
            except BaseException as error:  # handed to the waiting caller
                done.put((False, error))
        mx.clear_streams()


WORKER = _Worker()


def _map_arrays(function, tree):
    if isinstance(tree, mx.array):
        return function(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_arrays(function, value) for value in tree)
    return tree


def can_evaluate(arrays) -> bool:
    """False inside ``mx.compile``/``mx.vmap`` tracing, where evaluating is not allowed."""
    try:
        mx.eval(arrays)
    except ValueError:
        return False
    return True


_probe_traces = [0]


def _count_trace(*arrays):
    _probe_traces[0] += 1
    return arrays


_probe = mx.compile(_count_trace)


@functools.cache
def compile_caches() -> bool:
    """Whether ``mx.compile`` keeps its traces here. On the CPU it does only where MLX finds a
    C++ compiler for its kernels; without one it traces every call afresh, so compiled steps
    cost their trace each time and ``under_transformation`` is always True: every model call
    then takes the differentiable pass (correct, slower)."""
    x = mx.zeros((1,))
    before = _probe_traces[0]
    for _ in range(3):
        _probe(x)
    return _probe_traces[0] - before <= 1


def under_transformation(arrays) -> bool:
    """True when any of ``arrays`` is being traced by ``mx.grad``/``vjp``/``vmap`` or an outer
    ``mx.compile``, where MLX traces a compiled function afresh at every call. Told by a
    compiled probe: traced again although its cache holds these shapes."""
    for _ in range(2):  # the first call with new shapes traces anyway
        before = _probe_traces[0]
        _probe(*arrays)
        if _probe_traces[0] == before:
            return False
    return True


class _Key:
    """A structure (see ``_flatten``) as a cache key that hashes it once."""

    __slots__ = ("value", "hash")

    def __init__(self, value):
        self.value, self.hash = value, hash(value)

    def __hash__(self):
        return self.hash

    def __eq__(self, other):
        return self is other or (isinstance(other, _Key) and self.hash == other.hash and self.value == other.value)


_ARRAY = "array"


def _flatten(tree, leaves: list):
    """Append the arrays of a tree of tuples, lists and dicts to ``leaves``; return a hashable
    description of everything else (structure, None, numbers)."""
    if isinstance(tree, mx.array):
        leaves.append(tree)
        return _ARRAY
    if isinstance(tree, dict):
        return ("dict", tuple((key, _flatten(value, leaves)) for key, value in tree.items()))
    if isinstance(tree, (list, tuple)):
        return ("list" if isinstance(tree, list) else "tuple", tuple(_flatten(value, leaves) for value in tree))
    return ("constant", tree)


def _unflatten(structure, leaves):
    """The inverse of ``_flatten``, taking arrays from the iterator ``leaves``."""
    if structure == _ARRAY:
        return next(leaves)
    kind, body = structure
    if kind == "dict":
        return {key: _unflatten(value, leaves) for key, value in body}
    if kind == "list":
        return [_unflatten(value, leaves) for value in body]
    if kind == "tuple":
        return tuple(_unflatten(value, leaves) for value in body)
    return body


def _count(structure) -> int:
    if structure == _ARRAY:
        return 1
    kind, body = structure
    if kind == "dict":
        return sum(_count(value) for _, value in body)
    if kind in ("list", "tuple"):
        return sum(_count(value) for value in body)
    return 0


flatten = _flatten
