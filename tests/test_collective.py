"""The collective backend on real processes over gloo: the conformance suite for W = 1, 2, 3, 4, compiled
equals eager, bad input on one rank, and a rank that dies.

Example counts (2-core CI): Hypothesis draws EXAMPLES[W] problems per world size (T up to 96 per rank,
H up to 128, E up to 64); compiled runs use two fixed problems per world size.
"""

import re
import time

import pytest
from hypothesis import given, settings

from moe_ops.testing import conformance
from moe_ops.testing.harness import World, WorldPool
from moe_ops.testing.problems import Problem, make_problem, problems

pytestmark = pytest.mark.multiproc

WORLD_SIZES = (1, 2, 3, 4)
EXAMPLES = {1: 50, 2: 60, 3: 50, 4: 40}
_worlds = WorldPool()
world = _worlds.get


@pytest.fixture(scope="module", autouse=True)
def _close_worlds():
    yield
    _worlds.close()


def drawn(size: int):
    return problems(world_size=size, max_tokens=96, max_experts=64, hidden_sizes=(1, 7, 64, 128))


@pytest.mark.parametrize("size", WORLD_SIZES)
def test_property(size: int) -> None:
    @settings(max_examples=EXAMPLES[size])
    @given(problem=drawn(size))
    def check(problem: Problem) -> None:
        conformance.check_world(world(size), problem, "collective")

    check()


@pytest.mark.parametrize("size", WORLD_SIZES)
@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_edge_cases(size: int, layout: str) -> None:
    kw = dict(layout="padded", capacity=4, max_tokens_per_rank=40) if layout == "padded" else {}
    uneven = [40, 0, 13, 1][:size]  # a rank with no tokens (when size > 1)
    for pattern in ("one_rank", "one_expert", "all_masked", "uniform"):
        conformance.check_world(world(size), make_problem(uneven, 16, 4 * size, 2, pattern=pattern, mask_fraction=0.3, seed=3, **kw), "collective")


@pytest.mark.parametrize("size", WORLD_SIZES)
@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_compiled_equals_eager(size: int, layout: str) -> None:
    kw = dict(layout="padded", capacity=6, max_tokens_per_rank=24) if layout == "padded" else {}
    tokens = [24, 0, 9, 17][:size]
    conformance.check_world(world(size), make_problem(tokens, 32, 4 * size, 3, mask_fraction=0.2, seed=9, **kw), "collective", compiled=True)


@pytest.mark.parametrize("layout", ["ragged", "padded"])
@pytest.mark.parametrize("mutation", conformance.BAD_INPUTS)
def test_bad_input_on_one_rank(layout: str, mutation: str) -> None:
    size = 3
    kw = dict(layout="padded", capacity=4, max_tokens_per_rank=20) if layout == "padded" else {}
    problem = make_problem([20, 11, 5], 8, 6, 2, seed=5, **kw)
    outcomes = world(size).outcomes(conformance.bad_input_task, problem, "collective", 1, mutation, timeout=60)
    assert all(o.error_type == "MoEInputError" for o in outcomes), [(o.rank, o.error_type, o.message) for o in outcomes]
    assert len({o.message for o in outcomes}) == 1, "ranks raised different messages"
    assert "rank(s) [1]" in outcomes[0].message or "rank 1:" in outcomes[0].message, outcomes[0].message
    conformance.check_world(world(size), problem, "collective")  # the group still works


def test_dead_rank_fails_the_others_in_bounded_time() -> None:
    problem = make_problem([12, 7], 8, 4, 2, seed=6)
    start = time.monotonic()
    with World(2, pg_timeout=5) as w:
        outcomes = w.outcomes(conformance.die_task, problem, "collective", 1, timeout=60)
    assert time.monotonic() - start < 60
    survivor, victim = outcomes
    assert victim.error_type == "RankLost" and "exited with code 3" in victim.message
    assert survivor.error_type == "MoECommunicationError", (survivor.error_type, survivor.message)
    assert re.search(r"moe\.combine .* failed; a peer may have exited", survivor.message), survivor.message


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_opcheck(layout: str) -> None:
    kw = dict(layout="padded", capacity=5, max_tokens_per_rank=20) if layout == "padded" else {}
    world(2).run(conformance.opcheck_task, make_problem([20, 9], 16, 8, 3, mask_fraction=0.2, seed=2, **kw), "collective")
