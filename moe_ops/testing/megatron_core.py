"""Megatron-Core's own ``MoELayer`` on CPU over gloo: its all-gather training dispatcher and its NCCL
inference dispatcher against moe_ops swapped in the documented ways (``install()``, the ``MoELayer``
subclass). Used by tests/test_upstream_megatron.py (needs ``megatron-core``).

What CPU needs, here and not in the library: Megatron's router and dispatchers put tensors on
``torch.cuda.current_device()``, which these workers answer with ``"cpu"``; its all-gather helper needs the
global memory buffer that ``initialize_model_parallel`` would make; the inference experts (Megatron's
``InferenceGroupedMLP`` needs CUDA kernels) are :class:`FusedMoEReference`, ``mcore_fused_moe``'s contract
in plain torch, and the router :class:`TopKRouterReference` (``InferenceTopKRouter`` compiles).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

TOKENS, HIDDEN, EXPERTS, TOPK = 6, 16, 4, 2


def _cpu_megatron() -> None:
    from megatron.core import parallel_state

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()


def _groups(rank: int) -> Any:
    """Megatron's process groups for EP = the gloo world, TP = PP = CP = DP = 1."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    solo = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]  # every rank makes every group
    world = dist.group.WORLD
    return ProcessGroupCollection(
        tp=solo, pp=solo, cp=solo, tp_cp=solo, dp=solo, dp_cp=solo, expt_tp=solo, expt_dp=solo, ep=world, tp_ep=world
    )


def _config(dispatcher: str, **overrides: Any) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=32, num_moe_experts=EXPERTS,
        moe_router_topk=TOPK, moe_ffn_hidden_size=8, moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=dist.get_world_size(), use_cpu_initialization=True, params_dtype=torch.float32,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, add_bias_linear=False,
        gradient_accumulation_fusion=False, **overrides,
    )  # fmt: skip


def _training_layer(rank: int, way: str, late_fields: dict[str, Any], quant: str | None = None) -> torch.nn.Module:
    """``MoELayer`` (local spec: SequentialMLP experts) with identical weights for every ``way``:
    ``"megatron"`` (its all-gather dispatcher), ``"install"`` (flex + ``install()``) or ``"subclass"``
    (flex + our ``MoELayer`` in the spec). ``late_fields`` are set on the config after its validation
    (FP8 fields, which it refuses without Transformer Engine, although SequentialMLP's own path needs none);
    ``quant``: our dispatcher's rows cross the group in that format (``install(quant=...)``, ``MoELayer(quant=...)``)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from moe_ops.integrations import megatron_core

    spec = get_moe_module_spec(use_te=False, num_experts=EXPERTS, moe_grouped_gemm=False)
    config = _config("allgather" if way == "megatron" else "flex")
    for name, value in late_fields.items():
        object.__setattr__(config, name, value)
    build = spec
    if way == "subclass":  # the spec Megatron made, with our layer class
        backend = "collective" if dist.get_world_size() > 1 else "auto"
        build = partial(megatron_core.MoELayer, submodules=spec.keywords["submodules"], backend=backend, quant=quant)
    torch.manual_seed(0)
    with megatron_core.install(quant=quant) if way == "install" else nullcontext():
        return build(config=config, pg_collection=_groups(rank), layer_number=1)


def training_task(rank: int, tokens: int = TOKENS, late_fields: dict[str, Any] | None = None, quant: str | None = None) -> dict[str, Any]:
    """One forward and backward of Megatron's layer each way: output, input and parameter gradients, the
    dispatcher class each layer built and the ``tokens_per_expert`` its experts were handed."""
    _cpu_megatron()
    results: dict[str, Any] = {}
    for way in ("megatron", "install", "subclass"):
        layer = _training_layer(rank, way, late_fields or {}, quant)
        counts: list[Tensor] = []
        layer.experts.register_forward_pre_hook(lambda module, args: counts.append(args[1]))
        x = torch.randn(tokens, 1, HIDDEN, generator=torch.Generator().manual_seed(100 + rank), requires_grad=True)
        out, _ = layer(x)
        out.square().sum().backward()
        results[way] = {"out": out.detach(), "grad x": x.grad, **{f"grad {n}": p.grad for n, p in layer.named_parameters()}}
        results[f"{way} dispatcher"] = f"{type(layer.token_dispatcher).__module__}.{type(layer.token_dispatcher).__name__}"
        results[f"{way} counts"] = counts[-1]
    return results


class FusedMoEReference(torch.nn.Module):
    """``mcore_fused_moe``'s contract in plain torch, as Megatron's inference experts are called:
    ``forward(hidden [R, H], tokens_per_expert, probs [R, K], routing_map=[R, K])``, rows past the
    valid-token count ignored, ``out[t] = sum_k probs[t, k] * expert(hidden[t])`` over the routes to this
    rank's experts. Records what it was handed."""

    def __init__(self, num_local_experts: int, config: Any, *, pg_collection: Any = None, name: str | None = None) -> None:
        super().__init__()
        self.first = dist.get_rank() * num_local_experts
        self.weights = torch.nn.Parameter(torch.randn(num_local_experts, config.hidden_size, config.hidden_size) / 4)
        self.seen: list[dict[str, Any]] = []

    def forward(self, hidden: Tensor, tokens_per_expert: Any, probs: Tensor, routing_map: Tensor | None = None) -> tuple[Tensor, None]:
        from megatron.core.transformer.moe.token_dispatcher_inference import InferenceAllGatherDispatcherBase as Base

        valid = int(Base._valid_tokens().item())
        self.seen.append(dict(hidden=hidden.clone(), probs=probs.clone(), routing_map=routing_map.clone(), valid=valid))
        out = torch.zeros_like(hidden)
        for k in range(routing_map.shape[1]):
            local = routing_map[:valid, k] - self.first
            mine = (local >= 0) & (local < self.weights.shape[0])
            rows = torch.bmm(hidden[:valid].unsqueeze(1), self.weights[local.clamp(0, self.weights.shape[0] - 1)]).squeeze(1)
            out[:valid] += torch.where(mine.unsqueeze(1), probs[:valid, k : k + 1] * rows, 0)
        return out, None

    def backward_dw(self) -> None:
        pass


class TopKRouterReference(torch.nn.Module):
    """What Megatron's ``InferenceTopKRouter`` returns in inference mode (``probs [T, K]`` fp32, expert ids
    ``[T, K]`` int64), without its ``torch.compile``: softmax over a linear gate, then top-k."""

    def __init__(self, *, config: Any, pg_collection: Any = None, is_mtp_layer: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(config.num_moe_experts, config.hidden_size))
        self.topk = config.moe_router_topk

    def forward(self, hidden: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        probs, ids = torch.softmax(hidden.reshape(-1, hidden.shape[-1]) @ self.weight.T, dim=-1).topk(self.topk)
        return probs, ids

    def set_layer_number(self, layer_number: int) -> None:
        pass


def _inference_layer(rank: int, dispatcher_type: str, ours: bool) -> torch.nn.Module:
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

    from moe_ops.integrations import megatron_core

    config = _config(
        "allgather", transformer_impl="inference_optimized", inference_grouped_gemm_backend="torch",
        inference_moe_token_dispatcher_type=dispatcher_type, moe_router_dtype="fp32", normalization="RMSNorm",
    )  # fmt: skip
    torch.manual_seed(0)
    with megatron_core.install() if ours else nullcontext():
        return MoELayer(config, MoESubmodules(experts=FusedMoEReference, router=TopKRouterReference), layer_number=1, pg_collection=_groups(rank))


def inference_task(rank: int, tokens_per_rank: list[int], allgather_v: bool) -> dict[str, Any]:
    """Megatron's MoE layer in inference mode with its NCCL dispatcher, and with ours (``install()``;
    ``"nccl"`` and ``"nvls"``): what the experts were handed and the layer's output."""
    from megatron.core.inference.utils import InferenceMode
    from megatron.core.transformer.moe.token_dispatcher_inference import (
        InferenceAllGatherDispatcherBase,
        NCCLAllGatherDispatcher,
        NVLSAllGatherVDispatcher,
    )

    from moe_ops.integrations import megatron_core

    _cpu_megatron()
    InferenceAllGatherDispatcherBase.allocate_valid_tokens_tensor()
    NCCLAllGatherDispatcher._use_allgather_v = megatron_core.InferenceAllGatherDispatcher._use_allgather_v = allgather_v
    NVLSAllGatherVDispatcher._per_rank_worst_case_token_count = max(tokens_per_rank)
    x = torch.randn(tokens_per_rank[rank], 1, HIDDEN, generator=torch.Generator().manual_seed(100 + rank))
    results: dict[str, Any] = {}
    for name, dispatcher_type, ours in (("megatron", "nccl", False), ("ours nccl", "nccl", True), ("ours nvls", "nvls", True)):
        layer = _inference_layer(rank, dispatcher_type, ours)
        with InferenceMode.active(), torch.no_grad():
            out, _ = layer(x)
        results[name] = {"out": out, **layer.experts.seen[-1], "dispatcher": type(layer.token_dispatcher).__name__}
    return results
