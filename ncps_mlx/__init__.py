"""ncps-mlx: Neural Circuit Policies (LTC, CfC, CTRNN, CTGRU) for Apple MLX.

    from ncps_mlx import CfC, LTC, CTRNN, CTGRU, wirings
    model = CfC(20, wirings.AutoNCP(32, 4))
    y, h = model(x)            # x: (batch, time, 20) -> y: (batch, time, 4), h: (batch, 32)
"""

import logging

from . import wirings
from .cells import CfCCell, CTGRUCell, CTRNNCell, LSTMCell, LTCCell, WiredCfCCell
from .models import CTGRU, CTRNN, LTC, CfC, model_from_config
from .sequence import SequenceModel
from .graph import Graph
from .version import __version__

# The model file, ONNX export and weight loading live with the readers (ncps_mlx.converters).
from .converters.modelfile import ModelFileError, load, load_modules, save, save_modules
from .converters.onnx_export import export_onnx
from .converters.port import load_weights

# Status goes to this logger; a library adds no handler of its own beyond the null one.
logging.getLogger("ncps_mlx").addHandler(logging.NullHandler())


__all__ = [
    "CfC",
    "LTC",
    "CTRNN",
    "CTGRU",
    "CfCCell",
    "WiredCfCCell",
    "LTCCell",
    "CTRNNCell",
    "CTGRUCell",
    "LSTMCell",
    "SequenceModel",
    "model_from_config",
    "save",
    "load",
    "load_modules",
    "save_modules",
    "load_weights",
    "ModelFileError",
    "export_onnx",
    "Graph",
    "wirings",
    "__version__",
]
