"""ncps-mlx: Neural Circuit Policies (LTC, CfC, CTRNN, CTGRU) for Apple MLX.

    from ncps_mlx import CfC, LTC, CTRNN, CTGRU, wirings
    model = CfC(20, wirings.AutoNCP(32, 4))
    y, h = model(x)            # x: (batch, time, 20) -> y: (batch, time, 4), h: (batch, 32)
"""

from . import cpu_kernels, linux_blas

# Before anything imports mlx.core: give MLX a fast BLAS on Linux, privately (linux_blas).
linux_blas.accelerate()
# Before any kernel is compiled: MLX's fused CPU kernels built for AVX2 where it has it.
cpu_kernels.enable()

from . import native, wirings  # noqa: E402
from .cells import CfCCell, CTGRUCell, CTRNNCell, LSTMCell, LTCCell, WiredCfCCell  # noqa: E402
from .modelfile import ModelFileError, load, load_modules, save, save_modules  # noqa: E402
from .models import CTGRU, CTRNN, LTC, CfC, model_from_config  # noqa: E402
from .onnx_export import export_onnx  # noqa: E402
from .port import load_weights  # noqa: E402
from .sequence import SequenceModel  # noqa: E402
from .graph import Graph  # noqa: E402

blas_status = linux_blas.status
kernel_status = cpu_kernels.status
native_status = native.status

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
    "load_modules",
    "save_modules",
    "load_weights",
    "ModelFileError",
    "export_onnx",
    "Graph",
    "blas_status",
    "kernel_status",
    "native_status",
    "wirings",
    "__version__",
]
