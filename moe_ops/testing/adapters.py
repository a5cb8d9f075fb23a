"""Conformance of the adapters that need no framework installed (NeMo Automodel's flex dispatcher,
vllm-ascend's): the pipeline of :mod:`moe_ops.testing.conformance` driven
through each adapter's own interface, and directly through the ops, on one rank of a gloo world."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops import compile_stats
from moe_ops.integrations import nemo_automodel, vllm_ascend
from moe_ops.integrations.common import bind_transport
from moe_ops.testing import conformance
from moe_ops.testing.problems import Problem

ADAPTERS = ("nemo_flex", "vllm_ascend")
Step = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, ...]]


def _nemo_flex(problem: Problem, rank: int, group: str, backend: str) -> Step:
    num_local, expert_ids = problem.num_local_experts, problem.local_expert_ids(rank)
    config = nemo_automodel.TokenDispatcherConfig(
        moe_router_topk=problem.topk_idx[rank].shape[1],
        num_moe_experts=problem.num_experts,
        moe_router_expert_pad_multiple=problem.pad_multiple if problem.pad_multiple > 1 else None,
    )
    flex = bind_transport(nemo_automodel.MoEFlexTokenDispatcher, backend)
    dispatcher = flex(num_local, list(range(rank * num_local, (rank + 1) * num_local)), config, dist.group.WORLD)

    def step(x: Tensor, idx: Tensor, w: Tensor) -> tuple[Tensor, ...]:
        rows, counts, probs = dispatcher.token_permutation2(x, x.shape[0], w, idx)
        out = dispatcher.token_unpermutation(conformance.toy_experts(rows, counts, expert_ids) * probs.unsqueeze(1).to(rows.dtype))
        assert dispatcher._dispatched is not None
        return rows, probs, dispatcher._dispatched.tokens_per_expert, dispatcher._dispatched.dropped, out

    return step


def _vllm_ascend(problem: Problem, rank: int, group: str, backend: str) -> Step:
    expert_ids = problem.local_expert_ids(rank)
    dispatcher = vllm_ascend.MoETokenDispatcher(
        top_k=problem.topk_idx[rank].shape[1],
        num_experts=problem.num_experts,
        group=group,
        layout=problem.layout,
        max_tokens_per_rank=problem.max_tokens_per_rank,
        capacity=problem.capacity,
        backend=backend,
    )
    expert_map = None if problem.expert_map is None else problem.expert_map[rank]

    def step(x: Tensor, idx: Tensor, w: Tensor) -> tuple[Tensor, ...]:
        placement = dict(
            expert_map=None if expert_map is None else expert_map.to(x.device),
            log2phy=None if problem.log2phy is None else problem.log2phy.to(x.device),
        )
        result = dispatcher.token_dispatch(x, w, idx, **placement)
        d = result["context_metadata"]["dispatched"]
        rows = result["hidden_states"].view(d.recv_x.shape)  # padded: [L*C, H] -> [L, C, H]
        y = conformance.toy_experts(rows, d.tokens_per_expert, expert_ids)
        out = dispatcher.token_combine(y.reshape(result["hidden_states"].shape), result["context_metadata"])
        return rows, d.recv_weights, d.tokens_per_expert, d.dropped, out

    return step


_STEPS = {"nemo_flex": _nemo_flex, "vllm_ascend": _vllm_ascend}


def adapter_task(
    rank: int, problem: Problem, adapter: str, backend: str, compiled: bool = False
) -> tuple[conformance.RankResult, conformance.RankResult, object]:
    """``(through the adapter, through the ops directly, compile stats or None)`` on this rank."""
    group = dist.group.WORLD.group_name
    step = _STEPS[adapter](problem, rank, group, backend)
    stats = None
    if compiled:
        compile_stats.reset()
        step = torch.compile(step, fullgraph=True, dynamic=True)
    ours = conformance.run_rank(problem, rank, group=group, step=step)
    if compiled:
        stats = compile_stats.read()
    return ours, conformance.run_rank(problem, rank, group=group, backend=backend), stats


def check_adapter(world: object, problem: Problem, adapter: str, backend: str, compiled: bool = False) -> None:
    """The adapter's results on every rank equal the direct ops' (dispatch exactly) and the reference."""
    outputs = world.run(adapter_task, problem, adapter, backend, compiled)  # type: ignore[attr-defined]
    ref, mag = conformance.expected(problem)
    for rank, (ours, direct, stats) in enumerate(outputs):
        context = f"{adapter}, rank {rank}; {problem.description}"
        for name in ("recv_x", "recv_weights", "tokens_per_expert", "dropped"):
            assert torch.equal(getattr(ours, name), getattr(direct, name)), f"{name} differs from the ops ({context})"
        conformance.assert_rank_matches(problem, rank, ours, ref[rank], mag[rank])
        if compiled:
            assert stats.graph_breaks == 0, f"{stats} ({context})"
