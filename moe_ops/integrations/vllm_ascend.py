"""vllm-ascend's ``MoETokenDispatcher`` interface over ``torch.ops.moe.*``.

``token_dispatch(hidden_states, topk_weights, topk_ids, expert_map=None, log2phy=None,
global_redundant_expert_num=0, ..., mc2_mask=None, apply_router_weight_on_input=False, with_quant=False)``
returns vllm-ascend's dict (``group_list_type``, ``hidden_states``, ``group_list``, ``dynamic_scale``,
``context_metadata``); ``token_combine(hidden_states, context_metadata=None, bias=None)`` returns
``[T, H]``. Router weights are applied in combine, as vllm-ascend's dispatchers do, except with
``apply_router_weight_on_input`` (top-1 only), where they scale the input instead.

``expert_map`` is vllm-ascend's per-rank map (``[E]``: this rank's local id of each physical expert,
-1 elsewhere); the adapter all-gathers the group's rows (a functional collective, so compiled code
traces it) into the ``[W, E]`` table the ops take. ``log2phy`` goes to the ops as is.

The rows come back in vllm-ascend's grouped-matmul form with ``group_list_type = 1`` (counts): ragged
layout, packed rows and ``tokens_per_expert``; padded layout, the ``[L, C, H]`` rows flattened to
``[L*C, H]`` with every group ``C`` rows long (padding rows included; combine ignores them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

import moe_ops
from moe_ops.api import DispatchResult
from moe_ops.comm import group_name_of
from moe_ops.errors import MoEInputError
from moe_ops.plan import Layout

GROUP_LIST_COUNTS = 1  # vllm-ascend's group_list_type for per-expert counts (0 is cumulative)
_UNSUPPORTED = ("shared_experts", "quantized_x_for_share", "dynamic_scale_for_share", "pertoken_scale")


class MoETokenDispatcher:
    """vllm-ascend's dispatcher interface. ``num_experts`` counts logical experts (the physical count adds
    ``global_redundant_expert_num``, or is ``len(expert_map)``); ``group`` is the EP group (None: one rank)."""

    def __init__(
        self,
        *,
        top_k: int,
        num_experts: int,
        group: dist.ProcessGroup | str | None = None,
        layout: Layout = "ragged",
        max_tokens_per_rank: int | None = None,
        capacity: int | None = None,
        backend: str = "auto",
        **_vllm_kwargs: Any,
    ) -> None:
        self.top_k = top_k
        self.num_experts = num_experts
        self.group_name = group_name_of(group)
        self.layout: Layout = layout
        self.max_tokens_per_rank = max_tokens_per_rank
        self.capacity = capacity
        self.backend = backend
        self._last: dict[str, Any] | None = None

    def _global_expert_map(self, expert_map: Tensor) -> Tensor:
        """``[W, E]``: every rank's ``expert_map [E]`` row, gathered."""
        if not self.group_name:
            return expert_map.unsqueeze(0)
        gathered = funcol.all_gather_tensor(expert_map.unsqueeze(0), 0, self.group_name)
        return funcol.wait_tensor(gathered)

    def token_dispatch(
        self,
        hidden_states: Tensor,
        topk_weights: Tensor,
        topk_ids: Tensor,
        expert_map: Tensor | None = None,
        log2phy: Tensor | None = None,
        global_redundant_expert_num: int = 0,
        shared_experts: Any = None,
        quantized_x_for_share: Any = None,
        dynamic_scale_for_share: Any = None,
        mc2_mask: Tensor | None = None,
        apply_router_weight_on_input: bool = False,
        with_quant: bool = False,
        dynamic_eplb: bool = False,
        pertoken_scale: Tensor | None = None,
    ) -> dict[str, Any]:
        """Dispatch ``hidden_states [T, H]`` by ``topk_ids [T, K]`` (logical ids) and ``topk_weights [T, K]``.
        ``mc2_mask [T]`` (bool) marks real rows of a padded batch; ``dynamic_eplb`` needs nothing here
        (the placement is whatever ``expert_map`` and ``log2phy`` say on each call)."""
        given = dict(zip(_UNSUPPORTED, (shared_experts, quantized_x_for_share, dynamic_scale_for_share, pertoken_scale)))
        for name, value in given.items():
            if value is not None:
                raise MoEInputError(f"{name} is not supported by the moe_ops adapter (compute shared experts outside it)")
        if with_quant:
            raise MoEInputError("with_quant=True is not supported: moe_ops dispatches bf16/fp16/fp32 tokens")
        if apply_router_weight_on_input:
            if topk_weights.shape[-1] != 1:
                raise MoEInputError("apply_router_weight_on_input needs top-1 routing (vllm-ascend's rule)")
            hidden_states = hidden_states * topk_weights.to(hidden_states.dtype)
        if mc2_mask is not None:
            topk_ids = torch.where(mc2_mask.unsqueeze(1), topk_ids, -1)
        num_physical = expert_map.shape[0] if expert_map is not None else self.num_experts + global_redundant_expert_num
        dispatched = moe_ops.dispatch(
            hidden_states.reshape(-1, hidden_states.shape[-1]),
            topk_ids,
            topk_weights.float(),
            num_physical,
            group=self.group_name,
            layout=self.layout,
            capacity=self.capacity,
            max_tokens_per_rank=self.max_tokens_per_rank,
            backend=self.backend,
            expert_map=None if expert_map is None else self._global_expert_map(expert_map),
            log2phy=log2phy,
        )
        context = {"dispatched": dispatched, "unit_weights": apply_router_weight_on_input, "shape": hidden_states.shape}
        self._last = context
        if self.layout == "padded":
            num_local, capacity = dispatched.recv_weights.shape
            rows = dispatched.recv_x.flatten(0, 1)
            group_list = torch.full((num_local,), capacity, dtype=torch.int64, device=rows.device)
        else:
            rows, group_list = dispatched.recv_x, dispatched.tokens_per_expert.long()
        return {
            "group_list_type": GROUP_LIST_COUNTS,
            "hidden_states": rows,
            "group_list": group_list,
            "dynamic_scale": None,
            "context_metadata": context,
        }

    def token_combine(
        self, hidden_states: Tensor, context_metadata: dict[str, Any] | None = None, bias: Tensor | None = None
    ) -> Tensor:
        """Combine expert outputs (the rows ``token_dispatch`` returned, in the same order) into ``[T, H]``,
        weighted by the router weights (unless they were applied on the input)."""
        if bias is not None:
            raise MoEInputError("bias is not supported (vllm-ascend's dispatchers reject it too)")
        context = context_metadata or self._last
        assert context is not None, "call token_dispatch first"
        dispatched: DispatchResult = context["dispatched"]
        if context["unit_weights"]:
            dispatched = dispatched._replace(recv_weights=torch.ones_like(dispatched.recv_weights))
        expert_out = hidden_states.reshape(*dispatched.recv_x.shape[:-1], hidden_states.shape[-1])
        out = moe_ops.combine(expert_out, dispatched, group=self.group_name, backend=self.backend)
        return out.view(*context["shape"][:-1], out.shape[-1])
