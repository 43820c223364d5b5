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
        self.containers: list = []  # (container, key, the child it held): the tree's structure
        self.places: list = []  # (container, key) of every array
        self.arrays: tuple = ()
        self.children: tuple = ()
        self.value = None

    def __call__(self, module: nn.Module):
        if not self._unchanged(module):
            self._walk(module)
            self.arrays = tuple(container[key] for container, key in self.places)
            self.children = tuple(child for _, _, child in self.containers[1:])
            # Every place (a submodule's, then an array's) as three parallel tuples, so that the
            # check below runs in C: one call a step costs microseconds for each Python loop.
            places = [(c, k) for c, k, _ in self.containers[1:]] + self.places
            self._held_by = tuple(c for c, _ in places)
            self._keys = tuple(k for _, k in places)
            self._values = self.children + self.arrays
            self.value = self.derive(module)
        return self.value

    def _unchanged(self, module) -> bool:
        if not self.containers or self.containers[0][2] is not module:
            return False
        try:
            return all(map(operator.is_, map(operator.getitem, self._held_by, self._keys), self._values))
        except (KeyError, IndexError):  # a submodule or a list entry taken out
            return False

    def _walk(self, module):
        self.containers, self.places = [(None, None, module)], []

        def visit(container):
            items = container.items() if isinstance(container, dict) else enumerate(container)
            for key, value in items:
                if isinstance(key, str) and key.startswith("_"):
                    continue
                if isinstance(value, mx.array):
                    self.places.append((container, key))
                elif isinstance(value, (dict, list, tuple)):
                    self.containers.append((container, key, value))
                    visit(value)

        visit(module)
