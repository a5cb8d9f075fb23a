"""The local stage in plain torch: the expert-major layout of the routes that reached a rank, and the
row movement it drives, forward and backward. No host sync except where a ragged layout's row count is
not given (:func:`expert_layout`).

Sums accumulate in at least float32 (float64 stays float64) and are rounded once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_ops import routing
from moe_ops.indexing import take_rows
from moe_ops.plan import RowLayout


@dataclass(frozen=True)
class ExpertLayout:
    """Where the routes of a ``[M, K]`` local-id matrix land in the expert-major layout.

    Rows are numbered flat: ragged ``[0, N)``, padded ``e * C + i`` for slot ``i`` of local expert ``e``.
    Inside one expert, rows follow the routes' flat order ``j * K + k``.
    """

    route_row: Tensor  #: [M, K] int64, row of each route; -1 if masked or dropped
    row_src: Tensor  #: [N] or [L, C] int64, flat route index of each row; -1 for padding rows
    tokens_per_expert: Tensor  #: [L] int32, rows holding a route per local expert
    dropped: Tensor  #: [L] int32, routes dropped per local expert (padded layout over capacity)


def expert_layout(local_ids: Tensor, num_local: int, rows: RowLayout, num_rows: int | None = None) -> ExpertLayout:
    """Lay ``local_ids`` (``[M, K]``, anything outside ``[0, num_local)`` = not here) out expert-major.

    Ragged: ``num_rows`` rows, which must equal the number of valid routes (the caller may know it from
    a count exchange; ``None`` computes it, a host sync). Padded ``[L, C]``: the first ``C`` routes of each
    expert are kept, the rest dropped and counted.
    """
    m, k = local_ids.shape
    flat = local_ids.reshape(-1).long()
    flat = torch.where((flat >= 0) & (flat < num_local), flat, -1)
    buckets = routing.bucketize(flat, num_local)
    valid = flat >= 0
    if rows.layout == "ragged":
        starts = torch.cumsum(buckets.counts, 0) - buckets.counts
        if num_rows is None:
            num_rows = int(buckets.counts.sum())
        row = torch.where(valid, starts[flat.clamp(min=0)] + buckets.position, -1)
        row_src = buckets.order[:num_rows].clone()
        kept = buckets.counts
    else:
        capacity = rows.capacity
        keep = valid & (buckets.position < capacity)
        row = torch.where(keep, flat * capacity + buckets.position, -1)
        slots = num_local * capacity
        row_src = torch.full((slots + 1,), -1, dtype=torch.int64, device=flat.device)
        routes = torch.arange(flat.numel(), device=flat.device)
        row_src.scatter_(0, torch.where(keep, row, slots), routes)  # slot `slots` collects the rest
        row_src = row_src[:slots].reshape(num_local, capacity).clone()
        kept = buckets.counts.clamp(max=capacity)
    return ExpertLayout(
        route_row=row.reshape(m, k),
        row_src=row_src,
        tokens_per_expert=kept.to(torch.int32),
        dropped=(buckets.counts - kept).to(torch.int32),
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def expand(tokens: Tensor, weights: Tensor, row_src: Tensor) -> tuple[Tensor, Tensor]:
    """Layout rows from token rows: ``tokens [M, H]``, ``weights [M, K]``, ``row_src [N]`` or ``[L, C]``
    (flat route index, -1 = padding) give ``recv_x`` (``row_src.shape + [H]``) and ``recv_weights``
    (``row_src.shape``); padding rows are zero."""
    k = weights.shape[1]
    token_of_row = torch.where(row_src >= 0, row_src // k, -1)
    rows, valid = take_rows(tokens, token_of_row)
    recv_x = torch.where(valid.unsqueeze(-1), rows, 0)
    recv_weights, _ = take_rows(weights.reshape(-1), row_src)
    return recv_x, torch.where(valid, recv_weights, 0)


def reduce(rows: Tensor, route_row: Tensor, row_weights: Tensor | None, unique: bool = False) -> Tensor:
    """Token rows from layout rows: ``out[j] = sum_k w[r] * rows[r]`` over ``r = route_row[j, k] >= 0``
    (``unique``: a row repeated within ``route_row[j]`` counts once). ``rows [R, H]``, ``route_row [M, K]``,
    ``row_weights [R]`` or ``None`` (all ones). Returns ``[M, H]`` in ``rows.dtype``."""
    if unique:
        route_row = routing.unique_routes(route_row)
    acc = _acc_dtype(rows.dtype)
    picked, valid = take_rows(rows, route_row)
    scale = valid.to(acc)
    if row_weights is not None:
        w, _ = take_rows(row_weights, route_row)
        scale = scale * w.to(acc)
    return (picked.to(acc) * scale.unsqueeze(-1)).sum(dim=1).to(rows.dtype)


def gather_routes(row_values: Tensor, route_row: Tensor) -> Tensor:
    """``[M, K]``: ``row_values[route_row]``, zero where ``route_row < 0``."""
    picked, valid = take_rows(row_values, route_row)
    return torch.where(valid, picked, 0)


def expand_grad(grad_tokens: Tensor, expert_out: Tensor, recv_weights: Tensor, row_src: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Combine's backward on the layout rows. For layout row ``r`` with source token ``j``:
    ``grad_expert_out[r] = recv_weights[r] * grad_tokens[j]`` and ``grad_recv_weights[r] =
    <grad_tokens[j], expert_out[r]>`` (float32-accumulated); padding rows get 0. ``expert_out`` has
    ``row_src.shape + [H]``, ``recv_weights`` ``row_src.shape``."""
    acc = _acc_dtype(expert_out.dtype)
    token_of_row = torch.where(row_src >= 0, row_src // k, -1)
    g, valid = take_rows(grad_tokens, token_of_row)
    g = torch.where(valid.unsqueeze(-1), g.to(acc), 0)
    grad_expert_out = (g * recv_weights.to(acc).unsqueeze(-1)).to(expert_out.dtype)
    grad_recv_weights = (g * expert_out.to(acc)).sum(dim=-1).to(recv_weights.dtype)
    return grad_expert_out, grad_recv_weights
