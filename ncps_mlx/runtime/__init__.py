"""How a sequence runs fast on the current device; the models' math is elsewhere.

``ncps_mlx.sequence.SequenceModel`` holds the one time loop. It asks this package for a faster
way to run it, and the plain MLX loop is always there as the reference the others are tested
against. In order of preference:

* ``cpu``: a cell's whole loop in one CPU kernel, an MLX primitive built at install time (the
  LTC's, the CfC's, the CTRNN's and the CTGRU's, on Linux), forward and backward, also under
  ``mx.vmap`` and ``mx.compile`` (``sequence_kernel``), and the sequence's input projection
  (``project_input``); a one-step call whose arrays are computed and not traced runs at once on
  the calling thread, no graph node (``step_at_once``: a controller's call, where MLX's
  scheduling of a node cost more than the step);
* ``stepping``: MLX's own operations, in compiled steps, with a compiled backward pass;
* the plain loop, for what neither takes (active dropout, masks without a kernel, inside
  ``mx.vmap`` or ``mx.compile`` without a kernel).

``NCPS_MLX_RUNTIME=mlx`` (read at every model call, so it can be set per run or per block)
turns the kernels off: MLX's
operations only. ``python -m ncps_mlx info`` says what applies here and why. Nothing here
changes the process at import: no environment edits, no symbol interposition; status goes to
the ``ncps_mlx`` logger.

This package never imports the models, the cells or a reader or writer (``pyproject.toml``'s
import-linter contracts): it reads a cell through its public lowering (``ncps_mlx.lowering``).
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import blas, cpu, stepping

CHOICES = ("auto", "mlx")


def choice() -> str:
    """``NCPS_MLX_RUNTIME``: "auto" (the default: the fastest that applies) or "mlx" (MLX's
    operations only, no CPU kernels)."""
    value = os.environ.get("NCPS_MLX_RUNTIME", "auto") or "auto"
    if value not in CHOICES:
        raise ValueError(f"NCPS_MLX_RUNTIME must be one of {', '.join(CHOICES)}; got {value!r}")
    return value


def sequence_kernel(lowering, x, h, ts=None, memory=None, keep=None, memory_circuit="state"):
    """A cell's whole loop in a CPU kernel, from the cell's lowering (``cell.lowered()``,
    ``ncps_mlx.lowering``): the sequence x (B, T, I) (each kernel projects it as it reads it
    best), h (B, S), ts None, 0-d or (B, T, 1) -> (outputs (B, T, F), every step's state
    (B, T, S)), differentiable in every input; None where no kernel applies (another cell, not
    float32, not the CPU, ``NCPS_MLX_RUNTIME=mlx``). ``memory``: mixed memory, (the LSTM's
    lowering, memory (B, S)) -> (outputs, states, every step's memory (B, T, S)), in its
    ``memory_circuit`` ("state" or "input", ``SequenceModel``'s), where the kernel has it.
    ``keep``: dropout masks, where the kernel takes them (``CfCCell.dropout_keep``). A one-step
    call runs at once with ``step_at_once``."""
    kernel = cpu.SEQUENCES.get(type(lowering))
    if kernel is None or choice() == "mlx" or (keep is not None and not kernel.dropout):
        return None
    if memory is not None and memory_circuit not in kernel.memory_circuits:
        return None
    options = {} if keep is None else {"keep": keep}
    if memory is not None:
        options["memory"] = memory
        if memory_circuit != "state":
            options["memory_circuit"] = memory_circuit
    return kernel.run(lowering, x, h, ts, **options)


def at_once() -> bool:
    """Whether a one-step call may run at once here, on the calling thread (``cpu/now.py``): the
    kernels and their BLAS apply (so not with ``NCPS_MLX_RUNTIME=mlx``). Then ``step_at_once``
    and the helpers below compute what they can at once."""
    return cpu.cfc_applies()


def step_at_once(lowering, x, h, ts=None, memory=None, memory_circuit="state"):
    """A one-step call (x (B, 1, I)) of a cell's loop at once, on this thread, where every array
    is computed (``cpu/now.py``): -> (outputs (B, 1, F), state (B, S), memory (B, S) or None),
    each computed; None where it cannot (then ``sequence_kernel``). ``memory``, ``memory_circuit``
    as there; for calls where ``at_once()`` said yes."""
    kernel = cpu.SEQUENCES.get(type(lowering))
    if kernel is None or (memory is not None and memory_circuit not in kernel.memory_circuits):
        return None
    if memory is None:
        return kernel.step(lowering, x, h, ts)
    return kernel.step(lowering, x, h, ts, memory=memory, memory_circuit=memory_circuit)


def last_step(sequence, now=False):
    """The last step of a (B, T, F) sequence, (B, F): computed at once where ``now`` and the
    sequence is, else a reshape (T = 1) or a slice."""
    ready = cpu.now.features(sequence, False, 0, sequence.shape[2], keep_time=False) if now else None
    if ready is not None:
        return ready
    return sequence.reshape(sequence.shape[0], -1) if sequence.shape[1] == 1 else sequence[:, -1]


def reshaped(a, shape):
    """a (its values already in the order of ``shape``) as ``shape``, computed at once where a
    is (for ``at_once()`` calls), else MLX's reshape."""
    ready = cpu.now.filled(a, shape)
    return a.reshape(shape) if ready is None else ready


def keeps_every_row(mask) -> bool:
    """Whether a one-step call's mask keeps every row, read at once where it is computed and not
    traced (for ``at_once()`` calls): a masked step that keeps every row is the unmasked step."""
    return cpu.now.keeps_every_row(mask)


def linear_at_once(y, weight, bias):
    """y (B, T, F) or (B, F) times W^T plus b, computed at once where every array is (a one-step
    call's output projection, for ``at_once()`` calls); None where one is not."""
    return cpu.now.linear(y, weight, bias)


def dropout_masks_apply() -> bool:
    """Whether ``dropout_masks`` draws here: the kernels are built and the device is the CPU,
    also within ``cpu.turned_off()`` (the plain loop then draws the kernels' masks, so that the
    two paths compare), not with ``NCPS_MLX_RUNTIME=mlx``."""
    return choice() != "mlx" and mx.default_device() == mx.cpu and cpu.loaded() is not None


def dropout_masks(shape, kept: float):
    """Dropout masks of ``shape``, float32: 0, or 1 / kept with probability ``kept``, drawn in
    the kernels from a key drawn with ``mx.random`` (``mx.random.seed`` repeats them)."""
    key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)
    return cpu.loaded().dropout_masks(key, list(shape), float(kept))


def project_input(lowering, x, features_first=False):
    """A cell's input projection of a sequence x (B, T, I) in the kernels, from its lowering
    (``cpu.projection``), or None where they do not apply (the cell's own ``project_input``
    then). ``features_first``: laid out (T, P, B) in memory (a view), as a kernel that reads it
    feature-major wants it, whatever the cell's own layout."""
    if choice() == "mlx" or x.ndim != 3:
        return None
    return cpu.input_projection(lowering, x, features_first)


def implementation(lowering, mixed_memory: bool = False, dtype=None, memory_circuit: str = "state") -> str:
    """Which implementation runs a model with a cell of this lowering here, in words (for
    ``info``); ``dtype``: the model's, when it is not float32."""
    if dtype is not None and str(dtype) != "mlx.core.float32":
        return f"MLX (compiled steps): the kernels compute in float32, this model in {str(dtype).rpartition('.')[2]}"
    kernel = cpu.SEQUENCES.get(type(lowering))
    if kernel is None or (mixed_memory and memory_circuit not in kernel.memory_circuits):
        return "MLX (compiled steps)"
    if choice() == "mlx":
        return "MLX (compiled steps): NCPS_MLX_RUNTIME=mlx"
    if not kernel.applies():
        return "MLX (compiled steps): no kernel applies (see the kernels' status)"
    return "CPU kernel; one-step calls at once" if at_once() else "CPU kernel"
