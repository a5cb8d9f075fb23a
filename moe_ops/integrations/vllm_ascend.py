"""vllm-ascend's ``MoETokenDispatcher`` interface over ``torch.ops.moe.*``, in both of its forms:

* vllm-ascend main (``vllm_ascend/ops/fused_moe/token_dispatcher.py``, 2026-08): ``token_dispatch(input)``
  with a ``MoETokenDispatchInput`` (``hidden_states``, ``topk_weights``, ``topk_ids``, ``routing``:
  ``expert_map``, ``global_redundant_expert_num``, ``mc2_mask``, ``apply_router_weight_on_input``,
  ``log2phy``, ``pertoken_scale``; ``quant``) returns a :class:`TokenDispatchOutput` with the fields of
  vllm-ascend's ``MoETokenDispatchOutput``;
* the earlier positional form, ``token_dispatch(hidden_states, topk_weights, topk_ids, expert_map=None,
  log2phy=None, global_redundant_expert_num=0, ..., mc2_mask=None, apply_router_weight_on_input=False,
  with_quant=False)``, returns vllm-ascend's dict (``group_list_type``, ``hidden_states``, ``group_list``,
  ``dynamic_scale``, ``context_metadata``).

Quantized dispatch (``with_quant=True``; from a ``MoETokenDispatchInput``, a ``quant`` whose
``dispatch_with_quant`` holds for an int8 type, W8A8 or W4A8): ``hidden_states`` int8 ``[rows, H]`` and
``dynamic_scale`` float32 ``[rows]``, one scale per row (``hidden_states[i] * dynamic_scale[i]``
dequantizes), as MC2's ``quant_mode`` 2 returns ``expand_x`` / ``dynamic_scale`` to vllm-ascend's
``TokenDispatcherWithMC2`` and its grouped matmuls take them (``per_token_scale``); ``moe.dispatch_quantized``
with ``quant="int8", quant_block=0`` (on ``mc2``, MC2's own quantization). MXFP and FP8 types are refused.

``token_combine(hidden_states, context_metadata=None, bias=None)`` (the metadata either form returned)
returns ``[T, H]``. Router weights are applied in combine, as vllm-ascend's dispatchers do, except with
``apply_router_weight_on_input`` (top-1 only), where they scale the input instead.

``expert_map`` is vllm-ascend's per-rank map (``[E]``: this rank's local id of each physical expert,
-1 elsewhere); the adapter all-gathers the group's rows (a functional collective, so compiled code
traces it) into the ``[W, E]`` table the ops take. ``log2phy`` goes to the ops as is.

The rows come back in vllm-ascend's grouped-matmul form with ``group_list_type = 1`` (counts): ragged
layout, packed rows and ``tokens_per_expert``; padded layout, the ``[L, C, H]`` rows flattened to
``[L*C, H]`` with every group ``C`` rows long (padding rows included; combine ignores them).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class TokenDispatchOutput:
    """What ``token_dispatch`` returns for a ``MoETokenDispatchInput``: vllm-ascend's ``MoETokenDispatchOutput``
    fields. ``hidden_states [rows, H]`` grouped by local expert, ``group_list [L]`` int64 rows per group
    (``group_list_type`` 1: counts); ``combine_metadata`` goes back to ``token_combine``."""

    hidden_states: Tensor
    group_list: Tensor
    group_list_type: int
    combine_metadata: dict[str, Any]
    dynamic_scale: Tensor | None = None
    topk_scales: Tensor | None = None


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
        hidden_states: Tensor | Any,
        topk_weights: Tensor | None = None,
        topk_ids: Tensor | None = None,
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
    ) -> dict[str, Any] | TokenDispatchOutput:
        """Dispatch ``hidden_states [T, H]`` by ``topk_ids [T, K]`` (logical ids) and ``topk_weights [T, K]``.
        ``mc2_mask [T]`` (bool) marks real rows of a padded batch; ``dynamic_eplb`` needs nothing here
        (the placement is whatever ``expert_map`` and ``log2phy`` say on each call). Given a
        ``MoETokenDispatchInput`` instead of ``hidden_states`` (and nothing else), its fields supply the
        arguments and the result is a :class:`TokenDispatchOutput`."""
        if isinstance(hidden_states, Tensor):
            if topk_weights is None or topk_ids is None:
                raise MoEInputError("token_dispatch takes a MoETokenDispatchInput, or hidden_states, topk_weights and topk_ids")
            given = dict(zip(_UNSUPPORTED, (shared_experts, quantized_x_for_share, dynamic_scale_for_share, pertoken_scale)))
            return self._dispatch(
                hidden_states, topk_weights, topk_ids, expert_map, log2phy, global_redundant_expert_num, mc2_mask,
                apply_router_weight_on_input, with_quant, given,
            )
        routing, quant = hidden_states.routing, hidden_states.quant
        if quant.comm_quant_mode is not None:
            raise MoEInputError(f"comm_quant_mode={quant.comm_quant_mode} is not supported: moe_ops combines unquantized rows")
        if quant.dispatch_with_quant and not quant.is_int_quant:
            raise MoEInputError(
                f"dispatch with quant_type={quant.quant_type} is not supported: moe_ops dispatches int8 rows with a "
                "per-token scale (W8A8, W4A8), not MXFP or FP8"
            )
        result = self._dispatch(
            hidden_states.hidden_states, hidden_states.topk_weights, hidden_states.topk_ids, routing.expert_map,
            routing.log2phy, routing.global_redundant_expert_num, routing.mc2_mask, routing.apply_router_weight_on_input,
            quant.dispatch_with_quant, {"pertoken_scale": routing.pertoken_scale},
        )
        return TokenDispatchOutput(
            result["hidden_states"], result["group_list"], result["group_list_type"], result["context_metadata"], result["dynamic_scale"]
        )

    def _dispatch(
        self,
        hidden_states: Tensor,
        topk_weights: Tensor,
        topk_ids: Tensor,
        expert_map: Tensor | None,
        log2phy: Tensor | None,
        global_redundant_expert_num: int,
        mc2_mask: Tensor | None,
        apply_router_weight_on_input: bool,
        with_quant: bool,
        unsupported: dict[str, Any],
    ) -> dict[str, Any]:
        """:meth:`token_dispatch` on its arguments; ``unsupported`` maps the options moe_ops does not take to their values."""
        for name, value in unsupported.items():
            if value is not None:
                raise MoEInputError(f"{name} is not supported by the moe_ops adapter (compute shared experts outside it)")
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
            **(dict(quant="int8", quant_block=0) if with_quant else {}),
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
            "dynamic_scale": dispatched.recv_scales.reshape(-1) if with_quant else None,  # [rows] float32
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
