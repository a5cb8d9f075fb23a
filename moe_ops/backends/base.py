"""What a backend implements, and the plan of one dispatch call that it receives."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from moe_ops.groups import Comm
from moe_ops.handshake import Handshake

Layout = Literal["ragged", "padded"]


@dataclass(frozen=True)
class DispatchPlan:
    """Arguments of one ``moe.dispatch`` call, resolved against its group."""

    comm: Comm
    num_experts: int
    capacity: int | None  #: None: ragged layout; C: padded layout with C rows per local expert
    max_tokens_per_rank: int  #: static bound on every rank's token count (padded layout; ragged: this rank's T)
    zero_padding: bool  #: padded layout: write zeros to recv_x's padding rows
    handshake: Handshake | None  #: multi-rank: the backend calls handshake.exchange(...) before moving any token

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.comm.world_size

    @property
    def layout(self) -> Layout:
        return "ragged" if self.capacity is None else "padded"

    def agree(self, payload: Tensor | None) -> list[list[int]]:
        """Every rank's ``payload`` (row ``s`` = rank ``s``) through the handshake; a group of one has
        none (its own payload comes back). ``[]`` where the handshake skipped the exchange."""
        if self.handshake is None:
            return [] if payload is None else [payload.tolist()]
        return self.handshake.exchange(payload) or []


class DispatchOutputs(NamedTuple):
    recv_x: Tensor  #: [N, H] or [L, C, H], x.dtype
    recv_weights: Tensor  #: [N] or [L, C], topk_weights.dtype
    tokens_per_expert: Tensor  #: [L] int32
    dropped: Tensor  #: [L] int32
    handle: list[Tensor]  #: backend-private; handle[0] is always the [T, K] source-route map


class Backend(ABC):
    """One transport. Each method is the real kernel of one op; shapes follow docs/contract.md.

    ``handle[0]`` must be an int64 ``[T, K]`` tensor on the source rank (the ops read ``T`` and ``K``
    from it); the rest of the handle is the backend's own. A multi-rank ``dispatch`` must call
    ``plan.handshake.exchange(payload)`` once before any token moves (the ops have already agreed for
    combine and the backward passes).
    """

    name: ClassVar[str]
    device_types: ClassVar[frozenset[str]]
    layouts: ClassVar[frozenset[Layout]]
    multi_rank: ClassVar[bool]

    @abstractmethod
    def dispatch(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, plan: DispatchPlan) -> DispatchOutputs: ...

    @abstractmethod
    def combine(self, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm) -> Tensor:
        """``[T, H]`` in ``expert_out.dtype``."""

    @abstractmethod
    def dispatch_backward(
        self, grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        """``(grad_x [T, H], grad_topk_weights [T, K])``."""

    @abstractmethod
    def combine_backward(
        self, grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], comm: Comm
    ) -> tuple[Tensor, Tensor]:
        """``(grad_expert_out like expert_out, grad_recv_weights like recv_weights)``."""

    @abstractmethod
    def handle_len(self, layout: Layout) -> int:
        """How many tensors ``dispatch`` returns in the handle for ``layout``."""

    @abstractmethod
    def rows_shape(self, handle: list[Tensor]) -> tuple[int, ...]:
        """The layout's row shape (``[N]`` or ``[L, C]``) recorded in ``handle``."""

    @abstractmethod
    def fake_handle(self, x: Tensor, topk_idx: Tensor, rows_shape: tuple[int, ...], plan: DispatchPlan) -> list[Tensor]:
        """Handle tensors with the shapes, dtypes and devices ``dispatch`` returns (used by the fake kernel)."""


def int64_like(t: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    return t.new_empty(shape, dtype=torch.int64)
