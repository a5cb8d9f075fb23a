"""moe_ops: torch.compile-native MoE token dispatch and combine under expert parallelism.

Importing this package registers ``torch.ops.moe.dispatch``, ``torch.ops.moe.combine`` and their
backward ops. See docs/contract.md for the layouts and docs/architecture.md for the modules.
"""

from moe_ops import config, ops
from moe_ops.api import Dispatcher, DispatchResult, QuantizedDispatchResult, combine, dispatch
from moe_ops.errors import MoECommunicationError, MoEInputError

__all__ = ["DispatchResult", "Dispatcher", "MoECommunicationError", "MoEInputError", "QuantizedDispatchResult", "combine", "config",
           "dispatch", "ops"]
__version__ = "0.1.0"
