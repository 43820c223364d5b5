"""Train a small AutoNCP CfC on a synthetic task and print the loss falling.

    python tools/demo.py [--steps 150]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from ncps_mlx import CfC, wirings


def make_data(batch=32, steps=48, seed=0):
    """Two phase-shifted sines in; a product of them, delayed by a quarter period, out."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, size=(batch, 1))
    t = np.linspace(0, 4 * np.pi, steps)[None, :] + phase
    x = np.stack([np.sin(t), np.cos(1.5 * t)], axis=-1).astype(np.float32)
    y = (np.sin(t - np.pi / 2) * np.cos(1.5 * t))[..., None].astype(np.float32)
    return mx.array(x), mx.array(y)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    args = parser.parse_args()

    mx.random.seed(0)
    wiring = wirings.AutoNCP(16, 1)
    model = CfC(2, wiring)
    print(
        f"CfC with AutoNCP(16, 1): {wiring.synapse_count} synapses, "
        f"{wiring.sensory_synapse_count} sensory synapses"
    )
    x, y = make_data()
    optimizer = optim.Adam(learning_rate=0.01)

    def loss_fn(model, x, y):
        return nn.losses.mse_loss(model(x)[0], y)

    step = nn.value_and_grad(model, loss_fn)
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        loss, grads = step(model, x, y)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        if i == 1 or i % 25 == 0:
            print(f"step {i:4d}  loss {loss.item():.5f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
