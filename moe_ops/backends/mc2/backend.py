"""The ``mc2`` backend: expert parallelism on Ascend NPUs through torch_npu's fused MC2 ops,
``npu_moe_distribute_dispatch_v2`` / ``npu_moe_distribute_combine_v2`` (v1 ``npu_moe_distribute_dispatch``
/ ``combine`` with ``expand_idx`` where v2 is missing). Padded layout only; inference and training
(MC2 itself has no autograd: the backward passes are the same ops run the other way).

Marshalling (one call; ``W`` ranks, ``L`` local experts, ``Tmax = max_tokens_per_rank``):

* ``group_ep``: the HCCL communicator name of the group (``get_hccl_comm_name``); ``ep_world_size = W``,
  ``ep_rank_id`` = this rank, ``moe_expert_num = E``.
* v2: every rank sends ``BS = Tmax`` rows (its ``T`` tokens, then masked padding rows), so batches are
  equal, ``global_bs = 0``, and the 2-D ``x_active_mask [BS, K]`` masks padding rows, ``-1`` ids, ids
  outside ``[0, E)`` and repeats (the documentation allows a mask only when batches are equal).
  v1 has no mask (reserved): each rank sends its ``T`` rows (at least one), ``global_bs = Tmax * W``,
  and masked routes travel to unused experts and are discarded by the receiver.
* ``expert_ids``: the routes, masked slots filled with distinct unused experts (MC2 wants every id in
  ``[0, E)`` and no repeat in a row).
* ``expert_token_nums_type = 0``: cumulative counts, which say which local expert each row belongs to.
* ``quant_mode`` 0 (``"mc2"``) or 2, int8 per-token dynamic quantization of the dispatched rows
  (``"mc2_int8"``: ``recv_x`` is dequantized with ``dynamic_scales``, so it is close to, not equal to, ``x``).
* combine: ``expert_scales`` all ones (the contract applies ``recv_weights``, which may differ from the
  router's weights, on the expert rank before the rows go back) and the dispatch's opaque handle
  (``assist_info_for_combine`` or ``expand_idx``, ``ep_recv_counts`` as ``ep_send_counts``,
  ``tp_recv_counts`` as ``tp_send_counts``) passed through unread. ``expert_scales`` / ``expand_scales``
  of the dispatch are not used: the weights ride in the rows (:mod:`.wire`).

Every row carries its token's key, ids and weights, so the expert rank rebuilds the contract's
(source rank, token, k) order itself. Backward: dispatch's = a combine of the gradient rows (the
weight gradients ride in 2K extra columns, each a bf16/fp16 hi + lo pair); combine's = a dispatch of
the output gradient.

Limits (:mod:`.limits`): bf16/fp16 tokens, float32 weights, and the SoC's documented ranges of BS, H
(of the rows on the wire), K, E, W and HCCL_BUFFSIZE, checked before any call (at trace time too).

**Tested against a CPU simulator of the documented op behaviour** (:mod:`moe_ops.testing.sim.torch_npu`,
put in torch_npu's place through :mod:`moe_ops.libraries`), not on Ascend hardware; docs/backends.md
lists what the simulator models and what it does not.

Handle: ``[ids [T, K], slot_row [L, C], row_slot [A], row_k [A], assist_info (or expand_idx),
ep_recv_counts, tp_recv_counts]``; ``A = Tmax * W * min(L, K)`` rows of ``expand_x``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops import libraries, stage
from moe_ops.backends.base import Backend, DispatchOutputs, Peers, int64_like
from moe_ops.backends.mc2.limits import TABLE, Limits, Shape, soc_of
from moe_ops.backends.mc2.wire import (
    WIDTH_MULTIPLE,
    Received,
    Wire,
    place,
    route_ids,
    sent_ids,
)
from moe_ops.comm import Comm, library_call
from moe_ops.errors import MoEInputError
from moe_ops.indexing import pad_rows, take
from moe_ops.packing import round_up
from moe_ops.plan import DispatchPlan, Kind

_TOKEN_DTYPES = (torch.bfloat16, torch.float16)


def _torch_npu() -> ModuleType:
    """torch_npu (or its simulator in tests), loaded on first use: ``import moe_ops`` never imports it."""
    return libraries.load("torch_npu")


def _group_ep(group: dist.ProcessGroup, rank: int) -> str:
    """MC2's ``group_ep``: the HCCL communicator name of ``group`` (the test simulator names its gloo groups)."""
    simulated = getattr(_torch_npu(), "simulated_comm_name", None)
    if simulated is not None:
        return simulated(group, rank)
    return group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)


def _limits(version: int) -> Limits:
    """The documented limits of op ``version`` on this SoC (the test simulator may relax them)."""
    npu = _torch_npu()
    simulated = getattr(npu, "simulated_limits", None)
    if simulated is not None:
        return simulated(version)
    return TABLE[(soc_of(npu.npu.get_device_name()), version)]


@dataclass(frozen=True)
class _Call:
    """The MC2 view of one op call: the group, the routing sizes and the op version."""

    comm: Comm
    num_experts: int
    top_k: int
    max_tokens: int  #: Tmax, agreed by every rank
    version: int  #: 2: dispatch_v2 / combine_v2; 1: dispatch / combine

    @classmethod
    def of(cls, comm: Comm, num_experts: int, top_k: int, max_tokens: int) -> _Call:
        version = 2 if hasattr(_torch_npu(), "npu_moe_distribute_dispatch_v2") else 1
        return cls(comm, num_experts, top_k, max_tokens, version)

    @classmethod
    def from_handle(cls, comm: Comm, handle: list[Tensor]) -> _Call:
        """The call that made ``handle`` (``Tmax`` from the ``A = Tmax W min(L, K)`` rows it recorded)."""
        top_k, num_local, rows = handle[0].shape[1], handle[1].shape[0], handle[2].shape[0]
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
        return _limits(self.version).check(shape, what)

    def _common(self, num_tokens: int, ids: Tensor) -> dict[str, object]:
        """The arguments dispatch and combine share, for a rank with ``num_tokens`` routes ``ids``."""
        assert self.comm.group is not None
        routes = pad_rows(ids, self.batch(num_tokens), -1)
        kwargs: dict[str, object] = dict(
            expert_ids=sent_ids(routes, self.num_experts),
            group_ep=_group_ep(self.comm.group, self.comm.rank),
            ep_world_size=self.comm.world_size,
            ep_rank_id=self.comm.rank,
            moe_expert_num=self.num_experts,
            global_bs=0 if self.version == 2 else self.max_tokens * self.comm.world_size,
        )
        if self.version == 2:
            kwargs["x_active_mask"] = routes >= 0
        return kwargs

    def dispatch(self, wire: Wire, x: Tensor, ids: Tensor, weights: Tensor | None, quant_mode: int) -> tuple[Received, Tensor, list[Tensor]]:
        """Send this rank's tokens ``x [T, H]`` with routes ``ids [T, K]``: the decoded ``expand_x`` rows,
        ``expert_token_nums`` (cumulative) and the opaque handle."""
        ops, batch = _torch_npu(), self.batch(x.shape[0])
        keys = self.comm.rank * self.max_tokens + torch.arange(batch, device=x.device)  # batch <= Tmax
        rows = wire.encode(pad_rows(x, batch), keys, pad_rows(ids, batch, -1), None if weights is None else pad_rows(weights, batch))
        op = ops.npu_moe_distribute_dispatch_v2 if self.version == 2 else ops.npu_moe_distribute_dispatch
        expand_x, scales, assist, ends, ep_counts, tp_counts, _ = library_call(
            f"torch_npu.{op.__name__}", self.comm, op, x=rows, **self._common(x.shape[0], ids), quant_mode=quant_mode,
            expert_token_nums_type=0,
        )
        return wire.decode(expand_x, scales if quant_mode else None, x.dtype), ends, [assist, ep_counts, tp_counts]

    def combine(self, rows: Tensor, ids: Tensor, mc2_handle: list[Tensor]) -> Tensor:
        """Sum the ``expand_x``-ordered ``rows [A, H]`` back per source token: ``[T, H]`` (a view)."""
        num_tokens, ops = ids.shape[0], _torch_npu()
        assist, ep_counts, tp_counts = mc2_handle
        op, assist_name = (
            (ops.npu_moe_distribute_combine_v2, "assist_info_for_combine")
            if self.version == 2
            else (ops.npu_moe_distribute_combine, "expand_idx")
        )
        out = library_call(
            f"torch_npu.{op.__name__}", self.comm, op,
            expand_x=_pad_columns(rows, round_up(rows.shape[1], WIDTH_MULTIPLE)),
            ep_send_counts=ep_counts,
            tp_send_counts=tp_counts,
            expert_scales=torch.ones(self.batch(num_tokens), self.top_k, dtype=torch.float32, device=rows.device),
            **{assist_name: assist},
            **self._common(num_tokens, ids),
        )
        return out[:num_tokens, : rows.shape[1]]

    def handle_shapes(self, num_tokens: int) -> list[tuple[int, ...]]:
        """Shapes of MC2's handle tensors, as torch_npu's meta functions give them (no TP, no expert_scales)."""
        batch = self.batch(num_tokens)
        assist = (max(batch * self.top_k, self.rows * 128),) if self.version == 2 else (batch * self.top_k,)
        return [assist, (self.comm.world_size * self.num_local,), (0,)]


def _pad_columns(rows: Tensor, width: int) -> Tensor:
    return rows if rows.shape[1] == width else torch.cat([rows, rows.new_zeros(rows.shape[0], width - rows.shape[1])], 1)


def _nothing_sent(call: _Call, x: Tensor, weights: Tensor, ids: Tensor, capacity: int) -> DispatchOutputs:
    """Dispatch where no rank has a token (``Tmax = 0``): an empty layout, no MC2 call."""
    num_local = call.num_local
    handle = [ids, ids.new_full((num_local, capacity), -1), ids.new_empty(0), ids.new_empty(0)]
    handle += [x.new_zeros(shape, dtype=torch.int32) for shape in call.handle_shapes(ids.shape[0])]
    counts = x.new_zeros(num_local, dtype=torch.int32)
    return DispatchOutputs(x.new_zeros(num_local, capacity, x.shape[1]), weights.new_zeros(num_local, capacity), counts, counts.clone(), handle)


_WIDTHS = {  # columns MC2 moves for the rows of combine and the backward passes, hidden size H, top-k K
    "expert_out": lambda hidden, top_k: round_up(hidden, WIDTH_MULTIPLE),  # combine
    "grad_recv_x": lambda hidden, top_k: round_up(hidden + 2 * top_k, WIDTH_MULTIPLE),  # dispatch backward: + weight gradients
    "grad_out": lambda hidden, top_k: Wire(hidden, top_k).width,  # combine backward: a dispatch of grad_out
}


class Mc2Backend(Backend):
    name = "mc2"
    layouts = frozenset({"padded"})
    multi_rank = True
    quant_mode: ClassVar[int] = 0  #: MC2's quant_mode for the forward dispatch

    @property
    def device_types(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"npu"}) | libraries.simulated_device_types("torch_npu")

    def check_dispatch(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan) -> None:
        call = _Call.of(plan.comm, plan.num_experts, topk_idx.shape[1], plan.token_bound)
        _raise(call.check(Wire(x.shape[1], topk_idx.shape[1], quantized=self.quant_mode == 2).width, x.dtype, "dispatch"))
        if topk_weights.dtype != torch.float32 or x.shape[1] == 0:
            raise MoEInputError("backend 'mc2' needs float32 topk_weights and a hidden size of at least 1")

    def check_rows(self, name: str, rows: Tensor, handle: list[Tensor], comm: Comm) -> None:
        call = _Call.from_handle(comm, handle)
        op = {"expert_out": "combine", "grad_recv_x": "dispatch backward", "grad_out": "combine backward"}[name]
        _raise(call.check(_WIDTHS[name](rows.shape[-1], call.top_k), rows.dtype, op))

    def dispatch(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan, peers: Peers) -> DispatchOutputs:
        top_k = topk_idx.shape[1]
        call = _Call.of(plan.comm, plan.num_experts, top_k, plan.token_bound)
        wire = Wire(x.shape[1], top_k, quantized=self.quant_mode == 2)
        ids = route_ids(topk_idx, plan.num_experts)
        num_local, capacity = plan.num_local_experts, plan.capacity
        if call.max_tokens == 0:
            return _nothing_sent(call, x, topk_weights, ids, capacity)
        received, ends, mc2_handle = call.dispatch(wire, x, ids, topk_weights, self.quant_mode)
        placed = place(received, ends, plan.comm.rank, num_local, capacity)
        route_weights = received.weights.gather(1, placed.row_k.clamp(min=0).unsqueeze(1)).squeeze(1)
        handle = [ids, placed.slot_row, placed.row_slot, placed.row_k, *mc2_handle]
        return DispatchOutputs(
            take(received.tokens, placed.slot_row),
            take(route_weights, placed.slot_row),
            placed.tokens_per_expert,
            placed.dropped,
            handle,
        )

    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm) -> Tensor:
        call = _Call.from_handle(comm, handle)
        ids, _, row_slot, _, *mc2_handle = handle
        if call.max_tokens == 0:
            return expert_out.new_zeros(ids.shape[0], expert_out.shape[-1])
        rows = stage.reduce(expert_out.flatten(0, 1), row_slot.unsqueeze(1), recv_weights.flatten())
        return call.combine(rows, ids, mc2_handle).contiguous()

    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        call = _Call.from_handle(comm, handle)
        hidden, top_k = grad_recv_x.shape[-1], call.top_k
        ids, _, row_slot, row_k, *mc2_handle = handle
        if call.max_tokens == 0:
            return grad_recv_x.new_zeros(ids.shape[0], hidden), grad_recv_weights.new_zeros(ids.shape)
        # Each row: its gradient, then its weight gradient as a hi + lo pair in columns k and K + k
        # (0 for rows holding no kept route), so that the sum over a token's rows lays them side by side.
        grad_w = stage.gather_routes(grad_recv_weights.flatten(), row_slot.unsqueeze(1)).float()
        hi = grad_w.to(grad_recv_x.dtype)
        lo = (grad_w - hi.float()).to(hi.dtype)
        k = row_k.clamp(min=0).unsqueeze(1)
        weight_columns = hi.new_zeros(row_k.shape[0], 2 * top_k).scatter_(1, k, hi).scatter_(1, k + top_k, lo)
        rows = torch.cat([stage.reduce(grad_recv_x.flatten(0, 1), row_slot.unsqueeze(1), None), weight_columns], 1)
        out = call.combine(rows, ids, mc2_handle)
        grad_weights = out[:, hidden : hidden + top_k].float() + out[:, hidden + top_k :].float()
        return out[:, :hidden].contiguous(), grad_weights.to(grad_recv_weights.dtype)

    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        call = _Call.from_handle(comm, handle)
        ids, slot_row = handle[:2]
        if call.max_tokens == 0:
            return torch.zeros_like(expert_out), torch.zeros_like(recv_weights)
        received, ends, _ = call.dispatch(Wire(grad_out.shape[1], call.top_k), grad_out, ids, None, quant_mode=0)
        placed = place(received, ends, comm.rank, slot_row.shape[0], slot_row.shape[1])
        return stage.expand_grad(received.tokens, expert_out, recv_weights, placed.row_slot.unsqueeze(1), placed.slot_row)

    def handle_len(self, kind: Kind) -> int:
        return 7

    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        num_tokens, top_k = topk_idx.shape
        call = _Call.of(plan.comm, plan.num_experts, top_k, plan.token_bound)
        return [
            int64_like(topk_idx, topk_idx.shape),
            int64_like(topk_idx, rows_shape),
            int64_like(topk_idx, (call.rows,)),
            int64_like(topk_idx, (call.rows,)),
            *(topk_idx.new_empty(s, dtype=torch.int32) for s in call.handle_shapes(num_tokens)),
        ]


class Mc2Int8Backend(Mc2Backend):
    """``mc2`` with int8 dynamic quantization of the dispatched rows (MC2 ``quant_mode`` 2)."""

    name = "mc2_int8"
    quant_mode = 2


def _raise(error: MoEInputError | None) -> None:
    if error is not None:
        raise error
