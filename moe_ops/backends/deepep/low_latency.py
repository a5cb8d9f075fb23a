"""The ``deepep_ll`` backend: DeepEP's low-latency kernels for the padded layout (decode).

DeepEP's low-latency dispatch sends one bf16 row per (token, expert) route and returns, per local
expert, ``recv_x [L, W*Tmax, H]`` with ``recv_count`` valid rows. Those rows come in arrival order:
one block per source rank (``layout_range[e, j]`` packs the block's start ``<< 32`` and its length),
blocks and rows in no fixed order, the source token of each row in ``src_info``. Router weights do not
travel. Our contract wants (source rank, token, k) order inside each expert, the first ``C`` rows kept
and the rest dropped and counted, and ``recv_weights``. So the backend

1. moves the tokens with ``Buffer.low_latency_dispatch`` and puts each received row in the slot
   ``j * Tmax + t`` of its source (rank ``j``, token ``t``), read from ``layout_range`` and ``src_info``;
2. all-gathers every rank's ``[Tmax, K]`` expert ids (int32) and weights (8 bytes per route, over
   torch.distributed on the same group), and lays the slots out with the shared local stage
   (:func:`moe_ops.stage.dispatch_rows`), as the ``collective`` backend's padded path does.

Quantized dispatch: DeepEP casts bf16 ``x`` to FP8 in its kernel (``use_fp8``, ``round_scale``: its
arithmetic is :mod:`moe_ops.quant`'s, bit for bit); the scales go to slots as the rows do.

Combine: each low-latency row gets the weighted sum of its token's kept rows at that expert (float32
accumulation, rounded once to bf16; dropped routes add 0), and ``Buffer.low_latency_combine`` sums
them on the source rank with weight 1 for the first occurrence of each expert in a token's row (a
repeated id's rows are already in that sum). Dispatch backward: the same with the gradient rows, plus an
all-to-all of the route-weight gradients back to their sources. Combine backward: a new
low-latency dispatch of ``grad_out``, mapped to slots the same way.

Handle: ``[ids [T, K] int64, row_src [L, C] int64, route_row [W*Tmax, K] int64, src_info [L, W*Tmax]
int32, layout_range [L, W] int64, hidden [0, H] int64]``; the last holds no data, its shape records
the ``hidden`` that DeepEP's own handle keeps as a Python int (``Tmax`` and ``E`` follow from the shapes).
No size depends on data and nothing is read back to the host.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops import routing, stage
from moe_ops.backends.base import DispatchOutputs, Peers, int64_like
from moe_ops.backends.deepep import runtime
from moe_ops.comm import Comm, all_gather_padded, collective
from moe_ops.errors import MoEInputError
from moe_ops.plan import DispatchPlan, Kind

_BLOCK_BITS = 32  # layout_range[e, j] = start << 32 | length


def _slots(src_info: Tensor, layout_range: Tensor, max_tokens: int) -> Tensor:
    """``[L, W*Tmax]`` int64: the source slot ``j * Tmax + t`` of each low-latency row, -1 where unused."""
    start = (layout_range >> _BLOCK_BITS).unsqueeze(-1)  # [L, W, 1]
    length = (layout_range & ((1 << _BLOCK_BITS) - 1)).unsqueeze(-1)
    position = torch.arange(src_info.shape[1], device=src_info.device)
    inside = (position >= start) & (position < start + length)  # [L, W, W*Tmax]: row p is in rank j's block
    source = inside.int().argmax(dim=1)
    return torch.where(inside.any(dim=1), source * max_tokens + src_info.long(), -1)


def _tokens_by_slot(recv_x: Tensor, slots: Tensor) -> Tensor:
    """``[W*Tmax, H]``: the token of each source slot, copied out of DeepEP's ``recv_x [L, W*Tmax, H]``
    (any dtype, or its FP8 scales ``[L, W*Tmax, H/128]``, strided; rows of slots nobody sent here are left
    unwritten; the layout never reads them)."""
    num_slots, hidden = slots.shape[1], recv_x.shape[-1]
    tokens = recv_x.new_empty(num_slots + 1, hidden)  # the last row takes the unused rows
    flat = slots.reshape(-1)
    bytes_of = (lambda t: t.view(torch.uint8)) if recv_x.element_size() == 1 else (lambda t: t)  # index_copy_ has no float8 kernel
    bytes_of(tokens).index_copy_(0, torch.where(flat >= 0, flat, num_slots), bytes_of(recv_x.reshape(-1, hidden)))
    return tokens[:num_slots]


def _low_latency_dispatch(
    buffer: Any, x: Tensor, ids: Tensor, max_tokens: int, num_experts: int, fp8: bool = False, round_scale: bool = False
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``Buffer.low_latency_dispatch`` of bf16 ``x`` (``fp8``: cast by DeepEP, float32 scales, powers of two
    with ``round_scale``): ``(tokens by source slot [W*Tmax, H], their scales [W*Tmax, H/128] or None,
    src_info, layout_range)``."""
    recv_x, _, (src_info, layout_range, *_), _, _ = buffer.low_latency_dispatch(
        x, ids, max_tokens, num_experts, use_fp8=fp8, round_scale=round_scale, use_ue8m0=False
    )
    slots = _slots(src_info, layout_range, max_tokens)
    if not fp8:
        return _tokens_by_slot(recv_x, slots), None, src_info, layout_range
    recv_x, recv_scales = recv_x
    return _tokens_by_slot(recv_x, slots), _tokens_by_slot(recv_scales, slots), src_info, layout_range


def _all_routes(comm: Comm, ids: Tensor, weights: Tensor, max_tokens: int) -> tuple[Tensor, Tensor]:
    """Every rank's expert ids and weights, ``[W*Tmax, K]`` each (row ``j * Tmax + t``; -1 and 0 past a
    rank's ``T``), through one all-gather of 8 bytes per route."""
    fields = [(ids.int(), -1), (weights.float(), 0)]
    all_ids, all_weights = all_gather_padded(comm, "moe.dispatch routes all_gather", fields, max_tokens)
    return all_ids.long(), all_weights


def _return_routes(comm: Comm, values: Tensor, num_tokens: int) -> Tensor:
    """Per-route values of the slots ``[W*Tmax, K]`` (0 where the route is elsewhere) summed back on
    their source rank: ``[T, K]``."""
    received = torch.empty_like(values)
    collective("moe.dispatch_backward routes all_to_all", comm, dist.all_to_all_single, received, values)
    return received.view(comm.world_size, -1, values.shape[1]).sum(dim=0)[:num_tokens]


def _row_routes(slots: Tensor, route_row: Tensor, capacity: int) -> Tensor:
    """``[L*W*Tmax, K]``: for each low-latency row, the layout rows of its token's routes kept at that
    row's expert (-1 elsewhere): what the row carries back in combine."""
    routes = torch.where(slots.unsqueeze(-1) >= 0, route_row[slots.clamp(min=0)], -1)  # [L, W*Tmax, K]
    expert = torch.arange(slots.shape[0], device=slots.device).view(-1, 1, 1)
    return torch.where(routes // max(capacity, 1) == expert, routes, -1).flatten(0, 1)


def _first_routes(ids: Tensor) -> Tensor:
    """``[T, K]`` float32 combine weights: 1 at the first occurrence of each expert in a row, else 0."""
    return routing.first_occurrence(ids).float()


class _Handle:
    """Our handle, unpacked, with DeepEP's handle tuple rebuilt from it."""

    def __init__(self, handle: list[Tensor], world_size: int) -> None:
        self.ids, self.row_src, self.route_row, self.src_info, self.layout_range, hidden = handle
        self.hidden = hidden.shape[1]
        num_local, self.capacity = self.row_src.shape
        self.max_tokens = self.route_row.shape[0] // world_size
        self.num_experts = num_local * world_size

    def deepep(self) -> tuple[Tensor, Tensor, int, int, int]:
        return self.src_info, self.layout_range, self.max_tokens, self.hidden, self.num_experts

    def row_routes(self) -> Tensor:
        return _row_routes(_slots(self.src_info, self.layout_range, self.max_tokens), self.route_row, self.capacity)


class DeepEPLowLatencyBackend(runtime.DeepEPBase):
    name = "deepep_ll"
    mode = "low_latency"
    layouts = frozenset({"padded"})
    quantized = True  #: bf16 x cast by DeepEP's kernel: quant="fp8_e4m3", block 128 (runtime.check_quantized)

    def dispatch(
        self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan, peers: Peers, x_scales: Tensor | None = None
    ) -> DispatchOutputs:
        comm, max_tokens, num_experts = plan.comm, plan.token_bound, plan.num_experts
        buffer = runtime.low_latency_buffer(comm, max_tokens, x.shape[1], num_experts)
        ids = routing.masked_ids(topk_idx, num_experts)
        spec = None if plan.scales is None else plan.scales.quantize
        tokens, scales, src_info, layout_range = _low_latency_dispatch(
            buffer, x, ids, max_tokens, num_experts, spec is not None, spec is not None and spec.round_scale
        )
        all_ids, all_weights = _all_routes(comm, ids, topk_weights, max_tokens)
        local_ids = routing.local_expert_ids(all_ids, num_experts, comm.world_size, comm.rank)
        out = stage.dispatch_rows(tokens, all_weights, local_ids, plan.num_local_experts, plan.rows, scales=scales)
        hidden = x.new_empty((0, x.shape[1]), dtype=torch.int64)
        handle = [ids, out.row_src, out.route_row, src_info, layout_range, hidden]
        return DispatchOutputs(out.recv_x, out.recv_weights, out.tokens_per_expert, out.dropped, handle, out.recv_scales)

    def check_rows(self, name: str, rows: Tensor, handle: list[Tensor], comm: Comm) -> None:
        super().check_rows(name, rows, handle, comm)
        if name == "grad_recv_x" and rows.shape[-1] == 0:  # the router's gradient alone: no rows move, no buffer
            return
        h = _Handle(handle, comm.world_size)
        if name != "grad_out" and rows.shape[-1] != h.hidden:
            raise MoEInputError(
                f"{name} has hidden size {rows.shape[-1]}, but DeepEP's low-latency combine returns the "
                f"dispatched hidden size {h.hidden}"
            )
        runtime.check_buffer(comm, runtime.Sizing(low_latency=(h.max_tokens, h.hidden, h.num_experts)))

    def _combine_rows(self, rows: Tensor, weights: Tensor | None, h: _Handle, comm: Comm) -> Tensor:
        """``Buffer.low_latency_combine`` of the layout ``rows`` (``[L, C, H]``, scaled by ``weights``)."""
        buffer = runtime.low_latency_buffer(comm, h.max_tokens, h.hidden, h.num_experts)
        flat_weights = None if weights is None else weights.reshape(-1)
        sent = stage.reduce(rows.flatten(0, -2), h.row_routes(), flat_weights)
        num_local = h.row_src.shape[0]
        out, _, _ = buffer.low_latency_combine(sent.view(num_local, -1, h.hidden), h.ids, _first_routes(h.ids), h.deepep())
        return out

    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool) -> Tensor:
        return self._combine_rows(expert_out, recv_weights, _Handle(handle, comm.world_size), comm)

    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool
    ) -> tuple[Tensor, Tensor]:
        h = _Handle(handle, comm.world_size)
        if grad_recv_x.shape[-1] == 0:  # moe.dispatch_quantized's backward: the router's gradient alone, no rows to move
            grad_x = grad_recv_x.new_empty(h.ids.shape[0], 0)
        else:
            grad_x = self._combine_rows(grad_recv_x, None, h, comm)
        grad_routes = stage.gather_routes(grad_recv_weights.reshape(-1), h.route_row)
        return grad_x, _return_routes(comm, grad_routes, h.ids.shape[0])

    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        h = _Handle(handle, comm.world_size)
        buffer = runtime.low_latency_buffer(comm, h.max_tokens, h.hidden, h.num_experts)
        grad_tokens, *_ = _low_latency_dispatch(buffer, grad_out, h.ids, h.max_tokens, h.num_experts)
        return stage.expand_grad(grad_tokens, expert_out, recv_weights, h.route_row, h.row_src)

    def handle_len(self, kind: Kind) -> int:
        return 6

    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        world, top_k = plan.comm.world_size, topk_idx.shape[1]
        slots = world * plan.token_bound
        return [
            int64_like(topk_idx, topk_idx.shape),
            int64_like(topk_idx, rows_shape),
            int64_like(topk_idx, (slots, top_k)),
            topk_idx.new_empty((plan.num_local_experts, slots), dtype=torch.int32),
            int64_like(topk_idx, (plan.num_local_experts, world)),
            int64_like(topk_idx, (0, x.shape[1])),
        ]
