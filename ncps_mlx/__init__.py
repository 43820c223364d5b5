"""ncps-mlx: Neural Circuit Policies (LTC, CfC, CTRNN, CTGRU) for Apple MLX.

    from ncps_mlx import CfC, LTC, CTRNN, CTGRU, wirings
    model = CfC(20, wirings.AutoNCP(32, 4))
    y, h = model(x)            # x: (batch, time, 20) -> y: (batch, time, 4), h: (batch, 32)
"""

from . import wirings
from .cells import CfCCell, CTGRUCell, CTRNNCell, LSTMCell, LTCCell, WiredCfCCell
from .modelfile import ModelFileError, load, save
from .models import CTGRU, CTRNN, LTC, CfC, model_from_config
from .onnx_export import export_onnx
from .sequence import SequenceModel

__version__ = "0.1.0"

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
    "ModelFileError",
    "export_onnx",
    "wirings",
    "__version__",
]
