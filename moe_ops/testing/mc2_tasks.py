"""Worker-side pieces of the ``mc2`` tests (picklable, for :class:`moe_ops.testing.harness.World`): installing
the simulator of :mod:`moe_ops.testing.sim.torch_npu` in each rank, runs that return what the ops received,
and *tampers*: deliberately wrong marshalling, applied to an op's arguments before the simulator runs
it, which the conformance suite must catch."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group

import moe_ops
from moe_ops import quant
from moe_ops.backends.mc2 import backend as mc2_backend
from moe_ops.testing import conformance, sim
from moe_ops.testing.conformance import RankResult
from moe_ops.testing.problems import Problem
from moe_ops.testing.sim import torch_npu
from moe_ops.testing.sim.torch_npu import mc2 as mc2_sim

INT8_PER_TOKEN = quant.QuantSpec("int8", 0)  #: the one quantized dispatch MC2 does (quant_mode 2)


def install(rank: int, version: int = 2, tamper: torch_npu.Tamper | None = None, soc: str = "A3") -> None:
    """Install the simulator on this rank (replacing any earlier install)."""
    sim.install("torch_npu", version=version, tamper=tamper, soc=soc)


def group_name(rank: int) -> str:
    """The default group's name (what the ops take as ``group_name``)."""
    return dist.group.WORLD.group_name


def recorded_calls(rank: int, problem: Problem, version: int, soc: str = "A3", env: dict[str, str] | None = None) -> tuple[list[torch_npu.Call], list[int]]:
    """Run the conformance pipeline (forward and backward) on ``mc2`` with a fresh simulator of ``version``
    on ``soc`` (with the environment variables ``env`` set meanwhile): every MC2 op call it made, with its
    arguments, and the ranks of the group its ``group_ep`` names."""
    sim.install("torch_npu", version=version, soc=soc)
    with _environment(env or {}):
        conformance.run_rank(problem, rank, group=dist.group.WORLD.group_name, backend="mc2")
    calls = torch_npu.calls()
    group = _resolve_process_group(calls[0].kwargs["group_ep"][len(mc2_sim.PREFIX) :])
    return calls, dist.get_process_group_ranks(group)


def rank_task(rank: int, problem: Problem, backend: str, compiled: bool, env: dict[str, str], unchecked: bool = False) -> tuple[RankResult, object]:
    """:func:`moe_ops.testing.conformance.rank_task` with the environment variables ``env`` set meanwhile
    (e.g. A2's hierarchy mode) and, with ``unchecked``, the backend's limit checks switched off (what the
    simulator does with a call outside the SoC's limits)."""
    saved = mc2_backend._Call.check
    if unchecked:
        mc2_backend._Call.check = lambda *args: None  # type: ignore[method-assign]
    try:
        with _environment(env):
            return conformance.rank_task(rank, problem, backend, compiled)
    finally:
        mc2_backend._Call.check = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def dispatched(rank: int, problem: Problem, backend: str) -> moe_ops.DispatchResult:
    """This rank's dispatch of ``problem`` through ``backend`` (the simulator already installed)."""
    return moe_ops.dispatch(
        problem.xs[rank], problem.topk_idx[rank], problem.topk_weights[rank], problem.num_experts,
        group=dist.group.WORLD.group_name, backend=backend, **problem.dispatch_kwargs(),
    )


def refusal(rank: int, problem: Problem, soc: str, version: int = 2, combine_hidden: int | None = None) -> tuple[str, list[str]]:
    """Dispatch ``problem`` on ``mc2`` under ``soc`` (and, given ``combine_hidden``, combine expert outputs of
    that hidden size): ``(the MoEInputError message, the MC2 ops called)``."""
    sim.install("torch_npu", version=version, soc=soc)
    try:
        d = dispatched(rank, problem, "mc2")
        if combine_hidden is not None:
            moe_ops.combine(d.recv_x.new_zeros(*d.recv_x.shape[:-1], combine_hidden), d, group=dist.group.WORLD.group_name)
    except moe_ops.MoEInputError as error:
        return str(error), [c.op for c in torch_npu.calls()]
    raise AssertionError("the call did not raise")


# --- tampers -------------------------------------------------------------------------------------


def short_global_bs(op: str, kwargs: dict[str, Any]) -> None:
    """``global_bs`` one token per rank short of the largest batch: too few expand_x rows."""
    batch = kwargs["expert_ids"].shape[0]
    kwargs["global_bs"] = (batch - 1) * kwargs["ep_world_size"]


def zero_global_bs(op: str, kwargs: dict[str, Any]) -> None:
    """``global_bs = 0`` although the ranks' batches differ (v1 sends unpadded batches)."""
    kwargs["global_bs"] = 0


def route_mask(op: str, kwargs: dict[str, Any]) -> None:
    """A 2-D ``x_active_mask`` (the token mask repeated per route) where A2 takes a 1-D one only."""
    mask: Tensor = kwargs["x_active_mask"]
    kwargs["x_active_mask"] = mask.unsqueeze(1).expand(kwargs["expert_ids"].shape).contiguous()


def no_expert_scales(op: str, kwargs: dict[str, Any]) -> None:
    """Dispatch without ``expert_scales`` (which A2's hierarchy mode requires)."""
    if "dispatch" in op:
        kwargs["expert_scales"] = None


def drop_first_route(op: str, kwargs: dict[str, Any]) -> None:
    """Mask this rank's first active route, in dispatch and combine alike (a mask off by one route)."""
    mask: Tensor = kwargs["x_active_mask"].clone()
    first = mask.flatten().nonzero()[:1]
    mask.view(-1)[first] = False
    kwargs["x_active_mask"] = mask


def counts_not_cumsum(op: str, kwargs: dict[str, Any]) -> None:
    """Ask dispatch for per-expert counts where the adapter reads a cumulative sum."""
    if "expert_token_nums_type" in kwargs:
        kwargs["expert_token_nums_type"] = 1


@dataclasses.dataclass
class StaleHandle:
    """Every combine after this rank's first gets that first combine's ``assist_info_for_combine``: the
    handle of another dispatch."""

    first: Tensor | None = None

    def __call__(self, op: str, kwargs: dict[str, Any]) -> None:
        if op != "npu_moe_distribute_combine_v2":
            return
        if self.first is None:
            self.first = kwargs["assist_info_for_combine"]
        else:
            kwargs["assist_info_for_combine"] = self.first


def raw_combine(rank: int, problem: Problem) -> tuple[Tensor, Tensor]:
    """Dispatch and combine ``problem`` on ``mc2`` (this rank's tokens each with at least one route, or none):
    the rows of ``npu_moe_distribute_combine_v2``'s own output for the tokens without a route, and the
    combine's result for them."""
    npu = sim.install("torch_npu")
    outputs: list[Tensor] = []
    combine = npu.npu_moe_distribute_combine_v2
    npu.npu_moe_distribute_combine_v2 = lambda *args, **kwargs: outputs.append(combine(*args, **kwargs)) or outputs[-1]
    d = dispatched(rank, problem, "mc2")
    out = moe_ops.combine(d.recv_x, d, group=dist.group.WORLD.group_name)
    routeless = (problem.topk_idx[rank] < 0).all(dim=1)
    return outputs[0][: out.shape[0]][routeless], out[routeless]


def mc2_quantize(x: Tensor, spec: quant.QuantSpec = INT8_PER_TOKEN) -> tuple[Tensor, Tensor]:
    """What ``mc2``'s quantized dispatch must deliver for the tokens ``x [T, H]`` (bf16/fp16): MC2's own
    ``quant_mode`` 2 (the simulator's :func:`~moe_ops.testing.sim.torch_npu.mc2.dynamic_quant`) of each token
    with its maximum floored at 1e-4 in ``x.dtype`` (what the backend's row metadata does): ``(int8 [T, H],
    float32 [T, 1])``. Only ``spec = int8, quant_block 0`` (all MC2 does)."""
    assert spec == INT8_PER_TOKEN, spec
    floor = torch.full((x.shape[0], 1), quant.AMAX_FLOOR, dtype=x.dtype)
    q, scales = mc2_sim.dynamic_quant(torch.cat([x, floor], 1))
    return q[:, : x.shape[1]], scales.unsqueeze(1)


def in_environment(rank: int, env: dict[str, str], task: Callable[..., Any], *args: Any) -> Any:
    """``task(rank, *args)`` with the environment variables ``env`` set meanwhile (e.g. A2's hierarchy mode)."""
    with _environment(env):
        return task(rank, *args)


def quantized_refusal(rank: int, problem: Problem, options: dict[str, Any], prequantize: bool = False) -> tuple[str, list[str]]:
    """A quantized dispatch of ``problem`` on ``mc2`` with ``options`` (``prequantize``: ``x`` int8 with per-token
    ``x_scales``): ``(the MoEInputError message, the MC2 ops called)``."""
    sim.install("torch_npu")
    x, idx, w = problem.xs[rank], problem.topk_idx[rank], problem.topk_weights[rank]
    if prequantize:
        x, scales = quant.quantize(x, INT8_PER_TOKEN)
        options = dict(options, x_scales=scales)
    try:
        moe_ops.dispatch(x, idx, w, problem.num_experts, group=dist.group.WORLD.group_name, backend="mc2", **options,
                         **problem.dispatch_kwargs())
    except moe_ops.MoEInputError as error:
        return str(error), [c.op for c in torch_npu.calls()]
    raise AssertionError("the call did not raise")


def raw_dispatch(rank: int, problem: Problem) -> tuple[Tensor, Tensor, int]:
    """``npu_moe_distribute_dispatch_v2``'s own ``expand_x`` and ``dynamic_scales`` in an ``mc2`` quantized
    dispatch of ``problem``, and how many rows it filled (the last of ``expert_token_nums``)."""
    npu = sim.install("torch_npu")
    outputs: list[tuple[Tensor, ...]] = []
    op = npu.npu_moe_distribute_dispatch_v2
    npu.npu_moe_distribute_dispatch_v2 = lambda *args, **kwargs: outputs.append(op(*args, **kwargs)) or outputs[-1]
    moe_ops.dispatch(problem.xs[rank], problem.topk_idx[rank], problem.topk_weights[rank], problem.num_experts,
                     group=dist.group.WORLD.group_name, backend="mc2", quant="int8", quant_block=0, **problem.dispatch_kwargs())
    expand_x, dynamic_scales, _, ends, *_ = outputs[0]
    return expand_x, dynamic_scales, int(ends[-1])


def vllm_with_quant(rank: int, problem: Problem) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """vllm-ascend's adapter (the padded ``problem``, ``backend="mc2"``) with ``with_quant=True`` on this rank: its
    ``hidden_states`` and ``dynamic_scale``, and those of the quantized dispatch it stands for, flattened."""
    from moe_ops.integrations.vllm_ascend import MoETokenDispatcher

    sim.install("torch_npu")
    kwargs = dict(layout="padded", capacity=problem.capacity, max_tokens_per_rank=problem.max_tokens_per_rank)
    group = dist.group.WORLD.group_name
    dispatcher = MoETokenDispatcher(top_k=problem.topk_idx[rank].shape[1], num_experts=problem.num_experts, group=group,
                                    backend="mc2", **kwargs)
    out = dispatcher.token_dispatch(problem.xs[rank], problem.topk_weights[rank], problem.topk_idx[rank], with_quant=True)
    d = moe_ops.dispatch(problem.xs[rank], problem.topk_idx[rank], problem.topk_weights[rank], problem.num_experts, group=group,
                         backend="mc2", quant="int8", quant_block=0, **kwargs)
    return out["hidden_states"], out["dynamic_scale"], d.recv_x.flatten(0, 1), d.recv_scales.flatten()


def int8_rows(rank: int, problem: Problem) -> tuple[Tensor, ...]:
    """``mc2_int8``'s dispatch of ``problem`` on this rank: recv_x, recv_weights, counts, dropped."""
    sim.install("torch_npu")
    d = dispatched(rank, problem, "mc2_int8")
    return d.recv_x, d.recv_weights, d.tokens_per_expert, d.dropped

