"""Recognising files by their bytes, and reading safetensors without any framework."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .description import ConversionError

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def kind_of(path: Path) -> str:
    """"zip", "pickle", "safetensors", "hdf5", "directory", or "unknown", from the first bytes."""
    path = Path(path)
    if path.is_dir():
        return "directory"
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        (length,) = struct.unpack("<Q", head[:8])
        if 2 <= length <= path.stat().st_size and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
    if len(raw) < length:
        raise ConversionError(f"{path}: truncated safetensors file (header cut short)")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConversionError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise ConversionError(
            f"{path}: truncated safetensors file: its header promises {8 + length + end} bytes, the file has {size}"
        )
    return header


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float32 numpy arrays."""
    header = safetensors_header(path)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + length)
        data = handle.read()
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, stop = info["data_offsets"]
        array = np.frombuffer(data[start:stop], dtype=dtype)
        if array.size != int(np.prod(info["shape"], dtype=np.int64)):
            raise ConversionError(f"{path}: tensor {name} has {array.size} values for shape {info['shape']}")
        arrays[name] = array.reshape(info["shape"]).astype(np.float32)
    return arrays
