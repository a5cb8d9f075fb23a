"""Routing metadata and the dispatch permute as Triton kernels, without a sort of the routes.

Up to ``SMALL_ROUTES`` routes (decode), one launch does it all: ``_dispatch_small`` has a program per
(source row, hidden block) that finds its routes' positions by comparing them with every route (with
``pad_multiple``, the groups' starts from a histogram of every route), and bookkeeping programs that
count the routes of each expert and write its padding rows. Beyond that, three launches (padded layout)
or four:

1. ``_chunk_ranks``: routes in chunks of ``CHUNK``; each program ranks its routes among the equal ids
   before them in the chunk (a ``CHUNK x CHUNK`` comparison) and writes the chunk's histogram.
2. ``_expert_prefix``: a program per block of experts turns the histograms into each expert's total
   and, per chunk, the rows earlier chunks took in that expert (exclusive prefix over chunks).
3. ``_expert_groups`` (ragged and bounded layouts): one program computes every expert's group of rows
   from the totals, as :func:`moe_ops.stage.plain.group_rows` does (``pad_multiple``, the row bound).
4. ``_scatter_rows``: a program per (source row, hidden block) computes the row's layout rows and copies
   its block to each of them; block 0 records the maps and weights. Every source row is read once, every
   layout row written once, in 16-byte vectors where the row stride allows. Programs past the rows
   write each expert's count, drops and padding rows (zero in ``recv_x`` only with ``zero_padding``).

A route's position inside its expert is (rows earlier chunks took) + (its rank in the chunk), so rows
follow the routes' flat order, as the contract requires, and the result equals
``plain.expert_layout`` + ``plain.expand`` exactly. No aten op runs on the device but the allocations;
the ragged layout reads its row count back only after every launch is queued. On sm_90 and later,
launches 2 to 4 use programmatic dependent launch (:func:`moe_ops.stage.kernels.pdl`): each starts
while the one before it runs and waits on the device before it reads that one's results; the row copy
loads its source rows first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_ops import quant
from moe_ops.plan import RowLayout
from moe_ops.quant import QuantSpec
from moe_ops.stage.kernels import bins_for, block_size, k_block, pdl, unit_columns
from moe_ops.stage.kernels.launch import launch
from moe_ops.stage.kernels.quantize import _quantize_block, quantize_flags, quantize_rows

CHUNK = 128  # routes ranked per program by one CHUNK x CHUNK comparison
FILL_BLOCK = 1024  # padding slots reset per program
SCATTER_H_BLOCK = 1024  # hidden elements per scatter program (tools/bench.py --sweep picks these)
SCATTER_WARPS = 4
PREFIX_EXPERTS = 32  # experts per _expert_prefix program (H200: 32 beat 8 and 16)
RANK_WARPS = 2  # warps per _chunk_ranks program (H200: 2 beat 4 and 8 by 1.5-5 us at T = 4096)
BYTE_H_BLOCK = 4096  # the same for one-byte (quantized) rows (tools/bench.py --quant measured it)
SMALL_ROUTES = 2048  # up to this many routes, one launch (_dispatch_small) does all of dispatch
SMALL_R_BLOCK = 512  # routes compared per step there
SMALL_E_BLOCK = 16  # experts counted per bookkeeping program there (padded layout)
P_BLOCK = 128  # padding rows written per step


@triton.jit
def _valid_keys(ids_ptr, offs, mask, num_local, invalid):
    """The ids at ``offs`` as int32 keys, ``invalid`` where masked, out of range or outside ``mask``."""
    raw = tl.load(ids_ptr + offs, mask=mask, other=-1)
    return tl.where((raw >= 0) & (raw < num_local), raw, invalid).to(tl.int32)  # checked before narrowing


@triton.jit
def _row_routes(ids_ptr, j, top_k, num_local, K_BLOCK: tl.constexpr):
    """Source row ``j``'s routes: ``(j as int64, flat route index [K_BLOCK], lane in the row, expert key
    or -1)``."""
    row_j = j.to(tl.int64)
    k = tl.arange(0, K_BLOCK)
    route = row_j * top_k + k
    in_row = k < top_k
    return row_j, route, in_row, _valid_keys(ids_ptr, route, in_row, num_local, -1)


@triton.jit
def _chunk_ranks(
    ids_ptr, num_routes, num_chunks, num_local, rank_ptr, hist_ptr,
    fill_rows_ptr, fill_weights_ptr, num_fill,
    CHUNK: tl.constexpr, BINS: tl.constexpr, FILL_BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # the next kernel may start (and wait for this one's results)
        tl.extra.cuda.gdc_launch_dependents()
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
    BINS: tl.constexpr, EXPERTS: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr,
):
    """Program b: experts [b*EXPERTS, (b+1)*EXPERTS), over every chunk."""
    if PDL:  # launched early: let the next kernel start too, then wait for the histograms
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
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
def _row_slice(tokens_ptr, token_stride, j, hidden, H_BLOCK: tl.constexpr):
    """This program's hidden block of source row ``j``: ``(columns, values)``."""
    cols = tl.program_id(1) * H_BLOCK + tl.arange(0, H_BLOCK)
    return cols, tl.load(tokens_ptr + j * token_stride + cols, mask=cols < hidden, other=0)


@triton.jit
def _write_routes(
    cols, v, weights_ptr, j, route, in_row, keep, row, hidden,
    recv_x_ptr, recv_weights_ptr, route_row_ptr, row_src_ptr,
    scales_ptr, scale_stride, num_scales, recv_scales_ptr,
    K_BLOCK: tl.constexpr, H_BLOCK: tl.constexpr,
    SCALES: tl.constexpr, S_BLOCK: tl.constexpr, QMAX: tl.constexpr, QMAX_INV: tl.constexpr, GROUP: tl.constexpr, INT8: tl.constexpr,
    ROUND_SCALE: tl.constexpr, AMAX_FLOOR: tl.constexpr,
):
    """Source row ``j``'s routes ``route [K_BLOCK]`` go to layout rows ``row`` where ``keep``: hidden block 0
    records the maps and weights, every block copies its slice ``v`` of the row (:func:`_row_slice`) to each
    kept row. ``SCALES``: 0 plain rows; 1 the row's ``num_scales`` scales (``scales_ptr``) go with it (block
    0 copies them); 2 every block quantizes its slice (groups of ``GROUP`` columns) and stores its scales."""
    row = tl.where(keep, row, -1)
    if tl.program_id(1) == 0:
        tl.store(route_row_ptr + route, row, mask=in_row)
        tl.store(row_src_ptr + row, route, mask=keep)
        tl.store(recv_weights_ptr + row, tl.load(weights_ptr + route, mask=keep), mask=keep)
        if SCALES == 1:
            sc = tl.arange(0, S_BLOCK)
            sv = tl.load(scales_ptr + j * scale_stride + sc, mask=sc < num_scales)
            tl.store(recv_scales_ptr + row[:, None] * num_scales + sc[None, :], tl.broadcast_to(sv[None, :], (K_BLOCK, S_BLOCK)),
                     mask=keep[:, None] & (sc[None, :] < num_scales))
    if SCALES == 2:
        v, scale = _quantize_block(v, QMAX, QMAX_INV, GROUP, INT8, ROUND_SCALE, AMAX_FLOOR, H_BLOCK)
        sc = tl.program_id(1) * (H_BLOCK // GROUP) + tl.arange(0, H_BLOCK // GROUP)
        tl.store(recv_scales_ptr + row[:, None] * num_scales + sc[None, :], tl.broadcast_to(scale[None, :], (K_BLOCK, H_BLOCK // GROUP)),
                 mask=keep[:, None] & (sc[None, :] < num_scales))
    tl.store(recv_x_ptr + row[:, None] * hidden + cols[None, :],
             tl.broadcast_to(v[None, :], (K_BLOCK, H_BLOCK)).to(recv_x_ptr.dtype.element_ty),
             mask=keep[:, None] & (cols[None, :] < hidden))


@triton.jit
def _groups(totals, bins, num_local, pad_multiple, max_rows, PAD: tl.constexpr, BOUNDED: tl.constexpr):
    """:func:`moe_ops.stage.plain.group_rows` over the route counts ``totals [BINS]`` of every expert:
    ``(first row, rows, kept routes)`` of each expert's group, as ``[BINS]`` vectors."""
    group = totals
    if PAD:
        group = (tl.maximum(totals, 1) + pad_multiple - 1) // pad_multiple * pad_multiple
    group = tl.where(bins < num_local, group, 0)
    start = tl.cumsum(group, axis=0) - group
    if BOUNDED:
        group = tl.minimum(tl.maximum(max_rows - start, 0), group)
    return start, group, tl.minimum(totals, group)


@triton.jit
def _pick(values, bins, key):
    """``values[key]`` per lane of ``key`` (a gather from the register vector ``values [BINS]``)."""
    return tl.sum(tl.where(bins[None, :] == key[:, None], values[None, :], 0), axis=1)


@triton.jit
def _blank_rows(lo, hi, hidden, recv_x_ptr, recv_weights_ptr, row_src_ptr,
                ZERO: tl.constexpr, H_BLOCK: tl.constexpr, P_BLOCK: tl.constexpr):
    """Padding rows ``[lo, hi)``: row_src -1 and weight 0 (hidden block 0); with ``ZERO`` this program's
    hidden block of ``recv_x`` zero."""
    cols = tl.program_id(1) * H_BLOCK + tl.arange(0, H_BLOCK)
    for p0 in range(lo, hi, P_BLOCK):
        r = p0 + tl.arange(0, P_BLOCK)
        inside = r < hi
        if tl.program_id(1) == 0:
            tl.store(row_src_ptr + r, tl.full([P_BLOCK], -1, tl.int64), mask=inside)
            tl.store(recv_weights_ptr + r, tl.zeros([P_BLOCK], tl.float32).to(recv_weights_ptr.dtype.element_ty), mask=inside)
        if ZERO:
            tl.store(recv_x_ptr + r[:, None].to(tl.int64) * hidden + cols[None, :],
                     tl.zeros([P_BLOCK, H_BLOCK], tl.float32).to(recv_x_ptr.dtype.element_ty),
                     mask=inside[:, None] & (cols[None, :] < hidden))


@triton.jit
def _expert_rows(e, routes, start, group, kept, used, num_local, max_rows, hidden,
                 recv_x_ptr, recv_weights_ptr, row_src_ptr, counts_ptr, dropped_ptr,
                 BOUNDED: tl.constexpr, ZERO: tl.constexpr, H_BLOCK: tl.constexpr, P_BLOCK: tl.constexpr):
    """Expert ``e``'s bookkeeping in a ragged or bounded layout, from its ``routes``, first row ``start``,
    rows ``group`` and ``kept`` routes (scalars; ``used``: the rows of every group): its count and drops,
    its padding rows, and (bounded) its share of the rows past the last group."""
    if tl.program_id(1) == 0:
        tl.store(counts_ptr + e, group)
        tl.store(dropped_ptr + e, routes - kept)
    _blank_rows(start + kept, start + group, hidden, recv_x_ptr, recv_weights_ptr, row_src_ptr, ZERO, H_BLOCK, P_BLOCK)
    if BOUNDED:
        share = tl.cdiv(max_rows - used, num_local)
        lo = used + e * share
        _blank_rows(lo, tl.minimum(lo + share, max_rows), hidden, recv_x_ptr, recv_weights_ptr, row_src_ptr, ZERO, H_BLOCK, P_BLOCK)


@triton.jit
def _expert_groups(groups_ptr, num_local, pad_multiple, max_rows,
                   BINS: tl.constexpr, PAD: tl.constexpr, BOUNDED: tl.constexpr, PDL: tl.constexpr):
    """One program, ragged and bounded layouts: every expert's group of rows from its routes (``groups``
    ``[3*BINS : 4*BINS)``, written by ``_expert_prefix``): first row, rows and kept routes at ``[0, BINS)``,
    ``[BINS, 2*BINS)``, ``[2*BINS, 3*BINS)``, and the rows of every group at ``4*BINS``."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    bins = tl.arange(0, BINS)
    totals = tl.load(groups_ptr + 3 * BINS + bins, mask=bins < num_local, other=0)
    start, group, kept = _groups(totals, bins, num_local, pad_multiple, max_rows, PAD, BOUNDED)
    tl.store(groups_ptr + bins, start)
    tl.store(groups_ptr + BINS + bins, group)
    tl.store(groups_ptr + 2 * BINS + bins, kept)
    tl.store(groups_ptr + 4 * BINS, tl.sum(group))


@triton.jit
def _scatter_rows(
    tokens_ptr, token_stride, weights_ptr, ids_ptr, rank_ptr, chunk_base_ptr, groups_ptr,
    num_tokens, top_k, hidden, num_local, capacity, max_rows,
    recv_x_ptr, recv_weights_ptr, route_row_ptr, row_src_ptr, counts_ptr, dropped_ptr,
    scales_ptr, scale_stride, num_scales, recv_scales_ptr,
    CHUNK: tl.constexpr, BINS: tl.constexpr, K_BLOCK: tl.constexpr, H_BLOCK: tl.constexpr,
    PADDED: tl.constexpr, PAD: tl.constexpr, BOUNDED: tl.constexpr, ZERO: tl.constexpr, P_BLOCK: tl.constexpr,
    SCALES: tl.constexpr, S_BLOCK: tl.constexpr, QMAX: tl.constexpr, QMAX_INV: tl.constexpr, GROUP: tl.constexpr, INT8: tl.constexpr,
    ROUND_SCALE: tl.constexpr, AMAX_FLOOR: tl.constexpr, PDL: tl.constexpr,
):
    """Program (j, b), ``j < num_tokens``: source row j, hidden block b. Every program of row j computes
    its routes' rows (a few loads); block 0 records them, every block copies its slice of the row to each
    of them. Ragged and bounded layouts: program (num_tokens + e, b) does expert e's bookkeeping
    (:func:`_expert_rows`) from the groups ``_expert_groups`` wrote. ``PDL``: launched before the kernels
    it reads from finish; it loads its source rows, then waits for them (:func:`pdl`)."""
    j = tl.program_id(0)
    if j < num_tokens:
        # the kernel's inputs first: with PDL these loads overlap the kernels before it
        row_j, route, in_row, key = _row_routes(ids_ptr, j, top_k, num_local, K_BLOCK)
        cols, v = _row_slice(tokens_ptr, token_stride, row_j, hidden, H_BLOCK)
        if PDL:
            tl.extra.cuda.gdc_wait()
        valid = key >= 0
        pos = tl.load(chunk_base_ptr + (route // CHUNK) * BINS + key, mask=valid, other=0) + tl.load(rank_ptr + route, mask=valid, other=0)
        if PADDED:  # slot pos of expert key, if it fits
            keep = valid & (pos < capacity)
            row = key.to(tl.int64) * capacity + pos
        else:  # the expert's first row + pos, among its kept routes
            keep = valid & (pos < tl.load(groups_ptr + 2 * BINS + key, mask=valid, other=0))
            row = (tl.load(groups_ptr + key, mask=valid, other=0) + pos).to(tl.int64)
        _write_routes(cols, v, weights_ptr, row_j, route, in_row, keep, row, hidden,
                      recv_x_ptr, recv_weights_ptr, route_row_ptr, row_src_ptr, scales_ptr, scale_stride, num_scales, recv_scales_ptr,
                      K_BLOCK, H_BLOCK, SCALES, S_BLOCK, QMAX, QMAX_INV, GROUP, INT8, ROUND_SCALE, AMAX_FLOOR)
    elif not PADDED:
        if PDL:
            tl.extra.cuda.gdc_wait()
        e = j - num_tokens
        _expert_rows(e, tl.load(groups_ptr + 3 * BINS + e), tl.load(groups_ptr + e), tl.load(groups_ptr + BINS + e),
                     tl.load(groups_ptr + 2 * BINS + e), tl.load(groups_ptr + 4 * BINS), num_local, max_rows, hidden,
                     recv_x_ptr, recv_weights_ptr, row_src_ptr, counts_ptr, dropped_ptr, BOUNDED, ZERO, H_BLOCK, P_BLOCK)


@triton.jit
def _route_counts(ids_ptr, num_routes, num_local, BINS: tl.constexpr, R_BLOCK: tl.constexpr):
    """``[BINS]``: the routes to each expert, over all ``num_routes`` routes."""
    bins = tl.arange(0, BINS)
    totals = tl.zeros([BINS], tl.int32)
    for r0 in range(0, num_routes, R_BLOCK):
        r = r0 + tl.arange(0, R_BLOCK)
        key = _valid_keys(ids_ptr, r, r < num_routes, num_local, num_local)
        valid = key < num_local  # count invalid routes in bin 0, then take them out again
        totals += tl.histogram(tl.where(valid, key, 0), BINS) - tl.where(bins == 0, tl.sum((~valid).to(tl.int32), axis=0), 0)
    return totals


@triton.jit
def _small_expert_rows(e, ids_ptr, num_routes, num_local, max_rows, hidden,
                       recv_x_ptr, recv_weights_ptr, row_src_ptr, counts_ptr, dropped_ptr,
                       totals, start_v, group_v, kept_v, bins,
                       PAD: tl.constexpr, BOUNDED: tl.constexpr, ZERO: tl.constexpr,
                       H_BLOCK: tl.constexpr, R_BLOCK: tl.constexpr, P_BLOCK: tl.constexpr):
    """Expert ``e``'s bookkeeping in ``_dispatch_small`` (ragged, bounded): with ``pad_multiple`` from the
    groups of every expert (``totals``, ``start_v``, ``group_v``, ``kept_v``), else counted over every route."""
    if PAD:
        here = bins == e
        routes = tl.sum(tl.where(here, totals, 0))
        start = tl.sum(tl.where(here, start_v, 0))
        group = tl.sum(tl.where(here, group_v, 0))
        kept = tl.sum(tl.where(here, kept_v, 0))
        used = tl.sum(group_v)
    else:  # one row per route
        routes = tl.zeros([], tl.int32)
        start = tl.zeros([], tl.int32)
        used = tl.zeros([], tl.int32)
        for r0 in range(0, num_routes, R_BLOCK):
            r = r0 + tl.arange(0, R_BLOCK)
            other = _valid_keys(ids_ptr, r, r < num_routes, num_local, -1)
            routes += tl.sum((other == e).to(tl.int32))
            start += tl.sum(((other >= 0) & (other < e)).to(tl.int32))
            used += tl.sum((other >= 0).to(tl.int32))
        group = routes
        if BOUNDED:
            group = tl.minimum(tl.maximum(max_rows - start, 0), routes)
            used = tl.minimum(used, max_rows)
        kept = group
    _expert_rows(e, routes, start, group, kept, used, num_local, max_rows, hidden,
                 recv_x_ptr, recv_weights_ptr, row_src_ptr, counts_ptr, dropped_ptr, BOUNDED, ZERO, H_BLOCK, P_BLOCK)


@triton.jit
def _dispatch_small(
    tokens_ptr, token_stride, weights_ptr, ids_ptr, num_tokens, top_k, hidden, num_local, capacity, pad_multiple, max_rows,
    recv_x_ptr, recv_weights_ptr, route_row_ptr, row_src_ptr, counts_ptr, dropped_ptr,
    scales_ptr, scale_stride, num_scales, recv_scales_ptr,
    PADDED: tl.constexpr, PAD: tl.constexpr, BOUNDED: tl.constexpr, ZERO: tl.constexpr, BINS: tl.constexpr,
    K_BLOCK: tl.constexpr, H_BLOCK: tl.constexpr, R_BLOCK: tl.constexpr, E_BLOCK: tl.constexpr, P_BLOCK: tl.constexpr,
    SCALES: tl.constexpr, S_BLOCK: tl.constexpr, QMAX: tl.constexpr, QMAX_INV: tl.constexpr, GROUP: tl.constexpr, INT8: tl.constexpr,
    ROUND_SCALE: tl.constexpr, AMAX_FLOOR: tl.constexpr,
):
    """All of dispatch in one launch, for few routes. Program (j, b) with ``j < num_tokens``: source row j,
    hidden block b; it finds its routes' positions by comparing them with every route (no workspace, no
    prefix pass; with ``pad_multiple``, the groups from a histogram of every route). Padded layout:
    program (num_tokens + e, 0) counts experts ``[e*E_BLOCK, (e+1)*E_BLOCK)`` and resets the slots they
    leave unused; ragged and bounded: program (num_tokens + e, b) does expert e's bookkeeping."""
    j = tl.program_id(0)
    num_routes = num_tokens * top_k
    bins = tl.arange(0, BINS)
    totals = tl.zeros([BINS], tl.int32)  # with pad_multiple: every expert's routes, and its group
    start_v, group_v, kept_v = totals, totals, totals
    if PAD:
        totals = _route_counts(ids_ptr, num_routes, num_local, BINS, R_BLOCK)
        start_v, group_v, kept_v = _groups(totals, bins, num_local, pad_multiple, max_rows, PAD, BOUNDED)
    if j < num_tokens:
        row_j, route, in_row, key = _row_routes(ids_ptr, j, top_k, num_local, K_BLOCK)
        pos = tl.zeros([K_BLOCK], tl.int32)  # equal keys among earlier routes
        start = tl.zeros([K_BLOCK], tl.int32)  # ragged, bounded: routes to smaller experts
        for r0 in range(0, num_routes, R_BLOCK):
            r = r0 + tl.arange(0, R_BLOCK)
            other = _valid_keys(ids_ptr, r, r < num_routes, num_local, -2)  # -2 matches no key
            pos += tl.sum(((other[None, :] == key[:, None]) & (r[None, :] < route[:, None])).to(tl.int32), axis=1)
            if not PADDED and not PAD:
                start += tl.sum(((other[None, :] < key[:, None]) & (other[None, :] >= 0)).to(tl.int32), axis=1)
        valid = key >= 0
        if PADDED:
            keep = valid & (pos < capacity)
            row = key.to(tl.int64) * capacity + pos
        else:
            if PAD:
                start = _pick(start_v, bins, key)
            row = (start + pos).to(tl.int64)
            keep = valid
            if BOUNDED:  # the groups' rows past max_rows are cut
                keep = valid & (row < max_rows)
        cols, v = _row_slice(tokens_ptr, token_stride, row_j, hidden, H_BLOCK)
        _write_routes(cols, v, weights_ptr, row_j, route, in_row, keep, row, hidden,
                      recv_x_ptr, recv_weights_ptr, route_row_ptr, row_src_ptr, scales_ptr, scale_stride, num_scales, recv_scales_ptr,
                      K_BLOCK, H_BLOCK, SCALES, S_BLOCK, QMAX, QMAX_INV, GROUP, INT8, ROUND_SCALE, AMAX_FLOOR)
    elif not PADDED:
        _small_expert_rows(j - num_tokens, ids_ptr, num_routes, num_local, max_rows, hidden,
                           recv_x_ptr, recv_weights_ptr, row_src_ptr, counts_ptr, dropped_ptr,
                           totals, start_v, group_v, kept_v, bins,
                           PAD, BOUNDED, ZERO, H_BLOCK, R_BLOCK, P_BLOCK)
    elif tl.program_id(1) == 0:
        e = (j - num_tokens) * E_BLOCK + tl.arange(0, E_BLOCK)
        total = tl.zeros([E_BLOCK], tl.int32)
        for r0 in range(0, num_routes, R_BLOCK):
            r = r0 + tl.arange(0, R_BLOCK)
            other = _valid_keys(ids_ptr, r, r < num_routes, num_local, -1)
            total += tl.sum((other[None, :] == e[:, None]).to(tl.int32), axis=1)
        kept = tl.minimum(total, capacity)
        tl.store(counts_ptr + e, kept, mask=e < num_local)
        tl.store(dropped_ptr + e, total - kept, mask=e < num_local)
        for p0 in range(0, capacity, P_BLOCK):
            p = p0 + tl.arange(0, P_BLOCK)
            unused = (e[:, None] < num_local) & (p[None, :] >= kept[:, None]) & (p[None, :] < capacity)
            slot = e[:, None].to(tl.int64) * capacity + p[None, :]
            tl.store(row_src_ptr + slot, tl.full([E_BLOCK, P_BLOCK], -1, tl.int64), mask=unused)
            tl.store(recv_weights_ptr + slot, tl.zeros([E_BLOCK, P_BLOCK], tl.float32).to(recv_weights_ptr.dtype.element_ty), mask=unused)


def _scale_args(
    recv_x: Tensor, recv_scales: Tensor | None, scales: Tensor | None, quantize: QuantSpec | None, h_block: int
) -> tuple[tuple[object, ...], dict[str, object]]:
    """The kernels' scale arguments and flags (``SCALES`` 0: none, 1: ``scales`` move with the rows, 2:
    ``quantize`` block by block)."""
    mode = 0 if recv_scales is None else 1 if quantize is None else 2
    source = scales if scales is not None else recv_x  # a pointer the kernel never reads where mode != 1
    num_scales = 0 if recv_scales is None else recv_scales.shape[-1]
    flags = dict(SCALES=mode, S_BLOCK=triton.next_power_of_2(max(num_scales, 1)), **quantize_flags(quantize, h_block))
    stride = source.stride(0) if scales is not None else 0
    return (source, stride, num_scales, recv_x if recv_scales is None else recv_scales), flags


def dispatch_rows(
    tokens: Tensor,
    weights: Tensor,
    ids: Tensor,
    num_local: int,
    rows: RowLayout,
    num_routes: int | None = None,
    scales: Tensor | None = None,
    quantize: QuantSpec | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Triton twin of ``plain.expert_layout`` + ``plain.expand``.

    ``tokens [M, H]`` (rows may be strided), ``weights [M, K]``, ``ids [M, K]`` local expert ids
    (anything outside ``[0, num_local)`` is masked), laid out as ``rows`` says. Returns ``(recv_x,
    recv_weights, tokens_per_expert, dropped, route_row, row_src, recv_scales)`` in the layouts of
    docs/contract.md; padding rows of ``recv_x`` are left unwritten unless ``rows.zero_padding``.
    ``num_routes`` (the valid routes, where the caller knows them) saves the ragged layout's
    device-to-host read (unless ``pad_multiple`` pads its groups). Quantized rows: ``scales [M, S]`` float32
    (rows may be strided) move with ``tokens``, or ``quantize`` quantizes them in the copy (block scales;
    one scale per token is quantized first, by :func:`quantize_rows`); ``recv_scales`` is ``None`` otherwise. Up
    to ``SMALL_ROUTES`` routes take one launch (``_dispatch_small``), more take three (padded) or four.
    Nothing else runs on the device but the allocations.
    """
    if quantize is not None and quantize.block == 0:  # a program holds a block of the row, not all of it
        tokens, scales = quantize_rows(tokens, quantize)
        quantize = None
    m, top_k = ids.shape
    hidden, device = tokens.shape[1], tokens.device
    assert unit_columns(tokens) and weights.is_contiguous() and ids.is_contiguous()
    assert scales is None or unit_columns(scales)
    kind, capacity, max_rows = rows.kind, rows.capacity, rows.max_rows
    padded, bounded = kind == "padded", kind == "bounded"
    pad = 1 if padded else rows.pad_multiple
    all_routes = m * top_k
    # The ragged layout's row count is read back to the host only after every kernel is queued: the rows
    # are laid out in room for every route (and every group's padding; the caller's count where it knows
    # it and nothing is padded), then cut to the count.
    if padded:
        rows_shape: tuple[int, ...] = (num_local, capacity)
    elif bounded:
        rows_shape = (max_rows,)
    elif pad > 1:  # each group its routes rounded up; pad rows for an expert with none
        rows_shape = (all_routes + num_local * pad,)
    else:
        rows_shape = (all_routes if num_routes is None else num_routes,)
    cut = kind == "ragged" and (pad > 1 or num_routes is None)
    out_dtype = tokens.dtype if quantize is None else quantize.dtype
    recv_x = (torch.zeros if rows.zero_padding and padded else torch.empty)(*rows_shape, hidden, dtype=out_dtype, device=device)
    recv_scales = None
    if scales is not None or quantize is not None:
        columns = scales.shape[1] if scales is not None else quant.scale_columns(hidden, quantize.block)  # type: ignore[union-attr]
        recv_scales = (torch.zeros if rows.zero_padding else torch.empty)(*rows_shape, columns, dtype=torch.float32, device=device)
    recv_weights = torch.empty(rows_shape, dtype=weights.dtype, device=device)
    row_src = torch.empty(rows_shape, dtype=torch.int64, device=device)
    counts = torch.empty(num_local, dtype=torch.int32, device=device)
    dropped = torch.empty_like(counts)
    route_row = torch.empty(m, top_k, dtype=torch.int64, device=device)
    h_block = block_size(hidden, BYTE_H_BLOCK if recv_x.element_size() == 1 else SCATTER_H_BLOCK)
    if quantize is not None:  # whole groups per program
        h_block = max(h_block, quantize.block)
    recv_x_bytes = recv_x
    if recv_x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # stored as bytes (quantized: the bytes it builds)
        recv_x_bytes = recv_x.view(torch.uint8)
        tokens = tokens if quantize is not None else tokens.view(torch.uint8)
    h_blocks = max(1, triton.cdiv(hidden, h_block))
    bins = bins_for(num_local)
    scale_args, scale_flags = _scale_args(recv_x_bytes, recv_scales, scales, quantize, h_block)
    flags = dict(PADDED=padded, PAD=pad > 1, BOUNDED=bounded, ZERO=rows.zero_padding and not padded, K_BLOCK=k_block(top_k),
                 H_BLOCK=h_block, P_BLOCK=P_BLOCK, num_warps=SCATTER_WARPS, **scale_flags)
    bookkeeping = triton.cdiv(num_local, SMALL_E_BLOCK) if padded else num_local
    if all_routes <= SMALL_ROUTES or not m:
        launch(_dispatch_small, (m + bookkeeping, h_blocks),
            tokens, tokens.stride(0), weights, ids, m, top_k, hidden, num_local, capacity, pad, max_rows,
            recv_x_bytes, recv_weights, route_row, row_src, counts, dropped, *scale_args,
            BINS=bins, R_BLOCK=SMALL_R_BLOCK, E_BLOCK=SMALL_E_BLOCK, **flags,
        )
    else:
        num_chunks = triton.cdiv(all_routes, CHUNK)
        slots = num_local * capacity if padded else 0
        # one int32 workspace: per-route ranks, chunk histograms, per-chunk bases, the experts' groups
        work = torch.empty(all_routes + 2 * num_chunks * bins + 4 * bins + 1, dtype=torch.int32, device=device)
        rank, hist, chunk_base, groups = work.split([all_routes, num_chunks * bins, num_chunks * bins, 4 * bins + 1])
        # each kernel after the first may start as the one before it finishes (PDL), and waits for its results
        early = pdl(tokens)
        follow = dict(PDL=early, **({"launch_pdl": True} if early else {}))
        launch(_chunk_ranks, (max(num_chunks, triton.cdiv(slots, FILL_BLOCK)),),
            ids, all_routes, num_chunks, num_local, rank, hist, row_src, recv_weights, slots,
            CHUNK=CHUNK, BINS=bins, FILL_BLOCK=FILL_BLOCK, PDL=early, num_warps=RANK_WARPS,
        )
        experts = min(bins, PREFIX_EXPERTS)
        launch(_expert_prefix, (bins // experts,),
            hist, num_chunks, num_local, capacity if padded else -1, chunk_base, counts if padded else groups[3 * bins:], dropped,
            BINS=bins, EXPERTS=experts, ROWS=max(1, 8192 // experts), **follow,
        )
        if not padded:
            launch(_expert_groups, (1,), groups, num_local, pad, max_rows, BINS=bins, PAD=pad > 1, BOUNDED=bounded, **follow)
        launch(_scatter_rows, (m + (0 if padded else num_local), h_blocks),
            tokens, tokens.stride(0), weights, ids, rank, chunk_base, groups,
            m, top_k, hidden, num_local, capacity, max_rows,
            recv_x_bytes, recv_weights, route_row, row_src, counts, dropped, *scale_args,
            CHUNK=CHUNK, BINS=bins, **flags, **follow,
        )
    if cut:
        n = int(counts.sum())
        return recv_x[:n], recv_weights[:n], counts, dropped, route_row, row_src[:n], None if recv_scales is None else recv_scales[:n]
    return recv_x, recv_weights, counts, dropped, route_row, row_src, recv_scales
