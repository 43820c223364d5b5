"""Checks of constructor arguments, each naming the argument it refuses."""

from __future__ import annotations

import numbers


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum``, else an error that names the argument
    (where MLX would say "[bits] Negative dimensions not allowed" or build an empty model)."""
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)
