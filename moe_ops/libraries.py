"""The libraries transports run on, found by name, and the one seam through which tests put a simulator
in a library's place.

:func:`load` imports the real library on first use (``import moe_ops`` imports none of them), unless a
simulator was installed under that name with :func:`install` (only ``moe_ops.testing.sim`` does, in
tests). A simulator has the library's API and says which device types it runs on in its
``SIMULATED_DEVICE_TYPES``, which the backends add to the devices they accept.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

#: name -> the module a backend imports
MODULES = {
    "deep_ep": "deep_ep",  # DeepEP, or UCCL-EP's drop-in deep_ep
    "torch_npu": "torch_npu",  # Ascend: the MC2 ops and the MoE permute kernels
    "symmetric_memory": "torch.distributed._symmetric_memory",
}
_simulators: dict[str, ModuleType] = {}


def load(name: str) -> ModuleType:
    """The library ``name`` (a key of :data:`MODULES`), or the simulator installed in its place.
    Raises ``ImportError`` where neither is there."""
    simulator = _simulators.get(name)
    return simulator if simulator is not None else importlib.import_module(MODULES[name])


def current(name: str) -> ModuleType | None:
    """The simulator installed as ``name``, else the library if already imported; never imports it."""
    return _simulators.get(name) or sys.modules.get(MODULES[name])


def simulated_device_types(name: str) -> frozenset[str]:
    """The device types the simulator installed as ``name`` runs on (none when the real library is used)."""
    return frozenset(getattr(_simulators.get(name), "SIMULATED_DEVICE_TYPES", ()))


def install(name: str, simulator: ModuleType) -> None:
    """Put ``simulator`` in library ``name``'s place (tests only)."""
    if name not in MODULES:
        raise KeyError(f"no library {name!r}; known: {', '.join(MODULES)}")
    _simulators[name] = simulator


def uninstall(name: str) -> None:
    """Use the real library ``name`` again."""
    _simulators.pop(name, None)
