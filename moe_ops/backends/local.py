"""The ``local`` backend: world size 1, no communication; the expert layout is built on this rank.

Handle: ``[route_row [T, K], row_src [N] or [L, C]]`` (see :class:`moe_ops.routing.ExpertLayout`).
"""

from __future__ import annotations

from torch import Tensor

from moe_ops import permute, routing
from moe_ops.backends.base import Backend, DispatchOutputs, DispatchPlan, Layout, int64_like
from moe_ops.groups import Comm


class LocalBackend(Backend):
    name = "local"
    device_types = frozenset({"cpu", "cuda", "npu"})
    layouts = frozenset({"ragged", "padded"})
    multi_rank = False

    def dispatch(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan) -> DispatchOutputs:
        local_ids = routing.local_expert_ids(topk_idx, plan.num_experts, 1, 0)
        layout = routing.expert_layout(local_ids, plan.num_local_experts, plan.capacity)
        recv_x, recv_weights = permute.expand(x, topk_weights, layout.row_src)
        return DispatchOutputs(
            recv_x, recv_weights, layout.tokens_per_expert, layout.dropped, [layout.route_row, layout.row_src]
        )

    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm) -> Tensor:
        route_row, _ = handle
        return permute.reduce(expert_out.flatten(0, -2), route_row, recv_weights.reshape(-1))

    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        route_row, _ = handle
        grad_x = permute.reduce(grad_recv_x.flatten(0, -2), route_row, None)
        return grad_x, permute.gather_routes(grad_recv_weights.reshape(-1), route_row)

    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        route_row, row_src = handle
        return permute.expand_grad(grad_out, expert_out, recv_weights, row_src, route_row.shape[1])

    def handle_len(self, layout: Layout) -> int:
        return 2

    def rows_shape(self, handle: list[Tensor]) -> tuple[int, ...]:
        return tuple(handle[1].shape)

    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        return [int64_like(topk_idx, topk_idx.shape), int64_like(topk_idx, rows_shape)]
