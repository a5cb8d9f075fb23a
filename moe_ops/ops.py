"""The ops: ``torch.ops.moe.dispatch`` / ``combine``, their backward ops, fake kernels and autograd.

This module is the only place ops are defined. The kernels here are device-agnostic routers: they
validate, resolve the group and the backend, and call the backend's method; every backend returns the
layouts of docs/contract.md. Backward passes are ops too, so a compiled training step traces them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ops import backends, config, validation
from moe_ops.backends.base import Backend, DispatchPlan, Layout
from moe_ops.groups import Comm, comm_for

DispatchReturn = tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]


def _dispatch_plan(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    num_experts: int,
    group_name: str,
    backend: str,
    layout: str,
    capacity: int,
    max_tokens_per_rank: int,
) -> tuple[Backend, DispatchPlan]:
    comm = comm_for(group_name)
    validation.check_dispatch(
        x, topk_idx, topk_weights, num_experts, comm.world_size, layout, capacity, max_tokens_per_rank
    )
    bound = max_tokens_per_rank if max_tokens_per_rank >= 0 else x.shape[0]
    if layout == "padded" and capacity < 0:
        capacity = comm.world_size * bound  # worst case: never drops
    plan = DispatchPlan(
        comm=comm,
        num_experts=num_experts,
        capacity=capacity if layout == "padded" else None,
        max_tokens_per_rank=bound,
    )
    return backends.resolve(backend, x.device.type, comm.world_size, plan.layout), plan


def _layout_of(rows: Tensor) -> Layout:
    return "ragged" if rows.dim() == 2 else "padded"


def _layout_backend(name: str, arg: str, rows: Tensor, handle: list[Tensor], group_name: str) -> tuple[Backend, Comm]:
    """Resolve the backend of a combine/backward call from its layout-shaped argument ``arg``."""
    comm = comm_for(group_name)
    validation.check_layout_rank(arg, rows)
    impl = backends.resolve(name, rows.device.type, comm.world_size, _layout_of(rows))
    validation.check_handle(handle, impl.handle_len, impl.name)
    return impl, comm


@torch.library.custom_op("moe::dispatch", mutates_args=())
def dispatch(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    *,
    num_experts: int,
    group_name: str = "",
    backend: str = "auto",
    layout: str = "ragged",
    capacity: int = -1,
    max_tokens_per_rank: int = -1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """Send each token to the ranks owning its experts; return rows in the expert-major layout.

    ``x`` ``[T, H]``, ``topk_idx`` ``[T, K]`` int32/int64 (``-1`` = no route), ``topk_weights`` ``[T, K]``
    float32. ``layout="ragged"``: ``recv_x [N, H]`` (``capacity`` and ``max_tokens_per_rank`` stay -1).
    ``layout="padded"``: ``recv_x [L, C, H]`` with ``C = capacity``, or, for ``capacity=-1``, the worst
    case ``W * max_tokens_per_rank`` (``max_tokens_per_rank=-1``: this rank's ``T``, which must then be
    equal on every rank). Returns ``(recv_x, recv_weights, tokens_per_expert [L] int32,
    dropped [L] int32, handle)``.
    """
    impl, plan = _dispatch_plan(
        x, topk_idx, topk_weights, num_experts, group_name, backend, layout, capacity, max_tokens_per_rank
    )
    if config.check_values:
        validation.check_values(topk_idx, topk_weights, num_experts)
    return tuple(impl.dispatch(x, topk_idx, topk_weights, plan))  # type: ignore[return-value]


@dispatch.register_fake
def _dispatch_fake(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    *,
    num_experts: int,
    group_name: str = "",
    backend: str = "auto",
    layout: str = "ragged",
    capacity: int = -1,
    max_tokens_per_rank: int = -1,
) -> DispatchReturn:
    impl, plan = _dispatch_plan(
        x, topk_idx, topk_weights, num_experts, group_name, backend, layout, capacity, max_tokens_per_rank
    )
    num_local = plan.num_local_experts
    if plan.capacity is None:
        rows: tuple[int, ...] = (torch.library.get_ctx().new_dynamic_size(),)
    else:
        rows = (num_local, plan.capacity)
    counts = topk_idx.new_empty(num_local, dtype=torch.int32)
    return (
        x.new_empty(*rows, x.shape[1]),
        topk_weights.new_empty(rows),
        counts,
        torch.empty_like(counts),
        impl.fake_handle(x, topk_idx, rows, plan),
    )


@torch.library.custom_op("moe::combine", mutates_args=())
def combine(
    expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], *, group_name: str = "", backend: str = "auto"
) -> Tensor:
    """Return each token's weighted sum of its experts' outputs, on its source rank.

    ``expert_out`` in the layout ``dispatch`` returned (``[N, H]`` or ``[L, C, H]``), ``recv_weights``
    and ``handle`` from that dispatch. Returns ``out [T, H]`` in ``expert_out.dtype``:
    ``out[t] = sum_k w[t, k] * expert_out(t, k)``, accumulated in float32; masked and dropped routes add 0.
    """
    impl, comm = _combine_backend(expert_out, recv_weights, handle, group_name, backend)
    return impl.combine(expert_out, recv_weights, handle, comm)


def _combine_backend(expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], group_name: str, backend: str) -> tuple[Backend, Comm]:
    impl, comm = _layout_backend(backend, "expert_out", expert_out, handle, group_name)
    rows = impl.rows_shape(handle)
    validation.check_rows("expert_out", expert_out, rows, 1, validation.TOKEN_DTYPES)
    validation.check_rows("recv_weights", recv_weights, rows, 0, validation.WEIGHT_DTYPES)
    return impl, comm


@combine.register_fake
def _combine_fake(
    expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], *, group_name: str = "", backend: str = "auto"
) -> Tensor:
    _combine_backend(expert_out, recv_weights, handle, group_name, backend)
    return expert_out.new_empty(handle[0].shape[0], expert_out.shape[-1])


@torch.library.custom_op("moe::dispatch_backward", mutates_args=())
def dispatch_backward(
    grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], *, group_name: str = "", backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Backward of ``dispatch``: ``grad_x [T, H]`` sums the gradients of each token's copies (reverse
    exchange); ``grad_topk_weights [T, K]`` returns each route's ``grad_recv_weights`` (0 if masked or dropped)."""
    impl, comm = _dispatch_backward_backend(grad_recv_x, grad_recv_weights, handle, group_name, backend)
    return impl.dispatch_backward(grad_recv_x, grad_recv_weights, handle, comm)


def _dispatch_backward_backend(
    grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], group_name: str, backend: str
) -> tuple[Backend, Comm]:
    impl, comm = _layout_backend(backend, "grad_recv_x", grad_recv_x, handle, group_name)
    rows = impl.rows_shape(handle)
    validation.check_rows("grad_recv_x", grad_recv_x, rows, 1, validation.TOKEN_DTYPES)
    validation.check_rows("grad_recv_weights", grad_recv_weights, rows, 0, validation.WEIGHT_DTYPES)
    return impl, comm


@dispatch_backward.register_fake
def _dispatch_backward_fake(
    grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], *, group_name: str = "", backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    _dispatch_backward_backend(grad_recv_x, grad_recv_weights, handle, group_name, backend)
    num_tokens, top_k = handle[0].shape
    return grad_recv_x.new_empty(num_tokens, grad_recv_x.shape[-1]), grad_recv_weights.new_empty(num_tokens, top_k)


@torch.library.custom_op("moe::combine_backward", mutates_args=())
def combine_backward(
    grad_out: Tensor,
    expert_out: Tensor,
    recv_weights: Tensor,
    handle: list[Tensor],
    *,
    group_name: str = "",
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Backward of ``combine``: for layout row ``i`` fed by source token ``t``,
    ``grad_expert_out[i] = recv_weights[i] * grad_out[t]`` and ``grad_recv_weights[i] = <grad_out[t], expert_out[i]>``;
    padding rows get 0."""
    impl, comm = _combine_backward_backend(grad_out, expert_out, recv_weights, handle, group_name, backend)
    return impl.combine_backward(grad_out, expert_out, recv_weights, handle, comm)


def _combine_backward_backend(
    grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], group_name: str, backend: str
) -> tuple[Backend, Comm]:
    impl, comm = _combine_backend(expert_out, recv_weights, handle, group_name, backend)
    validation.check_rows("grad_out", grad_out, (handle[0].shape[0], expert_out.shape[-1]), 0, validation.TOKEN_DTYPES)
    return impl, comm


@combine_backward.register_fake
def _combine_backward_fake(
    grad_out: Tensor,
    expert_out: Tensor,
    recv_weights: Tensor,
    handle: list[Tensor],
    *,
    group_name: str = "",
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    _combine_backward_backend(grad_out, expert_out, recv_weights, handle, group_name, backend)
    return torch.empty_like(expert_out), torch.empty_like(recv_weights)


# --- autograd -------------------------------------------------------------------------------------


def _dispatch_setup_context(ctx, inputs, keyword_only_inputs, output) -> None:  # type: ignore[no-untyped-def]
    recv_x, recv_weights, _, _, handle = output
    ctx.save_for_backward(*handle)
    ctx.comm_args = {k: keyword_only_inputs[k] for k in ("group_name", "backend")}
    ctx.recv_x_meta = (recv_x.shape, recv_x.dtype)
    ctx.recv_weights_meta = (recv_weights.shape, recv_weights.dtype)


def _dispatch_autograd(ctx, grad_recv_x, grad_recv_weights, _counts, _dropped, _handle):  # type: ignore[no-untyped-def]
    handle = list(ctx.saved_tensors)
    device = handle[0].device
    if grad_recv_x is None:
        shape, dtype = ctx.recv_x_meta
        grad_recv_x = torch.zeros(shape, dtype=dtype, device=device)
    if grad_recv_weights is None:
        shape, dtype = ctx.recv_weights_meta
        grad_recv_weights = torch.zeros(shape, dtype=dtype, device=device)
    grad_x, grad_w = torch.ops.moe.dispatch_backward(
        grad_recv_x.contiguous(), grad_recv_weights.contiguous(), handle, **ctx.comm_args
    )
    return grad_x, None, grad_w


def _combine_setup_context(ctx, inputs, keyword_only_inputs, output) -> None:  # type: ignore[no-untyped-def]
    expert_out, recv_weights, handle = inputs
    ctx.save_for_backward(expert_out, recv_weights, *handle)
    ctx.comm_args = dict(keyword_only_inputs)


def _combine_autograd(ctx, grad_out):  # type: ignore[no-untyped-def]
    expert_out, recv_weights, *handle = ctx.saved_tensors
    grad_expert_out, grad_recv_weights = torch.ops.moe.combine_backward(
        grad_out.contiguous(), expert_out, recv_weights, handle, **ctx.comm_args
    )
    return grad_expert_out, grad_recv_weights, [None] * len(handle)


dispatch.register_autograd(_dispatch_autograd, setup_context=_dispatch_setup_context)
combine.register_autograd(_combine_autograd, setup_context=_combine_setup_context)
