"""Backend registry: one :class:`Backend` per transport, chosen by name or by ``"auto"``."""

from __future__ import annotations

from moe_ops import handle, handshake
from moe_ops.backends.base import Backend, DispatchOutputs, Peers
from moe_ops.errors import MoEInputError
from moe_ops.plan import Kind

_REGISTRY: dict[str, Backend] = {}
_BY_CODE: dict[int, Backend] = {}
registrations = 0  #: how many times :func:`register` ran (plans made before one may name a replaced backend)


def register(backend: Backend) -> Backend:
    """Make ``backend`` selectable by its name (and recognisable in the handles it makes)."""
    code = handle.backend_code(backend.name)
    clash = _BY_CODE.get(code)
    if clash is not None and clash.name != backend.name:
        raise ValueError(f"backend names {backend.name!r} and {clash.name!r} share the handle code {code}; rename one")
    global registrations
    _REGISTRY[backend.name] = _BY_CODE[code] = backend
    registrations += 1
    handshake.code(backend.name)  # lets agreement errors name a peer's backend
    return backend


def available() -> list[str]:
    return sorted(_REGISTRY)


_KIND_NAMES = {"ragged": "ragged layout", "padded": "padded layout", "bounded": "ragged layout with max_recv_rows"}


def auto(device_type: str, world_size: int, kind: Kind) -> str:
    """The backend ``"auto"`` picks for a dispatch: ``local`` for one rank, ``mc2`` for the static layouts
    on NPU, ``collective`` otherwise."""
    if world_size == 1:
        return "local"
    if device_type == "npu" and kind != "ragged":
        return "mc2"
    return "collective"


def resolve(name: str, device_type: str, world_size: int, kind: Kind) -> Backend:
    """The backend ``name`` (``"auto"``: chosen from device and group size), checked against the call."""
    chosen = auto(device_type, world_size, kind) if name == "auto" else name
    backend = _REGISTRY.get(chosen)
    if backend is None:
        raise MoEInputError(f"unknown backend {chosen!r}; available: {', '.join(available())}")
    if device_type not in backend.device_types:
        raise MoEInputError(f"backend {chosen!r} does not run on {device_type!r} tensors")
    if kind not in backend.layouts:
        raise MoEInputError(f"backend {chosen!r} has no {_KIND_NAMES[kind]}")
    if world_size > 1 and not backend.multi_rank:
        raise MoEInputError(f"backend {chosen!r} runs without a group only, but the group has {world_size} ranks")
    return backend


def producer(code: int, requested: str) -> Backend:
    """The backend whose handles carry ``code``; ``requested`` (a backend name, or ``"auto"``) must be it."""
    backend = _BY_CODE.get(code)
    if backend is None:
        raise MoEInputError(f"the handle names a backend (code {code}) that is not registered in this process")
    if requested not in ("auto", backend.name):
        raise MoEInputError(
            f"backend={requested!r}, but the handle was made by backend {backend.name!r}: pass backend='auto' "
            f"or {backend.name!r} (combine and the backward passes must run the backend that dispatched)"
        )
    return backend


def _register_builtin() -> None:
    from moe_ops.backends.allgather import AllGatherBackend
    from moe_ops.backends.collective import CollectiveBackend
    from moe_ops.backends.deepep import (  # deep_ep: imported by their first call
        DeepEPBackend,
        DeepEPLowLatencyBackend,
    )
    from moe_ops.backends.local import LocalBackend
    from moe_ops.backends.mc2 import Mc2Backend, Mc2Int8Backend  # torch_npu: likewise
    from moe_ops.backends.symm import SymmBackend

    for backend in (LocalBackend, CollectiveBackend, AllGatherBackend, Mc2Backend, Mc2Int8Backend, DeepEPBackend,
                    DeepEPLowLatencyBackend, SymmBackend):
        register(backend())


_register_builtin()

__all__ = ["Backend", "DispatchOutputs", "Peers", "auto", "available", "producer", "register", "resolve"]
