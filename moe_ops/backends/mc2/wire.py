"""What the ``mc2`` backend sends through MC2, and how it rebuilds the contract's layout from what arrives.

MC2 moves token rows only, and documents the values of its handle (``assist_info_for_combine``,
``ep_recv_counts``) as opaque. So each dispatched row carries its own metadata behind the token's
values: ``[x (H) | metadata (M) | zeros]``, ``width`` a multiple of 32 columns. The metadata is the
token's *key* (source rank * BS + token, 24 bits), its ``K`` contiguous expert ids + 1 (16 bits each,
0 = no route) and its ``K`` router weights (their float32 bits), as digits:

* plain rows (``quant_mode`` 0, a pure copy): base-256 digits stored as the values 0..255, exact in
  bf16 and fp16;
* int8 rows (``quant_mode`` 2: MC2 scales each row by ``127 / max|row|`` and rounds to int8): base-16
  digits ``d`` stored as ``(2d - 15) / 15 * s`` with ``s = max(max|x row|, 1e-4)`` (the floor in the
  token dtype, as :data:`moe_ops.quant.AMAX_FLOOR`). They never exceed ``s`` and the key's top digit is 0
  (keys < 2^20), which is stored as ``-s``: the row's maximum is ``s``, so the token is quantized as MC2
  quantizes it alone wherever ``max|x| >= 1e-4``, and an all-zero token gets a finite scale (MC2's own
  ``127 / 0`` is infinite). The int8 levels of two digits are 17 apart, so every digit survives the rounding.

On the expert rank, a row's local expert comes from ``expert_token_nums`` (rows are grouped by expert,
in expert order), its route ``k`` from the ids, and its position from the keys: rows of one expert are
put in (source rank, token) order whatever order MC2 delivered them in, then the local stage's layout
(:func:`moe_ops.stage.expert_layout`) keeps the first ``C`` and counts the rest. Nothing depends on MC2's order inside an expert or on its
opaque handle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from moe_ops import routing, stage
from moe_ops.indexing import take
from moe_ops.packing import round_up
from moe_ops.plan import RowLayout
from moe_ops.quant import AMAX_FLOOR

_KEY_BITS, _ID_BITS, _WEIGHT_BITS = 24, 16, 32
_INT8_MAX = 127
WIDTH_MULTIPLE = 32  # MC2's hidden sizes are multiples of 32 on A2; the rows are padded to one everywhere


def route_ids(topk_idx: Tensor, num_experts: int) -> Tensor:
    """``[T, K]`` int64: the routes MC2 carries — ids in ``[0, E)``, each expert once per row (a repeat
    is masked: MC2 cannot send a token to one expert twice); -1 elsewhere."""
    return routing.unique_routes(routing.masked_ids(topk_idx, num_experts))


def sent_ids(ids: Tensor, num_experts: int) -> Tensor:
    """``[BS, K]`` int32 ``expert_ids`` for MC2: ``ids`` where a route, and in every masked slot a
    distinct expert the row does not use (MC2 requires ids in ``[0, E)`` with no repeat in a row; such
    slots are masked by ``x_active_mask``, or, where there is none, carry a row the receiver discards).
    Needs ``K <= E``."""
    valid = ids >= 0
    used = torch.zeros(ids.shape[0], num_experts + 1, dtype=torch.bool, device=ids.device)
    used.scatter_(1, torch.where(valid, ids, num_experts), True)
    unused = torch.sort(used[:, :num_experts].to(torch.int8), dim=1, stable=True).indices  # unused first
    nth_masked = (torch.cumsum(~valid, dim=1) - 1).clamp(min=0)
    return torch.where(valid, ids, unused.gather(1, nth_masked)).to(torch.int32)


def _digits(values: Tensor, bits: int, digit_bits: int) -> Tensor:
    """``[..., n]`` non-negative int64 -> ``[..., n * bits / digit_bits]`` digits, least significant first."""
    shifts = torch.arange(0, bits, digit_bits, device=values.device)
    return ((values.unsqueeze(-1) >> shifts) & ((1 << digit_bits) - 1)).flatten(-2)


def _undigits(digits: Tensor, bits: int, digit_bits: int) -> Tensor:
    shifts = torch.arange(0, bits, digit_bits, device=digits.device)
    return (digits.unflatten(-1, (-1, bits // digit_bits)) << shifts).sum(-1)


class Received(NamedTuple):
    """Decoded ``expand_x`` rows (garbage past the rows MC2 filled)."""

    tokens: Tensor  #: [A, H] as on the wire: the token dtype, or int8 for int8 rows
    scales: Tensor | None  #: [A, 1] float32: MC2's ``dynamic_scales`` of int8 rows (``tokens * scales`` dequantizes)
    keys: Tensor  #: [A] int64: source rank * BS + source token
    ids: Tensor  #: [A, K] int64: the token's contiguous expert ids, -1 = no route
    weights: Tensor  #: [A, K] float32: the token's router weights


@dataclass(frozen=True)
class Wire:
    """The row format of one dispatch: ``hidden`` token columns, ``top_k`` routes, int8 or plain."""

    hidden: int
    top_k: int
    quantized: bool = False

    @property
    def _digit_bits(self) -> int:
        return 4 if self.quantized else 8

    @property
    def _fields(self) -> tuple[tuple[int, int], ...]:
        """(count, bits) of the metadata fields: key, ids, weights."""
        return (1, _KEY_BITS), (self.top_k, _ID_BITS), (self.top_k, _WEIGHT_BITS)

    @property
    def meta_columns(self) -> int:
        return sum(n * bits for n, bits in self._fields) // self._digit_bits

    @property
    def width(self) -> int:
        """Columns of a row on the wire: MC2's ``H``."""
        return round_up(self.hidden + self.meta_columns, WIDTH_MULTIPLE)

    def encode(self, x: Tensor, keys: Tensor, ids: Tensor, weights: Tensor | None) -> Tensor:
        """``[BS, width]`` rows in ``x.dtype`` from ``x [BS, H]`` (``H >= 1``), ``keys [BS]``, ``ids [BS, K]``
        (-1 = no route) and ``weights [BS, K]`` float32 (``None``: zeros)."""
        bits = torch.zeros_like(ids) if weights is None else weights.float().view(torch.int32).long() & 0xFFFFFFFF
        fields = (keys.unsqueeze(1), ids + 1, bits)
        digits = torch.cat([_digits(v, b, self._digit_bits) for v, (_, b) in zip(fields, self._fields, strict=True)], 1)
        if self.quantized:
            floor = torch.tensor(AMAX_FLOOR, dtype=x.dtype).float()  # exact in x.dtype: the digits reach it
            digits = (2 * digits - 15) / 15 * x.abs().amax(1, keepdim=True).float().clamp(min=floor)
        rows = x.new_zeros(x.shape[0], self.width)
        rows[:, : self.hidden] = x
        rows[:, self.hidden : self.hidden + self.meta_columns] = digits.to(x.dtype)
        return rows

    def decode(self, rows: Tensor, dynamic_scales: Tensor | None) -> Received:
        """Read ``expand_x`` rows ``[A, width]`` back; int8 rows come with MC2's ``dynamic_scales [A]``."""
        meta = rows[:, self.hidden : self.hidden + self.meta_columns].float()
        scales = None
        if self.quantized:
            assert dynamic_scales is not None
            scales = dynamic_scales.unsqueeze(1)
            meta = (meta * (15 / _INT8_MAX) + 15) / 2
        digits = torch.nan_to_num(meta).round().long().clamp(0, (1 << self._digit_bits) - 1)
        values, start = [], 0
        for count, bits in self._fields:
            width = count * bits // self._digit_bits
            values.append(_undigits(digits[:, start : start + width], bits, self._digit_bits))
            start += width
        keys, ids, bits = values
        weights = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
        return Received(rows[:, : self.hidden], scales, keys[:, 0], ids - 1, weights)


class Placement(NamedTuple):
    """Where the routes in ``expand_x`` go in the layout: padded ``[L, C]`` (flat layout row ``e * C + i``)
    or bounded ``[R]``."""

    row_slot: Tensor  #: [A] int64: layout row of each expand_x row; -1 if it holds no kept route
    row_k: Tensor  #: [A] int64: the k of the route an expand_x row holds; -1 if none
    slot_row: Tensor  #: [L, C] or [R] int64: expand_x row of each layout row; -1 on padding
    tokens_per_expert: Tensor  #: [L] int32
    dropped: Tensor  #: [L] int32


def place(received: Received, expert_ends: Tensor, rank: int, num_local: int, layout_rows: RowLayout) -> Placement:
    """Lay out the routes of ``received`` as ``layout_rows`` says (padded or bounded): ``expert_ends [L]`` is
    MC2's ``expert_token_nums`` as a cumulative sum (rows ``[ends[e-1], ends[e])`` belong to local expert ``e``)."""
    rows = torch.arange(received.keys.shape[0], device=received.keys.device)
    expert = torch.searchsorted(expert_ends.long(), rows, right=True)  # L past the last filled row
    match = received.ids == (rank * num_local + expert).unsqueeze(1)
    valid = match.any(dim=1) & (expert < num_local)
    order = torch.sort(torch.where(valid, received.keys, torch.iinfo(torch.int64).max), stable=True).indices
    layout = stage.expert_layout(torch.where(valid, expert, -1)[order].unsqueeze(1), num_local, layout_rows)
    row_slot = torch.empty_like(order).scatter_(0, order, layout.route_row[:, 0])
    slot_row = torch.where(layout.row_src >= 0, take(order, layout.row_src), -1)
    row_k = torch.where(valid, match.int().argmax(dim=1), -1)
    return Placement(row_slot, row_k, slot_row, layout.tokens_per_expert, layout.dropped)
