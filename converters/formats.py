"""Recognising files by their bytes, and reading safetensors without any framework."""

from __future__ import annotations

import contextlib
import json
import struct
import traceback
import zipfile
from pathlib import Path

import numpy as np

from .errors import ConversionError

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}
_SAFETENSORS_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

# More JSON than any model config needs; read into memory before parsing, so bounded.
MAX_JSON_BYTES = 64 * 2**20


def load_json(data, what: str):
    """JSON text or bytes -> its value; a ``ConversionError`` naming ``what`` when it is not
    JSON, is larger than ``MAX_JSON_BYTES``, or is nested too deep to parse."""
    if len(data) > MAX_JSON_BYTES:
        raise ConversionError(f"{what} is {len(data) / 2**20:.0f} MiB of JSON, more than a model config needs (limit 64 MiB)")
    try:
        return json.loads(data)
    except RecursionError:
        raise ConversionError(f"{what} is JSON nested too deep to be a model config") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{what} is not JSON ({error})") from None


@contextlib.contextmanager
def parsed_by(path, what: str, *packages: str):
    """Within this block, an error raised inside one of ``packages`` (the third-party parser
    reading ``path``: torch's unpickler, h5py, zipfile) is the file's fault and becomes a
    ``ConversionError`` naming it; an error raised in our own code stays what it is (a bug)."""
    try:
        yield
    except ConversionError:
        raise
    except Exception as error:
        frames = traceback.extract_tb(error.__traceback__)
        last = frames[-1].filename.replace("\\", "/") if frames else ""
        # Compiled parts of a package name their frames relative to it ("h5py/h5o.pyx").
        inside = lambda package: f"/{package}/" in last or last.startswith(f"{package}/") or last.endswith(f"/{package}.py")  # noqa: E731
        if any(inside(package) for package in packages):
            text = str(error).strip().splitlines()
            raise ConversionError(
                f"{path}: truncated or corrupt {what} ({type(error).__name__}: {text[0] if text else 'no details'})"
            ) from None
        raise


def zip_names(path) -> list[str] | None:
    """The member names of a zip archive, or None where its directory cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, NotImplementedError, ValueError, EOFError):
        return None


# A zip member that inflates to more than this, and to more than RATIO times its compressed
# size, is refused before it is read: weights barely compress, a zip bomb compresses ~1000x.
MAX_INFLATED_BYTES, MAX_INFLATION_RATIO = 64 * 2**20, 100


def check_zip_members(path, what: str) -> None:
    """Every member's declared size checked against its compressed size before anything is
    read (members are read into memory, never extracted)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, NotImplementedError, ValueError, EOFError) as error:
        raise ConversionError(f"{path}: truncated or corrupt {what} ({error})") from None
    for info in infos:
        if info.file_size > MAX_INFLATED_BYTES and info.file_size > MAX_INFLATION_RATIO * max(info.compress_size, 1):
            raise ConversionError(
                f"{path}: member {info.filename} would inflate from {_bytes(info.compress_size)} to "
                f"{_bytes(info.file_size)}: refused as a zip bomb"
            )


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ConversionError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors file (its header is not a JSON object)")
    for name, info in header.items():
        if name != "__metadata__":
            _check_entry(path, name, info)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise ConversionError(
            f"{path}: truncated safetensors file: its header promises {8 + length + end} bytes, the file has {size}"
        )
    return header


def _check_entry(path, name, info) -> None:
    """A tensor's header entry, checked before any of its data is read: its declared shape
    must need exactly the bytes its offsets give it."""
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    shape = info.get("shape") if isinstance(info, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ConversionError(f"{path}: corrupt safetensors file (tensor {name}: data_offsets {offsets!r} are not two ordered byte offsets)")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ConversionError(f"{path}: corrupt safetensors file (tensor {name}: shape {shape!r} is not a list of sizes)")
    size = _SAFETENSORS_SIZES.get(info.get("dtype"))
    if size is None:
        raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    declared = int(np.prod(shape, dtype=object)) * size
    if declared != offsets[1] - offsets[0]:
        raise ConversionError(
            f"{path}: tensor {name} declares shape {shape} ({_bytes(declared)}) but holds {_bytes(offsets[1] - offsets[0])}"
        )


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


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
