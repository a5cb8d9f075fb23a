"""The conformance suite: run one rank's dispatch → toy experts → combine → backward with our ops,
compute the same pipeline with :mod:`moe_ops.reference`, and compare.

Dispatch is a permutation, so its outputs must match exactly (padding rows excepted: their content is
unspecified). Combine and the gradients are sums, so they must match within a bound derived from
float32 accumulation and one rounding to the output dtype per partial sum, scaled by the sum of the
terms' magnitudes (the same pipeline run on absolute values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import moe_ops
from moe_ops import reference
from moe_ops.testing.problems import Problem


@dataclass
class RankResult:
    """What one rank ends up with; CPU tensors."""

    recv_x: Tensor
    recv_weights: Tensor
    tokens_per_expert: Tensor
    dropped: Tensor
    out: Tensor
    grad_x: Tensor
    grad_weights: Tensor
    sources: Tensor | None = None  #: the reference's (source rank, token, k) per row, -1 on padding rows


def toy_experts(recv_x: Tensor, tokens_per_expert: Tensor, expert_ids: Tensor) -> Tensor:
    """Stand-in experts: the local expert holding global expert ``g`` (``expert_ids [L]``) scales its rows
    by ``1 + g / 16`` (different per expert); rows past the last expert's (bounded layout) by 1."""
    scale = 1 + expert_ids.to(device=recv_x.device, dtype=torch.float32) / 16
    if recv_x.dim() == 3:
        return recv_x * scale.to(recv_x.dtype).view(-1, 1, 1)
    counts = tokens_per_expert.to(device=recv_x.device)  # adapters may hand host counts
    ends = torch.cumsum(counts, 0)
    expert_of_row = torch.searchsorted(ends, torch.arange(recv_x.shape[0], device=recv_x.device, dtype=ends.dtype), right=True)
    per_row = torch.cat([scale, scale.new_ones(1)])[expert_of_row]
    return recv_x * per_row.to(recv_x.dtype).unsqueeze(1)


def cotangent(problem: Problem, rank: int) -> Tensor:
    """The fixed float32 gradient ``dL/d out`` of rank ``rank``."""
    gen = torch.Generator().manual_seed(7919 * (rank + 1))
    return torch.randn(problem.xs[rank].shape, generator=gen)


def pipeline(problem: Problem, rank: int, *, group: object = None, backend: str = "auto") -> Callable[..., tuple[Tensor, ...]]:
    """The rank's forward step ``(x, topk_idx, topk_weights) -> (recv_x, recv_weights, counts, dropped, out)``."""
    expert_ids = problem.local_expert_ids(rank)

    def step(x: Tensor, topk_idx: Tensor, topk_weights: Tensor) -> tuple[Tensor, ...]:
        d = moe_ops.dispatch(
            x, topk_idx, topk_weights, problem.num_experts, group=group, backend=backend, **problem.dispatch_kwargs(x.device)
        )
        out = moe_ops.combine(toy_experts(d.recv_x, d.tokens_per_expert, expert_ids), d, group=group, backend=backend)
        return d.recv_x, d.recv_weights, d.tokens_per_expert, d.dropped, out

    return step


def run_rank(
    problem: Problem,
    rank: int,
    *,
    group: object = None,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    step: Callable[..., tuple[Tensor, ...]] | None = None,
) -> RankResult:
    """Run the pipeline (or a compiled ``step`` of it) on rank ``rank``'s inputs, forward and backward."""
    x = problem.xs[rank].to(device, copy=True).requires_grad_()  # fresh leaves: the problem stays untouched
    weights = problem.topk_weights[rank].to(device, copy=True).requires_grad_()
    step = step or pipeline(problem, rank, group=group, backend=backend)
    recv_x, recv_weights, counts, dropped, out = step(x, problem.topk_idx[rank].to(device), weights)
    (out.float() * cotangent(problem, rank).to(device)).sum().backward()
    assert x.grad is not None and weights.grad is not None
    return RankResult(*(t.detach().cpu() for t in (recv_x, recv_weights, counts, dropped, out, x.grad, weights.grad)))


def _reference_run(problem: Problem, absolute: bool) -> list[RankResult]:
    """The pipeline through the reference, in float64 from the expert outputs on. With ``absolute``,
    inputs and cotangents are replaced by their absolute values: outputs are then magnitudes."""
    fix = torch.abs if absolute else (lambda t: t)
    xs = [fix(x).detach().clone().requires_grad_() for x in problem.xs]
    ws = [fix(w).detach().clone().requires_grad_() for w in problem.topk_weights]
    got = reference.dispatch(
        xs, problem.topk_idx, ws, problem.num_experts, problem.reference_capacity, problem.expert_map, problem.log2phy,
        problem.max_recv_rows, problem.pad_multiple,
    )
    ys = [toy_experts(g.recv_x, g.tokens_per_expert, problem.local_expert_ids(r)).double() for r, g in enumerate(got)]
    outs = reference.combine(got, ys, [x.shape[0] for x in xs])
    loss = sum((out * fix(cotangent(problem, r)).double()).sum() for r, out in enumerate(outs))
    grads = torch.autograd.grad(loss, xs + ws, allow_unused=True) if loss.requires_grad else [None] * 2 * len(xs)
    world = problem.world_size
    results = []
    for r, g in enumerate(got):
        gx, gw = grads[r], grads[world + r]
        results.append(
            RankResult(
                g.recv_x.detach(),
                g.recv_weights.detach(),
                g.tokens_per_expert,
                g.dropped,
                outs[r].detach(),
                torch.zeros_like(xs[r]) if gx is None else gx,
                torch.zeros_like(ws[r]) if gw is None else gw,
                g.sources,
            )
        )
    return results


def expected(problem: Problem) -> tuple[list[RankResult], list[RankResult]]:
    """``(reference results, magnitudes)`` for every rank."""
    return _reference_run(problem, absolute=False), _reference_run(problem, absolute=True)


def assert_relative_close(ours: Tensor, ref: Tensor, tolerance: float, what: str, norm: float | str = "inf") -> None:
    """``norm(ours - ref) <= tolerance * norm(ref)`` (``"inf"``: the largest element; ``"fro"``: the
    2-norm of all elements), computed in float64."""
    order = float("inf") if norm == "inf" else norm
    error = torch.linalg.vector_norm((ours.double() - ref.double()).flatten(), ord=2 if order == "fro" else order)
    scale = torch.linalg.vector_norm(ref.double().flatten(), ord=2 if order == "fro" else order).clamp(min=1e-30)
    assert error <= tolerance * scale, f"{what}: relative error {(error / scale).item():.3e} above {tolerance:.1e}"


def valid_rows(tokens_per_expert: Tensor, capacity: int) -> Tensor:
    """``[L, C]`` bool: which rows of a padded layout hold a route."""
    return torch.arange(capacity).unsqueeze(0) < tokens_per_expert.long().unsqueeze(1)


def routed_rows(ref: RankResult) -> Tensor:
    """Which rows of the reference's layout hold a route (its padding rows hold zeros and weight 0)."""
    return ref.sources[..., 0] >= 0


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def assert_close_to_reference(
    name: str, ours: Tensor, ref: Tensor, magnitude: Tensor, dtype: torch.dtype, top_k: int, scale: float, context: str
) -> None:
    """``|ours - ref| <= (8 u + (K + 8) u_fp32) |magnitude| + (2K + 8) * scale * s`` elementwise, with
    ``u`` the unit roundoff and ``s`` the subnormal spacing of the token dtype ``dtype`` (tokens, expert
    outputs and output gradients are rounded to it); the last term bounds roundings in the subnormal
    range, which a later multiplication by an expert scale (at most ``scale``) can amplify."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)} ({context})"
    assert not torch.isnan(ours).any(), f"{name}: NaN ({context})"
    info = torch.finfo(dtype)
    relative = 8 * _unit_roundoff(dtype) + (top_k + 8) * _unit_roundoff(torch.float32)
    bound = relative * magnitude.double() + (2 * top_k + 8) * scale * info.smallest_normal * info.eps
    err = (ours.double() - ref.double()).abs()
    worst = (err - bound).argmax() if err.numel() else None
    assert bool((err <= bound).all()), (
        f"{name}: error {err.flatten()[worst].item():.3e} above bound {bound.flatten()[worst].item():.3e} "
        f"at flat index {worst.item()} ({context})"
    )


def assert_rank_matches(problem: Problem, rank: int, ours: RankResult, ref: RankResult, mag: RankResult) -> None:
    """Dispatch exactly, combine and gradients within the accumulation bound."""
    ctx = f"rank {rank}; {problem.description}"
    assert torch.equal(ours.tokens_per_expert, ref.tokens_per_expert), (
        f"tokens_per_expert {ours.tokens_per_expert.tolist()} != {ref.tokens_per_expert.tolist()} ({ctx})"
    )
    assert torch.equal(ours.dropped, ref.dropped), f"dropped {ours.dropped.tolist()} != {ref.dropped.tolist()} ({ctx})"
    assert ours.tokens_per_expert.dtype == torch.int32 and ours.dropped.dtype == torch.int32, ctx
    assert ours.recv_x.shape == ref.recv_x.shape, f"recv_x shape {tuple(ours.recv_x.shape)} != {tuple(ref.recv_x.shape)} ({ctx})"
    assert ours.recv_x.dtype == problem.xs[rank].dtype, ctx
    rows = routed_rows(ref)
    assert torch.equal(ours.recv_x[rows], ref.recv_x[rows]), f"recv_x rows differ ({ctx})"
    # the pipeline records autograd, so zero_padding is on: padding rows are zero (else garbage, NaN
    # included, would reach the experts' weight gradients through their zero-weighted rows)
    assert not ours.recv_x[~rows].any(), f"padding rows of recv_x are not zero ({ctx})"
    if problem.kind == "ragged" and problem.pad_multiple == 1:
        assert bool(rows.all()), f"a ragged layout without pad_multiple has no padding rows ({ctx})"
    assert torch.equal(ours.recv_weights, ref.recv_weights), f"recv_weights differ (0 on padding rows) ({ctx})"
    top_k, dtype = problem.topk_idx[rank].shape[1], problem.xs[rank].dtype
    assert ours.out.dtype == dtype and ours.grad_x.dtype == dtype, ctx
    largest_scale = 1 + (problem.num_experts - 1) / 16  # of toy_experts
    for name in ("out", "grad_x", "grad_weights"):
        assert_close_to_reference(
            name, getattr(ours, name), getattr(ref, name), getattr(mag, name), dtype, top_k, largest_scale, ctx
        )


def rank_task(rank: int, problem: Problem, backend: str = "auto", compiled: bool = False) -> tuple[RankResult, object]:
    """One rank's part of a multi-rank conformance check (run by :class:`moe_ops.testing.harness.World`
    inside a gloo group): the pipeline on this rank's inputs over the default group, eager or compiled
    with ``fullgraph=True, dynamic=True``. Returns the result and, if compiled, the compile stats."""
    import torch.distributed as dist

    from moe_ops import compile_stats

    group = dist.group.WORLD.group_name
    if not compiled:
        return run_rank(problem, rank, group=group, backend=backend), None
    compile_stats.reset()
    step = torch.compile(pipeline(problem, rank, group=group, backend=backend), fullgraph=True, dynamic=True)
    return run_rank(problem, rank, group=group, backend=backend, step=step), compile_stats.read()


def check_world(
    world: object,
    problem: Problem,
    backend: str = "auto",
    compiled: bool = False,
    task: Callable[..., tuple[RankResult, object]] = rank_task,
    *args: object,
) -> None:
    """Run ``problem`` on every rank of ``world`` and compare each rank with the reference. ``task`` (a
    picklable stand-in for :func:`rank_task`) gets ``(rank, problem, backend, compiled, *args)``."""
    outputs = world.run(task, problem, backend, compiled, *args)  # type: ignore[attr-defined]
    ref, mag = expected(problem)
    for rank, (ours, stats) in enumerate(outputs):
        assert_rank_matches(problem, rank, ours, ref[rank], mag[rank])
        if compiled:
            assert stats.graph_breaks == 0, f"rank {rank}: {stats} ({problem.description})"


def opcheck_task(rank: int, problem: Problem, backend: str, dispatch_checks: tuple[str, ...] | None = None) -> None:
    """``torch.library.opcheck`` of dispatch and combine on this rank's inputs over the default group
    (every rank runs the same sequence of op calls, so the collectives inside stay matched).
    ``dispatch_checks``: opcheck's ``test_utils`` for dispatch (default: opcheck's own)."""
    import torch.distributed as dist

    kwargs = dict(
        num_experts=problem.num_experts, group_name=dist.group.WORLD.group_name, backend=backend, **problem.layout_kwargs(),
        zero_padding=True,  # opcheck compares outputs across runs: padding rows must be deterministic
    )
    x = problem.xs[rank].clone().requires_grad_()
    w = problem.topk_weights[rank].clone().requires_grad_()
    checks = {} if dispatch_checks is None else {"test_utils": dispatch_checks}
    torch.library.opcheck(torch.ops.moe.dispatch.default, (x, problem.topk_idx[rank], w), kwargs, **checks)
    recv_x, recv_w, _, _, handle = torch.ops.moe.dispatch(x, problem.topk_idx[rank], w, **kwargs)
    comm = dict(group_name=kwargs["group_name"], backend=backend)
    expert_out = recv_x.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.moe.combine.default, (expert_out, recv_w.detach().clone().requires_grad_(), handle), comm)
