"""The plan of one dispatch: its arguments resolved against the group, each concept in one encoding.

The op schema takes ``capacity``, ``max_tokens_per_rank`` and ``max_recv_rows`` as optional ints; the plan
turns them into what every later step reads, once: the row layout (:class:`RowLayout`: its kind, the
padded layout's capacity, the bounded layout's row bound, the per-expert row multiple) and
``token_bound`` (a static bound on every rank's token count, where the transport needs one).

Three kinds of row layout (docs/contract.md):

* ``"ragged"``: ``[N, H]``, exactly the routed rows, expert-major; ``N`` depends on the data (a host read);
* ``"bounded"``: the ragged layout in a static ``[R, H]`` (``max_recv_rows=R``): no host read;
* ``"padded"``: ``[L, C, H]``, ``C`` rows per local expert: no host read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor

from moe_ops import validation
from moe_ops.comm import Comm
from moe_ops.packing import round_up
from moe_ops.quant import RowScales

Layout = Literal["ragged", "padded"]  #: what users choose (with ``max_recv_rows`` for the bounded kind)
Kind = Literal["ragged", "bounded", "padded"]  #: the row layout a dispatch returns


class RowLayout(NamedTuple):
    """How a rank lays out the routes it receives (docs/contract.md)."""

    kind: Kind
    capacity: int = 0  #: padded: rows per local expert (a multiple of ``pad_multiple``)
    max_rows: int = 0  #: bounded: ``R``, the rows of the layout (a multiple of ``pad_multiple``)
    pad_multiple: int = 1  #: ragged and bounded: each expert's rows start at, and fill up to, a multiple of this
    zero_padding: bool = False  #: write zeros to the padding rows (padded, bounded, and pad_multiple's rows)

    @property
    def static(self) -> bool:
        """No output size depends on data (padded, bounded): nothing is read back to the host."""
        return self.kind != "ragged"


@dataclass(frozen=True)
class DispatchPlan:
    """One ``moe.dispatch`` call, resolved against its group."""

    comm: Comm
    num_experts: int
    rows: RowLayout
    token_bound: int  #: static kinds: no rank holds more tokens (``max_tokens_per_rank``, default T); ragged: this rank's T
    scales: RowScales | None = None  #: quantized dispatch (``moe.dispatch_quantized``): the scales each row carries

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.comm.world_size

    @property
    def kind(self) -> Kind:
        return self.rows.kind

    @property
    def static(self) -> bool:
        return self.rows.static

    @property
    def capacity(self) -> int:
        return self.rows.capacity

    @property
    def rows_shape(self) -> tuple[int, ...] | None:
        """``(L, C)`` padded, ``(R,)`` bounded; ``None`` for ragged (its row count depends on data)."""
        if self.kind == "padded":
            return (self.num_local_experts, self.capacity)
        return (self.rows.max_rows,) if self.kind == "bounded" else None


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
    max_recv_rows: int | None,
    pad_multiple: int,
    zero_padding: bool,
    scales: RowScales | None = None,
) -> DispatchPlan:
    """Check the metadata of a dispatch (``MoEInputError`` naming the argument) and plan it (``scales``:
    a quantized dispatch, as :func:`moe_ops.validation.check_quantized` returned them)."""
    validation.check_dispatch(
        x, topk_idx, topk_weights, num_experts, comm.world_size, layout, capacity, max_tokens_per_rank, max_recv_rows, pad_multiple,
        token_dtypes=validation.TOKEN_DTYPES if scales is None else validation.quantized_token_dtypes(scales),
    )
    if layout == "ragged" and max_recv_rows is None:
        return DispatchPlan(comm, num_experts, RowLayout("ragged", pad_multiple=pad_multiple, zero_padding=zero_padding), x.shape[0], scales)
    bound = x.shape[0] if max_tokens_per_rank is None else max_tokens_per_rank
    if layout == "ragged":
        rows = RowLayout("bounded", max_rows=max_recv_rows or 0, pad_multiple=pad_multiple, zero_padding=zero_padding)
    else:
        resolved = comm.world_size * bound if capacity is None else capacity  # the worst case never drops
        rows = RowLayout("padded", capacity=round_up(resolved, pad_multiple), zero_padding=zero_padding)
    return DispatchPlan(comm, num_experts, rows, bound, scales)
