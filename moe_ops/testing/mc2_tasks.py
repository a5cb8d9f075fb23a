"""Worker-side pieces of the ``mc2`` tests (picklable, for :class:`moe_ops.testing.harness.World`): installing
the simulator of :mod:`moe_ops.testing.sim.torch_npu` in each rank, runs that return what the ops received,
and *tampers*: deliberately wrong marshalling, applied to an op's arguments before the simulator runs
it, which the conformance suite must catch."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.distributed as dist
from torch import Tensor

import moe_ops
from moe_ops.testing import conformance, sim
from moe_ops.testing.problems import Problem
from moe_ops.testing.sim import torch_npu


def install(rank: int, version: int = 2, tamper: torch_npu.Tamper | None = None) -> None:
    """Install the simulator on this rank (replacing any earlier install)."""
    sim.install("torch_npu", version=version, tamper=tamper)


def group_name(rank: int) -> str:
    """The default group's name (what the ops take as ``group_name``)."""
    return dist.group.WORLD.group_name


def recorded_calls(rank: int, problem: Problem, version: int) -> list[torch_npu.Call]:
    """Run the conformance pipeline (forward and backward) on ``mc2`` with a fresh simulator of
    ``version``; every MC2 op call it made, with its arguments."""
    sim.install("torch_npu", version=version)
    conformance.run_rank(problem, rank, group=dist.group.WORLD.group_name, backend="mc2")
    return torch_npu.calls()


def dispatched(rank: int, problem: Problem, backend: str) -> moe_ops.DispatchResult:
    """This rank's dispatch of ``problem`` through ``backend`` (the simulator already installed)."""
    return moe_ops.dispatch(
        problem.xs[rank], problem.topk_idx[rank], problem.topk_weights[rank], problem.num_experts,
        group=dist.group.WORLD.group_name, backend=backend, **problem.dispatch_kwargs(),
    )


def under_soc_limits(rank: int, problem: Problem, soc: str) -> tuple[str, int]:
    """Dispatch ``problem`` on ``mc2`` under ``soc``'s documented limits (not the simulator's relaxed
    ones): ``(the MoEInputError message, MC2 calls made)``."""
    sim.install("torch_npu", soc=soc)
    try:
        dispatched(rank, problem, "mc2")
    except moe_ops.MoEInputError as error:
        return str(error), len(torch_npu.calls())
    finally:
        sim.install("torch_npu")
    raise AssertionError("dispatch did not raise")


# --- tampers -------------------------------------------------------------------------------------


def short_global_bs(op: str, kwargs: dict[str, Any]) -> None:
    """``global_bs`` one token per rank short of the largest batch: too few expand_x rows."""
    batch = kwargs["expert_ids"].shape[0]
    kwargs["global_bs"] = (batch - 1) * kwargs["ep_world_size"]


def zero_global_bs(op: str, kwargs: dict[str, Any]) -> None:
    """``global_bs = 0`` although the ranks' batches differ (v1 sends unpadded batches)."""
    kwargs["global_bs"] = 0


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


def int8_rows(rank: int, problem: Problem) -> tuple[Tensor, ...]:
    """``mc2_int8``'s dispatch of ``problem`` on this rank: recv_x, recv_weights, counts, dropped."""
    sim.install("torch_npu")
    d = dispatched(rank, problem, "mc2_int8")
    return d.recv_x, d.recv_weights, d.tokens_per_expert, d.dropped

