"""The ``allgather`` backend: Megatron-Core inference all-gather semantics, padded layout only.

Every rank all-gathers the EP group's tokens, expert ids and router weights (one all-gather of
packed rows), lays out the routes to its own experts, and after the experts reduce-scatters each
gathered token's partial sum back to its source rank. Ranks hold different token counts by padding
to the static bound ``Tmax = max_tokens_per_rank`` with masked (``-1``) rows — the "AllGather-V"
capability of Megatron's NVLS dispatcher, without NVLink multicast. Shapes are static and nothing is
read back to the host, so a decode step captures in a CUDA graph.

Traffic per rank and step: dispatch receives ``W * Tmax`` packed rows (``H*s + 4K + K*s_w`` bytes,
padded to 8) whatever the routing; combine reduce-scatters ``W * Tmax`` float32 rows of ``H'`` (the
sums are accumulated in float32 across ranks, so combine moves ``4*H'`` bytes per row, twice a bf16
all-to-all's). docs/backends.md compares it with the all-to-all of the ``collective`` backend.

Handle: ``[own_slot [T, K], route_row [W*Tmax, K], row_src [L, C]]``; ``own_slot`` is this rank's slot
``rank*Tmax + t`` for each valid route (the source map the ops read ``T`` and ``K`` from).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops import permute, routing, stage
from moe_ops.backends.base import Backend, DispatchOutputs, DispatchPlan, Layout, int64_like
from moe_ops.groups import Comm
from moe_ops.handshake import collective
from moe_ops.packing import gather_padded, gather_rows

# torch 2.13 renamed the single-tensor reduce-scatter; 2.11 and 2.12 have only the old name.
_reduce_scatter_sum = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _reduce_scatter(comm: Comm, what: str, rows: Tensor) -> Tensor:
    """``[R / W, ...]``: this rank's block of the sum over ranks of ``rows [R, ...]``."""
    out = rows.new_empty(rows.shape[0] // comm.world_size, *rows.shape[1:])
    collective(what, comm, _reduce_scatter_sum, out, rows.contiguous())
    return out


class AllGatherBackend(Backend):
    name = "allgather"
    device_types = frozenset({"cpu", "cuda", "npu"})
    layouts = frozenset({"padded"})
    multi_rank = True

    def dispatch(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan) -> DispatchOutputs:
        comm, bound = plan.comm, plan.max_tokens_per_rank
        num_tokens, top_k = topk_idx.shape
        if plan.handshake is not None:
            plan.handshake.exchange()
        fields = [(x, 0), (topk_idx.long(), -1), (topk_weights, 0)]
        tokens, ids, weights = gather_padded(comm, "moe.dispatch all_gather", fields, bound)
        local_ids = routing.local_expert_ids(ids, plan.num_experts, comm.world_size, comm.rank)
        out = stage.dispatch_rows(tokens, weights, local_ids, plan.num_local_experts, plan.capacity, None, plan.zero_padding)
        slot = comm.rank * bound + torch.arange(num_tokens, device=x.device).unsqueeze(1)
        own_slot = torch.where(routing.destination_ranks(topk_idx, plan.num_experts, comm.world_size) >= 0, slot, -1)
        handle = [own_slot, out.route_row, out.row_src]
        return DispatchOutputs(out.recv_x, out.recv_weights, out.tokens_per_expert, out.dropped, handle)

    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm) -> Tensor:
        own_slot, route_row, _ = handle
        partial = stage.reduce(expert_out.flatten(0, -2), route_row, recv_weights.reshape(-1))
        summed = _reduce_scatter(comm, "moe.combine reduce_scatter", partial.float())
        return summed[: own_slot.shape[0]].to(expert_out.dtype)

    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        own_slot, route_row, _ = handle
        grad_tokens = stage.reduce(grad_recv_x.flatten(0, -2), route_row, None).float()
        grad_weights = permute.gather_routes(grad_recv_weights.reshape(-1), route_row).float()
        hidden = grad_tokens.shape[1]
        summed = _reduce_scatter(comm, "moe.dispatch_backward reduce_scatter", torch.cat([grad_tokens, grad_weights], 1))
        mine = summed[: own_slot.shape[0]]
        return mine[:, :hidden].to(grad_recv_x.dtype, copy=True), mine[:, hidden:].to(grad_recv_weights.dtype, copy=True)

    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        own_slot, route_row, row_src = handle
        bound = route_row.shape[0] // comm.world_size
        grad_tokens = gather_rows(comm, "moe.combine_backward all_gather", permute.pad_rows(grad_out, bound, 0))
        return stage.expand_grad(grad_tokens, expert_out, recv_weights, route_row, row_src)

    def handle_len(self, layout: Layout) -> int:
        return 3

    def rows_shape(self, handle: list[Tensor]) -> tuple[int, ...]:
        return tuple(handle[2].shape)

    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        return [
            int64_like(topk_idx, topk_idx.shape),
            int64_like(topk_idx, (plan.comm.world_size * plan.max_tokens_per_rank, topk_idx.shape[1])),
            int64_like(topk_idx, rows_shape),
        ]
