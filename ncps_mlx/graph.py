"""``Graph``: a converted Keras model, its layers wired as a DAG with several inputs and outputs.

``graph(*inputs)`` takes one array per model input, in the Keras model's input order, and
returns the outputs in its output order: a list, or a single array for a single output.

Config (``get_config()``; ``graph_from_config`` rebuilds it):

* ``inputs``: ``[{"name", "shape", "dtype"}]``, ``shape`` without the batch axis, ``None``
  where the model leaves a size free (a fixed time length stays fixed);
* ``layers``: layer configs (``ncps_mlx.layers``), parameters under ``layers.<i>.``;
* ``calls``: in order of evaluation, ``{"layer": i, "inputs": [ref, ...]}``; a layer called
  twice (shared weights) has two calls;
* ``outputs``: ``[{"name", "ref"}]``.

A ref is ``["input", k]`` (the k-th model input) or ``[c, j]`` (tensor j of call c).

Keras masks travel with the tensors (see ``ncps_mlx.layers``): which tensors carry one is
known from the layers alone, so a mask reaching a layer that cannot take one is refused when
the graph is built.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import configs
from .layers import MERGES, RNN, Bidirectional, TimeDistributed, layer_from_config

MASK_USERS = (RNN, Bidirectional)


class Graph(nn.Module):
    def __init__(self, inputs: list, layers: list, calls: list, outputs: list):
        super().__init__()
        self.layers = list(layers)
        self._inputs = [dict(i) for i in inputs]
        self._calls = [dict(c) for c in calls]
        self._outputs = [dict(o) for o in outputs]
        for c, call in enumerate(self._calls):
            for ref in call["inputs"]:
                if ref[0] != "input" and not (0 <= ref[0] < c):
                    raise ValueError(f"call {c} reads {ref}, which is not computed before it")
        self._mask_rules = self._mask_rules_of_calls()

    def _mask_rules_of_calls(self) -> dict:
        """{call: how its output's mask comes about}: "make" (Masking, Embedding(mask_zero)),
        "pass" (the input's, handed on or carried by a sequence), "merge" (its inputs' masks
        combined). A layer that would get a mask it cannot use is an error."""
        rules = {}
        for c, call in enumerate(self._calls):
            layer = self.layers[call["layer"]]
            getting = any(ref[0] in rules for ref in call["inputs"] if ref[0] != "input" and ref[1] == 0)
            if getattr(layer, "makes_mask", False):
                rules[c] = "make"
            elif getting and isinstance(layer, MASK_USERS):
                if (layer.forward if isinstance(layer, Bidirectional) else layer).model.return_sequences:
                    rules[c] = "pass"
            elif getting and isinstance(layer, MERGES):
                rules[c] = "merge"
            elif getting and layer.passes_mask:
                rules[c] = "pass"
            elif getting:
                raise ValueError(
                    f"layer {call['layer']} ({type(layer).__name__}) would receive a Keras mask (from Masking or "
                    "Embedding(mask_zero=True)); only RNNs, merges and elementwise/last-axis layers take one here"
                )
        return rules

    @property
    def input_specs(self) -> list:
        return [dict(i) for i in self._inputs]

    @property
    def output_names(self) -> list:
        return [o["name"] for o in self._outputs]

    @property
    def rnn_layers(self) -> list:
        """The RNN layers, Bidirectional halves and TimeDistributed contents included."""
        found = []
        for layer in self.layers:
            while isinstance(layer, TimeDistributed):
                layer = layer.layer
            if isinstance(layer, Bidirectional):
                found += [layer.forward, layer.backward]
            elif isinstance(layer, RNN):
                found.append(layer)
        return found

    def __call__(self, *inputs):
        if len(inputs) != len(self._inputs):
            names = ", ".join(i["name"] for i in self._inputs)
            raise ValueError(f"this graph takes {len(self._inputs)} input(s) ({names}), got {len(inputs)}")
        values, masks = {}, {}
        for k, x in enumerate(inputs):
            values[("input", k)] = x if isinstance(x, mx.array) else mx.array(x)
        for c, call in enumerate(self._calls):
            layer = self.layers[call["layer"]]
            args = [values[tuple(ref)] for ref in call["inputs"]]
            got = [masks[tuple(ref)] for ref in call["inputs"] if tuple(ref) in masks]
            if isinstance(layer, MERGES):
                result = layer(args)
            elif isinstance(layer, MASK_USERS):
                result = layer(*args, mask=got[0] if got else None)
            else:
                result = layer(*args)
            rule = self._mask_rules.get(c)
            if rule == "make":
                masks[(c, 0)] = layer.make_mask(args[0])
            elif rule == "pass":
                masks[(c, 0)] = got[0]
            elif rule == "merge":
                mask = got[0]
                for other in got[1:]:
                    mask = mx.logical_and(mask, other)
                masks[(c, 0)] = mask
            for j, value in enumerate(result if isinstance(result, (tuple, list)) else (result,)):
                values[(c, j)] = value
        results = [values[tuple(o["ref"])] for o in self._outputs]
        return results[0] if len(results) == 1 else results

    def get_config(self) -> dict:
        return {
            "class": "Graph",
            "inputs": self.input_specs,
            "layers": [layer.get_config() for layer in self.layers],
            "calls": [dict(c) for c in self._calls],
            "outputs": [dict(o) for o in self._outputs],
        }


@configs.register("Graph", "Stack")  # "Stack": a chain, as ncps-mlx 0.1 wrote it
def graph_from_config(config: dict) -> Graph:
    config = dict(config)
    if config.get("class") == "Stack":
        config = _chain_of(config)
    return Graph(config["inputs"], [layer_from_config(spec) for spec in config["layers"]], config["calls"], config["outputs"])


def _chain_of(stack: dict) -> dict:
    """A version-1 model file's ``Stack`` (layers in a chain, ``(output, *states)`` from a last
    RNN with return_state) as the same Graph."""
    layers = stack["layers"]
    calls = [{"layer": i, "inputs": [["input", 0] if i == 0 else [i - 1, 0]]} for i in range(len(layers))]
    last = layers[-1]
    count = 1
    if last.get("type") == "RNN" and last.get("return_state"):
        count = 3 if last["model"].get("mixed_memory") else 2
    names = ["output"] + [f"state_{i}" for i in range(count - 1)]
    outputs = [{"name": name, "ref": [len(layers) - 1, j]} for j, name in enumerate(names)]
    return {"class": "Graph", "inputs": [{"name": "input", "shape": [None, None], "dtype": "float32"}], "layers": layers,
            "calls": calls, "outputs": outputs}
