"""Self-describing model files: ``save(model, path)``, ``save_modules(...)`` and ``load(path)``.

A model file is a plain ``.safetensors`` file holding one or more named modules and, from a
converted checkpoint, every other tensor it had. Tensors: each module's parameters under its
MLX names prefixed by the module's name (none for a module named ``""``, so for a single model
``model.load_weights(path)`` works on the file), and the other tensors under the checkpoint's
own names. String metadata:

* ``format``: ``"ncps_mlx"``, ``format_version``: ``"2"``, ``ncps_mlx_version``;
* ``modules``: JSON ``{name: config}``, each config the constructor arguments, a wiring with its
  exact adjacency matrices and layers (no seed needed to rebuild it);
* ``other_tensors``: JSON list of the names that belong to no module (e.g. ``head.0.weight``);
* ``source``: JSON provenance, e.g. ``{"framework": "torch", "file": "x.pt", "sha256": ...}``;
* ``dtype``: the floating dtype the tensors are stored in (``float32``, ``float16``, ``bfloat16``);
  ``load`` builds the model in it.

Version 1 files (one model: ``model_class`` and ``config``) still load.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ncps_mlx import configs
from ncps_mlx.version import __version__

FORMAT = "ncps_mlx"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")


class ModelFileError(ValueError):
    """A model file that cannot be read, or whose metadata does not match its tensors."""


DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def save(model, path, source: dict | None = None, dtype: str | None = None) -> Path:
    """Write ``model`` to ``path`` (.safetensors) atomically: a temporary file, then a rename.
    ``dtype`` ("float32", "float16", "bfloat16"; default: as the model holds them) stores the
    floating tensors in that dtype; ``load`` then builds the model in it."""
    return save_modules({"": model}, path, source=source, dtype=dtype)


def save_modules(modules: dict, path, source: dict | None = None, other: dict | None = None, dtype: str | None = None) -> Path:
    """Write named modules (``{"": model}`` for one) and ``other`` tensors (name -> array) to
    ``path`` atomically, their floating tensors in ``dtype`` where given."""

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"Model files end in .safetensors; got {path.name}")
    if not modules:
        raise ValueError("save_modules needs at least one module")
    arrays = {}
    for name, model in modules.items():
        arrays.update({_prefixed(name, k): v for k, v in tree_flatten(model.parameters())})
    other = other or {}
    clashing = sorted(set(other) & set(arrays))
    if clashing:
        raise ValueError(f"other tensors {clashing[:5]} have the names of module parameters")
    arrays.update({k: mx.array(v) for k, v in other.items()})
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    floating = [v.dtype for v in arrays.values() if mx.issubdtype(v.dtype, mx.floating)]
    stored = DTYPES[dtype] if dtype else (floating[0] if floating else mx.float32)
    arrays = {k: v.astype(stored) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in arrays.items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ncps_mlx_version": __version__,
        "modules": json.dumps({name: model.get_config() for name, model in modules.items()}),
        "other_tensors": json.dumps(sorted(other)),
        "source": json.dumps(source or {}),
        "dtype": str(stored).rpartition(".")[2],
    }
    write_atomically(path, lambda tmp: _save_safetensors(tmp, arrays, metadata))
    return path


def _save_safetensors(path: Path, arrays: dict, metadata: dict) -> None:
    """``mx.save_safetensors``, its write failures as ``OSError`` naming the cause (MLX says only
    "[write] Unable to write N bytes to file.")."""
    try:
        mx.save_safetensors(str(path), arrays, metadata)
    except RuntimeError as error:
        needed = sum(v.nbytes for v in arrays.values()) + sum(len(k) + len(v) for k, v in metadata.items())
        if shutil.disk_usage(path.parent).free < needed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} ({error})") from None


def _prefixed(module: str, key: str) -> str:
    return f"{module}.{key}" if module else key


def owner_of(key: str, module_names) -> str:
    """The module a tensor name belongs to: the longest module name that prefixes it."""
    owners = [name for name in module_names if name and key.startswith(name + ".")]
    return max(owners, key=len) if owners else ""


def pick_module(names: list, name, where, error=None) -> str:
    """``name`` if it is one of ``names``; with ``None``, the only name. Errors list the choices."""
    error = error or ModelFileError
    shown = ", ".join(repr(n) for n in names)
    if name is None:
        if len(names) == 1:
            return names[0]
        raise error(f"{where} holds {len(names)} ncps modules ({shown}); choose one with module=NAME (--module NAME)")
    if name not in names:
        held = "one unnamed module (leave module unset)" if names == [""] else shown
        raise error(f"{where} has no ncps module {name!r}; it holds {held}")
    return name


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
    """The decoded metadata of a model file: format fields, ``modules``, ``other_tensors`` and
    ``source`` decoded from JSON."""
    _, metadata = _read(path)
    return _decode(path, metadata)


def load(path, module: str | None = None):
    """Rebuild the model saved in ``path``; returned in eval mode (call ``.train()`` to train).

    A file with several ncps modules (a converted wrapper with an encoder and a decoder) needs
    ``module="NAME"``; an unknown name is an error listing the file's modules.
    """
    arrays, metadata = _read(path)
    metadata = _decode(path, metadata)
    name = pick_module(list(metadata["modules"]), module, path)
    return _build(path, name, metadata, arrays)


def load_modules(path) -> tuple[dict, dict]:
    """({name: model} for every module of the file, {name: array} for its other tensors)."""
    arrays, metadata = _read(path)
    metadata = _decode(path, metadata)
    models = {name: _build(path, name, metadata, arrays) for name in metadata["modules"]}
    return models, {k: arrays[k] for k in metadata["other_tensors"]}


def _build(path, name, metadata, arrays):
    where = f"{path}" + (f" (module {name!r})" if name else "")
    try:
        model = configs.build(metadata["modules"][name])
    except (ValueError, TypeError, KeyError) as error:
        raise ModelFileError(f"{where}: the config in its metadata is invalid: {error}") from None
    others = set(metadata["other_tensors"])
    names = list(metadata["modules"])
    start = len(name) + 1 if name else 0
    own = {k[start:]: v for k, v in arrays.items() if k not in others and owner_of(k, names) == name}
    check_arrays(model, own, where=where)
    dtype = metadata.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ModelFileError(f"{where}: its dtype metadata {dtype!r} is none of {', '.join(DTYPES)}")
    if dtype != "float32":
        model.set_dtype(DTYPES[dtype])
    model.load_weights(list(own.items()), strict=True)
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
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelFileError(f"{path}: model file format version {version!r} is not supported (this ncps-mlx reads {', '.join(READABLE_VERSIONS)})")
    decoded = dict(metadata)
    keys = ("config", "source") if version == "1" else ("modules", "other_tensors", "source")
    for key in keys:
        try:
            decoded[key] = json.loads(metadata.get(key, ""))
        except json.JSONDecodeError:
            raise ModelFileError(f"{path}: its '{key}' metadata is not valid JSON") from None
    if version == "1":
        if not isinstance(decoded["config"], dict) or decoded["config"].get("class") != metadata.get("model_class"):
            raise ModelFileError(f"{path}: metadata model_class and config disagree")
        decoded["modules"], decoded["other_tensors"] = {"": decoded.pop("config")}, []
    modules, other = decoded["modules"], decoded["other_tensors"]
    if not isinstance(modules, dict) or not modules or not all(isinstance(c, dict) and "class" in c for c in modules.values()):
        raise ModelFileError(f"{path}: its 'modules' metadata is not a mapping of module names to configs")
    if not isinstance(other, list) or not all(isinstance(n, str) for n in other):
        raise ModelFileError(f"{path}: its 'other_tensors' metadata is not a list of tensor names")
    return decoded
