"""The ``local`` backend: world size 1, no communication; the expert layout is built on this rank.

Handle: ``[route_row [T, K], row_src [N] or [L, C]]`` (see :class:`moe_ops.stage.LocalDispatch`).
"""

from __future__ import annotations

from torch import Tensor

from moe_ops import stage
from moe_ops.backends.base import Backend, DispatchOutputs, Peers, int64_like
from moe_ops.comm import Comm
from moe_ops.plan import DispatchPlan, Kind


class LocalBackend(Backend):
    name = "local"
    device_types = frozenset({"cpu", "cuda", "npu"})
    layouts = frozenset({"ragged", "bounded", "padded"})
    multi_rank = False
    quantized = True

    def dispatch(
        self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan, peers: Peers, x_scales: Tensor | None = None
    ) -> DispatchOutputs:
        quantize = None if plan.scales is None else plan.scales.quantize
        out = stage.dispatch_rows(x, topk_weights, topk_idx, plan.num_local_experts, plan.rows, scales=x_scales, quantize=quantize)
        return DispatchOutputs(out.recv_x, out.recv_weights, out.tokens_per_expert, out.dropped, [out.route_row, out.row_src], out.recv_scales)

    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool) -> Tensor:
        route_row, _ = handle
        return stage.reduce(expert_out.flatten(0, -2), route_row, recv_weights.reshape(-1), packed=packed)

    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool
    ) -> tuple[Tensor, Tensor]:
        route_row, _ = handle
        return stage.dispatch_grad(grad_recv_x.flatten(0, -2), grad_recv_weights.reshape(-1), route_row, packed=packed)

    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        route_row, row_src = handle
        return stage.expand_grad(grad_out, expert_out, recv_weights, route_row, row_src)

    def handle_len(self, kind: Kind) -> int:
        return 2

    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        return [int64_like(topk_idx, topk_idx.shape), int64_like(topk_idx, rows_shape)]
