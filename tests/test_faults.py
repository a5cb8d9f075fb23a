"""Faults, on every backend that runs on CPU (the simulated ones through their simulators), over gloo:

* bad metadata on one rank (each of ``faults.MUTATIONS``): every rank raises the same ``MoEInputError``
  naming that rank, and the group still works afterwards (nothing moved before the error);
* hostile routing values with value checks off (no crash, ``tokens_per_expert + dropped`` counts exactly
  the valid routes) and on (a clear error on every rank);
* reruns are bitwise identical;
* a rank that dies between dispatch and combine: the survivor raises ``MoECommunicationError`` within
  ``moe_ops.config.peer_timeout_s``.

At W = 2 (``local``: 1). ``tools/faults.py`` runs all of it at W = 1…4, kills ranks at three points, and
prints the table of docs/reliability.md.
"""

import re
import time

import pytest
import torch

from moe_ops.testing import conformance, faults
from moe_ops.testing.harness import World

pytestmark = pytest.mark.multiproc

CASES = [(backend, layout) for backend, setup in faults.SETUPS.items() for layout in setup.layouts]


def _world(worlds, backend: str, interpreted_worlds) -> World:  # type: ignore[no-untyped-def]
    setup = faults.SETUPS[backend]
    size = 2 if 2 in setup.worlds else 1
    world = interpreted_worlds(size) if setup.env else worlds(size)
    world.run(faults.install, backend)
    return world


@pytest.fixture
def interpreted(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """``interpreted_worlds`` where a backend needs it (symm), resolved lazily: the others never skip."""
    return lambda size: request.getfixturevalue("interpreted_worlds")(size)


@pytest.mark.parametrize(("backend", "layout"), CASES)
def test_bad_metadata_on_one_rank(worlds, interpreted, backend: str, layout: str) -> None:
    world = _world(worlds, backend, interpreted)
    size = world.world_size
    p = faults.problem(backend, size, layout)
    bad_rank = size - 1
    for mutation in faults.MUTATIONS:
        if mutation in faults.DISAGREEMENTS and size == 1:
            continue  # alone, another hidden size or expert count is just another call
        outcomes = world.outcomes(faults.bad_metadata_task, p, backend, bad_rank, mutation, timeout=120)
        errors = [(o.error_type, o.message) for o in outcomes]
        assert all(o.error_type == "MoEInputError" for o in outcomes), (mutation, errors)
        assert len({o.message for o in outcomes}) == 1, (mutation, "ranks raised different messages", errors)
        if size > 1:
            assert f"rank {bad_rank}" in outcomes[0].message, (mutation, outcomes[0].message)  # names the rank
    conformance.check_world(world, p, backend)  # the group still works: nothing moved before the errors


@pytest.mark.parametrize(("backend", "layout"), CASES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_hostile_values(worlds, interpreted, backend: str, layout: str, id_dtype: torch.dtype) -> None:
    world = _world(worlds, backend, interpreted)
    p = faults.hostile_problem(backend, world.world_size, layout, id_dtype)
    unique = backend == "mc2"  # MC2 sends a token to one expert once: a repeated id is one route
    for rank, (counts, message) in enumerate(world.run(faults.hostile_task, p, backend, False)):
        assert message == "", message
        assert counts == faults.expected_counts(p, rank, unique), (rank, counts)
    messages = [message for _, message in world.run(faults.hostile_task, p, backend, True)]
    assert len(set(messages)) == 1 and re.search("topk_idx holds id|topk_weights holds NaN", messages[0]), messages


@pytest.mark.parametrize(("backend", "layout"), CASES)
def test_reruns_are_bitwise_identical(worlds, interpreted, backend: str, layout: str) -> None:
    world = _world(worlds, backend, interpreted)
    assert world.run(faults.rerun_task, faults.problem(backend, world.world_size, layout), backend, 3) == [0] * world.world_size


PEER_TIMEOUT_S = 3.0


@pytest.mark.parametrize("backend", [b for b, setup in faults.SETUPS.items() if 2 in setup.worlds])
def test_dead_rank_fails_the_survivor_in_bounded_time(backend: str, _interpreter_fault: str) -> None:
    setup = faults.SETUPS[backend]
    if setup.env and _interpreter_fault:
        pytest.skip(f"this Triton interpreter cannot run the kernels here: {_interpreter_fault}")
    p = faults.problem(backend, 2, setup.layouts[-1])
    with World(2, pg_timeout=60, env=dict(setup.env)) as world:
        world.run(faults.install, backend)
        world.run(faults.set_peer_timeout, PEER_TIMEOUT_S)
        start = time.monotonic()
        survivor, victim = world.outcomes(faults.die_task, p, backend, 1, "between", timeout=90)
    assert victim.error_type == "RankLost" and "exited with code 3" in victim.message, victim
    assert survivor.ok, (survivor.error_type, survivor.message, survivor.traceback)
    assert survivor.value <= PEER_TIMEOUT_S + 10, survivor.value  # the timeout, plus the error exchange
    assert time.monotonic() - start < 90
