"""The local backend (world size 1) against the reference: Hypothesis-drawn problems and fixed edge cases."""

import pytest
import torch
from hypothesis import given, settings

import moe_ops
from moe_ops.testing import conformance
from moe_ops.testing.problems import PATTERNS, Problem, make_problem, problems


def check(problem: Problem, device: str) -> None:
    ours = conformance.run_rank(problem, 0, backend="local", device=device)
    ref, mag = conformance.expected(problem)
    conformance.assert_rank_matches(problem, 0, ours, ref[0], mag[0])


@given(problem=problems(world_size=1))
def test_property_cpu(problem: Problem) -> None:
    check(problem, "cpu")


@pytest.mark.cuda
@settings(max_examples=40)  # each new shape class compiles Triton kernels: keep the GPU run short
@given(problem=problems(world_size=1))
def test_property_cuda(problem: Problem) -> None:
    check(problem, "cuda")


@pytest.mark.parametrize("layout", ["ragged", "padded"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns(device: str, layout: str, pattern: str) -> None:
    kw = dict(capacity=3, max_tokens_per_rank=64) if layout == "padded" else {}
    check(make_problem([64], 32, 16, 4, pattern=pattern, layout=layout, seed=1, **kw), device)


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_no_tokens(device: str, layout: str) -> None:
    kw = dict(max_tokens_per_rank=0) if layout == "padded" else {}
    check(make_problem([0], 64, 8, 2, layout=layout, **kw), device)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_largest_shape(device: str, id_dtype: torch.dtype) -> None:
    check(make_problem([512], 1000, 256, 8, id_dtype=id_dtype, dtype=torch.bfloat16, mask_fraction=0.1, seed=5), device)


def test_worked_example(device: str) -> None:
    """A hand-worked layout: 4 tokens, E = 3, K = 2, capacity 2 (the contract's ordering, drop and count)."""
    x = torch.arange(4.0, device=device).repeat_interleave(2).view(4, 2)  # token t's row is [t, t]
    idx = torch.tensor([[2, 0], [0, -1], [0, 2], [7, 1]], device=device)  # 7: out of range = masked
    w = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]], device=device)
    ragged = moe_ops.dispatch(x, idx, w, 3)
    # expert 0 gets (t0,k1), (t1,k0), (t2,k0); expert 1 gets (t3,k1); expert 2 gets (t0,k0), (t2,k1)
    assert ragged.recv_x[:, 0].tolist() == [0, 1, 2, 3, 0, 2]
    assert ragged.recv_weights.tolist() == pytest.approx([0.2, 0.3, 0.5, 0.8, 0.1, 0.6])
    assert ragged.tokens_per_expert.tolist() == [3, 1, 2]
    assert ragged.dropped.tolist() == [0, 0, 0]
    padded = moe_ops.dispatch(x, idx, w, 3, layout="padded", capacity=2)
    assert padded.recv_x.shape == (3, 2, 2)
    assert padded.tokens_per_expert.tolist() == [2, 1, 2] and padded.dropped.tolist() == [1, 0, 0]
    assert padded.recv_x[0, :, 0].tolist() == [0, 1] and padded.recv_x[2, :, 0].tolist() == [0, 2]
    assert padded.recv_weights.flatten().tolist() == pytest.approx([0.2, 0.3, 0.8, 0.0, 0.1, 0.6])
    # combine with expert_out = recv_x: token 2 lost its expert-0 route to the drop
    out = moe_ops.combine(padded.recv_x.clone(), padded)
    assert out[:, 0].tolist() == pytest.approx([0.0 * 0.3, 1 * 0.3, 2 * 0.6, 3 * 0.8])


def test_capacity_drops_are_earliest_tokens_first() -> None:
    """All 10 tokens to expert 1, capacity 4: tokens 0..3 are kept, 6 routes dropped and counted."""
    x = torch.randn(10, 8)
    idx = torch.full((10, 1), 1)
    d = moe_ops.dispatch(x, idx, torch.ones(10, 1), 2, layout="padded", capacity=4)
    assert d.tokens_per_expert.tolist() == [0, 4] and d.dropped.tolist() == [0, 6]
    assert torch.equal(d.recv_x[1], x[:4])
    out = moe_ops.combine(d.recv_x.clone(), d)
    assert torch.equal(out[:4], x[:4]) and torch.equal(out[4:], torch.zeros(6, 8))


def test_worst_case_capacity_never_drops() -> None:
    problem = make_problem([50], 16, 4, 4, pattern="one_expert", layout="padded", max_tokens_per_rank=50)
    d = moe_ops.dispatch(*(t[0] for t in (problem.xs, problem.topk_idx, problem.topk_weights)), 4, **problem.dispatch_kwargs())
    assert d.recv_x.shape == (4, 50, 16) and d.dropped.sum() == 0 and d.tokens_per_expert.tolist() == [50, 0, 0, 0]


def test_zero_padding(device: str) -> None:
    """zero_padding=True writes zeros to every padding row (the CUDA kernels leave them unwritten otherwise)."""
    p = make_problem([40], 24, 8, 3, mask_fraction=0.2, seed=2)
    x, idx, w = (t[0].to(device) for t in (p.xs, p.topk_idx, p.topk_weights))
    d = moe_ops.dispatch(x, idx, w, 8, layout="padded", capacity=20, zero_padding=True)
    rows = conformance.valid_rows(d.tokens_per_expert.cpu(), 20)
    assert (~rows).any() and torch.equal(d.recv_x.cpu()[~rows], torch.zeros_like(d.recv_x.cpu()[~rows]))


def test_placement_worked_example(device: str) -> None:
    """log2phy then expert_map, by hand: logical ids 0..2 -> physical 3, 0, 2; this rank (W = 1) holds
    physical expert 3 as local 0, 0 as local 2 and 2 as local 1 (expert 1 is held nowhere: masked)."""
    x = torch.arange(3.0, device=device).repeat_interleave(2).view(3, 2)
    idx = torch.tensor([[0, 1], [2, -1], [1, 2]], device=device)  # logical ids
    w = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], device=device)
    log2phy = torch.tensor([3, 0, 2], device=device)
    expert_map = torch.tensor([[2, -1, 1, 0]], device=device)
    d = moe_ops.dispatch(x, idx, w, 4, expert_map=expert_map, log2phy=log2phy)
    # local 0 (physical 3 = logical 0): token 0; local 1 (physical 2 = logical 2): tokens 1, 2;
    # local 2 (physical 0 = logical 1): tokens 0, 2; local 3: none.
    assert d.tokens_per_expert.tolist() == [1, 2, 2, 0]
    assert d.recv_x[:, 0].tolist() == [0, 1, 2, 0, 2]
    assert d.recv_weights.tolist() == pytest.approx([0.1, 0.3, 0.6, 0.2, 0.5])


@pytest.mark.parametrize("layout", ["ragged", "bounded", "padded"])
def test_non_finite_rows_stay_with_their_token(device: str, layout: str) -> None:
    """An expert row of inf (an overflow) reaches only the token it came from, and garbage in padding rows
    (NaN here) reaches none: combine and dispatch's backward read nothing for masked, dropped or padding
    routes, and combine's backward gives padding rows a zero weight gradient. (The plain path once
    multiplied the row it gathered in a masked route's place by zero: inf * 0 = NaN in another token.)"""
    torch.manual_seed(0)
    tokens, hidden, experts, top_k = 6, 4, 4, 2
    x = torch.randn(tokens, hidden, device=device)
    w, idx = torch.topk(torch.rand(tokens, experts, device=device), top_k)
    idx[3, 1] = -1  # token 3 has a masked route
    kw = {"ragged": {}, "bounded": dict(max_recv_rows=tokens * top_k, max_tokens_per_rank=tokens),
          "padded": dict(layout="padded", capacity=tokens, max_tokens_per_rank=tokens)}[layout]
    d = moe_ops.dispatch(x, idx, w, experts, **kw)
    rows = d.recv_x.detach().clone().reshape(-1, hidden)
    sources = d.handle[2].reshape(-1)  # each layout row's flat route, -1 on padding rows
    first = int((sources >= 0).nonzero()[0])
    owner = int(sources[first]) // top_k
    rows[first] = float("inf")
    rows[sources < 0] = float("nan")
    assert layout == "ragged" or bool((sources < 0).any()), "the layout must have padding rows to test"
    rows = rows.view_as(d.recv_x)
    others = [t for t in range(tokens) if t != owner]
    out = torch.ops.moe.combine(rows, d.recv_weights, d.handle)
    grad_x, _ = torch.ops.moe.dispatch_backward(rows, d.recv_weights, d.handle)
    for name, y in (("combine", out), ("dispatch backward", grad_x)):
        assert torch.isfinite(y[others]).all(), f"{name}: a non-finite row leaked into another token"
        assert torch.isinf(y[owner]).all(), f"{name}: the row's own token lost it"
    _, grad_w = torch.ops.moe.combine_backward(torch.ones_like(x), rows, d.recv_weights, d.handle)
    assert torch.equal(grad_w.reshape(-1)[sources < 0], torch.zeros_like(grad_w.reshape(-1)[sources < 0]))
