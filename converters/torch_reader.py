"""Reader for ``ncps.torch`` checkpoints: state dicts (.pt/.pth, or .safetensors) in the
containers people save them in, and whole pickled modules (``torch.save(model)``) only with an
explicit opt-in.

Containers: a bare state dict; a dict with it under ``state_dict`` (Lightning ``.ckpt``, with
``hyper_parameters`` beside it), ``model_state_dict``, ``model`` or ``net`` (training dicts, with
optimizer states and epochs beside it). ``module.`` (DataParallel) and ``_orig_mod.``
(``torch.compile``) prefixes are stripped. Every ncps module is found by its key pattern
(``<prefix>rnn_cell.ff1.weight``, ``<prefix>rnn_cell.layer_0.ff1.weight``, ``<prefix>rnn_cell.gleak``)
whatever its prefix, and becomes one module named after the prefix (``seq_model`` for
``seq_model.rnn_cell...``, ``""`` for a bare layer); every other tensor is kept as it is.

Our parameter names mirror ``ncps.torch``'s state-dict keys and torch's ``nn.Linear`` layout
(out, in) is MLX's, so arrays carry over unchanged, with one renaming: torch's CfC backbone is
an ``nn.Sequential`` that numbers activations and dropouts too (``backbone.0``, ``backbone.2``,
...), ours is a list of Linear layers (``backbone.0``, ``backbone.1``, ...).

What the keys and shapes tell (family, sizes, backbone, pure mode, projection, mixed memory,
wiring masks, LTC mappings) is inferred; the rest (activations, the mode where no key shows
it, the ODE unfolds, timing options) comes from the user's config or the reference defaults.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import numpy as np

from ncps_mlx import wirings
from ncps_mlx.lowering import BACKBONE_ACTIVATIONS

from . import formats
from .verify import SourceUnavailable, named_results
from .description import (
    Checkpoint,
    ConversionError,
    Description,
    reference_wiring,
    check_wiring_against_masks,
    layered_wiring,
    resolve_config,
    sha256_of,
)

NAME = "torch"
SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")

_BACKBONE = re.compile(r"^(.*\bbackbone)\.(\d+)\.(weight|bias)$")
# A key that marks an ncps.torch CfC or LTC module: the group before it is the module's name.
_MODULE_MARK = re.compile(r"^(.*?)rnn_cell\.(?:ff1\.weight|layer_0\.ff1\.weight|gleak)$")
# The submodules of an ncps.torch CfC / LTC: its cell, the mixed-memory LSTM, the projection.
_MODULE_PART = re.compile(r"^(?:rnn_cell|lstm|fc)\.")
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_LAYER = re.compile(r"^rnn_cell\.layer_(\d+)\.")

PICKLE_REFUSED = (
    "{path} holds a pickled Python object (torch.save(model)), not a state dict. Unpickling it would "
    "run code from the file, so it is refused by default. If you trust the file, pass --trust-pickle "
    "(reads the constructor arguments from the module), or re-save it with "
    "torch.save(model.state_dict(), ...)."
)


def sniff(path: Path) -> bool:
    """True for a torch zip or legacy-pickle checkpoint, or a safetensors state dict of ncps keys."""
    kind = formats.kind_of(path)
    if kind == "zip":  # torch.save's zip: <archive>/data.pkl and the tensors' storages
        names = formats.zip_names(path)
        return Path(path).suffix in SUFFIXES if names is None else any(name.endswith("data.pkl") for name in names)
    if kind == "pickle":
        return True
    if kind == "safetensors":
        header = formats.safetensors_header(path)
        metadata = header.get("__metadata__", {}) or {}
        return metadata.get("format") != "ncps_mlx" and any(_MODULE_MARK.match(k) for k in header)
    return False


def rename_torch_keys(state_dict: dict) -> dict[str, np.ndarray]:
    """Map an ``ncps.torch`` state dict (arrays or tensors) to ncps_mlx parameter names."""
    positions: dict[str, set[int]] = {}
    for key in state_dict:
        match = _BACKBONE.match(key)
        if match:
            positions.setdefault(match.group(1), set()).add(int(match.group(2)))
    ordinal = {prefix: {p: i for i, p in enumerate(sorted(ps))} for prefix, ps in positions.items()}
    renamed = {}
    for key, value in state_dict.items():
        match = _BACKBONE.match(key)
        if match:
            prefix, position, kind = match.group(1), int(match.group(2)), match.group(3)
            key = f"{prefix}.{ordinal[prefix][position]}.{kind}"
        renamed[key] = _to_numpy(value)
    return renamed


def read(path, config: dict | None = None, trust_pickle: bool = False) -> Checkpoint:
    path = Path(path)
    state_dict, module_config, file_format, notes = _load(path, trust_pickle)
    source = {"reader": NAME, "framework": "torch", "format": file_format, "file": str(path), "sha256": sha256_of(path)}
    groups, other = split_modules(state_dict)
    if not groups:
        sample = ", ".join(sorted(state_dict)[:4])
        raise ConversionError(
            f"{path}: this is not an ncps CfC or LTC checkpoint: no key ends in rnn_cell.ff1.weight / "
            f"rnn_cell.layer_0.ff1.weight (CfC) or rnn_cell.gleak (LTC) (its keys are e.g. {sample})"
        )
    configs = _configs_per_module(config, list(groups), path)
    # Half-precision checkpoints (model.half(), model.bfloat16(), mixed-precision training) are
    # widened to float32, which holds every float16 and bfloat16 value exactly.
    source["stored_dtype"] = ", ".join(sorted({_dtype_name(v) for tensors in groups.values() for v in tensors.values()}))
    modules = {}
    for name, tensors in groups.items():
        for key, value in tensors.items():
            if not (value.dtype.is_floating_point if hasattr(value, "is_floating_point") else np.asarray(value).dtype.kind == "f"):
                raise ConversionError(f"{path}: tensor {_joined(name, key)} is {value.dtype}; an ncps module's weights are floating point")
        given = {**(module_config if name == "" else {}), **configs.get(name, {})}
        where = "the module" if module_config and not configs.get(name) else "the config"
        arrays = rename_torch_keys(tensors)
        try:
            family, inferred, module_notes = infer(arrays, given, where)
            resolved, given_used, defaulted = resolve_config(family, inferred, given, where)
        except ConversionError as error:
            raise ConversionError(f"module {name!r}: {error}" if name else str(error)) from None
        except KeyError as error:  # the key pattern named a module whose other tensors are not there
            raise ConversionError(
                f"{path}: tensor {_joined(name, str(error.args[0]))} is missing; the module's other tensors "
                f"({', '.join(sorted(tensors)[:4])}, ...) need it"
            ) from None
        modules[name] = Description(
            config=resolved,
            arrays=arrays,
            source={**source, "module": name},
            inferred=inferred,
            given=given_used,
            defaulted=defaulted,
            notes=module_notes,
            source_arrays=tensors,
        )
    return Checkpoint(modules=modules, source=source, other={k: _to_numpy(v) for k, v in other.items()}, notes=notes)


def _dtype_name(value) -> str:
    return str(value.dtype).replace("torch.", "")


def _joined(name, key) -> str:
    return f"{name}.{key}" if name else key


def split_modules(state_dict: dict) -> tuple[dict, dict]:
    """({module name: its tensors, keys without the prefix}, {other key: tensor}).

    A key belongs to the module with the longest prefix under which it is one of an ncps
    module's parts (``rnn_cell.``, ``lstm.``, ``fc.``)."""
    found = list(dict.fromkeys(m.group(1) for key in state_dict if (m := _MODULE_MARK.match(key))))
    groups: dict[str, dict] = {prefix[:-1]: {} for prefix in found}  # in the checkpoint's order
    prefixes = sorted(found, key=len, reverse=True)
    other = {}
    for key, value in state_dict.items():
        owner = next((p for p in prefixes if key.startswith(p) and _MODULE_PART.match(key[len(p):])), None)
        if owner is None:
            other[key] = value
        else:
            groups[owner[:-1]][key[len(owner):]] = value
    return groups, other


def _configs_per_module(config, names, path) -> dict:
    """--config as {module name: constructor arguments}. A flat config (constructor arguments)
    applies when the checkpoint has one module."""
    if not config:
        return {}
    if names != [""] and set(config) <= set(names) and all(isinstance(v, dict) for v in config.values()):
        return config
    if len(names) == 1:
        return {names[0]: config}
    unknown = sorted(set(config) - set(names))
    raise ConversionError(
        f"{path} holds {len(names)} ncps modules ({', '.join(repr(n) for n in names)}); give --config as "
        f"{{module name: constructor arguments}} (it names {unknown[:3]}, which are not modules here)"
    )


# --- loading ---------------------------------------------------------------------------------


def _load(path: Path, trust_pickle: bool):
    """(state dict of numpy arrays or tensors, config read from a pickled module, format name,
    notes on the container and the prefixes stripped)."""
    kind = formats.kind_of(path)
    if kind == "safetensors":
        state_dict, notes = strip_wrapper_prefixes(formats.read_safetensors(path))
        return state_dict, {}, "safetensors state dict", notes
    torch = _import_torch(path)
    if kind == "zip":
        formats.check_zip_members(path, "torch checkpoint")
    with formats.parsed_by(path, "torch checkpoint", "torch", "pickle", "zipfile"):
        return _unpickled(path, torch, trust_pickle)


def _unpickled(path, torch, trust_pickle):
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        file_format = "torch state dict"
    except pickle.UnpicklingError as error:
        if "weights_only" not in str(error) and "Unsupported global" not in str(error):
            raise ConversionError(f"{path}: corrupt torch checkpoint ({_first_line(error)})") from None
        if not trust_pickle:
            raise ConversionError(PICKLE_REFUSED.format(path=path)) from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as inner:
            raise ConversionError(f"{path}: could not unpickle ({_first_line(inner)})") from None
        file_format = "pickled torch module"
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as error:
        raise ConversionError(f"{path}: truncated or corrupt torch checkpoint ({_first_line(error)})") from None

    module_config = {}
    if isinstance(obj, torch.nn.Module):
        module_config = config_from_module(obj, path)
        obj = obj.state_dict()
    obj, file_format = _unwrap(obj, file_format)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else type(obj).__name__
        raise ConversionError(
            f"{path}: not a state dict (a mapping of parameter names to tensors), nor one under "
            f"{', '.join(CONTAINER_KEYS)}; found {found}"
        )
    state_dict, notes = strip_wrapper_prefixes(obj)
    return state_dict, module_config, file_format, notes


def _unwrap(obj, file_format):
    """The state dict inside a training checkpoint, and the container's name."""
    if not isinstance(obj, dict) or all(hasattr(v, "shape") for v in obj.values()):
        return obj, file_format
    for key in CONTAINER_KEYS:
        if key in obj and isinstance(obj[key], dict):
            if key == "state_dict" and ("pytorch-lightning_version" in obj or "hyper_parameters" in obj):
                hparams = obj.get("hyper_parameters") or {}
                shown = ", ".join(f"{k}={v!r}" for k, v in list(hparams.items())[:8] if isinstance(v, (int, float, str, bool)))
                return obj[key], "Lightning checkpoint" + (f" (hyper_parameters: {shown})" if shown else "")
            return obj[key], f"training checkpoint (its {key!r} entry)"
    return obj, file_format


def strip_wrapper_prefixes(state_dict: dict) -> tuple[dict, list[str]]:
    """The state dict without the ``module.`` prefix DataParallel adds and the ``_orig_mod.``
    torch.compile adds (wherever a compiled submodule sits); notes say what was stripped."""
    stripped, notes = dict(state_dict), []
    while stripped and all(k.startswith("module.") for k in stripped):
        stripped = {k[len("module."):]: v for k, v in stripped.items()}
        notes.append("stripped the 'module.' prefix (DataParallel / DistributedDataParallel)")
    if any(k.startswith("_orig_mod.") or "._orig_mod." in k for k in stripped):
        renamed = {re.sub(r"(^|\.)_orig_mod\.", r"\1", k): v for k, v in stripped.items()}
        if len(renamed) != len(stripped):
            raise ConversionError("stripping '_orig_mod.' (torch.compile) would give two tensors the same name")
        stripped = renamed
        notes.append("stripped the '_orig_mod.' prefix (torch.compile)")
    return stripped, notes


def _import_torch(path):
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path} is a PyTorch checkpoint; reading it needs PyTorch: pip install 'ncps-mlx[torch]' "
            "(or save the state dict as .safetensors, which needs no torch)"
        ) from None
    return torch


def _first_line(error) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


# --- what the weights tell -------------------------------------------------------------------


def infer(arrays: dict, given: dict, where: str):
    """(family, inferred constructor arguments, notes) from the keys and shapes."""
    if "rnn_cell.gleak" in arrays:
        family = "LTC"
    elif "rnn_cell.ff1.weight" in arrays or "rnn_cell.layer_0.ff1.weight" in arrays:
        family = "CfC"
    else:
        sample = ", ".join(sorted(arrays)[:4])
        raise ConversionError(
            f"this is not an ncps CfC or LTC checkpoint: no rnn_cell.ff1 / rnn_cell.layer_0.ff1 (CfC) or "
            f"rnn_cell.gleak (LTC) among its keys (e.g. {sample})"
        )
    if given.get("class", family) != family:
        raise ConversionError(
            f"{where} describes a {given['class']} but the checkpoint holds a {family} "
            f"({'it has rnn_cell.gleak' if family == 'LTC' else 'it has rnn_cell.ff1'})"
        )
    inferred = {"mixed_memory": any(k.startswith("lstm.") for k in arrays)}
    if "fc.weight" in arrays:
        inferred["proj_size"] = int(arrays["fc.weight"].shape[0])
    elif family == "CfC":
        inferred["proj_size"] = None
    notes = []
    if family == "CfC":
        _infer_cfc(arrays, given, where, inferred, notes)
    else:
        _infer_ltc(arrays, given, where, inferred, notes)
    if inferred["mixed_memory"]:
        _expect_shape(arrays, "lstm.input_map.weight", (None, inferred["input_size"]))
    return family, inferred, notes


def _expect_shape(arrays, key, shape):
    if key not in arrays:
        raise ConversionError(f"missing tensor {key}")
    got = arrays[key].shape
    if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
        raise ConversionError(f"tensor {key} has shape {got}, expected {tuple('*' if s is None else s for s in shape)}")


def _input_columns(weight, key, units) -> int:
    """Input features of a CfC layer that reads [x; h]: its columns beyond the state's."""
    if weight.ndim != 2 or weight.shape[1] <= units:
        raise ConversionError(
            f"tensor {key} has shape {tuple(weight.shape)}: it reads [input; state], so it needs more than "
            f"the {units} state columns the heads imply"
        )
    return int(weight.shape[1]) - units


def _infer_cfc(arrays, given, where, inferred, notes):
    wired = "rnn_cell.layer_0.ff1.weight" in arrays
    pure = any(k.endswith("w_tau") for k in arrays)
    if pure:
        inferred["mode"] = "pure"
    elif given.get("mode") == "pure":
        raise ConversionError(f"{where} says mode='pure' but the weights have ff2/time_a/time_b, so they are not pure")
    if not wired:
        units = int(arrays["rnn_cell.ff1.weight"].shape[0])
        layers = sorted({int(m.group(2)) for k in arrays if (m := _BACKBONE.match(k))})
        if layers:
            first = arrays["rnn_cell.backbone.0.weight"]
            inferred["backbone_layers"] = len(layers)
            inferred["backbone_units"] = int(first.shape[0])
            inferred["input_size"] = _input_columns(first, "rnn_cell.backbone.0.weight", units)
        else:
            inferred["backbone_layers"] = 0
            inferred["input_size"] = _input_columns(arrays["rnn_cell.ff1.weight"], "rnn_cell.ff1.weight", units)
            if "backbone_units" in given:
                inferred["backbone_units"] = given["backbone_units"]
        if isinstance(given.get("units"), dict):
            raise ConversionError(f"{where} gives a wiring for units, but the checkpoint is a fully connected CfC")
        inferred["units"] = units
        return

    layer_ids = sorted({int(m.group(1)) for k in arrays if (m := _LAYER.match(k))})
    if layer_ids != list(range(len(layer_ids))):
        raise ConversionError(f"wired CfC layers are not numbered 0..n-1: found layer_{layer_ids}")
    blocks = []
    for layer_id in layer_ids:
        key = f"rnn_cell.layer_{layer_id}.sparsity_mask"
        if key not in arrays:
            raise ConversionError(f"missing tensor {key}")
        mask = arrays[key]
        size = mask.shape[0]
        blocks.append(mask[:, : mask.shape[1] - size].T)
    input_size = blocks[0].shape[0]
    inferred["input_size"] = int(input_size)
    wiring = _given_wiring(given, where, "CfC", input_size, arrays)
    if wiring is None:
        wiring = layered_wiring(input_size, blocks)
        notes.append(
            "wiring taken from the checkpoint's masks; a CfC checkpoint has no synapse polarities or "
            "motor count, so synapses are recorded as excitatory and the last layer as the motor layer"
        )
    inferred["units"] = wirings.describe(wiring)


def _infer_ltc(arrays, given, where, inferred, notes):
    for key in ("rnn_cell.sensory_w", "rnn_cell.sparsity_mask", "rnn_cell.sensory_sparsity_mask", "rnn_cell.erev"):
        if key not in arrays:
            raise ConversionError(f"missing tensor {key}")
    input_size = int(arrays["rnn_cell.sensory_w"].shape[0])
    if inferred["mixed_memory"]:
        input_size = int(arrays["lstm.input_map.weight"].shape[1])
    inferred["input_size"] = input_size
    for side in ("input", "output"):
        has_w, has_b = f"rnn_cell.{side}_w" in arrays, f"rnn_cell.{side}_b" in arrays
        inferred[f"{side}_mapping"] = "affine" if has_w and has_b else "linear" if has_w else None
        if has_b and not has_w:
            raise ConversionError(f"rnn_cell.{side}_b without rnn_cell.{side}_w: not an ncps LTC mapping")
    motor = None
    if "rnn_cell.output_w" in arrays:
        motor = int(arrays["rnn_cell.output_w"].shape[0])

    wiring = _given_wiring(given, where, "LTC", int(arrays["rnn_cell.sensory_w"].shape[0]), arrays)
    if wiring is not None:
        if motor is not None and wiring.output_dim != motor:
            raise ConversionError(
                f"{where}: its wiring has {wiring.output_dim} motor neurons but the weights map {motor} outputs"
            )
        inferred["units"] = wirings.describe(wiring)
        return
    mask = arrays["rnn_cell.sparsity_mask"]
    units = mask.shape[0]
    if motor is None:
        if not np.all(mask == 1):
            raise ConversionError(
                "the number of motor (output) neurons is not in this checkpoint (output_mapping is None); "
                "give the wiring as 'units' in --config"
            )
        motor = units
        notes.append("output_mapping None and a fully connected mask: all neurons taken as outputs")
    wiring = wirings.Wiring(units)
    wiring.set_input_dim(arrays["rnn_cell.sensory_sparsity_mask"].shape[0])
    wiring.set_output_dim(motor)
    # Polarities come from the reversal potentials, initialised to the adjacency's signs.
    wiring.adjacency_matrix = _polarity(mask, arrays["rnn_cell.erev"])
    wiring.sensory_adjacency_matrix = _polarity(arrays["rnn_cell.sensory_sparsity_mask"], arrays["rnn_cell.sensory_erev"])
    notes.append("wiring taken from the checkpoint's masks, polarities from the sign of erev")
    inferred["units"] = wirings.describe(wiring)


def _polarity(mask, erev):
    return (np.where(erev >= 0, 1, -1) * (mask != 0)).astype(np.int32)


def _given_wiring(given, where, family, input_dim, arrays):
    """The wiring the config gives as 'units', checked against the checkpoint; None if none."""
    units = given.get("units")
    if units is None:
        return None
    if family == "CfC" and not isinstance(units, dict):
        raise ConversionError(f"{where} says units={units!r} (fully connected) but the checkpoint is a wired CfC")
    if isinstance(units, dict):
        try:
            wiring = wirings.wiring_from_description(units)
        except (ValueError, TypeError, KeyError) as error:
            raise ConversionError(f"{where}: invalid wiring {units}: {error}") from None
    else:
        wiring = wirings.FullyConnected(int(units))
    try:
        wiring.build(input_dim)
    except ValueError as error:
        raise ConversionError(f"{where}: {error}") from None
    if wiring.units != _units_in(arrays, family):
        raise ConversionError(
            f"{where} says units={wiring.units} but the weights are for {_units_in(arrays, family)} units"
        )
    check_wiring_against_masks(wiring, family, arrays, where)
    return wiring


def _units_in(arrays, family):
    if family == "LTC":
        return int(arrays["rnn_cell.gleak"].shape[0])
    return int(sum(v.shape[0] for k, v in arrays.items() if re.match(r"^rnn_cell\.layer_\d+\.ff1\.weight$", k)))


# --- pickled modules (opt-in) ----------------------------------------------------------------

_ACTIVATIONS = {activation.torch_module: name for name, activation in BACKBONE_ACTIVATIONS.items()}


def config_from_module(module, path) -> dict:
    """Constructor arguments of an ``ncps.torch`` CfC or LTC module object."""
    name = type(module).__name__
    if name not in ("CfC", "LTC") or not type(module).__module__.startswith("ncps.torch"):
        raise ConversionError(f"{path}: the pickled module is a {type(module).__module__}.{name}, not ncps.torch CfC/LTC")
    config = {
        "class": name,
        "input_size": int(module.input_size),
        "return_sequences": bool(module.return_sequences),
        "batch_first": bool(module.batch_first),
        "mixed_memory": bool(module.use_mixed),
    }
    units = module.wiring_or_units
    config["units"] = _describe_reference_wiring(units) if hasattr(units, "adjacency_matrix") else int(units)
    cell = module.rnn_cell
    if name == "CfC":
        config["proj_size"] = module.proj_size
        first = cell.layer_0 if hasattr(cell, "layer_0") else cell
        config["mode"] = first.mode
        if not hasattr(cell, "layer_0") and cell.backbone is not None:
            kinds = [type(m).__name__ for m in cell.backbone]
            config["activation"] = next(_ACTIVATIONS[k] for k in kinds if k in _ACTIVATIONS)
            config["backbone_units"] = int(cell.backbone[0].out_features)
            config["backbone_layers"] = int(cell.backbone_layers)
            dropouts = [m.p for m in cell.backbone if type(m).__name__ == "Dropout"]
            config["backbone_dropout"] = float(dropouts[0]) if dropouts else 0.0
    else:
        config.update(
            input_mapping=cell._input_mapping,
            output_mapping=cell._output_mapping,
            ode_unfolds=int(cell._ode_unfolds),
            epsilon=float(cell._epsilon),
            implicit_param_constraints=bool(cell._implicit_param_constraints),
        )
    return config


def _describe_reference_wiring(wiring) -> dict:
    """An ``ncps.wirings`` object as our exact wiring description."""
    exact = {
        "units": int(wiring.units),
        "adjacency_matrix": np.asarray(wiring.adjacency_matrix).tolist(),
        "sensory_adjacency_matrix": np.asarray(wiring.sensory_adjacency_matrix).tolist(),
        "input_dim": int(wiring.input_dim),
        "output_dim": int(wiring.output_dim),
        "layers": [[int(n) for n in wiring.get_neurons_of_layer(i)] for i in range(wiring.num_layers)],
    }
    name = type(wiring).__name__
    # NCP.get_config() loses the seed (reference-notes point 8): keep the exact matrices only.
    if name in ("FullyConnected", "Random", "AutoNCP"):
        return {"class": name, **wiring.get_config(), "exact": exact}
    return {"class": "Wiring", "exact": exact}


# --- running the source, for verification ------------------------------------------------


def run_source(description: Description, float64: bool = False):
    """Runs the checkpoint in ncps.torch: the reference module built from the config, the
    original state dict loaded strictly; with ``float64``, a float64 copy of that module on
    float64 inputs (the exact answer verification judges by)."""
    try:
        import torch
        import ncps.torch as ncps_torch
    except ImportError:
        raise SourceUnavailable("verifying a torch checkpoint needs torch and ncps: pip install 'ncps-mlx[torch]'")
    config = dict(description.config)
    for option, default in (("ff_activation", "tanh"), ("memory_circuit", "state"), ("motor_output", False)):
        if config.pop(option, default) != default:
            raise ConversionError(f"{option}={config.get(option)!r} has no ncps.torch equivalent")
    name = config.pop("class")
    if isinstance(config["units"], dict):
        config["units"] = reference_wiring(config["units"])
    if name == "LTC":
        config.pop("proj_size", None)
    module = getattr(ncps_torch, name)(**config)
    # The module's own tensors as the checkpoint has them (torch names), loaded strictly.
    state_dict = {
        k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in description.source_arrays.items()
    }
    module.load_state_dict(state_dict, strict=True)
    module.eval()
    dtype = torch.float64 if float64 else torch.float32
    module.to(dtype)

    def run(inputs):
        to_t = lambda a: None if a is None else torch.from_numpy(np.asarray(a)).to(dtype)  # noqa: E731
        results = []
        for x, hx, ts in inputs:
            hx_t = tuple(to_t(h) for h in hx) if isinstance(hx, tuple) else to_t(hx)
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # the zeros ncps.torch makes itself (initial states) in float64 too
            try:
                with torch.no_grad():
                    out, state = module(to_t(x), hx_t, to_t(ts))
            finally:
                torch.set_default_dtype(default)
            state = tuple(s.numpy() for s in state) if isinstance(state, tuple) else state.numpy()
            results.append(named_results(out.numpy(), state))
        return results

    return run
