"""The ``collective`` backend: expert parallelism over torch.distributed collectives — gloo on CPU,
NCCL on CUDA, HCCL on NPU; any group with ``all_gather`` and ``all_to_all_single``.

Traffic: a token goes to each destination rank once, however many of that rank's experts it uses,
as one packed row (its ``H`` values, its ``K`` local expert ids as int32 and its ``K`` router weights);
the expert rank expands it into its experts' rows. In combine the expert rank first reduces a token's
rows (weighted, float32 accumulation) and sends back one row per (token, destination rank), rounded
to the expert output's dtype. So per token and destination rank, dispatch moves
``H*s + 4K + K*s_w`` bytes (each field padded to 8 bytes) and combine moves ``H*s``; docs/backends.md
has the table.

Ragged layout: every rank's per-destination counts ride on the handshake (one all-gather and one
device-to-host read per dispatch), then one ``all_to_all_single`` with uneven splits moves the packed
rows. Combine and the backward passes reuse the split sizes kept (on the CPU) in the handle: no sync.

Padded layout: the send buffer is ``[W, Tmax]`` slots (slot ``d*Tmax + t`` carries token ``t`` to rank
``d``) exchanged with equal splits; the receiver lays the routes out and drops beyond capacity. Shapes
are static and nothing is read back to the host, so it captures in CUDA graphs on NCCL.

Handle: ragged ``[send_slot [T, K], route_row [M, K], row_src [N], splits [2, W] (CPU)]``; padded
``[send_slot [T, K], route_row [W*Tmax, K], row_src [L, C]]``. ``send_slot`` is the send-buffer row of
each route's (token, destination); ``M`` counts the rows received.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops import permute, routing, stage
from moe_ops.backends.base import Backend, DispatchOutputs, DispatchPlan, Layout, int64_like
from moe_ops.groups import Comm
from moe_ops.handshake import collective
from moe_ops.packing import RowFormat


def _exchange(comm: Comm, what: str, rows: Tensor, send_splits: list[int] | None, recv_splits: list[int] | None) -> Tensor:
    """All-to-all of ``rows`` (first dim split by ``send_splits``; ``None``: equal splits)."""
    out_rows = rows.shape[0] if recv_splits is None else sum(recv_splits)
    out = rows.new_empty(out_rows, *rows.shape[1:])
    collective(what, comm, dist.all_to_all_single, out, rows.contiguous(), recv_splits, send_splits)
    return out


def _splits(handle: list[Tensor]) -> tuple[list[int] | None, list[int] | None]:
    """(rows this rank sent per destination, rows it received per source), or ``(None, None)`` (padded)."""
    if len(handle) == 3:
        return None, None
    sent, received = handle[3].tolist()
    return sent, received


def _slot_tokens(send_slot: Tensor, num_slots: int, padded_bound: int | None) -> Tensor:
    """``[S]``: the token each send row carries, -1 for unused rows."""
    if padded_bound is not None:
        t = torch.arange(num_slots, device=send_slot.device) % padded_bound
        return torch.where(t < send_slot.shape[0], t, -1)
    return routing.slot_tokens(send_slot, num_slots)


class CollectiveBackend(Backend):
    name = "collective"
    device_types = frozenset({"cpu", "cuda", "npu"})
    layouts = frozenset({"ragged", "padded"})
    multi_rank = True

    def dispatch(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan) -> DispatchOutputs:
        comm, world = plan.comm, plan.comm.world_size
        num_tokens, top_k = topk_idx.shape
        dest = routing.destination_ranks(topk_idx, plan.num_experts, world)
        if plan.capacity is None:  # ragged: compact rows per destination, counts agreed in the handshake
            first = routing.first_occurrence(dest)
            buckets = routing.bucketize(torch.where(first, dest, -1).reshape(-1), world)
            starts = torch.cumsum(buckets.counts, 0) - buckets.counts
            first_slot = starts[dest.clamp(min=0)] + buckets.position.view(num_tokens, top_k)
            same_dest = (dest.unsqueeze(2) == dest.unsqueeze(1)) & first.unsqueeze(1)
            send_slot = torch.where(dest >= 0, torch.where(same_dest, first_slot.unsqueeze(1), -1).amax(2), -1)
            routes = routing.routes_per_rank(dest, world)
            peers = plan.agree(torch.cat([buckets.counts, routes]))
            send_splits = peers[comm.rank][:world]
            recv_splits = [peers[s][comm.rank] for s in range(world)]
            num_rows: int | None = sum(peers[s][world + comm.rank] for s in range(world))
            num_slots, padded_bound = sum(send_splits), None
            slot_dest = dest.reshape(-1)[buckets.order[:num_slots]]
        else:  # padded: slot d*Tmax + t, equal splits, nothing read back to the host
            plan.agree(None)
            padded_bound = plan.max_tokens_per_rank
            send_splits = recv_splits = num_rows = None
            send_slot = routing.send_slots(dest, padded_bound)
            num_slots = world * padded_bound
            slot_dest = torch.arange(num_slots, device=x.device) // padded_bound
        slot_token = _slot_tokens(send_slot, num_slots, padded_bound)

        # Pack: one row per (token, destination) with the token, its local ids there, and their weights.
        row_format = RowFormat(((x.shape[1], x.dtype), (top_k, torch.int32), (top_k, topk_weights.dtype)))
        send = row_format.empty(num_slots, x.device)
        tokens, ids, weights = row_format.views(send)
        tokens.copy_(permute.take(x, slot_token))
        mine = (permute.take(dest, slot_token) == slot_dest.unsqueeze(1)) & (slot_token >= 0).unsqueeze(1)
        local = permute.take(topk_idx.long(), slot_token) - slot_dest.unsqueeze(1) * plan.num_local_experts
        ids.copy_(torch.where(mine, local, -1))
        weights.copy_(torch.where(mine, permute.take(topk_weights, slot_token), 0))

        received = _exchange(comm, "moe.dispatch all_to_all", send, send_splits, recv_splits)
        tokens, ids, weights = row_format.views(received)
        out = stage.dispatch_rows(tokens, weights, ids, plan.num_local_experts, plan.capacity, num_rows, plan.zero_padding)
        handle = [send_slot, out.route_row, out.row_src]
        if plan.capacity is None:
            handle.append(torch.tensor([send_splits, recv_splits], dtype=torch.int64))
        return DispatchOutputs(out.recv_x, out.recv_weights, out.tokens_per_expert, out.dropped, handle)

    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm) -> Tensor:
        send_slot, route_row, _ = handle[:3]
        sent, received = _splits(handle)
        partial = stage.reduce(expert_out.flatten(0, -2), route_row, recv_weights.reshape(-1), ragged=expert_out.dim() == 2)
        back = _exchange(comm, "moe.combine all_to_all", partial, received, sent)
        return stage.reduce(back, send_slot, None, unique=True)

    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        send_slot, route_row, _ = handle[:3]
        sent, received = _splits(handle)
        top_k = send_slot.shape[1]
        row_format = RowFormat(((grad_recv_x.shape[-1], grad_recv_x.dtype), (top_k, grad_recv_weights.dtype)))
        rows = row_format.empty(route_row.shape[0], grad_recv_x.device)
        grad_tokens, grad_weights = row_format.views(rows)
        grad_tokens.copy_(stage.reduce(grad_recv_x.flatten(0, -2), route_row, None, ragged=grad_recv_x.dim() == 2))
        grad_weights.copy_(permute.gather_routes(grad_recv_weights.reshape(-1), route_row))
        back = _exchange(comm, "moe.dispatch_backward all_to_all", rows, received, sent)
        grad_tokens, grad_weights = row_format.views(back)
        grad_x = stage.reduce(grad_tokens, send_slot, None, unique=True)
        return grad_x, permute.take_columns(grad_weights, send_slot)

    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        send_slot, route_row, row_src = handle[:3]
        sent, received = _splits(handle)
        if sent is None:
            num_slots, padded_bound = route_row.shape[0], route_row.shape[0] // comm.world_size
        else:
            num_slots, padded_bound = sum(sent), None
        rows = permute.take(grad_out, _slot_tokens(send_slot, num_slots, padded_bound))
        grad_tokens = _exchange(comm, "moe.combine_backward all_to_all", rows, sent, received)
        return stage.expand_grad(grad_tokens, expert_out, recv_weights, route_row, row_src)

    def handle_len(self, layout: Layout) -> int:
        return 4 if layout == "ragged" else 3

    def rows_shape(self, handle: list[Tensor]) -> tuple[int, ...]:
        return tuple(handle[2].shape)

    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        world, top_k = plan.comm.world_size, topk_idx.shape[1]
        if plan.capacity is None:
            received = torch.library.get_ctx().new_dynamic_size()
            return [
                int64_like(topk_idx, topk_idx.shape),
                int64_like(topk_idx, (received, top_k)),
                int64_like(topk_idx, rows_shape),
                torch.empty(2, world, dtype=torch.int64),
            ]
        return [
            int64_like(topk_idx, topk_idx.shape),
            int64_like(topk_idx, (world * plan.max_tokens_per_rank, top_k)),
            int64_like(topk_idx, rows_shape),
        ]
