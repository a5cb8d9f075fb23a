"""Safe gathers of rows by an index where ``-1`` means "none": they read nothing out of bounds and take
an empty source, so that any routing value is harmless. Plain torch, no host sync."""

from __future__ import annotations

import torch
from torch import Tensor


def take_rows(src: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """``src[index]`` with garbage where ``index < 0``; returns ``(rows, valid mask)``."""
    valid = index >= 0
    if src.shape[0] == 0:  # every index is -1 then: nothing to read
        return src.new_zeros(*index.shape, *src.shape[1:]), valid
    rows = src.index_select(0, index.clamp(min=0).reshape(-1)).reshape(*index.shape, *src.shape[1:])
    return rows, valid


def take(src: Tensor, index: Tensor) -> Tensor:
    """``src[index]`` (rows), zero where ``index < 0``."""
    rows, valid = take_rows(src, index)
    return torch.where(valid.reshape(*valid.shape, *([1] * (src.dim() - 1))), rows, 0)


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
