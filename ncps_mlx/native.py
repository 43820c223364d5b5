"""The LTC's time loop as one compiled CPU kernel (``ltc_kernel.c``), forward and backward.

MLX runs the LTC's unfold as separate kernels over a (batch, S, S) tensor, each with broadcast
inputs, for which its CPU backend generates scalar loops: ~200 us an unfold at batch 32 x 64
units, against ncps.torch's ~100 (README, Performance). This kernel runs the whole sequence for
a batch row in one call, the synapse loop vectorised, rows split over the cores; the backward
pass recomputes each row's forward pass and walks it back. It computes the same function as the
MLX path (fastmath's rational sigmoid, its exact gradient, the reference's operation order per
unfold; only the synaptic sums are added in another order), and it is tested against it, against
ncps.torch and against MLX's gradients (``tests/test_native.py``).

It is built once per machine with the ``g++`` that ``mx.compile`` on the CPU needs anyway
(``-O3 -fno-trapping-math``, plus ``-mavx2 -mfma`` where the processor has them), cached under
``file_cache.folder("native")`` and loaded with ctypes: no dependency beyond mlx and numpy. It
applies on Linux (x86-64 or aarch64) to the CPU device, outside ``mx.vmap``/``mx.compile``
tracing, without mixed memory; ``NCPS_MLX_NATIVE=0`` turns it off, and where it cannot be built
MLX's path runs as before. ``status()`` says which; the first build on a machine says so once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import cpu_kernels, file_cache, linux_blas

SOURCES = Path(__file__).with_name("kernels")
KIND = "native"

_STATUS = "not attempted"
_LIBRARY = None
_LOCK = threading.Lock()


class _Arguments(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int32), ("steps", ctypes.c_int32), ("units", ctypes.c_int32), ("unfolds", ctypes.c_int32),
        ("epsilon", ctypes.c_float),
        ("sigma", ctypes.c_void_p), ("mu", ctypes.c_void_p), ("w", ctypes.c_void_p), ("w_erev", ctypes.c_void_p),
        ("cm", ctypes.c_void_p), ("gleak", ctypes.c_void_p), ("leak", ctypes.c_void_p),
        ("inputs", ctypes.c_void_p), ("timespans", ctypes.c_void_p),
    ]  # fmt: skip


def status() -> str:
    """Whether the LTC kernel is in use, in words (builds it on first call)."""
    library()
    return _STATUS


def library():
    """The loaded kernel library, or None where it does not apply (see ``status()``)."""
    global _STATUS, _LIBRARY
    with _LOCK:
        if _STATUS == "not attempted":
            _LIBRARY, _STATUS = _load()
    return _LIBRARY


def _load():
    if os.environ.get("NCPS_MLX_NATIVE", "1") == "0":
        return None, "turned off by NCPS_MLX_NATIVE=0"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        return None, "not Linux on x86-64 or aarch64: the models run on MLX's kernels"
    compiler = cpu_kernels.find_compiler()
    if compiler is None:
        return None, "no g++ on PATH: the models run on MLX's kernels"
    flags = ["-O3", "-fno-trapping-math", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= cpu_kernels.cpu_flags():
        flags += ["-mavx2", "-mfma"]
    sources = sorted(SOURCES.glob("*.[ch]"))
    key = hashlib.sha256(b"\0".join([f.read_bytes() for f in sources] + [compiler.encode(), " ".join(flags).encode()]))
    path = file_cache.folder(KIND) / key.hexdigest()[:16] / "ncps_kernels.so"
    built = False
    if not path.is_file():
        try:
            _build(compiler, flags, [f for f in sources if f.suffix == ".c"], path)
        except (OSError, subprocess.SubprocessError) as error:
            return None, f"the CPU kernels could not be built ({error}): the models run on MLX's kernels"
        built = True
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        return None, f"the CPU kernels could not be loaded ({error}): the models run on MLX's kernels"
    for function in (lib.ltc_forward, lib.ltc_backward, lib.cfc_forward, lib.cfc_backward, lib.wired_cfc_forward):
        function.restype = None
    message = f"LTC and CfC time loops run in CPU kernels built with {' '.join(flags[:2] + flags[4:])} (NCPS_MLX_NATIVE=0 turns them off)"
    if built:
        print(f"ncps_mlx: {message}", file=sys.stderr)
    return lib, message


def _build(compiler, flags, sources, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=path.parent, suffix=".so")
    os.close(descriptor)
    try:
        # "-x c" before each file: g++ took a second file after one "-x c" for C++.
        files = [argument for source in sources for argument in ("-x", "c", str(source))]
        result = subprocess.run([compiler, *flags, "-o", partial, *files, "-lm"], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.strip().splitlines()
            raise subprocess.SubprocessError(errors[0] if errors else f"g++ exited with {result.returncode}")
        os.replace(partial, path)  # atomically: a concurrent process loads the old file or this one
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def applies() -> bool:
    """Whether an LTC runs in the kernel now: built, on the CPU device, not within
    ``turned_off()``. Of any size: it computes every synapse, masked, where MLX's sparse path
    computes only the existing ones, and is still faster (batch 16 x 20 steps, forward and
    forward+backward: AutoNCP(512, 8) 0.12 and 0.57 s against 1.5 and 17.8; 512 units dense
    0.12 and 0.81 against 0.93 and 9.8)."""
    if getattr(_off, "value", False) or mx.default_device() != mx.cpu:
        return False
    return library() is not None


_off = threading.local()


@contextlib.contextmanager
def turned_off():
    """Within this block (in this thread) the LTC runs on MLX's kernels, as where the kernel
    does not apply: for comparing the two."""
    previous = getattr(_off, "value", False)
    _off.value = True
    try:
        yield
    finally:
        _off.value = previous


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def _pool():
    return concurrent.futures.ThreadPoolExecutor(_threads(), thread_name_prefix="ncps_mlx_native")


if hasattr(os, "register_at_fork"):  # a forked child has none of its parent's threads
    os.register_at_fork(after_in_child=_pool.cache_clear)


def _row_ranges(batch: int, parts=None):
    parts = min(batch, parts or _threads())
    edges = [batch * k // parts for k in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _host(array) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32))


def _pointer(array: np.ndarray):
    return array.ctypes.data_as(ctypes.c_void_p)


def _arguments(unfolds, epsilon, inputs, timespans, parameters):
    """(ctypes arguments, the host arrays they point into: keep them alive)."""
    host = [_host(a) for a in (inputs, *parameters)] + ([_host(timespans)] if timespans is not None else [])
    inputs_h, sigma, mu, w, w_erev, cm, gleak, leak = host[:8]
    batch, steps, _ = inputs_h.shape
    arguments = _Arguments(batch, steps, sigma.shape[0], unfolds, epsilon,
                           *(_pointer(a) for a in (sigma, mu, w, w_erev, cm, gleak, leak, inputs_h)),
                           _pointer(host[8]) if timespans is not None else None)  # fmt: skip
    return arguments, host


def _run_rows(call, batch, parts=None):
    """``call(first, last)`` over the batch in one contiguous range of rows per core (or
    ``parts`` ranges)."""
    futures = [_pool().submit(call, first, last) for first, last in _row_ranges(batch, parts)]
    return [future.result() for future in futures]


def forward(unfolds, epsilon, inputs, initial, timespans, parameters) -> np.ndarray:
    """Every step's state (B, T, S) as a host array; see ``ltc_states``."""
    lib = library()
    arguments, keep = _arguments(unfolds, epsilon, inputs, timespans, parameters)
    initial = _host(initial)
    batch, steps, units = arguments.batch, arguments.steps, arguments.units
    states = np.empty((batch, steps, units), np.float32)

    def rows(first, last):
        scratch = np.empty(5 * units, np.float32)
        lib.ltc_forward(ctypes.byref(arguments), _pointer(initial), _pointer(states), first, last, _pointer(scratch))

    _run_rows(rows, batch)
    del keep
    return states


def backward(unfolds, epsilon, inputs, initial, timespans, parameters, d_states):
    """(d inputs (B, T, 2S), d initial (B, S), d timespans (B, T) or None, d parameters) as host
    arrays, the parameters' summed over the batch."""
    lib = library()
    arguments, keep = _arguments(unfolds, epsilon, inputs, timespans, parameters)
    initial, d_states = _host(initial), _host(d_states)
    batch, steps, units = arguments.batch, arguments.steps, arguments.units
    d_inputs = np.empty((batch, steps, 2 * units), np.float32)
    d_initial = np.empty((batch, units), np.float32)
    d_timespans = np.empty((batch, steps), np.float32) if timespans is not None else None

    def rows(first, last):
        scratch = np.empty(((steps * unfolds + 1) + 9) * units, np.float32)
        matrices = [np.zeros((units, units), np.float32) for _ in range(4)]
        vectors = [np.zeros(units, np.float32) for _ in range(3)]
        lib.ltc_backward(ctypes.byref(arguments), _pointer(initial), _pointer(d_states), _pointer(d_inputs),
                         _pointer(d_initial), _pointer(d_timespans) if d_timespans is not None else None,
                         *(_pointer(a) for a in matrices + vectors), first, last, _pointer(scratch))  # fmt: skip
        return matrices + vectors

    parts = _run_rows(rows, batch)
    del keep
    d_parameters = [functools.reduce(np.add, grads) for grads in zip(*parts)]
    return d_inputs, d_initial, d_timespans, d_parameters


@functools.lru_cache(maxsize=None)
def _states_function(unfolds: int, epsilon: float, timed: bool):
    """The kernel as an MLX custom function with its vjp: (inputs (B, T, 2S), initial (B, S),
    [timespans (B, T)], sigma, mu, w, w_erev (S, S), cm, gleak, leak (S,)) -> states (B, T, S)."""

    def split(arrays):
        inputs, initial, *rest = arrays
        timespans = rest.pop(0) if timed else None
        return inputs, initial, timespans, rest

    @mx.custom_function
    def states(*arrays):
        inputs, initial, timespans, parameters = split(arrays)
        return mx.array(forward(unfolds, epsilon, inputs, initial, timespans, parameters))

    @states.vjp
    def states_vjp(primals, cotangent, output):
        inputs, initial, timespans, parameters = split(primals)
        d_inputs, d_initial, d_timespans, d_parameters = backward(unfolds, epsilon, inputs, initial, timespans,
                                                                  parameters, cotangent)  # fmt: skip
        grads = [d_inputs, d_initial] + ([d_timespans] if timed else []) + d_parameters
        return tuple(mx.array(g) for g in grads)

    return states


def ltc_states(inputs, initial, timespans, unfolds, epsilon, sigma, mu, w, w_erev, cm, gleak, leak):
    """Every step's state of an LTC, differentiable (MLX calls the kernel's backward pass).

    inputs (B, T, 2S): the sensory numerator and denominator terms (``LTCCell.project_input``);
    initial (B, S); timespans None (1.0 a step), 0-d or (B, T, 1); sigma, mu (S, S); w, w_erev
    (S, S), the masked, constrained weights and their product with erev; cm, gleak, gleak * vleak
    (S,), constrained. -> (B, T, S)."""
    batch, steps = inputs.shape[:2]
    arrays = [inputs, initial]
    if timespans is not None:
        arrays.append(mx.broadcast_to(timespans.reshape(timespans.shape[:2]) if timespans.ndim == 3 else timespans,
                                      (batch, steps)))  # fmt: skip
    function = _states_function(int(unfolds), float(epsilon), timespans is not None)
    return function(*arrays, sigma, mu, w, w_erev, cm, gleak, leak)


class _CfCArguments(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int32), ("steps", ctypes.c_int32), ("hidden", ctypes.c_int32), ("units", ctypes.c_int32),
        ("layers", ctypes.c_int32), ("mode", ctypes.c_int32), ("activation", ctypes.c_int32), ("ff_tanh", ctypes.c_int32),
        ("heads", ctypes.c_int32),
        ("inputs", ctypes.c_void_p), ("timespans", ctypes.c_void_p), ("state_weight", ctypes.c_void_p),
        ("hidden_weights", ctypes.POINTER(ctypes.c_void_p)), ("hidden_biases", ctypes.POINTER(ctypes.c_void_p)),
        ("head_weight", ctypes.c_void_p), ("head_bias", ctypes.c_void_p), ("w_tau", ctypes.c_void_p), ("A", ctypes.c_void_p),
        ("sgemm", ctypes.c_void_p),
    ]  # fmt: skip


CFC_MODES = {"default": 0, "pure": 1, "no_gate": 2}
CFC_ACTIVATIONS = {"lecun_tanh": 0, "tanh": 1, "relu": 2, "silu": 3, "gelu": 4}


def cfc_applies() -> bool:
    """Whether a CfC's forward pass runs in the kernel now: ``applies()``, and MLX's products
    use the BLAS that ``linux_blas`` loaded (the kernel calls the same sgemm)."""
    return applies() and linux_blas.sgemm_address() is not None


def cfc_states(inputs, initial, timespans, mode, activation, ff_tanh, state_weight, hidden, head_weight, head_bias,
               w_tau=None, A=None, differentiable=False):  # fmt: skip
    """Every step's state of a CfCCell with a backbone, feature-major.

    inputs (T, units, B): the input half of the first backbone layer, bias included
    (``CfCCell.project_input``'s (B, T, units) view, transposed back); initial (H, B);
    timespans None (1.0 a step), 0-d or (B, T, 1); state_weight (units, H); hidden: (weight
    (units, units), bias (units,)) of backbone layers 2..n; head_weight (K, units) and head_bias
    (K,), the heads fused in the order ff1, ff2, time_a, time_b (pure mode: ff1 alone); w_tau, A
    (H,) in pure mode. -> (T, H, B).

    Without timespans the time gate's two heads are one, time_a + time_b, as in the MLX path:
    a quarter of the heads' product less. ``differentiable``: an MLX custom function whose vjp
    is the kernel's backward pass (not pure mode), else the forward pass alone, evaluated.

    The batch's columns are split over the cores, each block a sequence of matrix products on
    one BLAS thread; without control of the BLAS's threads (``linux_blas.can_set_threads``) the
    batch runs as one block."""
    steps, units, batch = inputs.shape
    if timespans is None and mode != "pure":
        head_weight = _fused_gate(head_weight, state_weight.shape[1])
        head_bias = _fused_gate(head_bias, state_weight.shape[1])
    ts = None
    if timespans is not None:
        ts = mx.broadcast_to(timespans.reshape(timespans.shape[:2]).T if timespans.ndim == 3 else timespans, (steps, batch))
    arrays = [inputs, initial] + ([] if ts is None else [ts]) + [state_weight, head_weight, head_bias]
    arrays += [a for layer in hidden for a in layer] + ([w_tau, A] if mode == "pure" else [])
    key = (mode, activation, bool(ff_tanh), ts is not None, len(hidden))
    if differentiable and mode != "pure":
        return _cfc_function(*key)(*arrays)[0]
    return mx.array(_CfCRun(key, arrays).forward())


class _CfCRun:
    """The CfC kernel's arguments for one call, from ``cfc_states``' arrays (host copies kept)."""

    def __init__(self, key, arrays):
        mode, activation, ff_tanh, timed, n_hidden = key
        host = [_host(a) for a in arrays]
        inputs, initial = host[:2]
        rest = host[2:]
        ts = rest.pop(0) if timed else None
        state_weight, head_weight, head_bias = rest[:3]
        hidden = [(rest[3 + 2 * i], rest[4 + 2 * i]) for i in range(n_hidden)]
        pure = rest[3 + 2 * n_hidden :] if mode == "pure" else [None, None]
        self.host, self.hidden, self.initial = host, hidden, initial
        self.shape = (inputs.shape[0], state_weight.shape[1], inputs.shape[2], inputs.shape[1], head_weight.shape[0])
        self.arguments = _CfCArguments(
            inputs.shape[2], inputs.shape[0], state_weight.shape[1], inputs.shape[1], n_hidden + 1, CFC_MODES[mode],
            CFC_ACTIVATIONS[activation], int(ff_tanh), head_weight.shape[0], _pointer(inputs),
            _pointer(ts) if ts is not None else None, _pointer(state_weight), self._pointers(w for w, _ in hidden),
            self._pointers(b for _, b in hidden), _pointer(head_weight), _pointer(head_bias),
            *(_pointer(a) if a is not None else None for a in pure), linux_blas.sgemm_address(),
        )  # fmt: skip

    @staticmethod
    def _pointers(arrays):
        arrays = [a.ctypes.data for a in arrays]
        return (ctypes.c_void_p * max(1, len(arrays)))(*arrays)

    def _columns(self, call):
        with linux_blas.one_thread():
            return _run_rows(call, self.shape[2], None if linux_blas.can_set_threads() else 1)

    def forward(self, keep=False):
        """Every step's state (T, H, B); with ``keep`` also the residuals that spare
        ``backward`` recomputing each step's products, (T, layers x units + K, B)."""
        steps, hidden_size, batch, units, heads = self.shape
        states = np.empty((steps, hidden_size, batch), np.float32)
        residuals = np.empty((steps, (len(self.hidden) + 1) * units + heads, batch), np.float32) if keep else None

        def columns(first, last):
            scratch = np.empty((hidden_size + 2 * units + heads) * (last - first), np.float32)
            library().cfc_forward(ctypes.byref(self.arguments), _pointer(self.initial), _pointer(states),
                                  _pointer(residuals) if keep else None, first, last, _pointer(scratch))  # fmt: skip

        self._columns(columns)
        return (states, residuals) if keep else states

    def residual_bytes(self) -> int:
        steps, _, batch, units, heads = self.shape
        return 4 * steps * batch * ((len(self.hidden) + 1) * units + heads)

    def backward(self, states, d_states, residuals=None):
        """(d inputs, d initial, d timespans or None, d state weight, d head weight, d head
        bias, then d weight and d bias of each hidden layer), host arrays."""
        steps, hidden_size, batch, units, heads = self.shape
        states, d_states = _host(states), _host(d_states)
        residuals = None if residuals is None else _host(residuals)
        layers = len(self.hidden) + 1
        d_inputs = np.empty((steps, units, batch), np.float32)
        d_initial = np.empty((hidden_size, batch), np.float32)
        d_timespans = np.empty((steps, batch), np.float32) if self.arguments.timespans else None

        def columns(first, last):
            shapes = [(units, hidden_size), (heads, units), (heads,)] + [(units, units), (units,)] * len(self.hidden)
            grads = [np.zeros(shape, np.float32) for shape in shapes]
            scratch = np.empty((2 * hidden_size + (2 * layers + 1) * units + 2 * heads + 1) * (last - first), np.float32)
            library().cfc_backward(
                ctypes.byref(self.arguments), _pointer(self.initial), _pointer(states),
                _pointer(residuals) if residuals is not None else None, _pointer(d_states),
                _pointer(d_inputs), _pointer(d_initial), _pointer(d_timespans) if d_timespans is not None else None,
                _pointer(grads[0]), self._pointers(grads[3::2]), self._pointers(grads[4::2]), _pointer(grads[1]),
                _pointer(grads[2]), first, last, _pointer(scratch),
            )  # fmt: skip
            return grads

        parts = self._columns(columns)
        summed = [functools.reduce(np.add, grads) for grads in zip(*parts)]
        return [d_inputs, d_initial, d_timespans] + summed


# The forward pass keeps each step's pre-activations and head outputs for the backward pass when
# they take at most this many bytes (W6, batch 1024 x 50: 66 MB); beyond, the backward pass
# recomputes them. They stay host arrays, found through a token the custom function returns:
# returned as MLX arrays they were copied and paged in. W6 forward+backward, alternating: 147-152
# ms recomputing, 163-174 keeping them as MLX arrays, 131-139 this way. A forward pass that is
# never differentiated leaves its residuals; beyond KEEP the oldest go, and a backward pass that
# finds its residuals gone recomputes.
KEEP_BYTES = 256 << 20
KEEP = 4
_kept: dict = {}
_tokens = [0]


def _keep(residuals) -> mx.array:
    with _LOCK:
        _tokens[0] += 1
        _kept[_tokens[0]] = residuals
        while len(_kept) > KEEP:
            _kept.pop(next(iter(_kept)))
        return mx.array(_tokens[0])


def _kept_residuals(token):
    with _LOCK:
        return _kept.pop(int(token.item()), None)


@functools.lru_cache(maxsize=None)
def _cfc_function(mode, activation, ff_tanh, timed, n_hidden):
    """The CfC kernel as an MLX custom function of ``cfc_states``' arrays, with its vjp: ->
    (states, a token for the residuals kept, or -1)."""
    key = (mode, activation, ff_tanh, timed, n_hidden)

    @mx.custom_function
    def states(*arrays):
        run = _CfCRun(key, arrays)
        if run.residual_bytes() > KEEP_BYTES:
            return mx.array(run.forward()), mx.array(-1)
        states, residuals = run.forward(keep=True)
        return mx.array(states), _keep(residuals)

    @states.vjp
    def states_vjp(primals, cotangents, outputs):
        residuals = _kept_residuals(outputs[1])
        d_inputs, d_initial, d_timespans, *d_weights = _CfCRun(key, primals).backward(outputs[0], cotangents[0], residuals)
        d_state_weight, d_head_weight, d_head_bias, *d_hidden = d_weights
        grads = [d_inputs, d_initial] + ([d_timespans] if timed else []) + [d_state_weight, d_head_weight, d_head_bias]
        return tuple(mx.array(g) for g in grads + d_hidden)

    return states


class _WiredArguments(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int32), ("steps", ctypes.c_int32), ("layers", ctypes.c_int32), ("mode", ctypes.c_int32),
        ("ff_tanh", ctypes.c_int32), ("sizes", ctypes.POINTER(ctypes.c_int32)), ("heads", ctypes.POINTER(ctypes.c_int32)),
        ("inputs", ctypes.c_void_p), ("timespans", ctypes.c_void_p), ("input_weights", ctypes.POINTER(ctypes.c_void_p)),
        ("biases", ctypes.POINTER(ctypes.c_void_p)), ("state_weights", ctypes.POINTER(ctypes.c_void_p)),
        ("w_tau", ctypes.POINTER(ctypes.c_void_p)), ("A", ctypes.POINTER(ctypes.c_void_p)), ("sgemm", ctypes.c_void_p),
    ]  # fmt: skip


def _fused_gate(rows, hidden_size, axis=0):
    """Head rows ff1, ff2, time_a, time_b (4H along ``axis``) -> ff1, ff2, time_a + time_b."""
    H = hidden_size

    def part(start, stop):
        return rows[(slice(None),) * axis + (slice(start, stop),)]

    return mx.concatenate([part(0, 2 * H), part(2 * H, 3 * H) + part(3 * H, 4 * H)], axis=axis)


def wired_cfc_states(inputs, initial, timespans, mode, ff_tanh, layers):
    """Every step's state of a wired CfC (or a CfCCell without a backbone: one layer), forward
    only, feature-major.

    inputs (T, K_0, B): layer 0's input product, bias included (``project_input``'s view,
    transposed back); initial (S, B), the layers' states stacked; timespans None, 0-d or
    (B, T, 1); layers: per layer (input weight (K, H_prev) and bias (K,), None for layer 0;
    state weight (K, H); w_tau and A (H,) in pure mode, else None), the heads in the order ff1,
    ff2, time_a, time_b (K = 4H; pure mode ff1 alone). -> (T, S, B), evaluated. Without
    timespans the time gate's two heads are fused, as in ``cfc_states``."""
    lib = library()
    steps, _, batch = inputs.shape
    sizes = [int(layer[2].shape[1]) for layer in layers]
    if timespans is None and mode != "pure":
        inputs = _fused_gate(inputs, sizes[0], axis=1)
        layers = [(None if w is None else _fused_gate(w, H), None if b is None else _fused_gate(b, H), _fused_gate(s, H), tau, A)
                  for (w, b, s, tau, A), H in zip(layers, sizes)]  # fmt: skip
    heads = [int(layer[2].shape[0]) for layer in layers]
    host = {"inputs": _host(inputs), "initial": _host(initial)}
    per_layer = [[None if a is None else _host(a) for a in layer] for layer in layers]
    ts = None
    if timespans is not None:
        ts = _host(mx.broadcast_to(timespans.reshape(timespans.shape[:2]).T if timespans.ndim == 3 else timespans,
                                   (steps, batch)))  # fmt: skip

    def pointers(index):
        return (ctypes.c_void_p * len(layers))(*[None if layer[index] is None else layer[index].ctypes.data for layer in per_layer])

    arguments = _WiredArguments(
        batch, steps, len(layers), CFC_MODES[mode], int(ff_tanh), (ctypes.c_int32 * len(sizes))(*sizes),
        (ctypes.c_int32 * len(heads))(*heads), _pointer(host["inputs"]), _pointer(ts) if ts is not None else None,
        pointers(0), pointers(1), pointers(2), pointers(3), pointers(4), linux_blas.sgemm_address(),
    )  # fmt: skip
    states = np.empty((steps, sum(sizes), batch), np.float32)

    def columns(first, last):
        scratch = np.empty((sum(sizes) + max(heads)) * (last - first), np.float32)
        lib.wired_cfc_forward(ctypes.byref(arguments), _pointer(host["initial"]), _pointer(states), first, last,
                              _pointer(scratch))  # fmt: skip

    with linux_blas.one_thread():
        _run_rows(columns, batch, None if linux_blas.can_set_threads() else 1)
    del host, per_layer, ts
    return mx.array(states)
