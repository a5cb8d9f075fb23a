"""The local stage through torch_npu's MoE permute kernels, where they fit (:mod:`moe_ops.stage` picks):

* ragged dispatch: ``npu_moe_token_permute`` sorts the routes by a key unique to each route,
  ``local id * M K + flat route index`` (masked routes after every expert), so the rows come out in
  the contract's order whatever the kernel does with ties, and its ``sorted_indices`` (the row of
  each route) is ``route_row``;
* the sum back per token (combine, dispatch backward) of a ragged layout in which every route has a
  row: ``npu_moe_token_unpermute``, which takes exactly one row per route.

Everything else stays in plain torch: the padded layout (rows placed by capacity) and sums with
masked routes. ``npu_moe_init_routing_v2`` is not used: its drop-and-pad mode is documented as
unsupported and its row order inside an expert is not documented. Importing this module does not
import torch_npu (:mod:`moe_ops.libraries` loads it, or its simulator in tests).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from moe_ops import libraries
from moe_ops.indexing import take
from moe_ops.stage.plain import gather_routes

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SORT_LIMIT = 16777215  # npu_moe_token_permute sorts non-negative keys below 2**24 - 1


def _ops() -> ModuleType | None:
    """torch_npu, if it imports and has both kernels."""
    try:
        ops = libraries.load("torch_npu")
    except ImportError:
        return None
    return ops if hasattr(ops, "npu_moe_token_permute") and hasattr(ops, "npu_moe_token_unpermute") else None


def permute_fits(tokens: Tensor, ids: Tensor, num_local: int) -> bool:
    """Whether :func:`dispatch_rows` can lay out ``ids [M, K]`` of ``tokens``."""
    return _ops() is not None and tokens.dtype in _DTYPES and (num_local + 1) * ids.numel() < _SORT_LIMIT


def dispatch_rows(
    tokens: Tensor, weights: Tensor, ids: Tensor, num_local: int, num_routes: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The ragged layout of the routes ``ids [M, K]`` (local ids; others masked) of ``tokens [M, H]``:
    ``(recv_x [N, H], recv_weights [N], tokens_per_expert [L] int32, dropped [L] int32, route_row [M, K],
    row_src [N])`` as :func:`moe_ops.stage.dispatch_rows` returns them. ``num_routes=None`` reads ``N`` back."""
    routes = ids.numel()
    local = ids.long()
    valid = (local >= 0) & (local < num_local)
    bucket = torch.where(valid, local, num_local)
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=ids.device)
    counts = counts.scatter_add_(0, bucket.reshape(-1), torch.ones_like(bucket).reshape(-1))[:num_local]
    num_rows = int(counts.sum()) if num_routes is None else num_routes
    key = bucket * routes + torch.arange(routes, device=ids.device).view_as(ids)
    permuted, row_of_route = _ops().npu_moe_token_permute(tokens, key, num_out_tokens=num_rows)  # type: ignore[union-attr]
    route_row = torch.where(valid, row_of_route.view_as(ids).long(), -1)
    row_src = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=ids.device)
    row_src = row_src.scatter_(0, torch.where(valid, route_row, num_rows).reshape(-1), torch.arange(routes, device=ids.device))[:num_rows]
    dropped = torch.zeros(num_local, dtype=torch.int32, device=ids.device)
    return permuted[:num_rows], take(weights.reshape(-1), row_src), counts.to(torch.int32), dropped, route_row, row_src


def unpermute_fits(rows: Tensor, route_row: Tensor) -> bool:
    """Whether :func:`reduce` can sum the packed ragged ``rows`` back (each row one valid route, the
    caller's promise): one row per route of ``route_row``, so no route is masked or dropped."""
    return _ops() is not None and rows.dtype in _DTYPES and 0 < route_row.numel() == rows.shape[0]


def reduce(rows: Tensor, route_row: Tensor, row_weights: Tensor | None) -> Tensor:
    """``out[j] = sum_k w[r] * rows[r]`` over ``r = route_row[j, k]`` where every route has a row
    (``rows [M K, H]``); returns ``[M, H]`` in ``rows.dtype``."""
    if row_weights is None:
        probs = torch.ones(route_row.shape, dtype=torch.float32, device=rows.device)
    else:
        probs = gather_routes(row_weights, route_row)
    return _ops().npu_moe_token_unpermute(rows, route_row.reshape(-1).to(torch.int32), probs=probs)  # type: ignore[union-attr]
