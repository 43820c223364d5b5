"""The formats: every reader (``*_reader.py``, ``keras/``) and writer (``modelfile``, the model
file; ``onnx_export``; ``port``, weights into a model), the verification and ``ncps-convert``.
Installed as ``ncps_mlx.converters``.

The source lives in the repository's top-level ``converters/`` folder; ``pyproject.toml``
maps it into the ``ncps_mlx`` package, so import it as ``import ncps_mlx.converters``.
``ncps_mlx.save``, ``load``, ``load_modules``, ``save_modules``, ``load_weights`` and
``export_onnx`` are imported from here by ``ncps_mlx``.
"""
