"""Cross-rank agreement before any token moves.

Every multi-rank op call starts with one small all-gather of a fixed-size int64 header per rank: an
error flag, the call's signature (sizes, dtypes, layout, backend) and an optional payload of up to
``2 * W`` values a backend piggybacks (the ragged dispatch's per-rank counts). Every rank then sees the
same headers and reaches the same verdict: a local input error on any rank, or ranks disagreeing on
the signature, raises the same :class:`MoEInputError` everywhere, and nobody hangs in a later
collective.

Reading the headers is a device-to-host sync. Calls agree every time where that costs nothing
extra: the ragged layout (its dispatch reads counts back anyway) and CPU tensors. The padded layout on
an accelerator must not sync: it agrees on the first call of each signature and trusts it afterwards,
and inside CUDA-graph captures, which must follow one eager call (``moe_ops.config.handshake``). The
price there: a later call in which one rank alone changes its shapes or has a bad input is not
caught; the group then fails by the process group's timeout.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops.errors import MoECommunicationError, MoEInputError
from moe_ops.groups import Comm

_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int32, torch.int64)
_agreed: set[tuple[object, ...]] = set()
_names: dict[int, str] = {}  # codes of the strings and dtypes seen, to name a peer's value in errors


def code(value: object) -> int:
    """A stable int for a header field: dtypes by table, strings by CRC-32, ints as they are."""
    if isinstance(value, torch.dtype):
        result = _DTYPES.index(value) if value in _DTYPES else -1
    elif isinstance(value, str):
        result = zlib.crc32(value.encode())
    else:
        return int(value)  # type: ignore[call-overload]
    _names.setdefault(result, str(value))
    return result


for _known in (*_DTYPES, "ragged", "padded", "cpu", "cuda", "npu"):
    code(_known)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def collective(what: str, comm: Comm, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Run ``fn`` (a torch.distributed call) and turn its failure into a :class:`MoECommunicationError`."""
    try:
        return fn(*args, group=comm.group, **kwargs)
    except (RuntimeError, dist.DistError) as e:  # DistBackendError, timeouts, closed connections
        raise MoECommunicationError(
            f"moe_ops: {what} on group {comm.group_name!r} (rank {comm.rank} of {comm.world_size}) failed; "
            f"a peer may have exited or stopped answering: {e}"
        ) from e


class Handshake:
    """The agreement step of one op call on ``comm``."""

    def __init__(self, comm: Comm, op: str, signature: dict[str, object], device: torch.device, every_call: bool) -> None:
        self.comm, self.op, self.device, self.every_call = comm, op, device, every_call
        self.signature = {name: code(value) for name, value in {"op": op, **signature}.items()}
        self._kinds = {name: not isinstance(value, int) for name, value in {"op": op, **signature}.items()}
        self.done = False

    def exchange(self, payload: Tensor | None = None, error: Exception | None = None) -> list[list[int]] | None:
        """Agree with every peer; return each rank's payload (row ``s`` = rank ``s``), or ``None`` where
        the agreement was skipped (padded layout, signature already agreed, no payload)."""
        assert not self.done, "moe_ops: handshake run twice in one call"
        self.done = True
        world = self.comm.world_size
        key = (self.comm.group_name, self.op, tuple(self.signature.items()))
        agreed = key in _agreed
        if _capturing(self.device):  # no host reads inside a capture: only an agreed signature may pass
            if error is not None:
                raise error
            if payload is not None:
                raise MoEInputError(
                    f"moe.{self.op}: the ragged layout reads counts back to the host and cannot run inside a "
                    "CUDA-graph capture; use layout='padded'"
                )
            if not agreed:
                raise MoEInputError(
                    f"moe.{self.op}: first call with this signature is inside a CUDA-graph capture; "
                    "run it once eagerly (warm-up) before capturing"
                )
            return None
        if error is None and payload is None and not self.every_call and agreed:
            return None
        body = torch.zeros(2 * world, dtype=torch.int64, device=self.device)
        if payload is not None:
            body[: payload.numel()] = payload.to(self.device, torch.int64)
        head = torch.tensor([int(error is not None), *self.signature.values()], dtype=torch.int64, device=self.device)
        mine = torch.cat([head, body])
        everyone = [torch.empty_like(mine) for _ in range(world)]
        collective(f"moe.{self.op} handshake", self.comm, dist.all_gather, everyone, mine)
        rows = torch.stack(everyone).tolist()
        self._raise_if_failed(rows, error)
        self._raise_if_disagreeing(rows)
        _agreed.add(key)
        return [row[len(head) :] for row in rows]

    def _raise_if_failed(self, rows: list[list[int]], error: Exception | None) -> None:
        failed = [rank for rank, row in enumerate(rows) if row[0]]
        if not failed:
            return
        messages: list[object] = [None] * self.comm.world_size
        collective(
            f"moe.{self.op} error exchange", self.comm, dist.all_gather_object, messages, None if error is None else str(error)
        )
        detail = "; ".join(f"rank {rank}: {messages[rank]}" for rank in failed)
        raise MoEInputError(f"moe.{self.op}: bad input on rank(s) {failed}: {detail}")

    def _raise_if_disagreeing(self, rows: list[list[int]]) -> None:
        for column, name in enumerate(self.signature, start=1):
            values = [row[column] for row in rows]
            if len(set(values)) > 1:
                named = [_names.get(v, f"<{v:#x}>") if self._kinds[name] else v for v in values]
                per_rank = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(named))
                raise MoEInputError(f"moe.{self.op}: ranks disagree on {name} ({per_rank})")
