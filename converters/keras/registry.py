"""One converter per Keras layer kind, registered by name (as onnx2torch registers one per op).

A converter takes a ``KerasLayer`` (its kind, config, weight view and where it is, for errors)
and returns ``(spec, arrays)``: an ``ncps_mlx.layers`` spec and its arrays in that layer's names.
A kind nobody registered is refused by name; classes from outside Keras and the ncps packages
are refused without being imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..description import ConversionError

CONVERTERS: dict = {}
REFUSED = {
    "Lambda": "a Lambda layer is Python code; it is never deserialised or run. Rebuild the model with a supported layer in its place",
}
# Packages whose registered names we read (never import): Keras's own, ncps (ncps.tf,
# ncps.keras) and keras-ncp 2.x, whose cells register as "Custom>LTCCell" from module kerasncp.
KNOWN_MODULES = ("keras", "ncps", "kerasncp")
KERAS_NCP_CLASSES = ("LTCCell", "CfcCell", "WiredCfcCell", "MixedMemoryRNN")


@dataclass
class KerasLayer:
    kind: str  # the Keras class name, without a "package>" prefix
    config: dict
    weights: object  # a view from .weights
    where: str  # "layer 'name' (Kind)", for messages
    options: dict = field(default_factory=dict)  # from --config: {"wiring": ...}

    def nested(self, kind, config, weights, where):
        return KerasLayer(kind, config, weights, where, self.options)


def converts(*kinds):
    """Register the decorated function as the converter of these Keras layer kinds."""

    def register(function):
        for kind in kinds:
            CONVERTERS[kind] = function
        return function

    return register


def supported(kinds=None) -> list[str]:
    """The kinds, the recurrent ones first (what users look for)."""
    return sorted(CONVERTERS if kinds is None else kinds, key=lambda kind: (kind not in ("CfC", "LTC", "RNN"), kind))


def class_of(entry: dict, where: str, allowed=None) -> str:
    """The Keras class of a config entry; refused by name when it is not one we convert.
    ``allowed``: the kinds accepted here (default: every registered layer converter)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("class_name"), str):
        raise ConversionError(f"{where}: not a Keras layer entry ({str(entry)[:80]})")
    package, _, kind = entry["class_name"].rpartition(">")  # registered classes: "package>Class"
    module = entry.get("module")
    keras_ncp = kind in KERAS_NCP_CLASSES
    custom = (
        (module is not None and not str(module).startswith(KNOWN_MODULES))
        or (str(module).startswith("kerasncp") and not keras_ncp)
        or (package not in ("", "ncps", "keras") and not (package == "Custom" and keras_ncp))
    )
    allowed = CONVERTERS if allowed is None else allowed
    if kind in REFUSED:
        raise ConversionError(f"{where}: {REFUSED[kind]}")
    if custom or kind not in allowed:
        origin = f" from {module or package}" if custom else ""
        what = "layer type" if allowed is CONVERTERS else f"class {kind!r}"
        raise ConversionError(f"{where}: unsupported {what}{origin}; supported: {', '.join(supported(allowed))}")
    return kind


def convert(layer: KerasLayer):
    return CONVERTERS[layer.kind](layer)
