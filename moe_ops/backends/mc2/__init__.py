"""The ``mc2`` backends: expert parallelism on Ascend NPUs through torch_npu's fused MC2 ops.
:mod:`.backend` is the transport, :mod:`.wire` the rows it sends and the layout rebuilt from what
arrives, :mod:`.limits` the documented limits of the MC2 ops per SoC."""

from moe_ops.backends.mc2.backend import Mc2Backend, Mc2Int8Backend

__all__ = ["Mc2Backend", "Mc2Int8Backend"]
