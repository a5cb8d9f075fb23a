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

Handle: ``[own_slot [T, K], row_src [L, C], route_row [W*Tmax, K]]``; ``own_slot`` is this rank's slot
``rank*Tmax + t`` for each valid route (the source map the ops read ``T`` and ``K`` from).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ops import routing, stage
from moe_ops.backends.base import Backend, DispatchOutputs, Peers, int64_like
from moe_ops.comm import Comm, all_gather, all_gather_padded, reduce_scatter
from moe_ops.indexing import pad_rows
from moe_ops.plan import DispatchPlan, Kind


class AllGatherBackend(Backend):
    name = "allgather"
    device_types = frozenset({"cpu", "cuda", "npu"})
    layouts = frozenset({"padded", "bounded"})
    multi_rank = True
    quantized = True

    def dispatch(
        self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan, peers: Peers, x_scales: Tensor | None = None
    ) -> DispatchOutputs:
        comm, bound = plan.comm, plan.token_bound
        x, x_scales = stage.rows_to_send(x, x_scales, plan.scales)
        fields = [(x, 0), (topk_idx.long(), -1), (topk_weights, 0)]
        if x_scales is not None:  # scales packed beside the rows, in the same all-gather
            fields.append((x_scales, 0))
        tokens, ids, weights, *scales = all_gather_padded(comm, "moe.dispatch all_gather", fields, bound)
        local_ids = routing.local_expert_ids(ids, plan.num_experts, comm.world_size, comm.rank)
        out = stage.dispatch_rows(tokens, weights, local_ids, plan.num_local_experts, plan.rows, scales=scales[0] if scales else None)
        slot = comm.rank * bound + torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        own_slot = torch.where(routing.destination_ranks(topk_idx, plan.num_experts, comm.world_size) >= 0, slot, -1)
        return DispatchOutputs(
            out.recv_x, out.recv_weights, out.tokens_per_expert, out.dropped, [own_slot, out.row_src, out.route_row], out.recv_scales
        )

    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool) -> Tensor:
        own_slot, _, route_row = handle
        partial = stage.reduce(expert_out.flatten(0, -2), route_row, recv_weights.reshape(-1))
        summed = reduce_scatter(comm, "moe.combine reduce_scatter", partial.float())
        return summed[: own_slot.shape[0]].to(expert_out.dtype)

    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool
    ) -> tuple[Tensor, Tensor]:
        own_slot, _, route_row = handle
        grad_tokens, grad_weights = stage.dispatch_grad(grad_recv_x.flatten(0, -2), grad_recv_weights.reshape(-1), route_row)
        hidden = grad_tokens.shape[1]
        summed = reduce_scatter(comm, "moe.dispatch_backward reduce_scatter", torch.cat([grad_tokens.float(), grad_weights.float()], 1))
        mine = summed[: own_slot.shape[0]]
        return mine[:, :hidden].to(grad_recv_x.dtype, copy=True), mine[:, hidden:].to(grad_recv_weights.dtype, copy=True)

    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        _, row_src, route_row = handle
        bound = route_row.shape[0] // comm.world_size
        grad_tokens = all_gather(comm, "moe.combine_backward all_gather", pad_rows(grad_out, bound, 0))
        return stage.expand_grad(grad_tokens, expert_out, recv_weights, route_row, row_src)

    def handle_len(self, kind: Kind) -> int:
        return 3

    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        return [
            int64_like(topk_idx, topk_idx.shape),
            int64_like(topk_idx, rows_shape),
            int64_like(topk_idx, (plan.comm.world_size * plan.token_bound, topk_idx.shape[1])),
        ]
