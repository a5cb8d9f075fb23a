"""Backend registry: one :class:`Backend` per transport, chosen by name or by ``"auto"``."""

from __future__ import annotations

from moe_ops import handshake
from moe_ops.backends.base import Backend, DispatchOutputs, DispatchPlan, Layout

_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Make ``backend`` selectable by its name."""
    _REGISTRY[backend.name] = backend
    handshake.code(backend.name)  # lets handshake errors name a peer's backend
    return backend


def available() -> list[str]:
    return sorted(_REGISTRY)


def _auto(device_type: str, world_size: int, layout: Layout) -> str:
    if world_size == 1:
        return "local"
    if device_type == "npu" and layout == "padded":
        return "mc2"
    return "collective"


def resolve(name: str, device_type: str, world_size: int, layout: Layout) -> Backend:
    """The backend ``name`` (``"auto"``: chosen from device and group size), checked against the call."""
    chosen = _auto(device_type, world_size, layout) if name == "auto" else name
    backend = _REGISTRY.get(chosen)
    if backend is None:
        raise ValueError(f"moe_ops: unknown backend {chosen!r}; available: {', '.join(available())}")
    if device_type not in backend.device_types:
        raise ValueError(f"moe_ops: backend {chosen!r} does not run on {device_type!r} tensors")
    if layout not in backend.layouts:
        raise ValueError(f"moe_ops: backend {chosen!r} has no {layout} layout")
    if world_size > 1 and not backend.multi_rank:
        raise ValueError(f"moe_ops: backend {chosen!r} runs without a group only, but the group has {world_size} ranks")
    return backend


def _register_builtin() -> None:
    from moe_ops.backends.allgather import AllGatherBackend
    from moe_ops.backends.collective import CollectiveBackend
    from moe_ops.backends.deepep import DeepEPBackend, DeepEPLowLatencyBackend  # deep_ep: imported by their first call
    from moe_ops.backends.local import LocalBackend
    from moe_ops.backends.mc2 import Mc2Backend, Mc2Int8Backend
    from moe_ops.backends.symm import SymmBackend

    register(LocalBackend())
    register(CollectiveBackend())
    register(AllGatherBackend())
    register(Mc2Backend())
    register(Mc2Int8Backend())
    register(DeepEPBackend())
    register(DeepEPLowLatencyBackend())
    register(SymmBackend())


_register_builtin()

__all__ = ["Backend", "DispatchOutputs", "DispatchPlan", "Layout", "available", "register", "resolve"]
