"""Reading ``ncps.torch`` state dicts.

Our parameter names mirror ``ncps.torch``'s state-dict keys (``rnn_cell.ff1.weight``,
``rnn_cell.layer_0.sparsity_mask``, ``lstm.input_map.weight``, ``fc.weight``, ...) and torch's
``nn.Linear`` layout (out, in) is MLX's, so arrays carry over unchanged. The one renaming is
the CfC backbone: torch's ``nn.Sequential`` numbers activations and dropouts too
(``backbone.0``, ``backbone.2``, ...), ours is a list of Linear layers (``backbone.0``,
``backbone.1``, ...).
"""

from __future__ import annotations

import re

import numpy as np

_BACKBONE = re.compile(r"^(.*\bbackbone)\.(\d+)\.(weight|bias)$")


def rename_torch_keys(state_dict: dict) -> dict[str, np.ndarray]:
    """Map an ``ncps.torch`` state dict (arrays or tensors) to ncps_mlx parameter names."""
    positions: dict[str, list[int]] = {}
    for key in state_dict:
        match = _BACKBONE.match(key)
        if match:
            positions.setdefault(match.group(1), []).append(int(match.group(2)))
    ordinal = {prefix: {p: i for i, p in enumerate(sorted(set(ps)))} for prefix, ps in positions.items()}

    renamed = {}
    for key, value in state_dict.items():
        match = _BACKBONE.match(key)
        if match:
            prefix, position, kind = match.group(1), int(match.group(2)), match.group(3)
            key = f"{prefix}.{ordinal[prefix][position]}.{kind}"
        renamed[key] = _to_numpy(value)
    return renamed


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)
