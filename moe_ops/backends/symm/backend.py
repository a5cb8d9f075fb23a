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

Quantized dispatch (``moe.dispatch_quantized``): a slot's row holds the 1-byte token and its float32
scales ``[S]`` beside it, stored by the same put only where the token goes; with ``quant`` the put kernel
quantizes each block as it stores it (``moe_ops.quant``'s rounding), so only quantized bytes are read
back and moved. Combine and the backward passes move bf16/fp32 rows as after any dispatch.

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
from moe_ops.packing import RowFormat
from moe_ops.plan import DispatchPlan, Kind

_ALIGN = 16  # bytes: rows and their payloads start 16-byte aligned (vector stores)


def _transfer(comm: Comm, bound: int, row: RowFormat, device: torch.device, put: Callable[[Tensor], None]) -> list[Tensor]:
    """One transfer: ``put(peers)`` stores this rank's ``W*bound`` slots, rows of format ``row`` (fields
    16-byte aligned), into the peers' buffers between two barriers. Returns each field of what every rank
    sent here: ``[W*bound, width]`` views of this rank's buffer (valid until the next transfer)."""
    num_slots = comm.world_size * bound
    buffer = peer_memory.get(comm, num_slots * row.row_bytes, device)
    library_call("symm barrier", comm, buffer.barrier)  # every rank has read what the previous transfer left
    put(buffer.peers)
    library_call("symm barrier", comm, buffer.barrier)  # every rank's rows for this rank have landed
    return row.views(buffer.local[: num_slots * row.row_bytes].view(num_slots, row.row_bytes))


def _send_rows(comm: Comm, src: Tensor, src_index: Tensor, bound: int, meta: Tensor | None = None) -> list[Tensor]:
    """:func:`_transfer` of rows named by an index: slot ``i`` sends ``src[src_index[i]]`` (-1: none) and
    ``meta[i]`` (``[S, M]`` uint8, ``M`` a multiple of 4). Returns the rows received (and their metadata)."""
    from moe_ops.backends.symm.put import (
        put_rows,  # Triton: imported on the first transfer, not with moe_ops
    )

    fields = ((src.shape[1], src.dtype),) if meta is None else ((src.shape[1], src.dtype), (meta.shape[1], torch.uint8))
    row = RowFormat(fields, _ALIGN)
    words = None if meta is None else meta.view(torch.int32)

    def put(peers: Tensor) -> None:
        put_rows(src, src_index, words, peers, comm.rank, bound, row.row_bytes, row.offset(len(fields) - 1), config.symm_num_sms)

    return _transfer(comm, bound, row, src.device, put)


class SymmBackend(Backend):
    name = "symm"
    layouts = frozenset({"ragged", "bounded", "padded"})
    multi_rank = True
    quantized = True

    @property
    def device_types(self) -> frozenset[str]:  # type: ignore[override]
        return peer_memory.device_types()

    def payload(self, topk_idx: Tensor, plan: DispatchPlan) -> Tensor | None:
        """Ragged: this rank's token count (the group's largest is the slot bound) and its routes per rank."""
        if plan.static:
            return None
        dest = routing.destination_ranks(topk_idx, plan.num_experts, plan.comm.world_size)
        return torch.cat([dest.new_tensor([topk_idx.shape[0]]), routing.routes_per_rank(dest, plan.comm.world_size)])

    def dispatch(
        self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan, peers: Peers, x_scales: Tensor | None = None
    ) -> DispatchOutputs:
        from moe_ops.backends.symm.put import put_tokens

        comm, world, num_local = plan.comm, plan.comm.world_size, plan.num_local_experts
        if not plan.static:
            assert peers is not None
            bound = max(p[0] for p in peers)
            num_routes: int | None = sum(p[1 + comm.rank] for p in peers)
        else:
            bound, num_routes = plan.token_bound, None
        meta_format = RowFormat(((topk_idx.shape[1], torch.int32), (topk_idx.shape[1], topk_weights.dtype)))
        # A slot's row: the token, its scales beside it (a quantized dispatch), its ids and weights.
        spec = None if plan.scales is None else plan.scales.quantize
        scales = () if plan.scales is None else ((plan.scales.columns, torch.float32),)
        row = RowFormat(((x.shape[1], x.dtype if spec is None else spec.dtype), *scales, (meta_format.row_bytes, torch.uint8)), _ALIGN)

        def put(peer_buffers: Tensor) -> None:
            put_tokens(x, topk_idx.contiguous(), topk_weights.contiguous(), num_local, peer_buffers, comm.rank, bound,
                       row.row_bytes, row.offset(len(row.fields) - 1), meta_format.offset(1), config.symm_num_sms,
                       x_scales, spec, row.offset(1))

        tokens, *recv_scales, meta = _transfer(comm, bound, row, x.device, put)
        ids, weights = meta_format.views(meta)
        out = stage.dispatch_rows(tokens, weights, ids, num_local, plan.rows, num_routes, scales=recv_scales[0] if recv_scales else None)
        back_index = torch.where((ids >= 0).any(1), torch.arange(world * bound, device=x.device), -1)
        send_slot = slots.send_slots(routing.destination_ranks(topk_idx, plan.num_experts, world), bound)
        handle = [send_slot, out.row_src, out.route_row, back_index]
        return DispatchOutputs(out.recv_x, out.recv_weights, out.tokens_per_expert, out.dropped, handle, out.recv_scales)

    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool) -> Tensor:
        send_slot, _, route_row, back_index = handle
        bound = route_row.shape[0] // comm.world_size
        partial = stage.reduce(expert_out.flatten(0, -2), route_row, recv_weights.reshape(-1), packed=packed)
        [back] = _send_rows(comm, partial, back_index, bound)
        return stage.reduce(back, send_slot, None, unique=True)

    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool
    ) -> tuple[Tensor, Tensor]:
        send_slot, _, route_row, back_index = handle
        bound = route_row.shape[0] // comm.world_size
        grad_tokens, grad_weights = stage.dispatch_grad(
            grad_recv_x.flatten(0, -2), grad_recv_weights.reshape(-1), route_row, packed=packed
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
        [grad_tokens] = _send_rows(comm, grad_out, send_index, bound)
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
