"""HuggingFace transformers checks (needs transformers >= 5.23 and accelerate): tiny random MoE models,
and one rank's comparison of ``ep_implementation="moe_ops"`` with the single-process model and with
transformers' own ``"all_to_all"``. Used by tests/test_transformers.py and ``python -m moe_ops.demo --hf``."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

MODELS = ("qwen3_moe", "olmoe")
VOCAB, SEQ, BATCH = 128, 8, 2


def save_tiny_model(kind: str, path: str) -> None:
    """A 2-layer, 8-expert, top-2 random model of ``kind`` (one of :data:`MODELS`) saved to ``path``."""
    from transformers import AutoModelForCausalLM, OlmoeConfig, Qwen3MoeConfig

    shared = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    )
    if kind == "qwen3_moe":
        config = Qwen3MoeConfig(**shared, intermediate_size=128, moe_intermediate_size=32, head_dim=16)
    else:
        config = OlmoeConfig(**shared, intermediate_size=32)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def _batch(rank: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + rank))


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float().pow(2).mean()


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        name.replace("_fsdp_wrapped_module.", ""): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach()
        for name, p in model.named_parameters()
        if p.grad is not None
    }


def _compile_experts(model: torch.nn.Module) -> tuple[bool, int, str]:
    """``torch.compile(experts.forward, fullgraph=True)`` on a routed batch: (ok, graph breaks, error)."""
    from moe_ops import compile_stats

    experts = model.model.layers[0].mlp.experts
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(16, hidden, generator=gen)
    idx = torch.randint(0, model.config.num_experts, (16, 2), generator=gen)
    w = torch.rand(16, 2, generator=gen)
    compile_stats.reset()
    try:
        torch.compile(experts.forward, fullgraph=True)(h, idx, w)
    except Exception as e:  # noqa: BLE001 - the failure is the result
        return False, compile_stats.read().graph_breaks, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return True, compile_stats.read().graph_breaks, ""


IMPLEMENTATIONS = ("moe_ops", "moe_ops_padded", "all_to_all")


def compare_task(rank: int, path: str, timed: bool = False) -> dict[str, Any]:
    """On this rank of a gloo world: logits and a training step's full gradients of the single-process
    model (loss averaged over the ranks' batches, as FSDP averages) and of the model loaded with each
    ``ep_implementation`` of :data:`IMPLEMENTATIONS`, plus whether each one's experts forward compiles with
    ``fullgraph=True``. With ``timed``, the eager and compiled forward times (ms)."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from moe_ops.integrations import transformers as integration

    world = dist.get_world_size()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    integration.register(max_tokens_per_rank=BATCH * SEQ)
    batches = [_batch(r) for r in range(world)]
    single = AutoModelForCausalLM.from_pretrained(path, experts_implementation="grouped_mm")
    result: dict[str, Any] = {"single_logits": single(batches[rank]).logits.detach()}
    (sum(_loss(single, b) for b in batches) / world).backward()
    result["single_grads"] = _full_grads(single)
    for impl in IMPLEMENTATIONS:
        config = DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation=impl)
        model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="grouped_mm", distributed_config=config)
        result[f"{impl}_logits"] = model(batches[rank]).logits.detach()
        _loss(model, batches[rank]).backward()
        result[f"{impl}_grads"] = _full_grads(model)
        result[f"{impl}_compile"] = _compile_experts(model)
        if timed:
            result[f"{impl}_ms"] = _forward_ms(model, batches[rank])
    return result


def _forward_ms(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """(eager, compiled) forward time in ms, median of 5 after warm-up; compiled without fullgraph."""
    def median_ms(fn) -> float:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            fn()
            times = []
            for _ in range(5):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[2]

    compiled = torch.compile(model)
    return median_ms(lambda: model(ids)), median_ms(lambda: compiled(ids))
