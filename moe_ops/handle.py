"""The handle: what ``moe.dispatch`` returns for ``combine`` and the backward ops, tensors only.

``handle = [tag, sources, rows, *private]``:

* ``tag``: an empty int64 tensor of shape ``[0, backend code, layout code]``. Its shape names the backend
  and the kind of row layout that made the handle (ragged, ragged with pad_multiple's padding rows,
  bounded, padded), readable at trace time without a host sync (shapes are static in a compiled graph),
  so combine and the backward ops run the producing backend and check their inputs against its layout,
  in the fake kernels too.
* ``sources``: int64 ``[T, K]`` on the source rank (the ops read ``T`` and ``K`` from it);
* ``rows``: int64 ``[N]`` (ragged), ``[R]`` (bounded) or ``[L, C]`` (padded): the layout's row map, whose
  shape the rows given to combine must have;
* the rest is the backend's own.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import torch
from torch import Tensor

from moe_ops.errors import MoEInputError
from moe_ops.plan import Kind

_KIND_CODES: dict[Kind, int] = {"ragged": 2, "padded": 3, "bounded": 4}  # >= 2: torch.compile specializes 0 and 1
_KINDS = {code: kind for kind, code in _KIND_CODES.items()}
_PADDED_GROUPS = 5  #: the code of a ragged layout with ``pad_multiple`` (padding rows among the routed ones)
_KINDS[_PADDED_GROUPS] = "ragged"


def backend_code(name: str) -> int:
    """The tag's code for backend ``name``: stable across processes and runs (a compiled graph or a peer
    holds it), >= 2."""
    return zlib.crc32(name.encode()) % 65521 + 2


def tag(backend: str, kind: Kind, like: Tensor, pad_multiple: int = 1) -> Tensor:
    """The tag of a handle made by ``backend`` with a row layout of ``kind`` (groups padded to
    ``pad_multiple``), on ``like``'s device."""
    code = _PADDED_GROUPS if kind == "ragged" and pad_multiple > 1 else _KIND_CODES[kind]
    return like.new_empty((0, backend_code(backend), code), dtype=torch.int64)


class Header(NamedTuple):
    """What a handle says about the dispatch that made it."""

    backend_code: int
    kind: Kind
    num_tokens: int | torch.SymInt
    top_k: int | torch.SymInt
    rows_shape: tuple[int | torch.SymInt, ...]
    packed: bool  #: a ragged layout without pad_multiple: each row exactly one route (no padding rows)


def read(handle: object) -> Header:
    """The header of ``handle``, or ``MoEInputError`` if it is not a handle ``moe.dispatch`` returned."""
    if not (isinstance(handle, (list, tuple)) and len(handle) >= 3 and all(isinstance(t, Tensor) for t in handle)):
        raise MoEInputError("handle must be the list of tensors moe.dispatch returned")
    tag_, sources, rows = handle[:3]
    if tag_.dim() != 3 or tag_.shape[0] != 0 or tag_.dtype != torch.int64 or int(tag_.shape[2]) not in _KINDS:
        raise MoEInputError(f"handle[0] is not the tag moe.dispatch returns (got {tag_.dtype} of shape {tuple(tag_.shape)})")
    kind = _KINDS[int(tag_.shape[2])]
    if sources.dim() != 2 or sources.dtype != torch.int64:
        raise MoEInputError(f"handle[1] must be the int64 [T, K] source map, got {sources.dtype} of shape {tuple(sources.shape)}")
    if rows.dtype != torch.int64 or rows.dim() != (2 if kind == "padded" else 1):
        raise MoEInputError(f"handle[2] must be the {kind} layout's int64 row map, got {rows.dtype} of shape {tuple(rows.shape)}")
    return Header(int(tag_.shape[1]), kind, sources.shape[0], sources.shape[1], tuple(rows.shape), int(tag_.shape[2]) == _KIND_CODES["ragged"])
