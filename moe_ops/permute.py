"""Token movement inside one rank, driven by :class:`moe_ops.routing.ExpertLayout` maps (plain torch).

Four primitives serve every backend's local stage, forward and backward:

* :func:`expand` — token rows to layout rows (dispatch; combine's backward),
* :func:`reduce` — layout rows back to token rows, weighted or not (combine; dispatch's backward),
* :func:`gather_routes` — a per-row value back to its ``[M, K]`` route (grad of the router weights),
* :func:`expand_grad` — combine's backward on the layout rows;

:func:`take` / :func:`take_columns`, safe gathers that read nothing for index ``-1``, and
:func:`pad_rows`, which extends a batch to a static bound.

Sums accumulate in at least float32 (float64 stays float64) and are rounded once at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _take_rows(src: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """``src[index]`` with ``index < 0`` giving zero rows; returns (rows, valid mask)."""
    valid = index >= 0
    if src.shape[0] == 0:  # every index is -1 then: nothing to read
        return src.new_zeros(*index.shape, *src.shape[1:]), valid
    rows = src.index_select(0, index.clamp(min=0).reshape(-1)).reshape(*index.shape, *src.shape[1:])
    return rows, valid


def pad_rows(t: Tensor, rows: int, value: float = 0) -> Tensor:
    """``t`` with rows filled with ``value`` appended up to ``rows`` (``t`` itself if it has that many)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), value)])


def take(src: Tensor, index: Tensor) -> Tensor:
    """``src[index]`` (rows), zero where ``index < 0``; reads nothing out of bounds, ``src`` may be empty."""
    rows, valid = _take_rows(src, index)
    return torch.where(valid.reshape(*valid.shape, *([1] * (src.dim() - 1))), rows, 0)


def take_columns(values: Tensor, index: Tensor) -> Tensor:
    """``[T, K]``: ``values[index[t, k], k]`` for ``values [S, K]``, zero where ``index < 0``."""
    k = values.shape[1]
    flat = torch.where(index >= 0, index * k + torch.arange(k, device=index.device), -1)
    return take(values.reshape(-1), flat)


def expand(tokens: Tensor, weights: Tensor, row_src: Tensor) -> tuple[Tensor, Tensor]:
    """Layout rows from token rows.

    ``tokens`` ``[M, H]``, ``weights`` ``[M, K]``, ``row_src`` ``[N]`` or ``[L, C]`` (flat route index, -1 =
    padding). Returns ``recv_x`` (``row_src.shape + [H]``, tokens' dtype) and ``recv_weights``
    (``row_src.shape``, weights' dtype); padding rows are zero.
    """
    k = weights.shape[1]
    token_of_row = torch.where(row_src >= 0, row_src // k, -1)
    rows, valid = _take_rows(tokens, token_of_row)
    recv_x = torch.where(valid.unsqueeze(-1), rows, 0)
    recv_weights, _ = _take_rows(weights.reshape(-1), row_src)
    return recv_x, torch.where(valid, recv_weights, 0)


def reduce(rows: Tensor, route_row: Tensor, row_weights: Tensor | None) -> Tensor:
    """Token rows from layout rows: ``out[j] = sum_k w[r] * rows[r]`` over ``r = route_row[j, k] >= 0``.

    ``rows`` ``[R, H]``, ``route_row`` ``[M, K]``, ``row_weights`` ``[R]`` or ``None`` (all ones).
    Returns ``[M, H]`` in ``rows.dtype``, accumulated in at least float32.
    """
    acc = _acc_dtype(rows.dtype)
    picked, valid = _take_rows(rows, route_row)
    scale = valid.to(acc)
    if row_weights is not None:
        w, _ = _take_rows(row_weights, route_row)
        scale = scale * w.to(acc)
    return (picked.to(acc) * scale.unsqueeze(-1)).sum(dim=1).to(rows.dtype)


def gather_routes(row_values: Tensor, route_row: Tensor) -> Tensor:
    """``[M, K]``: ``row_values[route_row]``, zero where ``route_row < 0``."""
    picked, valid = _take_rows(row_values, route_row)
    return torch.where(valid, picked, 0)


def expand_grad(grad_tokens: Tensor, expert_out: Tensor, recv_weights: Tensor, row_src: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Combine's backward on the layout rows.

    ``grad_tokens`` ``[M, H]`` is the gradient of each token's combined output; for layout row ``r`` with
    source token ``j``: ``grad_expert_out[r] = recv_weights[r] * grad_tokens[j]`` and
    ``grad_recv_weights[r] = <grad_tokens[j], expert_out[r]>`` (float32-accumulated); padding rows get 0.
    ``expert_out`` has ``row_src.shape + [H]``, ``recv_weights`` ``row_src.shape``.
    """
    acc = _acc_dtype(expert_out.dtype)
    token_of_row = torch.where(row_src >= 0, row_src // k, -1)
    g, valid = _take_rows(grad_tokens, token_of_row)
    g = torch.where(valid.unsqueeze(-1), g.to(acc), 0)
    grad_expert_out = (g * recv_weights.to(acc).unsqueeze(-1)).to(expert_out.dtype)
    grad_recv_weights = (g * expert_out.to(acc)).sum(dim=-1).to(recv_weights.dtype)
    return grad_expert_out, grad_recv_weights
