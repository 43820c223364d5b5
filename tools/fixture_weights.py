"""Weights for fixtures: moved away from their initialisation, so a fixture tests more than
the initialiser (shared by the Keras fixture scripts)."""

from __future__ import annotations

import numpy as np


def perturb(model, seed, scale=1.0):
    """Move every weight away from its initialisation; LTC parameters kept non-negative stay so.

    ``scale`` shrinks the result: a Keras CfC has no tanh on its heads, so its state is
    unbounded; with full-size random weights a no_gate or wired one reaches ~80 in 12 steps,
    where float32 spacing alone (any implementation against float64) exceeds 1e-5.
    """
    rng = np.random.default_rng(seed)
    values = []
    for variable in model.weights:
        value = np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable)
        name = variable.name.split("/")[-1].split(":")[0]
        if name in ("gleak", "cm", "w", "sensory_w"):
            value = value * np.exp(0.3 * rng.normal(size=value.shape))
        elif name not in ("mean", "variance", "count"):
            spread = float(value.std()) if value.size > 1 else 0.0
            value = value + 0.5 * (spread if spread > 1e-6 else 0.1) * rng.normal(size=value.shape)
        values.append((value * (scale if name not in ("mean", "variance", "count") else 1.0)).astype(np.float32))
    model.set_weights(values)
