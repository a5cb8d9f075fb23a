"""What the two DeepEP backends share: finding ``deep_ep``, DeepEP's limits (checked before DeepEP is
called, by the fake kernels at trace time too), their common base class, and the one ``deep_ep.Buffer``
of each group.

``deep_ep`` is loaded (:mod:`moe_ops.libraries`) inside the op's real kernel on first use, never when
``moe_ops`` is imported and never by a fake kernel. UCCL-EP's drop-in wrapper installs under the same
name and API; tests put a simulator in its place (:mod:`moe_ops.testing.sim.deep_ep`).

Sources read for every limit below: DeepEP's V1 API at its last commit before EPv2, 567632d
(2026-02-03), and at tag v1.2.1 (9af0e0d, 2025-09-15); each rule names the file and function.

One buffer per group. A low-latency buffer initialises NVSHMEM, which is process-global: a process
initialises it once (NVSHMEM API docs, ``nvshmem_init``: "a subsequent call to nvshmem_init ... results
in undefined behavior"; DeepEP's ``csrc/kernels/runtime.cu``, ``internode::init``, asserts its RDMA team
is unset for groups over 8 ranks). So a group's buffer is made on its first call (or up front by
:func:`reserve`), sized for what it serves (:class:`Sizing`); a later call needing more replaces a
normal-mode buffer only, after destroying it on every rank (``explicitly_destroy=True`` and
``Buffer.destroy``, collective), and a buffer in low-latency mode is never replaced: such a call is a
:class:`MoEInputError` before any communication, naming :func:`reserve`. Every rank decides the same
(the sizes come from metadata the handshake agrees on). A buffer belongs to the ``deep_ep`` module that
made it (a test installing a fresh simulator starts a fresh simulated process).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops import config, libraries, quant
from moe_ops.backends.base import Backend
from moe_ops.comm import Comm, comm_for, group_name_of, library_call
from moe_ops.errors import MoEInputError
from moe_ops.plan import DispatchPlan

Mode = Literal["normal", "low_latency"]

#: Hidden sizes the low-latency kernels are compiled for: ``SWITCH_HIDDEN`` (csrc/kernels/launch.cuh);
#: 3072 since 73b6ea4 (2025-10-16), after v1.2.1, whose kernels assert "Unsupported hidden" for it.
LOW_LATENCY_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
#: ``kNumMaxTopK`` (csrc/kernels/internode_ll.cu, ``dispatch``); normal mode is held to the same.
MAX_TOP_K = 11
#: Group sizes of the intranode normal-mode kernels (``SWITCH_RANKS``); one node, NVLink.
NORMAL_WORLD_SIZES = (2, 4, 8)
#: csrc/kernels/intranode.cu, ``dispatch`` (SM90 build): a token is staged through a per-warp TMA buffer
#: of 8192 bytes in two halves plus an 8-byte mbarrier, ``EP_DEVICE_ASSERT(hidden_int4 % 2 == 0 and
#: half_hidden_bytes + sizeof(uint64_t) <= kNumTMABytesPerWarp)``: bf16 rows of a multiple of 16 and at
#: most 8184 values, FP8 rows of at most 16368 (a device trap otherwise). Cached dispatches (combine's
#: backward) run it too.
_TMA_BYTES_PER_WARP = 8192
NORMAL_HIDDEN_MULTIPLE, NORMAL_MAX_HIDDEN = 16, _TMA_BYTES_PER_WARP - 8
_DISPATCHED = frozenset({"x", "grad_out"})  #: rows the normal-mode dispatch kernel moves


def _deep_ep() -> ModuleType:
    """The ``deep_ep`` module (imported on the first call of a DeepEP backend)."""
    try:
        return libraries.load("deep_ep")
    except ImportError as e:
        raise MoEInputError(
            f"the DeepEP backends need DeepEP (the deep_ep package, or UCCL-EP's deep_ep wrapper), "
            f"which does not import here: {e}"
        ) from e


def qp_depth() -> int:
    """NVSHMEM's QP depth as ``deep_ep.Buffer`` reads it (``NVSHMEM_QP_DEPTH``, default 1024: deep_ep/buffer.py,
    ``Buffer.__init__``)."""
    return int(os.environ.get("NVSHMEM_QP_DEPTH", "1024"))


def low_latency_token_multiple(world: int) -> int:
    """The multiple ``max_tokens_per_rank`` must be at ``world`` ranks for ``W * Tmax % 4 == 0`` (see
    :func:`check_dispatch`)."""
    return 4 // math.gcd(world, 4)


# --- limits ---------------------------------------------------------------------------------------


def check_rows(name: str, rows: Tensor, mode: Mode) -> None:
    """Token rows DeepEP moves (``x``, ``expert_out``, gradients): bf16, and a hidden size its kernels take."""
    if rows.dtype != torch.bfloat16:
        raise MoEInputError(f"{name} must be bfloat16 for DeepEP (its kernels move bf16 tokens), got {rows.dtype}")
    check_hidden(name, rows.shape[-1], mode)


def _normal_dispatch_takes(hidden: int) -> bool:
    return hidden % NORMAL_HIDDEN_MULTIPLE == 0 and hidden <= NORMAL_MAX_HIDDEN


def check_hidden(name: str, hidden: int, mode: Mode) -> None:
    """The hidden size of rows ``name`` (``x`` and ``grad_out`` go through a dispatch kernel, the others
    through a combine kernel)."""
    if mode == "low_latency" and hidden not in LOW_LATENCY_HIDDEN:
        raise MoEInputError(
            f"{name} has hidden size {hidden}; DeepEP's low-latency kernels take {', '.join(map(str, LOW_LATENCY_HIDDEN))} "
            "(SWITCH_HIDDEN, csrc/kernels/launch.cuh)"
        )
    if mode == "normal" and name in _DISPATCHED and not _normal_dispatch_takes(hidden):
        raise MoEInputError(
            f"{name} has hidden size {hidden}; DeepEP's intranode dispatch (SM90 build) needs a multiple of "
            f"{NORMAL_HIDDEN_MULTIPLE} of at most {NORMAL_MAX_HIDDEN} (its TMA staging buffer, csrc/kernels/intranode.cu, dispatch)"
        )
    if mode == "normal" and hidden % 8:  # csrc/deep_ep.cpp, Buffer::intranode_combine: 16-byte rows
        raise MoEInputError(f"{name} has hidden size {hidden}; DeepEP's normal kernels need a multiple of 8 (16-byte rows)")


def check_quantized(x: Tensor, plan: DispatchPlan, mode: Mode) -> None:
    """DeepEP's FP8 paths for a quantized dispatch (``plan.scales``): float8_e4m3fn rows with a float32
    scale per 128 columns. Normal mode moves them as given (``x`` pre-quantized, or quantized here by
    :func:`moe_ops.stage.quantize`); low-latency mode quantizes bf16 ``x`` in its kernel, whose arithmetic
    :mod:`moe_ops.quant` defines (csrc/kernels/utils.cuh, ``calculate_fp8_scales``)."""
    scales, hidden = plan.scales, x.shape[1]
    assert scales is not None
    spec = scales.quantize
    if spec is None and mode == "low_latency":  # csrc/deep_ep.cpp, Buffer::low_latency_dispatch: x is bf16
        raise MoEInputError(
            "DeepEP's low-latency dispatch quantizes bf16 x in its kernel and takes no pre-quantized rows "
            "(csrc/deep_ep.cpp, Buffer::low_latency_dispatch): pass bf16 x with quant='fp8_e4m3'"
        )
    dtype = x.dtype if spec is None else spec.dtype
    block = scales.block
    if dtype != torch.float8_e4m3fn or block != quant.BLOCK:  # deep_ep/buffer.py, Buffer.dispatch; internode_ll.cu, dispatch
        what = f"{dtype} rows with " + ("one scale per token" if block == 0 else f"a scale per {block} columns")
        raise MoEInputError(
            f"DeepEP's FP8 dispatch moves float8_e4m3fn rows with a float32 scale per {quant.BLOCK} columns, not {what} "
            "(deep_ep/buffer.py, Buffer.dispatch; csrc/kernels/internode_ll.cu, dispatch): use 'collective' for other formats"
        )
    if hidden % quant.BLOCK:  # deep_ep/buffer.py, Buffer.dispatch: scales [num_tokens, hidden // 128] "(requiring divisible)"
        raise MoEInputError(f"x has hidden size {hidden}; DeepEP's FP8 dispatch needs a multiple of {quant.BLOCK} (one scale per 128 columns)")
    if mode == "low_latency":
        check_rows("x", x, mode)
    elif hidden // 2 + 8 > _TMA_BYTES_PER_WARP:  # csrc/kernels/intranode.cu, dispatch (1-byte values; _TMA_BYTES_PER_WARP)
        raise MoEInputError(
            f"x has hidden size {hidden}; DeepEP's intranode dispatch (SM90 build) stages an FP8 token of at most "
            f"{2 * (_TMA_BYTES_PER_WARP - 8)} values (its TMA staging buffer, csrc/kernels/intranode.cu, dispatch)"
        )


def check_dispatch(x: Tensor, topk_idx: Tensor, plan: DispatchPlan, mode: Mode) -> None:
    """DeepEP's limits for one dispatch (metadata only, so the fake kernel runs it too)."""
    if plan.scales is None:
        check_rows("x", x, mode)
    else:
        check_quantized(x, plan, mode)
    if topk_idx.shape[1] > MAX_TOP_K:
        raise MoEInputError(f"topk_idx has top-k {topk_idx.shape[1]}; DeepEP takes at most {MAX_TOP_K}")
    world = plan.comm.world_size
    if mode == "normal" and world not in NORMAL_WORLD_SIZES:
        raise MoEInputError(
            f"backend 'deepep' runs DeepEP's intranode normal kernels, built for groups of "
            f"{', '.join(map(str, NORMAL_WORLD_SIZES))} ranks; this group has {world} "
            "(use 'deepep_ll' for the padded layout, or 'collective'; 'local' for a group of one)"
        )
    if mode == "low_latency":
        check_low_latency_shape(world, plan.token_bound)


def check_low_latency_shape(world: int, max_tokens: int) -> None:
    """The group size and ``num_max_dispatch_tokens_per_rank`` DeepEP's low-latency kernels take."""
    if not (world < 8 or world % 8 == 0):  # csrc/deep_ep.cpp, Buffer::Buffer
        raise MoEInputError(f"DeepEP's low-latency mode takes groups of fewer than 8 ranks or a multiple of 8, not {world}")
    if world * max_tokens % 4:  # csrc/deep_ep.cpp, Buffer::low_latency_dispatch: "TMA requires ... multiple of 4"
        raise MoEInputError(
            f"DeepEP's low-latency dispatch needs num_ranks * num_max_dispatch_tokens_per_rank to be a multiple of 4 "
            f"(TMA); {world} ranks * max_tokens_per_rank {max_tokens} is not: use a multiple of {low_latency_token_multiple(world)}"
        )
    if (max_tokens + 1) * 2 > qp_depth():  # deep_ep/buffer.py, Buffer.low_latency_dispatch / combine (since d981409)
        raise MoEInputError(
            f"DeepEP's low-latency kernels need (max_tokens_per_rank + 1) * 2 <= NVSHMEM_QP_DEPTH ({qp_depth()}); "
            f"max_tokens_per_rank is {max_tokens}"
        )


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
        hidden = x.shape[1]
        low_latency = Sizing(low_latency=(plan.token_bound, hidden, plan.num_experts))
        check_buffer(plan.comm, normal_sizing(hidden) if self.mode == "normal" else low_latency)

    def check_rows(self, name: str, rows: Tensor, handle: list[Tensor], comm: Comm) -> None:
        if name == "grad_recv_x" and rows.shape[-1] == 0:  # the router's gradient alone (moe.dispatch_quantized)
            return
        check_rows(name, rows, self.mode)

    def prepare(self, plan: DispatchPlan) -> None:
        index_dtype = getattr(_deep_ep(), "topk_idx_t", torch.int64)
        if index_dtype != torch.int64:
            raise MoEInputError(f"this DeepEP build takes {index_dtype} expert ids; the DeepEP backends need int64 (its default)")


# --- one buffer per group -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizing:
    """The calls a buffer serves: normal mode up to hidden size ``normal[0]`` at ``normal[1]`` SMs (DeepEP's
    NVLink size hint grows with both), low-latency mode for ``(Tmax, hidden, experts)`` (its RDMA size hint
    grows with each; ``num_qps_per_rank`` must equal the local experts, and the signal buffers' place
    depends on the expert count: csrc/config.hpp, ``LowLatencyLayout``). ``None``: not served."""

    normal: tuple[int, int] | None = None
    low_latency: tuple[int, int, int] | None = None

    def covers(self, other: Sizing) -> bool:
        normal = other.normal is None or (
            self.normal is not None and other.normal[0] <= self.normal[0] and other.normal[1] == self.normal[1]
        )
        low_latency = other.low_latency is None or (
            self.low_latency is not None
            and other.low_latency[0] <= self.low_latency[0]
            and other.low_latency[1] <= self.low_latency[1]
            and other.low_latency[2] == self.low_latency[2]
        )
        return normal and low_latency

    def merged(self, other: Sizing) -> Sizing:
        """What serves both (``self`` serves no low-latency call: a buffer that does is never replaced)."""
        normal = other.normal or self.normal
        if self.normal is not None and other.normal is not None:
            normal = (max(self.normal[0], other.normal[0]), other.normal[1])
        return Sizing(normal, other.low_latency)

    def __str__(self) -> str:
        parts = [] if self.normal is None else [f"normal mode up to hidden {self.normal[0]} at {self.normal[1]} SMs"]
        if self.low_latency is not None:
            parts.append("low-latency mode for max_tokens_per_rank {}, hidden {}, {} experts".format(*self.low_latency))
        return " and ".join(parts) or "nothing"


@dataclass
class _GroupBuffer:
    buffer: Any  #: deep_ep.Buffer
    library: ModuleType  #: the deep_ep that made it
    sizing: Sizing
    dirty: bool = False  #: normal-mode kernels ran since the low-latency buffer was last cleaned


_EXCHANGES = frozenset({"dispatch", "combine", "low_latency_dispatch", "low_latency_combine"})


class _Exchanges:
    """A ``deep_ep.Buffer`` whose exchanges with the peers raise ``MoECommunicationError`` when they fail."""

    def __init__(self, buffer: Any, comm: Comm) -> None:
        self._buffer, self._comm = buffer, comm

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._buffer, name)
        return functools.partial(library_call, f"deep_ep Buffer.{name}", self._comm, attr) if name in _EXCHANGES else attr


_Key = tuple[str, object]  # (group name, group): a group made later under a destroyed group's name gets its own
_buffers: dict[_Key, _GroupBuffer] = {}
_nvshmem: dict[ModuleType, str] = {}  # deep_ep module -> the group whose low-latency buffer initialised NVSHMEM


def normal_sizing(hidden: int) -> Sizing:
    """What a normal-mode call moving rows of ``hidden`` needs, at :data:`moe_ops.config.deepep_num_sms` SMs."""
    return Sizing(normal=(hidden, config.deepep_num_sms))


def _key(comm: Comm) -> _Key:
    return comm.group_name, comm.group


def _held(comm: Comm) -> _GroupBuffer | None:
    """The group's buffer, if the ``deep_ep`` in place made it (never imports ``deep_ep``)."""
    held = _buffers.get(_key(comm))
    return held if held is not None and held.library is libraries.current("deep_ep") else None


def _problem(comm: Comm, wanted: Sizing) -> str | None:
    """Why the group's buffer cannot be made to serve ``wanted`` (``None``: it can, or already does)."""
    held = _held(comm)
    if held is not None and held.sizing.covers(wanted):
        return None
    if held is not None and held.sizing.low_latency is not None:
        return (
            f"this call needs a DeepEP buffer for {wanted}, but the group's serves {held.sizing}; a buffer in "
            "low-latency mode cannot be replaced (its NVSHMEM is initialised once per process). Size it for "
            "every call up front with moe_ops.backends.deepep.reserve(group, hidden=..., max_tokens_per_rank=..., "
            "num_experts=...) on every rank before the group's first DeepEP call"
        )
    owner = _nvshmem.get(libraries.current("deep_ep"))  # type: ignore[arg-type]
    if wanted.low_latency is not None and owner is not None:
        return (
            f"DeepEP's low-latency mode needs NVSHMEM, which the low-latency buffer of group {owner!r} already "
            "initialised in this process (a process initialises it once): use one group for low-latency calls"
        )
    return None


def check_buffer(comm: Comm, wanted: Sizing) -> None:
    """Raise :class:`MoEInputError` where the group's buffer cannot serve ``wanted`` (metadata only)."""
    problem = _problem(comm, wanted)
    if problem is not None:
        raise MoEInputError(problem)


def _nvl_bytes(deep_ep: ModuleType, world: int, normal: tuple[int, int] | None) -> int:
    """``max(Config.get_nvl_buffer_size_hint)`` over DeepEP's dispatch and combine configs for ``normal``."""
    if normal is None:
        return 0
    hidden, num_sms = normal
    if deep_ep.Buffer.num_sms != num_sms:
        deep_ep.Buffer.set_num_sms(num_sms)
    configs = (deep_ep.Buffer.get_dispatch_config(world), deep_ep.Buffer.get_combine_config(world))
    return max(c.get_nvl_buffer_size_hint(hidden * torch.bfloat16.itemsize, world) for c in configs)


def _ensure(comm: Comm, wanted: Sizing) -> _GroupBuffer:
    """The group's buffer, made (or a normal-mode one replaced, collectively) where it does not serve ``wanted``."""
    check_buffer(comm, wanted)
    held = _held(comm)
    if held is not None and held.sizing.covers(wanted):
        return held
    sizing = wanted if held is None else held.sizing.merged(wanted)
    if held is not None:
        _release(comm, held)
    deep_ep = _deep_ep()
    kwargs: dict[str, object] = {"explicitly_destroy": True, "low_latency_mode": sizing.low_latency is not None}
    rdma_bytes = 0
    if sizing.low_latency is not None:
        max_tokens, hidden, num_experts = sizing.low_latency
        rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, comm.world_size, num_experts)
        kwargs["num_qps_per_rank"] = num_experts // comm.world_size
    nvl_bytes = _nvl_bytes(deep_ep, comm.world_size, sizing.normal)
    buffer = library_call("deep_ep.Buffer()", comm, deep_ep.Buffer, comm.group, nvl_bytes, rdma_bytes, **kwargs)
    if sizing.low_latency is not None:
        _nvshmem[deep_ep] = comm.group_name
    _buffers[_key(comm)] = held = _GroupBuffer(buffer, deep_ep, sizing)
    return held


def _release(comm: Comm, held: _GroupBuffer) -> None:
    library_call("deep_ep Buffer.destroy", comm, held.buffer.destroy)
    del _buffers[_key(comm)]


def reserve(group: dist.ProcessGroup | str, *, hidden: int, max_tokens_per_rank: int | None = None, num_experts: int | None = None) -> None:
    """Make ``group``'s DeepEP buffer now, sized for normal-mode calls of up to ``hidden`` (where normal
    mode runs: groups of 2, 4 or 8 ranks, a hidden size its dispatch takes) and, given
    ``max_tokens_per_rank`` and ``num_experts``, low-latency calls of up to that many tokens per rank and
    that ``hidden`` too: one buffer for both modes, as DeepEP's own tests make it.
    Collective: call it on every rank of the group, before its first DeepEP call (a buffer already made
    in low-latency mode cannot grow)."""
    comm = comm_for(group_name_of(group))
    if comm.group is None:
        raise MoEInputError("reserve needs a torch.distributed group")
    normal = comm.world_size in NORMAL_WORLD_SIZES and _normal_dispatch_takes(hidden)
    low_latency = None
    if max_tokens_per_rank is not None and num_experts is not None:
        check_hidden("x", hidden, "low_latency")
        check_low_latency_shape(comm.world_size, max_tokens_per_rank)
        if num_experts <= 0 or num_experts % comm.world_size:
            raise MoEInputError(f"num_experts={num_experts} is not a positive multiple of the group size {comm.world_size}")
        low_latency = (max_tokens_per_rank, hidden, num_experts)
    elif max_tokens_per_rank is not None or num_experts is not None:
        raise MoEInputError("reserve sizes low-latency mode from max_tokens_per_rank and num_experts together")
    if not normal and low_latency is None:
        raise MoEInputError(
            f"nothing to reserve: normal mode does not run here ({comm.world_size} ranks, hidden size {hidden}) "
            "and low-latency mode needs max_tokens_per_rank and num_experts"
        )
    _ensure(comm, Sizing(normal_sizing(hidden).normal if normal else None, low_latency))


def release(group: dist.ProcessGroup | str) -> None:
    """Destroy ``group``'s DeepEP buffer (``Buffer.destroy``, collective: call it on every rank). A later
    call makes a new one, except in low-latency mode once NVSHMEM was initialised in this process."""
    comm = comm_for(group_name_of(group))
    held = _held(comm)
    if held is not None:
        _release(comm, held)


def normal_buffer(comm: Comm, hidden: int) -> tuple[Any, Any, Any]:
    """``(buffer, dispatch config, combine config)`` for normal-mode calls moving bf16 rows of ``hidden``,
    with :data:`moe_ops.config.deepep_num_sms` SMs."""
    deep_ep = _deep_ep()
    if deep_ep.Buffer.num_sms != config.deepep_num_sms:
        deep_ep.Buffer.set_num_sms(config.deepep_num_sms)
    held = _ensure(comm, normal_sizing(hidden))
    world = comm.world_size
    held.dirty = held.sizing.low_latency is not None
    return _Exchanges(held.buffer, comm), deep_ep.Buffer.get_dispatch_config(world), deep_ep.Buffer.get_combine_config(world)


def low_latency_buffer(comm: Comm, max_tokens: int, hidden: int, num_experts: int) -> Any:
    """The buffer for low-latency calls of this shape, cleaned if normal-mode kernels used it since."""
    held = _ensure(comm, Sizing(low_latency=(max_tokens, hidden, num_experts)))
    if held.dirty:
        held.buffer.clean_low_latency_buffer(max_tokens, hidden, num_experts)
        held.dirty = False
    return _Exchanges(held.buffer, comm)

