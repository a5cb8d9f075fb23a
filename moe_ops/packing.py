"""Row-aligned tensors of different dtypes packed side by side in one byte buffer, so that a single
transfer moves them all (tokens, their expert ids and their router weights, for example)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

_ALIGN = 8  # bytes: every field starts on an 8-byte boundary, so any dtype view of it is legal


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (> 0)."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class RowFormat:
    """The byte layout of one packed row: ``fields[i] = (width, dtype)``, each starting at a multiple of
    ``align`` bytes."""

    fields: tuple[tuple[int, torch.dtype], ...]
    align: int = _ALIGN

    @functools.cached_property
    def _spans(self) -> list[tuple[int, int]]:
        spans, offset = [], 0
        for width, dtype in self.fields:
            size = width * dtype.itemsize
            spans.append((offset, size))
            offset += round_up(size, self.align)
        return spans

    def offset(self, field: int) -> int:
        """The byte offset of field ``field`` in a row."""
        return self._spans[field][0]

    @property
    def row_bytes(self) -> int:
        offset, size = self._spans[-1]
        return max(self.align, round_up(offset + size, self.align))

    def empty(self, rows: int, device: torch.device) -> Tensor:
        """An uninitialized ``[rows, row_bytes]`` uint8 buffer."""
        return torch.empty(rows, self.row_bytes, dtype=torch.uint8, device=device)

    def views(self, buffer: Tensor) -> list[Tensor]:
        """Each field of ``buffer`` (``[rows, row_bytes]`` uint8) as a ``[rows, width]`` view of its dtype."""
        return [
            buffer[:, offset : offset + size].view(dtype)
            for (offset, size), (_, dtype) in zip(self._spans, self.fields, strict=True)
        ]
