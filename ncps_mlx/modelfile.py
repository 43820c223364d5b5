"""Self-describing model files: ``save(model, path)`` and ``load(path)``.

A model file is a plain ``.safetensors`` file: the model's parameters under their MLX names
(so ``model.load_weights(path)`` works on it) plus string metadata:

* ``format``: ``"ncps_mlx"``, ``format_version``: ``"1"``, ``ncps_mlx_version``;
* ``model_class`` and ``config``: the constructor arguments as JSON, a wiring with its exact
  adjacency matrices and layers (no seed needed to rebuild it);
* ``source``: JSON provenance, e.g. ``{"framework": "torch", "file": "x.pt", "sha256": ...}``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

FORMAT = "ncps_mlx"
FORMAT_VERSION = "1"


class ModelFileError(ValueError):
    """A model file that cannot be read, or whose metadata does not match its tensors."""


def save(model, path, source: dict | None = None) -> Path:
    """Write ``model`` to ``path`` (.safetensors) atomically: a temporary file, then a rename."""
    from . import __version__

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"Model files end in .safetensors; got {path.name}")
    config = model.get_config()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ncps_mlx_version": __version__,
        "model_class": config["class"],
        "config": json.dumps(config),
        "source": json.dumps(source or {}),
    }
    arrays = dict(tree_flatten(model.parameters()))
    write_atomically(path, lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata))
    return path


def write_atomically(path: Path, write) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path``; never leaves a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(path) -> dict:
    """The decoded metadata of a model file: format fields, ``config`` and ``source`` as dicts."""
    _, metadata = _read(path)
    return _decode(path, metadata)


def load(path):
    """Rebuild the model saved in ``path``; returned in eval mode (call ``.train()`` to train)."""
    from .models import model_from_config

    arrays, metadata = _read(path)
    metadata = _decode(path, metadata)
    try:
        model = model_from_config(metadata["config"])
    except ValueError as error:
        raise ModelFileError(f"{path}: the config in its metadata is invalid: {error}") from None
    check_arrays(model, arrays, where=str(path))
    model.load_weights(list(arrays.items()), strict=True)
    model.eval()
    return model


def check_arrays(model, arrays: dict, where: str) -> None:
    """Raise ``ModelFileError`` unless ``arrays`` has exactly the model's names and shapes."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    got = {k: tuple(v.shape) for k, v in arrays.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} (expected {expected[k]})" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_short(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_short(wrong)}")
    if problems:
        raise ModelFileError(f"{where}: tensors do not match the model its config describes: " + "; ".join(problems))


def _short(items, limit=5) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def _read(path):
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as error:  # mlx raises RuntimeError/ValueError with its own wording
        raise ModelFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") from None


def _decode(path, metadata: dict) -> dict:
    if metadata.get("format") != FORMAT:
        raise ModelFileError(
            f"{path}: no ncps_mlx metadata, so this is not an ncps-mlx model file. A bare weights file "
            "loads with model.load_weights(); a reference checkpoint converts with ncps-convert."
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model file format version {metadata.get('format_version')!r} is not supported")
    decoded = dict(metadata)
    for key in ("config", "source"):
        try:
            decoded[key] = json.loads(metadata.get(key, ""))
        except json.JSONDecodeError:
            raise ModelFileError(f"{path}: its '{key}' metadata is not valid JSON") from None
    if not isinstance(decoded["config"], dict) or decoded["config"].get("class") != metadata.get("model_class"):
        raise ModelFileError(f"{path}: metadata model_class and config disagree")
    return decoded
