"""The ops: ``torch.ops.moe.dispatch`` / ``combine``, their backward ops, fake kernels and autograd.

This module is the only place ops are defined, and the only place that checks their inputs and agrees
with the peers, the same way for every backend:

1. metadata checks and the plan (:mod:`moe_ops.plan`), the backend resolved (``"auto"``, or for the
   ops taking a handle, the backend that made the handle), the backend's own limits
   (``Backend.check_dispatch`` / ``check_rows``): in the fake kernels too, at trace time;
2. in the real kernels: the backend's run-time requirements (``Backend.prepare``), value checks when
   switched on, then one agreement with the peers (:mod:`moe_ops.handshake`) carrying the backend's
   payload; a failure on any rank in step 1 or 2 is shared there, so every rank raises it;
3. the backend's kernel, which moves tokens and returns the layouts of docs/contract.md.

Backward passes are ops too, so a compiled training step traces them. How the ops are registered, and
why a call costs little: :mod:`moe_ops.registration`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from moe_ops import backends, config, handle, placement, stage, validation
from moe_ops.backends import Backend
from moe_ops.backends.base import DispatchOutputs
from moe_ops.comm import Comm, comm_for
from moe_ops.errors import MoEInputError
from moe_ops.handshake import Handshake
from moe_ops.plan import DispatchPlan, make_plan
from moe_ops.registration import below_autograd, define, needs_grad

DispatchReturn = tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]
QuantizedReturn = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]

_DISPATCH_OPTIONS = (
    "SymInt num_experts, str group_name='', int group_size=-1, str backend='auto', str layout='ragged', SymInt? capacity=None, "
    "SymInt? max_tokens_per_rank=None, SymInt? max_recv_rows=None, SymInt pad_multiple=1, bool zero_padding=False"
)
DISPATCH_SCHEMA = (
    f"dispatch(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor? expert_map=None, Tensor? log2phy=None, *, {_DISPATCH_OPTIONS}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor[])"
)
DISPATCH_QUANTIZED_SCHEMA = (
    "dispatch_quantized(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor? x_scales=None, Tensor? expert_map=None, "
    f"Tensor? log2phy=None, *, {_DISPATCH_OPTIONS}, str quant='', int quant_block=128, bool round_scale=False, "
    "bool dequantize=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor[])"
)
_HANDLE_OPTIONS = "*, str group_name='', str backend='auto'"
COMBINE_SCHEMA = f"combine(Tensor expert_out, Tensor recv_weights, Tensor[] handle, {_HANDLE_OPTIONS}) -> Tensor"
DISPATCH_BACKWARD_SCHEMA = (
    f"dispatch_backward(Tensor grad_recv_x, Tensor grad_recv_weights, Tensor[] handle, {_HANDLE_OPTIONS}) -> (Tensor, Tensor)"
)
COMBINE_BACKWARD_SCHEMA = (
    f"combine_backward(Tensor grad_out, Tensor expert_out, Tensor recv_weights, Tensor[] handle, {_HANDLE_OPTIONS}) "
    "-> (Tensor, Tensor)"
)


class DispatchOptions(NamedTuple):
    """The keyword-only arguments of ``moe.dispatch``, with the schema's defaults (the dispatcher leaves out
    the ones a call gives at their default)."""

    num_experts: int
    group_name: str = ""
    group_size: int = -1  #: the group's size, which compiled graphs and their caches must see (-1: look it up)
    backend: str = "auto"
    layout: str = "ragged"
    capacity: int | None = None
    max_tokens_per_rank: int | None = None
    max_recv_rows: int | None = None
    pad_multiple: int = 1
    zero_padding: bool = False


class QuantOptions(NamedTuple):
    """The keyword-only arguments ``moe.dispatch_quantized`` adds to dispatch's."""

    quant: str = ""
    quant_block: int = 128
    round_scale: bool = False
    dequantize: bool = False  #: rows travel quantized and arrive in ``x``'s dtype, differentiable straight through


DISPATCH_FIELDS = ("backend", "layout", "num_experts", "hidden", "top_k", "dtype", "weight_dtype", "capacity",
                   "max_tokens_per_rank", "max_recv_rows", "pad_multiple", "device", "expert_map", "log2phy", "scales")
HANDLE_FIELDS = ("backend", "layout", "rows", "capacity", "hidden", "dtype", "top_k", "device")

# --- dispatch -------------------------------------------------------------------------------------


def _plan_dispatch(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, expert_map: Tensor | None, log2phy: Tensor | None, comm: Comm,
    o: DispatchOptions, x_scales: Tensor | None = None, q: QuantOptions | None = None,
) -> tuple[Backend, DispatchPlan]:
    """Step 1 of a dispatch: metadata checks, the plan, the backend and its limits (``q``: a quantized
    dispatch's options)."""
    if o.group_size not in (-1, comm.world_size):
        raise MoEInputError(f"group_size={o.group_size}, but group {o.group_name!r} has {comm.world_size} ranks")
    scales = None if q is None else validation.check_quantized(x, x_scales, q.quant, q.quant_block, q.round_scale, q.dequantize)
    plan = make_plan(
        x, topk_idx, topk_weights, comm, num_experts=o.num_experts, layout=o.layout, capacity=o.capacity,
        max_tokens_per_rank=o.max_tokens_per_rank, max_recv_rows=o.max_recv_rows, pad_multiple=o.pad_multiple,
        zero_padding=o.zero_padding, scales=scales,
    )
    validation.check_placement(expert_map, log2phy, o.num_experts, comm.world_size, x.device)
    impl = backends.resolve(o.backend, x.device.type, comm.world_size, plan.kind)
    _check_group(impl, comm)
    if scales is not None and not impl.quantized:
        raise MoEInputError(f"backend {impl.name!r} does not dispatch quantized rows (docs/backends.md, 'Quantized rows', says which do)")
    impl.check_dispatch(x, topk_idx, topk_weights, plan)
    return impl, plan


# A training step repeats the same calls, so their checks are not repeated (issue 17: host cost per call):
# a call's metadata checks and plan are kept by its signature, everything they read, at most KEPT of
# each (the oldest dropped first). Only where the backend's limits are metadata alone, as the base
# class's are: a backend that checks state of its own (DeepEP's buffers, MC2's communication domain)
# checks every call. A call that fails is never kept, so bad input raises every time.
KEPT = 256
_PLANS: dict[tuple[object, ...], tuple[Backend, DispatchPlan]] = {}  #: dispatches
_CHECKED: dict[tuple[object, ...], tuple[Backend, handle.Header]] = {}  #: combine and the backward ops


def _meta(t: Tensor | None) -> tuple[object, ...] | None:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _signature(tensors: tuple[object, ...], comm: Comm, *options: object) -> tuple[object, ...] | None:
    """Everything a call's checks read: every tensor's shape, strides, dtype and device, the group, the
    options and the registered backends; ``None`` where an argument is not a plain tensor (a subclass may
    answer differently, and anything else fails the checks)."""
    if not all(t is None or type(t) is Tensor for t in tensors):
        return None
    return (*(_meta(t) for t in tensors), comm, *options, backends.registrations)  # type: ignore[arg-type]


def _keep(kept: dict[tuple[object, ...], Any], key: tuple[object, ...], value: object) -> None:
    if len(kept) >= KEPT:  # the oldest goes (pop: another thread may have taken it already)
        kept.pop(next(iter(kept), None), None)
    kept[key] = value


def _planned(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, expert_map: Tensor | None, log2phy: Tensor | None, comm: Comm,
    o: DispatchOptions, x_scales: Tensor | None, q: QuantOptions | None,
) -> tuple[Backend, DispatchPlan]:
    """:func:`_plan_dispatch`, once per signature (see :data:`KEPT`)."""
    key = _signature((x, topk_idx, topk_weights, expert_map, log2phy, x_scales), comm, o, q)
    known = None if key is None else _PLANS.get(key)
    if known is not None:
        return known
    impl, plan = _plan_dispatch(x, topk_idx, topk_weights, expert_map, log2phy, comm, o, x_scales, q)
    if key is not None and type(impl).check_dispatch is Backend.check_dispatch:
        _keep(_PLANS, key, (impl, plan))
    return impl, plan


def _check_group(impl: Backend, comm: Comm) -> None:
    """A transport between ranks needs their group: without ``group_name`` it would run on torch's default
    group (or fail inside torch), not on the group of one it was told."""
    if impl.multi_rank and comm.group is None:
        raise MoEInputError(
            f"backend {impl.name!r} moves tokens between the ranks of a process group, but no group_name was given: "
            "pass the expert-parallel group (group=), or backend='local' (or 'auto') without one"
        )


def _dispatch(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, expert_map: Tensor | None = None, log2phy: Tensor | None = None,
    **options: Any,
) -> DispatchReturn:
    """``moe::dispatch``: send each token to the ranks owning its experts; return rows in the expert-major
    layout (docs/contract.md).

    ``x`` ``[T, H]``, ``topk_idx`` ``[T, K]`` int32/int64 (``-1`` = no route), ``topk_weights`` ``[T, K]``
    float32. ``layout="ragged"``: ``recv_x [N, H]``. ``layout="padded"``: ``recv_x [L, C, H]`` with
    ``C = capacity``, by default the worst case ``W * max_tokens_per_rank`` (``max_tokens_per_rank`` by
    default this rank's ``T``, which must then be equal on every rank); padding rows are zero with
    ``zero_padding``, else unspecified. Optional placement: ``log2phy [E_logical]`` maps the ids to
    physical experts first, and ``expert_map [W, E]`` (``expert_map[r, e]``: local id of expert ``e`` on
    rank ``r``, -1 where absent) replaces the contiguous placement. Returns ``(recv_x, recv_weights,
    tokens_per_expert [L] int32, dropped [L] int32, handle)``.
    """
    out, tag = _run_dispatch(x, topk_idx, topk_weights, expert_map, log2phy, DispatchOptions(**options))
    return out.recv_x, out.recv_weights, out.tokens_per_expert, out.dropped, [tag, *out.handle]


def _run_dispatch(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, expert_map: Tensor | None, log2phy: Tensor | None, o: DispatchOptions,
    x_scales: Tensor | None = None, q: QuantOptions | None = None,
) -> tuple[DispatchOutputs, Tensor]:
    """Steps 1 to 3 of a dispatch (see the module docstring); ``x_scales`` and ``q`` for a quantized one.
    Returns the backend's outputs and the handle's tag."""
    comm = comm_for(o.group_name)
    handshake = Handshake.of(comm, "dispatch", DISPATCH_FIELDS, x.device)
    try:
        impl, plan = _planned(x, topk_idx, topk_weights, expert_map, log2phy, comm, o, x_scales, q)
        impl.prepare(plan)
        if config.check_values:
            validation.check_values(topk_idx, topk_weights, o.num_experts if log2phy is None else log2phy.shape[0])
            validation.check_placement_values(expert_map, log2phy, plan.num_local_experts, o.num_experts)
        ids = placement.relabel(topk_idx, plan.num_local_experts, expert_map, log2phy)
        payload = impl.payload(ids, plan)
    except MoEInputError as error:
        if handshake is not None:
            handshake.fail(error)
        raise
    if handshake is None:
        peers = None if payload is None else [payload.tolist()]
    else:
        signature = (
            impl.name, plan.kind, o.num_experts, x.shape[1], topk_idx.shape[1], x.dtype, topk_weights.dtype,
            plan.capacity, plan.token_bound if plan.static else -1, plan.rows.max_rows, plan.rows.pad_multiple,
            x.device.type, expert_map is not None, log2phy is not None, repr(plan.scales),
        )
        peers = handshake.agree(signature, plan.static, payload)
    out = impl.dispatch(x, ids, topk_weights, plan, peers, x_scales)
    return out, handle.tag(impl.name, plan.kind, x, plan.rows.pad_multiple)


def _fake_outputs(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, expert_map: Tensor | None, log2phy: Tensor | None, o: DispatchOptions,
    x_scales: Tensor | None = None, q: QuantOptions | None = None,
) -> tuple[DispatchOutputs, Tensor]:
    """What :func:`_run_dispatch` returns, as empty tensors of the right shapes (rows of a ragged layout: an unbacked size)."""
    impl, plan = _plan_dispatch(x, topk_idx, topk_weights, expert_map, log2phy, comm_for(o.group_name), o, x_scales, q)
    rows = plan.rows_shape or (torch.library.get_ctx().new_dynamic_size(),)
    counts = topk_idx.new_empty(plan.num_local_experts, dtype=torch.int32)
    if plan.scales is None:
        recv_x, recv_scales = x.new_empty(*rows, x.shape[1]), None
    else:
        dtype = x.dtype if plan.scales.quantize is None or (q is not None and q.dequantize) else plan.scales.quantize.dtype
        recv_x = x.new_empty(*rows, x.shape[1], dtype=dtype)
        recv_scales = x.new_empty(*rows, plan.scales.columns, dtype=torch.float32)
    out = DispatchOutputs(recv_x, topk_weights.new_empty(rows), counts, torch.empty_like(counts),
                          impl.fake_handle(x, topk_idx, rows, plan), recv_scales)
    return out, handle.tag(impl.name, plan.kind, x, plan.rows.pad_multiple)


def _dispatch_fake(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, expert_map: Tensor | None = None, log2phy: Tensor | None = None,
    **options: Any,
) -> DispatchReturn:
    out, tag = _fake_outputs(x, topk_idx, topk_weights, expert_map, log2phy, DispatchOptions(**options))
    return out.recv_x, out.recv_weights, out.tokens_per_expert, out.dropped, [tag, *out.handle]


def _split_quant_options(options: dict[str, Any]) -> tuple[DispatchOptions, QuantOptions]:
    q = QuantOptions(**{name: options.pop(name) for name in QuantOptions._fields if name in options})
    return DispatchOptions(**options), q


def _quantized_returns(out: DispatchOutputs, tag: Tensor) -> QuantizedReturn:
    assert out.recv_scales is not None
    return out.recv_x, out.recv_scales, out.recv_weights, out.tokens_per_expert, out.dropped, [tag, *out.handle]


def _dispatch_quantized(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, x_scales: Tensor | None = None, expert_map: Tensor | None = None,
    log2phy: Tensor | None = None, **options: Any,
) -> QuantizedReturn:
    """``moe::dispatch_quantized``: dispatch of quantized rows (docs/contract.md, "Quantized dispatch").

    Either ``x`` is already quantized (float8_e4m3fn, float8_e5m2 or int8 ``[T, H]``) with float32
    ``x_scales`` (``[T, ceil(H / 128)]`` or ``[T, 1]``), or ``quant`` (``"fp8_e4m3"``, ``"int8"``) quantizes
    a bf16/fp16/fp32 ``x`` here (``quant_block`` 128 or 0: one scale per token; ``round_scale``: UE8M0
    scales; ``dequantize``: the rows travel quantized and arrive dequantized in ``x.dtype``, with a gradient
    to ``x`` straight through the rounding). Returns ``(recv_x, recv_scales, recv_weights, tokens_per_expert,
    dropped, handle)``: ``recv_x`` quantized (or dequantized) in dispatch's layout, ``recv_scales`` float32
    with its rows (``[N, S]``, ``[R, S]`` or ``[L, C, S]``); the rest as :func:`_dispatch` returns them.
    """
    o, q = _split_quant_options(dict(options))
    out, tag = _run_dispatch(x, topk_idx, topk_weights, expert_map, log2phy, o, x_scales, q)
    if q.dequantize:
        assert out.recv_scales is not None
        out = out._replace(recv_x=stage.dequantize(out.recv_x, out.recv_scales, q.quant_block, x.dtype))
    return _quantized_returns(out, tag)


def _dispatch_quantized_fake(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, x_scales: Tensor | None = None, expert_map: Tensor | None = None,
    log2phy: Tensor | None = None, **options: Any,
) -> QuantizedReturn:
    o, q = _split_quant_options(dict(options))
    return _quantized_returns(*_fake_outputs(x, topk_idx, topk_weights, expert_map, log2phy, o, x_scales, q))


# --- combine and the backward ops: checked against the handle -------------------------------------

RowsArg = tuple[str, Tensor, int, tuple[torch.dtype, ...]]  # name, tensor, trailing dims, dtypes


def _check_handle_call(
    name: str, rows: Tensor, requested: str, comm: Comm, rows_args: list[RowsArg], handle_tensors: list[Tensor],
    extra_check: Callable[[handle.Header], None],
) -> tuple[Backend, handle.Header]:
    """The checks of :func:`_handle_call`: the handle, the backend that made it, the rows against its layout."""
    header = handle.read(handle_tensors)
    impl = backends.producer(header.backend_code, requested)
    backends.resolve(impl.name, rows.device.type, comm.world_size, header.kind)
    _check_group(impl, comm)
    if len(handle_tensors) != 1 + impl.handle_len(header.kind):
        raise MoEInputError(
            f"handle must be the {1 + impl.handle_len(header.kind)} tensors moe.dispatch returned for backend {impl.name!r}"
        )
    for arg, t, trailing, dtypes in rows_args:
        validation.check_rows(arg, t, header.rows_shape, trailing, dtypes)
    extra_check(header)
    impl.check_rows(name, rows, handle_tensors[1:], comm)
    return impl, header


def _handle_call(
    op: str,
    requested: str,
    group_name: str,
    moved: tuple[str, Tensor],
    rows_args: list[RowsArg],
    handle_tensors: list[Tensor],
    agree: bool,
    extra_check: Callable[[handle.Header], None] = lambda header: None,
) -> tuple[Backend, Comm, handle.Header]:
    """Check a call taking a dispatch's handle and find the backend that made it (``requested``: ``"auto"``
    or that backend's name); with ``agree``, agree with the peers. ``moved`` names the rows the backend
    moves (its limits apply to them); ``rows_args`` must have the handle's layout."""
    comm = comm_for(group_name)
    name, rows = moved
    handshake = Handshake.of(comm, op, HANDLE_FIELDS, rows.device) if agree else None
    key = _signature((rows, *(t for _, t, _, _ in rows_args), *handle_tensors), comm, op, requested) \
        if isinstance(handle_tensors, (list, tuple)) else None
    try:
        known = None if key is None else _CHECKED.get(key)
        if known is None:
            known = _check_handle_call(name, rows, requested, comm, rows_args, handle_tensors, extra_check)
            if key is not None and type(known[0]).check_rows is Backend.check_rows:
                _keep(_CHECKED, key, known)
        impl, header = known
    except MoEInputError as error:
        if handshake is not None:
            handshake.fail(error)
        raise
    if handshake is not None:
        static = header.kind != "ragged"
        signature = (
            impl.name, header.kind, header.rows_shape[0] if static else -1, header.rows_shape[-1] if static else -1,
            rows.shape[-1], rows.dtype, header.top_k, rows.device.type,
        )
        handshake.agree(signature, static)
    return impl, comm, header


def _combine_call(
    expert_out: Tensor, recv_weights: Tensor, handle_tensors: list[Tensor], group_name: str, backend: str, agree: bool,
    grad_out: Tensor | None = None,
) -> tuple[Backend, Comm, handle.Header]:
    """``combine`` (or, given ``grad_out [T, H]``, ``combine_backward``, which moves ``grad_out``) checked."""

    def check_grad_out(header: handle.Header) -> None:
        if grad_out is not None:
            expected = (header.num_tokens, expert_out.shape[-1])
            validation.check_rows("grad_out", grad_out, expected, 0, validation.TOKEN_DTYPES)

    rows_args: list[RowsArg] = [
        ("expert_out", expert_out, 1, validation.TOKEN_DTYPES), ("recv_weights", recv_weights, 0, validation.WEIGHT_DTYPES)
    ]
    if grad_out is None:
        return _handle_call("combine", backend, group_name, ("expert_out", expert_out), rows_args, handle_tensors, agree)
    return _handle_call(
        "combine_backward", backend, group_name, ("grad_out", grad_out), rows_args, handle_tensors, agree, check_grad_out
    )


def _combine(expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], *, group_name: str = "", backend: str = "auto") -> Tensor:
    """``moe::combine``: each token's weighted sum of its experts' outputs, on its source rank.

    ``expert_out`` in the layout ``dispatch`` returned (``[N, H]`` or ``[L, C, H]``), ``recv_weights``
    and ``handle`` from that dispatch. Returns ``out [T, H]`` in ``expert_out.dtype``:
    ``out[t] = sum_k w[t, k] * expert_out(t, k)``, accumulated in float32; masked and dropped routes add 0.
    ``backend``: ``"auto"`` (the backend that made the handle) or that backend's name.
    """
    impl, comm, header = _combine_call(expert_out, recv_weights, handle, group_name, backend, agree=True)
    return impl.combine(expert_out, recv_weights, handle[1:], comm, header.packed)


def _combine_fake(expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], *, group_name: str = "", backend: str = "auto") -> Tensor:
    _, _, header = _combine_call(expert_out, recv_weights, handle, group_name, backend, agree=False)
    return expert_out.new_empty(header.num_tokens, expert_out.shape[-1])


def _dispatch_backward_call(
    grad_recv_x: Tensor, grad_recv_weights: Tensor, handle_tensors: list[Tensor], group_name: str, backend: str, agree: bool
) -> tuple[Backend, Comm, handle.Header]:
    rows_args: list[RowsArg] = [
        ("grad_recv_x", grad_recv_x, 1, validation.TOKEN_DTYPES),
        ("grad_recv_weights", grad_recv_weights, 0, validation.WEIGHT_DTYPES),
    ]
    return _handle_call("dispatch_backward", backend, group_name, ("grad_recv_x", grad_recv_x), rows_args, handle_tensors, agree)


def _dispatch_backward(
    grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], *, group_name: str = "", backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """``moe::dispatch_backward``: ``grad_x [T, H]`` sums the gradients of each token's copies (reverse
    exchange); ``grad_topk_weights [T, K]`` returns each route's ``grad_recv_weights`` (0 if masked or dropped)."""
    impl, comm, header = _dispatch_backward_call(grad_recv_x, grad_recv_weights, handle, group_name, backend, agree=True)
    return impl.dispatch_backward(grad_recv_x, grad_recv_weights, handle[1:], comm, header.packed)


def _dispatch_backward_fake(
    grad_recv_x: Tensor, grad_recv_weights: Tensor, handle: list[Tensor], *, group_name: str = "", backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    _, _, header = _dispatch_backward_call(grad_recv_x, grad_recv_weights, handle, group_name, backend, agree=False)
    return grad_recv_x.new_empty(header.num_tokens, grad_recv_x.shape[-1]), grad_recv_weights.new_empty(header.num_tokens, header.top_k)


def _combine_backward(
    grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], *, group_name: str = "", backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """``moe::combine_backward``: for layout row ``i`` fed by source token ``t``, ``grad_expert_out[i] =
    recv_weights[i] * grad_out[t]`` and ``grad_recv_weights[i] = <grad_out[t], expert_out[i]>``; padding rows get 0."""
    impl, comm, _ = _combine_call(expert_out, recv_weights, handle, group_name, backend, True, grad_out)
    return impl.combine_backward(grad_out, expert_out, recv_weights, handle[1:], comm)


def _combine_backward_fake(
    grad_out: Tensor, expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], *, group_name: str = "", backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    _combine_call(expert_out, recv_weights, handle, group_name, backend, False, grad_out)
    return torch.empty_like(expert_out), torch.empty_like(recv_weights)


# --- autograd -------------------------------------------------------------------------------------


def _save_handle(ctx: Any, handle_tensors: list[Tensor], options: dict[str, Any], recv_x: Tensor, recv_weights: Tensor) -> None:
    """What a dispatch's backward needs: the handle, the group and backend, and the shapes and dtypes of
    the rows that carry a gradient (``recv_x`` of no columns where only the router's does)."""
    ctx.set_materialize_grads(False)  # no zeros for the integer outputs; backward fills what it needs
    ctx.save_for_backward(*handle_tensors)
    ctx.comm = {"group_name": options.get("group_name", ""), "backend": options.get("backend", "auto")}
    ctx.recv_meta = (recv_x.shape, recv_x.dtype, recv_weights.shape, recv_weights.dtype)


def _dispatch_grads(ctx: Any, grad_recv_x: Tensor | None, grad_recv_weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """``moe::dispatch_backward`` on the saved handle; a gradient that did not arrive is zeros."""
    handle_tensors = list(ctx.saved_tensors)
    x_shape, x_dtype, w_shape, w_dtype = ctx.recv_meta
    device = handle_tensors[1].device
    if grad_recv_x is None:
        grad_recv_x = torch.zeros(x_shape, dtype=x_dtype, device=device)
    if grad_recv_weights is None:
        grad_recv_weights = torch.zeros(w_shape, dtype=w_dtype, device=device)
    return dispatch_backward(grad_recv_x.contiguous(), grad_recv_weights.contiguous(), handle_tensors, **ctx.comm)


class _DispatchFunction(torch.autograd.Function):
    """Autograd of ``moe::dispatch``: the backward is ``moe::dispatch_backward`` on the saved handle."""

    @staticmethod
    def forward(ctx, x, topk_idx, topk_weights, expert_map, log2phy, options):  # type: ignore[no-untyped-def, override]
        out = below_autograd(dispatch, _dispatch, (x, topk_idx, topk_weights, expert_map, log2phy), options)
        recv_x, recv_weights, counts, dropped, handle_tensors = out
        ctx.mark_non_differentiable(counts, dropped)
        # rows of an input that needs no gradient need none either (no grouped-GEMM input gradient for them)
        ctx.mark_non_differentiable(*(t for t, grad in ((recv_x, ctx.needs_input_grad[0]), (recv_weights, ctx.needs_input_grad[2])) if not grad))
        _save_handle(ctx, handle_tensors, options, recv_x, recv_weights)
        return out

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_weights, *_):  # type: ignore[no-untyped-def, override]
        grad_x, grad_w = _dispatch_grads(ctx, grad_recv_x, grad_recv_weights)
        return grad_x, None, grad_w, None, None, None


def _dispatch_autograd(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, expert_map: Tensor | None = None, log2phy: Tensor | None = None,
    **options: Any,
) -> DispatchReturn:
    if needs_grad(x, topk_weights):
        return _DispatchFunction.apply(x, topk_idx, topk_weights, expert_map, log2phy, options)
    return below_autograd(dispatch, _dispatch, (x, topk_idx, topk_weights, expert_map, log2phy), options)


class _QuantizedDispatchFunction(torch.autograd.Function):
    """Autograd of ``moe::dispatch_quantized``: the router's gradient flows through ``recv_weights`` and,
    with ``dequantize``, ``x``'s through the dequantized ``recv_x`` straight through the rounding (the
    derivative of ``dequantize(quantize(x))`` taken as 1): both by ``moe::dispatch_backward``, as after
    ``moe::dispatch``, in the rows' dtype. Quantized rows and their scales carry none (where only the
    router's gradient flows, the backward moves rows of no columns)."""

    @staticmethod
    def forward(ctx, x, topk_idx, topk_weights, x_scales, expert_map, log2phy, options):  # type: ignore[no-untyped-def, override]
        args = (x, topk_idx, topk_weights, x_scales, expert_map, log2phy)
        out = below_autograd(dispatch_quantized, _dispatch_quantized, args, options)
        recv_x, recv_scales, recv_weights, counts, dropped, handle_tensors = out
        ctx.mark_non_differentiable(recv_scales, counts, dropped)
        ctx.mark_non_differentiable(*(t for t, grad in ((recv_x, ctx.needs_input_grad[0]), (recv_weights, ctx.needs_input_grad[2])) if not grad))
        rows = recv_x if ctx.needs_input_grad[0] else recv_weights.new_empty(*recv_weights.shape, 0)
        _save_handle(ctx, handle_tensors, options, rows, recv_weights)
        return out

    @staticmethod
    def backward(ctx, grad_recv_x, _grad_recv_scales, grad_recv_weights, *_):  # type: ignore[no-untyped-def, override]
        if grad_recv_x is None and grad_recv_weights is None:
            return (None,) * 7
        grad_x, grad_w = _dispatch_grads(ctx, grad_recv_x, grad_recv_weights)
        return grad_x if ctx.needs_input_grad[0] else None, None, grad_w, None, None, None, None


def _dispatch_quantized_autograd(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, x_scales: Tensor | None = None, expert_map: Tensor | None = None,
    log2phy: Tensor | None = None, **options: Any,
) -> QuantizedReturn:
    args = (x, topk_idx, topk_weights, x_scales, expert_map, log2phy)
    if needs_grad(x) and not options.get("dequantize", False):
        raise MoEInputError(
            "moe.dispatch_quantized: x requires a gradient, but quantized rows carry none (docs/contract.md, "
            "'Quantized dispatch'); pass dequantize=True (rows arrive in x's dtype, gradient straight through), "
            "or dispatch x.detach()"
        )
    if needs_grad(x, topk_weights):
        return _QuantizedDispatchFunction.apply(*args, options)
    return below_autograd(dispatch_quantized, _dispatch_quantized, args, options)


class _CombineFunction(torch.autograd.Function):
    """Autograd of ``moe::combine``: the backward is ``moe::combine_backward``."""

    @staticmethod
    def forward(ctx, expert_out, recv_weights, handle_tensors, options):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(expert_out, recv_weights, *handle_tensors)
        ctx.options = options
        return below_autograd(combine, _combine, (expert_out, recv_weights, handle_tensors), options)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def, override]
        expert_out, recv_weights, *handle_tensors = ctx.saved_tensors
        grad_expert_out, grad_recv_weights = combine_backward(
            grad_out.contiguous(), expert_out, recv_weights, handle_tensors, **ctx.options
        )
        return grad_expert_out, grad_recv_weights, None, None


def _combine_autograd(expert_out: Tensor, recv_weights: Tensor, handle: list[Tensor], **options: Any) -> Tensor:
    if needs_grad(expert_out, recv_weights):
        return _CombineFunction.apply(expert_out, recv_weights, handle, options)
    return below_autograd(combine, _combine, (expert_out, recv_weights, handle), options)


def _no_double_backward(name: str, kernel: Callable[..., Any]) -> Callable[..., Any]:
    """The ``Autograd`` kernel of a backward op: no gradient of its own (differentiating through it raises)."""

    class NoGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, options, *args):  # type: ignore[no-untyped-def, override]
            return below_autograd(getattr(torch.ops.moe, name).default, kernel, args, options)

        @staticmethod
        def backward(ctx, *grads):  # type: ignore[no-untyped-def, override]
            raise RuntimeError(f"moe.{name} has no gradient: moe_ops supports first derivatives only")

    def autograd_kernel(*args: Any, **options: Any) -> Any:
        if needs_grad(*(a for a in args if isinstance(a, Tensor))):
            return NoGradient.apply(options, *args)
        return below_autograd(getattr(torch.ops.moe, name).default, kernel, args, options)

    return autograd_kernel


dispatch = define(DISPATCH_SCHEMA, _dispatch, _dispatch_fake, _dispatch_autograd)
dispatch_quantized = define(DISPATCH_QUANTIZED_SCHEMA, _dispatch_quantized, _dispatch_quantized_fake, _dispatch_quantized_autograd)
combine = define(COMBINE_SCHEMA, _combine, _combine_fake, _combine_autograd)
dispatch_backward = define(
    DISPATCH_BACKWARD_SCHEMA, _dispatch_backward, _dispatch_backward_fake, _no_double_backward("dispatch_backward", _dispatch_backward)
)
combine_backward = define(
    COMBINE_BACKWARD_SCHEMA, _combine_backward, _combine_backward_fake, _no_double_backward("combine_backward", _combine_backward)
)
