"""The local stage: on one rank, lay the routes that reached it out expert-major and move rows by that
layout, forward and backward. Every backend reaches it through this interface only.

Three implementations compute the same values (layouts bit-exactly, sums within float32 rounding), and
the conformance suite runs each: :mod:`moe_ops.stage.kernels` (Triton), :mod:`moe_ops.stage.npu`
(torch_npu's MoE permute kernels, where they fit) and :mod:`moe_ops.stage.plain` (plain torch).
``moe_ops.config.kernels`` picks: ``"auto"`` runs Triton on CUDA tensors and torch_npu's kernels on NPU
tensors, plain torch elsewhere.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from moe_ops import config, quant
from moe_ops.plan import RowLayout
from moe_ops.stage import npu, plain
from moe_ops.stage.plain import ExpertLayout, expert_layout


class LocalDispatch(NamedTuple):
    recv_x: Tensor  #: [N, H], [R, H] or [L, C, H]
    recv_weights: Tensor  #: [N], [R] or [L, C]
    tokens_per_expert: Tensor  #: [L] int32
    dropped: Tensor  #: [L] int32
    route_row: Tensor  #: [M, K] int64: layout row of each route, -1 if masked or dropped
    row_src: Tensor  #: [N], [R] or [L, C] int64: flat route index of each row, -1 on padding
    recv_scales: Tensor | None = None  #: quantized rows: [N, S], [R, S] or [L, C, S] float32


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
    """Whether the local stage tries torch_npu's MoE kernels for tensors like ``t``."""
    return config.kernels == "npu" or (config.kernels == "auto" and t.device.type == "npu")


def dispatch_rows(
    tokens: Tensor, weights: Tensor, ids: Tensor, num_local: int, rows: RowLayout, num_routes: int | None = None,
    scales: Tensor | None = None, quantize: quant.QuantSpec | None = None,
) -> LocalDispatch:
    """Lay out the routes ``ids [M, K]`` (ids outside ``[0, num_local)`` masked) of ``tokens [M, H]`` with
    router ``weights [M, K]`` as ``rows`` says. ``num_routes``: how many routes reach this rank's experts,
    where the caller knows it (a count exchange): the ragged layout then reads nothing back to the host
    (with ``pad_multiple`` its row count still needs the counts of every expert). Quantized rows:
    ``scales [M, S]`` float32 travel with ``tokens`` (already quantized), or ``quantize`` quantizes them
    on the way (:func:`moe_ops.quant.quantize`); either way ``recv_scales`` holds each row's scales
    (padding rows: zero with ``rows.zero_padding``, else unspecified)."""
    if use_triton(tokens):
        from moe_ops.stage.kernels import layout

        return LocalDispatch(*layout.dispatch_rows(
            tokens, weights.contiguous(), ids.contiguous(), num_local, rows, num_routes, scales, quantize
        ))
    packed = rows.kind == "ragged" and rows.pad_multiple == 1  # every row holds a route
    quantized = scales is not None or quantize is not None
    if packed and not quantized and use_npu(tokens) and npu.permute_fits(tokens, ids, num_local):
        return LocalDispatch(*npu.dispatch_rows(tokens, weights, ids, num_local, num_routes))
    if quantize is not None:
        tokens, scales = quant.quantize(tokens, quantize)
    out = plain.expert_layout(ids, num_local, rows, num_routes)
    recv_x, recv_weights = plain.expand(tokens, weights, out.row_src, padding=not packed)
    recv_scales = None if scales is None else plain.expand_rows(scales, out.row_src, ids.shape[1], padding=not packed)
    return LocalDispatch(recv_x, recv_weights, out.tokens_per_expert, out.dropped, out.route_row, out.row_src, recv_scales)


def quantize(tokens: Tensor, spec: quant.QuantSpec) -> tuple[Tensor, Tensor]:
    """``tokens [M, H]`` quantized (:func:`moe_ops.quant.quantize`): ``(q [M, H], scales [M, S])``; on
    Triton one launch."""
    if use_triton(tokens):
        from moe_ops.stage.kernels.quantize import quantize_rows

        return quantize_rows(tokens, spec)
    return quant.quantize(tokens, spec)


def dequantize(rows: Tensor, scales: Tensor, block: int, dtype: torch.dtype) -> Tensor:
    """Quantized layout rows ``[..., H]`` times their scales ``[..., S]`` (:func:`moe_ops.quant.dequantize`:
    ``block`` columns each, 0: one per row), in ``dtype``; on Triton one launch."""
    if use_triton(rows):
        from moe_ops.stage.kernels.quantize import dequantize_rows

        return dequantize_rows(rows.contiguous(), scales.contiguous(), block, dtype)
    return quant.dequantize(rows, scales, block, dtype)


def rows_to_send(x: Tensor, x_scales: Tensor | None, scales: quant.RowScales | None) -> tuple[Tensor, Tensor | None]:
    """What a transport moves for ``x``: ``x`` itself (an unquantized dispatch, or ``x`` arrived quantized
    with ``x_scales``), or ``x`` quantized here (:func:`quantize`), once per token before it is packed (only
    quantized bytes cross the wire)."""
    if scales is None or scales.quantize is None:
        return x, x_scales
    return quantize(x, scales.quantize)


def reduce(rows: Tensor, route_row: Tensor, row_weights: Tensor | None, unique: bool = False, packed: bool = False) -> Tensor:
    """``out[j] = sum_k w[r] * rows[r]`` over ``r = route_row[j, k] >= 0`` (``unique``: a row repeated in
    ``route_row[j]`` counts once; ``packed``: ``rows`` is a ragged layout without ``pad_multiple``, each row
    exactly one valid route).
    ``rows [R, H]`` (rows may be strided); returns ``[M, H]`` in ``rows.dtype``."""
    if packed and use_npu(rows) and npu.unpermute_fits(rows, route_row):
        return npu.reduce(rows, route_row, row_weights)
    if use_triton(rows):
        from moe_ops.stage.kernels import reduce as kernels

        return kernels.reduce(rows, route_row, row_weights, unique)
    return plain.reduce(rows, route_row, row_weights, unique)


def dispatch_grad(grad_rows: Tensor, grad_row_weights: Tensor, route_row: Tensor, packed: bool = False) -> tuple[Tensor, Tensor]:
    """Dispatch's backward on the layout rows: ``grad_rows [R, H]`` summed per token (``[M, H]``, as
    :func:`reduce` without weights) and ``grad_row_weights [R]`` gathered per route (``[M, K]``, 0 where
    ``route_row`` is -1); on Triton one launch does both."""
    if use_triton(grad_rows):
        from moe_ops.stage.kernels import reduce as kernels

        return kernels.dispatch_grad(grad_rows, grad_row_weights, route_row)
    return reduce(grad_rows, route_row, None, packed=packed), gather_routes(grad_row_weights, route_row)


def expand_grad(grad_tokens: Tensor, expert_out: Tensor, recv_weights: Tensor, route_row: Tensor, row_src: Tensor) -> tuple[Tensor, Tensor]:
    """Combine's backward on the layout rows: ``(grad_expert_out, grad_recv_weights)``, 0 on padding rows."""
    if use_triton(expert_out):
        from moe_ops.stage.kernels import reduce as kernels

        return kernels.expand_grad(
            grad_tokens.contiguous(), expert_out.contiguous(), recv_weights.contiguous(), route_row.contiguous(), row_src
        )
    return plain.expand_grad(grad_tokens, expert_out, recv_weights, row_src, route_row.shape[1])


gather_routes = plain.gather_routes  # one gather: the same everywhere

__all__ = ["ExpertLayout", "LocalDispatch", "dequantize", "dispatch_grad", "dispatch_rows", "expand_grad", "expert_layout", "gather_routes", "quantize", "reduce",
           "rows_to_send", "use_npu", "use_triton"]
