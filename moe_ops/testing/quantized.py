"""Conformance of quantized dispatch (``moe.dispatch_quantized``) against the reference.

Quantizing is per token (:func:`moe_ops.quant.quantize`, itself held to a float64 reference in
tests/test_quantized.py), and the layout is a permutation of tokens, so the expected rows are the
reference's layout of every rank's quantized tokens, and the expected scale rows its layout of their
scales: both must match **exactly** on the rows that hold a route (compared as float32, which holds every
float8 and int8 value exactly). A rank's dispatch then feeds combine (bf16 rows, dequantized) and the
router's gradient flows back through ``recv_weights``, checked against the unquantized dispatch's.
With ``dequantize=True`` (:func:`straight_through_task`) the rows and both gradients must equal
``moe.dispatch``'s of the rounded tokens; :func:`opcheck_task` and :func:`compiled_task` hold the op to
``torch.library.opcheck`` and to ``torch.compile`` for backends tested in worlds of their own (mc2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import moe_ops
from moe_ops import quant, reference
from moe_ops.testing.problems import Problem

#: ``(x [T, H], spec) -> (q [T, H], scales [T, S])``: how a backend quantizes tokens (moe_ops's own rounding
#: by default; mc2 follows MC2's, moe_ops.testing.mc2_tasks.mc2_quantize)
Quantizer = Callable[[Tensor, quant.QuantSpec], tuple[Tensor, Tensor]]


@dataclass
class QuantizedResult:
    """What one rank ends up with; CPU tensors."""

    recv_x: Tensor
    recv_scales: Tensor
    recv_weights: Tensor
    tokens_per_expert: Tensor
    dropped: Tensor
    grad_weights: Tensor  #: the router's gradient through combine of the dequantized rows (or combine's output)
    plain_grad_weights: Tensor  #: the same step with the unquantized dispatch (and the same expert rows)


def _api_options(problem: Problem, backend: str, device: str) -> tuple[str | None, dict[str, object]]:
    """``(group, moe_ops.dispatch's keyword arguments)`` for ``problem`` on the default group (none in a
    one-rank run without one), padding rows zero."""
    import torch.distributed as dist

    group = dist.group.WORLD.group_name if dist.is_initialized() else None
    return group, dict(group=group, backend=backend, zero_padding=True, **problem.dispatch_kwargs(device))


def rank_task(rank: int, problem: Problem, spec: quant.QuantSpec, prequantized: bool, backend: str = "auto",
              device: str = "cpu", row_dtype: torch.dtype | None = None, with_gradient: bool = True) -> QuantizedResult:
    """Rank ``rank``'s quantized dispatch of ``problem`` (``prequantized``: ``x`` quantized by
    :func:`moe_ops.quant.quantize` first and passed with its scales; else ``quant`` in dispatch), then
    combine of the dequantized rows (float32, or ``row_dtype``) and the router's gradient (without
    ``with_gradient``: combine's output), compared with an unquantized dispatch of ``x`` (in ``row_dtype``
    if given). Runs inside a gloo group of every rank
    (:class:`moe_ops.testing.harness.World`), or alone for a one-rank problem."""
    group, kwargs = _api_options(problem, backend, device)
    x = problem.xs[rank].to(device)
    idx = problem.topk_idx[rank].to(device)

    def router_gradient(dispatch: object, rows: object) -> Tensor:
        w = problem.topk_weights[rank].to(device, copy=True).requires_grad_(with_gradient)
        d = dispatch(w)  # type: ignore[operator]
        out = moe_ops.combine(rows(d).to(row_dtype or torch.float32), d, group=group, backend=backend)  # type: ignore[operator]
        if not with_gradient:
            return out
        (out * torch.arange(out.numel(), device=device, dtype=torch.float32).view_as(out).sin()).sum().backward()
        assert w.grad is not None
        return w.grad

    if prequantized:
        q, s = quant.quantize(x, spec)
        quantized = dict(x_scales=s)
    else:
        q, quantized = x, dict(quant=spec.mode, quant_block=spec.block, round_scale=spec.round_scale)
    d = moe_ops.dispatch(q, idx, problem.topk_weights[rank].to(device), problem.num_experts, **quantized, **kwargs)  # type: ignore[arg-type]
    block = spec.block if not prequantized else (0 if d.recv_scales.shape[-1] == 1 else quant.BLOCK)
    dequantized = quant.dequantize(d.recv_x, d.recv_scales, block)
    grad = router_gradient(
        lambda w: moe_ops.dispatch(q, idx, w, problem.num_experts, **quantized, **kwargs), lambda got: dequantized  # type: ignore[arg-type]
    )
    plain_x = x if row_dtype is None else x.to(row_dtype)
    plain = router_gradient(lambda w: moe_ops.dispatch(plain_x, idx, w, problem.num_experts, **kwargs), lambda got: dequantized)
    return QuantizedResult(*(t.detach().cpu() for t in (
        d.recv_x, d.recv_scales, d.recv_weights, d.tokens_per_expert, d.dropped, grad, plain
    )))


def expected(problem: Problem, spec: quant.QuantSpec, quantize: Quantizer = quant.quantize
             ) -> tuple[list[reference.RankReceived], list[reference.RankReceived]]:
    """The reference's layout of every rank's tokens quantized by ``quantize`` (as float32) and of their scales."""
    quantized = [quantize(x, spec) for x in problem.xs]
    args = (problem.topk_idx, problem.topk_weights, problem.num_experts, problem.reference_capacity, problem.expert_map,
            problem.log2phy, problem.max_recv_rows, problem.pad_multiple)
    rows = reference.dispatch([q.float() for q, _ in quantized], *args)
    scales = reference.dispatch([s for _, s in quantized], *args)
    return rows, scales


def assert_rank_matches(problem: Problem, spec: quant.QuantSpec, rank: int, ours: QuantizedResult,
                        rows: reference.RankReceived, scales: reference.RankReceived) -> None:
    """Rows, scales, weights, counts and drops exactly; the router's gradient equal to the unquantized
    dispatch's (same rows through combine: the same sums)."""
    ctx = f"rank {rank}; {spec}; {problem.description}"
    assert ours.recv_x.dtype == spec.dtype, f"recv_x is {ours.recv_x.dtype} ({ctx})"
    assert ours.recv_scales.dtype == torch.float32, ctx
    assert ours.recv_x.shape == rows.recv_x.shape, f"recv_x shape {tuple(ours.recv_x.shape)} != {tuple(rows.recv_x.shape)} ({ctx})"
    assert ours.recv_scales.shape == scales.recv_x.shape, (
        f"recv_scales shape {tuple(ours.recv_scales.shape)} != {tuple(scales.recv_x.shape)} ({ctx})"
    )
    routed = rows.sources[..., 0] >= 0
    assert torch.equal(ours.recv_x.float()[routed], rows.recv_x[routed]), f"recv_x rows differ ({ctx})"
    assert torch.equal(ours.recv_scales[routed], scales.recv_x[routed]), f"recv_scales rows differ ({ctx})"
    assert not ours.recv_x.float()[~routed].any() and not ours.recv_scales[~routed].any(), f"padding rows not zero ({ctx})"
    assert torch.equal(ours.recv_weights, rows.recv_weights), f"recv_weights differ ({ctx})"
    assert torch.equal(ours.tokens_per_expert, rows.tokens_per_expert), ctx
    assert torch.equal(ours.dropped, rows.dropped), ctx
    assert torch.equal(ours.grad_weights, ours.plain_grad_weights), f"router gradient differs from dispatch's ({ctx})"


def check_world(world: object, problem: Problem, spec: quant.QuantSpec, prequantized: bool, backend: str = "auto",
                row_dtype: torch.dtype | None = None, with_gradient: bool = True, quantize: Quantizer = quant.quantize) -> None:
    """Run :func:`rank_task` on every rank of ``world`` and compare each rank with the reference layout of
    the tokens quantized by ``quantize``."""
    outputs = world.run(rank_task, problem, spec, prequantized, backend, "cpu", row_dtype, with_gradient)  # type: ignore[attr-defined]
    rows, scales = expected(problem, spec, quantize)
    for rank, ours in enumerate(outputs):
        assert_rank_matches(problem, spec, rank, ours, rows[rank], scales[rank])


def straight_through_task(rank: int, problem: Problem, spec: quant.QuantSpec, backend: str = "auto", device: str = "cpu",
                          quantize: Quantizer = quant.quantize) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """Rank ``rank``'s training step through a quantized dispatch with ``dequantize=True`` (a loss of
    combine's output and of the rows themselves), and the same step through ``moe.dispatch`` of the
    tokens as ``quantize`` rounds them (quantized, then dequantized in ``x``'s dtype). Straight through
    the rounding, the two must agree exactly: rows, ``x``'s gradient and the router's. Returns
    ``(rows, grad_x, grad_weights)`` of each, CPU tensors."""
    group, kwargs = _api_options(problem, backend, device)
    x = problem.xs[rank].to(device)
    idx = problem.topk_idx[rank].to(device)

    def step(tokens: Tensor, **quantized: object) -> tuple[Tensor, Tensor, Tensor]:
        xr = tokens.detach().clone().requires_grad_()
        wr = problem.topk_weights[rank].to(device, copy=True).requires_grad_()
        d = moe_ops.dispatch(xr, idx, wr, problem.num_experts, **quantized, **kwargs)  # type: ignore[arg-type]
        out = moe_ops.combine(d.recv_x * 2, d, group=group, backend=backend)
        loss = (out.float() * torch.arange(out.numel(), device=device).view_as(out).sin()).sum()
        (loss + (d.recv_x.float() * torch.arange(d.recv_x.numel(), device=device).view_as(d.recv_x).cos()).sum()).backward()
        assert xr.grad is not None and wr.grad is not None
        return d.recv_x.detach().cpu(), xr.grad.cpu(), wr.grad.cpu()

    q, s = quantize(x, spec)
    ours = step(x, quant=spec.mode, quant_block=spec.block, round_scale=spec.round_scale, dequantize=True)
    return ours, step(quant.dequantize(q, s, spec.block, x.dtype))


def check_straight_through(world: object, problem: Problem, spec: quant.QuantSpec, backend: str = "auto") -> None:
    """:func:`straight_through_task` on every rank of ``world``: rows and both gradients exactly equal."""
    assert_straight_through(world.run(straight_through_task, problem, spec, backend), problem, spec)  # type: ignore[attr-defined]


def assert_straight_through(outputs: list[tuple[tuple[Tensor, ...], tuple[Tensor, ...]]], problem: Problem, spec: quant.QuantSpec) -> None:
    """Every rank's :func:`straight_through_task` pairs equal, bit for bit."""
    for rank, (ours, plain) in enumerate(outputs):
        for name, a, b in zip(("rows", "grad_x", "grad_weights"), ours, plain, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differ on rank {rank} ({spec}; {problem.description})"


def _dispatch_options(problem: Problem, spec: quant.QuantSpec, backend: str) -> dict[str, object]:
    """``moe.dispatch_quantized``'s options for ``problem`` on the default group (``quant`` as ``spec``)."""
    import torch.distributed as dist

    return dict(num_experts=problem.num_experts, group_name=dist.group.WORLD.group_name, backend=backend, **problem.layout_kwargs(),
                zero_padding=True, quant=spec.mode, quant_block=spec.block, round_scale=spec.round_scale)


def opcheck_task(rank: int, problem: Problem, spec: quant.QuantSpec, backend: str) -> None:
    """``torch.library.opcheck`` of ``moe.dispatch_quantized`` on this rank's inputs (every rank runs the
    same calls, so the collectives inside stay matched): with ``dequantize=True`` every test, the AOT ones
    included (the rows are bf16 and carry ``x``'s gradient); quantized rows the tests whose outputs torch
    can sum (schema, autograd registration, fake tensors: float8 has no sum)."""
    options = _dispatch_options(problem, spec, backend)
    op = torch.ops.moe.dispatch_quantized.default
    x, idx = problem.xs[rank], problem.topk_idx[rank]
    w = problem.topk_weights[rank].clone().requires_grad_()
    torch.library.opcheck(op, (x.clone().requires_grad_(), idx, w), dict(options, dequantize=True))
    torch.library.opcheck(op, (x, idx, w), options, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def compiled_task(rank: int, problem: Problem, spec: quant.QuantSpec, backend: str) -> None:
    """A training step through a quantized dispatch (``dequantize=True``) and combine, compiled with
    ``fullgraph=True`` and static shapes, equals eager: rows, output and both gradients, bit for bit."""
    options = _dispatch_options(problem, spec, backend)
    comm = dict(group_name=options["group_name"], backend=backend)
    idx = problem.topk_idx[rank]

    def step(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        rows, _, recv_w, _, _, handle = torch.ops.moe.dispatch_quantized(x, idx, w, **options, dequantize=True)
        return rows, torch.ops.moe.combine(rows * 2, recv_w, handle, **comm)

    def run(fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
        x, w = problem.xs[rank].clone().requires_grad_(), problem.topk_weights[rank].clone().requires_grad_()
        rows, out = fn(x, w)
        (rows.float().sum() + (out.float() * out.float()).sum()).backward()
        assert x.grad is not None and w.grad is not None
        return rows.detach(), out.detach(), x.grad, w.grad

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    for name, a, b in zip(("rows", "out", "grad_x", "grad_weights"), run(compiled), run(step), strict=True):
        assert torch.equal(a, b), f"compiled {name} differs from eager on rank {rank} ({spec}; {problem.description})"
