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
