"""A handle knows the backend and the layout that made it (docs/contract.md, "The handle"): ``combine`` and
the backward ops with ``backend="auto"`` run the producing backend, and naming another backend is a
``MoEInputError`` naming both, on every rank, before any communication. Checked for every ordered pair of
backends that run on the same device (CPU here, the simulated ones through their simulators, W = 2),
eager and traced with fake tensors (what ``torch.compile`` runs), plus one ``fullgraph`` compile per
producing backend."""

import pytest
import torch
import torch.distributed as dist

import moe_ops
from moe_ops import MoEInputError
from moe_ops.testing import conformance, sim
from moe_ops.testing.harness import set_up
from moe_ops.testing.problems import Problem, make_problem, padded

pytestmark = pytest.mark.multiproc

PADDED = ("collective", "allgather", "symm", "deepep", "deepep_ll", "mc2", "mc2_int8")
RAGGED = ("collective", "symm", "deepep")
SIMULATORS = ("deep_ep", "torch_npu", "symmetric_memory")


def _install_all(rank: int) -> None:
    for name in SIMULATORS:
        sim.install(name)


@pytest.fixture
def world(interpreted_worlds):
    """A W = 2 world with every simulator installed (its Triton kernels interpreted: symm's put kernel)."""
    return set_up(interpreted_worlds, _install_all)(2)


def problem(layout: str) -> Problem:
    """A problem every backend of the layout takes: bf16 (DeepEP), H = 2048 (DeepEP's low-latency sizes)."""
    kw = padded(6, 4) if layout == "padded" else {}
    return make_problem([6, 3], 2048, 4, 2, dtype=torch.bfloat16, mask_fraction=0.2, seed=3, **kw)


def _calls(d: moe_ops.DispatchResult, group: str, backend: str) -> dict[str, object]:
    """combine and both backward ops on ``d``'s handle with ``backend``."""
    grad_x = torch.zeros(d.handle[1].shape[0], d.recv_x.shape[-1], dtype=d.recv_x.dtype)
    comm = dict(group_name=group, backend=backend)
    return {
        "combine": lambda: torch.ops.moe.combine(d.recv_x, d.recv_weights, d.handle, **comm),
        "dispatch_backward": lambda: torch.ops.moe.dispatch_backward(d.recv_x, d.recv_weights, d.handle, **comm),
        "combine_backward": lambda: torch.ops.moe.combine_backward(grad_x, d.recv_x, d.recv_weights, d.handle, **comm),
    }


def _pairs_task(rank: int, problem: Problem, backends: tuple[str, ...]) -> dict[str, object]:
    """For each producing backend: combine with ``"auto"`` equals combine naming it; every other backend
    named in combine or a backward op raises (the messages, per op); the same calls traced with fake tensors."""
    from torch.fx.experimental.proxy_tensor import make_fx

    group = dist.group.WORLD.group_name
    x, idx, w = problem.xs[rank], problem.topk_idx[rank], problem.topk_weights[rank]
    report: dict[str, object] = {}
    for made_by in backends:
        d = moe_ops.dispatch(x, idx, w, problem.num_experts, group=group, backend=made_by, **problem.dispatch_kwargs())
        same = torch.equal(moe_ops.combine(d.recv_x, d, group=group), moe_ops.combine(d.recv_x, d, group=group, backend=made_by))
        eager, traced = {}, {}
        for other in backends:
            if other == made_by:
                continue
            for op, call in _calls(d, group, other).items():
                eager[(other, op)] = _message(call)
            step = _wrong_combine(problem, rank, group, made_by, other)
            traced[other] = _message(lambda step=step: make_fx(step, tracing_mode="fake", _allow_non_fake_inputs=True)(x))
        report[made_by] = (same, eager, traced)
    return report


def _wrong_combine(problem: Problem, rank: int, group: str, made_by: str, other: str):  # type: ignore[no-untyped-def]
    """``x -> combine(dispatch(x) on made_by, backend=other)`` with this rank's routes."""
    idx, w = problem.topk_idx[rank], problem.topk_weights[rank]

    def step(x: torch.Tensor) -> torch.Tensor:
        d = moe_ops.dispatch(x, idx, w, problem.num_experts, group=group, backend=made_by, **problem.dispatch_kwargs())
        return moe_ops.combine(d.recv_x, d, group=group, backend=other)

    return step


def _message(call: object) -> str:
    """The message of the MoEInputError ``call()`` raises, directly or wrapped by a tracer (dynamo reports
    an error of a fake kernel as its own TorchRuntimeError, quoting it); "" if nothing is raised."""
    try:
        call()  # type: ignore[operator]
    except MoEInputError as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 - the test inspects what was raised
        return str(error) if "MoEInputError(" in str(error) else f"not a MoEInputError: {error!r}"
    return ""


@pytest.mark.parametrize(("layout", "backends"), [("padded", PADDED), ("ragged", RAGGED)])
def test_other_backend_on_a_handle_is_refused(world, layout: str, backends: tuple[str, ...]) -> None:
    reports = world.run(_pairs_task, problem(layout), backends)
    assert reports[0] == reports[1], "ranks saw different outcomes"
    for made_by, (same, eager, traced) in reports[0].items():
        assert same, f"{made_by}: combine with backend='auto' differs from combine naming {made_by!r}"
        for (other, op), message in eager.items():
            assert f"backend={other!r}, but the handle was made by backend {made_by!r}" in message, (made_by, other, op, message)
        for other, message in traced.items():
            assert f"backend={other!r}, but the handle was made by backend {made_by!r}" in message, (made_by, other, message)


def _compiled_task(rank: int, problem: Problem, made_by: str, other: str) -> tuple[conformance.RankResult, object, str]:
    """``fullgraph`` compile: the pipeline with combine on ``"auto"`` (conformance, no graph break), then
    one that names ``other`` for combine (refused at trace time)."""
    result, stats = conformance.rank_task(rank, problem, made_by, compiled=True)
    wrong = _wrong_combine(problem, rank, dist.group.WORLD.group_name, made_by, other)
    torch._dynamo.reset()
    return result, stats, _message(lambda: torch.compile(wrong, fullgraph=True)(problem.xs[rank]))


@pytest.mark.parametrize(("made_by", "other"), [("collective", "allgather"), ("allgather", "collective"), ("deepep", "deepep_ll")])
def test_compiled_combine_runs_the_producing_backend(world, made_by: str, other: str) -> None:
    """The report's case (allgather dispatch, combine on "auto") and its mirror, compiled."""
    prob = problem("padded")
    outcomes = world.run(_compiled_task, prob, made_by, other)
    ref, mag = conformance.expected(prob)
    for rank, (result, stats, message) in enumerate(outcomes):
        conformance.assert_rank_matches(prob, rank, result, ref[rank], mag[rank])
        assert stats.graph_breaks == 0, stats
        assert f"backend={other!r}, but the handle was made by backend {made_by!r}" in message, message


# what a bad handle does in a world of one, where no peer is involved
def test_handle_tag_names_backend_and_layout() -> None:
    x, idx, w = torch.randn(5, 8), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    ragged = moe_ops.dispatch(x, idx, w, 4)
    padded_d = moe_ops.dispatch(x, idx, w, 4, layout="padded", max_tokens_per_rank=5)
    assert ragged.handle[0].numel() == 0 and ragged.handle[0].shape[2] != padded_d.handle[0].shape[2]
    swapped = [padded_d.handle[0], *ragged.handle[1:]]  # a padded tag on a ragged handle
    with pytest.raises(MoEInputError, match="handle\\[2\\] must be the padded layout's int64 row map"):
        moe_ops.combine(ragged.recv_x, ragged._replace(handle=swapped))
    with pytest.raises(MoEInputError, match="backend='collective', but the handle was made by backend 'local'"):
        moe_ops.combine(ragged.recv_x, ragged, backend="collective")

