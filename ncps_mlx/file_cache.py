"""Small files ncps_mlx writes once per machine and reuses: the BLAS shim (``linux_blas``), the
kernel-compiler script (``cpu_kernels``) and the built CPU kernels (``native``), under
``$XDG_CACHE_HOME/ncps_mlx`` (by default ``~/.cache/ncps_mlx``), one folder per kind."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def folder(kind: str) -> Path:
    """The cache folder of one kind of file."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ncps_mlx" / kind


def cached_file(kind: str, name: str, content: bytes, executable: bool = False):
    """(path, newly written?) of a file ``name`` holding ``content``, in a subfolder of
    ``folder(kind)`` named by the content's hash. Written atomically, so a concurrent process
    sees the old file or the new one, never part of one."""
    path = folder(kind) / hashlib.sha256(name.encode() + b"\0" + content).hexdigest()[:16] / name
    if path.is_file() and path.read_bytes() == content and (not executable or os.access(path, os.X_OK)):
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(content)
    if executable:
        os.chmod(partial, 0o755)
    os.replace(partial, path)
    return path, True
