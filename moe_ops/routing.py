"""Where routes go, in plain torch; no host sync anywhere.

A *route* is one entry ``(j, k)`` of a ``[M, K]`` id matrix; its flat index is ``j * K + k``. Ids outside
the valid range are masked routes (``-1`` by convention) and go nowhere. Expert ``e`` lives on rank
``e // L`` as local expert ``e % L`` (:mod:`moe_ops.placement` maps other placements onto this one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def masked_ids(topk_idx: Tensor, num_experts: int) -> Tensor:
    """``[T, K]`` int64: ``topk_idx`` with every id outside ``[0, num_experts)`` replaced by ``-1``."""
    ids = topk_idx.long()
    return torch.where((ids >= 0) & (ids < num_experts), ids, -1)


def local_expert_ids(topk_idx: Tensor, num_experts: int, world_size: int, rank: int) -> Tensor:
    """``[T, K]`` int64: the id among rank ``rank``'s experts, ``-1`` for routes to other ranks or masked."""
    num_local = num_experts // world_size
    local = topk_idx.long() - rank * num_local
    return torch.where((local >= 0) & (local < num_local), local, -1)


def destination_ranks(topk_idx: Tensor, num_experts: int, world_size: int) -> Tensor:
    """``[T, K]`` int64: the rank owning each route's expert, ``-1`` for masked routes."""
    ids = masked_ids(topk_idx, num_experts)
    return torch.where(ids >= 0, ids // (num_experts // world_size), -1)


def routes_per_rank(dest: Tensor, world_size: int) -> Tensor:
    """``[W]`` int64: how many routes of ``dest [T, K]`` (``destination_ranks``) go to each rank."""
    routes = torch.zeros(world_size, dtype=torch.int64, device=dest.device)
    return routes.scatter_add_(0, dest.clamp(min=0).reshape(-1), (dest >= 0).reshape(-1).long())


def first_occurrence(keys: Tensor) -> Tensor:
    """``[T, K]`` bool: ``keys[t, k] >= 0`` and no ``j < k`` has ``keys[t, j] == keys[t, k]``."""
    k = keys.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=keys.device).tril(-1)
    repeated = ((keys.unsqueeze(2) == keys.unsqueeze(1)) & earlier).any(dim=2)
    return (keys >= 0) & ~repeated


def unique_routes(keys: Tensor) -> Tensor:
    """``keys [T, K]`` with a value repeated within a row kept at its first ``k`` only (-1 elsewhere)."""
    return torch.where(first_occurrence(keys), keys, -1)


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
