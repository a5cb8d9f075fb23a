"""The ``symm`` backend (stores into the peers' buffers) on real processes over gloo, its peer buffers
simulated with shared memory (:mod:`moe_ops.testing.sim.symmetric_memory`) and its Triton kernels interpreted
(``TRITON_INTERPRET=1``): the put kernel's exact placement, the conformance suite at W = 1…4 in both
layouts, quantized dispatch at W = 1…3 (rows and scales exact), compiled equals eager, opcheck, and the
buffer's life cycle. On a GPU (tests/test_symm_gpu.py): W = 1 over real symmetric memory, eager and
captured in a CUDA graph. More than one GPU is not tested here (issue 7: ``tools/bench_multi_gpu.py`` on
a multi-GPU machine).

Example counts (2-core CI, interpreted kernels): EXAMPLES[W] Hypothesis problems per world size.
"""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_ops import quant
from moe_ops.packing import RowFormat
from moe_ops.testing import conformance, quantized, sim
from moe_ops.testing.harness import set_up
from moe_ops.testing.problems import Problem, make_problem, problems
from moe_ops.testing.sim import symmetric_memory

pytestmark = pytest.mark.multiproc

EXAMPLES = {1: 5, 2: 8, 3: 4, 4: 3}


@pytest.fixture
def world(interpreted_worlds):
    """``world(size)``: a gloo world running the Triton kernels interpreted, with the simulator installed."""
    return set_up(interpreted_worlds, functools.partial(sim.install_on_rank, name="symmetric_memory"))


def test_put_rows_places_every_slot(world) -> None:
    assert world(1).run(_put_rows_task) == [None]


def _put_rows_task(rank: int) -> None:
    """Three simulated ranks in one process: each stores its slots; every row lands where the layout
    says, payloads only where sent, meta always, nothing else touched; then an empty, strided source."""
    from moe_ops.backends.symm.put import put_rows

    world, bound, cols, meta_words = 3, 4, 5, 3
    row_bytes, meta_offset = 48, 32  # payload: 5 fp32 (20 bytes, padded to 32); meta: 3 words; row: 48
    buffers = [torch.full((world * bound * row_bytes,), 0xEE, dtype=torch.uint8) for _ in range(world)]
    peers = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    sent = {}
    for sender in range(world):
        src = torch.arange(6 * cols, dtype=torch.float32).view(6, cols) + 100 * sender
        gen = torch.Generator().manual_seed(sender)
        src_index = torch.randint(-1, 6, (world * bound,), generator=gen)
        meta = torch.randint(-50, 50, (world * bound, meta_words), generator=gen, dtype=torch.int32)
        put_rows(src, src_index, meta, peers, sender, bound, row_bytes, meta_offset, programs=2)
        sent[sender] = (src, src_index, meta)
    for dest in range(world):
        rows = buffers[dest].view(world * bound, row_bytes)
        for sender, (src, src_index, meta) in sent.items():
            for t in range(bound):
                row, slot = rows[sender * bound + t], dest * bound + t
                payload = row[: 4 * cols]
                if src_index[slot] >= 0:
                    assert torch.equal(payload.view(torch.float32), src[src_index[slot]]), (dest, sender, t)
                else:
                    assert bool((payload == 0xEE).all()), (dest, sender, t)
                assert bool((row[4 * cols : meta_offset] == 0xEE).all())
                assert torch.equal(row[meta_offset : meta_offset + 4 * meta_words].view(torch.int32), meta[slot])
                assert bool((row[meta_offset + 4 * meta_words :] == 0xEE).all())
    # a rank with no rows sends metadata only; its empty source may come with any strides (autograd's
    # empty gradients do, and .contiguous() keeps them: an empty tensor counts as contiguous)
    empty = torch.empty(0, 2 * cols)[:, ::2]
    meta = torch.full((world * bound, meta_words), 7, dtype=torch.int32)
    put_rows(empty, torch.full((world * bound,), -1), meta, peers, 0, bound, row_bytes, meta_offset, programs=2)
    for dest in range(world):
        rows = buffers[dest].view(world * bound, row_bytes)[:bound]
        assert bool((rows[:, meta_offset : meta_offset + 4 * meta_words].view(torch.int32) == 7).all())


PUT_TOKENS = {  # what dispatch's put moves: plain rows, quantized rows with their scales, or rows it quantizes
    "bf16": None,
    "e5m2 with scales": "scales",
    "quantizing: fp8 block": quant.QuantSpec("fp8_e4m3", 128),
    "quantizing: int8 per token, UE8M0": quant.QuantSpec("int8", 0, True),
}


@pytest.mark.parametrize("rows", PUT_TOKENS)
def test_put_tokens_places_every_slot(world, rows: str) -> None:
    assert world(1).run(_put_tokens_task, PUT_TOKENS[rows]) == [None]


def _put_tokens_task(rank: int, moved: quant.QuantSpec | str | None) -> None:
    """Dispatch's put for three simulated ranks (T = 5, 6, 0; bound 6; 2 experts per rank, K = 3, masked
    and out-of-range ids): row ``s * 6 + t`` of rank ``d`` holds token ``t`` of rank ``s`` exactly when one
    of its routes goes to ``d``, its ids local to ``d`` (-1 elsewhere) and their weights (0 elsewhere).
    Quantized (H = 2100: two column blocks, 17 scales, the last group short): the 1-byte token and its
    scales beside it, only where the token goes, bit for bit :func:`moe_ops.quant.quantize`'s when the
    kernel quantizes."""
    from moe_ops.backends.symm.put import put_tokens

    world, bound, num_local, top_k = 3, 6, 2, 3
    hidden = 5 if moved is None else 2100
    num_scales = 0 if moved is None else quant.scale_columns(hidden, 0 if moved == "scales" else moved.block)
    meta_format = RowFormat(((top_k, torch.int32), (top_k, torch.float32)))
    payload_dtype = torch.bfloat16 if moved is None else torch.float8_e5m2 if moved == "scales" else moved.dtype
    row_format = RowFormat(((hidden, payload_dtype), (num_scales, torch.float32), (meta_format.row_bytes, torch.uint8)), 16)
    row_bytes, scales_offset, meta_offset = row_format.row_bytes, row_format.offset(1), row_format.offset(2)
    buffers = [torch.full((world * bound * row_bytes,), 0xEE, dtype=torch.uint8) for _ in range(world)]
    peers = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    sent = []
    for sender, tokens in enumerate((5, 6, 0)):
        gen = torch.Generator().manual_seed(sender)
        x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
        idx = torch.randint(-1, world * num_local + 2, (tokens, top_k), generator=gen)
        w = torch.rand(tokens, top_k, generator=gen)
        scales, spec = None, None
        if moved == "scales":
            x, scales = x.to(torch.float8_e5m2), torch.rand(tokens, num_scales, generator=gen)
        elif moved is not None:
            spec = moved
        put_tokens(x, idx, w, num_local, peers, sender, bound, row_bytes, meta_offset, meta_format.offset(1), programs=2,
                   scales=scales, quantize=spec, scales_offset=scales_offset)
        if spec is not None:
            x, scales = quant.quantize(x, spec)
        sent.append((x, idx, w, scales))
    for dest in range(world):
        rows = buffers[dest].view(world * bound, row_bytes)
        for sender, (x, idx, w, scales) in enumerate(sent):
            for t in range(bound):
                row = rows[sender * bound + t]
                ids, weights = meta_format.views(row[None, meta_offset : meta_offset + meta_format.row_bytes])
                mine = (idx[t] >= 0) & (idx[t] < world * num_local) & (idx[t] // num_local == dest) if t < len(x) else torch.zeros(top_k, dtype=torch.bool)
                assert torch.equal(ids[0], torch.where(mine, idx[t] - dest * num_local, -1).int() if t < len(x) else torch.full((top_k,), -1, dtype=torch.int32))
                assert torch.equal(weights[0], torch.where(mine, w[t], 0) if t < len(x) else torch.zeros(top_k))
                payload = row[: x.element_size() * hidden]
                carried = row[scales_offset : scales_offset + 4 * num_scales]
                if bool(mine.any()):
                    assert torch.equal(payload, x[t].view(torch.uint8)), (dest, sender, t)
                    assert scales is None or torch.equal(carried.view(torch.float32), scales[t]), (dest, sender, t)
                else:
                    assert bool((payload == 0xEE).all() and (carried == 0xEE).all()), (dest, sender, t)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_property(world, size: int) -> None:
    @settings(max_examples=EXAMPLES[size])
    @given(problem=problems(size, max_tokens=20, max_experts=32, hidden_sizes=(1, 7, 40)))
    def check(problem: Problem) -> None:
        conformance.check_world(world(size), problem, "symm")

    check()


@pytest.mark.parametrize("layout", ["ragged", "padded"])
@pytest.mark.parametrize("size", [2, 3])
def test_edge_cases(world, size: int, layout: str) -> None:
    """A rank with no tokens, everything to one rank or one expert, all masked; capacity 3 drops."""
    kw = dict(layout="padded", max_tokens_per_rank=13, capacity=3) if layout == "padded" else {}
    for pattern in ("one_rank", "one_expert", "all_masked", "uniform"):
        problem = make_problem([13, 0, 9][:size], 24, 4 * size, 3, pattern=pattern, mask_fraction=0.3, seed=3, **kw)
        conformance.check_world(world(size), problem, "symm")


QUANTIZED = {  # tokens per rank, H, layout options, quantization, pre-quantized (else quantized by the put kernel)
    "W=1 ragged, fp8 block, quantized": ([9], 200, {}, quant.QuantSpec("fp8_e4m3", 128), False),
    "W=2 padded, drops, fp8 per token UE8M0, quantized": (
        [13, 6], 40, dict(layout="padded", max_tokens_per_rank=13, capacity=3), quant.QuantSpec("fp8_e4m3", 0, True), False
    ),
    "W=2 bounded, pad_multiple, two column blocks, int8 block UE8M0, quantized": (
        [7, 5], 2100, dict(max_recv_rows=24, max_tokens_per_rank=7, pad_multiple=4), quant.QuantSpec("int8", 128, True), False
    ),
    "W=3 ragged, fp8 block UE8M0, given": ([9, 0, 5], 200, {}, quant.QuantSpec("fp8_e4m3", 128, True), True),
    "W=3 bounded, fp8 per token, given": ([9, 4, 0], 7, dict(max_recv_rows=12, max_tokens_per_rank=9), quant.QuantSpec("fp8_e4m3", 0), True),
}


@pytest.mark.parametrize("case", QUANTIZED)
def test_quantized_matches_reference(world, case: str) -> None:
    """Quantized dispatch: rows and scales exactly the reference layout of the quantized tokens, combine
    of the dequantized rows through the same handle, and the router's gradient as after dispatch."""
    tokens, hidden, kw, spec, prequantized = QUANTIZED[case]
    problem = make_problem(tokens, hidden, 4 * len(tokens), 3, mask_fraction=0.2, dtype=torch.bfloat16, seed=list(QUANTIZED).index(case), **kw)
    quantized.check_world(world(len(tokens)), problem, spec, prequantized, "symm")


def test_straight_through(world) -> None:
    """``dequantize=True``: the put kernel quantizes, the receiver dequantizes; rows and both gradients as
    ``moe.dispatch`` of the rounded tokens."""
    problem = make_problem([9, 5], 200, 8, 3, mask_fraction=0.2, dtype=torch.bfloat16, seed=3)
    quantized.check_straight_through(world(2), problem, quant.QuantSpec("fp8_e4m3", 128), "symm")


@pytest.mark.parametrize("size", [2])  # W = 3: the fixed cases above (CI time)
def test_quantized_property(world, size: int) -> None:
    @settings(max_examples=3)
    @given(problem=problems(size, max_tokens=12, max_experts=16, hidden_sizes=(7, 128, 200)),
           spec=st.builds(quant.QuantSpec, st.sampled_from(sorted(quant.FORMATS)), st.sampled_from((quant.BLOCK, 0)), st.booleans()),
           prequantized=st.booleans())
    def check(problem: Problem, spec: quant.QuantSpec, prequantized: bool) -> None:
        quantized.check_world(world(size), problem, spec, prequantized, "symm")

    check()


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_compiled_equals_eager(world, layout: str) -> None:
    kw = dict(layout="padded", max_tokens_per_rank=12, capacity=5) if layout == "padded" else {}
    problem = make_problem([12, 7], 32, 8, 3, mask_fraction=0.2, seed=9, dtype=torch.bfloat16, **kw)
    conformance.check_world(world(2), problem, "symm", compiled=True)


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_opcheck(world, layout: str) -> None:
    kw = dict(layout="padded", max_tokens_per_rank=20, capacity=5) if layout == "padded" else {}
    problem = make_problem([20, 9], 16, 8, 3, mask_fraction=0.2, seed=2, **kw)
    world(2).run(conformance.opcheck_task, problem, "symm")


def test_buffer_made_on_first_use_and_grown_by_every_rank_alike(world) -> None:
    """On a new group: the first call makes the group's buffer, a call that fits reuses it, a call needing
    more grows it, on every rank at the same call (the rank with one token too: the size follows the
    group's largest count); the results match the reference throughout."""
    small = make_problem([6, 2], 16, 4, 2, seed=1)
    large = make_problem([1, 64], 4096, 4, 2, seed=1)  # 2 x 64 slots of 16 KiB rows: more than the first 1 MiB
    problems = [small, small, large]
    outcomes = world(2).run(_buffers_per_call, problems)
    for problem, call in zip(problems, range(3), strict=True):
        ref, mag = conformance.expected(problem)
        for rank, (_, results) in enumerate(outcomes):
            conformance.assert_rank_matches(problem, rank, results[call], ref[rank], mag[rank])
    (made, _), (made_1, _) = outcomes
    assert made == made_1, (made, made_1)
    first, second, third = made
    assert len(first) == 1 and second == [] and len(third) == 1 and third[0] >= 2 * first[0], made


def _buffers_per_call(rank: int, problems: list[Problem]) -> tuple[list[list[int]], list[conformance.RankResult]]:
    """On a new group of both ranks, each problem's pipeline on ``symm``: the sizes of the buffers each
    call made, and its results."""
    import torch.distributed as dist

    group = dist.new_group([0, 1])
    made, results = [], []
    for problem in problems:
        before = len(symmetric_memory.made)
        results.append(conformance.run_rank(problem, rank, group=group.group_name, backend="symm"))
        made.append(symmetric_memory.made[before:])
    return made, results


def test_cpu_tensors_need_the_simulator() -> None:
    from moe_ops import backends
    from moe_ops.backends.symm import peer_memory

    if "cpu" in peer_memory.device_types():
        pytest.skip("the simulator is installed in this process")
    with pytest.raises(ValueError, match="does not run on 'cpu'"):
        backends.resolve("symm", "cpu", 2, "ragged")
