"""The ``deepep`` backend: DeepEP's normal-mode (high-throughput, intranode NVLink) kernels.

Dispatch: ``Buffer.get_dispatch_layout`` then ``Buffer.dispatch``. DeepEP sends each token once to
every rank holding one of its experts and returns, per receiving rank, the tokens deduplicated in
(source rank, source token) order with their top-k ids made local (``-1`` for experts elsewhere) and
their weights. The shared local stage (:func:`moe_ops.stage.dispatch_rows`) lays those out
expert-major, exactly as the ``collective`` backend does after its all-to-all.

* Ragged layout: DeepEP waits on the host for the received counts (inside the op) and returns the
  per-expert counts as a Python list, whose sum is ``N``; the fake kernel returns unbacked sizes.
* Padded and bounded layouts (``max_recv_rows``): ``num_worst_tokens = W * max_tokens_per_rank`` sizes
  the receive buffers for the worst case, so DeepEP does not wait on the host (intranode only, as
  DeepEP's ``num_worst_tokens``); rows past the real count carry id -1 (DeepEP's intranode dispatch
  cleans them) and are never read.

Quantized dispatch: FP8 rows (``x`` pre-quantized, or quantized here by :func:`moe_ops.stage.quantize`)
go as DeepEP's ``(x, x_scales)`` tuple and come back with their scales ``[M, H/128]``; the local stage lays
both out (docs/backends.md).

Combine: the expert rank reduces each received token's rows (weights applied, float32 accumulation,
rounded once to ``expert_out.dtype``) and ``Buffer.combine`` sums those partial rows per source token.
Dispatch backward is ``Buffer.combine`` of the unweighted row sums with the rows' weight gradients as
DeepEP's ``topk_weights``; combine backward is a cached-handle ``Buffer.dispatch`` of ``grad_out``.

Handle: ``[ids [T, K] int64, row_src [N] or [L, C] int64, route_row [M, K] int64]`` followed by DeepEP's
six handle tensors ``rank_prefix_matrix [W, W]``, ``channel_prefix_matrix [W, S/2]``,
``recv_channel_prefix_matrix [W, S/2]``, ``recv_src_idx [M]`` (int32), ``is_token_in_rank [T, W]`` (bool),
``send_head [T, W]`` (int32), with ``M`` the received tokens (ragged, data-dependent) or
``num_worst_tokens`` (padded, bounded) and ``S`` :data:`moe_ops.config.deepep_num_sms`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from moe_ops import config, routing, stage
from moe_ops.backends.base import DispatchOutputs, Peers, int64_like
from moe_ops.backends.deepep import runtime
from moe_ops.comm import Comm
from moe_ops.plan import DispatchPlan, Kind

_OWN = 3  # handle tensors of ours before DeepEP's
_ONE_UNIT = 8  # bf16 columns in 16 bytes, the least row DeepEP's combine moves (csrc/deep_ep.cpp, Buffer::intranode_combine)


class _Received(NamedTuple):
    """What ``Buffer.dispatch`` delivered to this rank."""

    tokens: Tensor  #: [M, H] bf16, or float8_e4m3fn with ``scales``
    ids: Tensor  #: [M, K] int64 local expert ids, -1 elsewhere (and on rows past the count)
    weights: Tensor  #: [M, K] float32
    num_routes: int | None  #: routes received (ragged layout); None for the static kinds
    handle: list[Tensor]  #: DeepEP's handle tuple, as a list
    scales: Tensor | None = None  #: [M, H/128] float32: FP8 rows' scales


def _exchange(
    buffer: Any, dispatch_config: Any, x: Tensor, ids: Tensor, weights: Tensor, plan: DispatchPlan, x_scales: Tensor | None = None
) -> _Received:
    """DeepEP's normal dispatch of ``x`` by ``ids`` (global, -1 masked); FP8 ``x`` with its ``x_scales
    [T, H/128]`` float32 as DeepEP's ``(x, x_scales)`` tuple."""
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(ids, plan.num_experts)
    padded = plan.static
    tokens, recv_ids, recv_weights, counts, handle, _ = buffer.dispatch(
        x if x_scales is None else (x, x_scales),
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=ids,
        topk_weights=weights,
        num_worst_tokens=plan.comm.world_size * plan.token_bound if padded else 0,
        config=dispatch_config,
    )
    tokens, scales = (tokens, None) if x_scales is None else tokens
    return _Received(tokens, recv_ids, recv_weights, None if padded else sum(counts), list(handle), scales)


def _deepep_handle(handle: list[Tensor]) -> tuple[Tensor, ...]:
    """DeepEP's handle tuple from ours."""
    return tuple(handle[_OWN:])


class DeepEPBackend(runtime.DeepEPBase):
    name = "deepep"
    mode = "normal"
    layouts = frozenset({"ragged", "padded", "bounded"})
    quantized = True

    def check_rows(self, name: str, rows: Tensor, handle: list[Tensor], comm: Comm) -> None:
        super().check_rows(name, rows, handle, comm)
        runtime.check_buffer(comm, runtime.normal_sizing(rows.shape[-1]))

    def dispatch(
        self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan, peers: Peers, x_scales: Tensor | None = None
    ) -> DispatchOutputs:
        buffer, dispatch_config, _ = runtime.normal_buffer(plan.comm, x.shape[1])
        ids = routing.masked_ids(topk_idx, plan.num_experts)
        x, x_scales = stage.rows_to_send(x, x_scales, plan.scales)
        got = _exchange(buffer, dispatch_config, x, ids, topk_weights, plan, x_scales)
        out = stage.dispatch_rows(got.tokens, got.weights, got.ids, plan.num_local_experts, plan.rows, got.num_routes, got.scales)
        handle = [ids, out.row_src, out.route_row, *got.handle]
        return DispatchOutputs(out.recv_x, out.recv_weights, out.tokens_per_expert, out.dropped, handle, out.recv_scales)

    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool) -> Tensor:
        buffer, _, combine_config = runtime.normal_buffer(comm, expert_out.shape[-1])
        partial = stage.reduce(expert_out.flatten(0, -2), handle[2], recv_weights.reshape(-1))
        out, _, _ = buffer.combine(partial, handle=_deepep_handle(handle), config=combine_config)
        return out

    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool
    ) -> tuple[Tensor, Tensor]:
        route_row = handle[2]
        grad_tokens, grad_weights = stage.dispatch_grad(grad_recv_x.flatten(0, -2), grad_recv_weights.reshape(-1), route_row)
        router_only = grad_tokens.shape[-1] == 0  # moe.dispatch_quantized's backward: the router's gradient alone
        if router_only:  # DeepEP's combine moves rows of whole 16-byte units: one of zeros rides with the weights
            grad_tokens = grad_tokens.new_zeros(grad_tokens.shape[0], _ONE_UNIT, dtype=torch.bfloat16)
        buffer, _, combine_config = runtime.normal_buffer(comm, grad_tokens.shape[-1])
        grad_x, grad_topk_weights, _ = buffer.combine(
            grad_tokens, handle=_deepep_handle(handle), topk_weights=grad_weights, config=combine_config
        )
        return (grad_x.new_empty(grad_x.shape[0], 0, dtype=grad_recv_x.dtype) if router_only else grad_x), grad_topk_weights

    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        buffer, dispatch_config, _ = runtime.normal_buffer(comm, grad_out.shape[-1])
        grad_tokens, *_ = buffer.dispatch(grad_out, handle=_deepep_handle(handle), config=dispatch_config)
        return stage.expand_grad(grad_tokens, expert_out, recv_weights, handle[2], handle[1])

    def handle_len(self, kind: Kind) -> int:
        return _OWN + 6

    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        world, (num_tokens, top_k) = plan.comm.world_size, topk_idx.shape
        if not plan.static:
            received: int | torch.SymInt = torch.library.get_ctx().new_dynamic_size()
        else:
            received = world * plan.token_bound
        channels = config.deepep_num_sms // 2

        def int32(*shape: int | torch.SymInt) -> Tensor:
            return topk_idx.new_empty(shape, dtype=torch.int32)

        return [
            int64_like(topk_idx, topk_idx.shape),
            int64_like(topk_idx, rows_shape),
            int64_like(topk_idx, (received, top_k)),
            int32(world, world),
            int32(world, channels),
            int32(world, channels),
            int32(received),
            topk_idx.new_empty((num_tokens, world), dtype=torch.bool),
            int32(num_tokens, world),
        ]
