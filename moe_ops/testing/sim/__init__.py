"""CPU simulators of the libraries the transports run on, one per library, and the one way to put any
of them in its library's place (:mod:`moe_ops.libraries`):

* ``"deep_ep"`` (:mod:`.deep_ep`): DeepEP's V1 ``Buffer``, one module per mode;
* ``"torch_npu"`` (:mod:`.torch_npu`): torch_npu's MC2 ops and MoE permute kernels;
* ``"symmetric_memory"`` (:mod:`.symmetric_memory`): ``torch.distributed._symmetric_memory`` as shared
  memory between the processes of a gloo group.

Each runs on CPU tensors over a gloo group, with real data exchanged between the processes. Tests only:
nothing in moe_ops installs a simulator.

    sim.install("torch_npu", version=1)         # in this process
    world.run(sim.install_on_rank, "deep_ep")   # in every worker of a moe_ops.testing.harness.World
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from moe_ops import libraries

_MODULES = {name: f"moe_ops.testing.sim.{name}" for name in ("deep_ep", "torch_npu", "symmetric_memory")}


def install(name: str, **options: Any) -> ModuleType:
    """Put the simulator of library ``name`` in its place in this process (replacing an earlier one).
    ``options`` go to the simulator's ``simulator(**options)`` where it has one (torch_npu: ``version``,
    ``tamper``, ``soc``)."""
    package = importlib.import_module(_MODULES[name])
    make = getattr(package, "simulator", None)
    module = make(**options) if make is not None else package
    libraries.install(name, module)
    return module


def uninstall(name: str) -> None:
    """Use the real library ``name`` again in this process."""
    libraries.uninstall(name)


def install_on_rank(rank: int, name: str, **options: Any) -> None:
    """:class:`moe_ops.testing.harness.World` task: :func:`install` in that worker."""
    install(name, **options)
