"""Expert-parallel groups, and the torch.distributed collectives the transports run on them.

Groups are named by string, as ``torch.distributed._functional_collectives`` names them: the ops take
``group_name`` (``""`` = no group, world size 1) and resolve it inside the op, so compiled graphs hold
a string constant rather than a ProcessGroup object.

Every collective goes through :func:`collective`, which turns a failure (a peer that exited, a
timeout, a broken connection) into :class:`moe_ops.MoECommunicationError` naming the op and the group;
on CPU groups it waits at most ``moe_ops.config.peer_timeout_s`` for the peers. :func:`library_call`
does the same for a call into a transport's library (DeepEP, torch_npu's MC2 ops).
The helpers below it are the exchanges the transports share; they also hide the names torch 2.13
gave the single-tensor all-gather and reduce-scatter (2.11 and 2.12 have only the old ones).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group

from moe_ops import config
from moe_ops.errors import MoECommunicationError, MoEInputError
from moe_ops.packing import RowFormat

Group = dist.ProcessGroup | str | None


def group_name_of(group: Group) -> str:
    """The name the ops take for ``group``: ``""`` for ``None``, the group's own name otherwise."""
    if group is None:
        return ""
    if isinstance(group, str):
        return group
    return group.group_name


@dataclass(frozen=True)
class Comm:
    """The group an op call runs on: ``group`` is ``None`` exactly when ``world_size == 1`` without a group."""

    group_name: str
    group: dist.ProcessGroup | None
    world_size: int
    rank: int


_NO_GROUP = Comm("", None, 1, 0)


def group_size_of(group_name: str) -> int:
    """The size of the group named ``group_name`` (1 for ``""``). ``torch.compile`` bakes it into the graph
    as a constant (dynamo evaluates ``_get_group_size_by_name`` at trace time), so compiled code and its
    caches tell groups of different sizes apart."""
    return dist.distributed_c10d._get_group_size_by_name(group_name) if group_name else 1


def comm_for(group_name: str) -> Comm:
    """Resolve ``group_name`` to the caller's view of that group (size and rank)."""
    if group_name == "":
        return _NO_GROUP
    if not dist.is_available() or not dist.is_initialized():
        raise MoEInputError(f"group_name={group_name!r} given but torch.distributed is not initialized")
    try:
        group = _resolve_process_group(group_name)
    except (KeyError, ValueError, RuntimeError) as e:
        raise MoEInputError(f"group_name={group_name!r} names no process group of this process: {e}") from e
    return Comm(group_name, group, group.size(), dist.get_rank(group))


def _failed(what: str, comm: Comm, error: BaseException) -> MoECommunicationError:
    return MoECommunicationError(
        f"moe_ops: {what} on group {comm.group_name!r} (rank {comm.rank} of {comm.world_size}) failed; "
        f"a peer may have exited or stopped answering: {error}"
    )


def collective(what: str, comm: Comm, fn: Callable[..., Any], tensor: Tensor, *args: Any) -> None:
    """Run the torch.distributed collective ``fn(tensor, *args)`` on ``comm``'s group; its failure
    becomes a :class:`MoECommunicationError` naming ``what``. On CPU tensors the wait is bounded by
    ``moe_ops.config.peer_timeout_s``."""
    try:
        if tensor.device.type == "cpu":
            work = fn(tensor, *args, group=comm.group, async_op=True)
            work.wait(timeout=datetime.timedelta(seconds=config.peer_timeout_s))
        else:
            fn(tensor, *args, group=comm.group)
    except (RuntimeError, dist.DistError) as e:  # DistBackendError, timeouts, closed connections
        raise _failed(what, comm, e) from e


def library_call(what: str, comm: Comm, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, a call into a transport's library that exchanges data with the peers
    (its input has been checked): a ``RuntimeError`` it raises becomes a :class:`MoECommunicationError`."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        raise _failed(what, comm, e) from e


def all_gather_strings(comm: Comm, what: str, text: str | None, device: torch.device, limit: int = 4096) -> list[str | None]:
    """Every rank's ``text`` (``None`` allowed), each cut to ``limit`` UTF-8 bytes, through one all-gather
    of ``device`` tensors (the group's device)."""
    data = list(b"" if text is None else text.encode()[:limit])
    mine = torch.tensor([int(text is not None), len(data), *data, *[0] * (limit - len(data))], dtype=torch.int32)
    rows = all_gather(comm, what, mine.to(device).unsqueeze(0)).tolist()
    return [bytes(row[2 : 2 + row[1]]).decode(errors="replace") if row[0] else None for row in rows]


# torch 2.13 renamed the single-tensor collectives; 2.11 and 2.12 have only the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_to_all(comm: Comm, what: str, rows: Tensor, send_splits: list[int] | None, recv_splits: list[int] | None) -> Tensor:
    """All-to-all of ``rows`` (first dim split by ``send_splits``; ``None``: equal splits)."""
    out_rows = rows.shape[0] if recv_splits is None else sum(recv_splits)
    out = rows.new_empty(out_rows, *rows.shape[1:])
    collective(what, comm, dist.all_to_all_single, out, rows.contiguous(), recv_splits, send_splits)
    return out


def all_gather(comm: Comm, what: str, rows: Tensor) -> Tensor:
    """``[W * R, ...]``: every rank's ``rows [R, ...]``, in rank order (one all-gather)."""
    out = rows.new_empty(comm.world_size * rows.shape[0], *rows.shape[1:])
    collective(what, comm, _all_gather, out, rows.contiguous())
    return out


def all_gather_padded(comm: Comm, what: str, fields: list[tuple[Tensor, float]], rows: int) -> list[Tensor]:
    """Every rank's ``fields`` (row-aligned ``[T, ...]`` tensors of any dtype, each padded with its fill
    value up to ``rows >= T``), packed so one all-gather moves them: ``[W * rows, ...]`` views, rank-major."""
    row_format = RowFormat(tuple((t.shape[1], t.dtype) for t, _ in fields))
    mine = row_format.empty(rows, fields[0][0].device)
    for view, (t, fill) in zip(row_format.views(mine), fields, strict=True):
        view[: t.shape[0]] = t
        view[t.shape[0] :] = fill
    return row_format.views(all_gather(comm, what, mine))


def reduce_scatter(comm: Comm, what: str, rows: Tensor) -> Tensor:
    """``[R / W, ...]``: this rank's block of the sum over ranks of ``rows [R, ...]``."""
    out = rows.new_empty(rows.shape[0] // comm.world_size, *rows.shape[1:])
    collective(what, comm, _reduce_scatter, out, rows.contiguous())
    return out
