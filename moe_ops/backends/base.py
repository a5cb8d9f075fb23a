"""What a backend (one transport) implements.

The ops (:mod:`moe_ops.ops`) do everything that is the same for every backend: metadata checks, the
backend's own limits (:meth:`Backend.check_dispatch`, :meth:`Backend.check_rows`), value checks, the
agreement with the peers (with the backend's :meth:`Backend.payload` riding on it), and the handle's
tag. A backend moves tokens and lays them out through the local stage (:mod:`moe_ops.stage`).

A backend's handle (what :meth:`Backend.dispatch` returns in :class:`DispatchOutputs`) starts with
``sources [T, K]`` int64 on the source rank and ``rows`` (the layout's int64 row map, ``[N]`` or
``[L, C]``); the rest is its own. The ops put the tag in front (:mod:`moe_ops.handle`) and take it off
again before calling the backend's combine and backward kernels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from moe_ops.comm import Comm
from moe_ops.plan import DispatchPlan, Kind

#: Every rank's agreed payload (row ``s`` = rank ``s``), or ``None`` where the backend has none.
Peers = list[list[int]] | None


class DispatchOutputs(NamedTuple):
    recv_x: Tensor  #: [N, H], [R, H] or [L, C, H], x.dtype
    recv_weights: Tensor  #: [N], [R] or [L, C], topk_weights.dtype
    tokens_per_expert: Tensor  #: [L] int32
    dropped: Tensor  #: [L] int32
    handle: list[Tensor]  #: [sources [T, K], rows [N], [R] or [L, C], *the backend's own]
    recv_scales: Tensor | None = None  #: quantized dispatch: [N, S], [R, S] or [L, C, S] float32, with recv_x's rows


class Backend(ABC):
    """One transport. The four kernels are the real kernels of the four ops; shapes follow
    docs/contract.md. ``handle`` arguments are the backend's part of the handle (no tag)."""

    name: ClassVar[str]
    device_types: ClassVar[frozenset[str]]
    layouts: ClassVar[frozenset[Kind]]  #: the kinds of row layout it returns (docs/contract.md)
    multi_rank: ClassVar[bool]
    quantized: ClassVar[bool] = False  #: dispatches quantized rows (``moe.dispatch_quantized``)

    def check_dispatch(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan) -> None:
        """Raise :class:`moe_ops.MoEInputError` for a dispatch outside this transport's limits. Metadata only:
        the fake kernel runs it at trace time too."""

    def check_rows(self, name: str, rows: Tensor, handle: list[Tensor], comm: Comm) -> None:
        """Raise :class:`moe_ops.MoEInputError` for rows ``name`` (``expert_out``, ``grad_recv_x``,
        ``grad_out``) that combine or a backward pass of this transport cannot move. Metadata only."""

    def prepare(self, plan: DispatchPlan) -> None:
        """Raise :class:`moe_ops.MoEInputError` where what the transport needs at run time is missing (a
        library that does not import). Runs in the real kernel only, before any communication."""

    def payload(self, topk_idx: Tensor, plan: DispatchPlan) -> Tensor | None:
        """What this rank must tell its peers before any token moves (int64, at most ``2W + 1`` values),
        computed from the routes; the ops agree on it and pass every rank's to :meth:`dispatch`."""
        return None

    @abstractmethod
    def dispatch(
        self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan, peers: Peers, x_scales: Tensor | None = None
    ) -> DispatchOutputs:
        """``topk_idx`` is in the contiguous placement (ids outside ``[0, E)`` masked); ``peers`` holds
        every rank's :meth:`payload`. A quantized dispatch (``plan.scales``, only where :attr:`quantized`)
        moves ``x`` with ``x_scales``, or quantizes ``x`` as ``plan.scales.quantize`` says, and returns
        ``recv_scales``."""

    @abstractmethod
    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool) -> Tensor:
        """``[T, H]`` in ``expert_out.dtype``. ``packed`` (here and in :meth:`dispatch_backward`): the handle
        is a ragged layout's without ``pad_multiple``, each row exactly one route (``handle.Header.packed``)."""

    @abstractmethod
    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm, packed: bool
    ) -> tuple[Tensor, Tensor]:
        """``(grad_x [T, H], grad_topk_weights [T, K])``."""

    @abstractmethod
    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        """``(grad_expert_out like expert_out, grad_recv_weights like recv_weights)``."""

    @abstractmethod
    def handle_len(self, kind: Kind) -> int:
        """How many tensors :meth:`dispatch` returns in the handle for a row layout of ``kind``."""

    @abstractmethod
    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        """Empty tensors with the shapes, dtypes and devices of the handle :meth:`dispatch` returns (for
        the fake kernel); ``rows_shape`` is the layout's (``[N]`` with ``N`` unbacked, ``[R]`` or ``[L, C]``)."""


def int64_like(t: Tensor, shape: tuple[int | torch.SymInt, ...] | torch.Size) -> Tensor:
    return t.new_empty(shape, dtype=torch.int64)
