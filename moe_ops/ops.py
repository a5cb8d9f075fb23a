"""The ops: ``torch.ops.moe.dispatch`` / ``combine``, their backward ops, fake kernels and autograd.

This module is the only place ops are defined. The kernels here are device-agnostic routers: they
validate, agree with the peers (:mod:`moe_ops.handshake`), resolve the backend and call it; every
backend returns the layouts of docs/contract.md. Backward passes are ops too, so a compiled training
step traces them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from moe_ops import backends, config, routing, validation
from moe_ops.backends.base import Backend, DispatchPlan, Layout
from moe_ops.errors import MoEInputError
from moe_ops.groups import Comm, comm_for
from moe_ops.handshake import Handshake

DispatchReturn = tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]
Checked = TypeVar("Checked")


def _handshake(
    comm: Comm, op: str, signature: Callable[[], dict[str, object]], device: torch.device, layout: str
) -> Handshake | None:
    """The agreement step of a multi-rank call (``None`` for a world of one: nothing to agree on)."""
    if comm.world_size == 1:
        return None
    return Handshake(comm, op, signature(), device, config.handshake_every_call(layout, device.type))


def _agreed(handshake: Handshake | None, check: Callable[[], Checked]) -> Checked:
    """Run the local ``check``; a failure is first shared with the peers, so every rank raises it."""
    try:
        return check()
    except (MoEInputError, ValueError) as error:
        if handshake is not None:
            handshake.exchange(error=error)
        raise


def _size(t: Tensor, d: int) -> int:
    """``t.shape[d]``, or -1 where ``t`` has no dim ``d`` (signatures are built before validation)."""
    return t.shape[d] if -t.dim() <= d < t.dim() else -1


# --- dispatch -------------------------------------------------------------------------------------


def _dispatch_plan(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    comm: Comm,
    handshake: Handshake | None,
    *,
    num_experts: int,
    backend: str,
    layout: str,
    capacity: int,
    max_tokens_per_rank: int,
    zero_padding: bool,
    expert_map: Tensor | None,
    log2phy: Tensor | None,
) -> tuple[Backend, DispatchPlan]:
    validation.check_dispatch(
        x, topk_idx, topk_weights, num_experts, comm.world_size, layout, capacity, max_tokens_per_rank
    )
    validation.check_placement(expert_map, log2phy, num_experts, comm.world_size, x.device)
    bound = max_tokens_per_rank if max_tokens_per_rank >= 0 else x.shape[0]
    if layout == "padded" and capacity < 0:
        capacity = comm.world_size * bound  # worst case: never drops
    plan = DispatchPlan(
        comm=comm,
        num_experts=num_experts,
        capacity=capacity if layout == "padded" else None,
        max_tokens_per_rank=bound,
        zero_padding=zero_padding,
        handshake=handshake,
    )
    return backends.resolve(backend, x.device.type, comm.world_size, plan.layout), plan


@torch.library.custom_op("moe::dispatch", mutates_args=())
def dispatch(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    expert_map: Tensor | None = None,
    log2phy: Tensor | None = None,
    *,
    num_experts: int,
    group_name: str = "",
    backend: str = "auto",
    layout: str = "ragged",
    capacity: int = -1,
    max_tokens_per_rank: int = -1,
    zero_padding: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """Send each token to the ranks owning its experts; return rows in the expert-major layout.

    ``x`` ``[T, H]``, ``topk_idx`` ``[T, K]`` int32/int64 (``-1`` = no route), ``topk_weights`` ``[T, K]``
    float32. ``layout="ragged"``: ``recv_x [N, H]`` (``capacity`` and ``max_tokens_per_rank`` stay -1).
    ``layout="padded"``: ``recv_x [L, C, H]`` with ``C = capacity``, or, for ``capacity=-1``, the worst
    case ``W * max_tokens_per_rank`` (``max_tokens_per_rank=-1``: this rank's ``T``, which must then be
    equal on every rank); padding rows are zero with ``zero_padding``, else unspecified. Optional
    placement: ``log2phy [E_logical]`` maps the ids to physical experts first, and ``expert_map [W, E]``
    (``expert_map[r, e]``: local id of expert ``e`` on rank ``r``, -1 where absent) replaces the
    contiguous placement. Returns ``(recv_x, recv_weights, tokens_per_expert [L] int32,
    dropped [L] int32, handle)``.
    """
    comm = comm_for(group_name)
    options = dict(
        num_experts=num_experts,
        backend=backend,
        layout=layout,
        capacity=capacity,
        max_tokens_per_rank=max_tokens_per_rank,
        zero_padding=zero_padding,
        expert_map=expert_map,
        log2phy=log2phy,
    )
    handshake = _handshake(
        comm,
        "dispatch",
        lambda: dict(
            num_experts=num_experts,
            hidden=_size(x, -1),
            top_k=_size(topk_idx, -1),
            dtype=x.dtype,
            weight_dtype=topk_weights.dtype,
            layout=layout,
            capacity=capacity,
            max_tokens_per_rank=(max_tokens_per_rank if max_tokens_per_rank >= 0 else _size(x, 0)) if layout == "padded" else -1,
            backend=backend,
            device=x.device.type,
            expert_map=expert_map is not None,
            log2phy=log2phy is not None,
        ),
        x.device,
        layout,
    )

    def check() -> tuple[Backend, DispatchPlan, Tensor]:
        impl, plan = _dispatch_plan(x, topk_idx, topk_weights, comm, handshake, **options)
        if config.check_values:
            validation.check_values(topk_idx, topk_weights, num_experts if log2phy is None else log2phy.shape[0])
            validation.check_placement_values(expert_map, log2phy, plan.num_local_experts, num_experts)
        return impl, plan, routing.relabel(topk_idx, plan.num_local_experts, expert_map, log2phy)

    impl, plan, ids = _agreed(handshake, check)
    outputs = impl.dispatch(x, ids, topk_weights, plan)
    assert handshake is None or handshake.done, f"backend {impl.name!r} moved tokens without the handshake"
    return tuple(outputs)  # type: ignore[return-value]


@dispatch.register_fake
def _dispatch_fake(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    expert_map: Tensor | None = None,
    log2phy: Tensor | None = None,
    *,
    num_experts: int,
    group_name: str = "",
    backend: str = "auto",
    layout: str = "ragged",
    capacity: int = -1,
    max_tokens_per_rank: int = -1,
    zero_padding: bool = False,
) -> DispatchReturn:
    # The same signature as ``dispatch``, defaults included: the dispatcher drops arguments equal to
    # their defaults before calling a fake kernel.
    impl, plan = _dispatch_plan(
        x,
        topk_idx,
        topk_weights,
        comm_for(group_name),
        None,
        num_experts=num_experts,
        backend=backend,
        layout=layout,
        capacity=capacity,
        max_tokens_per_rank=max_tokens_per_rank,
        zero_padding=zero_padding,
        expert_map=expert_map,
        log2phy=log2phy,
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


# --- combine and the backward ops: validated against the handle ----------------------------------


def _layout_of(rows: Tensor) -> Layout:
    return "ragged" if rows.dim() == 2 else "padded"


def _handle_backend(
    op: str,
    backend: str,
    group_name: str,
    layout_rows: tuple[str, Tensor],
    rows_args: list[tuple[str, Tensor, int, tuple[torch.dtype, ...]]],
    handle: list[Tensor],
    exchange: bool,
    extra_check: Callable[[], None] = lambda: None,
) -> tuple[Backend, Comm]:
    """Resolve and validate a call taking a dispatch ``handle``; ``layout_rows`` is the argument whose
    rank gives the layout, ``rows_args`` the arguments that must have the layout's rows
    (name, tensor, trailing dims, dtypes). With ``exchange``, agree with the peers afterwards."""
    comm = comm_for(group_name)
    name, rows = layout_rows
    handshake = _handshake(
        comm,
        op,
        lambda: dict(
            layout_rank=rows.dim(),
            padded_experts=_size(rows, 0) if rows.dim() == 3 else -1,
            padded_capacity=_size(rows, 1) if rows.dim() == 3 else -1,
            hidden=_size(rows, -1),
            dtype=rows.dtype,
            top_k=_size(handle[0], 1) if handle and isinstance(handle[0], Tensor) else -1,
            backend=backend,
            device=rows.device.type,
        ),
        rows.device,
        _layout_of(rows),
    )

    def check() -> tuple[Backend, Comm]:
        validation.check_layout_rank(name, rows)
        impl = backends.resolve(backend, rows.device.type, comm.world_size, _layout_of(rows))
        validation.check_handle(handle, impl.handle_len(_layout_of(rows)), impl.name)
        shape = impl.rows_shape(handle)
        for arg, t, trailing, dtypes in rows_args:
            validation.check_rows(arg, t, shape, trailing, dtypes)
        extra_check()
        return impl, comm

    checked = _agreed(handshake, check) if exchange else check()
    if exchange and handshake is not None:
        handshake.exchange()
    return checked


def _combine_backend(
    expert_out: Tensor,
    recv_weights: Tensor,
    handle: list[Tensor],
    group_name: str,
    backend: str,
    exchange: bool,
    grad_out: Tensor | None = None,
) -> tuple[Backend, Comm]:
    """``combine`` (or, given ``grad_out [T, H]``, ``combine_backward``) resolved and validated."""

    def check_grad_out() -> None:
        if grad_out is not None:
            expected = (handle[0].shape[0], expert_out.shape[-1])
            validation.check_rows("grad_out", grad_out, expected, 0, validation.TOKEN_DTYPES)

    return _handle_backend(
        "combine" if grad_out is None else "combine_backward",
        backend,
        group_name,
        ("expert_out", expert_out),
        [("expert_out", expert_out, 1, validation.TOKEN_DTYPES), ("recv_weights", recv_weights, 0, validation.WEIGHT_DTYPES)],
        handle,
        exchange,
        check_grad_out,
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
    impl, comm = _combine_backend(expert_out, recv_weights, handle, group_name, backend, exchange=True)
    return impl.combine(expert_out, recv_weights, handle, comm)


@combine.register_fake
def _combine_fake(
    expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], *, group_name: str = "", backend: str = "auto"
) -> Tensor:
    _combine_backend(expert_out, recv_weights, handle, group_name, backend, exchange=False)
    return expert_out.new_empty(handle[0].shape[0], expert_out.shape[-1])


def _dispatch_backward_backend(
    grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], group_name: str, backend: str, exchange: bool
) -> tuple[Backend, Comm]:
    return _handle_backend(
        "dispatch_backward",
        backend,
        group_name,
        ("grad_recv_x", grad_recv_x),
        [
            ("grad_recv_x", grad_recv_x, 1, validation.TOKEN_DTYPES),
            ("grad_recv_weights", grad_recv_weights, 0, validation.WEIGHT_DTYPES),
        ],
        handle,
        exchange,
    )


@torch.library.custom_op("moe::dispatch_backward", mutates_args=())
def dispatch_backward(
    grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], *, group_name: str = "", backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Backward of ``dispatch``: ``grad_x [T, H]`` sums the gradients of each token's copies (reverse
    exchange); ``grad_topk_weights [T, K]`` returns each route's ``grad_recv_weights`` (0 if masked or dropped)."""
    impl, comm = _dispatch_backward_backend(grad_recv_x, grad_recv_weights, handle, group_name, backend, exchange=True)
    return impl.dispatch_backward(grad_recv_x, grad_recv_weights, handle, comm)


@dispatch_backward.register_fake
def _dispatch_backward_fake(
    grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], *, group_name: str = "", backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    _dispatch_backward_backend(grad_recv_x, grad_recv_weights, handle, group_name, backend, exchange=False)
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
    impl, comm = _combine_backend(expert_out, recv_weights, handle, group_name, backend, True, grad_out)
    return impl.combine_backward(grad_out, expert_out, recv_weights, handle, comm)


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
    _combine_backend(expert_out, recv_weights, handle, group_name, backend, False, grad_out)
    return torch.empty_like(expert_out), torch.empty_like(recv_weights)


# --- autograd -------------------------------------------------------------------------------------


def _dispatch_setup_context(ctx, inputs, keyword_only_inputs, output) -> None:  # type: ignore[no-untyped-def]
    recv_x, recv_weights, _, _, handle = output
    # The dispatcher drops trailing positional arguments equal to their defaults before autograd sees
    # them, and an op returning Tensor[] must give back exactly one gradient per argument it received.
    _, _, _, expert_map, log2phy = inputs
    ctx.num_inputs = 5 if log2phy is not None else 4 if expert_map is not None else 3
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
    return (grad_x, None, grad_w, None, None)[: ctx.num_inputs]


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
