"""Faults every backend must survive, as worker tasks (picklable, for :class:`moe_ops.testing.harness.World`):
bad metadata on one rank, a rank that dies, hostile routing values, and reruns that must be bitwise
identical. ``tests/test_faults.py`` runs them in CI; ``tools/faults.py`` runs all of them at W = 1…4 and
prints the table of docs/reliability.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

import moe_ops
from moe_ops import MoECommunicationError, MoEInputError, backends, config, routing
from moe_ops.backends.deepep.runtime import low_latency_token_multiple
from moe_ops.packing import round_up
from moe_ops.testing import conformance, sim
from moe_ops.testing.harness import TRITON_INTERPRETED
from moe_ops.testing.problems import Problem, make_problem, padded


@dataclass(frozen=True)
class Setup:
    """How a backend runs on CPU here: its layouts, group sizes, simulator, and a problem shape it takes."""

    layouts: tuple[str, ...]
    worlds: tuple[int, ...]
    simulator: str | None = None
    dtype: torch.dtype = torch.float32
    hidden: int = 16
    env: tuple[tuple[str, str], ...] = ()  #: the workers' environment (symm's put kernel runs interpreted)
    bound_multiple: Callable[[int], int] = lambda world: 1  #: what max_tokens_per_rank must be a multiple of at W ranks


SETUPS: dict[str, Setup] = {
    "local": Setup(("ragged", "padded"), (1,)),
    "collective": Setup(("ragged", "padded"), (1, 2, 3, 4)),
    "allgather": Setup(("padded",), (1, 2, 3, 4)),
    "symm": Setup(("ragged", "padded"), (1, 2, 3, 4), "symmetric_memory", env=tuple(TRITON_INTERPRETED.items())),
    "deepep": Setup(("ragged", "padded"), (2, 4), "deep_ep", torch.bfloat16),
    "deepep_ll": Setup(("padded",), (1, 2, 3, 4), "deep_ep", torch.bfloat16, hidden=2048, bound_multiple=low_latency_token_multiple),
    "mc2": Setup(("padded",), (2, 3, 4), "torch_npu", torch.bfloat16, hidden=1000),  # Atlas A3: W >= 2, rows of >= 1024 columns
}

MUTATIONS = ("x_dtype", "hidden", "topk_idx_dtype", "topk_weights_shape", "num_experts", "capacity", "layout",
             "expert_out_rows", "expert_out_dtype", "stale_handle", "foreign_handle")
DISAGREEMENTS = ("hidden", "num_experts")  #: wrong only where peers disagree (W > 1)


def problem(backend: str, world: int, layout: str, tokens: list[int] | None = None, seed: int = 0) -> Problem:
    """A problem ``backend`` takes at ``world`` ranks (T = 9, 0, 5, 3 by default: a rank without tokens)."""
    setup = SETUPS[backend]
    tokens = tokens or [9, 0, 5, 3][:world]
    kw = padded(round_up(max(tokens) + 1, setup.bound_multiple(world)), 4) if layout == "padded" else {}
    return make_problem(tokens, setup.hidden, 4 * world, 2, dtype=setup.dtype, mask_fraction=0.2, seed=seed, **kw)


def install(rank: int, backend: str) -> None:
    """Install ``backend``'s simulator in this worker (if it has one)."""
    name = SETUPS[backend].simulator
    if name is not None:
        sim.install(name)


def _group() -> str:
    return dist.group.WORLD.group_name if dist.is_initialized() else ""


def _dispatch(p: Problem, rank: int, backend: str, **changes: object) -> moe_ops.DispatchResult:
    args = dict(x=p.xs[rank], topk_idx=p.topk_idx[rank], topk_weights=p.topk_weights[rank], num_experts=p.num_experts)
    kwargs = dict(p.dispatch_kwargs())
    for name, value in changes.items():
        (args if name in args else kwargs)[name] = value
    return moe_ops.dispatch(
        args["x"], args["topk_idx"], args["topk_weights"], args["num_experts"], group=_group(), backend=backend, **kwargs  # type: ignore[arg-type]
    )


def _other_backend(backend: str, layout: str) -> str:
    """A backend other than ``backend`` that takes the same problem (for a foreign handle)."""
    return "allgather" if backend == "collective" and layout == "padded" else "symm" if backend == "collective" else "collective"


def bad_metadata_task(rank: int, p: Problem, backend: str, bad_rank: int, mutation: str) -> None:
    """The pipeline with one malformed argument (:data:`MUTATIONS`) on ``bad_rank`` only; every rank must
    raise the same :class:`MoEInputError` naming that rank (the caller checks)."""
    bad = rank == bad_rank
    x, idx, w = p.xs[rank], p.topk_idx[rank], p.topk_weights[rank]
    changes: dict[str, object] = {}
    if bad and mutation == "x_dtype":
        changes["x"] = x.to(torch.int32)
    if bad and mutation == "hidden":
        changes["x"] = torch.cat([x, x[:, :1]], dim=1)
    if bad and mutation == "topk_idx_dtype":
        changes["topk_idx"] = idx.float()
    if bad and mutation == "topk_weights_shape":
        changes["topk_weights"] = torch.cat([w, w[:, :1]], dim=1)
    if bad and mutation == "num_experts":
        changes["num_experts"] = p.num_experts + (dist.get_world_size() if dist.get_world_size() > 1 else 1) + 1
    if bad and mutation == "capacity":
        changes["capacity"] = -1 if p.layout == "padded" else 3
    if bad and mutation == "layout":
        changes["layout"] = "dense"
    if mutation == "stale_handle":  # an earlier dispatch of other shapes (a smaller capacity, or one token)
        if p.layout == "padded":
            stale = _dispatch(p, rank, backend, capacity=(p.capacity or 2) - 1)
        else:
            stale = _dispatch(replace(p, xs=[t[:1] for t in p.xs], topk_idx=[t[:1] for t in p.topk_idx],
                                      topk_weights=[t[:1] for t in p.topk_weights]), rank, backend)
    if mutation == "foreign_handle":
        foreign = _dispatch(p, rank, _other_backend(backend, p.layout))
    d = _dispatch(p, rank, backend, **changes)
    expert_out = d.recv_x
    if bad and mutation == "expert_out_rows":
        expert_out = d.recv_x[:-1]
    if bad and mutation == "expert_out_dtype":
        expert_out = d.recv_x.to(torch.int32)
    if bad and mutation == "stale_handle":
        d = d._replace(handle=stale.handle)
    if bad and mutation == "foreign_handle":
        d = foreign
    moe_ops.combine(expert_out, d, group=_group(), backend=backend)


def die_task(rank: int, p: Problem, backend: str, victim: int, when: str) -> float:
    """``victim`` exits ``when`` (``"before"`` dispatch, ``"inside"`` it after the agreement, ``"between"``
    dispatch and combine) and the others go on; returns how long a survivor took to fail (the caller
    checks it failed with :class:`MoECommunicationError`)."""
    if rank == victim and when == "before":
        os._exit(3)
    if rank == victim and when == "inside":
        impl = backends.resolve(backend, "cpu", dist.get_world_size(), p.layout)
        impl.dispatch = lambda *args, **kwargs: os._exit(3)  # type: ignore[method-assign]
    start = time.monotonic()
    try:
        d = _dispatch(p, rank, backend)
        if rank == victim:
            os._exit(3)
        moe_ops.combine(d.recv_x, d, group=_group(), backend=backend)
    except MoECommunicationError:
        return time.monotonic() - start
    raise AssertionError(f"rank {rank}: no MoECommunicationError after rank {victim} died {when} the dispatch")


def set_peer_timeout(rank: int, seconds: float) -> None:
    config.peer_timeout_s = seconds


def hostile_problem(
    backend: str, world: int, layout: str, id_dtype: torch.dtype, seed: int = 0, tokens: list[int] | None = None
) -> Problem:
    """Routing values chosen to break kernels: ids at the extremes of ``id_dtype``, just past the experts,
    negative, repeated within a row; NaN and infinite weights; the last rank with no tokens (``tokens``:
    per rank, by default 12, 7, 9, 0)."""
    tokens = tokens or ([12, 7, 9, 0][:world] if world > 1 else [12])
    p = problem(backend, world, layout, tokens=tokens, seed=seed)
    junk = [torch.iinfo(id_dtype).min, torch.iinfo(id_dtype).max, p.num_experts, p.num_experts + 1, -2]
    non_finite = (float("nan"), float("inf"), -float("inf"))
    ids, weights = [], []
    for idx, w in zip(p.topk_idx, p.topk_weights, strict=True):
        idx, w = idx.clone().to(id_dtype), w.clone()
        for t in range(idx.shape[0]):
            if t < len(junk):
                idx[t, 0] = junk[t]
            elif t == len(junk):
                idx[t] = 1  # a repeated id
            if t % 3 == 0:
                w[t, t % 2] = non_finite[t // 3 % 3]
        ids.append(idx)
        weights.append(w)
    return replace(p, topk_idx=ids, topk_weights=weights, description=f"hostile {id_dtype} {p.description}")


def expected_counts(p: Problem, rank: int, unique_per_row: bool) -> list[int]:
    """Routes that reach each of ``rank``'s local experts: ids in ``[0, E)``, a repeated id once per row
    where the transport sends a token once per expert (MC2)."""
    num_local = p.num_local_experts
    counts = [0] * num_local
    for idx in p.topk_idx:
        ids = routing.masked_ids(idx, p.num_experts)
        if unique_per_row:
            ids = routing.unique_routes(ids)
        for e in ids[ids >= 0].tolist():
            if e // num_local == rank:
                counts[e % num_local] += 1
    return counts


def hostile_task(rank: int, p: Problem, backend: str, checks: bool, device: str = "cpu") -> tuple[list[int], str]:
    """The pipeline on hostile values, forward and backward, with value checks ``checks``, on ``device``:
    this rank's ``tokens_per_expert + dropped`` and the MoEInputError message ("" when none)."""
    x = p.xs[rank].to(device, copy=True).requires_grad_()
    w = p.topk_weights[rank].to(device, copy=True).requires_grad_()
    try:
        with config.value_checks(checks):
            d = _dispatch(p, rank, backend, x=x, topk_weights=w, topk_idx=p.topk_idx[rank].to(device))
            out = moe_ops.combine(d.recv_x * 2, d, group=_group(), backend=backend)
            out.float().sum().backward()
    except MoEInputError as error:
        return [], str(error)
    return (d.tokens_per_expert + d.dropped).tolist(), ""


def rerun_task(rank: int, p: Problem, backend: str, runs: int) -> int:
    """The conformance pipeline (forward and backward) ``runs`` times: how many runs differ bitwise from the first."""
    first = conformance.run_rank(p, rank, group=_group(), backend=backend)
    differ = 0
    for _ in range(runs - 1):
        again = conformance.run_rank(p, rank, group=_group(), backend=backend)
        differ += any(
            not _bitwise_equal(getattr(first, f), getattr(again, f)) for f in first.__dataclass_fields__ if getattr(first, f) is not None
        )
    return differ


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """Equal shapes, dtypes and bytes (NaN included)."""
    same_meta = a.shape == b.shape and a.dtype == b.dtype
    return same_meta and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
