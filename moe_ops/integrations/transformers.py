"""moe_ops as a HuggingFace transformers expert-parallel implementation (transformers >= 5.23).

    import moe_ops.integrations.transformers  # registers "moe_ops" and "moe_ops_padded"
    model = AutoModelForCausalLM.from_pretrained(
        path, distributed_config=DistributedConfig(fsdp_size=W, ep_size=W, ep_implementation="moe_ops"),
        experts_implementation="grouped_mm",
    )

``"moe_ops"`` (:class:`MoeOpsEP`) dispatches with the ragged layout (training, prefill): the host read of
the received row count happens inside the op, so ``torch.compile(experts.forward, fullgraph=True)``
holds. ``"moe_ops_padded"`` (:class:`MoeOpsPaddedEP`) uses the padded layout with a static bound on the
tokens any rank holds, set by :func:`register` (``max_tokens_per_rank=``): no host sync, so a decode step
captures in a CUDA graph; rows past a rank's batch are masked.

The experts run on the rows this rank received, top-1 with unit weights and local expert ids (padding
rows get the sentinel id ``num_local_experts``, which the experts skip); the router weights are applied
in combine, accumulated in float32. Gradients reach every rank that holds a token, router weights
included (the ops' registered autograd).

Not supported: the TP-shares-batch layout (``ep_size == tp_size > 1``), where the ranks of a TP group
hold the same batch; construction raises and says so (use ``ep_implementation="all_to_all"`` there).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from transformers.distributed.expert_parallel import (
    EPImplementation,
    EPImplementationInterface,
)

import moe_ops
from moe_ops.api import DispatchResult
from moe_ops.errors import MoEInputError
from moe_ops.plan import Layout


class MoeOpsEP(EPImplementation):
    """Tokens to this rank's experts and back through ``torch.ops.moe.dispatch`` / ``combine`` (ragged)."""

    registered_name: ClassVar[str] = "moe_ops"
    layout: ClassVar[Layout] = "ragged"

    def __init__(self, experts: torch.nn.Module, ep_mesh, tp_mesh) -> None:  # type: ignore[no-untyped-def]
        super().__init__(experts, ep_mesh, tp_mesh)
        if tp_mesh.size() > 1:
            raise MoEInputError(
                f"ep_implementation={type(self).registered_name!r} does not support ranks of a TP group sharing one "
                f"batch (tp_size={tp_mesh.size()}); use ep_implementation='all_to_all' there"
            )
        self.group_name = ep_mesh.get_group().group_name
        self.num_experts = self.num_local_experts * ep_mesh.size()

    def _dispatch(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> DispatchResult:
        return moe_ops.dispatch(
            hidden_states, top_k_index, top_k_weights.float(), self.num_experts, group=self.group_name, layout=self.layout
        )

    def _expert_ids(self, dispatched: DispatchResult) -> Tensor:
        """``[rows, 1]``: the local expert of each row of the ragged layout."""
        counts = dispatched.tokens_per_expert
        experts = torch.arange(counts.shape[0], device=counts.device)
        return torch.repeat_interleave(experts, counts.long(), output_size=dispatched.recv_x.shape[0]).unsqueeze(1)

    def __call__(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        dispatched = self._dispatch(hidden_states, top_k_index, top_k_weights)
        rows = dispatched.recv_x.reshape(-1, hidden_states.shape[-1])
        expert_ids = self._expert_ids(dispatched)
        out = self.experts_forward(rows, expert_ids, torch.ones(expert_ids.shape, dtype=rows.dtype, device=rows.device))
        return moe_ops.combine(out.view(*dispatched.recv_x.shape[:-1], -1), dispatched, group=self.group_name)


class MoeOpsPaddedEP(MoeOpsEP):
    """The padded layout (decode, CUDA graphs): ``recv_x [L, C, H]``, static for a fixed bound."""

    registered_name: ClassVar[str] = "moe_ops_padded"
    layout: ClassVar[Layout] = "padded"
    max_tokens_per_rank: ClassVar[int | None] = None  #: set by :func:`register`

    @classmethod
    def bound(cls) -> int:
        """The static bound on any rank's token count (raises while none is registered)."""
        if cls.max_tokens_per_rank is None:
            raise MoEInputError(
                "ep_implementation='moe_ops_padded' needs a static bound: call "
                "moe_ops.integrations.transformers.register(max_tokens_per_rank=N) before loading the model"
            )
        return cls.max_tokens_per_rank

    def _dispatch(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> DispatchResult:
        return moe_ops.dispatch(
            hidden_states,
            top_k_index,
            top_k_weights.float(),
            self.num_experts,
            group=self.group_name,
            layout="padded",
            max_tokens_per_rank=self.bound(),
        )

    def _expert_ids(self, dispatched: DispatchResult) -> Tensor:
        """``[L*C, 1]``: the local expert of each row, ``L`` (skipped by the experts) on padding rows."""
        num_local, capacity = dispatched.recv_weights.shape
        slot = torch.arange(capacity, device=dispatched.recv_weights.device)
        experts = torch.arange(num_local, device=slot.device).unsqueeze(1)
        return torch.where(slot < dispatched.tokens_per_expert.unsqueeze(1), experts, num_local).reshape(-1, 1)


def register(max_tokens_per_rank: int | None = None) -> None:
    """Register ``"moe_ops"`` and ``"moe_ops_padded"`` (the latter bound to ``max_tokens_per_rank``)."""
    MoeOpsPaddedEP.max_tokens_per_rank = max_tokens_per_rank
    for cls in (MoeOpsEP, MoeOpsPaddedEP):
        EPImplementationInterface.register(cls.registered_name, cls)


register()
