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
from moe_ops.indexing import gather, split
from moe_ops.plan import RowLayout


@dataclass(frozen=True)
class ExpertLayout:
    """Where the routes of a ``[M, K]`` local-id matrix land in the expert-major layout.

    Rows are numbered flat: ragged ``[0, N)``, bounded ``[0, R)``, padded ``e * C + i`` for slot ``i`` of
    local expert ``e``. Inside one expert, rows follow the routes' flat order ``j * K + k``.
    """

    route_row: Tensor  #: [M, K] int64, row of each route; -1 if masked or dropped
    row_src: Tensor  #: [N], [R] or [L, C] int64, flat route index of each row; -1 for padding rows
    tokens_per_expert: Tensor  #: [L] int32, rows of each local expert (with pad_multiple's padding rows)
    dropped: Tensor  #: [L] int32, routes dropped per local expert (over capacity, or past R)


def group_rows(counts: Tensor, rows: RowLayout) -> tuple[Tensor, Tensor]:
    """``(first row, rows)`` of each local expert's group in a ragged or bounded layout, from its routes
    ``counts [L]``: with ``pad_multiple`` ``m > 1`` each group starts at a multiple of ``m`` and is its
    routes rounded up to one, ``m`` rows for an expert with none (as torchao's ``permute_and_pad``: grouped
    GEMMs with per-group scale blocks do not all take an empty group); the bounded layout keeps the first
    ``R`` rows of that sequence."""
    m = rows.pad_multiple
    group = counts if m == 1 else (counts.clamp(min=1) + (m - 1)).div(m, rounding_mode="floor") * m
    start = torch.cumsum(group, 0, dtype=group.dtype) - group
    if rows.kind == "bounded":
        group = torch.rsub(start, rows.max_rows).clamp_(min=0).minimum(group)
    return start, group


def expert_layout(local_ids: Tensor, num_local: int, rows: RowLayout, num_routes: int | None = None) -> ExpertLayout:
    """Lay ``local_ids`` (``[M, K]``, anything outside ``[0, num_local)`` = not here) out expert-major as
    ``rows`` says. Ragged: one row per valid route (``num_routes`` of them, if the caller knows how many;
    else counted: a host read), or with ``pad_multiple`` groups rounded up (counted). Bounded: the first
    ``R`` rows of the ragged layout. Padded ``[L, C]``: the first ``C`` routes of each expert. Routes that
    do not fit are dropped and counted."""
    m, k = local_ids.shape
    keys = local_ids.reshape(-1).clamp(-1, num_local).remainder(num_local + 1)  # num_local: not here
    order = keys.argsort(stable=True)  # routes grouped by expert, in route order
    counts = torch.bincount(keys, minlength=num_local + 1)
    routes = torch.arange(keys.numel(), device=keys.device)
    if rows.kind != "padded" and rows.pad_multiple == 1:  # the common cases: row = sorted position
        rank = torch.empty_like(order).scatter_(0, order, routes)
        kept = counts[:num_local]
        if rows.kind == "ragged":
            valid = m * k - int(counts[num_local]) if num_routes is None else num_routes
            return ExpertLayout(
                route_row=rank.masked_fill_(keys == num_local, -1).view(m, k),
                row_src=order[:valid],
                tokens_per_expert=kept.to(torch.int32),
                dropped=torch.zeros_like(kept, dtype=torch.int32),
            )
        # bounded: the ragged layout's first R rows (the routes not here sort last, so they never fit)
        bound = rows.max_rows
        _, tokens = group_rows(kept, rows)
        sources = order[:bound] if bound <= order.numel() else torch.nn.functional.pad(order, (0, bound - order.numel()), value=-1)
        routed_count = torch.rsub(counts[num_local], m * k)  # on the device: no host read
        routed = torch.arange(bound, device=keys.device) < routed_count
        return ExpertLayout(  # a route's row is its rank, if it is routed and the rank is below R
            route_row=rank.masked_fill_(rank >= routed_count.clamp(max=bound), -1).view(m, k),
            row_src=torch.where(routed, sources, -1),
            tokens_per_expert=tokens.to(torch.int32),
            dropped=(kept - tokens).to(torch.int32),
        )
    counts = counts[:num_local]
    first = torch.cumsum(counts, 0) - counts  # each expert's first position in ``order``
    position = torch.empty_like(order).scatter_(0, order, routes)  # of each route in ``order``
    valid = keys < num_local
    inside = position - torch.cat([first, first.new_zeros(1)])[keys]  # its position inside its expert
    if rows.kind == "padded":
        capacity = rows.capacity
        keep = valid & (inside < capacity)
        row = keys * capacity + inside
        kept = tokens = counts.clamp(max=capacity)
        num_rows = num_local * capacity
    else:
        start, tokens = group_rows(counts, rows)
        kept = counts.minimum(tokens)
        keep = valid & (inside < torch.cat([kept, kept.new_zeros(1)])[keys])
        row = torch.cat([start, start.new_zeros(1)])[keys] + inside
        num_rows = rows.max_rows if rows.kind == "bounded" else int(tokens.sum())
    row = torch.where(keep, row, -1)
    row_src = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=keys.device)
    row_src.scatter_(0, torch.where(keep, row, num_rows), routes)  # row ``num_rows`` collects the rest
    row_src = row_src[:num_rows]
    return ExpertLayout(
        route_row=row.view(m, k),
        row_src=row_src.view(num_local, rows.capacity) if rows.kind == "padded" else row_src,
        tokens_per_expert=tokens.to(torch.int32),
        dropped=(counts - kept).to(torch.int32),
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def expand_rows(tokens: Tensor, row_src: Tensor, top_k: int, padding: bool = True) -> Tensor:
    """Layout rows (``row_src.shape + [H]``) from token rows ``tokens [M, H]`` of any dtype: row ``r`` holds
    token ``row_src[r] // top_k``; padding rows (``row_src < 0``) are zero. ``padding=False``: ``row_src``
    has none (a ragged layout without pad_multiple), which saves the masking."""
    if not padding:
        return gather(tokens, row_src.div(top_k, rounding_mode="floor"))
    route, valid = split(row_src)
    return gather(tokens, route.div(top_k, rounding_mode="floor"), valid)


def expand(tokens: Tensor, weights: Tensor, row_src: Tensor, padding: bool = True) -> tuple[Tensor, Tensor]:
    """``(recv_x, recv_weights)``: :func:`expand_rows` of ``tokens`` and each row's router weight from
    ``weights [M, K]`` (``row_src.shape``, 0 on padding rows)."""
    flat = weights.reshape(-1)
    if not padding:
        return expand_rows(tokens, row_src, weights.shape[1], False), gather(flat, row_src)
    route, valid = split(row_src)
    return gather(tokens, route.div(weights.shape[1], rounding_mode="floor"), valid), gather(flat, route, valid)


def reduce(rows: Tensor, route_row: Tensor, row_weights: Tensor | None, unique: bool = False) -> Tensor:
    """Token rows from layout rows: ``out[j] = sum_k w[r] * rows[r]`` over ``r = route_row[j, k] >= 0``
    (``unique``: a row repeated within ``route_row[j]`` counts once). ``rows [R, H]``, ``route_row [M, K]``,
    ``row_weights [R]`` or ``None`` (all ones). Returns ``[M, H]`` in ``rows.dtype``."""
    if unique:
        route_row = routing.unique_routes(route_row)
    acc = _acc_dtype(rows.dtype)
    index, valid = split(route_row)
    term = gather(rows, index).to(acc)
    if row_weights is not None:
        term = term * gather(row_weights, index).to(acc).unsqueeze(-1)
    # a route that reads no row adds 0, whatever the row it gathered in its place holds (an inf there
    # times a zero weight would be NaN in another token's sum), as the kernels' masked loads do
    return torch.where(valid.unsqueeze(-1), term, 0).sum(dim=1).to(rows.dtype)


def gather_routes(row_values: Tensor, route_row: Tensor) -> Tensor:
    """``[M, K]``: ``row_values[route_row]``, zero where ``route_row < 0``."""
    return gather(row_values, *split(route_row))


def expand_grad(grad_tokens: Tensor, expert_out: Tensor, recv_weights: Tensor, row_src: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Combine's backward on the layout rows. For layout row ``r`` with source token ``j``:
    ``grad_expert_out[r] = recv_weights[r] * grad_tokens[j]`` and ``grad_recv_weights[r] =
    <grad_tokens[j], expert_out[r]>`` (float32-accumulated); padding rows get 0. ``expert_out`` has
    ``row_src.shape + [H]``, ``recv_weights`` ``row_src.shape``."""
    acc = _acc_dtype(expert_out.dtype)
    route, valid = split(row_src)
    g = gather(grad_tokens, route.div(k, rounding_mode="floor"), valid).to(acc)
    grad_expert_out = (g * recv_weights.to(acc).unsqueeze(-1)).to(expert_out.dtype)
    # padding rows get 0 whatever they hold (an inf there times the zero gradient would be NaN)
    grad_recv_weights = torch.where(valid, (g * expert_out.to(acc)).sum(dim=-1), 0).to(recv_weights.dtype)
    return grad_expert_out, grad_recv_weights
