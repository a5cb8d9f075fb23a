"""Worker-side pieces of the ``mc2`` tests (picklable, for :class:`moe_ops.testing.harness.World`): installing
the simulator of :mod:`moe_ops.testing.sim.torch_npu` in each rank, runs that return what the ops received,
and *tampers*: deliberately wrong marshalling, applied to an op's arguments before the simulator runs
it, which the conformance suite must catch."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group

import moe_ops
from moe_ops.backends.mc2 import backend as mc2_backend
from moe_ops.testing import conformance, sim
from moe_ops.testing.conformance import RankResult
from moe_ops.testing.problems import Problem
from moe_ops.testing.sim import torch_npu
from moe_ops.testing.sim.torch_npu import mc2 as mc2_sim


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


def int8_rows(rank: int, problem: Problem) -> tuple[Tensor, ...]:
    """``mc2_int8``'s dispatch of ``problem`` on this rank: recv_x, recv_weights, counts, dropped."""
    sim.install("torch_npu")
    d = dispatched(rank, problem, "mc2_int8")
    return d.recv_x, d.recv_weights, d.tokens_per_expert, d.dropped

