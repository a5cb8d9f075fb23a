"""Safe gathers of rows by an index where ``-1`` means "none": they read nothing out of bounds and take
an empty source, so that any routing value is harmless. Plain torch, no host sync."""

from __future__ import annotations

import torch
from torch import Tensor


def split(index: Tensor) -> tuple[Tensor, Tensor]:
    """``(safe, valid)``: ``index`` with ``0`` where it is ``< 0`` (any row of a non-empty source may be
    read there), and where it is not."""
    return index.clamp(min=0), index >= 0


def gather(src: Tensor, index: Tensor, valid: Tensor | None = None) -> Tensor:
    """``src[index]`` (rows) for a non-negative ``index`` of any shape, zero where not ``valid`` (``None``:
    nowhere). float8 rows are moved as bytes (``where`` takes no float8). An empty ``src`` gives zeros (every
    index is then a masked one)."""
    if src.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return gather(src.view(torch.uint8), index, valid).view(src.dtype)
    if src.shape[0] == 0:
        return src.new_zeros(*index.shape, *src.shape[1:])
    rows = src.index_select(0, index.reshape(-1)).view(*index.shape, *src.shape[1:])
    return rows if valid is None else torch.where(valid.view(*valid.shape, *([1] * (src.dim() - 1))), rows, 0)


def take(src: Tensor, index: Tensor) -> Tensor:
    """``src[index]`` (rows), zero where ``index < 0``."""
    return gather(src, *split(index))


def take_columns(values: Tensor, index: Tensor) -> Tensor:
    """``[T, K]``: ``values[index[t, k], k]`` for ``values [S, K]``, zero where ``index < 0``."""
    k = values.shape[1]
    flat = torch.where(index >= 0, index * k + torch.arange(k, device=index.device), -1)
    return take(values.reshape(-1), flat)


def pad_rows(t: Tensor, rows: int, value: float = 0) -> Tensor:
    """``t`` with rows filled with ``value`` appended up to ``rows`` (``t`` itself if it has that many)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), value)])
