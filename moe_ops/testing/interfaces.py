"""Interface checks against an upstream class: every public member of it exists in ours, and every
callable takes what the upstream one takes (``inspect``)."""

from __future__ import annotations

import inspect
from typing import Any

_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def public_members(cls: type) -> list[str]:
    """Public attributes of ``cls`` and its bases (object's excluded), plus ``__init__``."""
    return ["__init__", *sorted(name for name in dir(cls) if not name.startswith("_") and not hasattr(object, name))]


def signature_problems(ours: Any, theirs: Any) -> list[str]:
    """Why a call valid for ``theirs`` might not be valid for ``ours`` (empty if none): every positional
    parameter in the same place, every parameter by name with the same default, an optional one of theirs
    optional in ours, and ours asks for nothing more unless it has a default."""
    try:
        a, b = inspect.signature(ours), inspect.signature(theirs)
    except (TypeError, ValueError):
        return []  # not introspectable (a builtin): nothing to compare
    mine, upstream = a.parameters, b.parameters
    problems: list[str] = []
    positional = [n for n, p in upstream.items() if p.kind in _KINDS]
    if [n for n, p in mine.items() if p.kind in _KINDS][: len(positional)] != positional:
        problems.append(f"positional parameters {list(mine)} do not start with {positional}")
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in mine.values())
    for name, p in upstream.items():
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if name not in mine:
            if not takes_any:
                problems.append(f"no parameter {name!r}")
        elif mine[name].default != p.default:
            problems.append(f"{name!r} defaults to {mine[name].default!r}, upstream {p.default!r}")
    for name, p in mine.items():
        required = p.default is inspect.Parameter.empty and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        if required and name not in upstream:
            problems.append(f"requires {name!r}, which upstream does not take")
    return problems


def interface_problems(ours: type, theirs: type) -> dict[str, str]:
    """``{member: what is wrong}`` over :func:`public_members` of ``theirs``."""
    problems: dict[str, str] = {}
    for name in public_members(theirs):
        if not hasattr(ours, name):
            problems[name] = "missing"
            continue
        mine, upstream = inspect.getattr_static(ours, name), inspect.getattr_static(theirs, name)
        if callable(upstream) or isinstance(upstream, (classmethod, staticmethod)):
            found = signature_problems(getattr(ours, name), getattr(theirs, name))
            if found:
                problems[name] = "; ".join(found)
        elif isinstance(upstream, property) != isinstance(mine, property):
            problems[name] = "property upstream, not here" if isinstance(upstream, property) else "a property here only"
    return problems


def assert_interface(ours: type, theirs: type) -> int:
    """Fail listing every mismatch; returns how many members were checked."""
    problems = interface_problems(ours, theirs)
    assert not problems, f"{ours.__qualname__} vs {theirs.__module__}.{theirs.__qualname__}: " + "; ".join(
        f"{name}: {why}" for name, why in problems.items()
    )
    return len(public_members(theirs))
