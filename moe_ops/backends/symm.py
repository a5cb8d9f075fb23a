"""The ``symm`` backend: tokens stored straight into the peers' memory over NVLink, one node, CUDA.

Each group has one peer buffer (:mod:`moe_ops.peer_memory`: symmetric memory every rank maps). A
transfer is: a barrier (every rank has finished reading what the previous transfer left in its
buffer), one Triton kernel per rank storing its rows into the peers' buffers
(:mod:`moe_ops.kernels.put`, at most ``moe_ops.config.symm_num_sms`` SMs), a barrier (every row has
landed), and the local stage reading this rank's buffer. No host sync in the padded layout, so it
captures in CUDA graphs; the ragged layout reads the handshake's counts back, as every backend does.

The slots are those of the ``collective`` backend's padded layout: rank ``s`` sends token ``t`` to rank
``d`` in slot ``d * B + t``, where it lands in row ``s * B + t`` of rank ``d``'s buffer; ``B`` is
``max_tokens_per_rank`` (padded) or the largest token count of the group (ragged, from the handshake).
A token's values cross a link once per destination rank that needs them; its ``K`` local expert ids
(int32, ``-1`` for experts elsewhere) and router weights go to every rank with each call. In combine
the expert rank sums a token's rows first (weighted, float32 accumulation) and sends one row back per
(token, destination), rounded to the expert output's dtype; the source adds those up.

Tested on CPU against a shared-memory simulator of the peer buffer (moe_ops.testing.peer_sim, gloo
processes, the put kernel under ``TRITON_INTERPRET=1``) at W = 1...4 and on one GPU at W = 1 (real
symmetric memory). Not tested here: more than one GPU (NVLink stores, barrier timing) — issue 7's
script ``tools/bench_multi_gpu.py`` runs that where a multi-GPU machine is lent.

Handle: ``[send_slot [T, K], route_row [W*B, K], row_src [N] or [L, C], send_index [W*B], back_index
[W*B]]``: the slot of each route's (token, destination); the layout row of each received route; the
token each send slot carries (-1: none); each received slot's own index where it carried a token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ops import config, peer_memory, permute, routing, stage
from moe_ops.backends.base import Backend, DispatchOutputs, DispatchPlan, Layout, int64_like
from moe_ops.groups import Comm
from moe_ops.packing import RowFormat

_ALIGN = 16  # bytes: rows and their payloads start 16-byte aligned (vector stores)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _transfer(comm: Comm, src: Tensor, src_index: Tensor, meta: Tensor | None, bound: int) -> tuple[Tensor, Tensor | None]:
    """Send slot ``i``'s payload ``src[src_index[i]]`` and ``meta[i]`` (int32 words) to rank ``i // bound``;
    returns what every rank sent here, ``([W*bound, P] like src, [W*bound, M] int32 or None)``, as views
    of this rank's buffer (valid until the next transfer)."""
    from moe_ops.kernels.put import put_rows  # Triton: imported on the first transfer, not with moe_ops

    slots = comm.world_size * bound
    payload_bytes = _aligned(src.shape[1] * src.element_size())
    row_bytes = _aligned(payload_bytes + (0 if meta is None else 4 * meta.shape[1]))
    buffer = peer_memory.get(comm, slots * row_bytes, src.device)
    buffer.barrier()  # every rank has read what the previous transfer left in its buffer
    put_rows(src, src_index, meta, buffer.peers, comm.rank, bound, row_bytes, payload_bytes, config.symm_num_sms)
    buffer.barrier()  # every rank's rows for this rank have landed
    rows = buffer.local[: slots * row_bytes].view(slots, row_bytes)
    payload = rows[:, : src.shape[1] * src.element_size()].view(src.dtype)
    return payload, None if meta is None else rows[:, payload_bytes : payload_bytes + 4 * meta.shape[1]].view(torch.int32)


class SymmBackend(Backend):
    name = "symm"
    layouts = frozenset({"ragged", "padded"})
    multi_rank = True

    @property
    def device_types(self) -> frozenset[str]:  # type: ignore[override]
        return peer_memory.device_types()

    def dispatch(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan) -> DispatchOutputs:
        comm, world, num_local = plan.comm, plan.comm.world_size, plan.num_local_experts
        num_tokens, top_k = topk_idx.shape
        dest = routing.destination_ranks(topk_idx, plan.num_experts, world)
        if plan.capacity is None:  # ragged: token counts and routes per destination agreed in the handshake
            routes = torch.zeros(world, dtype=torch.int64, device=x.device)
            routes.scatter_add_(0, dest.clamp(min=0).reshape(-1), (dest >= 0).reshape(-1).long())
            peers = plan.agree(torch.cat([routes.new_tensor([num_tokens]), routes]))
            bound = max(p[0] for p in peers)
            num_rows: int | None = sum(p[1 + comm.rank] for p in peers)
        else:
            plan.agree(None)
            bound, num_rows = plan.max_tokens_per_rank, None
        ranks = torch.arange(world, device=x.device)
        goes = dest.unsqueeze(2) == ranks  # [T, K, W]: route k of token t goes to rank d
        send_index = torch.full((world, bound), -1, dtype=torch.int64, device=x.device)
        send_index[:, :num_tokens] = torch.where(goes.any(1), torch.arange(num_tokens, device=x.device).unsqueeze(1), -1).T
        meta_format = RowFormat(((top_k, torch.int32), (top_k, topk_weights.dtype)))
        meta = meta_format.empty(world * bound, x.device)
        ids, weights = (view.view(world, bound, top_k) for view in meta_format.views(meta))
        ids.fill_(-1)
        weights.zero_()
        ids[:, :num_tokens] = torch.where(goes, topk_idx.unsqueeze(2) - ranks * num_local, -1).permute(2, 0, 1)
        weights[:, :num_tokens] = torch.where(goes, topk_weights.unsqueeze(2), 0).permute(2, 0, 1)

        tokens, received = _transfer(comm, x, send_index.view(-1), meta.view(torch.int32), bound)
        assert received is not None
        ids, weights = meta_format.views(received.view(torch.uint8))
        out = stage.dispatch_rows(tokens, weights, ids, num_local, plan.capacity, num_rows, plan.zero_padding)
        carried = (ids >= 0).any(1)
        back_index = torch.where(carried, torch.arange(world * bound, device=x.device), -1)
        send_slot = torch.where(dest >= 0, dest * bound + torch.arange(num_tokens, device=x.device).unsqueeze(1), -1)
        handle = [send_slot, out.route_row, out.row_src, send_index.view(-1), back_index]
        return DispatchOutputs(out.recv_x, out.recv_weights, out.tokens_per_expert, out.dropped, handle)

    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm) -> Tensor:
        send_slot, route_row, _, _, back_index = handle
        partial = stage.reduce(expert_out.flatten(0, -2), route_row, recv_weights.reshape(-1), ragged=expert_out.dim() == 2)
        back, _ = _transfer(comm, partial, back_index, None, route_row.shape[0] // comm.world_size)
        return stage.reduce(back, send_slot, None, unique=True)

    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        send_slot, route_row, _, _, back_index = handle
        grad_tokens = stage.reduce(grad_recv_x.flatten(0, -2), route_row, None, ragged=grad_recv_x.dim() == 2)
        meta_format = RowFormat(((send_slot.shape[1], grad_recv_weights.dtype),))
        meta = meta_format.empty(route_row.shape[0], grad_recv_x.device)
        meta_format.views(meta)[0].copy_(permute.gather_routes(grad_recv_weights.reshape(-1), route_row))
        back, received = _transfer(comm, grad_tokens, back_index, meta.view(torch.int32), route_row.shape[0] // comm.world_size)
        assert received is not None
        grad_x = stage.reduce(back, send_slot, None, unique=True)
        return grad_x, permute.take_columns(meta_format.views(received.view(torch.uint8))[0], send_slot)

    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        _, route_row, row_src, send_index, _ = handle
        grad_tokens, _ = _transfer(comm, grad_out, send_index, None, route_row.shape[0] // comm.world_size)
        return stage.expand_grad(grad_tokens, expert_out, recv_weights, route_row, row_src)

    def handle_len(self, layout: Layout) -> int:
        return 5

    def rows_shape(self, handle: list[Tensor]) -> tuple[int, ...]:
        return tuple(handle[2].shape)

    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        if plan.capacity is None:
            slots = torch.library.get_ctx().new_dynamic_size()
        else:
            slots = plan.comm.world_size * plan.max_tokens_per_rank
        return [
            int64_like(topk_idx, topk_idx.shape),
            int64_like(topk_idx, (slots, topk_idx.shape[1])),
            int64_like(topk_idx, rows_shape),
            int64_like(topk_idx, (slots,)),
            int64_like(topk_idx, (slots,)),
        ]
