"""torchtitan's MoE token dispatcher (tested against torchtitan 0.3.0) over ``torch.ops.moe.*``, and the
torchtitan overrides that put it in place (docs/integrations/torchtitan.md). Importing this module imports
torchtitan. On torchtitan's command line::

    --override.imports moe_ops.integrations.torchtitan.moe_ops_dispatcher,moe_ops.integrations.torchtitan.moe_ops_selective_ac

(options as ``'moe_ops.integrations.torchtitan.moe_ops_dispatcher={"pad_multiple": 16}'``).

* :class:`MoEOpsTokenDispatcher`: torchtitan's dispatcher interface (``dispatch``, ``combine``,
  ``wire_meshes``) on one ``moe_ops.Dispatcher`` per MoE layer: the ragged layout by default,
  ``pad_multiple`` (per-expert row alignment for FP8/MXFP8 grouped GEMMs), ``max_recv_rows`` (the ragged
  rows in a static buffer: no host sync), the padded layout (static shapes: decode, CUDA graphs) and
  ``quant`` (rows cross the EP group in FP8 / INT8 and arrive in x's dtype: half the bytes between ranks,
  gradients in bf16).
* :func:`moe_ops_dispatcher`: replaces every ``AllToAllTokenDispatcher.Config`` (exactly that class; the
  ``"standard"`` comm backend's, at EP = 1 too) with ours; its keyword arguments are our config's fields.
* :func:`moe_ops_aligned_dispatcher`: replaces the ``TorchAOTokenDispatcher.Config`` that torchtitan's
  FP8/MXFP8 converters put in (``swap_token_dispatcher``) with ours at its ``pad_multiple``.
* :func:`moe_ops_selective_ac`: torchtitan's ``SelectiveAC`` with ``moe.dispatch`` and ``moe.combine`` on
  its save list, so the backward recompute does not exchange tokens again.

Routing scores are applied in combine, as torchtitan's dispatchers do: they travel with the rows
(``recv_weights``) and ``moe.combine`` sums each token's rows weighted by them, in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torchtitan.config import derive, override
from torchtitan.distributed.activation_checkpoint import SelectiveAC
from torchtitan.models.common.token_dispatcher import (
    AllToAllTokenDispatcher,
    BaseEPTokenDispatcher,
    TorchAOTokenDispatcher,
)

import moe_ops
from moe_ops.api import DispatchResult, QuantizedDispatchResult
from moe_ops.integrations.common import check_transport, pad_multiple_for, wire_options
from moe_ops.plan import Layout

UPSTREAM_VERSION = "0.3.0"
#: what :class:`MoEOpsSelectiveAC` adds to torchtitan's save list
SAVED_OPS = (torch.ops.moe.dispatch.default, torch.ops.moe.dispatch_quantized.default, torch.ops.moe.combine.default)


class MoEOpsTokenDispatcher(BaseEPTokenDispatcher):
    """torchtitan's token dispatcher interface over ``torch.ops.moe.dispatch`` / ``combine``.

    ``dispatch`` returns ``(rows, counts, metadata)``: ``rows`` in x's dtype, ``[N, D]`` (ragged,
    ``pad_multiple``'s zero rows included), ``[max_recv_rows, D]`` (bounded: rows past the counts' sum
    are padding) or ``[L * C, D]`` (padded: expert ``e``'s ``C`` rows at ``e * C``, those past its routes
    zero, of weight 0); ``counts`` ``[L]`` int32 on x's device, the rows of each local expert (padded:
    ``C`` each, so ``cumsum(counts)`` are the grouped GEMM's offsets in every layout). ``combine`` returns
    ``[T, D]`` in the experts' output dtype. Without an EP mesh (EP = 1) it dispatches on this rank alone.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseEPTokenDispatcher.Config):
        """Checked when made (``MoEInputError``): an override fails at ``apply_overrides``, not mid-step."""

        backend: str = "auto"
        """The moe_ops transport (docs/backends.md): ``"auto"`` is ``local`` at EP = 1, else ``collective``."""
        layout: Layout = "ragged"
        """``"ragged"`` (training, prefill) or ``"padded"`` (static shapes: decode, CUDA graphs)."""
        pad_multiple: int = 1
        """Each expert's rows start at, and fill up to, a multiple of this (16: FP8, 32: MXFP8)."""
        max_recv_rows: int | None = None
        """Ragged only: the rows in a static ``[max_recv_rows, D]`` (no host sync; routes past it dropped)."""
        max_tokens_per_rank: int | None = None
        """Padded (required, or ``capacity``), or with ``max_recv_rows``: a bound on every rank's token count."""
        capacity: int | None = None
        """Padded only: rows per local expert (default: the worst case, which never drops)."""
        quant: str | None = None
        """The rows cross the EP group quantized (``"fp8_e4m3"``; ``"int8"``) and arrive dequantized in x's
        dtype, differentiable straight through the rounding (moe_ops' ``dequantize=True``): half the bytes
        between ranks; the backward moves bf16 gradients."""
        quant_block: int = 128
        """With ``quant``: columns per scale (128), or 0 for one scale per token."""

        def __post_init__(self) -> None:
            check_transport(self.backend)
            _moe_dispatcher(self, None)  # every option check that needs no group

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.options = config
        self.moe = _moe_dispatcher(config, None)  # EP = 1; wire_meshes puts it on the EP group

    def init_buffer(self) -> None:
        """Called by ``wire_meshes``: the moe_ops dispatcher on the EP mesh's group (no mesh: this rank)."""
        self.moe = _moe_dispatcher(self.options, self.ep_mesh)

    def dispatch(
        self,
        x_TD: Tensor,
        topk_scores_TK: Tensor,
        topk_expert_ids_TK: Tensor,
        num_local_tokens_per_expert_E: Tensor,
    ) -> tuple[Tensor, Tensor, DispatchResult | QuantizedDispatchResult]:
        """``x_TD [T, D]``, ``topk_scores_TK [T, K]`` float, ``topk_expert_ids_TK [T, K]`` int64 global ids.
        The op counts the routes itself, so ``num_local_tokens_per_expert_E`` is not read."""
        del num_local_tokens_per_expert_E
        result = self.moe.dispatch(x_TD, topk_expert_ids_TK, topk_scores_TK.float())
        if result.recv_x.dim() == 3:  # padded [L, C, D]: every expert's group is its C rows
            num_local, capacity, dim = result.recv_x.shape
            counts = torch.full((num_local,), capacity, dtype=torch.int32, device=x_TD.device)
            return result.recv_x.view(num_local * capacity, dim), counts, result
        return result.recv_x, result.tokens_per_expert, result

    def combine(self, routed_output_RD: Tensor, metadata: DispatchResult | QuantizedDispatchResult, x_TD: Tensor) -> Tensor:
        """``routed_output_RD`` (the experts' outputs, in ``dispatch``'s rows) summed per token, weighted
        by its scores: ``[T, D]``."""
        del x_TD
        rows = routed_output_RD.view(*metadata.recv_x.shape[:-1], routed_output_RD.shape[-1])
        return self.moe.combine(rows, metadata)


def _moe_dispatcher(config: MoEOpsTokenDispatcher.Config, ep_mesh: DeviceMesh | None) -> moe_ops.Dispatcher:
    """``config``'s ``moe_ops.Dispatcher`` on ``ep_mesh``'s group (``None``: this rank alone)."""
    return moe_ops.Dispatcher(
        config.num_experts,
        group=None if ep_mesh is None else ep_mesh.get_group(),
        layout=config.layout,
        capacity=config.capacity,
        max_tokens_per_rank=config.max_tokens_per_rank,
        max_recv_rows=config.max_recv_rows,
        pad_multiple=config.pad_multiple,
        backend=config.backend,
        **wire_options(config.quant, config.quant_block),
    )


@override(
    target=AllToAllTokenDispatcher.Config,
    exact=True,
    description="moe_ops token dispatch and combine (torch.ops.moe.*)",
)
def moe_ops_dispatcher(
    cfg: AllToAllTokenDispatcher.Config,
    *,
    backend: str = "auto",
    layout: Layout = "ragged",
    pad_multiple: int = 1,
    max_recv_rows: int | None = None,
    max_tokens_per_rank: int | None = None,
    capacity: int | None = None,
    quant: str | None = None,
    quant_block: int = 128,
) -> MoEOpsTokenDispatcher.Config:
    """torchtitan's all-to-all dispatcher replaced by ours (``num_experts`` and ``top_k`` kept)."""
    return derive(
        cfg, MoEOpsTokenDispatcher.Config, backend=backend, layout=layout, pad_multiple=pad_multiple,
        max_recv_rows=max_recv_rows, max_tokens_per_rank=max_tokens_per_rank, capacity=capacity, quant=quant,
        quant_block=quant_block,
    )  # fmt: skip


@override(
    target=TorchAOTokenDispatcher.Config,
    exact=True,
    description="moe_ops token dispatch with the FP8/MXFP8 converters' per-expert row alignment",
)
def moe_ops_aligned_dispatcher(
    cfg: TorchAOTokenDispatcher.Config,
    *,
    backend: str = "auto",
    max_recv_rows: int | None = None,
    max_tokens_per_rank: int | None = None,
) -> MoEOpsTokenDispatcher.Config:
    """The ``TorchAOTokenDispatcher`` that torchtitan's FP8/MXFP8 converters swap in, replaced by ours with
    the same ``pad_multiple`` (ragged layout; no torchao needed for the rows)."""
    pad_multiple = pad_multiple_for("TorchAOTokenDispatcher.Config.pad_multiple", cfg.pad_multiple)
    return derive(
        cfg, MoEOpsTokenDispatcher.Config, backend=backend, pad_multiple=pad_multiple,
        max_recv_rows=max_recv_rows, max_tokens_per_rank=max_tokens_per_rank,
    )  # fmt: skip


class MoEOpsSelectiveAC(SelectiveAC):
    """torchtitan's per-op selective activation checkpointing with ``moe.dispatch`` (and
    ``moe.dispatch_quantized``) and ``moe.combine`` saved, as it saves its own all-to-alls: the recompute in
    backward reuses their outputs instead of exchanging tokens with the other ranks again."""

    @dataclass(kw_only=True, slots=True)
    class Config(SelectiveAC.Config):
        pass

    def get_save_ops(self) -> set[object]:
        return super().get_save_ops() | set(SAVED_OPS)


@override(
    target=SelectiveAC.Config,
    exact=True,
    description="SelectiveAC saving torch.ops.moe.dispatch / combine",
)
def moe_ops_selective_ac(cfg: SelectiveAC.Config) -> MoEOpsSelectiveAC.Config:
    """torchtitan's ``SelectiveAC`` (its fields kept) with both ops on the save list."""
    return derive(cfg, MoEOpsSelectiveAC.Config)


__all__ = [
    "SAVED_OPS",
    "UPSTREAM_VERSION",
    "MoEOpsSelectiveAC",
    "MoEOpsTokenDispatcher",
    "moe_ops_aligned_dispatcher",
    "moe_ops_dispatcher",
    "moe_ops_selective_ac",
]
