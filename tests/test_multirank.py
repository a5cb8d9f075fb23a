"""Every multi-rank backend on real processes over gloo: the conformance suite for W = 1, 2, 3, 4,
compiled equals eager, bad input on one rank, and a rank that dies.

Example counts (2-core CI): Hypothesis draws EXAMPLES[W] problems per world size and backend (T up to
96 per rank, H up to 128, E up to 64); compiled runs use one fixed problem per world size and layout.
"""

import re
import time

import pytest
from hypothesis import given, settings

from moe_ops.testing import conformance
from moe_ops.testing.harness import World
from moe_ops.testing.problems import Problem, make_problem, padded, problems

pytestmark = pytest.mark.multiproc

WORLD_SIZES = (1, 2, 3, 4)
EXAMPLES = {1: 40, 2: 50, 3: 40, 4: 30}
LAYOUTS = {"collective": ("ragged", "padded"), "allgather": ("padded",)}
BACKEND_LAYOUTS = [(backend, layout) for backend, layouts in LAYOUTS.items() for layout in layouts]


@pytest.mark.parametrize("backend", LAYOUTS)
@pytest.mark.parametrize("size", WORLD_SIZES)
def test_property(worlds, backend: str, size: int) -> None:
    @settings(max_examples=EXAMPLES[size])
    @given(problem=problems(world_size=size, max_tokens=96, max_experts=64, hidden_sizes=(1, 7, 64, 128), layouts=LAYOUTS[backend]))
    def check(problem: Problem) -> None:
        conformance.check_world(worlds(size), problem, backend)

    check()


@pytest.mark.parametrize("backend, layout", BACKEND_LAYOUTS)
@pytest.mark.parametrize("size", WORLD_SIZES)
def test_edge_cases(worlds, backend: str, layout: str, size: int) -> None:
    kw = padded(40, 4) if layout == "padded" else {}
    uneven = [40, 0, 13, 1][:size]  # a rank with no tokens (when size > 1)
    for pattern in ("one_rank", "one_expert", "all_masked", "uniform"):
        problem = make_problem(uneven, 16, 4 * size, 2, pattern=pattern, mask_fraction=0.3, seed=3, **kw)
        conformance.check_world(worlds(size), problem, backend)


@pytest.mark.parametrize("backend, layout", BACKEND_LAYOUTS)
@pytest.mark.parametrize("size", WORLD_SIZES)
def test_compiled_equals_eager(worlds, backend: str, layout: str, size: int) -> None:
    kw = padded(24, 6) if layout == "padded" else {}
    problem = make_problem([24, 0, 9, 17][:size], 32, 4 * size, 3, mask_fraction=0.2, seed=9, **kw)
    conformance.check_world(worlds(size), problem, backend, compiled=True)


@pytest.mark.parametrize("backend, layout", BACKEND_LAYOUTS)
@pytest.mark.parametrize("mutation", conformance.BAD_INPUTS)
def test_bad_input_on_one_rank(worlds, backend: str, layout: str, mutation: str) -> None:
    size = 3
    problem = make_problem([20, 11, 5], 8, 6, 2, seed=5, **(padded(20, 4) if layout == "padded" else {}))
    outcomes = worlds(size).outcomes(conformance.bad_input_task, problem, backend, 1, mutation, timeout=60)
    assert all(o.error_type == "MoEInputError" for o in outcomes), [(o.rank, o.error_type, o.message) for o in outcomes]
    assert len({o.message for o in outcomes}) == 1, "ranks raised different messages"
    assert "rank(s) [1]" in outcomes[0].message or "rank 1:" in outcomes[0].message, outcomes[0].message
    conformance.check_world(worlds(size), problem, backend)  # the group still works


@pytest.mark.parametrize("backend, layout", BACKEND_LAYOUTS)
def test_dead_rank_fails_the_others_in_bounded_time(backend: str, layout: str) -> None:
    problem = make_problem([12, 7], 8, 4, 2, seed=6, **(padded(12, 4) if layout == "padded" else {}))
    start = time.monotonic()
    with World(2, pg_timeout=5) as w:
        outcomes = w.outcomes(conformance.die_task, problem, backend, 1, timeout=60)
    assert time.monotonic() - start < 60
    survivor, victim = outcomes
    assert victim.error_type == "RankLost" and "exited with code 3" in victim.message
    assert survivor.error_type == "MoECommunicationError", (survivor.error_type, survivor.message)
    assert re.search(r"moe\.combine .* failed; a peer may have exited", survivor.message), survivor.message


@pytest.mark.parametrize("backend, layout", BACKEND_LAYOUTS)
def test_opcheck(worlds, backend: str, layout: str) -> None:
    kw = padded(20, 5) if layout == "padded" else {}
    worlds(2).run(conformance.opcheck_task, make_problem([20, 9], 16, 8, 3, mask_fraction=0.2, seed=2, **kw), backend)
