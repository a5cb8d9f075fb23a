"""The Python API over ``torch.ops.moe.*``: typed functions and a small :class:`Dispatcher`."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

import moe_ops.ops  # noqa: F401  (registers torch.ops.moe.*)
from moe_ops import quant as moe_quant
from moe_ops import validation
from moe_ops.comm import Group, comm_for, group_name_of, group_size_of
from moe_ops.errors import MoEInputError
from moe_ops.plan import Layout


class DispatchResult(NamedTuple):
    """What :func:`dispatch` returns (see docs/contract.md)."""

    recv_x: Tensor  #: [N, H] (ragged), [R, H] (ragged with max_recv_rows) or [L, C, H] (padded), x.dtype
    recv_weights: Tensor  #: [N], [R] or [L, C], topk_weights.dtype; 0 on padding rows
    tokens_per_expert: Tensor  #: [L] int32, rows per local expert (ragged: pad_multiple's padding included)
    dropped: Tensor  #: [L] int32, routes dropped at each local expert (over capacity or max_recv_rows)
    handle: list[Tensor]  #: what combine and the backward passes need (docs/contract.md, "The handle")


class QuantizedDispatchResult(NamedTuple):
    """What :func:`dispatch` returns for quantized rows (``x_scales`` or ``quant`` given; docs/contract.md)."""

    recv_x: Tensor  #: float8_e4m3fn / float8_e5m2 / int8 (x.dtype with dequantize), in the layout of DispatchResult.recv_x
    recv_scales: Tensor  #: [N, S], [R, S] or [L, C, S] float32: each row's scales
    recv_weights: Tensor
    tokens_per_expert: Tensor
    dropped: Tensor
    handle: list[Tensor]


def _check_dequantize(quant: str | None, dequantize: bool) -> None:
    """``dequantize`` says how quantized rows arrive: without ``quant`` there are none."""
    if dequantize and quant is None:
        raise MoEInputError("dequantize=True needs quant= (the format the rows travel in)")


def dispatch(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    num_experts: int,
    *,
    group: Group = None,
    layout: Layout = "ragged",
    capacity: int | None = None,
    max_tokens_per_rank: int | None = None,
    max_recv_rows: int | None = None,
    pad_multiple: int = 1,
    backend: str = "auto",
    zero_padding: bool | None = None,
    expert_map: Tensor | None = None,
    log2phy: Tensor | None = None,
    x_scales: Tensor | None = None,
    quant: str | None = None,
    quant_block: int = 128,
    round_scale: bool = False,
    dequantize: bool = False,
) -> DispatchResult | QuantizedDispatchResult:
    """Send tokens to the ranks holding their experts (``torch.ops.moe.dispatch``; quantized rows:
    ``torch.ops.moe.dispatch_quantized``).

    ``x`` ``[T, H]`` bf16/fp16/fp32, ``topk_idx`` ``[T, K]`` int32/int64 global expert ids (``-1`` = no
    route), ``topk_weights`` ``[T, K]`` float32. ``layout="ragged"`` returns exactly the routed rows
    (``[N, H]``, ``N`` read back to the host), or with ``max_recv_rows=R`` the same rows in a static
    ``[R, H]`` (no host read: routes past ``R`` are dropped and counted; ``max_tokens_per_rank`` bounds every
    rank's ``T``, default this rank's). ``layout="padded"`` takes a static bound: ``capacity`` rows per local
    expert (default the no-drop worst case ``W * max_tokens_per_rank``). ``pad_multiple=N``: each expert's
    ragged rows start at, and fill up to, a multiple of ``N`` (zero rows, counted in ``tokens_per_expert``;
    ``N`` rows for an expert with no route); the padded layout's capacity is rounded up to one.
    ``zero_padding``: write zeros to the padding rows. Default: while autograd records
    (training: experts that compute every row, e.g. ``torch.bmm``, must not see non-finite garbage, whose
    weight gradient ``row^T * 0`` would be NaN); skipped otherwise (decode pays only for routed rows).
    ``log2phy [E_logical]`` maps logical expert ids to physical ones (redundant experts);
    ``expert_map [W, E]`` places experts by a map instead of contiguously (row ``r``: rank ``r``'s local
    id of each global expert, -1 where absent; see docs/contract.md).

    Quantized rows (a :class:`QuantizedDispatchResult` with ``recv_scales``): ``x`` already quantized
    (float8_e4m3fn, float8_e5m2 or int8) with float32 ``x_scales`` (``[T, ceil(H / 128)]`` or ``[T, 1]``),
    or ``quant="fp8_e4m3"`` / ``"int8"`` to quantize a bf16/fp16/fp32 ``x`` in dispatch, with a scale per
    ``quant_block`` (128, or 0: per token) columns, rounded up to a power of two with ``round_scale``.
    Quantized rows carry no gradient (``x`` must not require one); the router's does. With
    ``dequantize=True`` (and ``quant``) the rows travel quantized and arrive dequantized in ``x.dtype``
    (FP8 forward, bf16 backward): ``recv_x`` is differentiable, straight through the rounding.
    """
    name = group_name_of(group)
    options = dict(
        num_experts=num_experts,
        group_name=name,
        group_size=group_size_of(name),
        backend=backend,
        layout=layout,
        capacity=capacity,
        max_tokens_per_rank=max_tokens_per_rank,
        max_recv_rows=max_recv_rows,
        pad_multiple=pad_multiple,
        zero_padding=torch.is_grad_enabled() if zero_padding is None else zero_padding,
    )
    if x_scales is None and quant is None:
        _check_dequantize(quant, dequantize)
        return DispatchResult(*torch.ops.moe.dispatch(x, topk_idx, topk_weights, expert_map, log2phy, **options))
    out = torch.ops.moe.dispatch_quantized(
        x, topk_idx, topk_weights, x_scales, expert_map, log2phy, **options, quant=quant or "", quant_block=quant_block,
        round_scale=round_scale, dequantize=dequantize,
    )
    return QuantizedDispatchResult(*out)


def combine(
    expert_out: Tensor, dispatched: DispatchResult | QuantizedDispatchResult, *, group: Group = None, backend: str = "auto"
) -> Tensor:
    """Weighted sum of each token's expert outputs, back on its source rank (``torch.ops.moe.combine``).

    ``expert_out`` has the layout of ``dispatched.recv_x``; returns ``[T, H]`` in ``expert_out.dtype``.
    ``backend="auto"`` runs the backend that made ``dispatched`` (its handle says which); naming another
    is an error.
    """
    return torch.ops.moe.combine(
        expert_out, dispatched.recv_weights, dispatched.handle, group_name=group_name_of(group), backend=backend
    )


class Dispatcher:
    """Holds the group, expert count and layout of one MoE layer, so calls read ``d.dispatch(x, idx, w)``
    (the arguments as :func:`dispatch` takes them).

    Build it outside compiled code: it resolves the group once (size, rank, local experts) and checks the
    options that need no tensor (``MoEInputError``, as dispatch would raise them).
    """

    def __init__(
        self,
        num_experts: int,
        *,
        group: Group = None,
        layout: Layout = "ragged",
        capacity: int | None = None,
        max_tokens_per_rank: int | None = None,
        max_recv_rows: int | None = None,
        pad_multiple: int = 1,
        backend: str = "auto",
        zero_padding: bool | None = None,
        quant: str | None = None,
        quant_block: int = 128,
        round_scale: bool = False,
        dequantize: bool = False,
    ) -> None:
        comm = comm_for(group_name_of(group))
        validation.check_options(num_experts, comm.world_size, layout, capacity, max_tokens_per_rank, max_recv_rows, pad_multiple)
        if layout == "padded" and capacity is None and max_tokens_per_rank is None:
            raise MoEInputError("layout='padded' needs a static bound: max_tokens_per_rank and/or capacity")
        self.num_experts = num_experts
        self.group_name = comm.group_name
        self.world_size = comm.world_size
        self.rank = comm.rank
        self.layout: Layout = layout
        self.capacity = capacity
        self.max_tokens_per_rank = max_tokens_per_rank
        self.max_recv_rows = max_recv_rows
        self.pad_multiple = pad_multiple
        self.backend = backend
        self.zero_padding = zero_padding
        if quant is not None:
            moe_quant.make_spec(quant, quant_block, round_scale)
        _check_dequantize(quant, dequantize)
        self.quant, self.quant_block, self.round_scale, self.dequantize = quant, quant_block, round_scale, dequantize

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def local_experts(self) -> range:
        """Global ids of the experts this rank holds."""
        n = self.num_local_experts
        return range(self.rank * n, (self.rank + 1) * n)

    def dispatch(
        self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, x_scales: Tensor | None = None
    ) -> DispatchResult | QuantizedDispatchResult:
        """:func:`dispatch` with this layer's options (``x_scales``: ``x`` is already quantized)."""
        return dispatch(
            x,
            topk_idx,
            topk_weights,
            self.num_experts,
            group=self.group_name,
            layout=self.layout,
            capacity=self.capacity,
            max_tokens_per_rank=self.max_tokens_per_rank,
            max_recv_rows=self.max_recv_rows,
            pad_multiple=self.pad_multiple,
            backend=self.backend,
            zero_padding=self.zero_padding,
            x_scales=x_scales,
            quant=self.quant,
            quant_block=self.quant_block,
            round_scale=self.round_scale,
            dequantize=self.dequantize,
        )

    def combine(self, expert_out: Tensor, dispatched: DispatchResult | QuantizedDispatchResult) -> Tensor:
        return combine(expert_out, dispatched, group=self.group_name, backend=self.backend)

    def __repr__(self) -> str:
        return (
            f"Dispatcher(num_experts={self.num_experts}, group={self.group_name!r}, world_size={self.world_size}, "
            f"layout={self.layout!r}, capacity={self.capacity}, max_tokens_per_rank={self.max_tokens_per_rank}, "
            f"max_recv_rows={self.max_recv_rows}, pad_multiple={self.pad_multiple}, backend={self.backend!r}"
            + ("" if self.quant is None else f", quant={self.quant!r}, quant_block={self.quant_block}, round_scale={self.round_scale}, dequantize={self.dequantize}")
            + ")"
        )
