"""What the two DeepEP backends share: finding ``deep_ep``, DeepEP's documented limits (checked before
DeepEP is called), their common base class, and the one ``deep_ep.Buffer`` per group.

``deep_ep`` is loaded (:mod:`moe_ops.libraries`) inside the op's real kernel on first use, never when
``moe_ops`` is imported and never by a fake kernel. UCCL-EP's drop-in wrapper installs under the same
name and API; tests put a simulator in its place (:mod:`moe_ops.testing.sim.deep_ep`).

The buffer of a group is created on the first call that needs it, sized from DeepEP's own hints
(``Config.get_nvl_buffer_size_hint`` for normal mode, ``Buffer.get_low_latency_rdma_size_hint`` for
low-latency mode), and replaced by a larger one when a later call needs more (every rank makes the
same decision: the sizes depend only on metadata the handshake agreed on). Creating a buffer is a
collective call of the group, so it happens at the same point of the same call on every rank.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from moe_ops import config, libraries
from moe_ops.backends.base import Backend
from moe_ops.comm import Comm, library_call
from moe_ops.errors import MoEInputError
from moe_ops.plan import DispatchPlan

Mode = Literal["normal", "low_latency"]

#: Hidden sizes DeepEP's low-latency kernels are compiled for (``SWITCH_HIDDEN`` in DeepEP V1).
LOW_LATENCY_HIDDEN = (2048, 2560, 4096, 5120, 6144, 7168, 8192)
#: Most top-k selections per token DeepEP's low-latency kernels take; normal mode is held to the same.
MAX_TOP_K = 11
#: Group sizes of DeepEP's intranode normal-mode kernels (``SWITCH_RANKS``); one node, NVLink.
NORMAL_WORLD_SIZES = (2, 4, 8)


def _deep_ep() -> ModuleType:
    """The ``deep_ep`` module (imported on the first call of a DeepEP backend)."""
    try:
        return libraries.load("deep_ep")
    except ImportError as e:
        raise MoEInputError(
            f"the DeepEP backends need DeepEP (the deep_ep package, or UCCL-EP's deep_ep wrapper), "
            f"which does not import here: {e}"
        ) from e


# --- limits ---------------------------------------------------------------------------------------


def check_rows(name: str, rows: Tensor, mode: Mode) -> None:
    """Token rows DeepEP moves (``x``, ``expert_out``, gradients): bf16, and a hidden size its kernels take."""
    hidden = rows.shape[-1]
    if rows.dtype != torch.bfloat16:
        raise MoEInputError(f"{name} must be bfloat16 for DeepEP (its kernels move bf16 tokens), got {rows.dtype}")
    if mode == "low_latency" and hidden not in LOW_LATENCY_HIDDEN:
        raise MoEInputError(
            f"{name} has hidden size {hidden}; DeepEP's low-latency kernels take {', '.join(map(str, LOW_LATENCY_HIDDEN))}"
        )
    if mode == "normal" and hidden % 8:
        raise MoEInputError(f"{name} has hidden size {hidden}; DeepEP's normal kernels need a multiple of 8 (16-byte rows)")


def check_dispatch(x: Tensor, topk_idx: Tensor, plan: DispatchPlan, mode: Mode) -> None:
    """DeepEP's limits for one dispatch (metadata only, so the fake kernel runs it too)."""
    check_rows("x", x, mode)
    if topk_idx.shape[1] > MAX_TOP_K:
        raise MoEInputError(f"topk_idx has top-k {topk_idx.shape[1]}; DeepEP takes at most {MAX_TOP_K}")
    world = plan.comm.world_size
    if mode == "normal" and world not in NORMAL_WORLD_SIZES:
        raise MoEInputError(
            f"backend 'deepep' runs DeepEP's intranode normal kernels, built for groups of "
            f"{', '.join(map(str, NORMAL_WORLD_SIZES))} ranks; this group has {world} "
            "(use 'deepep_ll' for the padded layout, or 'collective'; 'local' for a group of one)"
        )
    if mode == "low_latency" and not (world < 8 or world % 8 == 0):
        raise MoEInputError(f"DeepEP's low-latency mode takes groups of fewer than 8 ranks or a multiple of 8, not {world}")


class DeepEPBase(Backend):
    """What the DeepEP backends share: devices, DeepEP's limits, finding ``deep_ep``. Subclasses set
    ``mode``; their handles hold ``ids [T, K]`` (the ids DeepEP got), ``row_src``, ``route_row`` first."""

    mode: ClassVar[Mode]
    multi_rank = True

    @property
    def device_types(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"cuda"}) | libraries.simulated_device_types("deep_ep")

    def check_dispatch(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan) -> None:
        check_dispatch(x, topk_idx, plan, self.mode)
        if topk_weights.dtype != torch.float32:
            raise MoEInputError(f"topk_weights must be float32 for DeepEP, got {topk_weights.dtype}")
        if plan.comm.group is None:
            raise MoEInputError(f"backend {self.name!r} needs a torch.distributed group (group_name)")

    def check_rows(self, name: str, rows: Tensor, handle: list[Tensor], comm: Comm) -> None:
        check_rows(name, rows, self.mode)

    def prepare(self, plan: DispatchPlan) -> None:
        index_dtype = getattr(_deep_ep(), "topk_idx_t", torch.int64)
        if index_dtype != torch.int64:
            raise MoEInputError(f"this DeepEP build takes {index_dtype} expert ids; the DeepEP backends need int64 (its default)")


# --- one buffer per group -------------------------------------------------------------------------


@dataclass
class _GroupBuffer:
    buffer: Any  #: deep_ep.Buffer
    nvl_bytes: int
    rdma_bytes: int
    num_qps_per_rank: int  #: 0: not in low-latency mode; else the local expert count it was made for
    dirty: bool = False  #: normal-mode kernels ran since the low-latency buffer was last cleaned


_EXCHANGES = frozenset({"dispatch", "combine", "low_latency_dispatch", "low_latency_combine"})


class _Exchanges:
    """A ``deep_ep.Buffer`` whose exchanges with the peers raise ``MoECommunicationError`` when they fail."""

    def __init__(self, buffer: Any, comm: Comm) -> None:
        self._buffer, self._comm = buffer, comm

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._buffer, name)
        return functools.partial(library_call, f"deep_ep Buffer.{name}", self._comm, attr) if name in _EXCHANGES else attr


# by (group name, group): a group made later under a destroyed group's name gets its own
_buffers: dict[tuple[str, object], _GroupBuffer] = {}


def _ensure(comm: Comm, nvl_bytes: int, rdma_bytes: int, num_qps_per_rank: int) -> _GroupBuffer:
    """The group's buffer, (re)created when it lacks ``nvl_bytes``, ``rdma_bytes`` or low-latency mode
    for ``num_qps_per_rank`` local experts (0: not needed)."""
    held = _buffers.get((comm.group_name, comm.group))
    if held is not None and nvl_bytes <= held.nvl_bytes and rdma_bytes <= held.rdma_bytes and (
        num_qps_per_rank in (0, held.num_qps_per_rank)
    ):
        return held
    if held is not None:
        nvl_bytes, rdma_bytes = max(nvl_bytes, held.nvl_bytes), max(rdma_bytes, held.rdma_bytes)
        num_qps_per_rank = num_qps_per_rank or held.num_qps_per_rank
    low_latency = num_qps_per_rank > 0
    buffer = library_call(
        "deep_ep.Buffer()", comm, _deep_ep().Buffer, comm.group, nvl_bytes, rdma_bytes, low_latency_mode=low_latency,
        **({"num_qps_per_rank": num_qps_per_rank} if low_latency else {}),
    )
    _buffers[(comm.group_name, comm.group)] = held = _GroupBuffer(buffer, nvl_bytes, rdma_bytes, num_qps_per_rank)
    return held


def normal_buffer(comm: Comm, hidden: int) -> tuple[Any, Any, Any]:
    """``(buffer, dispatch config, combine config)`` for normal-mode calls moving bf16 rows of ``hidden``,
    with :data:`moe_ops.config.deepep_num_sms` SMs."""
    deep_ep = _deep_ep()
    if deep_ep.Buffer.num_sms != config.deepep_num_sms:
        deep_ep.Buffer.set_num_sms(config.deepep_num_sms)
    world = comm.world_size
    configs = (deep_ep.Buffer.get_dispatch_config(world), deep_ep.Buffer.get_combine_config(world))
    hidden_bytes = hidden * torch.bfloat16.itemsize
    held = _ensure(
        comm,
        max(c.get_nvl_buffer_size_hint(hidden_bytes, world) for c in configs),
        max(c.get_rdma_buffer_size_hint(hidden_bytes, world) for c in configs),
        0,
    )
    held.dirty = held.num_qps_per_rank > 0
    return _Exchanges(held.buffer, comm), *configs


def low_latency_buffer(comm: Comm, max_tokens: int, hidden: int, num_experts: int) -> Any:
    """The buffer for low-latency calls of this shape, cleaned if normal-mode kernels used it since."""
    world = comm.world_size
    rdma_bytes = _deep_ep().Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, world, num_experts)
    held = _ensure(comm, 0, rdma_bytes, num_experts // world)
    if held.dirty:
        held.buffer.clean_low_latency_buffer(max_tokens, hidden, num_experts)
        held.dirty = False
    return _Exchanges(held.buffer, comm)
