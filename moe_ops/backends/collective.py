"""The ``collective`` backend: expert parallelism over torch.distributed collectives — gloo on CPU,
NCCL on CUDA, HCCL on NPU; any group with ``all_gather`` and ``all_to_all_single``.

Traffic: a token goes to each destination rank once, however many of that rank's experts it uses,
as one packed row (its ``H`` values, its ``K`` local expert ids as int32 and its ``K`` router weights);
the expert rank expands it into its experts' rows. In combine the expert rank first reduces a token's
rows (weighted, float32 accumulation) and sends back one row per (token, destination rank), rounded
to the expert output's dtype. So per token and destination rank, dispatch moves
``H*s + 4K + K*s_w`` bytes (each field padded to 8 bytes) and combine moves ``H*s``; docs/backends.md
has the table.

Ragged layout: every rank's per-destination counts ride on the agreement (its :meth:`payload`: one
all-gather and one device-to-host read per dispatch), then one ``all_to_all_single`` with uneven splits
moves the packed rows. Combine and the backward passes reuse the split sizes kept (on the CPU) in the
handle: no sync.

Padded layout: the send buffer is ``[W, Tmax]`` slots (slot ``d*Tmax + t`` carries token ``t`` to rank
``d``) exchanged with equal splits; the receiver lays the routes out and drops beyond capacity. Shapes
are static and nothing is read back to the host, so it captures in CUDA graphs on NCCL.

Handle: ragged ``[send_slot [T, K], row_src [N], route_row [M, K], splits [2, W] (CPU)]``; padded
``[send_slot [T, K], row_src [L, C], route_row [W*Tmax, K]]``. ``send_slot`` is the send-buffer row of
each route's (token, destination); ``M`` counts the rows received.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ops import routing, slots, stage
from moe_ops.backends.base import Backend, DispatchOutputs, Peers, int64_like
from moe_ops.comm import Comm, all_to_all
from moe_ops.indexing import take, take_columns
from moe_ops.packing import RowFormat
from moe_ops.plan import DispatchPlan, Kind


def _splits(handle: list[Tensor]) -> tuple[list[int] | None, list[int] | None]:
    """(rows this rank sent per destination, rows it received per source), or ``(None, None)`` (padded)."""
    if len(handle) == 3:
        return None, None
    sent, received = handle[3].tolist()
    return sent, received


class CollectiveBackend(Backend):
    name = "collective"
    device_types = frozenset({"cpu", "cuda", "npu"})
    layouts = frozenset({"ragged", "bounded", "padded"})
    multi_rank = True
    quantized = True

    def payload(self, topk_idx: Tensor, plan: DispatchPlan) -> Tensor | None:
        """Ragged: how many (token, destination) rows and routes this rank sends each rank."""
        if plan.static:
            return None
        return slots.destination_counts(routing.destination_ranks(topk_idx, plan.num_experts, plan.comm.world_size), plan.comm.world_size)

    def dispatch(
        self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan, peers: Peers, x_scales: Tensor | None = None
    ) -> DispatchOutputs:
        comm, world = plan.comm, plan.comm.world_size
        top_k = topk_idx.shape[1]
        dest = routing.destination_ranks(topk_idx, plan.num_experts, world)
        if not plan.static:  # ragged: compact rows per destination, counts agreed by the ops
            assert peers is not None
            send_splits = peers[comm.rank][:world]
            recv_splits = [peers[s][comm.rank] for s in range(world)]
            num_routes: int | None = sum(peers[s][world + comm.rank] for s in range(world))
            num_slots = sum(send_splits)
            send_slot, slot_dest = slots.compact_slots(dest, world, num_slots)
            slot_token = slots.slot_tokens(send_slot, num_slots)
        else:  # padded, bounded: slot d*Tmax + t, equal splits, nothing read back to the host
            bound = plan.token_bound
            send_splits = recv_splits = num_routes = None
            send_slot = slots.send_slots(dest, bound)
            num_slots = world * bound
            slot_dest = torch.arange(num_slots, device=x.device) // bound
            slot_token = slots.bounded_slot_tokens(x.shape[0], world, bound, x.device)

        # Pack: one row per (token, destination) with the token, its local ids there, and their weights
        # (a quantized dispatch: the quantized token and its scales).
        x, x_scales = stage.rows_to_send(x, x_scales, plan.scales)
        fields = [(x.shape[1], x.dtype), (top_k, torch.int32), (top_k, topk_weights.dtype)]
        row_format = RowFormat(tuple(fields if x_scales is None else [*fields, (x_scales.shape[1], torch.float32)]))
        send = row_format.empty(num_slots, x.device)
        tokens, ids, weights, *scales = row_format.views(send)
        tokens.copy_(take(x, slot_token))
        if x_scales is not None:
            scales[0].copy_(take(x_scales, slot_token))
        mine = (take(dest, slot_token) == slot_dest.unsqueeze(1)) & (slot_token >= 0).unsqueeze(1)
        local = take(topk_idx.long(), slot_token) - slot_dest.unsqueeze(1) * plan.num_local_experts
        ids.copy_(torch.where(mine, local, -1))
        weights.copy_(torch.where(mine, take(topk_weights, slot_token), 0))

        received = all_to_all(comm, "moe.dispatch all_to_all", send, send_splits, recv_splits)
        tokens, ids, weights, *scales = row_format.views(received)
        out = stage.dispatch_rows(tokens, weights, ids, plan.num_local_experts, plan.rows, num_routes, scales[0] if scales else None)
        handle = [send_slot, out.row_src, out.route_row]
        if not plan.static:
            handle.append(torch.tensor([send_splits, recv_splits], dtype=torch.int64))
        return DispatchOutputs(out.recv_x, out.recv_weights, out.tokens_per_expert, out.dropped, handle, out.recv_scales)

    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool) -> Tensor:
        send_slot, _, route_row = handle[:3]
        sent, received = _splits(handle)
        partial = stage.reduce(expert_out.flatten(0, -2), route_row, recv_weights.reshape(-1), packed=packed)
        back = all_to_all(comm, "moe.combine all_to_all", partial, received, sent)
        return stage.reduce(back, send_slot, None, unique=True)

    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool
    ) -> tuple[Tensor, Tensor]:
        send_slot, _, route_row = handle[:3]
        sent, received = _splits(handle)
        top_k = send_slot.shape[1]
        row_format = RowFormat(((grad_recv_x.shape[-1], grad_recv_x.dtype), (top_k, grad_recv_weights.dtype)))
        rows = row_format.empty(route_row.shape[0], grad_recv_x.device)
        grad_tokens, grad_weights = row_format.views(rows)
        summed, picked = stage.dispatch_grad(grad_recv_x.flatten(0, -2), grad_recv_weights.reshape(-1), route_row, packed=packed)
        grad_tokens.copy_(summed)
        grad_weights.copy_(picked)
        back = all_to_all(comm, "moe.dispatch_backward all_to_all", rows, received, sent)
        grad_tokens, grad_weights = row_format.views(back)
        grad_x = stage.reduce(grad_tokens, send_slot, None, unique=True)
        return grad_x, take_columns(grad_weights, send_slot)

    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        send_slot, row_src, route_row = handle[:3]
        sent, received = _splits(handle)
        if sent is None:  # static: W * Tmax slots
            bound = route_row.shape[0] // comm.world_size
            slot_token = slots.bounded_slot_tokens(send_slot.shape[0], comm.world_size, bound, send_slot.device)
        else:
            slot_token = slots.slot_tokens(send_slot, sum(sent))
        rows = take(grad_out, slot_token)
        grad_tokens = all_to_all(comm, "moe.combine_backward all_to_all", rows, sent, received)
        return stage.expand_grad(grad_tokens, expert_out, recv_weights, route_row, row_src)

    def handle_len(self, kind: Kind) -> int:
        return 4 if kind == "ragged" else 3

    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        world, top_k = plan.comm.world_size, topk_idx.shape[1]
        received = world * plan.token_bound if plan.static else torch.library.get_ctx().new_dynamic_size()
        handle = [int64_like(topk_idx, topk_idx.shape), int64_like(topk_idx, rows_shape), int64_like(topk_idx, (received, top_k))]
        if not plan.static:
            handle.append(torch.empty(2, world, dtype=torch.int64))
        return handle
