"""NPU pieces that need no second process: registration (the ops serve the ``npu`` device without
importing torch_npu), backend selection, the mc2 backend's documented limits and row encoding, and
the local stage through torch_npu's permute kernels (moe_ops/stage/npu.py), run on CPU tensors by the
simulator of moe_ops.testing.sim.torch_npu with ``config.kernels = "npu"``."""

import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings

from moe_ops import MoEInputError, backends, config
from moe_ops.backends.mc2 import limits as mc2_limits
from moe_ops.backends.mc2.wire import Wire, route_ids, sent_ids
from moe_ops.testing import conformance, mc2_tasks, sim
from moe_ops.testing.problems import Problem, make_problem, problems
from moe_ops.testing.sim import torch_npu
from moe_ops.testing.sim.torch_npu import mc2 as mc2_sim

OPS = ("moe::dispatch", "moe::combine", "moe::dispatch_backward", "moe::combine_backward")


def test_import_does_not_import_torch_npu() -> None:
    code = "import sys, moe_ops; assert 'torch_npu' not in sys.modules; assert 'mc2' in moe_ops.backends.available()"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("op", OPS)
def test_ops_serve_the_npu_dispatch_key(op: str) -> None:
    """torch_npu's ``npu`` device is PrivateUse1: the ops' kernels and autograd already cover it."""
    for key in ("PrivateUse1", "AutogradPrivateUse1"):
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(op, key), (op, key)


def test_backend_selection() -> None:
    assert backends.auto("npu", 8, "padded") == "mc2"
    assert backends.auto("npu", 8, "ragged") == "collective" and backends.auto("npu", 1, "padded") == "local"
    with pytest.raises(MoEInputError, match="backend 'mc2' has no ragged layout"):
        backends.resolve("mc2", "npu", 2, "ragged")
    with pytest.raises(MoEInputError, match="does not run on 'cpu' tensors"):  # only the simulator widens it
        backends.resolve("mc2", "cpu", 2, "padded")


def test_a3_limits_worked_example() -> None:
    """DeepSeek-V3-like decode on 16 A3 dies: E = 256, K = 8, H = 7168, 64 tokens per rank. Rows on the
    wire are 7168 + 51 metadata columns -> 7232; HCCL_BUFFSIZE >= 2 (16*64*16*Align512(Align32(14464) + 64)
    + 9*64*Align512(14464)) = 2 (16384*14848 + 576*14848) bytes = 480.3 MiB, so the default 200 MB fails."""
    width = Wire(7168, 8).width
    assert width == 7232
    shape = mc2_limits.Shape(batch=64, hidden=width, top_k=8, experts=256, world=16)
    a3 = mc2_limits.TABLE[("A3", 2, False)]
    assert a3.buffer_bytes(shape) == 2 * (16384 + 576) * 14848
    assert a3.problems(shape) == ["HCCL_BUFFSIZE = 200 MB, this call needs at least 481 MB"]
    bad = mc2_limits.Shape(batch=600, hidden=512, top_k=17, experts=1030, world=16)
    found = [p.split(" ")[0] for p in a3.problems(bad)]
    assert found == ["max_tokens_per_rank", "hidden", "top-k", "num_experts", "HCCL_BUFFSIZE"]


@pytest.mark.parametrize(("hierarchy", "world", "experts", "hidden", "batch", "expected"), [
    (False, 8, 192, 7168, 8, []),
    (False, 12, 192, 7168, 8, ["EP size"]),
    (False, 264, 264, 7168, 8, ["EP size"]),
    (False, 16, 1024, 7168, 8, ["num_experts", "64 local experts"]),
    (False, 8, 200, 7168, 8, ["25 local experts"]),
    (False, 8, 64, 7200, 8, ["hidden"]),
    (True, 64, 512, 10240, 8, []),
    (True, 64, 512, 10240, 16, ["HCCL_BUFFSIZE = 200 MB, this call needs at least 265 MB"]),  # 512 * 16 * (2 * 10240 + 4 * 8 * 4) B + 104 MB
    (True, 72, 72, 1024, 8, ["EP size"]),
])
def test_a2_limits(hierarchy: bool, world: int, experts: int, hidden: int, batch: int, expected: list[str]) -> None:
    """Atlas A2's tiling: EP sizes that are multiples of 8 up to 256 (64 in hierarchy mode), at most 512
    experts and, in fullmesh mode, 24 per rank; rows of a multiple of 32 up to 7168 columns (10240 in
    hierarchy mode, with its own HCCL_BUFFSIZE formula)."""
    shape = mc2_limits.Shape(batch=batch, hidden=hidden, top_k=8, experts=experts, world=world)
    found = mc2_limits.TABLE[("A2", 2, hierarchy)].problems(shape)
    assert len(found) == len(expected) and all(p in f for p, f in zip(expected, found, strict=True)), found


def test_route_ids_and_sent_ids() -> None:
    """Masked, out-of-range and repeated ids become -1; MC2 gets distinct unused experts in their place."""
    ids = route_ids(torch.tensor([[3, 3, -1], [9, 0, 2], [1, -5, 1]]), 4)
    assert ids.tolist() == [[3, -1, -1], [-1, 0, 2], [1, -1, -1]]
    assert sent_ids(ids, 4).tolist() == [[3, 0, 1], [1, 0, 2], [1, 0, 2]]


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wire_round_trip(quantized: bool, dtype: torch.dtype) -> None:
    """Keys, ids and float32 weights come back exactly, through MC2's int8 rows too, whose token columns
    are MC2's quantization of the token alone (its maximum floored at 1e-4: zero and tiny tokens)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 40, generator=gen) * 3).to(dtype)
    x[2] = 0  # an all-zero token
    x[4] *= 1e-6  # below the floor
    keys, ids = torch.tensor([0, 7, 1000, 393215, 42, 5]), torch.randint(-1, 1024, (6, 16), generator=gen)
    weights = torch.randn(6, 16, generator=gen)
    wire = Wire(40, 16, quantized)
    rows = wire.encode(x, keys, ids, weights)
    scales = None
    if quantized:  # what MC2 does to each row (quant_mode 2)
        rows, scales = mc2_sim.dynamic_quant(rows)
    got = wire.decode(rows, scales)
    assert torch.equal(got.keys, keys) and torch.equal(got.ids, ids) and torch.equal(got.weights, weights)
    want = mc2_tasks.mc2_quantize(x) if quantized else (x, None)
    assert torch.equal(got.tokens, want[0]) and (got.scales is None if want[1] is None else torch.equal(got.scales, want[1]))


@pytest.fixture
def _npu_kernels() -> Iterator[None]:
    previous = config.kernels
    sim.install("torch_npu")
    config.kernels = "npu"
    yield
    config.kernels = previous
    sim.uninstall("torch_npu")


def check(problem: Problem) -> list[str]:
    """The local backend's conformance on ``problem``; the names of the kernels it called."""
    before = len(torch_npu.calls())
    ours = conformance.run_rank(problem, 0, backend="local")
    ref, mag = conformance.expected(problem)
    conformance.assert_rank_matches(problem, 0, ours, ref[0], mag[0])
    return [call.op for call in torch_npu.calls()[before:]]


@pytest.mark.usefixtures("_npu_kernels")
@settings(max_examples=60)
@given(problem=problems(world_size=1, max_tokens=64, max_experts=32, hidden_sizes=(1, 7, 64)))
def test_property(problem: Problem) -> None:
    check(problem)


@pytest.mark.usefixtures("_npu_kernels")
@pytest.mark.parametrize("kw", [dict(pad_multiple=4), dict(max_recv_rows=8, max_tokens_per_rank=8)], ids=["pad_multiple", "bounded"])
def test_unpermute_only_for_packed_rows(kw: dict) -> None:
    """Two routes masked and as many rows as routes (padding rows fill the gap): the rows are not one per
    route, so combine must not take the unpermute kernel (which would read route -1; Hypothesis found it)."""
    problem = make_problem([8], 7, 1, 1, dtype=torch.float32, seed=0, **kw)
    problem.topk_idx[0][4:6] = -1
    assert "npu_moe_token_unpermute" not in check(problem)


@pytest.mark.usefixtures("_npu_kernels")
def test_ragged_dispatch_sorts_unique_keys() -> None:
    """The permute kernel gets one key per route (so its tie-breaking cannot change the order) and
    every valid route comes out, in the contract's order (checked against the reference)."""
    ops = check(make_problem([40], 16, 8, 3, mask_fraction=0.3, out_of_range=True, dtype=torch.bfloat16, seed=4))
    assert "npu_moe_token_permute" in ops
    keys = next(c.kwargs["indices"] for c in torch_npu.calls() if c.op == "npu_moe_token_permute")
    assert keys.shape == (40, 3) and keys.unique().numel() == keys.numel()


@pytest.mark.usefixtures("_npu_kernels")
def test_unpermute_where_every_route_has_a_row() -> None:
    """No masked route: combine and dispatch's backward sum through the unpermute kernel."""
    ops = check(make_problem([32], 16, 8, 2, dtype=torch.float16, seed=6))
    assert ops.count("npu_moe_token_unpermute") == 2


@pytest.mark.usefixtures("_npu_kernels")
def test_plain_torch_elsewhere() -> None:
    """Masked routes (combine) and the padded layout stay in plain torch."""
    assert check(make_problem([32], 16, 8, 2, mask_fraction=0.5, seed=6)) == ["npu_moe_token_permute"]
    kw = dict(layout="padded", capacity=4, max_tokens_per_rank=32)
    assert check(make_problem([32], 16, 8, 2, seed=6, **kw)) == []
