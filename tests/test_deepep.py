"""The DeepEP backends (``deepep``: normal mode; ``deepep_ll``: low-latency mode) on real processes over
gloo, talking to :mod:`moe_ops.testing.deepep_sim` (a CPU simulator of DeepEP's documented behaviour,
installed as ``deep_ep`` in the workers only): the conformance suite, compiled equals eager, DeepEP's
limits as clear errors, the buffer's life cycle, and deliberate mapping mistakes that must be caught.

Group sizes: ``deepep`` runs DeepEP's intranode normal kernels, built for 2, 4 and 8 ranks, so it is
checked at W = 2 and 4 (ragged, padded, and ragged bounded by ``max_recv_rows``, the two static ones through
DeepEP's ``num_worst_tokens``) and must refuse W = 1 and 3; ``deepep_ll`` (padded only) at
W = 1…4. Shapes are ones DeepEP takes: bf16 tokens; normal-mode hidden sizes multiples of 16 (its
intranode dispatch's TMA staging); low-latency hidden sizes from DeepEP's compiled list (2048, 3072) and
``W * max_tokens_per_rank`` a multiple of 4. Every world call installs a fresh simulator, i.e. a fresh
simulated process (NVSHMEM is initialised once per process), so each test makes its own buffers.

Example counts (2-core CI): Hypothesis draws EXAMPLES[W] problems per world size and mode (T up to 24
per rank, 16 in low-latency mode; E up to 32); the Triton local stage (interpreted) gets one problem per mode; compiled runs,
the slowest part (every rank compiles), one fixed problem per mode at W = 2.
"""

import functools
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings

from moe_ops import MoEInputError, quant
from moe_ops.backends.deepep.runtime import low_latency_token_multiple
from moe_ops.testing import conformance, deepep_tasks, quantized, sim
from moe_ops.testing.harness import RankFailure, set_up
from moe_ops.testing.problems import Problem, make_problem, padded, problems

pytestmark = pytest.mark.multiproc

INSTALL = functools.partial(sim.install_on_rank, name="deep_ep")
NORMAL_SIZES = (2, 4)
LOW_LATENCY_SIZES = (1, 2, 3, 4)
EXAMPLES = {1: 4, 2: 6, 3: 4, 4: 4}
NORMAL_HIDDEN = (16, 64, 128)
LL_HIDDEN = 2048
LL_BOUND = 16  # max_tokens_per_rank of the fixed low-latency problems: W * 16 is a multiple of 4 at any W


@pytest.fixture
def world(worlds):
    """``world(size)``: a live gloo world of ``size`` ranks with the simulator installed."""
    return set_up(worlds, INSTALL)


def bf16_problem(tokens: list[int], hidden: int, num_experts: int, top_k: int, **kw: object) -> Problem:
    return make_problem(tokens, hidden, num_experts, top_k, dtype=torch.bfloat16, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", NORMAL_SIZES)
def test_normal_property(world, size: int) -> None:
    @settings(max_examples=EXAMPLES[size])
    @given(problem=problems(size, max_tokens=24, max_experts=32, hidden_sizes=NORMAL_HIDDEN, dtypes=(torch.bfloat16,), layouts=("ragged", "padded", "bounded")))
    def check(problem: Problem) -> None:
        conformance.check_world(world(size), problem, "deepep")

    check()


@pytest.mark.parametrize("size", LOW_LATENCY_SIZES)
def test_low_latency_property(world, size: int) -> None:
    @settings(max_examples=EXAMPLES[size])
    @given(problem=problems(size, max_tokens=16, max_experts=32, hidden_sizes=(LL_HIDDEN, 3072), dtypes=(torch.bfloat16,),
                            layouts=("padded",), bound_multiple=low_latency_token_multiple(size)))
    def check(problem: Problem) -> None:
        conformance.check_world(world(size), problem, "deepep_ll")

    check()


EDGE_CASES = [("deepep", size, layout) for size in NORMAL_SIZES for layout in ("ragged", "padded")] + [
    ("deepep", 2, "bounded")
] + [("deepep_ll", size, "padded") for size in LOW_LATENCY_SIZES]


def _static(layout: str, max_tokens_per_rank: int, capacity: int | None, max_recv_rows: int) -> dict[str, object]:
    """The keyword arguments of ``layout``'s fixed problems: padded with a capacity, bounded by
    ``max_recv_rows`` (fewer rows than some routes need: the bound drops), ragged none."""
    if layout == "padded":
        return padded(max_tokens_per_rank, capacity)
    if layout == "bounded":
        return dict(max_tokens_per_rank=max_tokens_per_rank, max_recv_rows=max_recv_rows)
    return {}


@pytest.mark.parametrize(("backend", "size", "layout"), EDGE_CASES)
def test_edge_cases(world, backend: str, size: int, layout: str) -> None:
    """A rank with no tokens, everything to one rank's experts or one expert, all masked; capacity 3
    drops in the padded layout (DeepEP's low-latency arrival order must not decide which), 10 rows in
    the bounded one."""
    hidden = LL_HIDDEN if backend == "deepep_ll" else 16
    tokens = [13, 0, 9, 1][:size]
    kw = _static(layout, LL_BOUND, 3, 10)
    for pattern in ("one_rank", "one_expert", "all_masked", "uniform"):
        problem = bf16_problem(tokens, hidden, 4 * size, 2, pattern=pattern, mask_fraction=0.3, seed=3, **kw)
        conformance.check_world(world(size), problem, backend)


@pytest.mark.parametrize(("backend", "layout"), [("deepep", "ragged"), ("deepep", "padded"), ("deepep_ll", "padded")])
def test_triton_local_stage(interpreted_worlds, backend: str, layout: str) -> None:
    """The Triton kernels of the local stage (what CUDA runs) on DeepEP's outputs, garbage rows included."""
    kw = padded(12, 3) if layout == "padded" else {}
    problem = bf16_problem([12, 5], LL_HIDDEN if backend == "deepep_ll" else 16, 8, 3, mask_fraction=0.2, seed=2, **kw)
    conformance.check_world(set_up(interpreted_worlds, INSTALL)(2), problem, backend)


COMPILED = [("deepep", 2, "ragged"), ("deepep", 2, "padded"), ("deepep", 2, "bounded"), ("deepep_ll", 2, "padded")]


@pytest.mark.parametrize(("backend", "size", "layout"), COMPILED)
def test_compiled_equals_eager(world, backend: str, size: int, layout: str) -> None:
    hidden = LL_HIDDEN if backend == "deepep_ll" else 32
    kw = _static(layout, 12, 5, 24)
    problem = bf16_problem([12, 0, 9, 7][:size], hidden, 4 * size, 3, mask_fraction=0.2, seed=9, **kw)
    conformance.check_world(world(size), problem, backend, compiled=True)


OPCHECKS = [("deepep", "ragged"), ("deepep", "padded"), ("deepep", "bounded"), ("deepep_ll", "padded")]


@pytest.mark.parametrize(("backend", "layout"), OPCHECKS)
def test_opcheck(world, backend: str, layout: str) -> None:
    """Fake kernels against real ones (shapes, dtypes and strides of every output, handle included).
    The low-latency handle holds DeepEP's arrival-order ``src_info`` and ``layout_range``, which differ
    from call to call by design, so its dispatch skips opcheck's check that two runs return equal tensors."""
    hidden = LL_HIDDEN if backend == "deepep_ll" else 16
    kw = _static(layout, 20, 5, 40)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor") if backend == "deepep_ll" else None
    problem = bf16_problem([20, 9], hidden, 8, 3, mask_fraction=0.2, seed=2, **kw)
    world(2).run(conformance.opcheck_task, problem, backend, checks)


def _errors(world, size: int, problem: Problem, backend: str) -> list[str]:  # type: ignore[no-untyped-def]
    outcomes = world(size).outcomes(conformance.rank_task, problem, backend, False, timeout=60)
    assert all(o.error_type == "MoEInputError" for o in outcomes), [(o.rank, o.error_type, o.message) for o in outcomes]
    return [o.message for o in outcomes]


@pytest.mark.parametrize("size", [1, 3])
def test_normal_mode_refuses_group_sizes_deepep_lacks(world, size: int) -> None:
    for message in _errors(world, size, bf16_problem([6, 3, 2][:size], 16, 3 * size, 2, seed=1), "deepep"):
        assert "built for groups of 2, 4, 8 ranks" in message, message


LIMITS = [
    ("deepep", dict(hidden=16, dtype=torch.float32), "must be bfloat16"),
    ("deepep", dict(hidden=24), "multiple of 16 of at most 8184"),
    ("deepep", dict(hidden=8192), "multiple of 16 of at most 8184"),
    ("deepep", dict(hidden=16, top_k=12), "at most 11"),
    ("deepep_ll", dict(hidden=64, **padded(8, None)), "low-latency kernels take 2048, 2560, 3072"),
    ("deepep_ll", dict(hidden=LL_HIDDEN, **padded(7, None)), "multiple of 4"),
    ("deepep_ll", dict(hidden=LL_HIDDEN, **padded(512, None)), "NVSHMEM_QP_DEPTH (1024)"),
    ("deepep_ll", dict(hidden=LL_HIDDEN, top_k=12, **padded(8, None)), "at most 11"),
]


@pytest.mark.parametrize(("backend", "kw", "expected"), LIMITS)
def test_deepep_limits_raise_clear_errors_on_every_rank(world, backend: str, kw: dict, expected: str) -> None:
    kw = {"dtype": torch.bfloat16, "top_k": 2} | kw
    problem = make_problem([6, 4], kw.pop("hidden"), 24, kw.pop("top_k"), seed=2, **kw)
    messages = _errors(world, 2, problem, backend)
    assert len(set(messages)) == 1 and expected in messages[0], messages
    conformance.check_world(world(2), bf16_problem([6, 4], LL_HIDDEN, 4, 2, seed=2, **padded(6, None)), "deepep_ll")


SIMULATED_LIMITS = [  # the same limits, met by the simulator when the backend does not check them first
    ("deepep", 24, {}, "TMA staging buffer"),
    ("deepep", 8192, {}, "TMA staging buffer"),
    ("deepep_ll", 64, padded(8, None), "not one the kernels are built for"),
    ("deepep_ll", LL_HIDDEN, padded(7, None), "multiple of 4"),
    ("deepep_ll", LL_HIDDEN, padded(512, None), "NVSHMEM_QP_DEPTH 1024 < (Tmax + 1) * 2"),
]


@pytest.mark.parametrize(("backend", "hidden", "kw", "expected"), SIMULATED_LIMITS)
def test_simulator_enforces_deepep_limits(world, backend: str, hidden: int, kw: dict, expected: str) -> None:
    """The simulator is as strict as DeepEP: with the backend's checks switched off, the call fails there."""
    problem = bf16_problem([6, 4], hidden, 24, 2, seed=2, **kw)
    with pytest.raises(RankFailure, match=re.escape(expected)):
        conformance.check_world(world(2), problem, backend, False, deepep_tasks.unchecked_rank_task)


def test_low_latency_hidden_3072(world) -> None:
    """DeepEP's low-latency kernels are compiled for hidden 3072 (gpt-oss), since 73b6ea4."""
    conformance.check_world(world(2), bf16_problem([6, 4], 3072, 8, 2, mask_fraction=0.2, seed=3, **padded(8, 3)), "deepep_ll")


@pytest.mark.parametrize("mistake", sorted(deepep_tasks.MISTAKES))
def test_conformance_catches_mapping_mistakes(world, mistake: str) -> None:
    backend = mistake.split(":")[0]
    kw = padded(12, 4) if backend == "deepep_ll" or mistake == "deepep:count" else {}
    problem = bf16_problem([11, 7], LL_HIDDEN if backend == "deepep_ll" else 16, 8, 3, mask_fraction=0.2, seed=4, **kw)
    with pytest.raises((RankFailure, AssertionError)):
        conformance.check_world(world(2), problem, backend, False, deepep_tasks.rank_task, mistake)
    conformance.check_world(world(2), problem, backend)  # undone: the same problem passes


NORMAL_CALL = (bf16_problem([8, 5], 64, 4, 2, seed=5), "deepep")
LL_CALL = (bf16_problem([8, 5], LL_HIDDEN, 4, 2, seed=5, **padded(8, None)), "deepep_ll")


def test_one_buffer_per_group_torn_down_before_a_new_one(world) -> None:
    """No buffer while tracing; the first normal call makes a normal-mode buffer; the first low-latency
    call destroys it on every rank before making the one buffer that serves both modes; later calls of
    either mode reuse it."""
    for traced, log in world(2).run(deepep_tasks.buffer_log, [NORMAL_CALL, LL_CALL, NORMAL_CALL, LL_CALL]):
        assert traced == 0 and log == ["made normal", "destroyed normal", "made normal+low-latency"], log


def test_reserve_sizes_both_modes_up_front(world) -> None:
    reserved = dict(hidden=LL_HIDDEN, max_tokens_per_rank=8, num_experts=4)
    for traced, log in world(2).run(deepep_tasks.buffer_log, [LL_CALL, NORMAL_CALL, LL_CALL], reserved):
        assert traced == 0 and log == ["made normal+low-latency"], log


@pytest.mark.parametrize("later", ["normal", "larger"])
def test_low_latency_buffer_is_never_replaced(world, later: str) -> None:
    """A low-latency buffer initialised NVSHMEM, which a process initialises once: a later call it does not
    serve (normal mode, or more tokens per rank) is the same MoEInputError on every rank, naming reserve()."""
    larger = bf16_problem([8, 5], LL_HIDDEN, 4, 2, seed=5, **padded(12, None)), "deepep_ll"
    outcomes = world(2).outcomes(deepep_tasks.buffer_log, [LL_CALL, NORMAL_CALL if later == "normal" else larger], timeout=60)
    assert all(o.error_type == "MoEInputError" and "reserve(" in o.message for o in outcomes), outcomes
    assert len({o.message for o in outcomes}) == 1


@pytest.mark.parametrize("destroy_first", [False, True])
def test_simulator_initialises_nvshmem_once_per_process(world, destroy_first: bool) -> None:
    for message in world(2).run(deepep_tasks.second_low_latency_buffer, destroy_first):
        assert "NVSHMEM was already initialised in this process" in message, message


def test_import_never_imports_deep_ep() -> None:
    probe = "import sys, moe_ops; assert 'deep_ep' not in sys.modules; print(moe_ops.backends.available())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "deepep" in out and "deepep_ll" in out


def test_cpu_tensors_need_the_simulator() -> None:
    """Without the simulator installed, the DeepEP backends take CUDA tensors only."""
    from moe_ops import backends, libraries

    assert libraries.simulated_device_types("deep_ep") == frozenset()
    with pytest.raises(MoEInputError, match="does not run on 'cpu'"):
        backends.resolve("deepep", "cpu", 2, "ragged")
    sim.install("deep_ep")
    try:
        assert backends.resolve("deepep", "cpu", 2, "ragged").name == "deepep"
    finally:
        sim.uninstall("deep_ep")
    with pytest.raises(MoEInputError, match="does not run on 'cpu'"):
        backends.resolve("deepep_ll", "cpu", 2, "padded")


# --- quantized dispatch (DeepEP's FP8 paths) ----------------------------------------------------------

FP8 = quant.QuantSpec("fp8_e4m3", 128)
FP8_UE8M0 = quant.QuantSpec("fp8_e4m3", 128, round_scale=True)
QUANTIZED = (  # every layout at W = 2, one at W = 4 (CI time)
    [("deepep", 2, layout, prequantized, FP8) for layout in ("ragged", "padded", "bounded") for prequantized in (True, False)]
    + [("deepep", 4, "ragged", False, FP8)]
    + [("deepep_ll", size, "padded", False, spec) for size, spec in ((1, FP8), (2, FP8_UE8M0), (3, FP8), (4, FP8_UE8M0))]
)


@pytest.mark.parametrize(("backend", "size", "layout", "prequantized", "spec"), QUANTIZED)
def test_quantized_rows_and_scales_exact(world, backend: str, size: int, layout: str, prequantized: bool, spec: quant.QuantSpec) -> None:
    """recv_x (float8_e4m3fn) and recv_scales equal the reference layout of the quantized tokens, bit for
    bit: normal mode moves rows quantized by moe_ops (or the caller's), low-latency mode DeepEP's own cast
    (the simulator computes DeepEP's arithmetic, which moe_ops.quant defines). Combine of the dequantized
    rows equals combine after the bf16 dispatch."""
    hidden = LL_HIDDEN if backend == "deepep_ll" else 256
    problem = bf16_problem([12, 0, 9, 7][:size], hidden, 4 * size, 3, mask_fraction=0.2, seed=6, **_static(layout, LL_BOUND, 3, 10))
    quantized.check_world(world(size), problem, spec, prequantized, backend, torch.bfloat16, False)


def test_low_latency_fp8_cast_equals_moe_ops_rounding() -> None:
    """DeepEP's low-latency cast (simulated from csrc/kernels/utils.cuh) gives moe_ops' bits, with and
    without round_scale, for every bf16 amax (all positive finite bf16 values, plus the 1e-4 floor)."""
    from moe_ops.testing.sim.deep_ep.low_latency import fp8_cast

    amax = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # every positive finite bf16
    x = torch.zeros(amax.numel(), 128, dtype=torch.bfloat16)
    x[:, 0] = amax
    x[:, 1:] = (torch.linspace(-1, 1, 127) * amax.float().unsqueeze(1)).to(torch.bfloat16)
    for spec in (FP8_UE8M0, FP8):
        q, s = fp8_cast(x, spec.round_scale)
        ours_q, ours_s = quant.quantize(x, spec)
        assert torch.equal(q.view(torch.uint8), ours_q.view(torch.uint8)) and torch.equal(s, ours_s), spec


def _quantized_errors(world, size: int, problem: Problem, backend: str, spec: quant.QuantSpec, prequantized: bool) -> list[str]:  # type: ignore[no-untyped-def]
    outcomes = world(size).outcomes(quantized.rank_task, problem, spec, prequantized, backend, "cpu", torch.bfloat16, False, timeout=60)
    assert all(o.error_type == "MoEInputError" for o in outcomes), [(o.rank, o.error_type, o.message) for o in outcomes]
    return [o.message for o in outcomes]


QUANTIZED_LIMITS = [
    ("deepep", 256, quant.QuantSpec("int8", 128), True, "not torch.int8 rows"),
    ("deepep", 256, quant.QuantSpec("int8", 128), False, "not torch.int8 rows"),
    ("deepep", 256, quant.QuantSpec("fp8_e4m3", 0), True, "one scale per token"),
    ("deepep", 256, quant.QuantSpec("fp8_e4m3", 0), False, "one scale per token"),
    ("deepep", 192, FP8, False, "needs a multiple of 128"),
    ("deepep", 16384, FP8, False, "at most 16368 values"),
    ("deepep_ll", LL_HIDDEN, FP8_UE8M0, True, "takes no pre-quantized rows"),
    ("deepep_ll", LL_HIDDEN, quant.QuantSpec("int8", 128, True), False, "not torch.int8 rows"),
]


@pytest.mark.parametrize(("backend", "hidden", "spec", "prequantized", "expected"), QUANTIZED_LIMITS)
def test_quantized_limits_raise_clear_errors_on_every_rank(world, backend: str, hidden: int, spec: quant.QuantSpec,
                                                          prequantized: bool, expected: str) -> None:
    kw = padded(8, None) if backend == "deepep_ll" else {}
    problem = bf16_problem([6, 4], hidden, 8, 2, seed=2, **kw)
    messages = _quantized_errors(world, 2, problem, backend, spec, prequantized)
    assert len(set(messages)) == 1 and expected in messages[0], messages


def test_prequantized_e5m2_refused_by_deepep(world) -> None:
    """float8_e5m2 rows (no quant mode makes them) are not DeepEP's FP8 format."""
    for o in world(2).outcomes(deepep_tasks.prequantized_e5m2, timeout=60):
        assert o.error_type == "MoEInputError" and "not torch.float8_e5m2 rows" in o.message, o


@pytest.mark.parametrize("backend", ["deepep", "deepep_ll"])
def test_straight_through(world, backend: str) -> None:
    """``dequantize=True``: DeepEP moves FP8 rows (its tuple, or its own cast), they arrive dequantized, and
    the backward is DeepEP's bf16 combine; rows and both gradients as ``moe.dispatch`` of the rounded tokens."""
    ll = backend == "deepep_ll"
    problem = bf16_problem([6, 4], LL_HIDDEN if ll else 256, 8, 2, seed=2, **(padded(8, None) if ll else {}))
    quantized.check_straight_through(world(2), problem, FP8_UE8M0 if ll else FP8, backend)


@pytest.mark.parametrize("backend", ["deepep", "deepep_ll"])
def test_router_gradient_through_quantized_dispatch(world, backend: str) -> None:
    """The router's gradient alone (quantized rows carry none): DeepEP's combine moves one 16-byte unit of
    zeros beside the weights (normal mode), the low-latency mode only returns the routes' gradients; equal
    to the bf16 dispatch's (rank_task compares them)."""
    problem = bf16_problem([6, 4], LL_HIDDEN if backend == "deepep_ll" else 256, 8, 2, seed=2,
                           **(padded(8, None) if backend == "deepep_ll" else {}))
    spec = FP8_UE8M0 if backend == "deepep_ll" else FP8
    quantized.check_world(world(2), problem, spec, False, backend, torch.bfloat16, True)
