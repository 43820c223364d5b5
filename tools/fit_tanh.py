"""Fit the rational tanh of ``ncps_mlx/fastmath.py``: tanh(x) / x ~= P(x^2) / Q(x^2) on [0, 7.9], and its clip.

    python tools/fit_tanh.py [--degrees 4 4]

Linearised least squares on the relative error (the Sanathanan-Koerner iteration, dividing by
the previous Q), with Lawson's reweighting towards the minimax solution; the best iterate is
kept. Prints the coefficients (as float32 values, lowest degree first) and the error of the
fit in float64 and of a float32 evaluation over [-12, 12].
"""

from __future__ import annotations

import argparse

import numpy as np

CLIP = 7.9


def fit(p_degree: int, q_degree: int, iterations: int = 40):
    x = np.unique(np.concatenate([np.linspace(0, CLIP, 20_000), CLIP * np.sin(np.linspace(0, np.pi / 2, 20_000)) ** 2]))
    x = x[x > 0]
    f = np.tanh(x) / x
    t = (x / CLIP) ** 2  # a well-conditioned variable on [0, 1]
    previous_q = np.ones_like(t)
    weights = np.full_like(t, 1.0 / t.size)
    best = None
    for _ in range(iterations):
        a_p = np.stack([t**k for k in range(p_degree + 1)], axis=1)
        a_q = np.stack([-f * t**k for k in range(1, q_degree + 1)], axis=1)
        a = np.concatenate([a_p, a_q], axis=1) / (previous_q * f)[:, None]
        root = np.sqrt(weights)
        c, *_ = np.linalg.lstsq(a * root[:, None], root / previous_q, rcond=None)
        p, q = c[: p_degree + 1], np.concatenate([[1.0], c[p_degree + 1 :]])
        q_values = np.polyval(q[::-1], t)
        if q_values.min() <= 0:
            break
        error = np.abs(np.polyval(p[::-1], t) / q_values - f) / f
        if best is None or error.max() < best[2]:
            best = (p.copy(), q.copy(), error.max())
        previous_q = q_values
        weights = weights * error
        weights /= weights.sum()
    p, q, error = best
    scale = CLIP ** (2 * np.arange(max(p_degree, q_degree) + 1))
    return p / scale[: p_degree + 1], q / scale[: q_degree + 1], error


def estrin(c, s, s2, s4):
    """c[0] + c[1] s + ... + c[4] s^4 as fastmath evaluates it (Estrin's scheme: a shallow
    graph, so ``mx.compile`` fuses the whole tanh into fewer kernels than Horner's would)."""
    return (c[0] + c[1] * s) + s2 * (c[2] + c[3] * s) + c[4] * s4


def evaluate_float32(p, q, x, clip=CLIP):
    """The rational in float32, operation for operation as ``ncps_mlx.fastmath`` evaluates it
    (numpy's float32 arithmetic is the same IEEE single precision, without FMA contraction,
    as the loops MLX compiles; ``tests/test_fastmath.py`` checks the two agree bit for bit)."""
    x = np.clip(x, -clip, clip).astype(np.float32)
    s = x * x + np.float32(1e-9)
    s2 = s * s
    s4 = s2 * s2
    p32, q32 = [np.float32(c) for c in p], [np.float32(c) for c in q]
    return (x * estrin(p32, s, s2, s4) / estrin(q32, s, s2, s4)).astype(np.float32)


def floats_between(low: float, high: float) -> np.ndarray:
    """Every float32 in [low, high] (both positive)."""
    bits = np.arange(np.float32(low).view(np.int32), np.float32(high).view(np.int32) + 1, dtype=np.int32)
    return bits.view(np.float32)


def choose_clip(p, q):
    """(clip, bound, inverse bound): the largest float below which the float32 ratio never
    exceeds 1 and at which it is within an ulp of 1, so saturated values are 1 - 6e-8 (not
    1 - 4e-7, tanh(7.9)); the bound two ulps inside it, beyond which fastmath.clip moves
    inputs; the smallest float whose float32 reciprocal is at most the clip."""
    x = floats_between(4.0, CLIP + 0.5)  # every float: a grid missed 33 above 1 near 8.02
    ratio = evaluate_float32(p, q, x, clip=np.inf)
    below = np.maximum.accumulate(ratio) <= 1.0
    clip = x[np.where(below & (ratio >= np.float32(1 - 2**-24)))[0][-1]]
    bound = np.nextafter(np.nextafter(clip, np.float32(0)), np.float32(0))
    inverse = np.float32(1) / clip
    while np.float32(1) / inverse > clip:
        inverse = np.nextafter(inverse, np.float32(1))
    while np.float32(1) / np.nextafter(inverse, np.float32(0)) <= clip:
        inverse = np.nextafter(inverse, np.float32(0))
    return clip, bound, inverse


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--degrees", nargs=2, type=int, default=(4, 4), metavar=("P", "Q"))
    args = parser.parse_args()
    p, q, error = fit(*args.degrees)
    print(f"P = {tuple(float(np.float32(v)) for v in p)}")
    print(f"Q = {tuple(float(np.float32(v)) for v in q)}")
    print(f"relative error of the fit (float64): {error:.2e}")
    clip, bound, inverse = choose_clip(p, q)
    print(f"CLIP = {float(clip)!r} (ratio there {evaluate_float32(p, q, np.array([clip]), clip=np.inf)[0]!r})")
    print(f"BOUND = {float(bound)!r}")
    print(f"INVERSE_BOUND = {float(inverse)!r}")
    x = np.linspace(-12, 12, 2_000_001).astype(np.float32)
    got = evaluate_float32(p, q, x, clip)
    print(f"absolute error evaluated in float32: {np.abs(got - np.tanh(x.astype(np.float64))).max():.2e}")


if __name__ == "__main__":
    main()
