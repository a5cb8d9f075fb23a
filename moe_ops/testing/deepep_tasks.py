"""Worker-side pieces of the DeepEP tests (picklable, for :class:`moe_ops.testing.harness.World`): the
buffer's life cycle on a new group, the simulator's own limits, and deliberate mistakes in how the DeepEP backends map DeepEP's
outputs (a layout, a count, the handle), for tests proving that the conformance suite, run through the
simulator (:mod:`moe_ops.testing.sim.deep_ep`), catches each one. A mistake replaces one private helper
of a backend for the duration of one task."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops import libraries
from moe_ops.backends import deepep
from moe_ops.backends.deepep import low_latency, normal, runtime
from moe_ops.plan import DispatchPlan
from moe_ops.testing import conformance
from moe_ops.testing.conformance import RankResult
from moe_ops.testing.problems import Problem
from moe_ops.testing.sim.deep_ep import common


def buffer_log(rank: int, calls: list[tuple[Problem, str]], reserved: dict[str, int] | None = None) -> tuple[int, list[str]]:
    """On a new group of every rank (optionally ``reserve``-d with ``reserved`` first), trace the conformance
    pipeline of each ``(problem, backend)`` with fake tensors, then run it. Returns the buffers made while
    tracing (0: fake kernels make none) and the simulated process's buffer log (:class:`common.Process`)
    from the group's creation on."""
    from torch.fx.experimental.proxy_tensor import make_fx

    process = libraries.load("deep_ep").Buffer.process
    group = dist.new_group(list(range(dist.get_world_size())))
    before = len(process.log)
    for problem, backend in calls:
        step = conformance.pipeline(problem, rank, group=group.group_name, backend=backend)
        make_fx(step, tracing_mode="symbolic", _allow_non_fake_inputs=True)(problem.xs[rank], problem.topk_idx[rank], problem.topk_weights[rank])
    traced = len(process.log) - before
    if reserved is not None:
        deepep.reserve(group, **reserved)
    for problem, backend in calls:
        conformance.run_rank(problem, rank, group=group.group_name, backend=backend)
    return traced, process.log[before:]


def second_low_latency_buffer(rank: int, destroy_first: bool) -> str:
    """Make a low-latency ``Buffer`` straight from the simulator, then another (after destroying the first,
    with ``destroy_first``): the error the second one raises."""
    deep_ep = libraries.load("deep_ep")
    group = dist.group.WORLD
    world = dist.get_world_size()
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(4, 2048, world, world)
    first = deep_ep.Buffer(group, 0, size, low_latency_mode=True, num_qps_per_rank=1, explicitly_destroy=True)
    if destroy_first:
        first.destroy()
    try:
        deep_ep.Buffer(group, 0, size, low_latency_mode=True, num_qps_per_rank=1, explicitly_destroy=True)
    except common.SimulatedDeepEPError as error:
        return str(error)
    raise AssertionError("the second low-latency Buffer was made")


def unchecked_rank_task(rank: int, problem: Problem, backend: str, compiled: bool) -> tuple[RankResult, object]:
    """:func:`moe_ops.testing.conformance.rank_task` with the backends' own hidden-size and token-bound
    checks switched off: what the (simulated) library does with a call outside its limits."""
    saved = runtime.check_hidden, runtime.check_low_latency_shape
    runtime.check_hidden = runtime.check_low_latency_shape = lambda *args: None  # type: ignore[assignment]
    try:
        return conformance.rank_task(rank, problem, backend, compiled)
    finally:
        runtime.check_hidden, runtime.check_low_latency_shape = saved


def _experts_shifted(exchange: Callable[..., Any]) -> Callable[..., Any]:
    """Layout: every received route filed under the next local expert (counts stay consistent)."""

    def wrong(buffer: Any, config: Any, x: Tensor, ids: Tensor, weights: Tensor, plan: DispatchPlan, *scales: Tensor | None) -> Any:
        got = exchange(buffer, config, x, ids, weights, plan, *scales)
        return got._replace(ids=torch.where(got.ids >= 0, (got.ids + 1) % plan.num_local_experts, -1))

    return wrong


def _worst_case_without_world(exchange: Callable[..., Any]) -> Callable[..., Any]:
    """Count (padded): DeepEP's ``num_worst_tokens`` taken as ``Tmax`` rather than ``W * Tmax``."""

    def wrong(buffer: Any, config: Any, x: Tensor, ids: Tensor, weights: Tensor, plan: DispatchPlan, *scales: Tensor | None) -> Any:
        per_rank = -(-plan.token_bound // plan.comm.world_size)
        return exchange(buffer, config, x, ids, weights, dataclasses.replace(plan, token_bound=per_rank), *scales)

    return wrong


def _channel_matrices_swapped(deepep_handle: Callable[[list[Tensor]], tuple[Tensor, ...]]) -> Callable[..., Any]:
    """Handle: the send- and receive-side channel prefix matrices rebuilt in each other's place."""

    def wrong(handle: list[Tensor]) -> tuple[Tensor, ...]:
        rank_prefix, send_side, receive_side, *rest = deepep_handle(handle)
        return (rank_prefix, receive_side, send_side, *rest)

    return wrong


def _blocks_in_rank_order(slots: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Layout (low-latency): source blocks assumed to follow rank order, ignoring their starts."""

    def wrong(src_info: Tensor, layout_range: Tensor, max_tokens: int) -> Tensor:
        length = layout_range & 0xFFFFFFFF
        start = length.cumsum(dim=1) - length
        return slots(src_info, (start << 32) | length, max_tokens)

    return wrong


def _max_tokens_not_divided(deepep: Callable[[Any], tuple[Any, ...]]) -> Callable[..., Any]:
    """Handle (low-latency): DeepEP's ``num_max_dispatch_tokens_per_rank`` rebuilt as ``W * Tmax``."""

    def wrong(self: Any) -> tuple[Any, ...]:
        src_info, layout_range, _, hidden, num_experts = deepep(self)
        return src_info, layout_range, self.route_row.shape[0], hidden, num_experts

    return wrong


#: name -> (owner of the helper, its attribute, the wrapper making it wrong)
MISTAKES: dict[str, tuple[Any, str, Callable[[Any], Any]]] = {
    "deepep:layout": (normal, "_exchange", _experts_shifted),
    "deepep:count": (normal, "_exchange", _worst_case_without_world),
    "deepep:handle": (normal, "_deepep_handle", _channel_matrices_swapped),
    "deepep_ll:layout": (low_latency, "_slots", _blocks_in_rank_order),
    "deepep_ll:handle": (low_latency._Handle, "deepep", _max_tokens_not_divided),
}


def rank_task(rank: int, problem: Problem, backend: str, compiled: bool, mistake: str) -> tuple[RankResult, object]:
    """:func:`moe_ops.testing.conformance.rank_task` with ``mistake`` (a key of :data:`MISTAKES`) made."""
    owner, attribute, make_wrong = MISTAKES[mistake]
    original = getattr(owner, attribute)
    setattr(owner, attribute, make_wrong(original))
    try:
        return conformance.rank_task(rank, problem, backend, compiled)
    finally:
        setattr(owner, attribute, original)


def prequantized_e5m2(rank: int) -> None:
    """A pre-quantized float8_e5m2 dispatch on ``deepep`` (which must refuse it)."""
    import moe_ops

    x = torch.randn(4, 256).to(torch.float8_e5m2)
    ids = torch.tensor([[0, 3], [1, -1], [2, 0], [3, 1]])
    moe_ops.dispatch(x, ids, torch.rand(4, 2), 4, x_scales=torch.ones(4, 2), group=dist.group.WORLD.group_name, backend="deepep")
