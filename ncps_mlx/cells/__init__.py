"""Single-step cells. Each splits a step into ``project_input`` (input only, hoisted out of
the time loop) and ``recurrent_step`` (the rest); see ``ncps_mlx.cells.cfc``."""

from .cfc import CfCCell, WiredCfCCell
from .ctgru import CTGRUCell
from .ctrnn import CTRNNCell
from .ltc import LTCCell
from .memory import LSTMCell

__all__ = ["CfCCell", "WiredCfCCell", "LTCCell", "CTRNNCell", "CTGRUCell", "LSTMCell"]
