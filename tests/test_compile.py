"""torch.compile(fullgraph=True, dynamic=True) of the MoE block and of a training step: no graph break,
at most one recompile over five token counts, compiled equals eager, eager equals the reference; and the
bounded ragged layout (``max_recv_rows``) traced with static shapes only (no unbacked size: no host read)."""

import pytest
import torch

import moe_ops
from moe_ops import compile_stats, reference
from moe_ops.layers import MoEBlock
from moe_ops.testing.conformance import assert_relative_close

TOKEN_COUNTS = (17, 40, 64, 100, 203)
HIDDEN, FFN, EXPERTS, TOP_K = 32, 64, 8, 2
CASES = {
    # ragged runs torch._grouped_mm (bfloat16); padded runs torch.bmm
    "ragged-bf16": (torch.bfloat16, {}),
    "padded-fp32": (torch.float32, {"layout": "padded", "max_tokens_per_rank": 256, "capacity": 48}),
    # the ragged rows in a static [R, H] (R = the worst case: nothing dropped), and groups aligned to 16 rows
    "bounded-bf16": (torch.bfloat16, {"max_recv_rows": 512, "max_tokens_per_rank": 256}),
    "aligned-bf16": (torch.bfloat16, {"pad_multiple": 16}),
}
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-5}


def block(device: str, case: str) -> MoEBlock:
    torch.manual_seed(0)
    dtype, kw = CASES[case]
    return MoEBlock(HIDDEN, FFN, TOP_K, moe_ops.Dispatcher(EXPERTS, **kw), device=device, dtype=dtype)


def grads(model: MoEBlock) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert_relative_close(a, b, TOLERANCE[dtype], what)


@pytest.mark.parametrize("case", CASES)
def test_block_forward(device: str, case: str) -> None:
    model = block(device, case)
    dtype = CASES[case][0]
    compile_stats.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for tokens in TOKEN_COUNTS:
            x = torch.randn(tokens, HIDDEN, device=device, dtype=dtype)
            eager = model(x)
            assert_close(compiled(x), eager, dtype, f"compiled vs eager, T={tokens}")
            idx, w = model.route(x)
            if CASES[case][1].get("capacity") is None or tokens * TOP_K <= CASES[case][1]["capacity"]:
                ref = reference.moe_forward(x, idx, w, EXPERTS, model.expert)
                assert_close(eager, ref, dtype, f"eager vs reference, T={tokens}")
    stats = compile_stats.read()
    assert stats.graph_breaks == 0, stats
    assert stats.recompiles <= 1, stats


@pytest.mark.parametrize("case", CASES)
def test_training_step(device: str, case: str) -> None:
    model = block(device, case)
    dtype = CASES[case][0]

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return (model(x).float() ** 2).mean()

    compile_stats.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    for tokens in TOKEN_COUNTS:
        x = torch.randn(tokens, HIDDEN, device=device, dtype=dtype)
        model.zero_grad()
        loss_fn(x).backward()
        eager = grads(model)
        model.zero_grad()
        compiled(x).backward()
        for g_compiled, g_eager in zip(grads(model), eager, strict=True):
            assert_close(g_compiled, g_eager, dtype, f"grad compiled vs eager, T={tokens}")
    stats = compile_stats.read()
    assert stats.graph_breaks == 0, stats
    assert stats.recompiles <= 1, stats


def _traced_sizes(model: MoEBlock, x: torch.Tensor) -> list[object]:
    """Every size in the graph dynamo traces for a training step of ``model`` on ``x`` (``dynamic=False``)."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    compile_stats.reset()
    torch.compile(lambda x: (model(x).float() ** 2).mean(), backend=backend, fullgraph=True, dynamic=False)(x).backward()
    values = [node.meta.get("example_value") for gm in graphs for node in gm.graph.nodes]
    return [d for v in values if isinstance(v, torch.Tensor) for d in v.shape]


def test_bounded_layout_traces_static_shapes(device: str) -> None:
    """``max_recv_rows``: every size of the traced step is a plain int; the ragged layout's are not."""
    x = torch.randn(64, HIDDEN, device=device, dtype=torch.bfloat16)
    sizes = _traced_sizes(block(device, "bounded-bf16"), x)
    assert sizes and all(isinstance(d, int) for d in sizes), [d for d in sizes if not isinstance(d, int)]
    assert any(isinstance(d, torch.SymInt) for d in _traced_sizes(block(device, "ragged-bf16"), x))
