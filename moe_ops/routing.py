"""Routing metadata in plain torch: where every (token, k) route lands. No host sync anywhere.

A *route* is one entry ``(j, k)`` of a ``[M, K]`` id matrix; its flat index is ``j * K + k``. Ids outside
the valid range are masked routes (``-1`` by convention) and land nowhere. Backends never compute this
themselves: they call these functions (or their Triton twins in :mod:`moe_ops.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def local_expert_ids(topk_idx: Tensor, num_experts: int, world_size: int, rank: int) -> Tensor:
    """``[T, K]`` int64: the id among rank ``rank``'s experts, ``-1`` for routes to other ranks or masked.

    Rank ``r`` owns global experts ``[r*L, (r+1)*L)`` with ``L = num_experts // world_size``; any id
    outside ``[0, num_experts)`` is masked.
    """
    num_local = num_experts // world_size
    local = topk_idx.long() - rank * num_local
    return torch.where((local >= 0) & (local < num_local), local, -1)


def relabel(topk_idx: Tensor, num_local: int, expert_map: Tensor | None, log2phy: Tensor | None) -> Tensor:
    """Ids in the contiguous placement the backends assume (expert ``e`` on rank ``e // L`` as local
    expert ``e % L``). ``log2phy [E_logical]`` first maps logical ids to physical ones; ``expert_map [W, E]``
    (``expert_map[r, e]``: local id of ``e`` on rank ``r``, -1 where absent) then renames physical
    expert ``e`` to ``r * L + expert_map[r, e]`` on the first rank that holds it. Ids that fall outside
    any table become -1 (masked). Without either table ``topk_idx`` is returned as is. No host sync."""
    if expert_map is None and log2phy is None:
        return topk_idx
    ids = topk_idx.long()
    for table in (log2phy, _contiguous_ids(expert_map, num_local) if expert_map is not None else None):
        if table is not None:
            inside = (ids >= 0) & (ids < table.shape[0])
            ids = torch.where(inside, table.long()[ids.clamp(0, max(table.shape[0] - 1, 0))], -1) if table.numel() else torch.full_like(ids, -1)
    return ids


def _contiguous_ids(expert_map: Tensor, num_local: int) -> Tensor:
    """``[E]``: the contiguous id of each expert under ``expert_map [W, E]`` (-1 if no rank holds it)."""
    held = (expert_map >= 0) & (expert_map < num_local)
    owner = held.int().argmax(dim=0)  # the first rank holding it
    local = expert_map.long().gather(0, owner.unsqueeze(0)).squeeze(0)
    return torch.where(held.any(dim=0), owner * num_local + local, -1)


def destination_ranks(topk_idx: Tensor, num_experts: int, world_size: int) -> Tensor:
    """``[T, K]`` int64: the rank owning each route's expert, ``-1`` for masked routes."""
    ids = topk_idx.long()
    valid = (ids >= 0) & (ids < num_experts)
    return torch.where(valid, ids // (num_experts // world_size), -1)


def routes_per_rank(dest: Tensor, world_size: int) -> Tensor:
    """``[W]`` int64: how many routes of ``dest [T, K]`` (``destination_ranks``) go to each rank. No host sync."""
    routes = torch.zeros(world_size, dtype=torch.int64, device=dest.device)
    return routes.scatter_add_(0, dest.clamp(min=0).reshape(-1), (dest >= 0).reshape(-1).long())


def send_slots(dest: Tensor, bound: int) -> Tensor:
    """``[T, K]`` int64: slot ``d * bound + t`` of each route's (token ``t``, destination ``d``) among
    ``W * bound`` send slots, ``-1`` for masked routes (``dest [T, K]`` from ``destination_ranks``)."""
    tokens = torch.arange(dest.shape[0], device=dest.device).unsqueeze(1)
    return torch.where(dest >= 0, dest * bound + tokens, -1)


def slot_tokens(send_slot: Tensor, num_slots: int) -> Tensor:
    """``[S]`` int64: the token whose routes name each of ``num_slots`` send slots in ``send_slot [T, K]``
    (the slot of each route's (token, destination), ``-1`` for none); ``-1`` for slots no route names."""
    tokens = torch.arange(send_slot.shape[0], device=send_slot.device).unsqueeze(1).expand_as(send_slot)
    out = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=send_slot.device)
    out.scatter_(0, torch.where(send_slot >= 0, send_slot, num_slots).reshape(-1), tokens.reshape(-1))
    return out[:num_slots]


def first_occurrence(keys: Tensor) -> Tensor:
    """``[T, K]`` bool: ``keys[t, k] >= 0`` and no ``j < k`` has ``keys[t, j] == keys[t, k]``."""
    k = keys.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=keys.device).tril(-1)
    repeated = ((keys.unsqueeze(2) == keys.unsqueeze(1)) & earlier).any(dim=2)
    return (keys >= 0) & ~repeated


def unique_routes(route_row: Tensor) -> Tensor:
    """``route_row`` with a row repeated within ``route_row[t]`` kept at its first ``k`` only (-1 elsewhere)."""
    return torch.where(first_occurrence(route_row), route_row, -1)


@dataclass(frozen=True)
class Buckets:
    """Stable bucketing of ``R`` keys into ``B`` buckets (key ``B`` or ``-1`` = no bucket)."""

    order: Tensor  #: [R] int64, keys' stable argsort: bucket 0's items, then bucket 1's, …, then unbucketed
    position: Tensor  #: [R] int64, rank of each item inside its bucket (stable), garbage for unbucketed
    counts: Tensor  #: [B] int64, items per bucket


def bucketize(keys: Tensor, num_buckets: int) -> Buckets:
    """Stable positions of ``keys`` (``[R]`` int64) in ``num_buckets`` buckets; negative keys are unbucketed."""
    keys = torch.where(keys < 0, num_buckets, keys)
    counts = torch.zeros(num_buckets + 1, dtype=torch.int64, device=keys.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys))
    starts = torch.cumsum(counts, 0) - counts
    order = torch.sort(keys, stable=True).indices
    position = torch.empty_like(keys)
    position[order] = torch.arange(keys.numel(), device=keys.device) - starts[keys[order]]
    return Buckets(order, position, counts[:num_buckets])


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


def expert_layout(local_ids: Tensor, num_local_experts: int, capacity: int | None, num_rows: int | None = None) -> ExpertLayout:
    """Lay ``local_ids`` (``[M, K]``, ``-1`` = not here) out expert-major.

    ``capacity=None`` gives the ragged layout with ``num_rows`` rows; ``num_rows`` must equal the number
    of valid routes (the caller knows it from a count exchange; ``None`` computes it, a host sync).
    ``capacity=C`` gives the padded layout ``[L, C]``: the first ``C`` routes of each expert are kept,
    the rest are dropped and counted.
    """
    m, k = local_ids.shape
    flat = local_ids.reshape(-1).long()
    buckets = bucketize(flat, num_local_experts)
    valid = flat >= 0
    if capacity is None:
        starts = torch.cumsum(buckets.counts, 0) - buckets.counts
        if num_rows is None:
            num_rows = int(buckets.counts.sum())
        row = torch.where(valid, starts[flat.clamp(min=0)] + buckets.position, -1)
        row_src = buckets.order[:num_rows].clone()
        kept = buckets.counts
    else:
        keep = valid & (buckets.position < capacity)
        row = torch.where(keep, flat * capacity + buckets.position, -1)
        slots = num_local_experts * capacity
        row_src = torch.full((slots + 1,), -1, dtype=torch.int64, device=flat.device)
        routes = torch.arange(flat.numel(), device=flat.device)
        row_src.scatter_(0, torch.where(keep, row, slots), routes)  # slot `slots` collects the rest
        row_src = row_src[:slots].reshape(num_local_experts, capacity).clone()
        kept = buckets.counts.clamp(max=capacity)
    return ExpertLayout(
        route_row=row.reshape(m, k),
        row_src=row_src,
        tokens_per_expert=kept.to(torch.int32),
        dropped=(buckets.counts - kept).to(torch.int32),
    )
