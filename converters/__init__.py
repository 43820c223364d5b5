"""Checkpoint converters, installed as ``ncps_mlx.converters``.

The source lives in the repository's top-level ``converters/`` folder; ``pyproject.toml``
maps it into the ``ncps_mlx`` package, so import it as ``import ncps_mlx.converters``.
"""
