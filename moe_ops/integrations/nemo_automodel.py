"""NeMo Automodel's flex token dispatcher (``nemo_automodel/components/moe/megatron/token_dispatcher.py``,
tested against 0.7.0) over ``torch.ops.moe.*``, ragged layout. Imports NeMo only in :func:`install`.

* :class:`TokenDispatcherConfig`: every 0.7.0 field with its default; a field a later NeMo adds is warned
  about once and ignored (never a ``TypeError``); values moe_ops cannot honour raise ``MoEInputError``.
* :class:`MoEFlexTokenDispatcher`: NeMo's constructor, methods, defaults and class attributes.
* :func:`install`: NeMo has no dispatcher registry; its experts module
  (``nemo_automodel.components.moe.experts``) builds ``TokenDispatcherConfig`` and ``MoEFlexTokenDispatcher``
  by name for ``BackendConfig.dispatcher`` ``"deepep"``, ``"uccl_ep"`` and ``"hybridep"``. ``install``
  replaces those two names there (and skips ``GroupedExpertsDeepEP._init_deepep_buffer``, which would
  allocate a DeepEP buffer) until ``undo()``.

NeMo's experts multiply their rows by the probabilities they receive and its combine only sums; so does
ours (combine with unit weights). The permutation happens inside the op, so ``dispatch_all_to_all`` runs
``moe.dispatch`` and ``combine_all_to_all`` runs ``moe.combine``; the pre/post steps reshape.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
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

UPSTREAM_VERSION = "0.7.0"
FLEX_BACKENDS = ("deepep", "hybridep", "uccl_ep")  #: NeMo's moe_flex_dispatcher_backend values

_warned_fields: set[str] = set()


def _tolerate_later_fields(cls: type) -> type:
    """Let the dataclass ``cls`` take keyword fields it does not know (a later NeMo's): each is warned
    about once per process and ignored. The signature gains ``**later_fields``."""
    init = cls.__init__
    known = {f.name for f in dataclasses.fields(cls)}

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        for name in sorted(kwargs.keys() - known):
            kwargs.pop(name)
            if name not in _warned_fields:
                _warned_fields.add(name)
                warnings.warn(
                    f"TokenDispatcherConfig: field {name!r} is not in NeMo Automodel {UPSTREAM_VERSION}; moe_ops ignores it",
                    stacklevel=2,
                )
        init(self, *args, **kwargs)

    signature = inspect.signature(init)
    later = inspect.Parameter("later_fields", inspect.Parameter.VAR_KEYWORD)
    __init__.__signature__ = signature.replace(parameters=[*signature.parameters.values(), later])  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


@_tolerate_later_fields
@dataclass
class TokenDispatcherConfig:
    """NeMo Automodel 0.7.0's fields and defaults. What each becomes: docs/integrations/nemo-automodel.md."""

    moe_enable_deepep: bool = True
    moe_permute_fusion: bool = False
    moe_expert_capacity_factor: float | None = None
    moe_router_topk: int = 2
    moe_router_expert_pad_multiple: int | None = None
    num_moe_experts: int = 64
    moe_router_dtype: str = "fp32"
    moe_flex_dispatcher_backend: Literal["deepep", "hybridep", "uccl_ep"] = "deepep"
    moe_deepep_num_sms: int = 20
    moe_hybridep_num_sms: int = 24
    moe_hybridep_permute_fusion: bool = False
    moe_hybridep_compact_routing: bool = False
    moe_hybridep_num_sms_preprocessing: int | None = None
    moe_hybridep_num_blocks_permute: int | None = None
    moe_hybridep_num_blocks_unpermute: int | None = None
    moe_share_token_dispatcher: bool = True
    moe_deepep_async_dispatch: bool = False
    moe_benchmark_static_routing: bool = False


def _check_config(config: TokenDispatcherConfig) -> None:
    """Raise ``MoEInputError`` naming the first field moe_ops cannot honour. The rest change nothing here:
    the permutation is always fused (``moe_permute_fusion``, ``moe_hybridep_permute_fusion``), dispatchers
    share no state (``moe_share_token_dispatcher``), HybridEP's kernel tuning and routing format
    (``moe_hybridep_*``), ``moe_enable_deepep`` and the host-metadata cache hint
    ``moe_benchmark_static_routing`` have no counterpart and no effect on results."""
    if config.moe_flex_dispatcher_backend not in FLEX_BACKENDS:
        raise MoEInputError(
            f"moe_flex_dispatcher_backend={config.moe_flex_dispatcher_backend!r}: NeMo Automodel takes one of {FLEX_BACKENDS}"
        )
    if config.moe_deepep_async_dispatch:
        raise MoEInputError("moe_deepep_async_dispatch=True is not supported: moe_ops dispatch is a stream-ordered op")


class MoEFlexTokenDispatcher(BoundTransport):
    """NeMo Automodel's ``MoEFlexTokenDispatcher`` on the moe_ops transport ``transport`` (class attribute;
    :func:`install` binds it). ``token_permutation2(hidden [.., H], num_local_tokens, token_probs [T, K],
    token_indices [T, K])`` returns ``(rows [N, H], tokens_per_expert [L] int64 on the host, probs [N] fp32,
    fp64 when moe_router_dtype="fp64")``; the experts apply the probs; ``token_unpermutation(out [N, H])``
    returns ``[.., H]``. Unlike NeMo's, one rank (no expert parallelism) works too."""

    #: NeMo's shared communication managers: moe_ops dispatchers hold no shared state, so these stay None.
    shared_deepep_manager: ClassVar[Any] = None
    shared_hybridep_manager: ClassVar[Any] = None
    shared_uccl_manager: ClassVar[Any] = None

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: list[int],
        config: TokenDispatcherConfig,
        ep_group: dist.ProcessGroup,
    ) -> None:
        _check_config(config)
        self.config = config
        self.shared_experts = None
        self.group = ep_group
        self.tp_size = 1
        self.hybridep_metadata_processor = None
        if self.transport == "deepep":
            sms = config.moe_hybridep_num_sms if config.moe_flex_dispatcher_backend == "hybridep" else config.moe_deepep_num_sms
            config_module.deepep_num_sms = sms
        pad_multiple = pad_multiple_for("moe_router_expert_pad_multiple", config.moe_router_expert_pad_multiple)
        self.moe = moe_ops.Dispatcher(
            config.num_moe_experts, group=group_name_of(ep_group), backend=self.transport, pad_multiple=pad_multiple,
            **self.wire_options(),
        )
        self.ep_size = self.moe.world_size
        check_contiguous_experts(num_local_experts, local_expert_indices, self.moe)
        self.num_local_experts = num_local_experts
        self.local_expert_indices = local_expert_indices
        self.token_probs: Tensor | None = None
        self.token_indices: Tensor | None = None
        self._dispatched: DispatchResult | QuantizedDispatchResult | None = None

    def get_pipeline_runtime_initializers(self, *, hidden_dim: int, dtype: torch.dtype) -> tuple[()]:
        """Nothing to prepare before a pipeline step (NeMo returns HybridEP initializers only)."""
        return ()

    # --- dispatch steps ---------------------------------------------------------------------------

    def dispatch_preprocess2(
        self, hidden_states: Tensor, num_local_tokens: int, token_probs: Tensor, token_indices: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Keep ``token_indices [T, K]`` (-1: no route) and ``token_probs [T, K]``; returns ``([T, H], token_probs)``."""
        self.hidden_shape = hidden_states.shape
        self.token_probs, self.token_indices = token_probs, token_indices
        return hidden_states.view(-1, self.hidden_shape[-1]), token_probs

    def dispatch_preprocess(self, hidden_states: Tensor, num_local_tokens: int, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Dense ``probs [T, E]`` (zero where not routed): the top ``moe_router_topk`` per token; with a
        capacity factor, routes whose probability the router zeroed are masked, as in NeMo."""
        token_probs, token_indices = torch.topk(probs.reshape(num_local_tokens, -1), self.config.moe_router_topk, dim=-1)
        if self.config.moe_expert_capacity_factor is not None:
            token_indices = token_indices.masked_fill(token_probs == 0, -1)
        return self.dispatch_preprocess2(hidden_states, num_local_tokens, token_probs, token_indices)

    def dispatch_all_to_all(
        self, hidden_states: Tensor, probs: Tensor | None = None, async_finish: bool = True, allocate_on_comm_stream: bool = True
    ) -> tuple[Tensor, Tensor]:
        """``moe.dispatch`` (permuting too): ``(rows [N, H], their probs [N] fp32)``. The op is stream-ordered:
        ``async_finish`` and ``allocate_on_comm_stream`` change nothing."""
        if self.token_indices is None or self.token_probs is None:
            raise MoEInputError("dispatch_all_to_all: call dispatch_preprocess or dispatch_preprocess2 first")
        self._dispatched = self.moe.dispatch(hidden_states, self.token_indices, self.token_probs.float())
        return self._dispatched.recv_x, self._dispatched.recv_weights

    def dispatch_postprocess(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(rows, tokens_per_expert [L] int64 on the host, probs [N])``."""
        if self._dispatched is None:
            raise MoEInputError("dispatch_postprocess: call dispatch_all_to_all first")
        probs = self._dispatched.recv_weights
        if self.config.moe_router_dtype == "fp64":
            probs = probs.to(torch.float64)
        return hidden_states, host_counts(self._dispatched.tokens_per_expert), probs

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

    def combine_all_to_all(self, hidden_states: Tensor, async_finish: bool = True, allocate_on_comm_stream: bool = True) -> Tensor:
        """``moe.combine`` with unit weights (the experts applied the probabilities): ``[T, H]``."""
        if self._dispatched is None:
            raise MoEInputError("combine_all_to_all: call the dispatch steps first")
        return unweighted_combine(hidden_states, self._dispatched, self.moe.group_name)

    def combine_postprocess(self, hidden_states: Tensor) -> Tensor:
        return hidden_states.view(self.hidden_shape)

    def token_unpermutation(self, hidden_states: Tensor) -> Tensor:
        hidden_states = self.combine_preprocess(hidden_states)
        return self.combine_postprocess(self.combine_all_to_all(hidden_states))


_installed = Patches()


def install(backend: str = "auto", *, quant: str | None = None, quant_block: int = 128) -> Patches:
    """Make NeMo Automodel's ``BackendConfig.dispatcher`` values ``"deepep"``, ``"uccl_ep"`` and
    ``"hybridep"`` build moe_ops dispatchers on the moe_ops transport ``backend`` (``"auto"``: ``local`` for
    one rank, ``collective`` otherwise; or ``"deepep"``, ``"allgather"``, ... see docs/backends.md).
    ``quant`` (``"fp8_e4m3"`` or ``"int8"``, a scale per ``quant_block`` columns or, with 0, per token): the
    rows cross the EP group quantized and reach the experts dequantized, gradients in the tokens' dtype.

    Call it before the model is parallelized. It replaces, in ``nemo_automodel.components.moe.experts``,
    the names ``TokenDispatcherConfig`` and ``MoEFlexTokenDispatcher``, and
    ``GroupedExpertsDeepEP._init_deepep_buffer`` by a no-op. Returns the patches: ``.undo()`` (or leaving
    a ``with install(...):`` block) restores NeMo's own. A second call replaces the first."""
    from nemo_automodel.components.moe import experts

    dispatcher = bind_transport(MoEFlexTokenDispatcher, backend, quant, quant_block)
    _installed.undo()
    _installed.set(experts, "TokenDispatcherConfig", TokenDispatcherConfig)
    _installed.set(experts, "MoEFlexTokenDispatcher", dispatcher)
    _installed.set(experts.GroupedExpertsDeepEP, "_init_deepep_buffer", _no_deepep_buffer)
    return _installed


def _no_deepep_buffer(self: Any, ep_group: dist.ProcessGroup) -> None:
    """moe_ops transports allocate what they need on their first call."""


__all__ = ["FLEX_BACKENDS", "UPSTREAM_VERSION", "MoEFlexTokenDispatcher", "TokenDispatcherConfig", "install"]
