"""Cross-rank agreement before any token moves; the ops (:mod:`moe_ops.ops`) run it, never a backend.

Every multi-rank op call starts with one small all-gather of a fixed-size int64 header per rank: an
error flag, the call's signature (sizes, dtypes, layout, backend) and an optional payload of up to
``2W + 1`` values the backend asked to agree on (the ragged dispatch's per-rank counts). Every rank then
sees the same headers and reaches the same verdict: a local input error on any rank, or ranks
disagreeing on the signature, raises the same :class:`MoEInputError` everywhere, and nobody hangs in a
later collective.

Reading the headers is a device-to-host sync. Calls agree every time where that costs nothing
extra: the ragged layout (its dispatch reads counts back anyway) and CPU tensors. The static layouts
(padded, and ragged with ``max_recv_rows``) on an accelerator must not sync: they agree on the first
call of each signature and trust it afterwards,
and inside CUDA-graph captures, which must follow one eager call (``moe_ops.config.handshake``). The
price there: a later call in which one rank alone changes its shapes or has a bad input is not
caught; the group then fails by the process group's timeout.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import NoReturn

import torch
from torch import Tensor

from moe_ops import config
from moe_ops.comm import Comm, all_gather, all_gather_strings
from moe_ops.errors import MoEInputError

_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int32, torch.int64, torch.float8_e4m3fn,
           torch.float8_e5m2, torch.int8)
_agreed: set[tuple[object, ...]] = set()
_names: dict[int, str] = {}  # codes of the strings and dtypes seen, to name a peer's value in errors

Value = int | str | torch.dtype | bool


def code(value: Value) -> int:
    """A stable int for a header field: dtypes by table, strings by CRC-32, ints as they are."""
    if isinstance(value, torch.dtype):
        result = _DTYPES.index(value) if value in _DTYPES else -1
    elif isinstance(value, str):
        result = zlib.crc32(value.encode())
    else:
        return int(value)
    _names.setdefault(result, str(value))
    return result


for _known in (*_DTYPES, "ragged", "padded", "bounded", "cpu", "cuda", "npu"):
    code(_known)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class Handshake:
    """The agreement step of one op call on ``comm``: exactly one of :meth:`agree` or :meth:`fail` runs
    on every rank, before the call moves any token."""

    def __init__(self, comm: Comm, op: str, fields: Sequence[str], device: torch.device) -> None:
        self.comm, self.op, self.fields, self.device = comm, op, tuple(fields), device

    @classmethod
    def of(cls, comm: Comm, op: str, fields: Sequence[str], device: torch.device) -> Handshake | None:
        """The handshake of a call on ``comm`` (``None`` for a world of one: nothing to agree on)."""
        return None if comm.world_size == 1 else cls(comm, op, fields, device)

    def agree(self, values: Sequence[Value], static: bool, payload: Tensor | None = None) -> list[list[int]] | None:
        """Agree on the signature ``values`` (one per field) of a call (``static``: of a padded or bounded
        layout) and share ``payload``: every rank's payload (row ``s`` = rank ``s``), or ``None`` where the
        exchange was skipped (see the module docstring)."""
        return self._exchange(values, config.handshake_every_call(static, self.device.type), payload, None)

    def fail(self, error: MoEInputError) -> NoReturn:
        """Share this rank's ``error``: every rank raises the group's errors."""
        self._exchange(None, True, None, error)
        raise error  # unreachable: the exchange raises

    def _exchange(
        self, values: Sequence[Value] | None, every_call: bool, payload: Tensor | None, error: MoEInputError | None
    ) -> list[list[int]] | None:
        world = self.comm.world_size
        signature = [code(self.op)] + ([0] * len(self.fields) if values is None else [code(v) for v in values])
        key = (self.comm.group_name, tuple(signature))
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
        if error is None and payload is None and not every_call and agreed:
            return None
        body = torch.zeros(2 * world + 1, dtype=torch.int64, device=self.device)
        if payload is not None:
            body[: payload.numel()] = payload.to(self.device, torch.int64)
        head = torch.tensor([int(error is not None), *signature], dtype=torch.int64, device=self.device)
        rows = all_gather(self.comm, f"moe.{self.op} handshake", torch.cat([head, body]).unsqueeze(0)).tolist()
        self._raise_if_failed(rows, error)
        self._raise_if_disagreeing(rows, values)
        _agreed.add(key)
        return [row[len(head) :] for row in rows]

    def _raise_if_failed(self, rows: list[list[int]], error: MoEInputError | None) -> None:
        failed = [rank for rank, row in enumerate(rows) if row[0]]
        if not failed:
            return
        messages = all_gather_strings(self.comm, f"moe.{self.op} error exchange", None if error is None else str(error), self.device)
        detail = "; ".join(f"rank {rank}: {messages[rank]}" for rank in failed)
        raise MoEInputError(f"moe.{self.op}: bad input on rank(s) {failed}: {detail}")

    def _raise_if_disagreeing(self, rows: list[list[int]], values: Sequence[Value] | None) -> None:
        assert values is not None  # a failed rank raised above
        for column, (name, value) in enumerate(zip(("op", *self.fields), (self.op, *values), strict=True), start=1):
            seen = [row[column] for row in rows]
            if len(set(seen)) > 1:
                named = [_names.get(v, f"<{v:#x}>") if isinstance(value, (str, torch.dtype)) else v for v in seen]
                per_rank = ", ".join(f"rank {rank}: {v}" for rank, v in enumerate(named))
                raise MoEInputError(f"moe.{self.op}: ranks disagree on {name} ({per_rank})")
