"""The local stage through torch_npu's permute kernels (moe_ops/npu_stage.py), run on CPU tensors by the
simulator of moe_ops.testing.npu_sim with ``config.kernels = "npu"``: the local backend's conformance
against the reference, and the calls the kernels receive."""

from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings

from moe_ops import config
from moe_ops.testing import conformance, npu_sim
from moe_ops.testing.problems import Problem, make_problem, problems


@pytest.fixture(autouse=True)
def _npu_kernels() -> Iterator[None]:
    previous = config.kernels
    npu_sim.install()
    config.kernels = "npu"
    yield
    config.kernels = previous
    npu_sim.uninstall()


def check(problem: Problem) -> list[str]:
    """The local backend's conformance on ``problem``; the names of the kernels it called."""
    before = len(npu_sim.calls())
    ours = conformance.run_rank(problem, 0, backend="local")
    ref, mag = conformance.expected(problem)
    conformance.assert_rank_matches(problem, 0, ours, ref[0], mag[0])
    return [call.op for call in npu_sim.calls()[before:]]


@settings(max_examples=60)
@given(problem=problems(world_size=1, max_tokens=64, max_experts=32, hidden_sizes=(1, 7, 64)))
def test_property(problem: Problem) -> None:
    check(problem)


def test_ragged_dispatch_sorts_unique_keys() -> None:
    """The permute kernel gets one key per route (so its tie-breaking cannot change the order) and
    every valid route comes out, in the contract's order (checked against the reference)."""
    ops = check(make_problem([40], 16, 8, 3, mask_fraction=0.3, out_of_range=True, dtype=torch.bfloat16, seed=4))
    assert "npu_moe_token_permute" in ops
    keys = next(c.kwargs["indices"] for c in npu_sim.calls() if c.op == "npu_moe_token_permute")
    assert keys.shape == (40, 3) and keys.unique().numel() == keys.numel()


def test_unpermute_where_every_route_has_a_row() -> None:
    """No masked route: combine and dispatch's backward sum through the unpermute kernel."""
    ops = check(make_problem([32], 16, 8, 2, dtype=torch.float16, seed=6))
    assert ops.count("npu_moe_token_unpermute") == 2


def test_plain_torch_elsewhere() -> None:
    """Masked routes (combine) and the padded layout stay in plain torch."""
    assert check(make_problem([32], 16, 8, 2, mask_fraction=0.5, seed=6)) == ["npu_moe_token_permute"]
    kw = dict(layout="padded", capacity=4, max_tokens_per_rank=32)
    assert check(make_problem([32], 16, 8, 2, seed=6, **kw)) == []
