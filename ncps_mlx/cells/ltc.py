"""The Liquid Time-Constant cell, parameter for parameter ``ncps.torch.LTCCell``."""

from __future__ import annotations

import functools

import numpy as np
import mlx.core as mx
import mlx.nn as nn

from .. import fastmath
from ..lowering import LTCLowering
from ._common import check_int, check_choice

MAPPINGS = ("affine", "linear", None)

# Uniform initialisation ranges of ncps.torch.LTCCell.
INIT_RANGES = {
    "gleak": (0.001, 1.0),
    "vleak": (-0.2, 0.2),
    "cm": (0.4, 0.6),
    "w": (0.001, 1.0),
    "sigma": (3, 8),
    "mu": (0.3, 0.8),
    "sensory_w": (0.001, 1.0),
    "sensory_sigma": (3, 8),
    "sensory_mu": (0.3, 0.8),
}


class LTCCell(nn.Module):
    """An LTC cell (Hasani et al. 2021) with a fused semi-implicit ODE solver.

    State v (B, S) with S = wiring.units; input (B, I) with I = wiring.input_dim; output
    (B, M), the first M = wiring.output_dim neurons after the output mapping.

    Args:
        wiring: an ``ncps_mlx.wirings.Wiring``; its adjacency gives the synapse masks and the
            initial reversal potentials.
        in_features: input features; builds the wiring (None if it is already built).
        input_mapping, output_mapping: "affine" (scale and shift), "linear" (scale) or None.
        ode_unfolds: solver sub-steps per time step.
        epsilon: added to the denominator to avoid dividing by zero.
        implicit_param_constraints: if True, gleak, cm, w and sensory_w pass through softplus
            at run time; if False they are used as stored, and ``apply_weight_constraints()``
            clips them at 0 (call it after each optimiser step). ncps.tf/keras models, which
            use NonNeg constraints, are the False case (reference-notes point 6).

    Parameters (names as ``ncps.torch``): gleak, vleak, cm (S,); sigma, mu, w, erev (S, S);
    sensory_sigma, sensory_mu, sensory_w, sensory_erev (I, S); input_w, input_b (I,);
    output_w, output_b (M,). Frozen: sparsity_mask (S, S), sensory_sparsity_mask (I, S).
    """

    def __init__(
        self,
        wiring,
        in_features=None,
        input_mapping="affine",
        output_mapping="affine",
        ode_unfolds: int = 6,
        epsilon: float = 1e-8,
        implicit_param_constraints: bool = False,
    ):
        super().__init__()
        check_choice("input_mapping", input_mapping, MAPPINGS)
        check_choice("output_mapping", output_mapping, MAPPINGS)
        if in_features is not None:
            wiring.build(in_features)
        if not wiring.is_built():
            raise ValueError(
                "The wiring does not know its number of input features: pass in_features or call wiring.build()"
            )
        check_int("ode_unfolds", ode_unfolds)
        self.wiring = wiring
        self.input_mapping = input_mapping
        self.output_mapping = output_mapping
        self.ode_unfolds = int(ode_unfolds)
        self.epsilon = float(epsilon)
        self.implicit_param_constraints = bool(implicit_param_constraints)

        S, I, M = self.state_size, self.sensory_size, self.motor_size
        shapes = {
            "gleak": (S,), "vleak": (S,), "cm": (S,),
            "sigma": (S, S), "mu": (S, S), "w": (S, S),
            "sensory_sigma": (I, S), "sensory_mu": (I, S), "sensory_w": (I, S),
        }
        for name, shape in shapes.items():
            low, high = INIT_RANGES[name]
            setattr(self, name, mx.random.uniform(low, high, shape))
        self.erev = mx.array(wiring.erev_initializer(), dtype=mx.float32)
        self.sensory_erev = mx.array(wiring.sensory_erev_initializer(), dtype=mx.float32)
        self.sparsity_mask = mx.array(np.abs(wiring.adjacency_matrix), dtype=mx.float32)
        self.sensory_sparsity_mask = mx.array(np.abs(wiring.sensory_adjacency_matrix), dtype=mx.float32)
        self.freeze(keys=["sparsity_mask", "sensory_sparsity_mask"], recurse=False)

        if input_mapping in ("affine", "linear"):
            self.input_w = mx.ones((I,))
        if input_mapping == "affine":
            self.input_b = mx.zeros((I,))
        if output_mapping in ("affine", "linear"):
            self.output_w = mx.ones((M,))
        if output_mapping == "affine":
            self.output_b = mx.zeros((M,))

    @property
    def state_size(self) -> int:
        return self.wiring.units

    @property
    def sensory_size(self) -> int:
        return self.wiring.input_dim

    @property
    def motor_size(self) -> int:
        return self.wiring.output_dim

    @property
    def output_size(self) -> int:
        return self.motor_size

    @property
    def synapse_count(self) -> int:
        return self.wiring.synapse_count

    @property
    def sensory_synapse_count(self) -> int:
        return self.wiring.sensory_synapse_count

    def lowered(self) -> LTCLowering:
        """What the kernels and the ONNX exporter read of this cell (``ncps_mlx.lowering``)."""
        affine_in, affine_out = self.input_mapping == "affine", self.output_mapping == "affine"
        return LTCLowering(
            state_size=self.state_size,
            motor_size=self.motor_size,
            ode_unfolds=self.ode_unfolds,
            epsilon=self.epsilon,
            input_w=self.input_w if self.input_mapping in ("affine", "linear") else None,
            input_b=self.input_b if affine_in else None,
            sensory_sigma=self.sensory_sigma,
            sensory_mu=self.sensory_mu,
            sensory_w=self._positive(self.sensory_w) * self.sensory_sparsity_mask,
            sensory_erev=self.sensory_erev,
            sigma=self.sigma,
            mu=self.mu,
            w=self._positive(self.w) * self.sparsity_mask,
            erev=self.erev,
            cm=self._positive(self.cm),
            gleak=self._positive(self.gleak),
            vleak=self.vleak,
            output_w=self.output_w if self.output_mapping in ("affine", "linear") else None,
            output_b=self.output_b if affine_out else None,
        )

    def _positive(self, x: mx.array) -> mx.array:
        return nn.softplus(x) if self.implicit_param_constraints else x

    def apply_weight_constraints(self) -> None:
        """Clip w, sensory_w, cm and gleak at 0 (no-op with implicit constraints)."""
        if not self.implicit_param_constraints:
            for name in ("w", "sensory_w", "cm", "gleak"):
                setattr(self, name, mx.maximum(getattr(self, name), 0.0))

    def map_input(self, x: mx.array) -> mx.array:
        """(..., I) -> (..., I): the input mapping (scale, shift) the sensory synapses read."""
        return _mapped(x, self.input_w if self.input_mapping in ("affine", "linear") else None,
                       self.input_b if self.input_mapping == "affine" else None)

    def sensory_synapse_arrays(self):
        """(sigma, mu, w * erev, w), each (I, S), w the masked, constrained sensory weights:
        ``project_input(x)`` is the dense synaptic sums of ``map_input(x)`` through them."""
        w = self._positive(self.sensory_w) * self.sensory_sparsity_mask
        return self.sensory_sigma, self.sensory_mu, w * self.sensory_erev, w

    def project_input(self, x: mx.array) -> mx.array:
        """(..., I) -> (..., 2S): the sensory synapses' numerator and denominator terms.

        They depend on the input only, so they are computed once per sequence, in a compiled
        function whose elementwise operations fuse: dense, one (..., I, S) tensor; with at most
        ``SPARSE_DENSITY`` of the sensory synapses present, only the existing ones, as the
        sparse step does. The (I, S) weights are made outside the compiled function, where MLX
        would evaluate their softplus for every element of the big tensor.
        """
        mapping = [self.input_w] if self.input_mapping in ("affine", "linear") else []
        mapping += [self.input_b] if self.input_mapping == "affine" else []
        positive_w = self._positive(self.sensory_w)
        synapses = self._sensory_synapses()
        if synapses is None:
            w = positive_w * self.sensory_sparsity_mask
            terms = _sensory_terms(fastmath.mode())
            return terms(x, self.sensory_sigma, self.sensory_mu, w * self.sensory_erev, w, *mapping)
        presynaptic = synapses[0]
        sigma, mu, _, to_post = _existing(synapses, self.sensory_sigma, self.sensory_mu, positive_w, self.sensory_erev,
                                          self.sensory_sparsity_mask)
        terms = _sparse_sensory_terms(fastmath.mode())
        return terms(x, presynaptic * sigma, -(sigma * mu), to_post, *mapping)

    # With at most this fraction of the S x S synapses present (NCP/AutoNCP wirings keep ~12%)
    # the step computes only the existing ones; denser wirings use the dense tensors.
    SPARSE_DENSITY = 0.5

    def _synapses(self):
        """(presynaptic selection, flat index (N,), postsynaptic one-hot (N, S)) of the N
        existing synapses, or None when the wiring is dense enough for the dense step. The
        selection is a one-hot (S, N) matrix, multiplied by v to gather the presynaptic
        potentials (exactly: one nonzero product per column; faster than MLX's gather). Past
        2**22 entries it is the index (N,) instead, for ``mx.take``. Made once from the wiring
        (the masks are frozen copies of it) and kept as constants."""
        dtype = self.sigma.dtype  # the selections in the model's dtype (float16/bfloat16 stay so)
        if self.__dict__.get("_synapse_index", (None,))[0] != str(dtype):
            self.__dict__["_synapse_index"] = (str(dtype), _sparse_index(self.wiring.adjacency_matrix, self.SPARSE_DENSITY, dtype))
        return self.__dict__["_synapse_index"][1]

    def _sensory_synapses(self):
        """``_synapses`` of the sensory synapses: (selection (I, N), flat index, one-hot (N, S)),
        or None for the dense sensory term (also past the selection's size limit)."""
        dtype = self.sensory_sigma.dtype
        if self.__dict__.get("_sensory_synapse_index", (None,))[0] != str(dtype):
            index = _sparse_index(self.wiring.sensory_adjacency_matrix, self.SPARSE_DENSITY, dtype)
            self.__dict__["_sensory_synapse_index"] = (str(dtype), index if index is not None and index[0].ndim == 2 else None)
        return self.__dict__["_sensory_synapse_index"][1]

    # One step per compiled call (``ncps_mlx.runtime.stepping``): the unfolds of consecutive
    # steps compiled together fuse worse.
    steps_per_call = 1

    @property
    def backward_rows(self) -> int:
        """Batch x time rows per vjp call when the sequence loop computes gradients
        (``ncps_mlx.runtime.stepping``): each row holds an activation per synapse, so fewer rows
        than for other cells; the sparse step's one-hot products take more rows well."""
        synapses = self._synapses()
        if synapses is None:
            return max(1, 65536 // self.state_size**2)
        return max(1, 262144 // int(synapses[1].shape[0]))

    def prepare(self):
        """Once per sequence: cm, gleak, gleak * vleak and the synapse terms, with the run-time
        constraint applied: (sigma, mu, w, w * erev) masked (S, S), or for a sparse wiring the
        N existing synapses' (selection * sigma (S, N), -sigma mu (N,)) (or (sigma, mu) (N,) past
        the selection's size limit) and the (N, 2S) matrix that sums their w * erev and w terms
        into each postsynaptic neuron."""
        gleak = self._positive(self.gleak)
        synapses = self._synapses()
        if synapses is None:
            w = self._positive(self.w) * self.sparsity_mask
            terms = (self.sigma, self.mu, w, w * self.erev)
        else:
            presynaptic = synapses[0]
            sigma, mu, w, to_post = _existing(synapses, self.sigma, self.mu, self._positive(self.w), self.erev,
                                              self.sparsity_mask)
            if presynaptic.ndim == 2:
                # sigma (v - mu) as one product, v @ (selection * sigma) - sigma mu: the
                # sigmoid's argument then arrives contiguous, and its loops vectorise (with sigma
                # and mu broadcast over the batch they ran scalar). It rounds v sigma and
                # sigma mu apart, ~1e-7 off the reference's order.
                terms = (presynaptic * sigma, -(sigma * mu), to_post)
            else:
                terms = (sigma, mu, to_post)
        return (self._positive(self.cm), gleak, gleak * self.vleak) + terms

    def expand_biases(self, prepared, batch: int):
        """``prepare()``'s output for a loop that is not differentiated (``ncps_mlx.runtime.stepping``),
        with the sparse step's -sigma mu a contiguous (batch, N) array, made once: given an
        (N,) one, ``mx.addmm`` copies it, broadcast, into its output at every unfold with MLX's
        general strided copy."""
        if len(prepared) != 6 or prepared[3].ndim != 2:  # dense, or no selection matrix
            return prepared
        *head, second, to_post = prepared
        return (*head, mx.contiguous(mx.broadcast_to(second, (batch, second.shape[0]))), to_post)

    def recurrent_step(self, u: mx.array, v: mx.array, ts=1.0, prepared=None):
        """u (B, 2S), v (B, S), ts float or (B, 1) -> (output (B, M), new state (B, S))."""
        cm, gleak, leak, *synapse_terms = self.prepare() if prepared is None else prepared
        sparse = len(synapse_terms) == 3
        presynaptic = self._synapses()[0] if sparse else None
        sensory_numerator, sensory_denominator = mx.split(u, 2, axis=-1)
        cm_t = cm / (ts / self.ode_unfolds)
        for _ in range(self.ode_unfolds):
            # The reference multiplies sigmoid, w, mask and erev per synapse in another order;
            # folding w * mask (* erev) once per sequence changes only the last bit.
            if sparse:
                first, second, to_post = synapse_terms
                if presynaptic.ndim == 2:
                    argument = mx.addmm(second, v, first)
                else:
                    argument = first * (mx.take(v, presynaptic, axis=1) - second)
                activation = fastmath.sigmoid(argument)
                numerator, denominator = mx.split(activation @ to_post, 2, axis=-1)
            else:
                sigma, mu, w, w_erev = synapse_terms
                activation = fastmath.sigmoid(sigma * (v[:, :, None] - mu))
                numerator, denominator = mx.sum(activation * w_erev, axis=1), mx.sum(activation * w, axis=1)
            numerator = cm_t * v + leak + (numerator + sensory_numerator)
            denominator = cm_t + gleak + (denominator + sensory_denominator)
            v = numerator / (denominator + self.epsilon)
        return self._map_outputs(v), v

    def _map_outputs(self, v: mx.array) -> mx.array:
        out = v[..., : self.motor_size] if self.motor_size < self.state_size else v
        if self.output_mapping in ("affine", "linear"):
            out = out * self.output_w
        if self.output_mapping == "affine":
            out = out + self.output_b
        return out

    def __call__(self, x: mx.array, v: mx.array, ts=1.0):
        return self.recurrent_step(self.project_input(x), v, ts)


@functools.lru_cache(maxsize=None)
def _sensory_terms(mode):
    """``LTCCell.project_input`` as a function of its arrays: x (..., I), sigma and mu (I, S),
    the masked weights times erev and alone (I, S), then the input mapping's scale and shift
    if it has them. Compiled, except in fastmath's "exact" mode (under ``mx.vmap`` or an outer
    ``mx.compile``, where compiling gains nothing); one per mode, as a compiled function keeps
    the tanh/sigmoid it was traced with. The reference multiplies sigmoid, w, mask and erev
    in another order; folding them first changes only the last bit."""

    def terms(x, sigma, mu, w_erev, w, input_w=None, input_b=None):
        x = _mapped(x, input_w, input_b)
        activation = fastmath.sigmoid(sigma * (x[..., :, None] - mu))
        return mx.concatenate([mx.sum(activation * w_erev, axis=-2), mx.sum(activation * w, axis=-2)], axis=-1)

    return terms if mode == "exact" else mx.compile(terms)


def _mapped(x, input_w=None, input_b=None):
    """The input mapping: x scaled by input_w and shifted by input_b, where given."""
    if input_w is not None:
        x = x * input_w
    return x if input_b is None else x + input_b


def _sparse_index(adjacency, density_limit, dtype=mx.float32):
    """(presynaptic selection (P, N) one-hot, or past 2**22 entries the index (N,); flat index
    (N,) into P x S; postsynaptic one-hot (N, S)) of the N synapses of a (P, S) adjacency
    matrix, or None if more than ``density_limit`` of them are present."""
    mask = np.abs(adjacency)
    pre, post = np.nonzero(mask)
    if pre.size > density_limit * mask.size:
        return None
    one_hot = np.zeros((pre.size, mask.shape[1]), np.float32)
    one_hot[np.arange(pre.size), post] = 1.0
    flat = (pre * mask.shape[1] + post).astype(np.int32)
    if mask.shape[0] * pre.size <= 2**22:
        select = np.zeros((mask.shape[0], pre.size), np.float32)
        select[pre, np.arange(pre.size)] = 1.0
        presynaptic = mx.array(select, dtype=dtype)
    else:
        presynaptic = mx.array(pre.astype(np.int32))
    return presynaptic, mx.array(flat), mx.array(one_hot, dtype=dtype)


def _existing(synapses, sigma, mu, positive_w, erev, mask):
    """The existing synapses' sigma, mu, masked w (N,) and the (N, 2S) matrix that sums their
    w * erev and w terms into their postsynaptic neurons, from (P, S) parameters."""
    _, flat, one_hot = synapses

    def existing(a):
        return mx.take(a.reshape(-1), flat)

    w = existing(positive_w) * existing(mask)
    to_post = mx.concatenate([one_hot * (w * existing(erev))[:, None], one_hot * w[:, None]], axis=1)
    return existing(sigma), existing(mu), w, to_post


@functools.lru_cache(maxsize=None)
def _sparse_sensory_terms(mode):
    """``LTCCell.project_input`` of sparse sensory synapses as a function of its arrays: x
    (..., I), the selection times sigma (I, N), -sigma mu (N,), the (N, 2S) postsynaptic sums,
    then the input mapping's scale and shift if it has them. Compiled as ``_sensory_terms``
    is. The argument x sigma - sigma mu rounds its two products apart, ~1e-7 off the
    reference's sigma (x - mu)."""

    def terms(x, first, second, to_post, input_w=None, input_b=None):
        x = _mapped(x, input_w, input_b)
        # -sigma mu as the product's last row, times a column of ones: ``mx.addmm`` would copy
        # it, broadcast over batch x time, into its output with MLX's general strided copy.
        x = mx.concatenate([x, mx.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)
        return fastmath.sigmoid(x @ mx.concatenate([first, second[None]])) @ to_post

    return terms if mode == "exact" else mx.compile(terms)
