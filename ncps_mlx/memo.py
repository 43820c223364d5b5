"""Values derived from a module's parameters, made once and kept until a parameter changes.

A model call derives much from its parameters before it computes anything: the masked and
constrained weights, the fused heads, the lowering the kernels read. For one step at a time
(a controller, batch 1) that work costs more than the step. MLX arrays are immutable, so an
unchanged parameter is the same array object: a derivation keyed on the identity of every
parameter is sound, and an optimizer step, ``model.update`` or ``load_weights`` (each puts new
arrays in) makes it again. Under ``mx.grad`` and an outer ``mx.compile`` with the model's state
as inputs, the parameters are other arrays as well, so the derivation is traced with them.
"""

from __future__ import annotations

import operator
from typing import Callable

import mlx.core as mx
import mlx.nn as nn


class ParameterMemo:
    """``memo(module)`` -> ``derive(module)``, made again only when one of the module's arrays
    (every public array under it, as ``module.parameters()`` finds them) is another array, or a
    public submodule, list or dict under it was replaced."""

    def __init__(self, derive: Callable):
        self.derive = derive
        self.module = None
        # Every place under the module (each public submodule, list, dict and array) as three
        # parallel tuples, what holds it, its key and what it held, so that the check runs in C
        # (map): one call a step costs microseconds for each Python loop.
        self.held_by: tuple = ()
        self.keys: tuple = ()
        self.values: tuple = ()
        self.value = None

    def __call__(self, module: nn.Module):
        if not self._unchanged(module):
            places = self._walk(module)
            self.module = module
            self.held_by, self.keys, self.values = (tuple(p[i] for p in places) for i in range(3))
            self.value = self.derive(module)
        return self.value

    def _unchanged(self, module) -> bool:
        if self.module is not module:
            return False
        try:
            return all(map(operator.is_, map(operator.getitem, self.held_by, self.keys), self.values))
        except (KeyError, IndexError):  # a submodule or a list entry taken out
            return False

    @staticmethod
    def _walk(module) -> list:
        places = []

        def visit(container):
            items = container.items() if isinstance(container, dict) else enumerate(container)
            for key, value in items:
                if isinstance(key, str) and key.startswith("_"):
                    continue
                if isinstance(value, (mx.array, dict, list, tuple)):
                    places.append((container, key, value))
                    if not isinstance(value, mx.array):
                        visit(value)

        visit(module)
        return places
