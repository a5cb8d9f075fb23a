"""The ``mc2`` backend (torch_npu's MC2 ops) on real processes over gloo, through the CPU simulator of
moe_ops/testing/sim/torch_npu: the conformance suite, compiled equals eager and opcheck (our fake shapes
against the simulator's meta-shaped outputs), the arguments each op receives in a hand-worked case,
wrong marshalling that the suite must catch, int8 dispatch, and the SoC's limits.

Shapes are ones the real ops take. The simulator reports Atlas A3 unless told A2, and both it and the
backend apply that SoC's limits: on A3, dispatch_v2 rows of 1024…8192 columns on the wire (H = 1000 or
1500 here, plus the row's metadata) and W ≥ 2, so the suite runs at W = 2, 3, 4. What needs more ranks
runs once at W = 8, a world made for this module only: A2 (whose tiling takes EP sizes that are multiples
of 8), with dispatch_v2 in its fullmesh and hierarchy modes and v1, and A3's v1 (W in 8, 16, …, rows of
7168 columns). Not run: v1 compiled (every one of 8 ranks would compile, too slow for CI; the v1 fake
shapes are the v2 ones but for the v1 handle, covered by the W = 8 runs' handle checks in eager mode),
and A2 or v1 below W = 8 other than their refusal.

Both layouts MC2 takes (padded, and ragged bounded by ``max_recv_rows``) run through every test of the
suite below. Example counts (2-core CI): Hypothesis draws EXAMPLES[W] problems per world size (T up to 24
per rank, E up to 32, bf16/fp16: MC2 moves 16-bit rows only).
"""

import re

import pytest
import torch
from hypothesis import given, settings

from moe_ops import quant
from moe_ops.testing import conformance, mc2_tasks, quantized
from moe_ops.testing.harness import RankFailure, World
from moe_ops.testing.problems import Problem, make_problem, problems
from moe_ops.testing.sim.torch_npu import mc2 as mc2_sim

pytestmark = pytest.mark.multiproc

WORLD_SIZES = (2, 3, 4)
EXAMPLES = {2: 14, 3: 10, 4: 8}
QUANTIZED_EXAMPLES = {2: 6, 3: 4, 4: 3}
HALF = (torch.bfloat16, torch.float16)
HIDDEN = 1000  # 1000 + the metadata columns: 1024…1056 on the wire (A3: 1024…8192)
# The fake kernel's handle shapes depend on which MC2 ops torch_npu has, which no compile cache key
# sees: the tests switch between v2 and v1 simulators, so their workers compile without caches.
NO_COMPILE_CACHES = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
HIERARCHY = {"HCCL_INTRA_PCIE_ENABLE": "1", "HCCL_INTRA_ROCE_ENABLE": "0"}  # A2's hierarchy algorithm


@pytest.fixture
def world(worlds):
    """``world(size, version=2, tamper=None, soc="A3")``: a live gloo world of ``size`` ranks with the
    simulator of MC2 ops ``version`` on ``soc`` installed (and the marshalling ``tamper`` applied)."""

    def get(size: int, version: int = 2, tamper: object = None, soc: str = "A3") -> World:
        w = worlds(size, env=NO_COMPILE_CACHES)
        w.run(mc2_tasks.install, version, tamper, soc)
        return w

    return get


@pytest.fixture(scope="module")
def eight():
    """A world of 8 ranks for this module's tests that need them (closed after the module)."""
    with World(8, env=NO_COMPILE_CACHES) as w:
        yield w


def mc2_problem(tokens: list[int], hidden: int, experts: int, top_k: int, max_recv_rows: int | None = None, **kw: object) -> Problem:
    """A bf16 problem in the padded layout, or (``max_recv_rows``) the bounded one, bound one above the
    largest T by default."""
    kw.setdefault("max_tokens_per_rank", max(tokens) + 1)
    layout = "padded" if max_recv_rows is None else "ragged"
    return make_problem(tokens, hidden, experts, top_k, layout=layout, max_recv_rows=max_recv_rows, dtype=torch.bfloat16, **kw)


@pytest.mark.parametrize("size", WORLD_SIZES)
def test_property(world, size: int) -> None:
    w = world(size)

    @settings(max_examples=EXAMPLES[size])
    @given(problem=problems(world_size=size, max_tokens=24, max_experts=32, hidden_sizes=(HIDDEN, 1500), dtypes=HALF, layouts=("padded", "bounded")))
    def check(problem: Problem) -> None:
        conformance.check_world(w, problem, "mc2")

    check()


@pytest.mark.parametrize(("size", "layout"), [(2, "padded"), (4, "padded"), (2, "bounded")])
def test_edge_cases(world, size: int, layout: str) -> None:
    """No token anywhere (no MC2 call at all), one rank without tokens, everything masked (combine_v2
    leaves those tokens' rows unwritten: NaN in the simulator, zeros from the backend), drops (capacity 2;
    bounded: 5 rows, and 8 rows in groups of 4)."""
    w = world(size)
    static = [dict(capacity=2)] if layout == "padded" else [dict(max_recv_rows=5), dict(max_recv_rows=8, pad_multiple=4)]
    for kw in static:
        empty = {k: v for k, v in kw.items() if k != "capacity"}
        conformance.check_world(w, mc2_problem([0] * size, HIDDEN, 2 * size, 2, max_tokens_per_rank=0, **empty), "mc2")
        for pattern in ("all_masked", "one_expert", "one_rank"):
            conformance.check_world(w, mc2_problem([7, 0, 5, 1][:size], HIDDEN, 2 * size, 2, pattern=pattern, seed=4, **kw), "mc2")


def test_combine_v2_leaves_tokens_without_routes_unwritten(world) -> None:
    """combine_v2 writes only the rows of tokens with an active route (into an uninitialised output): the
    simulator leaves the others NaN, and the backend returns zeros there."""
    problem = mc2_problem([5, 3], HIDDEN, 4, 2, pattern="all_masked", seed=3)
    for raw, out in world(2).run(mc2_tasks.raw_combine, problem):
        assert bool(raw.isnan().all()) and not out.any(), (raw, out)


STATIC = {"padded": dict(capacity=5), "bounded": dict(max_recv_rows=24, pad_multiple=2)}


@pytest.mark.parametrize("layout", STATIC)
def test_compiled_equals_eager(world, layout: str) -> None:
    """fullgraph=True, dynamic=True: our fake shapes against the real ones (v2, A3, W = 2)."""
    problem = mc2_problem([12, 5], HIDDEN, 8, 3, mask_fraction=0.2, seed=9, **STATIC[layout])
    conformance.check_world(world(2), problem, "mc2", compiled=True)


@pytest.mark.parametrize("layout", STATIC)
def test_opcheck(world, layout: str) -> None:
    """Fake kernels (ours, from torch_npu's meta shapes) against the real outputs, autograd registration."""
    world(2).run(conformance.opcheck_task, mc2_problem([10, 6], HIDDEN, 8, 3, mask_fraction=0.2, seed=2, **STATIC[layout]), "mc2")


# --- eight ranks: A2, and v1 -------------------------------------------------------------------------

EIGHT_TOKENS = [3, 0, 2, 1, 3, 2, 0, 1]
EIGHT = [  # (soc, version, environment, hidden): A3's v1 takes rows of exactly 7168 columns
    ("A2", 2, {}, 16),
    ("A2", 2, HIERARCHY, 16),
    ("A2", 1, {}, 16),
    ("A3", 1, {}, 7150),
]


@pytest.mark.parametrize(("soc", "version", "env", "hidden"), EIGHT, ids=["A2-v2", "A2-v2-hierarchy", "A2-v1", "A3-v1"])
def test_eight_ranks(eight, soc: str, version: int, env: dict, hidden: int) -> None:
    """The conformance suite on a small problem (masked routes included), and what the ops received: A2's
    dispatch_v2 gets a 1-D token mask (its tiling takes no other) and, in hierarchy mode, expert_scales,
    whose expand_scales combine gets back; v1 each rank's own batch, global_bs = Tmax W and no mask."""
    problem = mc2_problem(EIGHT_TOKENS, hidden, 16, 2, mask_fraction=0.3, seed=5)
    eight.run(mc2_tasks.install, version, None, soc)
    conformance.check_world(eight, problem, "mc2", False, mc2_tasks.rank_task, env)
    for rank, (calls, _) in enumerate(eight.run(mc2_tasks.recorded_calls, problem, version, soc, env)):
        dispatch, combine = calls[0].kwargs, calls[1].kwargs
        if version == 1:
            batch = max(EIGHT_TOKENS[rank], 1)
            assert dispatch["x_active_mask"] is None and dispatch["global_bs"] == 4 * 8 and dispatch["x"].shape[0] == batch
            continue
        assert torch.equal(dispatch["x_active_mask"], torch.arange(4) < EIGHT_TOKENS[rank])
        assert torch.equal(combine["x_active_mask"], dispatch["x_active_mask"])
        hierarchy = bool(env)
        assert (dispatch["expert_scales"] is not None) == hierarchy and (combine["expand_scales"] is not None) == hierarchy


def test_zero_global_bs_with_unequal_batches_fails(eight) -> None:
    """v1 sends each rank's own batch: ``global_bs = 0`` there is refused (the simulator, as the tiling)."""
    eight.run(mc2_tasks.install, 1, mc2_tasks.zero_global_bs, "A2")
    with pytest.raises(RankFailure, match="global_bs=0"):
        conformance.check_world(eight, mc2_problem(EIGHT_TOKENS, 16, 16, 2, seed=6), "mc2")


@pytest.mark.parametrize(("tamper", "env", "message"), [
    (mc2_tasks.route_mask, {}, "needs to be one-dimensional"),
    (mc2_tasks.no_expert_scales, HIERARCHY, "expertScales is null"),
], ids=["2-D mask", "no expert_scales"])
def test_simulator_enforces_a2_rules(eight, tamper: object, env: dict, message: str) -> None:
    """A2's tiling takes a 1-D mask only and, in hierarchy mode, requires expert_scales: the simulator
    refuses the calls that break them."""
    eight.run(mc2_tasks.install, 2, tamper, "A2")
    with pytest.raises(RankFailure, match=message):
        conformance.check_world(eight, mc2_problem(EIGHT_TOKENS, 16, 16, 2, seed=7), "mc2", False, mc2_tasks.rank_task, env)


# --- what each op receives, worked out by hand from the documentation ------------------------------

# Rank 0 has 3 tokens, rank 1 one (max_tokens_per_rank 3); E = 4 over W = 2 (L = 2), K = 2, H = 1010.
# Rank 0: routes (0, 3), (2, masked), (masked, masked); rank 1: (1, 1): a repeat, so (1, masked).
HAND = Problem(
    xs=[torch.arange(3030.0).view(3, 1010).bfloat16(), torch.full((1, 1010), -1.0).bfloat16()],
    topk_idx=[torch.tensor([[0, 3], [2, -1], [-1, -1]]), torch.tensor([[1, 1]])],
    topk_weights=[torch.tensor([[0.5, 0.25], [1.0, 0.75], [0.125, 0.0625]]), torch.tensor([[2.0, 4.0]])],
    num_experts=4,
    layout="padded",
    max_tokens_per_rank=3,
)
# Wire rows: 1010 values, then 15 metadata bytes (key: 3; ids + 1: 2 each; float32 weights: 4 each,
# little end first), zero-padded to 1056 columns (a multiple of 32); combine's rows are padded to 1056
# too (not to 1024 = Align32(1010)). 0.5 = 0x3F000000, 0.25 = 0x3E800000,
# 2.0 = 0x40000000, 4.0 = 0x40800000.
HAND_META = {
    (0, 0): [0, 0, 0, 1, 0, 4, 0, 0, 0, 0, 63, 0, 0, 128, 62],  # rank 0 token 0: key 0, ids 0 and 3
    (1, 0): [3, 0, 0, 2, 0, 0, 0, 0, 0, 0, 64, 0, 0, 128, 64],  # rank 1 token 0: key 1 * 3 + 0, id 1 only
    (1, 2): [5, 0, 0] + [0] * 12,  # rank 1's second padding row: key 5, no route
}
# expert_ids: masked slots take the row's first unused experts; v2 pads rank 1 to 3 rows.
HAND_IDS = {0: [[0, 3], [2, 0], [0, 1]], 1: [[1, 0], [0, 1], [0, 1]]}
HAND_MASK = {0: [[True, True], [True, False], [False, False]], 1: [[True, False], [False, False], [False, False]]}


def test_v2_arguments_by_hand(world) -> None:
    """A3, v2: the 2-D route mask, the wire rows, combine's rows as wide as dispatch's, and ``group_ep`` a
    group of the same ranks made for the MC2 ops alone (CANN allows no other operator on it; the ops'
    agreement runs on the caller's group)."""
    w = world(2)
    callers_group = "sim-hccl:" + w.run(mc2_tasks.group_name)[0]
    for rank, (calls, ranks) in enumerate(w.run(mc2_tasks.recorded_calls, HAND, 2)):
        assert [c.op for c in calls] == ["npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2"] * 2
        dispatch, combine = calls[0].kwargs, calls[1].kwargs
        ids, mask = torch.tensor(HAND_IDS[rank], dtype=torch.int32), torch.tensor(HAND_MASK[rank])
        assert ranks == [0, 1] and dispatch["group_ep"] != callers_group
        shared = dict(group_ep=dispatch["group_ep"], ep_world_size=2, ep_rank_id=rank, moe_expert_num=4, global_bs=0)
        assert {k: dispatch[k] for k in shared} == shared and {k: combine[k] for k in shared} == shared
        assert dispatch["quant_mode"] == 0 and dispatch["expert_token_nums_type"] == 0 and dispatch["expert_scales"] is None
        assert torch.equal(dispatch["expert_ids"], ids) and torch.equal(dispatch["x_active_mask"], mask)
        x = dispatch["x"]
        assert x.shape == (3, 1056) and x.dtype == torch.bfloat16
        assert torch.equal(x[: HAND.xs[rank].shape[0], :1010], HAND.xs[rank]) and not x[:, 1025:].any()
        for (r, row), meta in HAND_META.items():
            if r == rank:
                assert x[row, 1010:1025].tolist() == meta, (rank, row)
        # combine: rows back in expand_x's order (A = BS W min(L, K) = 12), as wide as the dispatch's, weights applied
        assert combine["expand_x"].shape == (12, 1056) and torch.equal(combine["expert_scales"], torch.ones(3, 2))
        assert torch.equal(combine["expert_ids"], ids) and torch.equal(combine["x_active_mask"], mask)
        assert combine["assist_info_for_combine"].shape == (12 * 128,) and combine["ep_send_counts"].shape == (4,)
        assert combine["tp_send_counts"].shape == (0,) and combine["expand_scales"] is None
        # backward: combine's is a dispatch of the output gradient; dispatch's a combine of rows as wide as the dispatch's
        assert calls[2].kwargs["x"].shape == (3, 1056) and calls[3].kwargs["expand_x"].shape == (12, 1056)


# --- wrong marshalling must fail ---------------------------------------------------------------------

WRONG = [
    (mc2_tasks.short_global_bs, "global_bs"),  # the simulator rejects it, as the op must
    (mc2_tasks.drop_first_route, None),  # a silently lost route: only the conformance check sees it
    (mc2_tasks.counts_not_cumsum, None),  # counts read as a cumulative sum: rows land at wrong experts
]


@pytest.mark.parametrize(("tamper", "message"), WRONG, ids=lambda v: getattr(v, "__name__", str(v)))
def test_wrong_marshalling_fails(world, tamper: object, message: str | None) -> None:
    problem = mc2_problem([6, 2, 5], HIDDEN, 6, 2, seed=11)
    w = world(3, 2, tamper)
    if message is None:
        with pytest.raises(AssertionError):
            conformance.check_world(w, problem, "mc2")
    else:
        with pytest.raises(RankFailure, match=message):
            conformance.check_world(w, problem, "mc2")


def test_handle_of_another_dispatch_gives_wrong_sums(world) -> None:
    """Combining with the ``assist_info_for_combine`` of an earlier dispatch of the same shapes. MC2
    documents that tensor as opaque and checks nothing: on hardware the rows go where it says (wrong
    sums), and so they do in the simulator; nothing in moe_ops catches it either (a handle of other
    shapes is a MoEInputError, tests/test_faults.py), only the comparison with the reference does."""
    w = world(2, tamper=mc2_tasks.StaleHandle())
    conformance.check_world(w, mc2_problem([6, 3], HIDDEN, 4, 2, seed=1), "mc2")
    with pytest.raises(AssertionError):
        conformance.check_world(w, mc2_problem([6, 3], HIDDEN, 4, 2, seed=2), "mc2")


# --- int8 dispatch, limits ---------------------------------------------------------------------------


def test_int8_dispatch_is_close(world) -> None:
    """``mc2_int8``: the layout, counts and weights exact; rows within int8 rounding of each token's scale."""
    problem = mc2_problem([10, 4], HIDDEN, 8, 3, capacity=5, mask_fraction=0.2, seed=3)
    ref = conformance.expected(problem)[0]
    for rank, (recv_x, recv_w, counts, dropped) in enumerate(world(2).run(mc2_tasks.int8_rows, problem)):
        r = ref[rank]
        assert torch.equal(counts, r.tokens_per_expert) and torch.equal(dropped, r.dropped) and torch.equal(recv_w, r.recv_weights)
        rows = conformance.valid_rows(counts, 5)
        scale = r.recv_x[rows].float().abs().amax(dim=1, keepdim=True)
        assert rows.any() and bool(((recv_x[rows].float() - r.recv_x[rows].float()).abs() <= scale / 127).all())


LIMITS = [  # (soc, version, hidden, combine's hidden, message)
    ("A3", 2, 16, None, "hidden size on the wire 32 outside [1024, 8192]"),
    ("A2", 2, 16, None, "EP size 2 not among the supported sizes 8..256 in steps of 8"),
    ("A3", 1, 7150, None, "EP size 2 not among the supported sizes [8, 16, 32, 64, 128, 144, 256, 288]"),
    ("A3", 2, HIDDEN, 1100, "combine sends 1100 columns per row, but its dispatch's rows were 1024 wide"),
]


@pytest.mark.parametrize(("soc", "version", "hidden", "combine_hidden", "message"), LIMITS)
def test_limits_fail_before_any_call(world, soc: str, version: int, hidden: int, combine_hidden: int | None, message: str) -> None:
    """Out of the SoC's limits: every rank raises the same error, before the op that breaks them runs."""
    outcomes = world(2).run(mc2_tasks.refusal, mc2_problem([4, 4], hidden, 4, 2), soc, version, combine_hidden)
    expected_ops = ["npu_moe_distribute_dispatch_v2"] if combine_hidden else []
    assert all(ops == expected_ops for _, ops in outcomes) and len({m for m, _ in outcomes}) == 1, outcomes
    assert message in outcomes[0][0], outcomes[0][0]


SIMULATED_LIMITS = [  # the same limits, met by the simulator when the backend does not check them first
    ("A3", 2, 16, "H 32 outside [1024, 8192]"),
    ("A2", 2, 16, "epWorldSize 2 not a multiple of 8"),
    ("A3", 1, 7150, "epWorldSize 2 not in [8, 16, 32, 64, 128, 144, 256, 288]"),
]


@pytest.mark.parametrize(("soc", "version", "hidden", "message"), SIMULATED_LIMITS)
def test_simulator_enforces_soc_limits(world, soc: str, version: int, hidden: int, message: str) -> None:
    with pytest.raises(RankFailure, match=re.escape(message)):
        conformance.check_world(world(2, version, None, soc), mc2_problem([4, 4], hidden, 4, 2), "mc2", False, mc2_tasks.rank_task, {}, True)


# --- quantized dispatch (moe.dispatch_quantized): MC2's quant_mode 2 rows and scales ---------------


def test_simulated_quantization_is_mc2s() -> None:
    """The simulator's quant_mode 2 (sim/torch_npu/mc2.py, dynamic_quant) against a float64 reading of the
    kernels' QuantProcess: m = 127 / amax rounded to float32, q = x * m rounded to float32 then to the
    nearest integer (ties to even), scale = 1 / m rounded to float32; and moe_ops' int8 rounding
    (moe_ops.quant, defined as this arithmetic) equal to it wherever max |x| >= 1e-4, the floor MC2 lacks.
    By hand: 1.3671875 = amax / 2 is 63.5 * (1 + e) here, 64 (a quotient x / (amax / 127) would give 63).
    An all-zero row: 127 / 0 = inf, products NaN (unspecified: -128), scale 1 / inf = 0."""
    x = torch.tensor([[2.734375, 1.3671875, -0.5, 0.0], [0.0] * 4]).bfloat16()
    q, s = mc2_sim.dynamic_quant(x)
    ours, ours_s = quant.quantize(x[:1], quant.QuantSpec("int8", 0))
    assert q[0].tolist() == [127, 64, -23, 0] and torch.equal(ours[0], q[0]) and q[1].tolist() == [-128] * 4
    assert s[0].item() == (1 / torch.tensor(127 / 2.734375, dtype=torch.float32)).item() == ours_s.item() and s[1].item() == 0
    gen = torch.Generator().manual_seed(0)
    for dtype in HALF:
        x = (torch.randn(4000, 64, generator=gen) * torch.logspace(-4, 4, 4000).unsqueeze(1)).to(dtype)
        q, s = mc2_sim.dynamic_quant(x)
        amax = x.double().abs().amax(1, keepdim=True)
        m = torch.div(torch.full_like(amax, 127), amax).float().double()
        assert torch.equal(q.double(), torch.round((x.double() * m).float().double()))
        assert torch.equal(s, torch.div(torch.ones_like(m), m).float().squeeze(1))
        floored = amax.squeeze(1) >= quant.AMAX_FLOOR
        ours, ours_s = quant.quantize(x, quant.QuantSpec("int8", 0))
        assert torch.equal(ours[floored], q[floored]) and torch.equal(ours_s[floored, 0], s[floored])


def check_quantized(world: object, problem: Problem, env: dict | None = None) -> None:
    """An mc2 quantized dispatch (int8, per token) of ``problem`` on every rank: rows and scales exactly the
    reference layout of MC2's quantization of the tokens (mc2_tasks.mc2_quantize), padding rows zero,
    weights, counts and drops exact, and the router's gradient through combine equal to a bf16 dispatch's."""
    spec = mc2_tasks.INT8_PER_TOKEN
    outputs = world.run(mc2_tasks.in_environment, env or {}, quantized.rank_task, problem, spec, False, "mc2", "cpu", torch.bfloat16)
    rows, scales = quantized.expected(problem, spec, mc2_tasks.mc2_quantize)
    for rank, ours in enumerate(outputs):
        quantized.assert_rank_matches(problem, spec, rank, ours, rows[rank], scales[rank])


@pytest.mark.parametrize("size", WORLD_SIZES)
def test_quantized_property(world, size: int) -> None:
    w = world(size)

    @settings(max_examples=QUANTIZED_EXAMPLES[size])
    @given(problem=problems(world_size=size, max_tokens=24, max_experts=32, hidden_sizes=(HIDDEN, 1500), dtypes=HALF, layouts=("padded", "bounded")))
    def check(problem: Problem) -> None:
        check_quantized(w, problem)

    check()


@pytest.mark.parametrize("layout", STATIC)
def test_straight_through(world, layout: str) -> None:
    """``dequantize=True``: MC2 quantizes to int8 on the wire (its own rounding), the rows arrive
    dequantized, the backward is MC2's bf16 combine; rows and both gradients as ``moe.dispatch`` of the
    tokens MC2's rounding makes."""
    problem = mc2_problem([9, 5], HIDDEN, 8, 3, mask_fraction=0.2, seed=4, **STATIC[layout])
    outputs = world(2).run(mc2_tasks.in_environment, {}, quantized.straight_through_task, problem, mc2_tasks.INT8_PER_TOKEN, "mc2",
                           "cpu", mc2_tasks.mc2_quantize)
    quantized.assert_straight_through(outputs, problem, mc2_tasks.INT8_PER_TOKEN)


@pytest.mark.parametrize("task", [quantized.opcheck_task, quantized.compiled_task], ids=["opcheck", "compiled"])
def test_quantized_op(world, task) -> None:  # type: ignore[no-untyped-def]
    """moe.dispatch_quantized on mc2: opcheck (our fake shapes against MC2's, dequantized and quantized
    rows) and a compiled training step equal to eager (bounded layout, W = 2)."""
    problem = mc2_problem([10, 6], HIDDEN, 8, 3, mask_fraction=0.2, seed=2, **STATIC["bounded"])
    world(2).run(mc2_tasks.in_environment, {}, task, problem, mc2_tasks.INT8_PER_TOKEN, "mc2")


@pytest.mark.parametrize("layout", STATIC)
def test_quantized_zero_and_tiny_tokens(world, layout: str) -> None:
    """Tokens whose maximum is 0 or below 1e-4: the floor (MC2 alone would divide by zero), drops, masked
    routes; and MC2's own outputs past the rows it filled (uninitialised: -128 and NaN in the simulator),
    which the backend never reads."""
    problem = mc2_problem([9, 4], HIDDEN, 8, 3, mask_fraction=0.2, seed=12, **STATIC[layout])
    problem.xs[0][1] = 0
    problem.xs[1][2] *= 1e-6
    w = world(2)
    check_quantized(w, problem)
    for expand_x, dynamic_scales, filled in w.run(mc2_tasks.raw_dispatch, problem):
        assert expand_x.dtype == torch.int8 and dynamic_scales.shape == expand_x.shape[:1] and 0 < filled < expand_x.shape[0]
        assert bool((expand_x[filled:] == mc2_sim.UNWRITTEN_INT8).all()) and bool(dynamic_scales[filled:].isnan().all())
        assert bool((expand_x[:filled].abs() <= 127).all()) and not dynamic_scales[:filled].isnan().any()


QUANTIZED_EIGHT = [  # (soc, version, environment, hidden): A3's v1 rows of 7168 columns (7130 + 30 metadata, int8 digits)
    ("A2", 2, {}, 16),
    ("A2", 2, HIERARCHY, 16),
    ("A2", 1, {}, 16),
    ("A3", 1, {}, 7130),
]


@pytest.mark.parametrize(("soc", "version", "env", "hidden"), QUANTIZED_EIGHT, ids=["A2-v2", "A2-v2-hierarchy", "A2-v1", "A3-v1"])
def test_quantized_eight_ranks(eight, soc: str, version: int, env: dict, hidden: int) -> None:
    eight.run(mc2_tasks.install, version, None, soc)
    check_quantized(eight, mc2_problem(EIGHT_TOKENS, hidden, 16, 2, mask_fraction=0.3, seed=8), env)


QUANTIZED_REFUSALS = {  # what MC2 (quant_mode 0 or 2, bf16/fp16 x) cannot do
    "fp8": (dict(quant="fp8_e4m3", quant_block=0), False, "quantizes to int8 only"),
    "block scales": (dict(quant="int8"), False, "quant_block must be 0, got 128"),
    "power-of-two scales": (dict(quant="int8", quant_block=0, round_scale=True), False, "round_scale must be False"),
    "pre-quantized x": (dict(), True, "takes no pre-quantized x with x_scales"),
}


@pytest.mark.parametrize("case", QUANTIZED_REFUSALS)
def test_quantized_refusals(world, case: str) -> None:
    """Every rank raises the same MoEInputError before any MC2 op runs."""
    options, prequantize, message = QUANTIZED_REFUSALS[case]
    outcomes = world(2).run(mc2_tasks.quantized_refusal, mc2_problem([4, 4], HIDDEN, 4, 2), options, prequantize)
    assert all(ops == [] for _, ops in outcomes) and len({m for m, _ in outcomes}) == 1, outcomes
    assert message in outcomes[0][0], outcomes[0][0]


def test_vllm_adapter_with_quant(world) -> None:
    """vllm-ascend's adapter on ``mc2`` with ``with_quant=True``: MC2's int8 rows ``[L C, H]`` and their
    ``dynamic_scale [L C]`` (L = 2, C = 4), as the quantized dispatch (checked against the reference above) lays them out."""
    problem = mc2_problem([6, 3], HIDDEN, 4, 2, capacity=4, seed=13)
    for rows, scale, want_rows, want_scale in world(2).run(mc2_tasks.vllm_with_quant, problem):
        assert rows.dtype == torch.int8 and scale.shape == (8,) and torch.equal(rows, want_rows) and torch.equal(scale, want_scale)
