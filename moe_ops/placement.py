"""Expert placement: optional tables that put experts somewhere other than the contiguous default
(expert ``e`` on rank ``e // L`` as local expert ``e % L``), mapped onto that default before any backend
sees the ids, so every backend honours them. No host sync."""

from __future__ import annotations

import torch
from torch import Tensor


def relabel(topk_idx: Tensor, num_local: int, expert_map: Tensor | None, log2phy: Tensor | None) -> Tensor:
    """Ids in the contiguous placement the backends assume. ``log2phy [E_logical]`` first maps logical
    ids to physical ones; ``expert_map [W, E]`` (``expert_map[r, e]``: local id of ``e`` on rank ``r``, -1
    where absent) then renames physical expert ``e`` to ``r * L + expert_map[r, e]`` on the first rank
    that holds it. Ids that fall outside any table become -1 (masked). Without either table
    ``topk_idx`` is returned as is."""
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
