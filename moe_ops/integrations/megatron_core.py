"""Megatron-Core's token dispatchers (tested against megatron-core 0.19.2) over ``torch.ops.moe.*``.
Importing this module imports Megatron-Core.

* :class:`MoEFlexTokenDispatcher`: ``MoELayer``'s flex dispatcher protocol (``moe_token_dispatcher_type=
  "flex"``), ragged layout: routing-map ``dispatch_preprocess``, ``token_dispatch``, ``dispatch_postprocess``,
  ``combine_preprocess``, ``token_combine``, ``combine_postprocess``, the shared-expert overlap hooks,
  ``get_expert_zero_copy_buffers`` (``(None, None)``), the over-budget methods and the cudagraph attributes.
  Every ``moe_flex_dispatcher_backend`` value (``deepep``, ``hybridep``, ``ncclep``) runs on the moe_ops
  transport bound to the class (:func:`install`, :class:`MoELayer`).
* :class:`InferenceAllGatherDispatcher` (for ``inference_moe_token_dispatcher_type="nccl"``) and
  :class:`InferenceAllGatherVDispatcher` (``"nvls"``): subclasses of Megatron's inference dispatchers that
  hand its inference experts what Megatron's hand them (gathered rows, probs, ``routing_map``, the
  valid-token count, a bf16 combine), the rows gathered by ``moe.dispatch`` and summed back by
  ``moe.combine`` on the ``allgather`` transport.
* :class:`MoELayer` (for layer specs) and :func:`install` (for existing configs): the ways in.

Megatron's experts apply the probabilities and its combine only sums; ours too (combine with unit weights).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import dynamic_context
from megatron.core.transformer.moe import moe_layer
from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization, get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher
from megatron.core.transformer.moe.token_dispatcher_inference import (
    InferenceAllGatherDispatcherBase,
    NCCLAllGatherDispatcher,
    NVLSAllGatherVDispatcher,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

import moe_ops
from moe_ops import config as config_module
from moe_ops.api import DispatchResult, QuantizedDispatchResult
from moe_ops.comm import group_name_of
from moe_ops.errors import MoEInputError
from moe_ops.integrations.common import (
    BoundTransport,
    Patches,
    bind_transport,
    check_contiguous_experts,
    host_counts,
    pad_multiple_for,
    unweighted_combine,
)
from moe_ops.packing import RowFormat

UPSTREAM_VERSION = "0.19.2"
FLEX_BACKENDS = ("deepep", "hybridep", "ncclep")  #: Megatron's moe_flex_dispatcher_backend values

# TransformerConfig fields the flex path reads whose non-default values moe_ops cannot honour.
_REFUSED = {
    "moe_pad_expert_input_to_capacity": "moe_ops' ragged layout is dropless; use moe_token_dispatcher_type='allgather'",
    "moe_ncclep_static_shape": "the experts get exactly the routed rows ([N, H], N data-dependent)",
    "moe_ncclep_zero_copy": "expert outputs are not written into communication buffers",
    "overlap_moe_expert_parallel_comm": "the 1F1B EP-overlap schedule is not tested with moe_ops",
}


def _check_flex_config(config: TransformerConfig, tp_size: int) -> None:
    """Raise ``MoEInputError`` naming the first field moe_ops cannot honour (see the module's docs page for
    the fields that are honoured or change nothing)."""
    if config.moe_flex_dispatcher_backend not in FLEX_BACKENDS:
        raise MoEInputError(
            f"moe_flex_dispatcher_backend={config.moe_flex_dispatcher_backend!r}: Megatron-Core takes one of {FLEX_BACKENDS}"
        )
    for field, why in _REFUSED.items():
        if getattr(config, field, False):
            raise MoEInputError(f"{field}=True is not supported: {why}")
    if tp_size > 1:
        raise MoEInputError(f"expert_tensor_parallel_size={tp_size} is not supported: moe_ops dispatches over the EP group only")


class MoEFlexTokenDispatcher(BoundTransport, MoETokenDispatcher):
    """Megatron-Core's flex dispatcher protocol on the moe_ops transport ``transport`` (class attribute).

    ``dispatch_preprocess(hidden [S, B, H], routing_map [T, E] bool, probs [T, E])`` keeps the top
    ``moe_router_topk`` routed experts per token; ``token_dispatch`` runs ``moe.dispatch``;
    ``dispatch_postprocess`` returns ``(rows [N, H], tokens_per_expert [L] int64 on the host, probs [N]
    fp32, fp64 when moe_router_dtype="fp64")``; ``token_combine`` runs ``moe.combine`` (unit weights) to
    ``[T, H]``; ``combine_postprocess`` restores ``[S, B, H]``. One rank (no expert parallelism) works too.
    """

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: list[int],
        config: TransformerConfig,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection or get_default_pg_collection())
        _check_flex_config(config, self.tp_size)
        if self.transport == "deepep" and config.moe_flex_dispatcher_num_sms is not None:
            config_module.deepep_num_sms = config.moe_flex_dispatcher_num_sms
        padding = get_align_size_for_quantization(config) if config.moe_router_padding_for_quantization else None
        pad_multiple = pad_multiple_for("moe_router_padding_for_quantization", padding)
        self.moe = moe_ops.Dispatcher(
            config.num_moe_experts, group=group_name_of(self.ep_group), backend=self.transport, pad_multiple=pad_multiple,
            **self.wire_options(),
        )
        check_contiguous_experts(num_local_experts, local_expert_indices, self.moe)
        self.num_local_experts = num_local_experts
        self.local_expert_indices = local_expert_indices
        self.token_probs: Tensor | None = None
        self.token_indices: Tensor | None = None
        self._dispatched: DispatchResult | QuantizedDispatchResult | None = None
        self.cudagraph_attrs = ["token_probs", "token_indices"]

    def dispatch_preprocess(self, hidden_states: Tensor, routing_map: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        """``([T, H], token_probs [T, K])``: the top ``moe_router_topk`` of ``probs``, ids not in
        ``routing_map`` masked (-1), as the DeepEP path reads them."""
        self.hidden_shape = hidden_states.shape
        num_tokens = routing_map.shape[0]
        dense = probs.reshape(num_tokens, -1)
        self.token_probs, indices = torch.topk(dense, self.config.moe_router_topk, dim=-1)
        routed = routing_map.reshape(num_tokens, -1).gather(1, indices)
        self.token_indices = indices.masked_fill(~routed, -1)
        return hidden_states.view(-1, self.hidden_shape[-1]), self.token_probs

    def token_dispatch(
        self, hidden_states: Tensor, probs: Tensor | None = None, async_finish: bool = True, allocate_on_comm_stream: bool = True
    ) -> tuple[Tensor, Tensor]:
        """``moe.dispatch`` (permuting too): ``(rows [N, H], their probs [N] fp32)``. The op is stream-ordered:
        ``async_finish`` and ``allocate_on_comm_stream`` change nothing. Overlapped shared experts run at
        the points Megatron's flex dispatcher runs them."""
        if self.token_indices is None or self.token_probs is None:
            raise MoEInputError("token_dispatch: call dispatch_preprocess first")
        if self.shared_experts is not None:
            self.shared_experts.wait_current_stream()
        self._dispatched = self.moe.dispatch(hidden_states, self.token_indices, self.token_probs.float())
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states, wait_current_stream=False)
            self.shared_experts.linear_fc1_forward_and_act(self._dispatched.recv_x)
        return self._dispatched.recv_x, self._dispatched.recv_weights

    def dispatch_postprocess(self, hidden_states: Tensor, probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(rows, tokens_per_expert [L] int64 on the host, probs)``: Megatron's experts call ``.tolist()``."""
        if self._dispatched is None:
            raise MoEInputError("dispatch_postprocess: call token_dispatch first")
        if self.config.moe_router_dtype == "fp64":
            probs = probs.to(torch.float64)
        return hidden_states, host_counts(self._dispatched.tokens_per_expert), probs

    def combine_preprocess(self, hidden_states: Tensor) -> Tensor:
        """Pass-through: expert outputs are already in the dispatch layout."""
        return hidden_states

    def token_combine(self, hidden_states: Tensor, async_finish: bool = True, allocate_on_comm_stream: bool = True) -> Tensor:
        """``moe.combine`` with unit weights (the experts applied the probabilities): ``[T, H]``."""
        if self._dispatched is None:
            raise MoEInputError("token_combine: call the dispatch steps first")
        if self.shared_experts is not None:
            self.shared_experts.wait_current_stream()
        return unweighted_combine(hidden_states, self._dispatched, self.moe.group_name)

    def combine_postprocess(self, hidden_states: Tensor) -> Tensor:
        if self.shared_experts is not None:
            self.shared_experts.linear_fc2_forward(hidden_states)
            self.shared_experts.post_forward_comm()
            hidden_states += self.shared_experts.get_output()
        return hidden_states.view(self.hidden_shape)

    def check_over_budget(self) -> None:
        """None: moe_ops' ragged dispatch is dropless, it has no budget to exceed (as Megatron's DeepEP path)."""
        return None

    def reset_over_budget(self) -> None:
        """Nothing to reset."""


# --- inference --------------------------------------------------------------------------------------


class _GatherByDispatch:
    """Inference all-gather through the ops: every token is routed to each rank's one "expert" (``E = W``,
    padded layout, capacity ``W * bound``), so rank r receives every rank's rows in (rank, token) order,
    valid rows first; combine with unit weights sums each token's rows over the ranks (reduce-scatter).
    Hidden rows, probs and routing map travel as one packed row (dispatch is a bit-exact copy)."""

    transport: ClassVar[str] = "allgather"
    ep_group: Any
    _gathered: DispatchResult | None = None

    def _gather(self, hidden: Tensor, probs: Tensor, routing_map: Tensor, bound: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``hidden [T, H]``, ``probs [T, K]``, ``routing_map [T, K]`` of every rank (``T <= bound``) as
        ``[W * bound, *]`` rows, valid ones first, and their count ``[1]`` int32."""
        group = group_name_of(self.ep_group)
        world = dist.get_world_size(self.ep_group)
        fmt = RowFormat(((hidden.shape[1], hidden.dtype), (probs.shape[1], probs.dtype), (routing_map.shape[1], routing_map.dtype)))
        rows = fmt.empty(hidden.shape[0], hidden.device)
        for view, value in zip(fmt.views(rows), (hidden, probs, routing_map), strict=True):
            view.copy_(value)
        everywhere = torch.arange(world, device=hidden.device).repeat(hidden.shape[0], 1)
        unit = torch.ones(everywhere.shape, dtype=torch.float32, device=hidden.device)
        self._gathered = moe_ops.dispatch(
            rows.view(hidden.dtype), everywhere, unit, world, group=group, layout="padded",
            max_tokens_per_rank=bound, backend=self.transport, zero_padding=False,
        )  # fmt: skip
        hidden, probs, routing_map = (v.contiguous() for v in fmt.views(self._gathered.recv_x[0].view(torch.uint8)))
        return hidden, probs, routing_map, self._gathered.tokens_per_expert.to(torch.int32)

    def _scatter(self, expert_output: Tensor) -> Tensor:
        """Sum each gathered token's expert output ``[rows <= W * bound, H]`` back on its rank: ``[T, H]`` bf16."""
        if self._gathered is None:
            raise MoEInputError("token_combine: call token_dispatch first")
        capacity = self._gathered.recv_x.shape[1]
        padded = torch.nn.functional.pad(expert_output, (0, 0, 0, capacity - expert_output.shape[0]))
        return unweighted_combine(padded.unsqueeze(0), self._gathered, group_name_of(self.ep_group)).to(torch.bfloat16)


def _valid_tokens(device: torch.device) -> Tensor:
    """The ``[1]`` int32 valid-token count Megatron's inference experts read (allocated where missing)."""
    if InferenceAllGatherDispatcherBase._valid_tokens_tensor is None:
        InferenceAllGatherDispatcherBase._valid_tokens_tensor = torch.zeros(1, dtype=torch.int32, device=device)
    return InferenceAllGatherDispatcherBase._valid_tokens_tensor


class InferenceAllGatherDispatcher(_GatherByDispatch, NCCLAllGatherDispatcher):
    """Megatron's ``NCCLAllGatherDispatcher`` with the gather and reduce-scatter done by the ops.

    ``token_dispatch(hidden [T, H], probs [T, K])`` returns every EP rank's rows ``[sum T, H]`` and probs
    ``[sum T, K]`` in rank order, sets ``routing_map [sum T, K]`` and the valid-token count; with
    ``_use_allgather_v`` false (CUDA-graph steps) every rank must hold ``T`` tokens and nothing is read
    back to the host, otherwise the counts are gathered first (a host sync, as in Megatron).
    ``token_combine(out [sum T, H])`` returns ``[T, H]`` bf16."""

    def dispatch_preprocess(self, hidden_states: Tensor, routing_map: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        self._device = hidden_states.device
        return super().dispatch_preprocess(hidden_states, routing_map, probs)

    def update_metadata(self, local_tokens: int) -> None:
        """Megatron's per-step refresh: the valid-token count, and with ``_use_allgather_v`` every rank's
        token count (``_local_tokens_per_rank``, a host sync)."""
        valid = _valid_tokens(self._device)
        if type(self)._use_allgather_v:
            counts = torch.empty(self.ep_size, dtype=torch.int64, device=self._device)
            dist.all_gather_into_tensor(counts, torch.tensor([local_tokens], device=self._device), group=self.ep_group)
            type(self)._local_tokens_per_rank = counts.tolist()
            total = sum(type(self)._local_tokens_per_rank)
        else:
            total = self.ep_size * local_tokens
        valid.fill_(total)
        InferenceAllGatherDispatcherBase._host_valid_tokens_estimate = total

    def token_dispatch(self, hidden_states: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        if self.ep_size == 1:
            if self._runs_metadata_sync:
                _valid_tokens(hidden_states.device).fill_(hidden_states.shape[0])
            return hidden_states, probs
        if self._runs_metadata_sync:
            self.update_metadata(hidden_states.shape[0])
        per_rank = type(self)._local_tokens_per_rank if type(self)._use_allgather_v else None
        bound = max(per_rank) if per_rank else hidden_states.shape[0]
        hidden, probs, self.routing_map, _ = self._gather(hidden_states, probs, self.routing_map, bound)
        if per_rank:  # Megatron's non-graph path hands over exactly sum(T) rows
            total = sum(per_rank)
            hidden, probs, self.routing_map = hidden[:total], probs[:total], self.routing_map[:total]
        return hidden, probs

    def token_combine(self, hidden_states: Tensor) -> Tensor:
        if self.ep_size == 1:
            return hidden_states.to(torch.bfloat16)
        return self._scatter(hidden_states)


class InferenceAllGatherVDispatcher(_GatherByDispatch, NVLSAllGatherVDispatcher):
    """Megatron's ``NVLSAllGatherVDispatcher`` (ranks hold different token counts, no host sync, CUDA-graph
    capturable) with the all-gather-V and reduce-scatter-V done by the ops, on any device: no symmetric
    memory, no NVLink multicast. ``token_dispatch`` returns ``[W * Tmax, H]`` rows and ``[W * Tmax, K]``
    probs and routing map, ``Tmax = _per_rank_worst_case_token_count``, the valid rows first (their count
    in the valid-token tensor, written on the device); routes of rows past the bound context's real token
    count (``set_real_token_count_tensor``) are masked as in Megatron. ``token_combine`` returns ``[T, H]`` bf16."""

    @classmethod
    def allocate_buffers(
        cls, per_rank_worst_case_token_count: int, topk: int, hidden_size: int, ep_group: dist.ProcessGroup
    ) -> None:
        """Keep the per-rank bound; nothing else to allocate (no symmetric memory)."""
        cls._per_rank_worst_case_token_count = per_rank_worst_case_token_count

    def update_metadata(self, local_tokens: int) -> None:
        """The host estimate of the valid tokens (the exact count is written by ``token_dispatch``)."""
        InferenceAllGatherDispatcherBase._host_valid_tokens_estimate = local_tokens * self.ep_size

    def token_dispatch(self, hidden_states: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        valid = _valid_tokens(hidden_states.device)
        if self.ep_size == 1:
            if self._runs_metadata_sync:
                valid.fill_(hidden_states.shape[0])
            return hidden_states, probs
        if self._runs_metadata_sync:
            self.update_metadata(hidden_states.shape[0])
        real = type(self)._real_token_count_tensor
        if real is not None:  # CUDA-graph padding rows route nowhere
            rows = torch.arange(hidden_states.shape[0], device=hidden_states.device) + self.sp_rank * hidden_states.shape[0]
            self.routing_map = self.routing_map.masked_fill((rows >= real).unsqueeze(1), -1)
        hidden, probs, self.routing_map, count = self._gather(hidden_states, probs, self.routing_map, self._per_rank_worst_case_token_count)
        if self._runs_metadata_sync:
            valid.copy_(count)
        return hidden, probs

    def token_combine(self, hidden_states: Tensor) -> Tensor:
        if self.ep_size == 1:
            return hidden_states.to(torch.bfloat16)
        return self._scatter(hidden_states)


# --- ways in ----------------------------------------------------------------------------------------

_installed = Patches()


def _patch(patches: Patches, backend: str, quant: str | None, quant_block: int) -> None:
    """Replace the dispatcher names ``MoELayer`` and the dynamic inference context look up."""
    patches.set(moe_layer, "MoEFlexTokenDispatcher", bind_transport(MoEFlexTokenDispatcher, backend, quant, quant_block))
    for module in (moe_layer, dynamic_context):
        patches.set(module, "NCCLAllGatherDispatcher", InferenceAllGatherDispatcher)
        patches.set(module, "NVLSAllGatherVDispatcher", InferenceAllGatherVDispatcher)


def install(backend: str = "auto", *, quant: str | None = None, quant_block: int = 128) -> Patches:
    """Make every ``MoELayer`` built from now on dispatch with moe_ops: the flex dispatcher
    (``moe_token_dispatcher_type="flex"``, any ``moe_flex_dispatcher_backend``) on the moe_ops transport
    ``backend`` (``"auto"``: ``local`` for one rank, ``collective`` otherwise; see docs/backends.md), and
    the inference dispatchers (``transformer_impl="inference_optimized"``) on the ``allgather`` transport.
    ``quant`` (``"fp8_e4m3"`` or ``"int8"``, a scale per ``quant_block`` columns or, with 0, per token): the
    flex dispatcher's rows cross the EP group quantized and reach the experts dequantized, gradients in the
    tokens' dtype (Megatron-Core 0.19.2 has no FP8 dispatch of its own; docs/integrations/megatron.md).

    Replaces the names ``MoEFlexTokenDispatcher``, ``NCCLAllGatherDispatcher`` and
    ``NVLSAllGatherVDispatcher`` in ``megatron.core.transformer.moe.moe_layer`` (and the last two in
    ``megatron.core.inference.contexts.dynamic_context``, which allocates and configures them). Returns the
    patches: ``.undo()`` (or leaving a ``with install(...):`` block) restores Megatron's. A second call
    replaces the first."""
    _installed.undo()
    _patch(_installed, backend, quant, quant_block)
    return _installed


class MoELayer(moe_layer.MoELayer):
    """Megatron-Core's ``MoELayer`` dispatching with moe_ops, for layer specs (``partial(MoELayer,
    submodules=...)``): the same constructor, plus ``backend``, the moe_ops transport of the flex dispatcher,
    and ``quant`` / ``quant_block`` as :func:`install` takes them. Needs ``moe_token_dispatcher_type="flex"``."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Any = None,
        layer_number: int | None = None,
        pg_collection: Any = None,
        is_mtp_layer: bool = False,
        name: str | None = None,
        *,
        backend: str = "auto",
        quant: str | None = None,
        quant_block: int = 128,
    ) -> None:
        if config.moe_token_dispatcher_type != "flex":
            raise MoEInputError(
                f"moe_token_dispatcher_type={config.moe_token_dispatcher_type!r}: moe_ops' MoELayer is the flex "
                "dispatcher's drop-in; set moe_token_dispatcher_type='flex'"
            )
        with Patches() as patches:
            _patch(patches, backend, quant, quant_block)
            super().__init__(config, submodules, layer_number, pg_collection, is_mtp_layer, name)


__all__ = [
    "FLEX_BACKENDS",
    "UPSTREAM_VERSION",
    "InferenceAllGatherDispatcher",
    "InferenceAllGatherVDispatcher",
    "MoEFlexTokenDispatcher",
    "MoELayer",
    "install",
]
