"""Send slots: how the transports number the rows one rank sends, in plain torch; no host sync.

With a static bound ``B`` on every rank's token count, rank ``s`` has ``W * B`` slots and slot
``d * B + t`` carries token ``t`` to rank ``d`` (where it lands as row ``s * B + t``). The ragged
``collective`` dispatch packs the slots of each destination instead (:func:`compact_slots`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ops import routing


def send_slots(dest: Tensor, bound: int) -> Tensor:
    """``[T, K]`` int64: slot ``d * bound + t`` of each route's (token ``t``, destination ``d``) among
    ``W * bound`` send slots, ``-1`` for masked routes (``dest [T, K]`` from ``routing.destination_ranks``)."""
    tokens = torch.arange(dest.shape[0], device=dest.device).unsqueeze(1)
    return torch.where(dest >= 0, dest * bound + tokens, -1)


def slot_tokens(send_slot: Tensor, num_slots: int) -> Tensor:
    """``[S]`` int64: the token whose routes name each of ``num_slots`` send slots in ``send_slot [T, K]``
    (``-1`` for none); ``-1`` for slots no route names."""
    tokens = torch.arange(send_slot.shape[0], device=send_slot.device).unsqueeze(1).expand_as(send_slot)
    out = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=send_slot.device)
    out.scatter_(0, torch.where(send_slot >= 0, send_slot, num_slots).reshape(-1), tokens.reshape(-1))
    return out[:num_slots]


def bounded_slot_tokens(num_tokens: int, world_size: int, bound: int, device: torch.device) -> Tensor:
    """``[W * bound]`` int64: the token slot ``d * bound + t`` carries under a static bound (``t``, or -1 for
    ``t >= num_tokens``), whether or not a route uses it."""
    t = torch.arange(world_size * bound, device=device) % bound
    return torch.where(t < num_tokens, t, -1)


def destination_counts(dest: Tensor, world_size: int) -> Tensor:
    """``[2W]`` int64: how many tokens (each counted once per destination) and how many routes of
    ``dest [T, K]`` go to each rank."""
    first = routing.first_occurrence(dest)
    tokens = torch.zeros(world_size, dtype=torch.int64, device=dest.device)
    tokens.scatter_add_(0, torch.where(first, dest, 0).reshape(-1), first.reshape(-1).long())
    return torch.cat([tokens, routing.routes_per_rank(dest, world_size)])


def compact_slots(dest: Tensor, world_size: int, num_slots: int) -> tuple[Tensor, Tensor]:
    """Packed send slots: each (token, destination) pair of ``dest [T, K]`` gets one slot,
    destination-major, tokens in order; ``num_slots`` is the number of pairs (known from the counts).
    Returns ``(send_slot [T, K]`` (the slot of each route's pair, -1 if masked)``, slot_dest [num_slots])``."""
    num_tokens, top_k = dest.shape
    first = routing.first_occurrence(dest)
    buckets = routing.bucketize(torch.where(first, dest, -1).reshape(-1), world_size)
    starts = torch.cumsum(buckets.counts, 0) - buckets.counts
    first_slot = starts[dest.clamp(min=0)] + buckets.position.view(num_tokens, top_k)
    same_dest = (dest.unsqueeze(2) == dest.unsqueeze(1)) & first.unsqueeze(1)
    send_slot = torch.where(dest >= 0, torch.where(same_dest, first_slot.unsqueeze(1), -1).amax(2), -1)
    return send_slot, dest.reshape(-1)[buckets.order[:num_slots]]
