"""One registry of the classes a config names (``{"class": name, ...}``): the models and the
converted graphs register a builder here, and ``build`` rebuilds any of them, so a layer that
holds a model, a graph that holds layers and a model file need not import each other."""

from __future__ import annotations

from typing import Callable

BUILDERS: dict[str, Callable] = {}


def register(*names: str):
    """Register the decorated ``builder(config) -> module`` for configs of these class names."""

    def registered(builder):
        for name in names:
            BUILDERS[name] = builder
        return builder

    return registered


def build(config: dict):
    """Rebuild a model or graph from its ``get_config()``."""
    name = config.get("class") if isinstance(config, dict) else None
    if name not in BUILDERS:
        raise ValueError(f"Unknown model class {name!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[name](dict(config))
