"""Reader for our own ``.safetensors`` model files (``ncps_mlx.save``): re-export or verify one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ncps_mlx import modelfile

from . import formats
from .description import ConversionError, Description, sha256_of

NAME = "ncps_mlx"
SUFFIXES = (".safetensors",)


def sniff(path: Path) -> bool:
    if formats.kind_of(path) != "safetensors":
        return False
    metadata = formats.safetensors_header(path).get("__metadata__", {}) or {}
    return metadata.get("format") == modelfile.FORMAT


def read(path, config: dict | None = None, trust_pickle: bool = False) -> Description:
    if config:
        raise ConversionError(f"{path} is an ncps-mlx model file and describes itself; --config does not apply")
    try:
        metadata = modelfile.read_metadata(path)
        model = modelfile.load(path)
    except modelfile.ModelFileError as error:
        raise ConversionError(str(error)) from None
    arrays = {k: np.array(v) for k, v in formats.read_safetensors(Path(path)).items()}
    source = {"reader": NAME, "framework": "ncps_mlx", "format": "ncps-mlx model file", "file": str(path), "sha256": sha256_of(path)}
    origin = metadata.get("source") or {}
    notes = [f"converted earlier from {origin.get('framework')} file {origin.get('file')}"] if origin else []
    del model  # loading it checked that the tensors match the config
    return Description(config=metadata["config"], arrays=arrays, source=source, given=metadata["config"], notes=notes)


def run_source(description: Description):
    from .verify import mlx_runner

    return mlx_runner(description.build())
