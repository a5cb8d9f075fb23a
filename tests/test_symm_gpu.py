"""The ``symm`` backend on one GPU over real symmetric memory (CUDA only): a one-rank NCCL group, so
the put kernel stores into this rank's own buffer and the barriers run with nobody else. Conformance
in both layouts, eager and compiled, quantized dispatch (rows and scales exact, quantized in the compiled
put kernel or given), and a padded decode step captured in a CUDA graph. More than one GPU:
``tools/bench_multi_gpu.py`` (issue 7), not this file."""

import faulthandler
from collections.abc import Iterator

import pytest
import torch

import moe_ops
from moe_ops import quant
from moe_ops.backends.symm import peer_memory
from moe_ops.testing import conformance, cuda_graph, quantized
from moe_ops.testing.conformance import assert_relative_close
from moe_ops.testing.problems import make_problem

pytestmark = pytest.mark.cuda

PROBLEMS = {
    "ragged": dict(tokens=[300], hidden=7168, experts=64, top_k=8, mask_fraction=0.1),
    "padded": dict(tokens=[96], hidden=1000, experts=16, top_k=4, layout="padded", max_tokens_per_rank=128, capacity=20),
    "no tokens": dict(tokens=[0], hidden=64, experts=8, top_k=2),
}


WATCHDOG_S = 150  # a test still running after this dumps every thread's stack and ends the process


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """A hang inside a kernel or NCCL never returns to Python, so pytest-timeout cannot end it; this
    does, and says where it was."""
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def group() -> Iterator[str]:
    import torch.distributed as dist

    from moe_ops.testing.harness import free_port

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                device_id=torch.device("cuda", torch.cuda.current_device()))
    yield dist.group.WORLD.group_name
    peer_memory.release(dist.group.WORLD.group_name)
    if started:
        dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", PROBLEMS)
def test_conformance(group: str, case: str, compiled: bool, request: pytest.FixtureRequest) -> None:
    if compiled and case == "no tokens" and torch.__version__ < (2, 12):
        # Inductor (2.11) launches a 2-D kernel over 0 received rows with a grid of ceildiv(0, 0) in the
        # stand-in experts after dispatch; fixed upstream (pytorch/pytorch#179222). docs/compile.md.
        request.applymarker(pytest.mark.xfail(raises=ZeroDivisionError, strict=True, reason="torch 2.11 Inductor grid bug"))
    _check(group, case, compiled)


def test_compiled_no_tokens_without_2d_tiles(group: str) -> None:
    """docs/compile.md's workaround for the torch 2.11 bug above holds on every version."""
    with torch._inductor.config.patch({"triton.max_tiles": 1}):
        _check(group, "no tokens", compiled=True)


def _check(group: str, case: str, compiled: bool) -> None:
    kw = dict(PROBLEMS[case])
    problem = make_problem(kw.pop("tokens"), kw.pop("hidden"), kw.pop("experts"), kw.pop("top_k"), dtype=torch.bfloat16, seed=5, **kw)
    step = conformance.pipeline(problem, 0, group=group, backend="symm")
    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step, fullgraph=True, dynamic=True)
    ours = conformance.run_rank(problem, 0, group=group, backend="symm", device="cuda", step=step)
    ref, mag = conformance.expected(problem)
    conformance.assert_rank_matches(problem, 0, ours, ref[0], mag[0])


QUANTIZED = {  # a PROBLEMS case, options added to it, quantization, pre-quantized (else quantized in the put kernel)
    "ragged, fp8 block": ("ragged", {}, quant.QuantSpec("fp8_e4m3", 128), False),
    "padded, int8 per token UE8M0, given": ("padded", {}, quant.QuantSpec("int8", 0, True), True),
    "bounded, pad_multiple, fp8 per token UE8M0": (
        "ragged", dict(max_recv_rows=1024, max_tokens_per_rank=300, pad_multiple=16), quant.QuantSpec("fp8_e4m3", 0, True), False
    ),
    "no tokens, int8 block": ("no tokens", {}, quant.QuantSpec("int8", 128), False),
}


@pytest.mark.parametrize("case", QUANTIZED)
def test_quantized(group: str, case: str) -> None:
    name, extra, spec, prequantized = QUANTIZED[case]
    kw = dict(PROBLEMS[name], **extra)
    problem = make_problem(kw.pop("tokens"), kw.pop("hidden"), kw.pop("experts"), kw.pop("top_k"), dtype=torch.bfloat16, seed=5, **kw)
    ours = quantized.rank_task(0, problem, spec, prequantized, backend="symm", device="cuda")
    rows, scales = quantized.expected(problem, spec)
    quantized.assert_rank_matches(problem, spec, 0, ours, rows[0], scales[0])


@torch.no_grad()
def test_decode_step_replays_in_cuda_graph(group: str) -> None:
    tokens, hidden, experts, top_k = 64, 2048, 32, 4
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w, idx = torch.topk(torch.rand(tokens, experts, device="cuda"), top_k)
    kw = dict(num_experts=experts, group_name=group, backend="symm", layout="padded", max_tokens_per_rank=tokens)

    def step() -> torch.Tensor:
        recv_x, recv_w, _, _, handle = torch.ops.moe.dispatch(x, idx, w, **kw)
        return torch.ops.moe.combine(recv_x * 2, recv_w, handle, group_name=group, backend="symm")

    graph, out = cuda_graph.capture(step, warmup=1)
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda", dtype=x.dtype))
        w_new, idx_new = torch.topk(torch.rand(tokens, experts, generator=gen, device="cuda"), top_k)
        w.copy_(w_new)
        idx.copy_(idx_new)
        graph.replay()
        local = moe_ops.dispatch(x, idx, w, experts, layout="padded", max_tokens_per_rank=tokens)
        expected = moe_ops.combine(local.recv_x * 2, local)
        assert_relative_close(out, expected, 2e-2, f"graph replay {seed} vs local")
