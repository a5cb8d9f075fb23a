"""torch.library.opcheck of every op (schema, fake kernel, autograd registration, AOT dispatch static and dynamic)."""

import pytest
import torch

import moe_ops  # noqa: F401
from moe_ops.testing.problems import make_problem

# opcheck compares outputs across runs, so padding rows must be deterministic: zero_padding.
LAYOUTS = {
    "ragged": {"layout": "ragged"},
    "padded": {"layout": "padded", "capacity": 5, "max_tokens_per_rank": 40, "zero_padding": True},
    "padded-worst-case": {"layout": "padded", "max_tokens_per_rank": 40, "zero_padding": True},
}


def inputs(device: str, dtype: torch.dtype = torch.float32, tokens: int = 33) -> tuple[torch.Tensor, ...]:
    p = make_problem([tokens], 16, 8, 3, mask_fraction=0.2, dtype=dtype, seed=11)
    x = p.xs[0].to(device).requires_grad_()
    w = p.topk_weights[0].to(device).requires_grad_()
    return x, p.topk_idx[0].to(device), w


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch(device: str, layout: str, dtype: torch.dtype) -> None:
    torch.library.opcheck(torch.ops.moe.dispatch.default, inputs(device, dtype), dict(num_experts=8, **LAYOUTS[layout]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_combine_and_backward_ops(device: str, layout: str) -> None:
    x, idx, w = inputs(device)
    recv_x, recv_w, _, _, handle = torch.ops.moe.dispatch(x, idx, w, num_experts=8, **LAYOUTS[layout])
    expert_out = (recv_x.detach() * 1.5).requires_grad_()
    recv_w = recv_w.detach().requires_grad_()
    torch.library.opcheck(torch.ops.moe.combine.default, (expert_out, recv_w, handle))
    grad_rows = torch.randn_like(recv_x)
    torch.library.opcheck(torch.ops.moe.dispatch_backward.default, (grad_rows, torch.randn_like(recv_w), handle))
    torch.library.opcheck(
        torch.ops.moe.combine_backward.default,
        (torch.randn_like(x), expert_out.detach(), recv_w.detach(), handle),
    )


def test_empty_batch(device: str) -> None:
    x, idx, w = inputs(device, tokens=0)
    torch.library.opcheck(torch.ops.moe.dispatch.default, (x, idx, w), dict(num_experts=8))
