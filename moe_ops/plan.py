"""The plan of one dispatch: its arguments resolved against the group, each concept in one encoding.

The op schema takes ``capacity`` and ``max_tokens_per_rank`` as optional ints; the plan turns them into
what every later step reads: the layout, ``capacity`` (padded: the rows per local expert, the no-drop
worst case when not given) and ``token_bound`` (a static bound on every rank's token count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor

from moe_ops import validation
from moe_ops.comm import Comm

Layout = Literal["ragged", "padded"]


class RowLayout(NamedTuple):
    """How a rank lays out the routes it receives (docs/contract.md)."""

    layout: Layout
    capacity: int = 0  #: padded: rows per local expert
    zero_padding: bool = False  #: padded: write zeros to the padding rows


@dataclass(frozen=True)
class DispatchPlan:
    """One ``moe.dispatch`` call, resolved against its group."""

    comm: Comm
    num_experts: int
    rows: RowLayout
    token_bound: int  #: padded: no rank holds more tokens (``max_tokens_per_rank``, default T); ragged: this rank's T

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.comm.world_size

    @property
    def layout(self) -> Layout:
        return self.rows.layout

    @property
    def capacity(self) -> int:
        return self.rows.capacity

    @property
    def rows_shape(self) -> tuple[int, int] | None:
        """``(L, C)`` for the padded layout; ``None`` for the ragged one (its row count depends on data)."""
        return (self.num_local_experts, self.capacity) if self.layout == "padded" else None


def make_plan(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    comm: Comm,
    *,
    num_experts: int,
    layout: str,
    capacity: int | None,
    max_tokens_per_rank: int | None,
    zero_padding: bool,
) -> DispatchPlan:
    """Check the metadata of a dispatch (``MoEInputError`` naming the argument) and plan it."""
    validation.check_dispatch(x, topk_idx, topk_weights, num_experts, comm.world_size, layout, capacity, max_tokens_per_rank)
    if layout == "ragged":
        return DispatchPlan(comm, num_experts, RowLayout("ragged"), x.shape[0])
    bound = x.shape[0] if max_tokens_per_rank is None else max_tokens_per_rank
    resolved = comm.world_size * bound if capacity is None else capacity  # the worst case never drops
    return DispatchPlan(comm, num_experts, RowLayout("padded", resolved, zero_padding), bound)
