"""Reader for our own ``.safetensors`` model files (``ncps_mlx.save``): re-export or verify one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import modelfile

from . import formats
from .description import Checkpoint, ConversionError, Description, sha256_of

NAME = "ncps_mlx"
SUFFIXES = (".safetensors",)


def sniff(path: Path) -> bool:
    if formats.kind_of(path) != "safetensors":
        return False
    metadata = formats.safetensors_header(path).get("__metadata__", {}) or {}
    return metadata.get("format") == modelfile.FORMAT


def read(path, config: dict | None = None, trust_pickle: bool = False) -> Checkpoint:
    if config:
        raise ConversionError(f"{path} is an ncps-mlx model file and describes itself; --config does not apply")
    try:
        metadata = modelfile.read_metadata(path)
        modelfile.load_modules(path)  # checks that the tensors match the configs
    except modelfile.ModelFileError as error:
        raise ConversionError(str(error)) from None
    arrays = {k: np.array(v) for k, v in formats.read_safetensors(Path(path)).items()}
    source = {"reader": NAME, "framework": "ncps_mlx", "format": "ncps-mlx model file", "file": str(path), "sha256": sha256_of(path)}
    origin = metadata.get("source") or {}
    notes = [f"converted earlier from {origin.get('framework')} file {origin.get('file')}"] if origin else []
    others = set(metadata["other_tensors"])
    names = list(metadata["modules"])
    modules = {}
    for name, module_config in metadata["modules"].items():
        start = len(name) + 1 if name else 0
        own = {k[start:]: v for k, v in arrays.items() if k not in others and modelfile.owner_of(k, names) == name}
        modules[name] = Description(
            config=module_config, arrays=own, source={**source, "module": name}, given=module_config, notes=notes
        )
    return Checkpoint(modules=modules, source=source, other={k: arrays[k] for k in others}, notes=notes)


def run_source(description: Description, float64: bool = False):
    from .verify import SourceUnavailable, mlx_runner

    if float64:
        raise SourceUnavailable("an ncps-mlx model file has no float64 reference run")

    return mlx_runner(description.build())
