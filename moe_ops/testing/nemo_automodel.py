"""NeMo Automodel's own MoE layer on CPU over gloo, with its ``dispatcher="torch"`` path and with moe_ops
swapped in the documented way (:func:`moe_ops.integrations.nemo_automodel.install`, then
``dispatcher="deepep"``). Used by tests/test_upstream_nemo.py (needs ``nemo-automodel``)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from moe_ops.integrations import nemo_automodel as adapter

TOKENS, DIM, EXPERTS, TOPK = 12, 16, 8, 2


def _moe_config() -> Any:
    from nemo_automodel.components.moe.config import MoEConfig

    return MoEConfig(
        n_routed_experts=EXPERTS, n_shared_experts=0, n_activated_experts=TOPK, n_expert_groups=1, n_limited_groups=1,
        train_gate=True, gate_bias_update_factor=0.0, aux_loss_coeff=0.0, score_func="softmax", route_scale=1.0,
        dim=DIM, inter_dim=32, moe_inter_dim=8, norm_topk_prob=True, dtype=torch.float32,
    )  # fmt: skip


def _layer(dispatcher: str) -> torch.nn.Module:
    """NeMo's ``MoE`` with identical weights on every rank, experts sharded over the gloo world as NeMo's
    parallelizer does it (``ExpertParallel``; it builds the flex dispatcher where there is one)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.moe.experts import GroupedExpertsDeepEP
    from nemo_automodel.components.moe.layers import MoE
    from nemo_automodel.components.moe.parallelizer import ExpertParallel

    backend = BackendConfig(attn="sdpa", linear="torch", experts="torch_mm", dispatcher=dispatcher, rms_norm="torch")
    torch.manual_seed(0)
    layer = MoE(_moe_config(), backend)
    with torch.no_grad():
        layer.init_weights(torch.device("cpu"))
    if dispatcher != "torch" and not isinstance(layer.experts, GroupedExpertsDeepEP):
        # one rank: NeMo falls back to GroupedExperts; put its flex-dispatcher experts in by hand
        experts = GroupedExpertsDeepEP(_moe_config(), backend, dispatcher)
        experts.load_state_dict(layer.experts.state_dict())
        layer.experts = experts
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("ep",))
    parallelize_module(layer.experts, mesh, ExpertParallel())
    return layer


def _step(layer: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """One forward and backward: the output, and the gradients of the input and of every parameter
    (expert shards as local tensors)."""
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(TOKENS, DIM, generator=generator, requires_grad=True)
    padding = torch.zeros(TOKENS, dtype=torch.bool)
    padding[-2:] = True  # two padding tokens: NeMo masks their routes
    out = layer(x, padding_mask=padding)
    out.square().sum().backward()
    result = {"out": out.detach(), "grad x": x.grad}
    for name, param in layer.named_parameters():
        grad = param.grad
        result[f"grad {name}"] = grad.to_local() if hasattr(grad, "to_local") else grad
    return result


def compare_task(rank: int, backend: str, pad_multiple: int | None = None, quant: str | None = None) -> dict[str, Any]:
    """NeMo's ``dispatcher="torch"`` layer and the same layer with ``dispatcher="deepep"`` after
    ``install(backend)``: their results, whether NeMo built a moe_ops dispatcher, its transport and the
    ``tokens_per_expert`` it handed the experts. NeMo's layer leaves ``moe_router_expert_pad_multiple``
    at its default; ``pad_multiple`` sets it as a user constructing the config would; ``quant`` goes to
    ``install``."""
    from nemo_automodel.components.moe import experts as upstream_experts

    reference = _step(_layer("torch"), rank)
    with adapter.install(backend, quant=quant) as patches:
        if pad_multiple is not None:
            patches.set(upstream_experts, "TokenDispatcherConfig", partial(adapter.TokenDispatcherConfig, moe_router_expert_pad_multiple=pad_multiple))
        layer = _layer("deepep")
        ours = _step(layer, rank)
    dispatcher = getattr(layer.experts, "token_dispatcher", None)
    ours_built = isinstance(dispatcher, adapter.MoEFlexTokenDispatcher)
    return {
        "reference": reference,
        "ours": ours,
        "moe_ops dispatcher": ours_built,
        "transport": getattr(dispatcher, "transport", None),
        "counts": dispatcher._dispatched.tokens_per_expert if ours_built else None,
    }
