"""The ``mc2`` backend: expert parallelism on Ascend NPUs through torch_npu's fused MC2 ops,
``npu_moe_distribute_dispatch_v2`` / ``npu_moe_distribute_combine_v2`` (v1 ``npu_moe_distribute_dispatch``
/ ``combine`` with ``expand_idx`` where v2 is missing). Padded and bounded layouts (neither reads a size
back to the host: MC2's ``expand_x`` has a static row count, the layout is built from it); inference and training
(MC2 itself has no autograd: the backward passes are the same ops run the other way).

Marshalling (one call; ``W`` ranks, ``L`` local experts, ``Tmax = max_tokens_per_rank``):

* ``group_ep``: the HCCL communicator name of a process group of the same ranks that the backend makes
  for the MC2 ops alone (CANN allows no other operator on their communicator; the ops' agreement and
  every other collective stay on the caller's group, as vllm-ascend keeps its own "mc2" group);
  ``ep_world_size = W``, ``ep_rank_id`` = this rank, ``moe_expert_num = E``.
* v2: every rank sends ``BS = Tmax`` rows (its ``T`` tokens, then padding rows), so batches are equal
  and ``global_bs = 0``. ``x_active_mask``: on A3 ``[BS, K]``, masking padding rows, ``-1`` ids, ids
  outside ``[0, E)`` and repeats; on A2, whose tiling takes a 1-D mask only (as vllm-ascend passes),
  ``[BS]`` masking the padding rows, while masked slots travel to unused experts and the receiver
  discards them. v1 has no mask (reserved): each rank sends its ``T`` rows (at least one),
  ``global_bs = Tmax * W``, masked slots travel as on A2.
* ``expert_ids``: the routes, masked slots filled with distinct unused experts (MC2 wants every id in
  ``[0, E)`` and no repeat in a row).
* ``expert_token_nums_type = 0``: cumulative counts, which say which local expert each row belongs to.
* ``quant_mode`` 0 (``"mc2"``) or 2, int8 per-token dynamic quantization of the dispatched rows:
  ``moe.dispatch_quantized(quant="int8", quant_block=0)`` on ``"mc2"`` returns MC2's int8 rows and
  ``dynamic_scales`` as ``recv_x`` / ``recv_scales`` (MC2's rounding, docs/contract.md); ``"mc2_int8"``
  dequantizes them with ``dynamic_scales``, so its ``recv_x`` is close to, not equal to, ``x``.
* combine: the rows padded to the dispatch's width (one ``H`` per dispatch/combine pair, as vllm-ascend's
  pairs have), ``expert_scales`` all ones (the contract applies ``recv_weights``, which may differ from
  the router's weights, on the expert rank before the rows go back) and the dispatch's opaque handle
  (``assist_info_for_combine`` or ``expand_idx``, ``ep_recv_counts`` as ``ep_send_counts``,
  ``tp_recv_counts`` as ``tp_send_counts``) passed through unread. combine_v2 leaves the rows of tokens
  with no active route unwritten: the backend zeroes them.
* A2 in hierarchy mode (``HCCL_INTRA_PCIE_ENABLE=1``, ``HCCL_INTRA_ROCE_ENABLE=0``): dispatch gets
  ``expert_scales`` (all ones; the tiling requires them) and combine the ``expand_scales`` it returned
  (the hierarchy combine weights each row by them).

Every row carries its token's key, ids and weights, so the expert rank rebuilds the contract's
(source rank, token, k) order itself. Backward: dispatch's = a combine of the gradient rows (the
weight gradients ride in 2K extra columns, each a bf16/fp16 hi + lo pair); combine's = a dispatch of
the output gradient.

Limits (:mod:`.limits`): bf16/fp16 tokens, float32 weights, and the SoC's ranges of BS, H (of the rows
on the wire), K, E, W and HCCL_BUFFSIZE, checked before any call (at trace time too).

**Tested against a CPU simulator of the documented op behaviour** (:mod:`moe_ops.testing.sim.torch_npu`,
put in torch_npu's place through :mod:`moe_ops.libraries`), not on Ascend hardware; docs/backends.md
lists what the simulator models and what it does not.

Handle: ``[ids [T, K], slot_row [L, C] or [R], row_slot [A], row_k [A], assist_info (or expand_idx),
ep_recv_counts, tp_recv_counts, expand_scales (float32 bits as int32; [0] outside A2 hierarchy mode),
wire [0, H_w], rows [0, L, pad_multiple]]``; ``A = Tmax * W * min(L, K)`` rows of ``expand_x``, ``H_w``
the dispatch's row width (the last two tensors hold no data: their shapes record the call).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops import libraries, quant, stage
from moe_ops.backends.base import Backend, DispatchOutputs, Peers, int64_like
from moe_ops.backends.mc2.limits import TABLE, Shape, a2_hierarchy, soc_of
from moe_ops.backends.mc2.wire import Received, Wire, place, route_ids, sent_ids
from moe_ops.comm import Comm, library_call
from moe_ops.errors import MoEInputError
from moe_ops.indexing import pad_rows, take
from moe_ops.plan import DispatchPlan, Kind, RowLayout
from moe_ops.quant import RowScales

_TOKEN_DTYPES = (torch.bfloat16, torch.float16)


def _torch_npu() -> ModuleType:
    """torch_npu (or its simulator in tests), loaded on first use: ``import moe_ops`` never imports it."""
    return libraries.load("torch_npu")


_mc2_groups: dict[tuple[str, object], dist.ProcessGroup] = {}


def _mc2_group(comm: Comm) -> dist.ProcessGroup:
    """The process group the MC2 ops of ``comm``'s calls run on: one of the same ranks, made on the first
    call for them alone. "The EP communication domain allows no other operator" (CANN,
    mc2/moe_distribute_dispatch_v2/docs/aclnnMoeDistributeDispatchV2.md, 约束说明 9), and the ops agree on
    ``comm``'s group before every call; vllm-ascend likewise keeps a separate "mc2" group
    (vllm_ascend/distributed/parallel_state.py). Every rank of the group makes it at the same call."""
    key = (comm.group_name, comm.group)
    if key not in _mc2_groups:
        ranks = dist.get_process_group_ranks(comm.group)
        _mc2_groups[key] = library_call("torch.distributed.new_group", comm, dist.new_group, ranks, use_local_synchronization=True)
    return _mc2_groups[key]


def _group_ep(comm: Comm) -> str:
    """MC2's ``group_ep``: the HCCL communicator name of :func:`_mc2_group` (the test simulator names its gloo groups)."""
    group = _mc2_group(comm)
    simulated = getattr(_torch_npu(), "simulated_comm_name", None)
    if simulated is not None:
        return simulated(group, comm.rank)
    return group._get_backend(torch.device("npu")).get_hccl_comm_name(comm.rank)


def _wire_width(handle: list[Tensor]) -> int:
    """The width of the rows the dispatch that made ``handle`` sent (its ``wire`` tensor's shape records it)."""
    return handle[8].shape[1]


def _row_layout(handle: list[Tensor]) -> RowLayout:
    """The layout the dispatch that made ``handle`` built (its ``slot_row`` and ``rows`` tensors' shapes)."""
    slot_row, pad_multiple = handle[1], handle[9].shape[2]
    if slot_row.dim() == 2:
        return RowLayout("padded", capacity=slot_row.shape[1])
    return RowLayout("bounded", max_rows=slot_row.shape[0], pad_multiple=pad_multiple)


def _layout_tensor(ids: Tensor, num_local: int, rows: RowLayout) -> Tensor:
    """``[0, L, pad_multiple]``: the handle's record of the layout's expert count and alignment."""
    return ids.new_empty(0, num_local, rows.pad_multiple)


@dataclass(frozen=True)
class _Call:
    """The MC2 view of one op call: the group, the routing sizes, the op version and the SoC."""

    comm: Comm
    num_experts: int
    top_k: int
    max_tokens: int  #: Tmax, agreed by every rank
    version: int  #: 2: dispatch_v2 / combine_v2; 1: dispatch / combine
    soc: str  #: "A2" or "A3"
    hierarchy: bool  #: A2's hierarchy algorithm (limits.a2_hierarchy)

    @classmethod
    def of(cls, comm: Comm, num_experts: int, top_k: int, max_tokens: int) -> _Call:
        npu = _torch_npu()
        version = 2 if hasattr(npu, "npu_moe_distribute_dispatch_v2") else 1
        soc = soc_of(npu.npu.get_device_name())
        return cls(comm, num_experts, top_k, max_tokens, version, soc, soc == "A2" and a2_hierarchy())

    @classmethod
    def from_handle(cls, comm: Comm, handle: list[Tensor]) -> _Call:
        """The call that made ``handle`` (``Tmax`` from the ``A = Tmax W min(L, K)`` rows it recorded)."""
        top_k, num_local, rows = handle[0].shape[1], handle[9].shape[1], handle[2].shape[0]
        return cls.of(comm, num_local * comm.world_size, top_k, rows // (comm.world_size * min(num_local, top_k)))

    @property
    def num_local(self) -> int:
        return self.num_experts // self.comm.world_size

    @property
    def rows(self) -> int:
        """A: rows of ``expand_x`` (global batch * min(L, K), either way ``global_bs`` is set)."""
        return self.max_tokens * self.comm.world_size * min(self.num_local, self.top_k)

    def batch(self, num_tokens: int) -> int:
        """BS: the rows this rank sends (v2: every rank ``Tmax``; v1: its own tokens, at least one)."""
        return self.max_tokens if self.version == 2 else torch.sym_max(num_tokens, 1)

    def check(self, width: int, dtype: torch.dtype, what: str) -> MoEInputError | None:
        """The error for an MC2 call moving rows of ``width`` columns of ``dtype`` (``None`` if allowed)."""
        if self.comm.group is None:
            return MoEInputError("backend 'mc2' needs a torch.distributed group (group_name), got none")
        if dtype not in _TOKEN_DTYPES:
            return MoEInputError(f"backend 'mc2': {what} needs bfloat16 or float16 rows (MC2), got {dtype}")
        if self.max_tokens == 0:  # no rank has a token: no MC2 call is made
            return None
        shape = Shape(self.max_tokens, width, self.top_k, self.num_experts, self.comm.world_size)
        return TABLE[(self.soc, self.version, self.hierarchy)].check(shape, what)

    def _common(self, num_tokens: int, ids: Tensor) -> dict[str, object]:
        """The arguments dispatch and combine share, for a rank with ``num_tokens`` routes ``ids``."""
        batch = self.batch(num_tokens)
        routes = pad_rows(ids, batch, -1)
        kwargs: dict[str, object] = dict(
            expert_ids=sent_ids(routes, self.num_experts),
            group_ep=_group_ep(self.comm),
            ep_world_size=self.comm.world_size,
            ep_rank_id=self.comm.rank,
            moe_expert_num=self.num_experts,
            global_bs=0 if self.version == 2 else self.max_tokens * self.comm.world_size,
        )
        if self.version == 2 and self.soc == "A3":  # the routes: a token with none active takes no part
            kwargs["x_active_mask"] = routes >= 0
        elif self.version == 2:  # A2's tiling takes a token mask [BS] only (true before false)
            kwargs["x_active_mask"] = torch.arange(batch, device=ids.device) < num_tokens
        return kwargs

    def dispatch(self, wire: Wire, x: Tensor, ids: Tensor, weights: Tensor | None) -> tuple[Received, Tensor, list[Tensor]]:
        """Send this rank's tokens ``x [T, H]`` with routes ``ids [T, K]`` (int8 rows with ``wire.quantized``:
        ``quant_mode`` 2): the decoded ``expand_x`` rows, ``expert_token_nums`` (cumulative) and MC2's handle
        (``expand_scales`` as int32)."""
        ops, batch, quant_mode = _torch_npu(), self.batch(x.shape[0]), 2 if wire.quantized else 0
        keys = self.comm.rank * self.max_tokens + torch.arange(batch, device=x.device)  # batch <= Tmax
        rows = wire.encode(pad_rows(x, batch), keys, pad_rows(ids, batch, -1), None if weights is None else pad_rows(weights, batch))
        op = ops.npu_moe_distribute_dispatch_v2 if self.version == 2 else ops.npu_moe_distribute_dispatch
        kwargs = self._common(x.shape[0], ids)
        if self.hierarchy:  # the A2 hierarchy tiling requires expert_scales; ones: the weights ride in the rows
            kwargs["expert_scales"] = torch.ones(batch, self.top_k, dtype=torch.float32, device=x.device)
        expand_x, scales, assist, ends, ep_counts, tp_counts, expand_scales = library_call(
            f"torch_npu.{op.__name__}", self.comm, op, x=rows, **kwargs, quant_mode=quant_mode, expert_token_nums_type=0,
        )
        if expand_scales is None:  # A3 returns None where it has no expand_scales (torch_npu's documentation)
            expand_scales = x.new_empty(0, dtype=torch.float32)
        mc2_handle = [assist, ep_counts, tp_counts, expand_scales.view(torch.int32)]
        return wire.decode(expand_x, scales if quant_mode else None), ends, mc2_handle

    def combine(self, rows: Tensor, ids: Tensor, mc2_handle: list[Tensor], width: int) -> Tensor:
        """Sum the ``expand_x``-ordered ``rows [A, H]`` (sent ``width`` columns wide) back per source token: ``[T, H]``."""
        num_tokens, ops = ids.shape[0], _torch_npu()
        assist, ep_counts, tp_counts, expand_scales = mc2_handle
        op, assist_name = (
            (ops.npu_moe_distribute_combine_v2, "assist_info_for_combine")
            if self.version == 2
            else (ops.npu_moe_distribute_combine, "expand_idx")
        )
        kwargs = self._common(num_tokens, ids)
        if self.hierarchy:  # the hierarchy combine weights each row by the dispatch's expand_scales
            kwargs["expand_scales"] = expand_scales.view(torch.float32)
        out = library_call(
            f"torch_npu.{op.__name__}", self.comm, op,
            expand_x=_pad_columns(rows, width),
            ep_send_counts=ep_counts,
            tp_send_counts=tp_counts,
            expert_scales=torch.ones(self.batch(num_tokens), self.top_k, dtype=torch.float32, device=rows.device),
            **{assist_name: assist},
            **kwargs,
        )
        # combine_v2 writes only the rows of tokens with an active route (mc2/moe_distribute_combine_v2/
        # op_kernel/moe_distribute_combine_v2.h, LocalWindowCopy) into an uninitialised output
        # (op_plugin/ops/opapi/MoeDistributeCombineKernelV2OpApi.cpp): a token without routes gets zeros here
        return torch.where((ids >= 0).any(dim=1, keepdim=True), out[:num_tokens, : rows.shape[1]], 0)

    def handle_shapes(self, num_tokens: int) -> list[tuple[int, ...]]:
        """Shapes of MC2's handle tensors, as torch_npu's meta functions give them (no TP; ``expert_scales``
        in A2 hierarchy mode only)."""
        batch, world = self.batch(num_tokens), self.comm.world_size
        assist = (max(batch * self.top_k, self.rows * 128),) if self.version == 2 else (batch * self.top_k,)
        recv_counts = world * self.num_local
        if self.hierarchy:
            recv_counts += self.max_tokens * world * 2 * self.top_k * (world // 8)
        return [assist, (recv_counts,), (0,), (self.rows if self.hierarchy else 0,)]


def _pad_columns(rows: Tensor, width: int) -> Tensor:
    return rows if rows.shape[1] == width else torch.cat([rows, rows.new_zeros(rows.shape[0], width - rows.shape[1])], 1)


def _nothing_sent(call: _Call, x: Tensor, weights: Tensor, ids: Tensor, rows: RowLayout, wire: Wire, quantized: bool) -> DispatchOutputs:
    """Dispatch where no rank has a token (``Tmax = 0``): an empty layout (padding rows only), no MC2 call."""
    layout = stage.expert_layout(ids.new_empty(0, 1), call.num_local, rows)
    handle = [ids, layout.row_src, ids.new_empty(0), ids.new_empty(0)]
    handle += [x.new_zeros(shape, dtype=torch.int32) for shape in call.handle_shapes(ids.shape[0])]
    handle += [ids.new_empty(0, wire.width), _layout_tensor(ids, call.num_local, rows)]
    shape = layout.row_src.shape
    recv_x = x.new_zeros(*shape, x.shape[1], dtype=torch.int8 if quantized else x.dtype)
    recv_scales = x.new_zeros(*shape, 1, dtype=torch.float32) if quantized else None
    return DispatchOutputs(recv_x, weights.new_zeros(shape), layout.tokens_per_expert, layout.dropped, handle, recv_scales)


def _check_quantized(scales: RowScales) -> None:
    """What MC2 (hicann/ops-transformer c29bc10) cannot do of a quantized dispatch: a ``MoEInputError``.
    MC2 quantizes its bf16/fp16 ``x`` itself, to int8 with one scale per token (``quant_mode`` 2)."""
    spec = scales.quantize
    if spec is None:  # moe_distribute_dispatch_v2_tiling.cpp, CheckTensorDataType: x is bf16 or fp16
        raise MoEInputError(
            "backend 'mc2' takes no pre-quantized x with x_scales: MC2 quantizes bf16/fp16 x itself "
            "(its 'scales' input is smooth-quant factors [E, H], not per-token scales); pass quant='int8', quant_block=0"
        )
    if spec.mode != "int8":  # the same file, CheckAndSetExpertInfo: quantMode 0 (none) or 2 (dynamic int8) only
        raise MoEInputError(f"backend 'mc2' quantizes to int8 only (MC2 quant_mode 2), got quant={spec.mode!r}")
    if spec.block != 0:  # dynamic_scales is [A]: aclnnMoeDistributeDispatchV2.md; op-plugin's get_dispatch_dynamic_shape
        raise MoEInputError(f"backend 'mc2' has one scale per token (MC2's dynamic_scales [A]): quant_block must be 0, got {spec.block}")
    if spec.round_scale:  # the scale is 1 / (127 / amax): moe_distribute_dispatch_v2.h, QuantProcess
        raise MoEInputError("backend 'mc2' cannot round scales to powers of two (MC2's scale is 1 / (127 / max|x|)): round_scale must be False")


def _wire_dtype(rows: Tensor) -> torch.dtype:
    """The dtype ``rows`` travel in: their own; rows of no columns (the router's gradient after a quantized
    dispatch, moe_ops/ops.py) carry only weight-gradient pairs, in bf16 (float32's range)."""
    return rows.dtype if rows.shape[-1] else torch.bfloat16


class Mc2Backend(Backend):
    """Quantized dispatch (``quant="int8", quant_block=0``): MC2's ``quant_mode`` 2 int8 rows and its
    ``dynamic_scales`` as ``recv_x`` / ``recv_scales [rows, 1]``, in MC2's own arithmetic (docs/backends.md)."""

    name = "mc2"
    layouts = frozenset({"padded", "bounded"})
    multi_rank = True
    quantized = True
    quant_mode: ClassVar[int] = 0  #: MC2's quant_mode for a forward dispatch of moe.dispatch

    @property
    def device_types(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"npu"}) | libraries.simulated_device_types("torch_npu")

    def _wire(self, hidden: int, top_k: int, plan: DispatchPlan) -> Wire:
        """The row format of a forward dispatch: int8 rows for ``mc2_int8`` and quantized dispatches."""
        return Wire(hidden, top_k, quantized=self.quant_mode == 2 or plan.scales is not None)

    def check_dispatch(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan) -> None:
        if plan.scales is not None:
            _check_quantized(plan.scales)
        call = _Call.of(plan.comm, plan.num_experts, topk_idx.shape[1], plan.token_bound)
        _raise(call.check(self._wire(x.shape[1], topk_idx.shape[1], plan).width, x.dtype, "dispatch"))
        if topk_weights.dtype != torch.float32 or x.shape[1] == 0:
            raise MoEInputError("backend 'mc2' needs float32 topk_weights and a hidden size of at least 1")

    def check_rows(self, name: str, rows: Tensor, handle: list[Tensor], comm: Comm) -> None:
        call = _Call.from_handle(comm, handle)
        op = {"expert_out": "combine", "grad_recv_x": "dispatch backward", "grad_out": "combine backward"}[name]
        if name == "grad_out":  # combine's backward is a dispatch of grad_out, in its own row format
            _raise(call.check(Wire(rows.shape[-1], call.top_k).width, rows.dtype, op))
            return
        # combine and dispatch's backward send rows back as wide as the dispatch's (one H per pair)
        columns, width = rows.shape[-1] + (2 * call.top_k if name == "grad_recv_x" else 0), _wire_width(handle)
        if columns > width:
            raise MoEInputError(
                f"backend 'mc2': {op} sends {columns} columns per row, but its dispatch's rows were {width} wide "
                "(a combine moves rows of its dispatch's width): the hidden size may not grow between dispatch and combine"
            )
        _raise(call.check(width, _wire_dtype(rows) if name == "grad_recv_x" else rows.dtype, op))

    def dispatch(
        self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan, peers: Peers, x_scales: Tensor | None = None
    ) -> DispatchOutputs:
        top_k = topk_idx.shape[1]
        call = _Call.of(plan.comm, plan.num_experts, top_k, plan.token_bound)
        wire, quantized = self._wire(x.shape[1], top_k, plan), plan.scales is not None
        ids = route_ids(topk_idx, plan.num_experts)
        num_local = plan.num_local_experts
        if call.max_tokens == 0:
            return _nothing_sent(call, x, topk_weights, ids, plan.rows, wire, quantized)
        received, ends, mc2_handle = call.dispatch(wire, x, ids, topk_weights)
        placed = place(received, ends, plan.comm.rank, num_local, plan.rows)
        route_weights = received.weights.gather(1, placed.row_k.clamp(min=0).unsqueeze(1)).squeeze(1)
        handle = [ids, placed.slot_row, placed.row_slot, placed.row_k, *mc2_handle, ids.new_empty(0, wire.width),
                  _layout_tensor(ids, num_local, plan.rows)]
        tokens = received.tokens
        if wire.quantized and not quantized:  # mc2_int8: moe.dispatch returns rows in the token dtype
            tokens = quant.dequantize(tokens, received.scales, 0, x.dtype)
        return DispatchOutputs(
            take(tokens, placed.slot_row),
            take(route_weights, placed.slot_row),
            placed.tokens_per_expert,
            placed.dropped,
            handle,
            take(received.scales, placed.slot_row) if quantized else None,
        )

    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool) -> Tensor:
        call = _Call.from_handle(comm, handle)
        ids, _, row_slot, _, *mc2_handle, wire, _ = handle
        if call.max_tokens == 0:
            return expert_out.new_zeros(ids.shape[0], expert_out.shape[-1])
        rows = stage.reduce(expert_out.flatten(0, -2), row_slot.unsqueeze(1), recv_weights.flatten())
        return call.combine(rows, ids, mc2_handle, wire.shape[1])

    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool
    ) -> tuple[Tensor, Tensor]:
        call = _Call.from_handle(comm, handle)
        hidden, top_k = grad_recv_x.shape[-1], call.top_k
        ids, _, row_slot, row_k, *mc2_handle, wire, _ = handle
        if call.max_tokens == 0:
            return grad_recv_x.new_zeros(ids.shape[0], hidden), grad_recv_weights.new_zeros(ids.shape)
        # Each row: its gradient, then its weight gradient as a hi + lo pair in columns k and K + k
        # (0 for rows holding no kept route), so that the sum over a token's rows lays them side by side.
        grad_w = stage.gather_routes(grad_recv_weights.flatten(), row_slot.unsqueeze(1)).float()
        hi = grad_w.to(_wire_dtype(grad_recv_x))
        lo = (grad_w - hi.float()).to(hi.dtype)
        k = row_k.clamp(min=0).unsqueeze(1)
        weight_columns = hi.new_zeros(row_k.shape[0], 2 * top_k).scatter_(1, k, hi).scatter_(1, k + top_k, lo)
        rows = torch.cat([stage.reduce(grad_recv_x.flatten(0, -2), row_slot.unsqueeze(1), None).to(hi.dtype), weight_columns], 1)
        out = call.combine(rows, ids, mc2_handle, wire.shape[1])
        grad_weights = out[:, hidden : hidden + top_k].float() + out[:, hidden + top_k :].float()
        return out[:, :hidden].contiguous().to(grad_recv_x.dtype), grad_weights.to(grad_recv_weights.dtype)

    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        call = _Call.from_handle(comm, handle)
        ids = handle[0]
        if call.max_tokens == 0:
            return torch.zeros_like(expert_out), torch.zeros_like(recv_weights)
        received, ends, _ = call.dispatch(Wire(grad_out.shape[1], call.top_k), grad_out, ids, None)
        placed = place(received, ends, comm.rank, call.num_local, _row_layout(handle))
        return stage.expand_grad(received.tokens, expert_out, recv_weights, placed.row_slot.unsqueeze(1), placed.slot_row)

    def handle_len(self, kind: Kind) -> int:
        return 10

    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        num_tokens, top_k = topk_idx.shape
        call = _Call.of(plan.comm, plan.num_experts, top_k, plan.token_bound)
        return [
            int64_like(topk_idx, topk_idx.shape),
            int64_like(topk_idx, rows_shape),
            int64_like(topk_idx, (call.rows,)),
            int64_like(topk_idx, (call.rows,)),
            *(topk_idx.new_empty(s, dtype=torch.int32) for s in call.handle_shapes(num_tokens)),
            int64_like(topk_idx, (0, self._wire(x.shape[1], top_k, plan).width)),
            int64_like(topk_idx, (0, plan.num_local_experts, plan.rows.pad_multiple)),
        ]


class Mc2Int8Backend(Mc2Backend):
    """``mc2`` with int8 dynamic quantization of the dispatched rows (MC2 ``quant_mode`` 2), dequantized on
    receipt: ``moe.dispatch``'s rows in the token dtype (``moe.dispatch_quantized`` is ``mc2``'s)."""

    name = "mc2_int8"
    quantized = False
    quant_mode = 2


def _raise(error: MoEInputError | None) -> None:
    if error is not None:
        raise error
