"""A dispatch's plan and checks run once per signature (moe_ops/ops.py, ``_planned``): a training step
repeats the same dispatch, so its metadata checks are not repeated; anything the checks read changes
the signature, bad input raises on every call, and backends that check state of their own are checked
every call."""

import pytest
import torch

from moe_ops import MoEInputError, ops
from moe_ops.backends.base import Backend

E, K = 8, 2


@pytest.fixture
def planned(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The group names :func:`ops._plan_dispatch` was called with, call by call, from an empty cache."""
    monkeypatch.setattr(ops, "_PLANS", {})
    calls: list[str] = []
    plan = ops._plan_dispatch

    def counting(*args, **kwargs):
        calls.append(args[5].group_name)
        return plan(*args, **kwargs)

    monkeypatch.setattr(ops, "_plan_dispatch", counting)
    return calls


def _inputs(tokens: int = 6, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    w, idx = torch.topk(torch.rand(tokens, E), K)
    return torch.randn(tokens, 4, dtype=dtype), idx, w


def test_once_per_signature(planned: list[str]) -> None:
    x, idx, w = _inputs()
    first = torch.ops.moe.dispatch(x, idx, w, num_experts=E)
    again = torch.ops.moe.dispatch(x + 1, idx, w, num_experts=E)  # other values, the same signature
    assert planned == [""]
    torch.testing.assert_close(again[0], first[0] + 1)
    changes = [
        dict(x=x.to(torch.bfloat16)),  # dtype
        dict(x=torch.randn(4, 6).t()),  # strides: not contiguous, refused
        dict(x=x[:5], idx=idx[:5], w=w[:5]),  # shape
        dict(options=dict(max_recv_rows=12, max_tokens_per_rank=6)),  # an option
    ]
    for i, change in enumerate(changes):
        args = dict(x=x, idx=idx, w=w, options={}) | change
        try:
            torch.ops.moe.dispatch(args["x"], args["idx"], args["w"], num_experts=E, **args["options"])
        except MoEInputError:
            assert i == 1
        assert len(planned) == 2 + i, f"change {change} was not planned afresh"


def test_bad_input_raises_every_call(planned: list[str]) -> None:
    x, idx, w = _inputs()
    for _ in range(3):
        with pytest.raises(MoEInputError, match="topk_weights must have dtype"):
            torch.ops.moe.dispatch(x, idx, w.half(), num_experts=E)
    assert len(planned) == 3


def test_backends_with_their_own_checks_check_every_call(planned: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend overriding ``check_dispatch`` (DeepEP's buffers, MC2's communication domain) is planned on
    every call; the base class's checks (metadata alone) are cached."""
    from moe_ops.backends.local import LocalBackend

    checked: list[int] = []
    monkeypatch.setattr(LocalBackend, "check_dispatch", lambda self, *args: checked.append(1), raising=False)
    x, idx, w = _inputs()
    for _ in range(3):
        torch.ops.moe.dispatch(x, idx, w, num_experts=E)
    assert len(planned) == 3 and len(checked) == 3
    monkeypatch.setattr(LocalBackend, "check_dispatch", Backend.check_dispatch)
    for _ in range(3):
        torch.ops.moe.dispatch(x, idx, w, num_experts=E)
    assert len(planned) == 4


def test_kept_plans_are_bounded(planned: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "KEPT", 3)
    for tokens in range(1, 6):  # a ragged batch of another size each step: a signature each
        x, idx, w = _inputs(tokens)
        torch.ops.moe.dispatch(x, idx, w, num_experts=E)
    assert len(ops._PLANS) == 3 and len(planned) == 5
    x, idx, w = _inputs(1)  # the oldest went first
    torch.ops.moe.dispatch(x, idx, w, num_experts=E)
    assert len(planned) == 6


def test_a_backend_registered_again_is_planned_afresh(planned: list[str]) -> None:
    from moe_ops import backends

    x, idx, w = _inputs()
    torch.ops.moe.dispatch(x, idx, w, num_experts=E)
    backends.register(backends._REGISTRY["local"])  # (a user's backend of that name would take its place)
    torch.ops.moe.dispatch(x, idx, w, num_experts=E)
    assert len(planned) == 2


def test_combine_and_backward_checks_once_per_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for the ops that take a handle: checked once per signature (rows, weights, every handle
    tensor), bad input raising every call."""
    monkeypatch.setattr(ops, "_CHECKED", {})
    checks = ops._check_handle_call
    calls: list[str] = []

    def counting(name, *args, **kwargs):
        calls.append(name)
        return checks(name, *args, **kwargs)

    monkeypatch.setattr(ops, "_check_handle_call", counting)
    x, idx, w = _inputs()
    recv_x, recv_w, _, _, handle = torch.ops.moe.dispatch(x, idx, w, num_experts=E)
    for _ in range(3):
        out = torch.ops.moe.combine(recv_x, recv_w, handle)
        torch.ops.moe.dispatch_backward(recv_x, recv_w, handle)
    assert calls == ["expert_out", "grad_recv_x"]
    torch.testing.assert_close(out, x * w.sum(-1, keepdim=True))
    for _ in range(2):
        with pytest.raises(MoEInputError, match="recv_weights"):
            torch.ops.moe.combine(recv_x, recv_w[:-1], handle)
    assert calls == ["expert_out", "grad_recv_x", "expert_out", "expert_out"]
    other = torch.ops.moe.dispatch(x[:5], idx[:5], w[:5], num_experts=E)  # another handle's shapes
    torch.ops.moe.combine(other[0], other[1], other[4])
    assert len(calls) == 5
