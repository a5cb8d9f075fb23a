"""DeepEP (and UCCL-EP, which installs the same ``deep_ep`` API) as moe_ops transports, on DeepEP's V1
``deep_ep.Buffer`` API:

* ``deepep`` (:mod:`.normal`): normal-mode kernels, both layouts, intranode groups of 2, 4 or 8 ranks;
* ``deepep_ll`` (:mod:`.low_latency`): low-latency kernels, padded layout (decode), any group DeepEP takes.

Each group has one ``deep_ep.Buffer``, made on its first call; :func:`reserve` makes it up front for both
modes (a buffer in low-latency mode cannot grow later), :func:`release` destroys it (both collective).

Importing this package never imports ``deep_ep``: the backends import it on their first call.

Tested against :mod:`moe_ops.testing.sim.deep_ep`, a CPU simulator of DeepEP's documented behaviour over
gloo, **not against DeepEP on GPUs**. The simulator does not model kernel timing, SM use, NVSHMEM / RDMA
/ CUDA IPC, hook-based overlap (receive hooks), async events, internode normal mode, LogFMT, zero-copy
combine, or DeepEP's exact buffer-size formulas (docs/backends.md). Quantized dispatch: DeepEP's FP8 paths
(docs/backends.md, "Quantized dispatch").
"""

from moe_ops.backends.deepep.low_latency import DeepEPLowLatencyBackend
from moe_ops.backends.deepep.normal import DeepEPBackend
from moe_ops.backends.deepep.runtime import release, reserve

__all__ = ["DeepEPBackend", "DeepEPLowLatencyBackend", "release", "reserve"]
