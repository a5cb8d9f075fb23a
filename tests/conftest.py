import os
from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

from moe_ops.testing.harness import TRITON_INTERPRETED, World, interpreter_fault

# Example counts: "ci" is the default (CPU CI, 2 cores); "thorough" for a longer local run.
settings.register_profile(
    "ci", max_examples=200, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets its share of the cores: with every worker's thread pool as
    wide as the machine, the reference's many small CPU ops took over 90 s instead of 3 s per test on
    the 32-core GPU loaner."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(CUDA)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> str:
    """Every device test runs on the CPU and, where present, on CUDA."""
    return request.param


@pytest.fixture(scope="session")
def worlds() -> Iterator[Callable[..., World]]:
    """``worlds(size, env=None)``: a live gloo world of ``size`` worker processes (started with the extra
    environment ``env``), shared by every test of the session and made anew after a failure killed it."""
    cache: dict[tuple[object, ...], World] = {}

    def get(size: int, env: dict[str, str] | None = None) -> World:
        key = (size, tuple(sorted((env or {}).items())))
        if key not in cache or not cache[key].alive:
            cache[key] = World(size, env=env)
        return cache[key]

    yield get
    for world in cache.values():
        world.close()


@pytest.fixture(scope="session")
def _interpreter_fault(worlds) -> str:  # type: ignore[no-untyped-def]
    return worlds(1, env=TRITON_INTERPRETED).run(interpreter_fault)[0]


@pytest.fixture
def interpreted_worlds(worlds, _interpreter_fault: str) -> Callable[[int], World]:  # type: ignore[no-untyped-def]
    """``interpreted_worlds(size)``: a gloo world whose workers run the Triton kernels on CPU tensors,
    interpreted; the test skips (saying why) where this Triton interpreter cannot run them."""
    if _interpreter_fault:
        pytest.skip(f"this Triton interpreter cannot run the kernels here: {_interpreter_fault}")
    return lambda size: worlds(size, env=TRITON_INTERPRETED)
