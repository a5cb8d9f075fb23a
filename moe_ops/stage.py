"""The local stage every backend shares: lay the routes that reached this rank out expert-major and
move rows by that layout, forward and backward.

Each function runs the Triton kernels (:mod:`moe_ops.kernels`), torch_npu's MoE kernels where they fit
(:mod:`moe_ops.npu_stage`) or the plain-torch versions (:mod:`moe_ops.routing`, :mod:`moe_ops.permute`),
as ``moe_ops.config.kernels`` says; all compute the same values (dispatch bit-exactly; sums within
float32 rounding), and the conformance suite runs each.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from torch import Tensor

from moe_ops import config, npu_stage, permute, routing


class LocalDispatch(NamedTuple):
    recv_x: Tensor  #: [N, H] or [L, C, H]
    recv_weights: Tensor  #: [N] or [L, C]
    tokens_per_expert: Tensor  #: [L] int32
    dropped: Tensor  #: [L] int32
    route_row: Tensor  #: [M, K] int64: layout row of each route, -1 if masked or dropped
    row_src: Tensor  #: [N] or [L, C] int64: flat route index of each row, -1 on padding


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: Tensor) -> bool:
    """Whether the local stage runs Triton kernels for tensors like ``t``."""
    if config.kernels == "triton":
        return True
    return config.kernels == "auto" and t.is_cuda and _triton_available()


def use_npu(t: Tensor) -> bool:
    """Whether the local stage tries torch_npu's MoE kernels (:mod:`moe_ops.npu_stage`) for tensors like ``t``."""
    return config.kernels == "npu" or (config.kernels == "auto" and t.device.type == "npu")


def dispatch_rows(
    tokens: Tensor,
    weights: Tensor,
    ids: Tensor,
    num_local: int,
    capacity: int | None,
    num_rows: int | None = None,
    zero_padding: bool = False,
) -> LocalDispatch:
    """Lay out the routes ``ids [M, K]`` (ids outside ``[0, num_local)`` masked) of ``tokens [M, H]`` with
    router ``weights [M, K]``: ragged (``capacity=None``; ``num_rows`` if the caller knows it) or padded
    (padding rows zero with ``zero_padding``; the plain-torch path always writes zeros there)."""
    if use_triton(tokens):
        from moe_ops.kernels import layout

        return LocalDispatch(
            *layout.dispatch_rows(
                tokens, weights.contiguous(), ids.contiguous(), num_local, capacity, num_rows, zero_padding
            )
        )
    if capacity is None and use_npu(tokens) and npu_stage.permute_fits(tokens, ids, num_local):
        return LocalDispatch(*npu_stage.dispatch_rows(tokens, weights, ids, num_local, num_rows))
    local_ids = routing.local_expert_ids(ids, num_local, 1, 0)
    out = routing.expert_layout(local_ids, num_local, capacity, num_rows)
    recv_x, recv_weights = permute.expand(tokens, weights, out.row_src)
    return LocalDispatch(recv_x, recv_weights, out.tokens_per_expert, out.dropped, out.route_row, out.row_src)


def reduce(
    rows: Tensor, route_row: Tensor, row_weights: Tensor | None, unique: bool = False, ragged: bool = False
) -> Tensor:
    """``out[j] = sum_k w[r] * rows[r]`` over ``r = route_row[j, k] >= 0`` (``unique``: a row repeated in
    ``route_row[j]`` counts once; ``ragged``: ``rows`` is a ragged layout, one row per valid route).
    ``rows [R, H]``; returns ``[M, H]`` in ``rows.dtype``."""
    if ragged and use_npu(rows) and npu_stage.unpermute_fits(rows, route_row):
        return npu_stage.reduce(rows, route_row, row_weights)
    if use_triton(rows):
        from moe_ops.kernels import reduce as kernels

        return kernels.reduce(rows, route_row, row_weights, unique)
    if unique:
        route_row = routing.unique_routes(route_row)
    return permute.reduce(rows, route_row, row_weights)


def expand_grad(grad_tokens: Tensor, expert_out: Tensor, recv_weights: Tensor, route_row: Tensor, row_src: Tensor) -> tuple[Tensor, Tensor]:
    """Combine's backward on the layout rows: ``(grad_expert_out, grad_recv_weights)``, 0 on padding rows."""
    if use_triton(expert_out):
        from moe_ops.kernels import reduce as kernels

        return kernels.expand_grad(grad_tokens.contiguous(), expert_out.contiguous(), recv_weights.contiguous(), route_row.contiguous())
    return permute.expand_grad(grad_tokens, expert_out, recv_weights, row_src, route_row.shape[1])
