"""torch.autograd.gradcheck in float64 of dispatch, combine, and the chain, in both layouts."""

import pytest
import torch

import moe_ops
from moe_ops.testing.problems import make_problem

LAYOUTS = {"ragged": {}, "padded": {"layout": "padded", "capacity": 3, "max_tokens_per_rank": 12}}


def problem(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = make_problem([12], 5, 6, 3, mask_fraction=0.2, out_of_range=True, dtype=torch.float64, seed=4)
    x = p.xs[0].to(device).requires_grad_()
    w = p.topk_weights[0].double().to(device).requires_grad_()
    return x, p.topk_idx[0].to(device), w


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dispatch(device: str, layout: str) -> None:
    x, idx, w = problem(device)

    def f(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = moe_ops.dispatch(x, idx, w, 6, **LAYOUTS[layout])
        return d.recv_x, d.recv_weights

    assert torch.autograd.gradcheck(f, (x, w))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_combine(device: str, layout: str) -> None:
    x, idx, w = problem(device)
    d = moe_ops.dispatch(x.detach(), idx, w.detach(), 6, **LAYOUTS[layout])
    expert_out = torch.randn_like(d.recv_x).requires_grad_()
    recv_w = d.recv_weights.clone().requires_grad_()

    def f(expert_out: torch.Tensor, recv_w: torch.Tensor) -> torch.Tensor:
        return torch.ops.moe.combine(expert_out, recv_w, d.handle)

    assert torch.autograd.gradcheck(f, (expert_out, recv_w))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chain(device: str, layout: str) -> None:
    """dispatch → a nonlinear expert → combine, gradients with respect to tokens and router weights."""
    x, idx, w = problem(device)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        d = moe_ops.dispatch(x, idx, w, 6, **LAYOUTS[layout])
        return moe_ops.combine(torch.tanh(d.recv_x) * 2, d)

    assert torch.autograd.gradcheck(f, (x, w))
