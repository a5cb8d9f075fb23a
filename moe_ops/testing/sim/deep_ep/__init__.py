"""A CPU simulator of the parts of DeepEP's V1 ``deep_ep.Buffer`` API that moe_ops' DeepEP backends
call, for tests: real exchanges between the ranks of a gloo group, real outputs in DeepEP's documented
layouts. ``moe_ops.testing.sim.install("deep_ep")`` puts this package in ``deep_ep``'s place (through
:mod:`moe_ops.libraries`) and it declares CPU a device it simulates; nothing in moe_ops installs it.
One module per mode: :mod:`.normal`, :mod:`.low_latency`; :mod:`.common` holds what they share.

Modelled, from DeepEP's docstrings, its tests' layout checks and its kernels' host-side asserts:

* the buffer: one collective construction per group (every rank must pass the same sizes), the
  documented group sizes, size hints that grow with the hidden size, and a size check on every call;
  the low-latency rule ``num_qps_per_rank == local experts`` and that low-latency kernels need
  ``clean_low_latency_buffer`` after normal-mode kernels used the buffer;
* normal mode, intranode (W = 2, 4, 8): ``get_dispatch_layout``; ``dispatch`` delivering each token
  once per receiving rank, in (source rank, source token) order, with top-k ids made local (-1 for
  experts elsewhere, weight 0 there), the per-expert counts as a Python list, and the six-tensor
  handle (rank and channel prefix matrices, ``recv_src_idx``, ``is_token_in_rank``, ``send_head``);
  ``num_worst_tokens`` (receive buffers of that many rows, id -1 and NaN garbage past the count);
  cached-handle ``dispatch``; ``combine`` summing each token's rows over the ranks it went to (float32,
  and ``topk_weights`` likewise). Tokens move per channel (``num_sms / 2`` contiguous token ranges):
  combine finds a rank's rows by the receive-side channel offsets and a token's row by ``send_head``,
  so a handle whose tensors are swapped or stale produces an error or wrong sums, as on a GPU;
* low-latency mode: ``low_latency_dispatch`` (BF16) returning ``[L, W * Tmax, H]`` with ``recv_count``,
  source-rank blocks described by ``layout_range`` (start ``<< 32`` | length) and ``src_info``, blocks
  and rows in a shuffled order (DeepEP's come in atomic arrival order); the received tensor reuses one
  of two buffers, which the next-but-one low-latency kernel overwrites (with NaN first);
  ``low_latency_combine`` reducing on the source rank with the given weights (float32).

Not modelled: kernel timing and overlap, SM use (``num_sms`` only shapes the channel matrices),
NVSHMEM, RDMA and CUDA IPC, internode normal mode (W > 8), FP8 / UE8M0 / LogFMT, ``expert_alignment``
other than 1, async events, receive hooks (hook-based overlap), zero-copy combine, and DeepEP's exact
size formulas (the hints here are a simple model with the same inputs).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

from moe_ops.testing.sim.deep_ep.common import (
    ALIGNMENT,
    EventOverlap,
    SimulatedDeepEPError,
    checks,
    created,
    require,
)
from moe_ops.testing.sim.deep_ep.low_latency import LowLatencyMode
from moe_ops.testing.sim.deep_ep.normal import Config, NormalMode

SIMULATED_DEVICE_TYPES = frozenset({"cpu"})


class Buffer(NormalMode, LowLatencyMode):
    """``deep_ep.Buffer`` (V1), simulated over the gloo ``group``."""

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
        world = self.group_size
        with checks(group):
            require(world < 8 or world % 8 == 0, f"a group of {world} ranks")
            require(num_nvl_bytes % ALIGNMENT == 0 and num_rdma_bytes % ALIGNMENT == 0, "unaligned buffer size")
            require(num_rdma_bytes == 0 or world > 8 or low_latency_mode, "RDMA bytes within a node need low-latency mode")
        sizes: list[Any] = [None] * world  # construction is collective: every rank must agree
        dist.all_gather_object(sizes, (num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank), group=group)
        require(len(set(sizes)) == 1, f"ranks created buffers of different sizes: {sizes}")
        self._dirty = False  # normal-mode kernels ran since the low-latency buffer was cleaned
        self._low_latency_outputs: list[Tensor | None] = [None, None]
        self._low_latency_calls = 0
        created.append((num_nvl_bytes, num_rdma_bytes, low_latency_mode))


__all__ = ["SIMULATED_DEVICE_TYPES", "Buffer", "Config", "EventOverlap", "SimulatedDeepEPError"]
