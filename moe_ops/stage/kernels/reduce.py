"""Per-token reductions over the layout rows, as Triton kernels: each output row is written once by
one program, sums accumulate in float32 (float64 for float64), deterministic, no atomics, and no
``[T*K, H]`` temporary.

* ``_reduce_rows``: ``out[j] = sum_k w[r] * rows[r]`` over ``r = route_row[j, k] >= 0`` — combine,
  dispatch's backward, and a multi-rank backend's pre-reduce and source-side sum (``UNIQUE`` skips a
  row repeated within ``route_row[j]``); with ``GATHER`` it also writes ``picked[j, k] = values[r]``
  (dispatch's backward: the routes' weight gradients in the same launch).
* ``_expand_grad``: combine's backward, token-major: a program reads ``grad_tokens[j]`` once and, for
  each of its rows, writes ``w[r] * grad_tokens[j]`` and accumulates ``<grad_tokens[j], expert_out[r]>``;
  programs past the tokens write the zeros of the padding rows (``row_src`` -1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_ops.stage.kernels import block_size, k_block, unit_columns
from moe_ops.stage.kernels.launch import launch

REDUCE_H_BLOCK = 1024  # hidden elements per reduce program (tools/bench.py --sweep picks these)
REDUCE_WARPS = 4


@triton.jit
def _route_rows(route_row_ptr, j, top_k, UNIQUE: tl.constexpr, K_BLOCK: tl.constexpr):
    k = tl.arange(0, K_BLOCK)
    row = tl.load(route_row_ptr + j * top_k + k, mask=k < top_k, other=-1)
    valid = row >= 0
    if UNIQUE:
        repeated = (row[:, None] == row[None, :]) & (k[None, :] < k[:, None])
        valid = valid & (tl.sum(repeated.to(tl.int32), axis=1) == 0)
    return row, valid


@triton.jit
def _reduce_rows(
    rows_ptr, row_stride, route_row_ptr, weights_ptr, out_ptr, values_ptr, picked_ptr,
    top_k, hidden,
    HAS_WEIGHTS: tl.constexpr, UNIQUE: tl.constexpr, GATHER: tl.constexpr,
    ACC: tl.constexpr, K_BLOCK: tl.constexpr, H_BLOCK: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    row, valid = _route_rows(route_row_ptr, j, top_k, UNIQUE, K_BLOCK)
    if GATHER:
        if tl.program_id(1) == 0:
            k = tl.arange(0, K_BLOCK)
            value = tl.load(values_ptr + row, mask=valid, other=0)
            tl.store(picked_ptr + j * top_k + k, value.to(picked_ptr.dtype.element_ty), mask=k < top_k)
    if HAS_WEIGHTS:
        scale = tl.load(weights_ptr + row, mask=valid, other=0).to(ACC)
    else:
        scale = valid.to(ACC)
    cols = tl.program_id(1) * H_BLOCK + tl.arange(0, H_BLOCK)
    picked = tl.load(rows_ptr + row[:, None] * row_stride + cols[None, :], mask=valid[:, None] & (cols[None, :] < hidden), other=0)
    total = tl.sum(picked.to(ACC) * scale[:, None], axis=0)
    tl.store(out_ptr + j * hidden + cols, total.to(out_ptr.dtype.element_ty), mask=cols < hidden)


@triton.jit
def _expand_grad(
    grad_ptr, route_row_ptr, weights_ptr, expert_out_ptr, grad_expert_out_ptr, grad_weights_ptr, row_src_ptr,
    num_tokens, num_rows, top_k, hidden,
    ACC: tl.constexpr, K_BLOCK: tl.constexpr, H_BLOCK: tl.constexpr, PAD_ROWS: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    if j >= num_tokens:  # padding rows: zeros
        rows = (j - num_tokens) * PAD_ROWS + tl.arange(0, PAD_ROWS)
        padding = (rows < num_rows) & (tl.load(row_src_ptr + rows, mask=rows < num_rows, other=0) < 0)
        tl.store(grad_weights_ptr + rows, tl.zeros([PAD_ROWS], ACC).to(grad_weights_ptr.dtype.element_ty), mask=padding)
        for h0 in range(0, hidden, H_BLOCK):
            cols = h0 + tl.arange(0, H_BLOCK)
            tl.store(grad_expert_out_ptr + rows[:, None] * hidden + cols[None, :],
                     tl.zeros([PAD_ROWS, H_BLOCK], ACC).to(grad_expert_out_ptr.dtype.element_ty),
                     mask=padding[:, None] & (cols[None, :] < hidden))
    else:
        row, valid = _route_rows(route_row_ptr, j, top_k, False, K_BLOCK)
        w = tl.load(weights_ptr + row, mask=valid, other=0).to(ACC)
        dot = tl.zeros([K_BLOCK], ACC)
        for h0 in range(0, hidden, H_BLOCK):
            cols = h0 + tl.arange(0, H_BLOCK)
            in_row = cols < hidden
            mask = valid[:, None] & in_row[None, :]
            g = tl.load(grad_ptr + j * hidden + cols, mask=in_row, other=0).to(ACC)
            offsets = row[:, None] * hidden + cols[None, :]
            out = tl.load(expert_out_ptr + offsets, mask=mask, other=0).to(ACC)
            tl.store(grad_expert_out_ptr + offsets, (w[:, None] * g[None, :]).to(grad_expert_out_ptr.dtype.element_ty), mask=mask)
            dot += tl.sum(out * g[None, :], axis=1)
        tl.store(grad_weights_ptr + row, dot.to(grad_weights_ptr.dtype.element_ty), mask=valid)


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_reduce(
    rows: Tensor, route_row: Tensor, row_weights: Tensor | None, unique: bool, values: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    m, top_k = route_row.shape
    hidden = rows.shape[1]
    if not unit_columns(rows):
        rows = rows.contiguous()
    route_row = route_row.contiguous()
    out = torch.empty(m, hidden, dtype=rows.dtype, device=rows.device)
    picked = None if values is None else torch.empty(m, top_k, dtype=values.dtype, device=values.device)
    h_block = block_size(hidden, REDUCE_H_BLOCK)
    if m and (hidden or values is not None):
        launch(_reduce_rows, (m, max(triton.cdiv(hidden, h_block), 1)),
            rows, rows.stride(0), route_row, rows if row_weights is None else row_weights, out,
            rows if values is None else values.contiguous(), out if picked is None else picked, top_k, hidden,
            HAS_WEIGHTS=row_weights is not None, UNIQUE=unique, GATHER=values is not None, ACC=_acc(rows.dtype),
            K_BLOCK=k_block(top_k), H_BLOCK=h_block, num_warps=REDUCE_WARPS,
        )
    return out, picked


def reduce(rows: Tensor, route_row: Tensor, row_weights: Tensor | None, unique: bool = False) -> Tensor:
    """Triton twin of ``plain.reduce`` (``unique``: count a row repeated in ``route_row[j]`` once).
    ``rows [R, H]`` (rows may be strided), ``route_row [M, K]``, ``row_weights [R]`` or ``None``."""
    return _launch_reduce(rows, route_row, row_weights, unique, None)[0]


def dispatch_grad(grad_rows: Tensor, grad_row_weights: Tensor, route_row: Tensor) -> tuple[Tensor, Tensor]:
    """``moe_ops.stage.dispatch_grad`` in one launch: ``grad_rows [R, H]``, ``grad_row_weights [R]``,
    ``route_row [M, K]`` give ``([M, H] in grad_rows.dtype, [M, K] in grad_row_weights.dtype)``."""
    out, picked = _launch_reduce(grad_rows, route_row, None, False, grad_row_weights)
    assert picked is not None
    return out, picked


PAD_ROWS = 16  # padding rows zeroed per program


def expand_grad(grad_tokens: Tensor, expert_out: Tensor, recv_weights: Tensor, route_row: Tensor, row_src: Tensor) -> tuple[Tensor, Tensor]:
    """Triton twin of ``plain.expand_grad``, driven by ``route_row [M, K]`` (and ``row_src`` for the padding
    rows). Returns ``(grad_expert_out, grad_recv_weights)`` shaped like ``expert_out`` / ``recv_weights``,
    with zeros on the padding rows (``row_src`` -1)."""
    m, top_k = route_row.shape
    hidden, num_rows = expert_out.shape[-1], row_src.numel()
    assert grad_tokens.is_contiguous() and expert_out.is_contiguous() and recv_weights.is_contiguous()
    grad_expert_out, grad_weights = torch.empty_like(expert_out), torch.empty_like(recv_weights)
    grid = m + triton.cdiv(num_rows, PAD_ROWS)
    if grid:
        launch(_expand_grad, (grid,),
            grad_tokens, route_row, recv_weights, expert_out, grad_expert_out, grad_weights, row_src.contiguous(),
            m, num_rows, top_k, hidden,
            ACC=_acc(expert_out.dtype), K_BLOCK=k_block(top_k), H_BLOCK=block_size(hidden, 512), PAD_ROWS=PAD_ROWS,
        )
    return grad_expert_out, grad_weights
