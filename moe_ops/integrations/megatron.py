"""Megatron-Core / NeMo Automodel token dispatchers over ``torch.ops.moe.*``.

* :class:`MoEFlexTokenDispatcher` + :class:`TokenDispatcherConfig`: the flex dispatcher of NeMo
  Automodel's ``components/moe/megatron/token_dispatcher.py`` (training and prefill, ragged layout):
  the same constructor, ``token_permutation`` / ``token_permutation2`` / ``token_unpermutation`` and
  their ``dispatch_*`` / ``combine_*`` steps.
* :class:`InferenceTokenDispatcher`: Megatron-Core's inference all-gather dispatcher
  (``token_dispatch`` / ``token_combine`` with pass-through ``dispatch_postprocess`` /
  ``combine_preprocess``), padded layout, CUDA-graph capturable.

Megatron's experts multiply their rows by the routing probabilities they receive
(``permuted_probs``) and its combine only sums; the adapters keep that split: combine runs with unit
weights. Our ops do the permutation together with the exchange, so the ``*_all_to_all`` steps run the op
and the pre/post steps only reshape or hand results over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

import moe_ops
from moe_ops import backends
from moe_ops import config as config_module
from moe_ops.api import DispatchResult
from moe_ops.backends.deepep import FLEX_DISPATCHER_BACKENDS
from moe_ops.comm import group_name_of
from moe_ops.errors import MoEInputError

# moe_flex_dispatcher_backend values -> moe_ops backends. Any registered moe_ops backend name is taken too.
FLEX_BACKENDS = {"moe_ops": "auto", **FLEX_DISPATCHER_BACKENDS}


@dataclass
class TokenDispatcherConfig:
    """The configuration fields the flex dispatcher reads (NeMo Automodel's names and defaults), each
    mapped to a moe_ops setting by :func:`resolve_config`, which rejects values it cannot honour."""

    moe_enable_deepep: bool = True
    moe_permute_fusion: bool = False
    moe_expert_capacity_factor: float | None = None
    moe_router_topk: int = 2
    moe_router_expert_pad_multiple: int | None = None
    num_moe_experts: int = 64
    moe_router_dtype: str | None = "fp32"
    moe_flex_dispatcher_backend: str = "deepep"
    moe_deepep_num_sms: int = 20
    moe_hybridep_num_sms: int = 24
    moe_hybridep_permute_fusion: bool = False
    moe_hybridep_num_sms_preprocessing: int | None = None
    moe_hybridep_num_blocks_permute: int | None = None
    moe_hybridep_num_blocks_unpermute: int | None = None
    moe_share_token_dispatcher: bool = True
    moe_deepep_async_dispatch: bool = False


@dataclass(frozen=True)
class ResolvedConfig:
    backend: str  #: the moe_ops backend name
    probs_dtype: torch.dtype | None  #: dtype of the returned permuted probs (None: as given)
    mask_zero_probs: bool  #: routes with probability 0 are masked (the router dropped them)


_PROBS_DTYPES: dict[str | None, torch.dtype | None] = {"fp32": torch.float32, "fp64": torch.float64, None: None}


def resolve_config(config: TokenDispatcherConfig) -> ResolvedConfig:
    """Map ``config`` onto moe_ops, or raise ``MoEInputError`` naming the field moe_ops cannot honour.

    ``moe_permute_fusion``, ``moe_enable_deepep`` and ``moe_share_token_dispatcher`` change nothing here
    (permutation is always fused into the ops, and dispatchers hold no shared state);
    ``moe_deepep_num_sms`` becomes ``moe_ops.config.deepep_num_sms`` when the dispatcher is built on the
    ``deepep`` backend (DeepEP keeps its SM count process-wide);
    ``moe_expert_capacity_factor`` keeps the flex dispatcher's meaning — the router has already dropped
    over-capacity routes by zeroing their probability, and those routes are masked.
    """
    name = config.moe_flex_dispatcher_backend
    backend = FLEX_BACKENDS.get(name, name)
    if backend != "auto" and backend not in backends.available():
        known = ", ".join(sorted({*FLEX_BACKENDS, *backends.available()}))
        raise MoEInputError(f"moe_flex_dispatcher_backend={name!r} is not available; choose one of: {known}")
    if config.moe_router_expert_pad_multiple is not None:
        raise MoEInputError(
            "moe_router_expert_pad_multiple is not supported: moe_ops keeps expert rows packed; use the padded "
            "layout (capacity per expert) where a static per-expert size is needed"
        )
    if config.moe_deepep_async_dispatch:
        raise MoEInputError("moe_deepep_async_dispatch=True is not supported: moe_ops dispatch is a stream-ordered op")
    if config.moe_router_dtype not in _PROBS_DTYPES:
        raise MoEInputError(f"moe_router_dtype={config.moe_router_dtype!r} is not supported; use 'fp32', 'fp64' or None")
    return ResolvedConfig(backend, _PROBS_DTYPES[config.moe_router_dtype], config.moe_expert_capacity_factor is not None)


def _contiguous_experts(num_local_experts: int, local_expert_indices: list[int], rank: int) -> None:
    expected = list(range(rank * num_local_experts, (rank + 1) * num_local_experts))
    if list(local_expert_indices) != expected:
        raise MoEInputError(
            f"local_expert_indices must be this rank's contiguous block {expected[:1]}..{expected[-1:]}, "
            f"got {list(local_expert_indices)}; place experts by a map with moe_ops.dispatch(expert_map=...)"
        )


class MoEFlexTokenDispatcher:
    """NeMo Automodel's ``MoEFlexTokenDispatcher`` interface over ``torch.ops.moe.dispatch/combine``
    (ragged layout). ``token_permutation2(hidden [.., H], num_local_tokens, token_probs [T, K],
    token_indices [T, K])`` returns ``(permuted_hidden [N, H], tokens_per_expert [L] (device, int32),
    permuted_probs [N])``; the experts apply ``permuted_probs``; ``token_unpermutation(expert_out [N, H])``
    returns ``[.., H]``."""

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: list[int],
        config: TokenDispatcherConfig,
        ep_group: dist.ProcessGroup | str | None,
    ) -> None:
        self.config = config
        self.resolved = resolve_config(config)
        if self.resolved.backend == "deepep":
            config_module.deepep_num_sms = config.moe_deepep_num_sms
        self.group_name = group_name_of(ep_group)
        self.moe = moe_ops.Dispatcher(config.num_moe_experts, group=self.group_name, backend=self.resolved.backend)
        if num_local_experts != self.moe.num_local_experts:
            raise MoEInputError(
                f"num_local_experts={num_local_experts}, but num_moe_experts={config.num_moe_experts} over "
                f"{self.moe.world_size} ranks gives {self.moe.num_local_experts}"
            )
        _contiguous_experts(num_local_experts, local_expert_indices, self.moe.rank)
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.ep_size = self.moe.world_size
        self.shared_experts = None
        self._indices: Tensor | None = None
        self._probs: Tensor | None = None
        self._dispatched: DispatchResult | None = None

    # --- dispatch steps ---------------------------------------------------------------------------

    def dispatch_preprocess(self, hidden_states: Tensor, num_local_tokens: int, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Dense ``probs [T, E]`` (zero where not routed): keep the top ``moe_router_topk`` per token."""
        token_probs, token_indices = torch.topk(probs.reshape(num_local_tokens, -1), self.config.moe_router_topk, dim=-1)
        return self.dispatch_preprocess2(hidden_states, num_local_tokens, token_probs, token_indices)

    def dispatch_preprocess2(
        self, hidden_states: Tensor, num_local_tokens: int, token_probs: Tensor, token_indices: Tensor
    ) -> tuple[Tensor, Tensor]:
        self.hidden_shape = hidden_states.shape
        if self.resolved.mask_zero_probs:
            token_indices = token_indices.masked_fill(token_probs == 0, -1)
        self._indices, self._probs = token_indices, token_probs
        return hidden_states.reshape(-1, self.hidden_shape[-1]), token_probs

    def dispatch_all_to_all(
        self, hidden_states: Tensor, probs: Tensor | None = None, async_finish: bool = False, allocate_on_comm_stream: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Run ``moe.dispatch`` (the permutation happens here too); returns ``(rows, their probs)``."""
        assert self._indices is not None and self._probs is not None, "call dispatch_preprocess first"
        self._dispatched = self.moe.dispatch(hidden_states, self._indices, self._probs.float())
        return self._dispatched.recv_x, self._dispatched.recv_weights

    def dispatch_postprocess(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        assert self._dispatched is not None, "call dispatch_all_to_all first"
        probs = self._dispatched.recv_weights
        if self.resolved.probs_dtype is not None:
            probs = probs.to(self.resolved.probs_dtype)
        return hidden_states, self._dispatched.tokens_per_expert, probs

    def token_permutation(self, hidden_states: Tensor, num_local_tokens: int, probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden_states, _ = self.dispatch_preprocess(hidden_states, num_local_tokens, probs)
        hidden_states, _ = self.dispatch_all_to_all(hidden_states)
        return self.dispatch_postprocess(hidden_states)

    def token_permutation2(
        self, hidden_states: Tensor, num_local_tokens: int, token_probs: Tensor, token_indices: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        hidden_states, _ = self.dispatch_preprocess2(hidden_states, num_local_tokens, token_probs, token_indices)
        hidden_states, _ = self.dispatch_all_to_all(hidden_states)
        return self.dispatch_postprocess(hidden_states)

    # --- combine steps ----------------------------------------------------------------------------

    def combine_preprocess(self, hidden_states: Tensor) -> Tensor:
        """Pass-through: expert outputs are already in the dispatch layout."""
        return hidden_states

    def combine_all_to_all(self, hidden_states: Tensor, async_finish: bool = False, allocate_on_comm_stream: bool = False) -> Tensor:
        """Run ``moe.combine`` with unit weights (the experts applied the probabilities)."""
        assert self._dispatched is not None, "call the dispatch steps first"
        return _unweighted_combine(hidden_states, self._dispatched, self.moe)

    def combine_postprocess(self, hidden_states: Tensor) -> Tensor:
        return hidden_states.view(self.hidden_shape)

    def token_unpermutation(self, hidden_states: Tensor) -> Tensor:
        hidden_states = self.combine_preprocess(hidden_states)
        return self.combine_postprocess(self.combine_all_to_all(hidden_states))


def _unweighted_combine(expert_out: Tensor, dispatched: DispatchResult, moe: moe_ops.Dispatcher) -> Tensor:
    """``moe.combine`` summing each token's rows as they are (Megatron's experts already weighted them)."""
    ones = torch.ones_like(dispatched.recv_weights)
    return moe.combine(expert_out, dispatched._replace(recv_weights=ones))


class InferenceTokenDispatcher:
    """Megatron-Core's inference all-gather dispatcher interface over ``torch.ops.moe.*`` (padded layout,
    ``allgather`` backend by default; any padded-capable backend may be named). Every rank holds at most
    ``max_tokens_per_rank`` tokens; padding rows of a CUDA-graph bucket should carry ``-1`` routes.

    MoELayer order: ``dispatch_preprocess(hidden, routing_map [T, K] expert ids, probs [T, K])`` →
    ``token_dispatch(hidden, probs)`` → ``dispatch_postprocess(hidden, probs)`` → experts(rows,
    tokens_per_expert, probs) → ``combine_preprocess`` → ``token_combine`` → ``combine_postprocess``.
    """

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: list[int],
        num_moe_experts: int,
        ep_group: dist.ProcessGroup | str | None,
        *,
        max_tokens_per_rank: int,
        capacity: int | None = None,
        backend: str = "allgather",
    ) -> None:
        self.moe = moe_ops.Dispatcher(
            num_moe_experts,
            group=group_name_of(ep_group),
            layout="padded",
            max_tokens_per_rank=max_tokens_per_rank,
            capacity=capacity,
            backend=backend if group_name_of(ep_group) else "auto",
        )
        if num_local_experts != self.moe.num_local_experts:
            raise MoEInputError(f"num_local_experts={num_local_experts}, expected {self.moe.num_local_experts}")
        _contiguous_experts(num_local_experts, local_expert_indices, self.moe.rank)
        self.ep_size = self.moe.world_size
        self._routing_map: Tensor | None = None
        self._dispatched: DispatchResult | None = None

    def dispatch_preprocess(self, hidden_states: Tensor, routing_map: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Keep the top-k expert ids ``routing_map [T, K]`` (``-1`` = no route) for ``token_dispatch``."""
        self.hidden_shape = hidden_states.shape
        self._routing_map = routing_map
        return hidden_states.reshape(-1, self.hidden_shape[-1]), probs

    def token_dispatch(self, hidden_states: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        """``moe.dispatch``: returns ``(rows [L, C, H], their probs [L, C])``."""
        assert self._routing_map is not None, "call dispatch_preprocess first"
        self._dispatched = self.moe.dispatch(hidden_states, self._routing_map, probs.float())
        return self._dispatched.recv_x, self._dispatched.recv_weights

    def dispatch_postprocess(self, hidden_states: Tensor, probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pass-through, with the rows each local expert holds: ``(rows, tokens_per_expert [L], probs)``."""
        assert self._dispatched is not None, "call token_dispatch first"
        return hidden_states, self._dispatched.tokens_per_expert, probs

    def combine_preprocess(self, expert_output: Tensor) -> Tensor:
        """Pass-through."""
        return expert_output

    def token_combine(self, hidden_states: Tensor) -> Tensor:
        """``moe.combine`` with unit weights (the experts applied the probabilities): ``[T, H]``."""
        assert self._dispatched is not None, "call token_dispatch first"
        return _unweighted_combine(hidden_states, self._dispatched, self.moe)

    def combine_postprocess(self, hidden_states: Tensor) -> Tensor:
        return hidden_states.view(self.hidden_shape)


__all__ = [
    "FLEX_BACKENDS",
    "InferenceTokenDispatcher",
    "MoEFlexTokenDispatcher",
    "ResolvedConfig",
    "TokenDispatcherConfig",
    "resolve_config",
]
