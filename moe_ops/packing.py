"""Row-aligned tensors of different dtypes packed side by side in one byte buffer, so that a single
collective moves them all (tokens, their expert ids and their router weights, for example);
:func:`gather_padded` all-gathers such fields over a group."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops.groups import Comm
from moe_ops.handshake import collective

_ALIGN = 8  # bytes: every field starts on an 8-byte boundary, so any dtype view of it is legal


@dataclass(frozen=True)
class RowFormat:
    """The byte layout of one packed row: ``fields[i] = (width, dtype)``."""

    fields: tuple[tuple[int, torch.dtype], ...]

    def _spans(self) -> list[tuple[int, int]]:
        spans, offset = [], 0
        for width, dtype in self.fields:
            size = width * dtype.itemsize
            spans.append((offset, size))
            offset += -(-size // _ALIGN) * _ALIGN
        return spans

    def offset(self, field: int) -> int:
        """The byte offset of field ``field`` in a row."""
        return self._spans()[field][0]

    @property
    def row_bytes(self) -> int:
        offset, size = self._spans()[-1]
        return max(_ALIGN, -(-(offset + size) // _ALIGN) * _ALIGN)

    def empty(self, rows: int, device: torch.device) -> Tensor:
        """An uninitialized ``[rows, row_bytes]`` uint8 buffer."""
        return torch.empty(rows, self.row_bytes, dtype=torch.uint8, device=device)

    def views(self, buffer: Tensor) -> list[Tensor]:
        """Each field of ``buffer`` (``[rows, row_bytes]`` uint8) as a ``[rows, width]`` view of its dtype."""
        return [
            buffer[:, offset : offset + size].view(dtype)
            for (offset, size), (_, dtype) in zip(self._spans(), self.fields, strict=True)
        ]


# torch 2.13 renamed the single-tensor all-gather; 2.11 and 2.12 have only the old name.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_rows(comm: Comm, what: str, rows: Tensor) -> Tensor:
    """``[W * R, ...]``: every rank's ``rows [R, ...]``, in rank order (one all-gather)."""
    out = rows.new_empty(comm.world_size * rows.shape[0], *rows.shape[1:])
    collective(what, comm, _all_gather, out, rows.contiguous())
    return out


def gather_padded(comm: Comm, what: str, fields: list[tuple[Tensor, float]], rows: int) -> list[Tensor]:
    """Every rank's ``fields`` (row-aligned ``[T, ...]`` tensors of any dtype, each padded with its fill
    value up to ``rows >= T``), packed so one all-gather moves them: ``[W * rows, ...]`` views, rank-major."""
    row_format = RowFormat(tuple((t.shape[1], t.dtype) for t, _ in fields))
    mine = row_format.empty(rows, fields[0][0].device)
    for view, (t, fill) in zip(row_format.views(mine), fields, strict=True):
        view[: t.shape[0]] = t
        view[t.shape[0] :] = fill
    return row_format.views(gather_rows(comm, what, mine))
