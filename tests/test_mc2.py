"""The ``mc2`` backend (torch_npu's MC2 ops) on real processes over gloo, through the CPU simulator of
moe_ops/testing/npu_sim.py: the conformance suite for W = 1, 2, 3, 4 (v2 ops; v1 fallback), compiled
equals eager and opcheck (our fake shapes against the simulator's meta-shaped outputs), the arguments
each op receives in hand-worked cases, wrong marshalling that the suite must catch, int8 dispatch,
and the documented limits.

Example counts (2-core CI): Hypothesis draws EXAMPLES[W] padded problems per world size (T up to 24 per
rank, H in {1, 7, 64}, E up to 32, bf16/fp16: MC2 moves 16-bit rows only).
"""

import pytest
import torch
from hypothesis import given, settings

from moe_ops.testing import conformance, mc2_tasks
from moe_ops.testing.harness import RankFailure, World
from moe_ops.testing.problems import Problem, make_problem, problems

pytestmark = pytest.mark.multiproc

WORLD_SIZES = (1, 2, 3, 4)
EXAMPLES = {1: 8, 2: 14, 3: 10, 4: 8}
HALF = (torch.bfloat16, torch.float16)
# The fake kernel's handle shapes depend on which MC2 ops torch_npu has, which no compile cache key
# sees: the tests switch between v2 and v1 simulators, so their workers compile without caches.
NO_COMPILE_CACHES = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}


@pytest.fixture
def world(worlds):
    """``world(size, version=2, tamper=None)``: a live gloo world of ``size`` ranks with the simulator of
    MC2 ops ``version`` installed (and the marshalling ``tamper`` applied)."""

    def get(size: int, version: int = 2, tamper: object = None) -> World:
        w = worlds(size, env=NO_COMPILE_CACHES)
        w.run(mc2_tasks.install, version, tamper)
        return w

    return get


def mc2_problem(tokens: list[int], hidden: int, experts: int, top_k: int, **kw: object) -> Problem:
    """A bf16 problem in the padded layout (the only one MC2 has), bound one above the largest T by default."""
    kw.setdefault("max_tokens_per_rank", max(tokens) + 1)
    return make_problem(tokens, hidden, experts, top_k, layout="padded", dtype=torch.bfloat16, **kw)


@pytest.mark.parametrize("size", WORLD_SIZES)
def test_property(world, size: int) -> None:
    w = world(size)

    @settings(max_examples=EXAMPLES[size])
    @given(problem=problems(world_size=size, max_tokens=24, max_experts=32, hidden_sizes=(1, 7, 64), dtypes=HALF, layouts=("padded",)))
    def check(problem: Problem) -> None:
        conformance.check_world(w, problem, "mc2")

    check()


@pytest.mark.parametrize("size", [2, 3])
def test_v1_fallback(world, size: int) -> None:
    """Without the v2 ops: unpadded batches, no mask (masked routes travel and are discarded)."""
    w = world(size, version=1)
    for pattern, capacity in (("uniform", None), ("one_rank", 3), ("one_expert", 2)):
        problem = mc2_problem([9, 0, 4][:size], 16, 4 * size, 3, pattern=pattern, capacity=capacity, mask_fraction=0.3, seed=8)
        conformance.check_world(w, problem, "mc2")


@pytest.mark.parametrize("size", [2, 4])
def test_edge_cases(world, size: int) -> None:
    """No token anywhere (no MC2 call at all), one rank without tokens, everything masked, drops."""
    w = world(size)
    conformance.check_world(w, mc2_problem([0] * size, 8, 2 * size, 2, max_tokens_per_rank=0), "mc2")
    for pattern in ("all_masked", "one_expert", "one_rank"):
        conformance.check_world(w, mc2_problem([7, 0, 5, 1][:size], 8, 2 * size, 2, pattern=pattern, capacity=2, seed=4), "mc2")


@pytest.mark.parametrize(("size", "version"), [(2, 2), (3, 1)])
def test_compiled_equals_eager(world, size: int, version: int) -> None:
    """fullgraph=True, dynamic=True: our fake shapes (the v1 handle's depend on T) against the real ones."""
    problem = mc2_problem([12, 0, 5][:size], 32, 4 * size, 3, capacity=5, mask_fraction=0.2, seed=9)
    conformance.check_world(world(size, version), problem, "mc2", compiled=True)


def test_opcheck(world) -> None:
    """Fake kernels (ours, from torch_npu's meta shapes) against the real outputs, autograd registration."""
    world(2).run(conformance.opcheck_task, mc2_problem([10, 6], 16, 8, 3, capacity=4, mask_fraction=0.2, seed=2), "mc2")


# --- what each op receives, worked out by hand from the documentation ------------------------------

# Rank 0 has 3 tokens, rank 1 one (max_tokens_per_rank 3); E = 4 over W = 2 (L = 2), K = 2, H = 8.
# Rank 0: routes (0, 3), (2, masked), (masked, masked); rank 1: (1, 1): a repeat, so (1, masked).
HAND = Problem(
    xs=[torch.arange(24.0).view(3, 8).bfloat16(), torch.full((1, 8), -1.0).bfloat16()],
    topk_idx=[torch.tensor([[0, 3], [2, -1], [-1, -1]]), torch.tensor([[1, 1]])],
    topk_weights=[torch.tensor([[0.5, 0.25], [1.0, 0.75], [0.125, 0.0625]]), torch.tensor([[2.0, 4.0]])],
    num_experts=4,
    layout="padded",
    max_tokens_per_rank=3,
)
# Wire rows: 8 values, then 15 metadata bytes (key: 3; ids + 1: 2 each; float32 weights: 4 each,
# little end first), zero-padded to 32 columns. 0.5 = 0x3F000000, 0.25 = 0x3E800000,
# 2.0 = 0x40000000, 4.0 = 0x40800000.
HAND_META = {
    (0, 0): [0, 0, 0, 1, 0, 4, 0, 0, 0, 0, 63, 0, 0, 128, 62],  # rank 0 token 0: key 0, ids 0 and 3
    (1, 0): [3, 0, 0, 2, 0, 0, 0, 0, 0, 0, 64, 0, 0, 128, 64],  # rank 1 token 0: key 1 * 3 + 0, id 1 only
    (1, 2): [5, 0, 0] + [0] * 12,  # rank 1's second padding row: key 5, no route
}
# expert_ids: masked slots take the row's first unused experts; v2 pads rank 1 to 3 rows.
HAND_IDS = {0: [[0, 3], [2, 0], [0, 1]], 1: [[1, 0], [0, 1], [0, 1]]}
HAND_MASK = {0: [[True, True], [True, False], [False, False]], 1: [[True, False], [False, False], [False, False]]}


def _shared(rank: int, group: str, global_bs: int) -> dict[str, object]:
    """The scalar arguments dispatch and combine both receive."""
    return dict(group_ep="sim-hccl:" + group, ep_world_size=2, ep_rank_id=rank, moe_expert_num=4, global_bs=global_bs)


def test_v2_arguments_by_hand(world) -> None:
    w = world(2)
    group = w.run(mc2_tasks.group_name)[0]
    for rank, calls in enumerate(w.run(mc2_tasks.recorded_calls, HAND, 2)):
        assert [c.op for c in calls] == ["npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2"] * 2
        dispatch, combine = calls[0].kwargs, calls[1].kwargs
        ids, mask = torch.tensor(HAND_IDS[rank], dtype=torch.int32), torch.tensor(HAND_MASK[rank])
        shared = _shared(rank, group, global_bs=0)
        assert {k: dispatch[k] for k in shared} == shared and {k: combine[k] for k in shared} == shared
        assert dispatch["quant_mode"] == 0 and dispatch["expert_token_nums_type"] == 0
        assert torch.equal(dispatch["expert_ids"], ids) and torch.equal(dispatch["x_active_mask"], mask)
        x = dispatch["x"]
        assert x.shape == (3, 32) and x.dtype == torch.bfloat16
        assert torch.equal(x[: HAND.xs[rank].shape[0], :8], HAND.xs[rank]) and not x[:, 23:].any()
        for (r, row), meta in HAND_META.items():
            if r == rank:
                assert x[row, 8:23].tolist() == meta, (rank, row)
        # combine: rows back in expand_x's order (A = BS W min(L, K) = 12), weights already applied
        assert combine["expand_x"].shape == (12, 32) and torch.equal(combine["expert_scales"], torch.ones(3, 2))
        assert torch.equal(combine["expert_ids"], ids) and torch.equal(combine["x_active_mask"], mask)
        assert combine["assist_info_for_combine"].shape == (12 * 128,) and combine["ep_send_counts"].shape == (4,)
        assert combine["tp_send_counts"].shape == (0,)
        # backward: combine's is a dispatch of the output gradient; dispatch's a combine with 2K more columns
        assert calls[2].kwargs["x"].shape == (3, 32) and calls[3].kwargs["expand_x"].shape == (12, 32)


def test_v1_arguments_by_hand(world) -> None:
    w = world(2, version=1)
    group = w.run(mc2_tasks.group_name)[0]
    for rank, calls in enumerate(w.run(mc2_tasks.recorded_calls, HAND, 1)):
        assert [c.op for c in calls] == ["npu_moe_distribute_dispatch", "npu_moe_distribute_combine"] * 2
        dispatch, combine = calls[0].kwargs, calls[1].kwargs
        batch = HAND.xs[rank].shape[0]  # v1 sends each rank's own batch, global_bs = Tmax W, no mask
        shared = dict(_shared(rank, group, global_bs=3 * 2), x_active_mask=None)
        assert {k: dispatch[k] for k in shared} == shared and {k: combine[k] for k in shared} == shared
        assert torch.equal(dispatch["expert_ids"], torch.tensor(HAND_IDS[rank][:batch], dtype=torch.int32))
        assert dispatch["x"].shape == (batch, 32) and combine["expand_idx"].shape == (batch * 2,)
        assert combine["expand_x"].shape == (12, 32)


# --- wrong marshalling must fail ---------------------------------------------------------------------

WRONG = [
    (mc2_tasks.short_global_bs, 2, "global_bs"),  # the simulator rejects it, as the op must
    (mc2_tasks.zero_global_bs, 1, "global_bs=0"),
    (mc2_tasks.drop_first_route, 2, None),  # a silently lost route: only the conformance check sees it
    (mc2_tasks.counts_not_cumsum, 2, None),  # counts read as a cumulative sum: rows land at wrong experts
]


@pytest.mark.parametrize(("tamper", "version", "message"), WRONG, ids=lambda v: getattr(v, "__name__", str(v)))
def test_wrong_marshalling_fails(world, tamper: object, version: int, message: str | None) -> None:
    problem = mc2_problem([6, 2, 5], 16, 6, 2, seed=11)
    w = world(3, version, tamper)
    if message is None:
        with pytest.raises(AssertionError):
            conformance.check_world(w, problem, "mc2")
    else:
        with pytest.raises(RankFailure, match=message):
            conformance.check_world(w, problem, "mc2")


def test_handle_of_another_dispatch_fails(world) -> None:
    """Combining with the handle of an earlier dispatch: its first use is right, the next one caught."""
    w = world(2, tamper=mc2_tasks.StaleHandle())
    conformance.check_world(w, mc2_problem([6, 3], 16, 4, 2, seed=1), "mc2")
    with pytest.raises(RankFailure, match="not the handle of one npu_moe_distribute_dispatch_v2"):
        conformance.check_world(w, mc2_problem([2, 5], 16, 4, 2, seed=2), "mc2")


# --- int8 dispatch, limits ---------------------------------------------------------------------------


def test_int8_dispatch_is_close(world) -> None:
    """``mc2_int8``: the layout, counts and weights exact; rows within int8 rounding of each token's scale."""
    problem = mc2_problem([10, 4], 64, 8, 3, capacity=5, mask_fraction=0.2, seed=3)
    ref = conformance.expected(problem)[0]
    for rank, (recv_x, recv_w, counts, dropped) in enumerate(world(2).run(mc2_tasks.int8_rows, problem)):
        r = ref[rank]
        assert torch.equal(counts, r.tokens_per_expert) and torch.equal(dropped, r.dropped) and torch.equal(recv_w, r.recv_weights)
        rows = conformance.valid_rows(counts, 5)
        scale = r.recv_x[rows].float().abs().amax(dim=1, keepdim=True)
        assert rows.any() and bool(((recv_x[rows].float() - r.recv_x[rows].float()).abs() <= scale / 127).all())


def test_documented_limits_fail_before_any_call(world) -> None:
    """Under Atlas A3's limits H = 16 is out of range: every rank raises the same error, no op runs."""
    outcomes = world(2).run(mc2_tasks.under_soc_limits, mc2_problem([4, 4], 16, 4, 2), "A3")
    assert all(calls == 0 for _, calls in outcomes) and len({m for m, _ in outcomes}) == 1
    assert "hidden size on the wire 32 outside [1024, 8192]" in outcomes[0][0]
