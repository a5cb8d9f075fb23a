"""Routing metadata and the dispatch permute as Triton kernels, without a sort of the routes.

Up to ``SMALL_ROUTES`` routes (decode), one launch does it all: ``_dispatch_small`` has a program per
(source row, hidden block) that finds its routes' positions by comparing them with every route, and a
program per block of experts that counts them (and resets their unused padded slots). Beyond that, three:

1. ``_chunk_ranks``: routes in chunks of ``CHUNK``; each program ranks its routes among the equal ids
   before them in the chunk (a ``CHUNK x CHUNK`` comparison) and writes the chunk's histogram.
2. ``_expert_prefix``: a program per block of experts turns the histograms into each expert's total
   and, per chunk, the rows earlier chunks took in that expert (exclusive prefix over chunks); it
   writes ``tokens_per_expert`` and ``dropped``.
3. ``_scatter_rows``: a program per (source row, hidden block) computes the row's layout rows (the
   ragged and bounded layouts' expert starts come from the counts, through
   :func:`moe_ops.stage.plain.group_rows`, which also applies ``pad_multiple`` and the row bound) and
   copies its block to each of them; block 0 records the maps and weights. Every source row is read
   once, every layout row written once, in 16-byte vectors where the row stride allows.

The one-launch path serves the ragged layout without ``pad_multiple`` and the padded one; the bounded
layout and ``pad_multiple`` take the three launches (their rows' starts need every expert's count first).

A route's position inside its expert is (rows earlier chunks took) + (its rank in the chunk), so rows
follow the routes' flat order, as the contract requires, and the result equals
``plain.expert_layout`` + ``plain.expand`` exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_ops.plan import RowLayout
from moe_ops.stage.kernels import bins_for, block_size, k_block, unit_columns
from moe_ops.stage.plain import group_rows

CHUNK = 128  # routes ranked per program by one CHUNK x CHUNK comparison
FILL_BLOCK = 1024  # padding slots reset per program
SCATTER_H_BLOCK = 1024  # hidden elements per scatter program (tools/bench.py --sweep picks these)
SCATTER_WARPS = 4
SMALL_ROUTES = 2048  # up to this many routes, one launch (_dispatch_small) does all of dispatch
SMALL_R_BLOCK = 512  # routes compared per step there
SMALL_E_BLOCK = 16  # experts counted per bookkeeping program there


@triton.jit
def _valid_keys(ids_ptr, offs, mask, num_local, invalid):
    """The ids at ``offs`` as int32 keys, ``invalid`` where masked, out of range or outside ``mask``."""
    raw = tl.load(ids_ptr + offs, mask=mask, other=-1)
    return tl.where((raw >= 0) & (raw < num_local), raw, invalid).to(tl.int32)  # checked before narrowing


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
        key = _valid_keys(ids_ptr, offs, offs < num_routes, num_local, num_local)  # num_local: masked / not here
        valid = key < num_local
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
def _write_routes(
    tokens_ptr, token_stride, weights_ptr, j, route, in_row, keep, row, hidden,
    recv_x_ptr, recv_weights_ptr, route_row_ptr, row_src_ptr,
    K_BLOCK: tl.constexpr, H_BLOCK: tl.constexpr,
):
    """Source row ``j``'s routes ``route [K_BLOCK]`` go to layout rows ``row`` where ``keep``: hidden block 0
    records the maps and weights, every block copies its slice of the row to each kept row."""
    row = tl.where(keep, row, -1)
    if tl.program_id(1) == 0:
        tl.store(route_row_ptr + route, row, mask=in_row)
        tl.store(row_src_ptr + row, route, mask=keep)
        tl.store(recv_weights_ptr + row, tl.load(weights_ptr + route, mask=keep), mask=keep)
    cols = tl.program_id(1) * H_BLOCK + tl.arange(0, H_BLOCK)
    v = tl.load(tokens_ptr + j * token_stride + cols, mask=cols < hidden)
    tl.store(recv_x_ptr + row[:, None] * hidden + cols[None, :], tl.broadcast_to(v[None, :], (K_BLOCK, H_BLOCK)),
             mask=keep[:, None] & (cols[None, :] < hidden))


@triton.jit
def _scatter_rows(
    tokens_ptr, token_stride, weights_ptr, ids_ptr, rank_ptr, chunk_base_ptr, start_ptr, limit_ptr,
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
    key = _valid_keys(ids_ptr, route, in_row, num_local, -1)
    valid = key >= 0
    pos = tl.load(chunk_base_ptr + (route // CHUNK) * BINS + key, mask=valid, other=0) + tl.load(rank_ptr + route, mask=valid, other=0)
    if capacity >= 0:  # padded: slot pos of expert key, if it fits
        keep = valid & (pos < capacity)
        row = key.to(tl.int64) * capacity + pos
    else:  # ragged, bounded: the expert's first row + pos, among its kept rows
        keep = valid & (pos < tl.load(limit_ptr + key, mask=valid, other=0))
        row = (tl.load(start_ptr + key, mask=valid, other=0) + pos).to(tl.int64)
    _write_routes(tokens_ptr, token_stride, weights_ptr, j, route, in_row, keep, row, hidden,
                  recv_x_ptr, recv_weights_ptr, route_row_ptr, row_src_ptr, K_BLOCK, H_BLOCK)


@triton.jit
def _dispatch_small(
    tokens_ptr, token_stride, weights_ptr, ids_ptr, num_tokens, top_k, hidden, num_local, capacity,
    recv_x_ptr, recv_weights_ptr, route_row_ptr, row_src_ptr, counts_ptr, dropped_ptr,
    PADDED: tl.constexpr, K_BLOCK: tl.constexpr, H_BLOCK: tl.constexpr, R_BLOCK: tl.constexpr,
    E_BLOCK: tl.constexpr, P_BLOCK: tl.constexpr,
):
    """All of dispatch in one launch, for few routes. Program (j, b) with ``j < num_tokens``: source row j,
    hidden block b; it finds its routes' positions by comparing them with every route (no workspace, no
    prefix pass). Program (num_tokens + e, 0): experts ``[e*E_BLOCK, (e+1)*E_BLOCK)``, whose counts it
    writes, resetting the slots they leave unused (padded layout)."""
    j = tl.program_id(0)
    num_routes = num_tokens * top_k
    if j < num_tokens:
        row_j = j.to(tl.int64)
        k = tl.arange(0, K_BLOCK)
        route = row_j * top_k + k
        in_row = k < top_k
        key = _valid_keys(ids_ptr, route, in_row, num_local, -1)
        pos = tl.zeros([K_BLOCK], tl.int32)  # equal keys among earlier routes
        start = tl.zeros([K_BLOCK], tl.int32)  # ragged: routes to smaller experts
        for r0 in range(0, num_routes, R_BLOCK):
            r = r0 + tl.arange(0, R_BLOCK)
            other = _valid_keys(ids_ptr, r, r < num_routes, num_local, -2)  # -2 matches no key
            pos += tl.sum(((other[None, :] == key[:, None]) & (r[None, :] < route[:, None])).to(tl.int32), axis=1)
            if not PADDED:
                start += tl.sum(((other[None, :] < key[:, None]) & (other[None, :] >= 0)).to(tl.int32), axis=1)
        valid = key >= 0
        if PADDED:
            keep = valid & (pos < capacity)
            row = key.to(tl.int64) * capacity + pos
        else:
            keep = valid
            row = (start + pos).to(tl.int64)
        _write_routes(tokens_ptr, token_stride, weights_ptr, row_j, route, in_row, keep, row, hidden,
                      recv_x_ptr, recv_weights_ptr, route_row_ptr, row_src_ptr, K_BLOCK, H_BLOCK)
    elif tl.program_id(1) == 0:
        e = (j - num_tokens) * E_BLOCK + tl.arange(0, E_BLOCK)
        total = tl.zeros([E_BLOCK], tl.int32)
        for r0 in range(0, num_routes, R_BLOCK):
            r = r0 + tl.arange(0, R_BLOCK)
            other = _valid_keys(ids_ptr, r, r < num_routes, num_local, -1)
            total += tl.sum((other[None, :] == e[:, None]).to(tl.int32), axis=1)
        kept = total
        if PADDED:
            kept = tl.minimum(total, capacity)
        tl.store(counts_ptr + e, kept, mask=e < num_local)
        tl.store(dropped_ptr + e, total - kept, mask=e < num_local)
        if PADDED:
            for p0 in range(0, capacity, P_BLOCK):
                p = p0 + tl.arange(0, P_BLOCK)
                unused = (e[:, None] < num_local) & (p[None, :] >= kept[:, None]) & (p[None, :] < capacity)
                slot = e[:, None].to(tl.int64) * capacity + p[None, :]
                tl.store(row_src_ptr + slot, tl.full([E_BLOCK, P_BLOCK], -1, tl.int64), mask=unused)
                tl.store(recv_weights_ptr + slot, tl.zeros([E_BLOCK, P_BLOCK], tl.float32).to(recv_weights_ptr.dtype.element_ty), mask=unused)


def dispatch_rows(
    tokens: Tensor,
    weights: Tensor,
    ids: Tensor,
    num_local: int,
    rows: RowLayout,
    num_routes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of ``plain.expert_layout`` + ``plain.expand``.

    ``tokens [M, H]`` (rows may be strided), ``weights [M, K]``, ``ids [M, K]`` local expert ids
    (anything outside ``[0, num_local)`` is masked), laid out as ``rows`` says. Returns ``(recv_x,
    recv_weights, tokens_per_expert, dropped, route_row, row_src)`` in the layouts of docs/contract.md;
    padding rows of ``recv_x`` are left unwritten unless ``rows.zero_padding``. ``num_routes`` (the valid
    routes, where the caller knows them) saves the ragged layout's device-to-host read. Up to ``SMALL_ROUTES`` routes take one launch (``_dispatch_small``),
    more take three.
    """
    m, top_k = ids.shape
    hidden, device = tokens.shape[1], tokens.device
    assert unit_columns(tokens) and weights.is_contiguous() and ids.is_contiguous()
    padded = rows.kind == "padded"
    capacity, zero_padding = rows.capacity, rows.zero_padding
    grouped = rows.kind == "bounded" or rows.pad_multiple > 1  # rows' starts need every expert's count
    counts = torch.empty(num_local, dtype=torch.int32, device=device)
    dropped = torch.empty_like(counts)
    route_row = torch.empty(m, top_k, dtype=torch.int64, device=device)
    h_block = block_size(hidden, SCATTER_H_BLOCK)
    h_blocks = max(1, triton.cdiv(hidden, h_block))
    # The ragged layout's row count is read back to the host only after every kernel is queued: the rows
    # are laid out in room for every route (the caller's count where it knows it) and cut to the count.
    if (m * top_k <= SMALL_ROUTES or not m) and not grouped:
        rows_shape: tuple[int, ...] = (num_local, capacity) if padded else (m * top_k if num_routes is None else num_routes,)
        recv_x, recv_weights, row_src = _layout_buffers(rows_shape, hidden, tokens.dtype, weights.dtype, device, zero_padding and padded)
        if m or num_local:
            _dispatch_small[(m + triton.cdiv(num_local, SMALL_E_BLOCK), h_blocks)](
                tokens, tokens.stride(0), weights, ids, m, top_k, hidden, num_local, capacity if padded else 0,
                recv_x, recv_weights, route_row, row_src, counts, dropped,
                PADDED=padded, K_BLOCK=k_block(top_k), H_BLOCK=h_block, R_BLOCK=SMALL_R_BLOCK,
                E_BLOCK=SMALL_E_BLOCK, P_BLOCK=128, num_warps=SCATTER_WARPS,
            )
        if padded or num_routes is not None:
            return recv_x, recv_weights, counts, dropped, route_row, row_src
        n = int(counts.sum())
        return recv_x[:n], recv_weights[:n], counts, dropped, route_row, row_src[:n]
    all_routes = m * top_k
    num_chunks = triton.cdiv(all_routes, CHUNK)
    bins = bins_for(num_local)
    slots = num_local * capacity if padded else 0
    # one int32 workspace: per-route ranks, chunk histograms, per-chunk bases
    work = torch.empty(all_routes + 2 * num_chunks * bins, dtype=torch.int32, device=device)
    rank, hist, chunk_base = work.split([all_routes, num_chunks * bins, num_chunks * bins])
    row_src = torch.empty(slots, dtype=torch.int64, device=device)
    recv_weights = torch.empty(slots, dtype=weights.dtype, device=device)
    grid = max(num_chunks, triton.cdiv(slots, FILL_BLOCK))
    _chunk_ranks[(grid,)](ids, all_routes, num_chunks, num_local, rank, hist, row_src, recv_weights, slots,
                          CHUNK=CHUNK, BINS=bins, FILL_BLOCK=FILL_BLOCK)
    experts = min(bins, 32)
    _expert_prefix[(bins // experts,)](hist, num_chunks, num_local, capacity if padded else -1, chunk_base, counts, dropped,
                                       BINS=bins, EXPERTS=experts, ROWS=max(1, 8192 // experts))
    if padded:
        rows_shape: tuple[int, ...] = (num_local, capacity)
        recv_x = (torch.zeros if zero_padding else torch.empty)(*rows_shape, hidden, dtype=tokens.dtype, device=device)
        start = limit = counts  # unused
    elif not grouped:  # ragged: expert e's rows start where the counts before it end
        limit = counts
        start = torch.cumsum(counts, 0, dtype=torch.int32) - counts
        rows_shape = (all_routes if num_routes is None else num_routes,)
        recv_x, recv_weights, row_src = _layout_buffers(rows_shape, hidden, tokens.dtype, weights.dtype, device, False)
    else:  # bounded, or pad_multiple: groups of rows; padding rows are -1 / 0 (and zero in recv_x with zero_padding)
        start, tokens_per_expert = group_rows(counts, rows)
        limit = counts.minimum(tokens_per_expert)
        dropped = counts - limit
        counts = tokens_per_expert
        total = rows.max_rows if rows.kind == "bounded" else int(counts.sum())
        rows_shape = (total,)
        recv_x = (torch.zeros if zero_padding else torch.empty)(total, hidden, dtype=tokens.dtype, device=device)
        recv_weights = torch.zeros(total, dtype=weights.dtype, device=device)
        row_src = torch.full((total,), -1, dtype=torch.int64, device=device)
    _scatter_rows[(m, h_blocks)](
        tokens, tokens.stride(0), weights, ids, rank, chunk_base, start, limit,
        top_k, hidden, num_local, capacity if padded else -1,
        recv_x, recv_weights, route_row, row_src,
        CHUNK=CHUNK, BINS=bins, K_BLOCK=k_block(top_k), H_BLOCK=h_block, num_warps=SCATTER_WARPS,
    )
    if rows.kind == "ragged" and not grouped and num_routes is None:
        n = int(counts.sum())
        return recv_x[:n], recv_weights[:n], counts, dropped, route_row, row_src[:n]
    return recv_x, recv_weights.view(rows_shape), counts, dropped, route_row, row_src.view(rows_shape)


def _layout_buffers(
    rows_shape: tuple[int, ...], hidden: int, dtype: torch.dtype, weight_dtype: torch.dtype, device: torch.device, zero: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(recv_x [*rows_shape, H], recv_weights [*rows_shape], row_src [*rows_shape] int64)``, uninitialised
    (``recv_x`` zero with ``zero``)."""
    recv_x = (torch.zeros if zero else torch.empty)(*rows_shape, hidden, dtype=dtype, device=device)
    return recv_x, torch.empty(rows_shape, dtype=weight_dtype, device=device), torch.empty(rows_shape, dtype=torch.int64, device=device)
