"""Expert-parallel groups, named by string as ``torch.distributed._functional_collectives`` names them.

The ops take ``group_name: str``; ``""`` means no group (world size 1). Names are resolved inside the
op, so compiled graphs hold a string constant rather than a ProcessGroup object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group


def group_name_of(group: dist.ProcessGroup | str | None) -> str:
    """The name the ops take for ``group``: ``""`` for ``None``, the group's own name otherwise."""
    if group is None:
        return ""
    if isinstance(group, str):
        return group
    return group.group_name


@dataclass(frozen=True)
class Comm:
    """The group an op call runs on: ``group`` is ``None`` exactly when ``world_size == 1`` without a group."""

    group_name: str
    group: dist.ProcessGroup | None
    world_size: int
    rank: int


def comm_for(group_name: str) -> Comm:
    """Resolve ``group_name`` to the caller's view of that group (size and rank)."""
    if group_name == "":
        return Comm("", None, 1, 0)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"moe_ops: group_name={group_name!r} given but torch.distributed is not initialized"
        )
    group = _resolve_process_group(group_name)
    return Comm(group_name, group, group.size(), dist.get_rank(group))
