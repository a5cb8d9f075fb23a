"""Rows stored straight into peers' buffers (the ``symm`` backend's transport), as Triton kernels.

The sender has ``W * B`` slots: slot ``i = d * B + t`` goes to rank ``d``, where it lands in row
``rank * B + t`` of that rank's buffer. Each row of a buffer is ``row_bytes`` long: a payload at byte 0
(a quantized dispatch: its scales at ``scales_offset``) and, optionally, metadata at ``meta_offset``. A
slot without a payload sends only its metadata, so a token crosses a link once per destination rank that
needs it.

* ``_put_tokens`` (dispatch): reads the routes itself; slot ``d * B + t`` carries token ``t`` if one of
  its routes goes to rank ``d``, and always its ids local to ``d`` and their router weights. A quantized
  dispatch stores the token's float32 scales beside it in the same row (moved as they came, or computed
  here: the kernel quantizes each block as it stores it, :func:`moe_ops.stage.kernels.quantize._quantize_block`).
* ``_put_rows`` (combine, the backward passes): ``src_index[i]`` names slot ``i``'s source row
  (``-1``: none); ``meta[i]`` (int32 words), if given, is always sent.

Both are persistent: ``programs`` programs (``moe_ops.config.symm_num_sms``, one per SM in practice)
walk the items, each a tile of several slots' rows (so many rows' loads are in flight in a program at
once), which bounds the SMs a transfer occupies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_ops import quant
from moe_ops.quant import QuantSpec
from moe_ops.stage.kernels import block_size, k_block, unit_columns
from moe_ops.stage.kernels.launch import launch
from moe_ops.stage.kernels.quantize import _quantize_block, quantize_flags

PUT_BLOCK = 2048  # payload elements per row of a tile
PUT_TILE = 16384  # elements a program moves per step: PUT_TILE // block rows at once (bytes in flight)
PUT_WARPS = 16


@triton.jit
def _slot_tile(item, blocks, num_slots, rank, bound, peers_ptr, row_bytes, ROWS: tl.constexpr):
    """Item ``item``'s ROWS slots, their payload block, and each slot's row address in its destination's buffer."""
    slot = (item // blocks) * ROWS + tl.arange(0, ROWS)
    in_range = slot < num_slots
    row = rank * bound + slot % bound  # where the slot lands in its destination's buffer
    base = tl.load(peers_ptr + slot // bound, mask=in_range, other=0) + row.to(tl.int64) * row_bytes
    return slot, item % blocks, in_range, base


@triton.jit
def _row_pointer(base, offset, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    """``base + offset`` (byte addresses) as pointers to ``DTYPE``, declared ``ALIGN``-byte aligned. The
    hint goes on the pointers: Triton does not carry one on the integers through the cast, and without it
    every store is scalar."""
    return tl.multiple_of((base + offset).to(tl.pointer_type(DTYPE)), [ALIGN])


@triton.jit
def _load_payload(src_ptr, src_stride, src_row, b, payload_cols, BLOCK: tl.constexpr):
    """Columns of block ``b`` of source rows ``src_row`` (-1: none): ``(values [ROWS, BLOCK] (0 where
    masked), cols [BLOCK], mask)``."""
    cols = b * BLOCK + tl.arange(0, BLOCK)
    mask = (src_row >= 0)[:, None] & (cols < payload_cols)[None, :]
    return tl.load(src_ptr + src_row[:, None] * src_stride + cols[None, :], mask=mask, other=0), cols, mask


@triton.jit
def _store_fields(base, offset, v, cols, mask):
    """``v [ROWS, n]`` to columns ``cols`` of the field at byte ``offset`` of the rows at addresses ``base``
    (fields start 16-byte aligned: buffers, rows and field offsets are)."""
    out = _row_pointer(base, offset, v.dtype, 16)
    tl.store(out[:, None] + cols[None, :], v, mask=mask)


@triton.jit
def _store_payload(src_ptr, src_stride, src_row, base, b, payload_cols, BLOCK: tl.constexpr):
    """Columns of block ``b`` of source rows ``src_row`` (-1: none) to the rows at addresses ``base``."""
    v, cols, mask = _load_payload(src_ptr, src_stride, src_row, b, payload_cols, BLOCK)
    _store_fields(base, 0, v, cols, mask)


@triton.jit
def _put_rows(
    src_ptr, src_stride, src_index_ptr, meta_ptr, meta_words, peers_ptr,
    rank, bound, num_slots, payload_cols, row_bytes, meta_offset,
    HAS_META: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, META_BLOCK: tl.constexpr,
):
    """Each step: ROWS slots x BLOCK payload columns, so many rows' loads are in flight at once."""
    blocks = tl.maximum(tl.cdiv(payload_cols, BLOCK), 1)
    for item in range(tl.program_id(0), tl.cdiv(num_slots, ROWS) * blocks, tl.num_programs(0)):
        slot, b, in_range, base = _slot_tile(item, blocks, num_slots, rank, bound, peers_ptr, row_bytes, ROWS)
        src_row = tl.load(src_index_ptr + slot, mask=in_range, other=-1)
        _store_payload(src_ptr, src_stride, src_row, base, b, payload_cols, BLOCK)
        if HAS_META:
            if b == 0:
                w = tl.arange(0, META_BLOCK)
                words = in_range[:, None] & (w < meta_words)[None, :]
                m = tl.load(meta_ptr + slot[:, None].to(tl.int64) * meta_words + w[None, :], mask=words)
                meta_out = _row_pointer(base, meta_offset, tl.int32, 16)  # the payload is padded to 16 bytes
                tl.store(meta_out[:, None] + w[None, :], m, mask=words)


@triton.jit
def _put_tokens(
    x_ptr, x_stride, idx_ptr, weights_ptr, peers_ptr,
    rank, bound, num_slots, num_tokens, top_k, num_local, num_experts, hidden, row_bytes, meta_offset, weights_offset,
    scales_ptr, scale_stride, num_scales, scales_offset,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, K_BLOCK: tl.constexpr,
    SCALES: tl.constexpr, S_BLOCK: tl.constexpr, QMAX: tl.constexpr, QMAX_INV: tl.constexpr, GROUP: tl.constexpr,
    INT8: tl.constexpr, ROUND_SCALE: tl.constexpr, AMAX_FLOOR: tl.constexpr,
):
    """Dispatch's transfer: slot ``d * bound + t`` carries token ``t`` to rank ``d`` if one of its routes
    goes there, and always its ``K`` ids local to ``d`` (-1 where not there) and their router weights.
    ``SCALES``: 0 plain rows; 1 the token's ``num_scales`` scales (``scales_ptr``) go with it (block 0
    stores them at ``scales_offset``); 2 every block quantizes its slice (int8 with ``INT8``, else e4m3's bytes; groups of
    ``GROUP`` columns, whole groups per block) and stores the slice's scales there."""
    blocks = tl.maximum(tl.cdiv(hidden, BLOCK), 1)
    for item in range(tl.program_id(0), tl.cdiv(num_slots, ROWS) * blocks, tl.num_programs(0)):
        slot, b, in_range, base = _slot_tile(item, blocks, num_slots, rank, bound, peers_ptr, row_bytes, ROWS)
        t = slot % bound
        dest = slot // bound
        k = tl.arange(0, K_BLOCK)
        route = t.to(tl.int64)[:, None] * top_k + k[None, :]
        ids = tl.load(idx_ptr + route, mask=(in_range & (t < num_tokens))[:, None] & (k < top_k)[None, :], other=-1)
        mine = (ids >= 0) & (ids < num_experts) & (ids // num_local == dest[:, None])  # checked before narrowing
        goes = tl.max(mine.to(tl.int32), axis=1) > 0
        v, cols, mask = _load_payload(x_ptr, x_stride, tl.where(goes, t, -1).to(tl.int64), b, hidden, BLOCK)
        if SCALES == 2:  # the rows are zero past the row and where masked: amax holds the floor there
            q, scale = _quantize_block(tl.reshape(v, [ROWS * BLOCK]), QMAX, QMAX_INV, GROUP, INT8, ROUND_SCALE,
                                       AMAX_FLOOR, ROWS * BLOCK)
            if INT8:  # int8 values (exact)
                v = tl.reshape(q, [ROWS, BLOCK]).to(tl.int8)
            else:  # e4m3's bytes
                v = tl.reshape(q, [ROWS, BLOCK]).to(tl.uint8)
            sc = b * (BLOCK // GROUP) + tl.arange(0, BLOCK // GROUP)
            _store_fields(base, scales_offset, tl.reshape(scale, [ROWS, BLOCK // GROUP]), sc,
                          goes[:, None] & (sc < num_scales)[None, :])
        _store_fields(base, 0, v, cols, mask)
        if b == 0:
            if SCALES == 1:
                sc = tl.arange(0, S_BLOCK)
                held = goes[:, None] & (sc < num_scales)[None, :]
                s = tl.load(scales_ptr + t.to(tl.int64)[:, None] * scale_stride + sc[None, :], mask=held)
                _store_fields(base, scales_offset, s, sc, held)
            fields = in_range[:, None] & (k < top_k)[None, :]
            local = tl.where(mine, ids - dest[:, None] * num_local, -1).to(tl.int32)
            ids_out = _row_pointer(base, meta_offset, tl.int32, 16)  # the payload is padded to 16 bytes
            tl.store(ids_out[:, None] + k[None, :], local, mask=fields)
            w = tl.load(weights_ptr + route, mask=mine, other=0)
            w_out = _row_pointer(base, meta_offset + weights_offset, weights_ptr.dtype.element_ty, 8)  # packing.RowFormat: 8
            tl.store(w_out[:, None] + k[None, :], w, mask=fields)


def _launch_shape(block: int, payload_cols: int, num_slots: int, programs: int) -> tuple[int, int]:
    """``(rows, programs)``: slots per step of ``block`` payload columns, programs to launch."""
    rows = max(1, PUT_TILE // block)
    items = triton.cdiv(num_slots, rows) * max(1, triton.cdiv(payload_cols, block))
    return rows, max(1, min(programs, items))


def _token_block(hidden: int, quantize: QuantSpec | None) -> int:
    """Payload columns per step of dispatch's put; quantizing, whole scale groups (one scale per token:
    the whole row)."""
    if quantize is None:
        return block_size(hidden, PUT_BLOCK)
    if quantize.block == 0:
        return triton.next_power_of_2(max(hidden, 1))
    return max(block_size(hidden, PUT_BLOCK), quantize.block)


def put_rows(
    src: Tensor,
    src_index: Tensor,
    meta: Tensor | None,
    peers: Tensor,
    rank: int,
    bound: int,
    row_bytes: int,
    meta_offset: int,
    programs: int,
) -> None:
    """Store slot ``i``'s payload ``src[src_index[i]]`` (``src [R, P]``, rows may be strided; ``-1``: none)
    and its ``meta [S, M]`` int32 words (``S = W * bound``) into row ``rank * bound + i % bound`` of rank
    ``i // bound``'s buffer, whose address is ``peers[i // bound]``. Buffers must be 16-byte aligned and
    ``row_bytes`` a multiple of 16."""
    num_slots = src_index.numel()
    payload_cols = src.shape[1]
    if not unit_columns(src):
        src = src.contiguous()
    assert src_index.is_contiguous() and row_bytes % 16 == 0
    assert meta is None or (meta.dtype == torch.int32 and meta.is_contiguous() and meta.shape[0] == num_slots)
    if not num_slots:
        return
    meta_words = 0 if meta is None else meta.shape[1]
    block = block_size(payload_cols, PUT_BLOCK)
    rows, grid = _launch_shape(block, payload_cols, num_slots, programs)
    launch(_put_rows, (grid,),
        src, src.stride(0), src_index, src_index if meta is None else meta, meta_words, peers,
        rank, bound, num_slots, payload_cols, row_bytes, meta_offset,
        HAS_META=meta is not None, ROWS=rows, BLOCK=block,
        META_BLOCK=triton.next_power_of_2(max(meta_words, 1)), num_warps=PUT_WARPS,
    )


def put_tokens(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    num_local: int,
    peers: Tensor,
    rank: int,
    bound: int,
    row_bytes: int,
    meta_offset: int,
    weights_offset: int,
    programs: int,
    scales: Tensor | None = None,
    quantize: QuantSpec | None = None,
    scales_offset: int = 0,
) -> None:
    """Dispatch's transfer, reading the routes directly: slot ``d * bound + t`` (``d`` over the ``W =
    len(peers)`` ranks) carries token ``t`` of ``x [T, H]`` to rank ``d`` if one of its routes ``topk_idx
    [T, K]`` (expert ``e`` lives on rank ``e // num_local``; ids outside ``[0, W * num_local)`` are masked)
    goes there; every slot's ``K`` int32 ids local to ``d`` (-1 elsewhere) go to ``meta_offset`` and their
    ``topk_weights`` (0 elsewhere) to ``meta_offset + weights_offset`` of its row.

    Quantized rows (at most one of): ``scales [T, S]`` float32 go with ``x`` (1-byte elements, moved as
    they are); or ``quantize`` quantizes ``x`` (bf16/fp16/fp32) to ``quantize.dtype`` as it stores it, as
    :func:`moe_ops.quant.quantize` defines it. Either way a sent token's ``S`` scales go to
    ``scales_offset`` of its row (16-byte aligned, as ``meta_offset``)."""
    num_tokens, top_k = topk_idx.shape
    world, hidden = peers.numel(), x.shape[1]
    assert unit_columns(x) and topk_idx.is_contiguous() and topk_weights.is_contiguous()
    assert row_bytes % 16 == 0 and num_tokens <= bound and (scales is None or quantize is None)
    if not bound:
        return
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # moved as bytes: the same bits, any format
        x = x.view(torch.uint8)
    block = _token_block(hidden, quantize)
    rows, grid = _launch_shape(block, hidden, world * bound, programs)
    flags = dict(SCALES=0, S_BLOCK=1, **quantize_flags(quantize, block))
    num_scales, source = 0, x  # (a pointer the kernel never reads without scales)
    if scales is not None:
        assert scales.dtype == torch.float32 and unit_columns(scales) and x.element_size() == 1
        num_scales, source = scales.shape[1], scales
        flags.update(SCALES=1, S_BLOCK=triton.next_power_of_2(num_scales))
    elif quantize is not None:
        num_scales = quant.scale_columns(hidden, quantize.block)
        flags.update(SCALES=2)
    launch(_put_tokens, (grid,),
        x, x.stride(0), topk_idx, topk_weights, peers,
        rank, bound, world * bound, num_tokens, top_k, num_local, world * num_local, hidden, row_bytes, meta_offset,
        weights_offset, source, source.stride(0), num_scales, scales_offset,
        ROWS=rows, BLOCK=block, K_BLOCK=k_block(top_k), num_warps=PUT_WARPS, **flags,
    )
