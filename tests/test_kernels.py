"""The Triton kernels on the CPU under TRITON_INTERPRET=1 (in worker processes started with it set),
through the same conformance suite: the local backend (W = 1) and the collective backend (W = 2)
with ``moe_ops.config.kernels = "triton"``. Shapes are small (the interpreter is slow) but cover
several route chunks, H not a multiple of the block, T = 0, int32 and int64 ids, drops, on both dispatch
paths (one launch for few routes, three launches for many).

Examples: INTERPRET_EXAMPLES Hypothesis problems per world size, plus the fixed cases below.
"""

import pytest
from hypothesis import given, settings

from moe_ops.testing import conformance
from moe_ops.testing.problems import Problem, make_problem, problems

pytestmark = pytest.mark.multiproc

INTERPRET_EXAMPLES = {1: 45, 2: 18}


@pytest.fixture
def world(interpreted_worlds):
    """``world(size)``: a gloo world whose workers run the Triton kernels interpreted."""
    return interpreted_worlds


def test_workers_run_the_interpreter(world) -> None:
    """Guard against a vacuous pass: the workers really take the Triton path, interpreted."""
    assert world(1).run(_kernel_mode) == [("triton", True, True)]


def _kernel_mode(rank: int) -> tuple[str, bool, bool]:
    import torch

    from moe_ops import config, stage
    from moe_ops.stage.kernels import layout

    return config.kernels, stage.use_triton(torch.zeros(1)), type(layout._scatter_rows).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("size", [1, 2])
def test_property(world, size: int) -> None:
    @settings(max_examples=INTERPRET_EXAMPLES[size])
    @given(problem=problems(world_size=size, max_tokens=40, max_experts=16, hidden_sizes=(1, 7, 40)))
    def check(problem: Problem) -> None:
        conformance.check_world(world(size), problem, "auto")

    check()


CASES = {
    "several chunks, ragged": dict(tokens=[70], hidden=24, experts=8, top_k=4),
    "several chunks, padded drops": dict(tokens=[70], hidden=24, experts=8, top_k=4, layout="padded", capacity=9, max_tokens_per_rank=70),
    "H over one block": dict(tokens=[3], hidden=1500, experts=4, top_k=2),
    "bins exactly a power of two": dict(tokens=[20], hidden=8, experts=7, top_k=3),
    "no tokens": dict(tokens=[0], hidden=8, experts=4, top_k=2),
    "int32 ids, out of range": dict(tokens=[30], hidden=8, experts=4, top_k=2, out_of_range=True, id_dtype="int32"),
    "many experts, prefix loops": dict(tokens=[280], hidden=4, experts=256, top_k=8),
    "bounded, drops": dict(tokens=[70], hidden=24, experts=8, top_k=4, max_recv_rows=150, max_tokens_per_rank=70),
    "bounded past the worst case": dict(tokens=[40], hidden=24, experts=8, top_k=2, max_recv_rows=200, max_tokens_per_rank=40),
    "pad_multiple 8": dict(tokens=[70], hidden=24, experts=8, top_k=4, pad_multiple=8),
    "bounded, pad_multiple 4, drops": dict(tokens=[70], hidden=24, experts=8, top_k=4, pad_multiple=4, max_recv_rows=132, max_tokens_per_rank=70),
    "no tokens, bounded, pad_multiple 2": dict(tokens=[0], hidden=8, experts=4, top_k=2, pad_multiple=2, max_recv_rows=12, max_tokens_per_rank=1),
}


@pytest.mark.parametrize("small_routes", [None, 0], ids=["default", "three launches"])
@pytest.mark.parametrize("case", CASES)
def test_cases(world, case: str, small_routes: int | None) -> None:
    """Each case on the default path (one launch up to SMALL_ROUTES routes) and on the three-launch path."""
    import torch

    kw = dict(CASES[case])
    if kw.get("id_dtype") == "int32":
        kw["id_dtype"] = torch.int32
    tokens, hidden, experts, top_k = (kw.pop(k) for k in ("tokens", "hidden", "experts", "top_k"))
    problem = make_problem(tokens, hidden, experts, top_k, mask_fraction=0.1, seed=7, **kw)
    default = world(1).run(_small_routes, small_routes)[0]
    try:
        conformance.check_world(world(1), problem, "auto")
    finally:
        world(1).run(_small_routes, default)


def _small_routes(rank: int, limit: int | None) -> int:
    """Set ``layout.SMALL_ROUTES`` to ``limit`` (if given); returns the previous value."""
    from moe_ops.stage.kernels import layout

    previous = layout.SMALL_ROUTES
    if limit is not None:
        layout.SMALL_ROUTES = limit
    return previous


#: per call: (Triton launches, host reads, at most this many allocations, at most this many other aten ops)
CALL_STRUCTURE = {
    "dispatch, ragged": (1, 1, 7, 5),
    "dispatch, ragged, pad_multiple": (1, 1, 7, 5),
    "dispatch, bounded": (1, 0, 7, 0),
    "dispatch, padded": (1, 0, 7, 0),
    "combine": (1, 0, 1, 2),
    "step, ragged": (4, 1, 12, 12),
    "step, bounded": (4, 0, 12, 8),
}


def test_call_structure(world) -> None:
    """What one call does, counted (moe_ops.testing.call_counts), not timed: one launch per op (a dispatch
    past SMALL_ROUTES routes: three, or four where the groups' starts need every expert's count), a host
    read only where the ragged layout needs its row count, and no more allocations or other aten ops
    than today (a whole-buffer fill or an extra copy fails)."""
    from moe_ops.testing.call_counts import structure_task

    counts = world(1).run(structure_task)[0]
    assert counts.keys() == CALL_STRUCTURE.keys()
    for name, (launches, reads, allocations, other) in CALL_STRUCTURE.items():
        got = counts[name]
        assert (got["launches"], got["host_reads"]) == (launches, reads), (name, got)
        assert got["allocations"] <= allocations and got["other_ops"] <= other, (name, got)
    default = world(1).run(_small_routes, 0)[0]
    try:
        many = world(1).run(structure_task)[0]
    finally:
        world(1).run(_small_routes, default)
    launches = {name: many[name]["launches"] for name in ("dispatch, padded", "dispatch, bounded")}
    assert launches == {"dispatch, padded": 3, "dispatch, bounded": 4} and many["dispatch, bounded"]["host_reads"] == 0, many


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_opcheck(world, layout: str) -> None:
    """opcheck through the Triton kernels, a batch of no tokens included (its gradients come strided)."""
    kw = dict(layout="padded", max_tokens_per_rank=9, capacity=4) if layout == "padded" else {}
    for tokens in (0, 9):
        world(1).run(conformance.opcheck_task, make_problem([tokens], 16, 4, 2, mask_fraction=0.2, seed=1, **kw), "auto")


def test_one_column_rows_of_any_stride(world) -> None:
    """``[T, 1]`` tokens count as contiguous whatever their column stride (a transposed ``[1, T]``)."""
    assert world(1).run(_one_column_dispatch) == [None]


def _one_column_dispatch(rank: int) -> None:
    import torch

    from moe_ops.plan import RowLayout
    from moe_ops.stage import plain
    from moe_ops.stage.kernels import layout

    x = torch.randn(1, 30).t()
    assert x.is_contiguous() and x.stride(1) != 1
    ids, weights = torch.randint(-1, 4, (30, 2)), torch.rand(30, 2)
    expected = plain.expand(x, weights, plain.expert_layout(ids, 4, RowLayout("ragged")).row_src)[0]
    default = layout.SMALL_ROUTES
    try:
        for limit in (default, 0):  # one launch, three launches
            layout.SMALL_ROUTES = limit
            assert torch.equal(layout.dispatch_rows(x, weights, ids, 4, RowLayout("ragged"))[0], expected)
    finally:
        layout.SMALL_ROUTES = default
