"""What the parts of the torch_npu simulator share: the error they raise for a call the documentation
rejects, the record of every op call with its arguments, and an optional *tamper* that edits a call's
arguments before the op runs (tests of deliberately wrong marshalling)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Tamper = Callable[[str, dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class Call:
    """One recorded op call: the op's name and every argument it received, by name."""

    op: str
    kwargs: dict[str, Any]


@dataclasses.dataclass
class _State:
    tamper: Tamper | None = None
    soc: str = "A3"  #: the SoC the simulator stands for: "A2" (Atlas A2) or "A3" (Atlas A3)
    calls: list[Call] = dataclasses.field(default_factory=list)


_state = _State()


def reset(tamper: Tamper | None = None, soc: str = "A3") -> None:
    """Forget the recorded calls; apply ``tamper`` from now on, as SoC ``soc``."""
    global _state
    _state = _State(tamper, soc)


def soc() -> str:
    """The SoC the simulator stands for."""
    return _state.soc


def calls() -> list[Call]:
    """The op calls since the simulator was installed, oldest first."""
    return list(_state.calls)


def enter(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Record a call, then let the tamper edit its arguments."""
    _state.calls.append(Call(op, dict(args)))
    if _state.tamper is not None:
        _state.tamper(op, args)
    return args


def require(ok: bool, message: str) -> None:
    """Reject a call, as the op would (with a device error on an NPU)."""
    if not ok:
        raise RuntimeError(f"torch_npu (simulated): {message}")
