"""Weights into your own MLX port of a model: ``load_weights(module, path, strict=True)``.

Most trained NCPs are a user's module with the ncps layer inside (``self.seq_model = CfC(...)``
beside an encoder and a head). Port the class to MLX with ``ncps_mlx.CfC`` in place of
``ncps.torch.CfC`` and the same attribute names, then load either the file ``ncps-convert``
wrote or the torch checkpoint itself (any container the torch reader takes: a state dict, a
training dict, a Lightning ``.ckpt``, ``module.`` / ``_orig_mod.`` prefixes).

How names and layouts map, torch -> MLX:

* an ncps module's tensors as the converter names them (the CfC backbone's ``nn.Sequential``
  numbering ``backbone.0, backbone.3`` becomes ``backbone.0, backbone.1``);
* ``nn.Sequential`` children: ``head.0.weight`` -> ``head.layers.0.weight`` (MLX's
  ``nn.Sequential`` keeps its children, activations included, in ``layers``, so indices match);
* ``nn.Linear``, ``nn.LayerNorm``, ``nn.Embedding``, ``nn.BatchNorm*`` (``running_mean``,
  ``running_var``): as they are; ``num_batches_tracked`` (torch bookkeeping) is skipped;
* ``nn.Conv1d``/``nn.Conv2d`` weights (out, in, *kernel) -> MLX's (out, *kernel, in).

With ``strict=True`` every parameter of ``module`` must be loaded and every tensor of the file
used, with matching shapes; one error lists what is missing, unexpected and mis-shaped.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import modelfile

# Torch bookkeeping with no MLX counterpart.
SKIPPED_SUFFIXES = ("num_batches_tracked",)


def load_weights(module: nn.Module, path, strict: bool = True) -> nn.Module:
    """Load ``path`` (an ncps-mlx model file or a torch checkpoint) into ``module``; returns it."""
    source = checkpoint_tensors(path)
    targets = dict(tree_flatten(module.parameters()))
    by_canonical = {_canonical(name): name for name in targets}
    convs = {name for name, child in module.named_modules() if isinstance(child, (nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    loaded, unexpected, wrong = {}, [], []
    for key, value in source.items():
        if key.endswith(SKIPPED_SUFFIXES):
            continue
        target = key if key in targets else by_canonical.get(_canonical(key))
        if target is None:
            unexpected.append(key)
            continue
        value = np.asarray(value)
        if target.rsplit(".", 1)[0] in convs and target.endswith(".weight") and value.ndim >= 3:
            value = np.moveaxis(value, 1, -1)  # torch (out, in, *kernel) -> MLX (out, *kernel, in)
        if tuple(value.shape) != tuple(targets[target].shape):
            wrong.append(f"{key} {tuple(value.shape)} -> {target} {tuple(targets[target].shape)}")
            continue
        loaded[target] = mx.array(np.ascontiguousarray(value), dtype=targets[target].dtype)
    missing = sorted(set(targets) - set(loaded))
    if strict and (missing or unexpected or wrong):
        problems = []
        if missing:
            problems.append(f"missing in the file: {_listed(missing)}")
        if unexpected:
            problems.append(f"in the file but not in the module: {_listed(sorted(unexpected))}")
        if wrong:
            problems.append(f"shapes differ: {_listed(wrong)}")
        raise ValueError(
            f"{path} does not fit {type(module).__name__}: " + "; ".join(problems)
            + ". Name the MLX attributes as in the torch module (or pass strict=False)."
        )
    module.load_weights(list(loaded.items()), strict=False)
    return module


def checkpoint_tensors(path) -> dict:
    """Every tensor of a model file or checkpoint, ncps modules in MLX names under the module's
    name, the rest under the checkpoint's own names."""
    path = Path(path)
    try:
        modelfile.read_metadata(path)
    except modelfile.ModelFileError:
        from . import readers  # a reference checkpoint: read it as ncps-convert does

        checkpoint = readers.read(path)
        tensors = dict(checkpoint.other)
        for name, description in checkpoint.modules.items():
            tensors.update({f"{name}.{k}" if name else k: v for k, v in description.arrays.items()})
        return tensors
    return dict(mx.load(str(path)))


def _canonical(name: str) -> str:
    """A name without MLX's ``layers`` level before a child index: ``head.layers.0.weight`` and
    torch's ``head.0.weight`` meet as ``head.0.weight``."""
    return re.sub(r"(^|\.)layers\.(?=\d+(?:\.|$))", r"\1", name)


def _listed(items, limit=6) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown}{', ...' if len(items) > limit else ''} ({len(items)})"
