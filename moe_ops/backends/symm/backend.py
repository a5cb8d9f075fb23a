"""The ``symm`` backend: tokens stored straight into the peers' memory over NVLink, one node, CUDA.

Each group has one peer buffer (:mod:`.peer_memory`: symmetric memory every rank maps). A transfer
is: a barrier (every rank has finished reading what the previous transfer left in its buffer), one
Triton kernel per rank storing its rows into the peers' buffers (:mod:`.put`, at most
``moe_ops.config.symm_num_sms`` SMs), a barrier (every row has landed), and the local stage reading
this rank's buffer. No host sync in the padded layout, so it captures in CUDA graphs; the ragged
layout reads the agreed counts back (its :meth:`SymmBackend.payload`), as every ragged backend does.

The slots are those of the ``collective`` backend's padded layout: rank ``s`` sends token ``t`` to rank
``d`` in slot ``d * B + t``, where it lands in row ``s * B + t`` of rank ``d``'s buffer; ``B`` is
``max_tokens_per_rank`` (padded) or the largest token count of the group (ragged, from the agreement).
A token's values cross a link once per destination rank that needs them; its ``K`` local expert ids
(int32, ``-1`` for experts elsewhere) and router weights go to every rank with each call. In combine
the expert rank sums a token's rows first (weighted, float32 accumulation) and sends one row back per
(token, destination), rounded to the expert output's dtype; the source adds those up.

Tested on CPU against a shared-memory simulator of symmetric memory (moe_ops.testing.sim.symmetric_memory,
gloo processes, the put kernel under ``TRITON_INTERPRET=1``) at W = 1...4, on one GPU at W = 1 (real
symmetric memory) and on two H200s over NVLink with ``tools/bench_multi_gpu.py`` (a loaner, not CI).
Not run: W > 2 on GPUs (no such machine was lent).

Dispatch's put kernel (``put_tokens``) reads the routes itself: it finds each slot's token and local ids
and stores them with the router weights, so no send buffer or index is built first. The other three
transfers store rows named by an index (``put_rows``).

Handle: ``[send_slot [T, K], row_src [N] or [L, C], route_row [W*B, K], back_index [W*B]]``: the slot of
each route's (token, destination); the layout's row map; the layout row of each received route; each
received slot's own index where it carried a token (-1: empty).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moe_ops import config, routing, slots, stage
from moe_ops.backends.base import Backend, DispatchOutputs, Peers, int64_like
from moe_ops.backends.symm import peer_memory
from moe_ops.comm import Comm, library_call
from moe_ops.indexing import take_columns
from moe_ops.packing import RowFormat, round_up
from moe_ops.plan import DispatchPlan, Kind

_ALIGN = 16  # bytes: rows and their payloads start 16-byte aligned (vector stores)


def _transfer(
    comm: Comm, bound: int, payload: tuple[int, torch.dtype], meta_bytes: int, device: torch.device,
    put: Callable[[Tensor, int, int], None],
) -> tuple[Tensor, Tensor]:
    """One transfer: ``put(peers, row_bytes, meta_offset)`` stores this rank's slots into the peers'
    buffers between two barriers. Returns what every rank sent here — ``[W*bound, cols]`` payloads of
    ``payload = (cols, dtype)`` and ``[W*bound, meta_bytes]`` uint8 metadata — as views of this rank's
    buffer (valid until the next transfer)."""
    cols, dtype = payload
    num_slots = comm.world_size * bound
    payload_bytes = round_up(cols * dtype.itemsize, _ALIGN)
    row_bytes = round_up(payload_bytes + meta_bytes, _ALIGN)
    buffer = peer_memory.get(comm, num_slots * row_bytes, device)
    library_call("symm barrier", comm, buffer.barrier)  # every rank has read what the previous transfer left
    put(buffer.peers, row_bytes, payload_bytes)
    library_call("symm barrier", comm, buffer.barrier)  # every rank's rows for this rank have landed
    rows = buffer.local[: num_slots * row_bytes].view(num_slots, row_bytes)
    return rows[:, : cols * dtype.itemsize].view(dtype), rows[:, payload_bytes : payload_bytes + meta_bytes]


def _send_rows(comm: Comm, src: Tensor, src_index: Tensor, bound: int, meta: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`_transfer` of rows named by an index: slot ``i`` sends ``src[src_index[i]]`` (-1: none) and
    ``meta[i]`` (``[S, M]`` uint8, ``M`` a multiple of 4)."""
    from moe_ops.backends.symm.put import (
        put_rows,  # Triton: imported on the first transfer, not with moe_ops
    )

    words = None if meta is None else meta.view(torch.int32)

    def put(peers: Tensor, row_bytes: int, meta_offset: int) -> None:
        put_rows(src, src_index, words, peers, comm.rank, bound, row_bytes, meta_offset, config.symm_num_sms)

    return _transfer(comm, bound, (src.shape[1], src.dtype), 0 if meta is None else meta.shape[1], src.device, put)


class SymmBackend(Backend):
    name = "symm"
    layouts = frozenset({"ragged", "bounded", "padded"})
    multi_rank = True

    @property
    def device_types(self) -> frozenset[str]:  # type: ignore[override]
        return peer_memory.device_types()

    def payload(self, topk_idx: Tensor, plan: DispatchPlan) -> Tensor | None:
        """Ragged: this rank's token count (the group's largest is the slot bound) and its routes per rank."""
        if plan.static:
            return None
        dest = routing.destination_ranks(topk_idx, plan.num_experts, plan.comm.world_size)
        return torch.cat([dest.new_tensor([topk_idx.shape[0]]), routing.routes_per_rank(dest, plan.comm.world_size)])

    def dispatch(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan, peers: Peers) -> DispatchOutputs:
        from moe_ops.backends.symm.put import put_tokens

        comm, world, num_local = plan.comm, plan.comm.world_size, plan.num_local_experts
        if not plan.static:
            assert peers is not None
            bound = max(p[0] for p in peers)
            num_routes: int | None = sum(p[1 + comm.rank] for p in peers)
        else:
            bound, num_routes = plan.token_bound, None
        meta_format = RowFormat(((topk_idx.shape[1], torch.int32), (topk_idx.shape[1], topk_weights.dtype)))

        def put(peer_buffers: Tensor, row_bytes: int, meta_offset: int) -> None:
            put_tokens(x, topk_idx.contiguous(), topk_weights.contiguous(), num_local, peer_buffers, comm.rank, bound,
                       row_bytes, meta_offset, meta_format.offset(1), config.symm_num_sms)

        tokens, meta = _transfer(comm, bound, (x.shape[1], x.dtype), meta_format.row_bytes, x.device, put)
        ids, weights = meta_format.views(meta)
        out = stage.dispatch_rows(tokens, weights, ids, num_local, plan.rows, num_routes)
        back_index = torch.where((ids >= 0).any(1), torch.arange(world * bound, device=x.device), -1)
        send_slot = slots.send_slots(routing.destination_ranks(topk_idx, plan.num_experts, world), bound)
        handle = [send_slot, out.row_src, out.route_row, back_index]
        return DispatchOutputs(out.recv_x, out.recv_weights, out.tokens_per_expert, out.dropped, handle)

    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm) -> Tensor:
        send_slot, _, route_row, back_index = handle
        bound = route_row.shape[0] // comm.world_size
        partial = stage.reduce(expert_out.flatten(0, -2), route_row, recv_weights.reshape(-1), ragged=expert_out.dim() == 2)
        back, _ = _send_rows(comm, partial, back_index, bound)
        return stage.reduce(back, send_slot, None, unique=True)

    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        send_slot, _, route_row, back_index = handle
        bound = route_row.shape[0] // comm.world_size
        grad_tokens, grad_weights = stage.dispatch_grad(
            grad_recv_x.flatten(0, -2), grad_recv_weights.reshape(-1), route_row, ragged=grad_recv_x.dim() == 2
        )
        meta_format = RowFormat(((send_slot.shape[1], grad_recv_weights.dtype),))
        meta = meta_format.empty(route_row.shape[0], grad_recv_x.device)
        meta_format.views(meta)[0].copy_(grad_weights)
        back, received = _send_rows(comm, grad_tokens, back_index, bound, meta)
        grad_x = stage.reduce(back, send_slot, None, unique=True)
        return grad_x, take_columns(meta_format.views(received)[0], send_slot)

    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        send_slot, row_src, route_row, _ = handle
        bound = route_row.shape[0] // comm.world_size
        send_index = slots.slot_tokens(send_slot, route_row.shape[0])
        grad_tokens, _ = _send_rows(comm, grad_out, send_index, bound)
        return stage.expand_grad(grad_tokens, expert_out, recv_weights, route_row, row_src)

    def handle_len(self, kind: Kind) -> int:
        return 4

    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        if not plan.static:
            num_slots = torch.library.get_ctx().new_dynamic_size()
        else:
            num_slots = plan.comm.world_size * plan.token_bound
        return [
            int64_like(topk_idx, topk_idx.shape),
            int64_like(topk_idx, rows_shape),
            int64_like(topk_idx, (num_slots, topk_idx.shape[1])),
            int64_like(topk_idx, (num_slots,)),
        ]
