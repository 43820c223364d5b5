"""The saved topology of a Keras model config: its inputs, its layers (in the order their
weights are grouped), each call of a layer and the tensors it reads, and the outputs.

Both flavours' formats: tf.keras ``inbound_nodes`` ([[layer, node, tensor, kwargs], ...]) and
Keras 3's (``{"args": [...], "kwargs": {...}}`` holding ``__keras_tensor__`` objects).
"""

from __future__ import annotations

import re

from ..description import ConversionError


SEQUENTIAL, FUNCTIONAL = ("Sequential",), ("Functional", "Model")


def topology(model_config: dict) -> dict:
    """{"inputs", "layers" (Keras layer entries), "calls", "outputs" (refs or None for a chain)}."""
    kind = model_config.get("class_name") if isinstance(model_config, dict) else None
    config = model_config.get("config", {}) if isinstance(model_config, dict) else {}
    if kind not in SEQUENTIAL + FUNCTIONAL:
        raise ConversionError(f"top-level object is a {kind}, not a Sequential or functional Keras model")
    entries = config.get("layers", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "class_name" in e for e in entries):
        raise ConversionError("the model config's 'layers' is not a list of layer entries")
    layers = _with_weight_groups([e for e in entries if e["class_name"] != "InputLayer"])
    if not layers:
        raise ConversionError("the model has no layers")
    if kind in SEQUENTIAL:
        declared = [e for e in entries if e["class_name"] == "InputLayer"] or layers[:1]
        calls = [{"layer": i, "inputs": [["input", 0] if i == 0 else [i - 1, 0]]} for i in range(len(layers))]
        return {"inputs": [{"name": "input", **_declared_input(declared[0].get("config", {}))}], "layers": layers,
                "calls": calls, "outputs": None}
    names = [entry_name(e) for e in layers]
    mask_sources = {n for n, e in zip(names, layers) if e["class_name"] in ("NotEqual", "Any", "Masking", "Embedding")}
    input_names = [ref[0] for ref in _refs(config.get("input_layers", []))]
    by_name = {entry_name(e): e for e in entries}
    if not input_names or any(n not in by_name for n in input_names):
        raise ConversionError(f"the functional model's input_layers {config.get('input_layers')} do not name its InputLayers")
    inputs = [{"name": n, **_declared_input(by_name[n].get("config", {}))} for n in input_names]
    produced = {(n, 0): ["input", k] for k, n in enumerate(input_names)}
    pending = [(i, k, refs) for i, entry in enumerate(layers) for k, refs in enumerate(_inbound(entry, names[i], mask_sources))]
    calls = []
    while pending:
        ready = [p for p in pending if all((r[0], r[1]) in produced for r in p[2])]
        if not ready:
            missing = sorted({f"{r[0]}[{r[1]}]" for p in pending for r in p[2] if (r[0], r[1]) not in produced})
            raise ConversionError(f"the functional model's layers read tensors no layer makes: {missing[:5]}")
        for item in ready:
            index, node, refs = item
            calls.append({"layer": index, "inputs": [_resolve(produced, r) for r in refs]})
            produced[(names[index], node)] = [len(calls) - 1]
            pending.remove(item)
    outputs = []
    for ref in _refs(config.get("output_layers", [])):
        if (ref[0], ref[1]) not in produced:
            raise ConversionError(f"the functional model's output {ref[0]!r} is not made by any of its layers")
        outputs.append({"name": ref[0] if ref[2] == 0 else f"{ref[0]}_{ref[2]}", "ref": _resolve(produced, ref)})
    return _needed({"inputs": inputs, "layers": layers, "calls": calls, "outputs": outputs})


def _needed(topology) -> dict:
    """The topology without the calls no output depends on (Keras 3 records the ops that
    compute a mask, NotEqual and Any, which the Graph computes itself), layers renumbered."""
    calls, needed = topology["calls"], set()
    stack = [o["ref"][0] for o in topology["outputs"] if o["ref"][0] != "input"]
    while stack:
        c = stack.pop()
        if c not in needed:
            needed.add(c)
            stack += [ref[0] for ref in calls[c]["inputs"] if ref[0] != "input"]
    kept = sorted(needed)
    new_call = {c: i for i, c in enumerate(kept)}
    layer_ids = list(dict.fromkeys(calls[c]["layer"] for c in kept))
    new_layer = {l: i for i, l in enumerate(layer_ids)}

    def moved(ref):
        return ref if ref[0] == "input" else [new_call[ref[0]], ref[1]]

    return {
        "inputs": topology["inputs"],
        "layers": [topology["layers"][l] for l in layer_ids],
        "calls": [{"layer": new_layer[calls[c]["layer"]], "inputs": [moved(r) for r in calls[c]["inputs"]]} for c in kept],
        "outputs": [{**o, "ref": moved(o["ref"])} for o in topology["outputs"]],
    }


def _with_weight_groups(layers: list) -> list:
    """Each entry with the name of its group in a Keras 3 weights file (``_weights_group``):
    Keras numbers the groups per class in the order of all the model's layers, so this is
    counted before any layer is left out."""
    counters: dict[str, int] = {}
    named = []
    for entry in layers:
        snake = _snake(str(entry["class_name"]).rpartition(">")[2])
        counters[snake] = counters.get(snake, -1) + 1
        named.append({**entry, "_weights_group": snake if counters[snake] == 0 else f"{snake}_{counters[snake]}"})
    return named


def entry_name(entry: dict) -> str:
    return entry.get("name") or entry.get("config", {}).get("name")


def _refs(value) -> list:
    """input_layers / output_layers: [[name, node, tensor], ...], or a single [name, node, tensor]."""
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, list) and len(v) >= 3 for v in value):
        raise ConversionError(f"cannot read the functional model's input/output layers {value!r}")
    return [(str(v[0]), int(v[1]), int(v[2])) for v in value]


def _resolve(produced, ref):
    source = produced[(ref[0], ref[1])]
    return source if source[0] == "input" else [source[0], ref[2]]


def _inbound(entry: dict, name: str, mask_sources=frozenset()) -> list:
    """Per call of the layer, the (layer, node, tensor) it reads, in both flavours' formats.
    ``mask_sources``: the layers a Keras 3 ``mask=`` tensor may come from (the Graph
    recomputes that mask)."""
    calls = []
    for node in entry.get("inbound_nodes", []):
        if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}} holding __keras_tensor__s
            refs, keyword_tensors, mask = [], [], []
            _keras_tensors(node.get("args", []), refs)
            kwargs = dict(node.get("kwargs", {}))
            # Keras 3 writes the mask Masking/Embedding(mask_zero) makes as an explicit tensor;
            # the Graph computes the same one itself.
            _keras_tensors(kwargs.pop("mask", None), mask)
            if any(r[0] not in mask_sources for r in mask):
                raise ConversionError(f"layer {name!r} is called with a mask= tensor of its own; only the masks of Masking and Embedding(mask_zero=True) are supported")
            _keras_tensors(kwargs, keyword_tensors)
        else:  # tf.keras: [[layer, node, tensor, kwargs], ...]
            refs = [tuple(item[:3]) for item in node]
            keyword_tensors = [key for item in node if len(item) > 3 for key in item[3] if key != "training"]
        if keyword_tensors:
            raise ConversionError(
                f"layer {name!r} is called with tensors as keyword arguments (initial_state, mask, ...); "
                "only positional inputs are supported"
            )
        calls.append([(str(r[0]), int(r[1]), int(r[2])) for r in refs])
    return calls


def _keras_tensors(value, found) -> None:
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            found.append(tuple(value["config"]["keras_history"]))
            return
        for item in value.values():
            _keras_tensors(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _keras_tensors(item, found)


def _declared_input(config: dict) -> dict:
    """{"shape": [...] without the batch axis, None where free, "dtype"} of an InputLayer."""
    shape = config.get("batch_shape") or config.get("batch_input_shape")
    if isinstance(shape, dict):  # tf.keras SavedModel metadata: {"class_name": "__tuple__", "items": [...]}
        shape = shape.get("items")
    dtype = config.get("dtype", "float32")
    dtype = dtype if isinstance(dtype, str) else "float32"
    return {"shape": list(shape[1:]) if shape else None, "dtype": dtype}


def _output_count(spec: dict) -> int:
    if spec["type"] == "RNN" and spec["return_state"]:
        return 3 if spec["model"]["mixed_memory"] else 2
    if spec["type"] == "Bidirectional" and spec["return_state"]:
        return 1 + 2 * (2 if spec["forward"]["mixed_memory"] else 1)
    return 1


def outputs(topology, specs) -> list:
    """A chain returns all its last layer's tensors: the output, then any states."""
    if topology["outputs"] is not None:
        for output in topology["outputs"]:
            ref = output["ref"]
            if ref[0] != "input" and ref[1] >= _output_count(specs[topology["calls"][ref[0]]["layer"]]):
                raise ConversionError(f"output {output['name']!r} reads a tensor its layer does not make")
        return topology["outputs"]
    count = _output_count(specs[-1])
    names = ["output"] + [f"state_{i}" for i in range(count - 1)]
    return [{"name": name, "ref": [len(specs) - 1, j]} for j, name in enumerate(names)]


def _snake(name: str) -> str:
    # keras.src.utils.naming.to_snake_case: how Keras 3 names layer groups in weight files.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


