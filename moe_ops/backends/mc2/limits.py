"""The documented limits of torch_npu's MC2 ops (``npu_moe_distribute_dispatch[_v2]`` / ``combine[_v2]``),
checked by the ``mc2`` backend before it calls them, so that a call out of range fails with a clear
:class:`moe_ops.MoEInputError` instead of a device error, a hang or silent corruption.

Numbers from the CANN operators' tiling (which rejects a call out of range) and documentation (no
``comm_alg``, no shared experts, no TP domain): batch ``BS`` per rank, hidden size ``H`` of the rows on the
wire, top-k ``K``, experts ``E``, EP size ``W``, local experts ``L = E / W``, and the ``HCCL_BUFFSIZE`` (MB,
default 200) each call needs; :data:`TABLE` names the files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from moe_ops.errors import MoEInputError
from moe_ops.packing import round_up

_MB = 1024 * 1024


@dataclass(frozen=True)
class Shape:
    """One MC2 call as the limits see it."""

    batch: int  #: BS: rows per rank (the largest rank's, where batches differ)
    hidden: int  #: H: columns of the rows on the wire
    top_k: int  #: K
    experts: int  #: E (``moe_expert_num``)
    world: int  #: W (``ep_world_size``)

    @property
    def local_experts(self) -> int:
        return self.experts // self.world


def _a3_v2_buffer(s: Shape) -> int:
    """A3, dispatch_v2/combine_v2: ``2 (L BS W Align512(Align32(2H) + 64) + (K + 1) BS Align512(2H))`` bytes
    (one shared expert slot, the default ``shared_expert_num``)."""
    per_route = round_up(round_up(2 * s.hidden, 32) + 64, 512)
    return 2 * (s.local_experts * s.batch * s.world * per_route + (s.top_k + 1) * s.batch * round_up(2 * s.hidden, 512))


def _a3_v1_buffer(s: Shape) -> int:
    """A3, dispatch/combine: ``(HCCL_BUFFSIZE - 2) MB / 2 >= BS 2 (H + 128) (W L + K + 1)``."""
    return 2 * _MB + 2 * s.batch * 2 * (s.hidden + 128) * (s.world * s.local_experts + s.top_k + 1)


def _a2_fullmesh_buffer(s: Shape) -> int:
    """A2, fullmesh (v1 and v2): ``2 (BS W min(L, K) H 2 + 2 MB)``."""
    return 2 * (s.batch * s.world * min(s.local_experts, s.top_k) * s.hidden * 2 + 2 * _MB)


def _a2_hierarchy_buffer(s: Shape) -> int:
    """A2, hierarchy (v1 and v2): ``E BS (2H + 4 Align8(K) 4) + 4 MB + 100 MB``."""
    return s.experts * s.batch * (2 * s.hidden + 4 * round_up(s.top_k, 8) * 4) + 104 * _MB


@dataclass(frozen=True)
class Limits:
    """What one SoC accepts for one version of the MC2 ops."""

    name: str
    max_batch: int
    hidden: tuple[int, int]  #: inclusive range of H
    hidden_multiple: int
    max_top_k: int
    max_experts: int
    max_local_experts: int | None
    worlds: range | frozenset[int]  #: the EP sizes supported
    buffer_bytes: Callable[[Shape], int]  #: the HCCL_BUFFSIZE this call needs

    def problems(self, s: Shape) -> list[str]:
        """Every documented limit ``s`` breaks (empty: the call is in range)."""
        found = []
        if not 0 < s.batch <= self.max_batch:
            found.append(f"max_tokens_per_rank (BS) = {s.batch} outside [1, {self.max_batch}]")
        low, high = self.hidden
        if not low <= s.hidden <= high or s.hidden % self.hidden_multiple:
            found.append(
                f"hidden size on the wire {s.hidden} outside [{low}, {high}] (multiple of {self.hidden_multiple})"
            )
        if not 0 < s.top_k <= min(self.max_top_k, s.experts):
            found.append(f"top-k K = {s.top_k} outside [1, min({self.max_top_k}, num_experts)]")
        if not 0 < s.experts <= self.max_experts or s.experts % s.world:
            found.append(f"num_experts = {s.experts} outside [1, {self.max_experts}] or not divisible by {s.world} ranks")
        if self.max_local_experts is not None and s.local_experts > self.max_local_experts:
            found.append(f"{s.local_experts} local experts, more than {self.max_local_experts}")
        if s.world not in self.worlds:
            sizes = sorted(self.worlds) if isinstance(self.worlds, frozenset) else f"{self.worlds.start}..{self.worlds[-1]}"
            sizes = f"{sizes} in steps of {self.worlds.step}" if isinstance(self.worlds, range) and self.worlds.step > 1 else sizes
            found.append(f"EP size {s.world} not among the supported sizes {sizes}")
        need, have = self.buffer_bytes(s), hccl_buffsize_mb() * _MB
        if have < need:
            found.append(f"HCCL_BUFFSIZE = {have // _MB} MB, this call needs at least {-(-need // _MB)} MB")
        return found

    def check(self, s: Shape, op: str) -> MoEInputError | None:
        """The error for a call out of range (``None`` when it is in range); ``op`` names the call."""
        found = self.problems(s)
        if not found:
            return None
        return MoEInputError(f"backend 'mc2': {op} is outside the documented limits of {self.name}: " + "; ".join(found))


def hccl_buffsize_mb() -> int:
    """``HCCL_BUFFSIZE`` in MB (HCCL's default: 200)."""
    return int(os.environ.get("HCCL_BUFFSIZE", "200"))


_A3_V1_WORLDS = frozenset({8, 16, 32, 64, 128, 144, 256, 288})

#: (SoC, op version, A2 hierarchy mode) -> limits; SoC "A2" is Atlas A2 (Ascend910B), "A3" Atlas A3 (Ascend910_93).
#: From the tiling functions of CANN's ops-transformer (hicann/ops-transformer c29bc10, 2025-11-15; the A2
#: hierarchy EP bound of 64 from a later revision of the same file), which reject what they do not take:
#: mc2/moe_distribute_dispatch_v2/op_host/op_tiling/moe_distribute_dispatch_v2_tiling.cpp (A3: CheckAttrs,
#: CheckTensorShape; A2: MoeDistributeDispatchA2CheckAttrAndSetTiling / CheckShapeAndSetTiling) and
#: mc2/moe_distribute_dispatch/op_host/op_tiling/moe_distribute_dispatch_tiling.cpp (v1); HCCL_BUFFSIZE from
#: mc2/moe_distribute_dispatch_v2/docs/aclnnMoeDistributeDispatchV2.md and aclnnMoeDistributeDispatch.md.
TABLE: dict[tuple[str, int, bool], Limits] = {
    ("A3", 2, False): Limits("Atlas A3 (dispatch_v2)", 512, (1024, 8192), 1, 16, 1024, None, range(2, 769), _a3_v2_buffer),
    ("A3", 1, False): Limits("Atlas A3 (dispatch v1)", 512, (7168, 7168), 1, 8, 512, None, _A3_V1_WORLDS, _a3_v1_buffer),
    ("A2", 2, False): Limits("Atlas A2 (dispatch_v2, fullmesh)", 256, (32, 7168), 32, 16, 512, 24, range(8, 257, 8), _a2_fullmesh_buffer),
    ("A2", 2, True): Limits("Atlas A2 (dispatch_v2, hierarchy)", 256, (32, 10240), 32, 16, 512, None, range(8, 65, 8), _a2_hierarchy_buffer),
    ("A2", 1, False): Limits("Atlas A2 (dispatch v1, fullmesh)", 256, (32, 7168), 32, 16, 512, 24, range(8, 257, 8), _a2_fullmesh_buffer),
    ("A2", 1, True): Limits("Atlas A2 (dispatch v1, hierarchy)", 256, (32, 7168), 32, 16, 512, None, range(8, 257, 8), _a2_hierarchy_buffer),
}


def a2_hierarchy() -> bool:
    """Whether A2's MC2 ops run their hierarchy algorithm: without ``comm_alg`` (the backend passes none) the
    tiling reads ``HCCL_INTRA_PCIE_ENABLE=1`` and ``HCCL_INTRA_ROCE_ENABLE=0`` (moe_distribute_dispatch_v2_tiling.cpp,
    MoeDistributeDispatchA2CheckCommAlg; moe_distribute_dispatch_tiling.cpp, MoeDistributeDispatchA2IsLayered)."""
    return os.environ.get("HCCL_INTRA_PCIE_ENABLE") == "1" and os.environ.get("HCCL_INTRA_ROCE_ENABLE") == "0"


def soc_of(device_name: str) -> str:
    """``"A2"`` or ``"A3"`` from ``torch_npu.npu.get_device_name()``; other devices have no MC2 limits here."""
    if device_name.startswith("Ascend910_93"):
        return "A3"
    if device_name.startswith("Ascend910B"):
        return "A2"
    raise MoEInputError(f"backend 'mc2' needs an Atlas A2 or A3 NPU (MC2 ops); this device is {device_name!r}")
