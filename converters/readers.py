"""The table of readers: one module per source format, found by name (``*_reader.py``, or a package).

A reader module (or package: ``keras/``) has ``NAME``, ``SUFFIXES``, ``sniff(path) -> bool`` (recognise the file by its
bytes) and ``read(path, config=None, trust_pickle=False) -> Checkpoint``. Adding a format is
adding one such file to this package.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from . import formats
from .description import Checkpoint, ConversionError


def reader_modules():
    package = importlib.import_module(__package__)
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name.endswith("_reader") or m.ispkg)
    # Our own model files first: they are safetensors too, and describe themselves.
    names.sort(key=lambda name: name != "modelfile_reader")
    return [importlib.import_module(f"{__package__}.{name}") for name in names]


def read(path, config: dict | None = None, trust_pickle: bool = False) -> Checkpoint:
    """Find the reader for ``path`` and read it into a Checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if path.is_file() and path.stat().st_size == 0:
        raise ConversionError(f"{path}: the file is empty")
    for module in reader_modules():
        if module.sniff(path):
            return module.read(path, config=config, trust_pickle=trust_pickle)
    known = ", ".join(f"{m.NAME} ({' '.join(m.SUFFIXES)})" for m in reader_modules())
    if formats.kind_of(path) == "zip":
        raise ConversionError(
            f"{path}: a zip archive without config.json or data.pkl: not a .keras file and not a torch checkpoint"
        )
    raise ConversionError(f"{path}: not a checkpoint this tool reads (by its contents); it reads {known}")
