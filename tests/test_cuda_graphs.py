"""CUDA graphs (CUDA only): a padded decode step captured with torch.cuda.graph replays new inputs
correctly, and torch.compile(mode="reduce-overhead") records it once for every token count of a bucket."""

import pytest
import torch

import moe_ops
from moe_ops.layers import MoEBlock
from moe_ops.testing import cuda_graph
from moe_ops.testing.conformance import assert_relative_close

pytestmark = pytest.mark.cuda

BUCKET, HIDDEN, FFN, EXPERTS, TOP_K = 32, 256, 512, 16, 4


def decode_block() -> MoEBlock:
    torch.manual_seed(0)
    dispatcher = moe_ops.Dispatcher(EXPERTS, layout="padded", max_tokens_per_rank=BUCKET, capacity=24)
    return MoEBlock(HIDDEN, FFN, TOP_K, dispatcher, device="cuda", dtype=torch.bfloat16)


def decode_step(block: MoEBlock, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A bucket of ``BUCKET`` rows of which ``valid`` are real: padding rows route nowhere (-1)."""
    topk_idx, topk_weights = block.route(x)
    topk_idx = torch.where(valid.unsqueeze(1), topk_idx, -1)
    d = block.dispatcher.dispatch(x, topk_idx, topk_weights)
    return block.dispatcher.combine(block.experts(d.recv_x, d.tokens_per_expert), d)


def bucket(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(BUCKET, HIDDEN, device="cuda", dtype=torch.bfloat16)
    x[:tokens] = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    return x, torch.arange(BUCKET, device="cuda") < tokens


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert_relative_close(a, b, 2e-2, "graph replay vs eager")


@torch.no_grad()
def test_cuda_graph_replays_new_inputs() -> None:
    block = decode_block()
    static_x, static_valid = bucket(BUCKET)
    graph, static_out = cuda_graph.capture(lambda: decode_step(block, static_x, static_valid))
    for tokens in (BUCKET, 7, 1, 20):
        x, valid = bucket(tokens)
        static_x.copy_(x)
        static_valid.copy_(valid)
        graph.replay()
        expected = decode_step(block, x, valid)
        assert_close(static_out[:tokens], expected[:tokens])
        assert torch.equal(static_out[tokens:], torch.zeros_like(static_out[tokens:]))


@torch.no_grad()
def test_reduce_overhead_records_once_per_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor import cudagraph_trees

    recordings = []
    record = cudagraph_trees.CUDAGraphTreeManager.record_function

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        recordings.append(1)
        return record(self, *args, **kwargs)

    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function", counting)
    block = decode_block()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, valid: decode_step(block, x, valid), mode="reduce-overhead", fullgraph=True)
    for tokens in (BUCKET, 1, 5, 17, 32, 9, 30):
        x, valid = bucket(tokens)
        out = compiled(x, valid).clone()
        assert_close(out[:tokens], decode_step(block, x, valid)[:tokens])
    assert len(recordings) == 1, f"recorded {len(recordings)} CUDA graphs for one bucket"
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0


def test_training_step_captures_in_one_cuda_graph() -> None:
    """``max_recv_rows``: dispatch, the grouped GEMMs, combine, the loss and the backward pass run with no
    host sync (``set_sync_debug_mode("error")``), capture in one CUDA graph, and replay bit-exactly against
    the same step run eagerly, for new inputs."""
    torch.manual_seed(0)
    dispatcher = moe_ops.Dispatcher(EXPERTS, max_recv_rows=BUCKET * TOP_K, max_tokens_per_rank=BUCKET)
    model = MoEBlock(HIDDEN, FFN, TOP_K, dispatcher, device="cuda", dtype=torch.bfloat16)
    static_x = torch.randn(BUCKET, HIDDEN, device="cuda", dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        loss = (model(static_x).float() ** 2).mean()
        loss.backward()
        return loss.detach()

    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step()  # eager: must not sync either
        model.zero_grad(set_to_none=True)  # the captured backward allocates the gradients from the graph's pool
        graph, static_loss = cuda_graph.capture(step, warmup=0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    params = [p for p in model.parameters()]
    for seed in range(3):
        static_x.copy_(torch.randn(static_x.shape, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda", dtype=static_x.dtype))
        graph.replay()
        replayed = [static_loss.clone(), *(p.grad.clone() for p in params)]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        eager = [step(), *(p.grad for p in params)]
        for p, g in zip(params, grads, strict=True):
            p.grad = g  # the graph's gradient memory, for the next replay
        for what, a, b in zip(("loss", *(n for n, _ in model.named_parameters())), replayed, eager, strict=True):
            assert torch.equal(a, b), f"replay {seed}: {what} differs from eager"
