"""Routing metadata and the dispatch permute as three Triton kernels, without a sort of the routes.

1. ``_chunk_ranks``: routes in chunks of ``CHUNK``; each program ranks its routes among the equal ids
   before them in the chunk (a ``CHUNK x CHUNK`` comparison) and writes the chunk's histogram.
2. ``_expert_prefix``: a program per block of experts turns the histograms into each expert's total
   and, per chunk, the rows earlier chunks took in that expert (exclusive prefix over chunks); it
   writes ``tokens_per_expert`` and ``dropped``.
3. ``_scatter_rows``: a program per (source row, hidden block) computes the row's layout rows (the
   ragged layout's expert starts come from a cumulative sum of the counts) and
   copies its block to each of them; block 0 records the maps and weights. Every source row is read
   once, every layout row written once, in 16-byte vectors where the row stride allows.

A route's position inside its expert is (rows earlier chunks took) + (its rank in the chunk), so rows
follow the routes' flat order, as the contract requires, and the result equals
``routing.expert_layout`` + ``permute.expand`` exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_ops.kernels import bins_for, block_size, k_block

CHUNK = 128  # routes ranked per program by one CHUNK x CHUNK comparison
FILL_BLOCK = 1024  # padding slots reset per program
SCATTER_H_BLOCK = 1024  # hidden elements per scatter program (tools/bench.py --sweep picks these)
SCATTER_WARPS = 4


@triton.jit
def _chunk_ranks(
    ids_ptr, num_routes, num_chunks, num_local, rank_ptr, hist_ptr,
    fill_rows_ptr, fill_weights_ptr, num_fill,
    CHUNK: tl.constexpr, BINS: tl.constexpr, FILL_BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    if c < num_chunks:
        lane = tl.arange(0, CHUNK)
        offs = c * CHUNK + lane
        raw = tl.load(ids_ptr + offs, mask=offs < num_routes, other=-1)
        valid = (raw >= 0) & (raw < num_local)  # in the ids' own dtype: no truncation before the check
        key = tl.where(valid, raw, num_local).to(tl.int32)  # num_local: masked / not here
        earlier = (key[:, None] == key[None, :]) & (lane[None, :] < lane[:, None])
        tl.store(rank_ptr + offs, tl.sum(earlier.to(tl.int32), axis=1), mask=offs < num_routes)
        # BINS >= num_local: count invalid routes in bin 0, then take them out again
        bins = tl.arange(0, BINS)
        invalid = tl.sum((~valid).to(tl.int32), axis=0)
        tl.store(hist_ptr + c * BINS + bins, tl.histogram(tl.where(valid, key, 0), BINS) - tl.where(bins == 0, invalid, 0))
    # padded layout: every program also resets its share of row_src (-1) and recv_weights (0)
    fill = c * FILL_BLOCK + tl.arange(0, FILL_BLOCK)
    tl.store(fill_rows_ptr + fill, tl.full([FILL_BLOCK], -1, tl.int64), mask=fill < num_fill)
    tl.store(fill_weights_ptr + fill, tl.zeros([FILL_BLOCK], tl.float32).to(fill_weights_ptr.dtype.element_ty), mask=fill < num_fill)


@triton.jit
def _expert_prefix(
    hist_ptr, num_chunks, num_local, capacity, chunk_base_ptr, counts_ptr, dropped_ptr,
    BINS: tl.constexpr, EXPERTS: tl.constexpr, ROWS: tl.constexpr,
):
    """Program b: experts [b*EXPERTS, (b+1)*EXPERTS), over every chunk."""
    e = tl.program_id(0) * EXPERTS + tl.arange(0, EXPERTS)
    total = tl.zeros([EXPERTS], tl.int32)
    for c0 in range(0, num_chunks, ROWS):
        rows = c0 + tl.arange(0, ROWS)
        mask = rows[:, None] < num_chunks
        h = tl.load(hist_ptr + rows[:, None] * BINS + e[None, :], mask=mask, other=0)
        # exclusive prefix over chunks, per expert: rows earlier chunks took in that expert
        tl.store(chunk_base_ptr + rows[:, None] * BINS + e[None, :], tl.cumsum(h, axis=0) - h + total[None, :], mask=mask)
        total += tl.sum(h, axis=0)
    kept = tl.where(capacity >= 0, tl.minimum(total, capacity), total)
    tl.store(counts_ptr + e, kept, mask=e < num_local)
    tl.store(dropped_ptr + e, total - kept, mask=e < num_local)


@triton.jit
def _scatter_rows(
    tokens_ptr, token_stride, weights_ptr, ids_ptr, rank_ptr, chunk_base_ptr, counts_ptr, ends_ptr,
    top_k, hidden, num_local, capacity,
    recv_x_ptr, recv_weights_ptr, route_row_ptr, row_src_ptr,
    CHUNK: tl.constexpr, BINS: tl.constexpr, K_BLOCK: tl.constexpr, H_BLOCK: tl.constexpr,
):
    """Program (j, b): source row j, hidden block b. Every program of row j computes its routes' rows
    (a few loads); block 0 records them, every block copies its slice of the row to each of them."""
    j = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, K_BLOCK)
    route = j * top_k + k
    in_row = k < top_k
    raw = tl.load(ids_ptr + route, mask=in_row, other=-1)
    valid = in_row & (raw >= 0) & (raw < num_local)
    key = tl.where(valid, raw, 0).to(tl.int32)
    pos = tl.load(chunk_base_ptr + (route // CHUNK) * BINS + key, mask=valid, other=0) + tl.load(rank_ptr + route, mask=valid, other=0)
    if capacity >= 0:  # padded: slot pos of expert key, if it fits
        keep = valid & (pos < capacity)
        row = key.to(tl.int64) * capacity + pos
    else:  # ragged: the expert's first row (its end minus its count) + pos
        start = tl.load(ends_ptr + key, mask=valid, other=0) - tl.load(counts_ptr + key, mask=valid, other=0)
        keep = valid
        row = (start + pos).to(tl.int64)
    row = tl.where(keep, row, -1)
    if tl.program_id(1) == 0:
        tl.store(route_row_ptr + route, row, mask=in_row)
        tl.store(row_src_ptr + row, route, mask=keep)
        tl.store(recv_weights_ptr + row, tl.load(weights_ptr + route, mask=keep), mask=keep)
    cols = tl.program_id(1) * H_BLOCK + tl.arange(0, H_BLOCK)
    v = tl.load(tokens_ptr + j * token_stride + cols, mask=cols < hidden)
    tl.store(recv_x_ptr + row[:, None] * hidden + cols[None, :], tl.broadcast_to(v[None, :], (K_BLOCK, H_BLOCK)),
             mask=keep[:, None] & (cols[None, :] < hidden))


def dispatch_rows(
    tokens: Tensor,
    weights: Tensor,
    ids: Tensor,
    num_local: int,
    capacity: int | None,
    num_rows: int | None = None,
    zero_padding: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of ``routing.expert_layout`` + ``permute.expand``.

    ``tokens [M, H]`` (rows may be strided), ``weights [M, K]``, ``ids [M, K]`` local expert ids
    (anything outside ``[0, num_local)`` is masked). Returns ``(recv_x, recv_weights,
    tokens_per_expert, dropped, route_row, row_src)`` in the layouts of docs/contract.md; padding rows of
    ``recv_x`` are left unwritten unless ``zero_padding``. ``num_rows`` (ragged) saves a device-to-host
    read where known.
    """
    m, top_k = ids.shape
    hidden, device = tokens.shape[1], tokens.device
    assert tokens.stride(1) == 1 and weights.is_contiguous() and ids.is_contiguous()
    num_routes = m * top_k
    num_chunks = triton.cdiv(num_routes, CHUNK)
    bins = bins_for(num_local)
    padded = capacity is not None
    slots = num_local * capacity if padded else 0
    # one int32 workspace: per-route ranks, chunk histograms, per-chunk bases
    chunks = max(num_chunks, 1)
    work = torch.empty(num_routes + 2 * chunks * bins, dtype=torch.int32, device=device)
    rank, hist, chunk_base = work.split([num_routes, chunks * bins, chunks * bins])
    row_src = torch.empty(slots, dtype=torch.int64, device=device)
    recv_weights = torch.empty(slots, dtype=weights.dtype, device=device)
    grid = max(chunks, triton.cdiv(slots, FILL_BLOCK))
    _chunk_ranks[(grid,)](ids, num_routes, num_chunks, num_local, rank, hist, row_src, recv_weights, slots,
                          CHUNK=CHUNK, BINS=bins, FILL_BLOCK=FILL_BLOCK)
    counts = torch.empty(num_local, dtype=torch.int32, device=device)
    dropped = torch.empty_like(counts)
    experts = min(bins, 32)
    _expert_prefix[(bins // experts,)](hist, num_chunks, num_local, capacity if padded else -1, chunk_base, counts, dropped,
                                       BINS=bins, EXPERTS=experts, ROWS=max(1, 8192 // experts))
    if padded:
        rows_shape: tuple[int, ...] = (num_local, capacity)
        ends = counts  # unused
    else:
        ends = torch.cumsum(counts, 0, dtype=torch.int32)
        rows_shape = ((int(ends[-1]) if num_local else 0) if num_rows is None else num_rows,)
        row_src = torch.empty(rows_shape, dtype=torch.int64, device=device)
        recv_weights = torch.empty(rows_shape, dtype=weights.dtype, device=device)
    recv_x = (torch.zeros if zero_padding and padded else torch.empty)(*rows_shape, hidden, dtype=tokens.dtype, device=device)
    route_row = torch.empty(m, top_k, dtype=torch.int64, device=device)
    if m:
        h_block = block_size(hidden, SCATTER_H_BLOCK)
        _scatter_rows[(m, max(1, triton.cdiv(hidden, h_block)))](
            tokens, tokens.stride(0), weights, ids, rank, chunk_base, counts, ends,
            top_k, hidden, num_local, capacity if padded else -1,
            recv_x, recv_weights, route_row, row_src,
            CHUNK=CHUNK, BINS=bins, K_BLOCK=k_block(top_k), H_BLOCK=h_block, num_warps=SCATTER_WARPS,
        )
    return recv_x, recv_weights.view(rows_shape), counts, dropped, route_row, row_src.view(rows_shape)
