"""A CPU simulator of the parts of DeepEP's V1 ``deep_ep.Buffer`` API that moe_ops' DeepEP backends
call, for tests: real exchanges between the ranks of a gloo group, real outputs in DeepEP's documented
layouts. ``moe_ops.testing.sim.install("deep_ep")`` puts a fresh module built by :func:`simulator` in
``deep_ep``'s place (through :mod:`moe_ops.libraries`): a fresh simulated process, in which NVSHMEM has
not been initialised yet. It declares CPU a device it simulates; nothing in moe_ops installs it.
One module per mode: :mod:`.normal`, :mod:`.low_latency`; :mod:`.common` holds what they share.

Sources: DeepEP at its last V1-API commit 567632d (2026-02-03) and tag v1.2.1; every rule names the file
and function it comes from. Modelled:

* the buffer: one collective construction per group (every rank must pass the same sizes), the host
  asserts of ``Buffer::Buffer``, NVSHMEM initialised once per process (a second low-latency buffer, even
  after the first was destroyed, is an error), ``explicitly_destroy`` and the collective ``destroy()``,
  size hints that grow with the hidden size and a size check on every call; ``num_qps_per_rank == local
  experts``; low-latency kernels need ``clean_low_latency_buffer`` after normal-mode kernels used the buffer;
* normal mode, intranode (W = 2, 4, 8): the dispatch kernel's TMA limit on the hidden size (SM90
  build); ``get_dispatch_layout``; ``dispatch`` delivering each token once per receiving rank, in
  (source rank, source token) order, with top-k ids made local (-1 for experts elsewhere, weight 0
  there), the per-expert counts as a Python list, and the six-tensor handle (rank and channel prefix
  matrices, ``recv_src_idx``, ``is_token_in_rank``, ``send_head``); ``num_worst_tokens`` (receive
  buffers of that many rows, id -1 and NaN garbage past the count); cached-handle ``dispatch``;
  ``combine`` summing each token's rows over the ranks it went to (float32, and ``topk_weights``
  likewise). Tokens move per channel (``num_sms / 2`` contiguous token ranges): combine finds a rank's
  rows by the receive-side channel offsets and a token's row by ``send_head``, so a handle whose tensors
  are swapped or stale produces an error or wrong sums, as on a GPU;
* low-latency mode: the compiled hidden sizes, ``W * Tmax % 4 == 0`` and the QP-depth bound on ``Tmax``;
  ``low_latency_dispatch`` (BF16) returning ``[L, W * Tmax, H]`` with ``recv_count``, source-rank blocks
  described by ``layout_range`` (start ``<< 32`` | length) and ``src_info``, blocks and rows in a
  shuffled order (DeepEP's come in atomic arrival order), unwritten rows NaN; the received tensor reuses
  one of two buffers, which the next-but-one low-latency kernel overwrites (with NaN first);
  ``low_latency_combine`` reducing on the source rank with the given weights (float32);
* FP8: normal-mode ``dispatch`` of DeepEP's ``(float8_e4m3fn x, float32 scales [T, H/128])`` tuple (scales
  travel with their rows; NaN past the count); low-latency ``use_fp8`` with DeepEP's own cast arithmetic
  (:func:`.low_latency.fp8_cast`), ``round_scale`` / ``use_ue8m0`` and its column-major (packed) scales.

Not modelled: kernel timing and overlap, SM use (``num_sms`` only shapes the channel matrices), the
destructor's own ``destroy()`` at garbage collection (buffers made without ``explicitly_destroy``),
NVSHMEM, RDMA and CUDA IPC themselves, internode normal mode (W > 8), LogFMT, a cached FP8 dispatch,
``expert_alignment`` other than 1, async events, receive hooks (hook-based overlap), zero-copy combine,
and DeepEP's exact size formulas (the hints here are a simple model with the same inputs).
"""

from __future__ import annotations

import os
import types
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops.testing.sim.deep_ep.common import (
    ALIGNMENT,
    EventOverlap,
    Process,
    SimulatedDeepEPError,
    checks,
    gather,
    require,
)
from moe_ops.testing.sim.deep_ep.low_latency import LowLatencyMode
from moe_ops.testing.sim.deep_ep.normal import Config, NormalMode

SIMULATED_DEVICE_TYPES = frozenset({"cpu"})


class Buffer(NormalMode, LowLatencyMode):
    """``deep_ep.Buffer`` (V1), simulated over the gloo ``group``; ``process`` is the simulated process's state."""

    process: ClassVar[Process] = Process()

    def __init__(
        self,
        group: Any,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
    ) -> None:
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode, self.num_qps_per_rank = low_latency_mode, num_qps_per_rank
        self.explicitly_destroy, self.destroyed = explicitly_destroy, False
        world = self.group_size
        nvshmem = low_latency_mode or world > 8  # deep_ep/buffer.py, Buffer.__init__: NVSHMEM for RDMA or low latency
        with checks(group):
            # csrc/deep_ep.cpp, Buffer::Buffer (host asserts)
            require(world < 8 or world % 8 == 0, f"a group of {world} ranks")
            require(num_nvl_bytes % ALIGNMENT == 0 and num_rdma_bytes % ALIGNMENT == 0, "unaligned buffer size")
            require(num_rdma_bytes == 0 or world > 8 or low_latency_mode, "RDMA bytes within a node need low-latency mode")
            # NVSHMEM is process-global and initialised once (NVSHMEM API docs, nvshmem_init: a second call is
            # undefined; csrc/kernels/runtime.cu, internode::init asserts its RDMA team is unset for W > 8)
            require(not (nvshmem and self.process.nvshmem), "NVSHMEM was already initialised in this process by another buffer")
        sizes: list[Any] = [None] * world  # construction is collective: every rank must agree
        dist.all_gather_object(sizes, (num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank), group=group)
        require(len(set(sizes)) == 1, f"ranks created buffers of different sizes: {sizes}")
        # deep_ep/buffer.py, Buffer.__init__ (since d981409): the QP depth the low-latency asserts compare with
        self.nvshmem_qp_depth = int(os.environ.get("NVSHMEM_QP_DEPTH", "1024"))
        self.process.nvshmem |= nvshmem
        self._dirty = False  # normal-mode kernels ran since the low-latency buffer was cleaned
        self._low_latency_outputs: list[tuple[Tensor, ...] | None] = [None, None]
        self._low_latency_calls = 0
        self.process.log.append(f"made {self._modes()}")

    def _modes(self) -> str:
        return "+".join(m for m, on in (("normal", self.num_nvl_bytes > 0), ("low-latency", self.low_latency_mode)) if on)

    def destroy(self) -> None:
        """Release the buffer on every rank: ``Buffer::destroy`` runs an NVLink barrier and, with RDMA
        bytes, an NVSHMEM barrier and ``nvshmem_finalize`` (csrc/deep_ep.cpp), so every rank must call it."""
        with checks(self.group):
            require(self.explicitly_destroy, "destroy() needs explicitly_destroy=True")  # deep_ep/buffer.py, Buffer.destroy
            require(not self.destroyed, "destroy() called twice")  # csrc/deep_ep.cpp, Buffer::destroy
        gather(self.group, torch.zeros(1, dtype=torch.int64))  # the barrier
        self.destroyed = True
        self.process.log.append(f"destroyed {self._modes()}")


def simulator() -> types.ModuleType:
    """A fresh ``deep_ep`` stand-in: a new simulated process, with no NVSHMEM initialised and no buffer made."""
    module = types.ModuleType("deep_ep", "CPU simulator of DeepEP's V1 API (moe_ops.testing.sim.deep_ep)")
    module.Buffer = type("Buffer", (Buffer,), {"process": Process()})  # type: ignore[attr-defined]
    module.Config = Config  # type: ignore[attr-defined]
    module.EventOverlap = EventOverlap  # type: ignore[attr-defined]
    module.topk_idx_t = torch.int64  # type: ignore[attr-defined]  # deep_ep/__init__.py (since da6ca24): int64 by default
    module.SIMULATED_DEVICE_TYPES = SIMULATED_DEVICE_TYPES  # type: ignore[attr-defined]
    return module


__all__ = ["SIMULATED_DEVICE_TYPES", "Buffer", "Config", "EventOverlap", "SimulatedDeepEPError", "simulator"]
