"""The oracle: dispatch and combine over a simulated world of ``W`` ranks, in plain torch.

Written for clarity, not speed. Inputs are per-rank lists (index ``r`` = rank ``r``); outputs are
what each rank holds. Every backend is checked against this module. It is differentiable (built from
indexing, ``stack`` and ``index_add``), so gradients are checked against it too.

The contract it encodes (docs/contract.md): rank ``r`` owns global experts ``[r*L, (r+1)*L)``; rows of a
local expert are ordered by (source rank, source token, k); ids outside ``[0, E)`` are masked; the padded
layout keeps the first ``C`` rows of each expert and counts the rest as dropped; with ``pad_multiple``
``m > 1`` each expert's group of ragged rows is rounded up to a multiple of ``m`` with zero rows (``m``
rows for an expert with no route); the bounded layout is the first ``R`` rows of the ragged one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RankReceived:
    """What one rank holds after dispatch."""

    recv_x: Tensor  #: [N, H] ragged, [R, H] bounded, or [L, C, H] padded (padding rows zero)
    recv_weights: Tensor  #: [N], [R] or [L, C]
    tokens_per_expert: Tensor  #: [L] int32: rows of each expert (padded: routed rows only)
    dropped: Tensor  #: [L] int32
    sources: Tensor  #: [N, 3], [R, 3] or [L, C, 3] int64: (source rank, token, k) of each row; -1 on padding rows


def physical_ids(topk_idx: Tensor, log2phy: Tensor | None) -> Tensor:
    """``log2phy[topk_idx]`` (ids outside the table become -1), or ``topk_idx`` without a table."""
    if log2phy is None:
        return topk_idx.long()
    ids = topk_idx.long()
    inside = (ids >= 0) & (ids < log2phy.shape[0])
    return torch.where(inside, log2phy.long()[ids.clamp(0, max(log2phy.shape[0] - 1, 0))], -1)


def placement(num_experts: int, world: int, expert_map: Tensor | None) -> list[tuple[int, int]]:
    """``(rank, local id)`` of every physical expert, ``(-1, -1)`` where no rank holds it. Contiguous by
    default (``e`` on rank ``e // L`` as ``e % L``); with ``expert_map [W, E]``, the first rank whose row
    holds ``e`` (a local id in ``[0, L)``)."""
    num_local = num_experts // world
    if expert_map is None:
        return [(e // num_local, e % num_local) for e in range(num_experts)]
    where = []
    for e in range(num_experts):
        holders = [r for r in range(world) if 0 <= int(expert_map[r, e]) < num_local]
        where.append((holders[0], int(expert_map[holders[0], e])) if holders else (-1, -1))
    return where


def _routes_to(ids: list[Tensor], experts: list[int]) -> list[tuple[int, int, int]]:
    """All routes to any of ``experts`` in (source rank, token, k) order."""
    wanted = torch.tensor(experts, dtype=torch.int64)
    return [(s, t, k) for s, idx in enumerate(ids) for t, k in torch.isin(idx, wanted).nonzero().tolist()]


def dispatch(
    xs: list[Tensor],
    topk_idx: list[Tensor],
    topk_weights: list[Tensor],
    num_experts: int,
    capacity: int | None = None,
    expert_map: Tensor | None = None,
    log2phy: Tensor | None = None,
    max_recv_rows: int | None = None,
    pad_multiple: int = 1,
) -> list[RankReceived]:
    """Dispatch as the contract defines it. ``capacity=None``: ragged layout (bounded to ``max_recv_rows``
    rows if given, groups rounded up to ``pad_multiple``); an int: padded layout. ``log2phy`` and
    ``expert_map`` as :func:`physical_ids` and :func:`placement` say."""
    world = len(xs)
    num_local = num_experts // world
    hidden = xs[0].shape[1]
    ids = [physical_ids(idx, log2phy) for idx in topk_idx]
    where = placement(num_experts, world, expert_map)
    received = []
    for rank in range(world):
        x_rows, w_rows, src_rows, counts, dropped = [], [], [], [], []
        for e in range(num_local):
            routes = _routes_to(ids, [p for p, held in enumerate(where) if held == (rank, e)])
            if capacity is not None:
                rows_here = capacity
            else:
                group = len(routes) if pad_multiple == 1 else -(-max(len(routes), 1) // pad_multiple) * pad_multiple
                room = group if max_recv_rows is None else max(0, min(group, max_recv_rows - len(src_rows)))
                rows_here = room
            kept = routes[:rows_here]
            counts.append(len(kept) if capacity is not None else rows_here)
            dropped.append(len(routes) - len(kept))
            pad = rows_here - len(kept)
            x_rows += [xs[s][t] for s, t, _ in kept] + [xs[0].new_zeros(hidden)] * pad
            w_rows += [topk_weights[s][t, k] for s, t, k in kept] + [topk_weights[0].new_zeros(())] * pad
            src_rows += kept + [(-1, -1, -1)] * pad
        if max_recv_rows is not None:
            tail = max_recv_rows - len(src_rows)
            x_rows += [xs[0].new_zeros(hidden)] * tail
            w_rows += [topk_weights[0].new_zeros(())] * tail
            src_rows += [(-1, -1, -1)] * tail
        rows = (len(x_rows),) if capacity is None else (num_local, capacity)
        received.append(
            RankReceived(
                recv_x=(torch.stack(x_rows) if x_rows else xs[0].new_zeros(0, hidden)).reshape(*rows, hidden),
                recv_weights=(torch.stack(w_rows) if w_rows else topk_weights[0].new_zeros(0)).reshape(rows),
                tokens_per_expert=torch.tensor(counts, dtype=torch.int32),
                dropped=torch.tensor(dropped, dtype=torch.int32),
                sources=torch.tensor(src_rows, dtype=torch.int64).reshape(*rows, 3),
            )
        )
    return received


def combine(
    received: list[RankReceived],
    expert_outs: list[Tensor],
    num_tokens: list[int],
    recv_weights: list[Tensor] | None = None,
) -> list[Tensor]:
    """``out[s][t] = sum over rows (s, t, k) of recv_weights[row] * expert_out[row]``, in float64.

    ``expert_outs[r]`` has the layout of ``received[r].recv_x``; ``recv_weights`` defaults to the
    dispatched weights. Masked and dropped routes have no row and add nothing.
    """
    hidden = expert_outs[0].shape[-1]
    outs = [torch.zeros(t, hidden, dtype=torch.float64) for t in num_tokens]
    for rank, got in enumerate(received):
        weights = got.recv_weights if recv_weights is None else recv_weights[rank]
        sources = got.sources.reshape(-1, 3)
        rows = (weights.reshape(-1, 1).double() * expert_outs[rank].reshape(-1, hidden).double())
        for s in range(len(outs)):
            mine = (sources[:, 0] == s).nonzero().squeeze(1)
            outs[s] = outs[s].index_add(0, sources[mine, 1], rows[mine])
    return outs


def moe_forward(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, num_experts: int, expert: Callable[[int, Tensor], Tensor]
) -> Tensor:
    """The definition of an MoE layer on one rank, with no dispatch at all, in float64:
    ``out[t] = sum_k topk_weights[t, k] * expert(topk_idx[t, k], x[t])`` over ids in ``[0, num_experts)``."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in range(num_experts):
        tokens, ks = (topk_idx == e).nonzero(as_tuple=True)
        if tokens.numel():
            contribution = topk_weights[tokens, ks].double().unsqueeze(1) * expert(e, x[tokens]).double()
            out = out.index_add(0, tokens, contribution)
    return out
