"""Converters of the recurrent layers: ncps.keras / ncps.tf ``CfC`` and ``LTC``, Keras's
``RNN`` around an ncps or keras-ncp 2.x cell (``LTCCell``, ``CfCCell``/``CfcCell``,
``WiredCfCCell``/``WiredCfcCell``, ``MixedMemoryRNN``), and the wrappers ``Bidirectional`` and
``TimeDistributed``.

The flavour differences (README, reference behaviour, points 0-6) are handled here so the
converted model is the same function: CfC heads without tanh (``ff_activation=None``), the
time gate's sign (``time_a`` weight and bias negated, exact), the ``MixedMemoryRNN`` circuit
(``memory_circuit="input"``), kernels transposed to (out, in), wired output sliced to the motor
neurons (``motor_output=True``), LTC parameters used as stored (NonNeg constraints, no
softplus: ``implicit_param_constraints=False``). Keras keeps CfC/LTC sparsity masks out of the
weight files, so wirings are rebuilt from the layer config (point 11): a wiring class with its
seed, or the matrices themselves (ncps 0.0.x and keras-ncp write ``adjacency_matrix`` and
``sensory_adjacency_matrix``). A wired CfC's mask is signed in Keras, and its sign is folded
into the converted kernel.
"""

from __future__ import annotations

from ncps_mlx import wirings

from ..description import ConversionError, cfc_layer_masks, wiring_masks
from .layers import activation_name, constant
from .registry import KerasLayer, class_of, converts

NCPS_LAYERS = ("CfC", "LTC")
# A Keras RNN's cell -> the ncps layer it is; keras-ncp 2.x spells CfC "Cfc".
CELLS = {"LTCCell": "LTC", "CfCCell": "CfC", "CfcCell": "CfC", "WiredCfCCell": "CfC", "WiredCfcCell": "CfC",
         "MixedMemoryRNN": None}
WIRED_CELLS = ("WiredCfCCell", "WiredCfcCell")


def _wiring(config: dict, input_dim: int, where: str):
    """Rebuild a wiring from its serialised config (Keras keeps no masks in its weights)."""
    if "class_name" in config:  # Keras 3: {"class_name": ..., "config": ...}
        class_name, params = config["class_name"], dict(config.get("config", {}))
    elif "class" in config:  # ours (a --config wiring): {"class": ..., **arguments}
        params = dict(config)
        class_name = params.pop("class")
    else:  # tf.keras writes the wiring's get_config() inline
        class_name, params = _guess_wiring_class(config), dict(config)
    if class_name == "NCP" and (params.get("seed") is None or isinstance(params.get("inter_neurons"), list)):
        layer = where.split("'")[1] if "'" in where else "LAYER"
        raise ConversionError(
            f"{where}: the file records an NCP wiring without its seed (ncps.wirings.NCP.get_config loses it) and "
            "Keras stores no masks, so the wiring is not in the file (reference-notes point 11). Give it with "
            f'--config: {{"wirings": {{"{layer}": {{"class": "NCP", "inter_neurons": ..., ..., "seed": ...}}}}}}'
        )
    if class_name == "Wiring" and "exact" not in params:
        params = {"exact": _matrices(params, where)}
    try:
        if class_name == "Wiring" or "exact" in params:
            wiring = wirings.wiring_from_description({"class": class_name, **params})
        else:
            wiring = wirings.wiring_from_config(class_name, params)
        wiring.build(input_dim)
    except (ValueError, TypeError) as error:
        raise ConversionError(f"{where}: cannot rebuild its {class_name} wiring: {error}") from None
    return wiring


def _matrices(params: dict, where: str) -> dict:
    """A wiring written as its matrices (lists, or tf.keras's ``__numpy__`` objects): exact."""
    exact = {"units": params.get("units"), "input_dim": params.get("input_dim"), "output_dim": params.get("output_dim")}
    for key in ("adjacency_matrix", "sensory_adjacency_matrix"):
        value = params.get(key)
        exact[key] = None if value is None else constant(value, where, key).astype("int32").tolist()
    if exact["adjacency_matrix"] is None:
        raise ConversionError(f"{where}: its wiring config has no adjacency_matrix; give the wiring with --config")
    for key in ("units", "input_dim", "output_dim"):
        if exact[key] is not None and not isinstance(exact[key], int):
            raise ConversionError(f"{where}: its wiring's {key} is {exact[key]!r}, not a whole number")
    return exact


def _guess_wiring_class(params: dict) -> str:
    if params.get("adjacency_matrix") is not None:  # ncps 0.0.x and keras-ncp: the matrices themselves
        return "Wiring"
    if "output_size" in params:
        return "AutoNCP"
    if "erev_init_seed" in params:
        return "FullyConnected"
    if "random_seed" in params:
        return "Random"
    return "NCP"



WIRING_KEYS = {
    "units", "output_dim", "erev_init_seed", "self_connections", "sparsity_level", "random_seed", "output_size",
    "seed", "inter_neurons", "command_neurons", "motor_neurons", "sensory_fanout", "inter_fanout",
    "recurrent_command_synapses", "motor_fanin", "adjacency_matrix", "sensory_adjacency_matrix", "input_dim",
}


def _options(kind: str, cfg: dict) -> dict:
    """One shape for both flavours' layer configs. Keras 3 puts the constructor arguments on
    the layer; tf.keras only on its cell (a MixedMemoryRNN around the ODE cell when mixed), and
    an LTC cell's config is its wiring's config merged with the cell's own options."""
    if "units" in cfg:
        return cfg
    keys = ("return_sequences", "return_state", "go_backwards", "stateful", "unroll", "zero_output_for_mask")
    options = {k: cfg[k] for k in keys if k in cfg}
    if cfg.get("time_major"):
        options["time_major"] = True
    cell = cfg.get("cell", {})
    inner = cell.get("config", {})
    options["mixed_memory"] = cell.get("class_name", "").split(">")[-1] == "MixedMemoryRNN"
    if options["mixed_memory"]:
        inner = inner["rnn_cell"].get("config", inner["rnn_cell"])
    if kind == "CfC":
        options["units"] = inner.get("wiring", inner.get("units"))
        for key in ("mode", "activation", "backbone_units", "backbone_layers", "backbone_dropout"):
            if key in inner:
                options[key] = inner[key]
    else:
        options["units"] = {k: v for k, v in inner.items() if k in WIRING_KEYS}
        for key in ("input_mapping", "output_mapping", "ode_unfolds", "epsilon"):
            if key in inner:
                options[key] = inner[key]
    return options


def _ncps_layer(kind, cfg, view, where):
    for option in ("stateful", "unroll", "time_major"):
        if cfg.get(option):
            raise ConversionError(f"{where}: {option}=True is not supported")
    mixed = bool(cfg.get("mixed_memory", False))
    cell_view = view.cell()
    lstm = cell_view.lstm() if mixed else None
    inner = cell_view.inner_cell() if mixed else cell_view
    input_size = int(lstm.get("input_kernel").shape[0]) if mixed else None
    wired = isinstance(cfg["units"], dict)
    if kind == "CfC":
        model, arrays = _cfc(cfg, inner, wired, mixed, input_size, where)
    else:
        model, arrays = _ltc(cfg, inner, wired, mixed, input_size, where)
    if mixed:
        arrays["lstm.input_map.weight"] = lstm.get("input_kernel").T
        arrays["lstm.input_map.bias"] = lstm.get("bias")
        arrays["lstm.recurrent_map.weight"] = lstm.get("recurrent_kernel").T
    spec = {
        "type": "RNN",
        "model": model,
        "return_state": bool(cfg.get("return_state", False)),
        "go_backwards": bool(cfg.get("go_backwards", False)),
        "zero_output_for_mask": bool(cfg.get("zero_output_for_mask", False)),
    }
    return spec, {f"model.{k}": v for k, v in arrays.items()}


def _common(cfg, mixed):
    return {
        "return_sequences": bool(cfg.get("return_sequences", False)),
        "batch_first": True,
        "mixed_memory": mixed,
        "memory_circuit": "input",
    }


def _cfc(cfg, cell, wired, mixed, input_size, where):
    mode = cfg.get("mode", "default")
    if wired:
        layer_views = cell.wired_layers()
        if not layer_views:
            raise ConversionError(f"{where}: a wired CfC without the weights of its wired cell's layers (ff1_weight, ...)")
        first_kernel = layer_views[0].get("ff1_kernel")
        cell_inputs = int(first_kernel.shape[0]) - int(first_kernel.shape[1])
        wiring = _wiring(cfg["units"], cell_inputs, where)
        input_size = input_size if mixed else cell_inputs
        model = {
            "class": "CfC",
            "input_size": input_size,
            "units": wirings.describe(wiring),
            "mode": mode,
            "ff_activation": None,
            "motor_output": True,
            **_common(cfg, mixed),
        }
        if cfg.get("fully_recurrent", True) is False:
            raise ConversionError(f"{where}: fully_recurrent=False wired CfCs are not supported")
        arrays = {}
        masks = wiring_masks(wiring, "CfC")
        signed = cfc_layer_masks(wiring)
        if len(layer_views) != wiring.num_layers:
            raise ConversionError(f"{where}: {len(layer_views)} CfC layers in the weights, {wiring.num_layers} in its wiring")
        for index, layer in enumerate(layer_views):
            prefix = f"rnn_cell.layer_{index}."
            arrays.update(_cfc_cell_arrays(layer, mode, prefix, signed_mask=signed[index]))
            arrays[prefix + "sparsity_mask"] = masks[f"rnn_cell.layer_{index}.sparsity_mask"]
        return model, arrays

    units = int(cfg["units"])
    ff1 = cell.get("ff1_kernel")
    backbone = cell.backbone()
    if backbone:
        cell_inputs = int(backbone[0].get("kernel").shape[0]) - units
    else:
        cell_inputs = int(ff1.shape[0]) - units
    model = {
        "class": "CfC",
        "input_size": input_size if mixed else cell_inputs,
        "units": units,
        "mode": mode,
        "activation": activation_name(cfg.get("activation", "lecun_tanh")),
        "backbone_units": int(backbone[0].get("kernel").shape[1]) if backbone else 0,
        "backbone_layers": len(backbone),
        "backbone_dropout": float(cfg.get("backbone_dropout") or 0.0),
        "ff_activation": None,
        **_common(cfg, mixed),
    }
    arrays = _cfc_cell_arrays(cell, mode, "rnn_cell.")
    for index, dense in enumerate(backbone):
        arrays[f"rnn_cell.backbone.{index}.weight"] = dense.get("kernel").T
        arrays[f"rnn_cell.backbone.{index}.bias"] = dense.get("bias")
    return model, arrays


def _cfc_cell_arrays(cell, mode, prefix, signed_mask=None):
    arrays = {}
    heads = ["ff1"] if mode == "pure" else ["ff1", "ff2"]
    for head in heads:
        kernel = cell.get(f"{head}_kernel")
        if signed_mask is not None:
            # Keras: kernel * signed mask. Ours: weight * |mask|. Folding the sign into the
            # weight gives the same product wherever the mask is nonzero.
            kernel = kernel * signed_mask
        arrays[prefix + f"{head}.weight"] = kernel.T
        arrays[prefix + f"{head}.bias"] = cell.get(f"{head}_bias")
    if mode == "pure":
        arrays[prefix + "w_tau"] = cell.get("w_tau")
        arrays[prefix + "A"] = cell.get("A")
    else:
        # Keras gates with sigmoid(-t_a * t + t_b); ours with sigmoid(t_a * t + t_b): negate
        # time_a's kernel and bias (negation is exact).
        arrays[prefix + "time_a.weight"] = -cell.dense("time_a").get("kernel").T
        arrays[prefix + "time_a.bias"] = -cell.dense("time_a").get("bias")
        arrays[prefix + "time_b.weight"] = cell.dense("time_b").get("kernel").T
        arrays[prefix + "time_b.bias"] = cell.dense("time_b").get("bias")
    return arrays


LTC_NAMES = ["gleak", "vleak", "cm", "sigma", "mu", "w", "erev", "sensory_sigma", "sensory_mu", "sensory_w", "sensory_erev"]


def _ltc(cfg, cell, wired, mixed, input_size, where):
    input_mapping = cfg.get("input_mapping", "affine")
    output_mapping = cfg.get("output_mapping", "affine")
    names = list(LTC_NAMES)
    if input_mapping in ("affine", "linear"):
        names.append("input_w")
    if input_mapping == "affine":
        names.append("input_b")
    if output_mapping in ("affine", "linear"):
        names.append("output_w")
    if output_mapping == "affine":
        names.append("output_b")
    values = cell.ltc(names)
    cell_inputs = int(values["sensory_w"].shape[0])
    units_config = cfg["units"]
    if isinstance(units_config, dict):
        wiring = _wiring(units_config, cell_inputs, where)
    else:
        wiring = wirings.FullyConnected(int(units_config))
        wiring.build(cell_inputs)
    model = {
        "class": "LTC",
        "input_size": input_size if mixed else cell_inputs,
        "units": wirings.describe(wiring),
        "input_mapping": input_mapping,
        "output_mapping": output_mapping,
        "ode_unfolds": int(cfg.get("ode_unfolds", 6)),
        "epsilon": float(cfg.get("epsilon", 1e-8)),
        "implicit_param_constraints": False,
        **_common(cfg, mixed),
    }
    arrays = {f"rnn_cell.{name}": value for name, value in values.items()}
    arrays.update(wiring_masks(wiring, "LTC"))
    return model, arrays


def ncps_kind(entry: dict):
    """"CfC" or "LTC" for an entry that is one (also as Keras's RNN around an ncps or keras-ncp
    cell), else None."""
    kind = str(entry.get("class_name", "")).rpartition(">")[2]
    if kind in NCPS_LAYERS:
        return kind
    if kind != "RNN":
        return None
    cell = entry.get("config", {}).get("cell")
    where = f"layer {entry.get('config', {}).get('name')!r} (RNN)"
    cell_kind = class_of(cell, f"{where}'s cell", allowed=CELLS)
    if cell_kind == "MixedMemoryRNN":
        inner = (cell.get("config") or {}).get("rnn_cell")
        cell_kind = class_of(inner, f"{where}'s MixedMemoryRNN cell", allowed=[k for k in CELLS if k != "MixedMemoryRNN"])
    if cell_kind in ("CfCCell", "CfcCell") and "units" not in (cell.get("config") or {}):
        raise ConversionError(f"{where}: its {cell_kind} config records no units; describe the layer as a CfC in --config")
    return CELLS[cell_kind]


@converts("CfC", "LTC", "RNN")
def ncps_layer(layer: KerasLayer):
    kind = ncps_kind({"class_name": layer.kind, "config": layer.config})
    cfg = _options(kind, layer.config)
    if layer.options.get("wiring") is not None:
        cfg = {**cfg, "units": layer.options["wiring"]}
    return _ncps_layer(kind, cfg, layer.weights, layer.where)


@converts("Bidirectional")
def bidirectional(layer: KerasLayer):
    cfg, where = layer.config, layer.where
    inner = cfg["layer"]
    kind = class_of(inner, f"{where}'s layer", allowed=NCPS_LAYERS)
    merge_mode = cfg.get("merge_mode", "concat")
    if merge_mode not in ("concat", "sum", "mul", "ave"):
        raise ConversionError(f"{where}: merge_mode={merge_mode!r} is not supported; use concat, sum, mul or ave")
    backward_cfg = cfg.get("backward_layer") or inner
    halves = {}
    for half, entry in (("forward", inner), ("backward", backward_cfg)):
        options = {**_options(kind, entry["config"]), "go_backwards": False}
        spec, arrays = _ncps_layer(kind, options, layer.weights.half(half), f"{where} ({half})")
        halves[half] = (spec["model"], {f"{half}.{k}": v for k, v in arrays.items()})
    options = _options(kind, inner["config"])
    spec = {
        "type": "Bidirectional",
        "forward": halves["forward"][0],
        "backward": halves["backward"][0],
        "merge_mode": merge_mode,
        "return_state": bool(options.get("return_state", False)),
        "zero_output_for_mask": bool(options.get("zero_output_for_mask", False)),
    }
    return spec, {**halves["forward"][1], **halves["backward"][1]}


@converts("TimeDistributed")
def time_distributed(layer: KerasLayer):
    from .registry import CONVERTERS

    inner = layer.config["layer"]
    allowed = [k for k in CONVERTERS if k not in ("CfC", "LTC", "RNN", "Bidirectional", "TimeDistributed")]
    kind = class_of(inner, f"{layer.where}'s inner layer", allowed=allowed)
    spec, arrays = CONVERTERS[kind](layer.nested(kind, inner.get("config", {}), layer.weights.inner(), layer.where))
    if kind == "Dense":  # a Dense maps the last axis already
        return spec, arrays
    return {"type": "TimeDistributed", "layer": spec}, {f"layer.{k}": v for k, v in arrays.items()}


def source_layer(entry: dict, spec: dict) -> dict:
    """What the verification worker needs to rebuild a layer with the reference classes (an RNN
    around an ncps or keras-ncp cell is rebuilt as today's ncps layer that computes it)."""
    kind = ncps_kind(entry) or str(entry["class_name"]).rpartition(">")[2]
    name = entry.get("name") or entry.get("config", {}).get("name")
    if kind in NCPS_LAYERS:
        options = _options(kind, entry["config"])
        options = {k: v for k, v in options.items() if k not in ("cell", "name", "trainable", "dtype", "time_major", "wiring")}
        options["units"] = spec["model"]["units"] if isinstance(options.get("units"), dict) else options.get("units")
        options["activation"] = activation_name(options.get("activation", "lecun_tanh"))
        for key in ("sparsity_mask", "stateful", "unroll", "fully_recurrent"):
            options.pop(key, None)
        return {"class_name": kind, "config": options, "name": name}
    return {"class_name": kind, "config": entry["config"], "name": name}
