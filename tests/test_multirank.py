"""Every multi-rank backend on real processes over gloo: the conformance suite for W = 1, 2, 3, 4,
compiled equals eager, opcheck (faults: tests/test_faults.py).

Example counts (2-core CI): Hypothesis draws EXAMPLES[W] problems per world size and backend (T up to
96 per rank, H up to 128, E up to 64); compiled runs use one fixed problem per world size and layout.
"""

import pytest
from hypothesis import given, settings

from moe_ops.testing import conformance
from moe_ops.testing.problems import Problem, make_problem, padded, problems

pytestmark = pytest.mark.multiproc

WORLD_SIZES = (1, 2, 3, 4)
EXAMPLES = {1: 40, 2: 50, 3: 40, 4: 30}
LAYOUTS = {"collective": ("ragged", "padded", "bounded"), "allgather": ("padded", "bounded")}
BACKEND_LAYOUTS = [(backend, layout) for backend, layouts in LAYOUTS.items() for layout in layouts]


@pytest.mark.parametrize("backend", LAYOUTS)
@pytest.mark.parametrize("size", WORLD_SIZES)
def test_property(worlds, backend: str, size: int) -> None:
    @settings(max_examples=EXAMPLES[size])
    @given(problem=problems(world_size=size, max_tokens=96, max_experts=64, hidden_sizes=(1, 7, 64, 128), layouts=LAYOUTS[backend]))
    def check(problem: Problem) -> None:
        conformance.check_world(worlds(size), problem, backend)

    check()


def layout_kwargs(layout: str, max_tokens: int, capacity: int) -> dict[str, object]:
    """Keyword arguments of a problem in ``layout`` (``"bounded"``: ragged with ``max_recv_rows``, here
    ``capacity`` rows per local expert on average, so the last experts lose routes)."""
    if layout == "padded":
        return padded(max_tokens, capacity)
    if layout == "bounded":
        return dict(max_tokens_per_rank=max_tokens, max_recv_rows=4 * capacity)
    return {}


@pytest.mark.parametrize("backend, layout", BACKEND_LAYOUTS)
@pytest.mark.parametrize("size", WORLD_SIZES)
def test_edge_cases(worlds, backend: str, layout: str, size: int) -> None:
    kw = layout_kwargs(layout, 40, 4)
    uneven = [40, 0, 13, 1][:size]  # a rank with no tokens (when size > 1)
    for pattern in ("one_rank", "one_expert", "all_masked", "uniform"):
        problem = make_problem(uneven, 16, 4 * size, 2, pattern=pattern, mask_fraction=0.3, seed=3, **kw)
        conformance.check_world(worlds(size), problem, backend)


@pytest.mark.parametrize("backend, layout", BACKEND_LAYOUTS)
@pytest.mark.parametrize("size", WORLD_SIZES)
def test_compiled_equals_eager(worlds, backend: str, layout: str, size: int) -> None:
    kw = layout_kwargs(layout, 24, 6)
    problem = make_problem([24, 0, 9, 17][:size], 32, 4 * size, 3, mask_fraction=0.2, seed=9, **kw)
    conformance.check_world(worlds(size), problem, backend, compiled=True)


@pytest.mark.parametrize("backend, layout", BACKEND_LAYOUTS)
def test_opcheck(worlds, backend: str, layout: str) -> None:
    kw = layout_kwargs(layout, 20, 5)
    worlds(2).run(conformance.opcheck_task, make_problem([20, 9], 16, 8, 3, mask_fraction=0.2, seed=2, **kw), backend)
