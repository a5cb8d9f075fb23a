"""Rows stored straight into peers' buffers (the ``symm`` backend's transport), as one Triton kernel.

The sender has ``W * B`` slots: slot ``i = d * B + t`` goes to rank ``d``, where it lands in row
``rank * B + t`` of that rank's buffer. Each row of a buffer is ``row_bytes`` long: a payload (a source
row, ``payload_cols`` elements) at byte 0 and, optionally, ``meta_words`` int32 words at ``meta_offset``.
``src_index[i]`` names the source row of slot ``i``'s payload; ``-1`` sends no payload (the slot's
meta, if any, is always sent). So a token crosses a link once per destination rank that needs it.

The kernel is persistent: ``programs`` programs (``moe_ops.config.symm_num_sms``, one per SM in
practice) walk the items, each a tile of several slots' rows (so many rows' loads are in flight in a
program at once), which bounds the SMs a transfer occupies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_ops.kernels import block_size

PUT_BLOCK = 2048  # payload elements per row of a tile
PUT_TILE = 16384  # elements a program moves per step: PUT_TILE // block rows at once (bytes in flight)
PUT_WARPS = 16


@triton.jit
def _put_rows(
    src_ptr, src_stride, src_index_ptr, meta_ptr, meta_words, peers_ptr,
    rank, bound, num_slots, payload_cols, row_bytes, meta_offset,
    HAS_META: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, META_BLOCK: tl.constexpr,
):
    """Each step: ROWS slots x BLOCK payload columns, so many rows' loads are in flight at once."""
    blocks = tl.maximum(tl.cdiv(payload_cols, BLOCK), 1)
    for item in range(tl.program_id(0), tl.cdiv(num_slots, ROWS) * blocks, tl.num_programs(0)):
        slot = (item // blocks) * ROWS + tl.arange(0, ROWS)
        b = item % blocks
        in_range = slot < num_slots
        row = rank * bound + slot % bound  # where the slot lands in its destination's buffer
        base = tl.load(peers_ptr + slot // bound, mask=in_range, other=0) + row.to(tl.int64) * row_bytes
        base = tl.multiple_of(base, [16])  # buffers and rows are 16-byte aligned: vector stores
        src_row = tl.load(src_index_ptr + slot, mask=in_range, other=-1)
        cols = b * BLOCK + tl.arange(0, BLOCK)
        mask = (src_row >= 0)[:, None] & (cols < payload_cols)[None, :]
        v = tl.load(src_ptr + src_row[:, None] * src_stride + cols[None, :], mask=mask)
        out = base.to(tl.pointer_type(src_ptr.dtype.element_ty))
        tl.store(out[:, None] + cols[None, :], v, mask=mask)
        if HAS_META:
            if b == 0:
                w = tl.arange(0, META_BLOCK)
                words = in_range[:, None] & (w < meta_words)[None, :]
                m = tl.load(meta_ptr + slot[:, None].to(tl.int64) * meta_words + w[None, :], mask=words)
                meta_out = (base + meta_offset).to(tl.pointer_type(tl.int32))
                tl.store(meta_out[:, None] + w[None, :], m, mask=words)


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
    if src.stride(1) != 1:  # columns must be unit-stride; an empty gradient may keep any strides
        src = src.contiguous()  # (it counts as contiguous), and then no row of it is read
    assert src_index.is_contiguous() and row_bytes % 16 == 0
    assert meta is None or (meta.dtype == torch.int32 and meta.is_contiguous() and meta.shape[0] == num_slots)
    if not num_slots:
        return
    meta_words = 0 if meta is None else meta.shape[1]
    block = block_size(payload_cols, PUT_BLOCK)
    rows = max(1, PUT_TILE // block)
    items = triton.cdiv(num_slots, rows) * max(1, triton.cdiv(payload_cols, block))
    _put_rows[(max(1, min(programs, items)),)](
        src, src.stride(0), src_index, src_index if meta is None else meta, meta_words, peers,
        rank, bound, num_slots, payload_cols, row_bytes, meta_offset,
        HAS_META=meta is not None, ROWS=rows, BLOCK=block,
        META_BLOCK=triton.next_power_of_2(max(meta_words, 1)), num_warps=PUT_WARPS,
    )
