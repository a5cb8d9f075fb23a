"""torch_npu's MC2 ops simulated on CPU over a gloo group: ``npu_moe_distribute_dispatch_v2`` /
``npu_moe_distribute_combine_v2`` and their v1 forms, with the documented routing, shapes and checks
(what is modelled and what is not: :mod:`moe_ops.testing.sim.torch_npu`). Paths below are in CANN's
ops-transformer unless they name torch_npu's op-plugin; ``DISPATCH_V2`` and ``DISPATCH_V1`` are the
dispatch ops' tiling files (combine's repeat the same checks)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group

from moe_ops.testing.sim.torch_npu.common import enter, require, soc

PREFIX = "sim-hccl:"  # the simulated HCCL communicator name of a group is PREFIX + its name
_MAGIC = 0x4D4332  # "MC2": first value of a simulated assist_info_for_combine
_HEADER = 3  # magic, filled rows, A
#: int8 values the simulated ops leave unspecified (memory not written; NaN converted): no value MC2's
#: quantization writes (its levels are -127..127)
UNWRITTEN_INT8 = -128
DISPATCH_V2 = "mc2/moe_distribute_dispatch_v2/op_host/op_tiling/moe_distribute_dispatch_v2_tiling.cpp"
DISPATCH_V1 = "mc2/moe_distribute_dispatch/op_host/op_tiling/moe_distribute_dispatch_tiling.cpp"


def comm_name(group: dist.ProcessGroup, rank: int) -> str:
    """The simulated HCCL communicator name of ``group`` (what ``get_hccl_comm_name(rank)`` gives on NPU)."""
    return PREFIX + group.group_name


def _first(*checks: tuple[bool, str]) -> str | None:
    """The message of the first failed ``(ok, message)`` check, if any."""
    return next((message for ok, message in checks if not ok), None)


def _weights_like(scales: Tensor, ids: Tensor) -> bool:
    return scales.dtype == torch.float32 and scales.shape == ids.shape


def _agree(group: dist.ProcessGroup, problem: str | None) -> None:
    """Raise on every rank if any rank found a ``problem`` (a device error stops the whole group)."""
    found = [(rank, p) for rank, p in enumerate(_gather(group, problem)) if p is not None]
    require(not found, "; ".join(f"rank {rank}: {p}" for rank, p in found))


def _reject_unmodelled(args: dict[str, Any], defaults: dict[str, Any]) -> None:
    for name, default in defaults.items():
        if name in args and not (args[name] is None if default is None else args[name] in default):
            raise NotImplementedError(f"the torch_npu simulator does not model {name}={args[name]!r}")


_UNMODELLED = dict(
    scales=None, elastic_info=None, performance_info=None, group_tp=("",), tp_world_size=(0, 1), tp_rank_id=(0,),
    expert_shard_type=(0,), shared_expert_num=(0, 1), shared_expert_rank_num=(0,), comm_alg=("",),
    zero_expert_num=(0,), copy_expert_num=(0,), const_expert_num=(0,), y_dtype=None, x_dtype=None, scales_dtype=None,
    shared_expert_x=None, ori_x=None, const_expert_alpha_1=None, const_expert_alpha_2=None, const_expert_v=None,
    activation_scale=None, weight_scale=None, group_list=None, out_dtype=(0,), comm_quant_mode=(0,), group_list_type=(0,),
)


@dataclasses.dataclass(frozen=True)
class _Group:
    """The EP group of one call and the routing every call of it shares, checked against the docs."""

    group: dist.ProcessGroup
    world: int
    rank: int
    num_local: int
    active: Tensor  #: [BS, K] bool: the routes this rank takes part with
    rows: int  #: A

    @classmethod
    def check(cls, args: dict[str, Any], version: int, x: Tensor) -> _Group:
        """Validate the arguments dispatch and combine share, agreeing with every peer, and size ``A``."""
        name = args["group_ep"]
        require(isinstance(name, str) and name.startswith(PREFIX), f"group_ep {name!r} is no HCCL communicator name")
        group = _resolve_process_group(name[len(PREFIX) :])
        world, rank = group.size(), dist.get_rank(group)
        ids, global_bs = args["expert_ids"], args["global_bs"]
        _agree(group, _input_problem(args, version, x, world, rank))
        active = _active(args["x_active_mask"], ids.shape)
        peers = _gather(group, (ids.shape[0], global_bs, args["moe_expert_num"], ids.shape[1], x.shape[1], bool(active.all())))
        batches = [p[0] for p in peers]
        # aclnnMoeDistributeDispatchV2.md, 约束说明 3: the same globalBs, moeExpertNum, ... on every rank
        require(len({p[1:5] for p in peers}) == 1, f"ranks disagree on global_bs, moe_expert_num, K or H: {peers}")
        if global_bs == 0:
            require(len(set(batches)) == 1, f"global_bs=0 but the ranks' BS differ: {batches}")
        else:
            require(global_bs % world == 0 and global_bs // world >= max(batches), f"global_bs={global_bs} is not max BS * W for BS {batches}")
        require(len(set(batches)) == 1 or all(p[5] for p in peers), "x_active_mask masks tokens while the ranks' BS differ")
        num_local = args["moe_expert_num"] // world
        return cls(group, world, rank, num_local, active, (global_bs or ids.shape[0] * world) * min(num_local, ids.shape[1]))


def _hierarchy() -> bool:
    """A2's hierarchy algorithm, chosen without ``comm_alg`` by HCCL_INTRA_PCIE_ENABLE=1 and HCCL_INTRA_ROCE_ENABLE=0
    (DISPATCH_V2, MoeDistributeDispatchA2CheckCommAlg; DISPATCH_V1, MoeDistributeDispatchA2IsLayered)."""
    pcie, roce = os.environ.get("HCCL_INTRA_PCIE_ENABLE"), os.environ.get("HCCL_INTRA_ROCE_ENABLE")
    return soc() == "A2" and pcie == "1" and roce == "0"


def _tiling_problem(version: int, bs: int, h: int, k: int, experts: int, world: int) -> str | None:
    """What the SoC's tiling rejects in a call's sizes (``None``: nothing)."""
    if soc() == "A3" and version == 2:  # DISPATCH_V2, CheckAttrs / CheckTensorShape (A3)
        return _first(
            (2 <= world <= 768, f"epWorldSize {world} outside [2, 768]"),
            (0 < bs <= 512, f"BS {bs} outside (0, 512]"),
            (1024 <= h <= 8192, f"H {h} outside [1024, 8192]"),
            (0 < experts <= 1024, f"moeExpertNum {experts} outside (0, 1024]"),
            (0 < k <= min(16, experts), f"K {k} outside (0, min(16, moeExpertNum)]"),
        )
    if soc() == "A3":  # DISPATCH_V1, CheckAttrs / CheckTensorShape (A3)
        return _first(
            (world % 8 == 0 and (256 % world == 0 or world % 144 == 0) and world <= 288,
             f"epWorldSize {world} not in [8, 16, 32, 64, 128, 144, 256, 288]"),
            (0 < bs <= 512, f"BS {bs} outside (0, 512]"),
            (h == 7168, f"H {h}: only 7168"),
            (0 < experts <= 512, f"moeExpertNum {experts} outside (0, 512]"),
            (0 < k <= 8, f"K {k} outside (0, 8]"),
        )
    layered = _hierarchy()  # A2: MoeDistributeDispatchA2CheckAttrAndSetTiling / CheckShapeAndSetTiling
    max_world = 64 if layered and version == 2 else 256  # MAX_EP_WORLD_SIZE_A2(_LAYERED)
    max_h = 10240 if layered and version == 2 else 7168  # (LAYERED_)MAX_HIDDEN_SIZE_A2
    return _first(
        (0 < world <= max_world and world % 8 == 0, f"epWorldSize {world} not a multiple of 8 in (0, {max_world}]"),
        (0 < experts <= 512, f"moeExpertNum {experts} outside (0, 512]"),
        (layered or experts // world <= 24, f"{experts // world} experts per rank, more than 24 (fullmesh)"),
        (0 < h <= max_h and h % 32 == 0, f"H {h} not a multiple of 32 in (0, {max_h}]"),
        (0 < bs <= 256, f"BS {bs} outside (0, 256]"),
        (0 < k <= 16, f"K {k} outside (0, 16]"),
    )


def _input_problem(args: dict[str, Any], version: int, x: Tensor, world: int, rank: int) -> str | None:
    """What this rank's arguments break of the tiling's and the documentation's rules, if anything."""
    experts, ids, mask = args["moe_expert_num"], args["expert_ids"], args["x_active_mask"]
    if args["ep_world_size"] != world or args["ep_rank_id"] != rank:
        return "ep_world_size / ep_rank_id are not the group's"
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16):  # CheckTensorDataType
        return f"token rows must be 2-D bf16/fp16, got {x.dtype} of shape {tuple(x.shape)}"
    if ids.dim() != 2 or ids.dtype != torch.int32:
        return "expert_ids must be [BS, K] int32"
    if experts % world:
        return f"moe_expert_num={experts} not divisible by {world}"
    problem = _tiling_problem(version, ids.shape[0], x.shape[1], ids.shape[1], experts, world)
    if problem is not None:
        return f"{soc()} tiling: {problem}"
    if not bool(((ids >= 0) & (ids < experts)).all()):  # aclnnMoeDistributeDispatchV2.md: ids in [0, moeExpertNum)
        return "expert_ids outside [0, moe_expert_num)"
    ordered = ids.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        return "an expert id repeats within a row of expert_ids"
    if mask is None:
        return None
    if version == 1:  # aclnnMoeDistributeDispatch.md: xActiveMask reserved, pass null
        return "x_active_mask is a reserved argument of the v1 ops"
    if soc() == "A2" and mask.dim() != 1:  # DISPATCH_V2, MoeDistributeDispatchA2CheckShapeAndSetTiling
        return "When xActiveMask is not null, it needs to be one-dimensional (A2)"
    if mask.dtype != torch.bool or tuple(mask.shape) not in ((ids.shape[0],), tuple(ids.shape)):  # CheckTensorDim
        return "x_active_mask must be bool [BS] or [BS, K]"
    if mask.dim() == 1 and bool((mask[1:] & ~mask[:-1]).any()):  # aclnnMoeDistributeDispatchV2.md
        return "a 1-D x_active_mask must hold every true before every false"
    return None


def _active(mask: Tensor | None, shape: torch.Size) -> Tensor:
    """``[BS, K]`` bool: the routes a (valid) ``x_active_mask`` lets through."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    return (mask.unsqueeze(1) if mask.dim() == 1 else mask).expand(shape).clone()


def _gather(group: dist.ProcessGroup, value: Any) -> list[Any]:
    out: list[Any] = [None] * group.size()
    dist.all_gather_object(out, value, group=group)
    return out


def _stack(parts: list[Tensor]) -> Tensor:
    """``[W, max rows, ...]``: the ranks' tensors, padded with zeros to the longest."""
    longest = max(p.shape[0] for p in parts)
    return torch.stack([torch.cat([p, p.new_zeros(longest - p.shape[0], *p.shape[1:])]) for p in parts])


def _dispatch(version: int, args: dict[str, Any]) -> tuple[Tensor, ...]:
    """Dispatch (v2 or v1) on the arguments as received: the seven outputs torch_npu returns."""
    _reject_unmodelled(args, _UNMODELLED)
    x, ids = args["x"], args["expert_ids"]
    g = _Group.check(args, version, x)
    quant_mode, count_type, expert_scales = args["quant_mode"], args["expert_token_nums_type"], args["expert_scales"]
    _agree(g.group, _first(
        # DISPATCH_V2: CheckAndSetExpertInfo takes quantMode in [0, 2], GetParamsAndSetTilingData refuses 1 ("cannot
        # support static quant now"); MoeDistributeDispatchA2CheckAttrAndSetTiling takes 0 and 2
        (quant_mode in (0, 2), f"quantMode={quant_mode}: 0 (no quantization) or 2 (dynamic) only"),
        (count_type in (0, 1), f"expert_token_nums_type={count_type} not in [0, 1]"),
        (expert_scales is None or _weights_like(expert_scales, ids), "expert_scales must be float32 [BS, K]"),
        # DISPATCH_V2, MoeDistributeDispatchA2CheckShapeAndSetTiling: isLayered && expertScales == nullptr
        (not (_hierarchy() and version == 2 and expert_scales is None), "expertScales is null (A2 hierarchy needs it)"),
    ))
    payload, dequant = (x, torch.zeros(x.shape[0])) if quant_mode == 0 else dynamic_quant(x)
    weights = torch.zeros(ids.shape) if expert_scales is None else expert_scales
    sources = _gather(g.group, (payload, ids.long(), g.active, dequant, weights))
    table = _route_table([(s[1], s[2]) for s in sources], g.num_local)
    mine = table[table[:, 0] == g.rank]
    filled, src, tok, k = mine.shape[0], mine[:, 2], mine[:, 3], mine[:, 4]
    _agree(g.group, None if filled <= g.rows else f"{filled} rows arrive but expand_x has A={g.rows} (global_bs too small?)")
    # op-plugin MoeDistributeDispatch(V2)KernelOpApi.cpp: expand_x and dynamic_scales come from
    # apply_tensor_without_format (uninitialised); the kernels write the filled rows only. NaN here (int8: UNWRITTEN_INT8).
    expand_x = payload.new_full((g.rows, x.shape[1]), UNWRITTEN_INT8 if payload.dtype == torch.int8 else float("nan"))
    expand_x[:filled] = _stack([s[0] for s in sources])[src, tok]
    dynamic_scales = torch.full((g.rows,), float("nan"))
    dynamic_scales[:filled] = _stack([s[3] for s in sources])[src, tok]
    expand_scales = torch.zeros(g.rows if expert_scales is not None else 0)
    if expert_scales is not None:
        expand_scales[:filled] = _stack([s[4] for s in sources])[src, tok, k]
    per_expert_source = torch.bincount(mine[:, 1] * g.world + src, minlength=g.num_local * g.world)
    counts = per_expert_source.view(g.num_local, g.world).sum(1)
    ep_recv_counts = torch.cumsum(per_expert_source, 0).to(torch.int32)
    if expert_scales is not None:  # op-plugin meta (npu_moe_distribute_dispatch(_v2)_meta): extra, unused here
        extra = (args["global_bs"] or ids.shape[0] * g.world) * 2 * ids.shape[1] * (g.world // 8)
        ep_recv_counts = torch.cat([ep_recv_counts, ep_recv_counts.new_zeros(extra)])
    handle = _assist(mine, g.rows, ids.shape) if version == 2 else _expand_idx(table, g.rank, ids.shape)
    return (
        expand_x,
        dynamic_scales,
        handle,
        torch.cumsum(counts, 0) if count_type == 0 else counts,
        ep_recv_counts,
        torch.zeros(args.get("tp_world_size", 0), dtype=torch.int32),
        expand_scales,
    )


def dynamic_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """``quant_mode`` 2 of the rows ``x [BS, H]`` (bf16/fp16) as every dispatch kernel computes it:
    ``(int8 [BS, H], dynamic_scales float32 [BS])``. Per row, in float32 (the kernels' ``QuantProcess``:
    mc2/moe_distribute_dispatch_v2/op_kernel/moe_distribute_dispatch_v2.h and ``_full_mesh.h`` on A3;
    mc2/moe_distribute_dispatch/op_kernel/moe_distribute_dispatch_a2.h, ``_a2_layered.h``, ``_a2_layered_aicpu.h``
    on A2; ``moe_distribute_dispatch.h``, v1 on A3):

    * ``m = 127.0f / max|x|`` (``dynamicScale``: a float32 division on the scalar unit; no floor, no clamp);
    * ``q = x * m`` (``Muls``, float32), then ``Cast(int32, CAST_RINT)`` (round half to even),
      ``Cast(half, CAST_ROUND)`` and ``Cast(int8, CAST_TRUNC)``, both exact on integers ``|q| <= 127``;
    * the scale sent along is ``1.0f / m`` (not ``max|x| / 127``).

    IEEE binary32 round-to-nearest is assumed for the division and the product. Where ``m`` is not finite
    (an all-zero row: ``127 / 0``; ``max|x| < 127 / FLT_MAX``) the products are NaN or infinite and their
    int8 conversion is not defined by the source: those rows get UNWRITTEN_INT8 here, and their scale
    ``1 / inf = 0``, as the kernels compute it."""
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    m = torch.div(torch.full_like(amax, 127.0), amax)  # one division (``127.0 / t`` is reciprocal, then product)
    q = torch.where(torch.isfinite(m), torch.round(xf * m), UNWRITTEN_INT8).to(torch.int8)
    return q, torch.div(torch.ones_like(m), m).squeeze(1)


def _route_table(routes: list[tuple[Tensor, Tensor]], num_local: int) -> Tensor:
    """``[R, 5]`` int64 (dest rank, local expert, source rank, token, k) of every active route of the
    group (``routes[s]`` = source ``s``'s ids and active mask), ordered by destination, expert, source
    rank, token: the rows each rank receives, in the order they arrive."""
    parts = []
    for s, (ids, active) in enumerate(routes):
        t, k = active.nonzero(as_tuple=True)
        expert = ids[t, k]
        parts.append(torch.stack([expert // num_local, expert % num_local, torch.full_like(t, s), t, k], 1))
    table = torch.cat(parts)
    tokens = 1 + max((ids.shape[0] for ids, _ in routes), default=0)
    key = ((table[:, 0] * num_local + table[:, 1]) * len(routes) + table[:, 2]) * tokens + table[:, 3]
    return table[torch.sort(key, stable=True).indices]


def _assist(mine: Tensor, rows: int, ids_shape: torch.Size) -> Tensor:
    """This module's ``assist_info_for_combine``: a header, then (source rank, token, k) of each row."""
    out = torch.zeros(max(ids_shape[0] * ids_shape[1], rows * 128), dtype=torch.int32)
    out[:_HEADER] = torch.tensor([_MAGIC, mine.shape[0], rows])
    out[_HEADER : _HEADER + 3 * mine.shape[0]] = mine[:, 2:].flatten().to(torch.int32)
    return out


def _expand_idx(table: Tensor, rank: int, ids_shape: torch.Size) -> Tensor:
    """``expand_idx [BS * K]``: for each of this rank's routes, its row at the destination (-1: inactive)."""
    dest = table[:, 0].contiguous()
    starts = torch.searchsorted(dest, dest)  # the table is sorted by destination
    row = torch.arange(table.shape[0]) - starts
    mine = table[:, 2] == rank
    out = torch.full((ids_shape[0] * ids_shape[1],), -1, dtype=torch.int32)
    out[table[mine, 3] * ids_shape[1] + table[mine, 4]] = row[mine].to(torch.int32)
    return out


def _combine(version: int, args: dict[str, Any], handle_name: str) -> Tensor:
    """Combine (v2 or v1; ``handle_name`` is the argument holding the dispatch's handle): ``[BS, H]``."""
    _reject_unmodelled(args, _UNMODELLED)
    expand_x, ids, scales, expand_scales = args["expand_x"], args["expert_ids"], args["expert_scales"], args["expand_scales"]
    g = _Group.check(args, version, expand_x)
    layered = _hierarchy()
    _agree(g.group, _first(
        (isinstance(scales, Tensor) and _weights_like(scales, ids), "expert_scales must be float32 [BS, K]"),
        (expand_x.shape[0] == g.rows, f"expand_x has {expand_x.shape[0]} rows, its dispatch returned A={g.rows}"),
        # mc2/moe_distribute_combine/op_kernel/moe_distribute_combine_a2_layered.h reads expandScales per row
        (not layered or (isinstance(expand_scales, Tensor) and expand_scales.shape == (g.rows,)), "expand_scales [A] missing (A2 hierarchy)"),
    ))
    peers = _gather(g.group, (expand_x, args[handle_name], args["ep_send_counts"], expand_scales))
    sent = [int(c[g.world * g.num_local - 1]) if c.numel() >= g.world * g.num_local else -1 for _, _, c, _ in peers]
    rows = torch.stack([p[0] for p in peers])  # [W, A, H]
    if version == 2:  # rows go where assist_info_for_combine says: nothing else is checked (MC2 documents it as opaque)
        _agree(g.group, None if int(args[handle_name][0]) == _MAGIC else "assist_info_for_combine is no dispatch_v2 output")
        records = torch.cat([
            torch.cat([torch.stack([torch.full((n,), dest), torch.arange(n)], 1), h[_HEADER : _HEADER + 3 * n].long().view(-1, 3)], 1)
            for dest, ((_, h, _, _), n) in enumerate(zip(peers, sent, strict=True))
        ])  # (dest, row, source rank, token, k)
        records = records[records[:, 2] == g.rank]
        dest, row, tok, k = records[:, 0], records[:, 1], records[:, 3], records[:, 4]
        _agree(g.group, None if bool((tok < ids.shape[0]).all()) else "a row addresses a token past BS (writes outside xOut)")
    else:
        index = args[handle_name]
        shaped = index.dtype == torch.int32 and index.shape == (ids.numel(),)
        _agree(g.group, None if shaped else "expand_idx must be the [BS * K] int32 dispatch returned")
        tok, k = g.active.nonzero(as_tuple=True)
        dest, row = ids[tok, k].long() // g.num_local, index[tok * ids.shape[1] + k].long()
        inside = bool(((row >= 0) & (row < torch.tensor(sent)[dest])).all())
        _agree(g.group, None if inside else "expand_idx points outside the rows its dispatch sent")
    weight = torch.stack([p[3] for p in peers])[dest, row] if layered else scales[tok, k]  # the hierarchy weights by expand_scales
    out = torch.zeros(ids.shape[0], expand_x.shape[1]).index_add_(0, tok, weight.unsqueeze(1) * rows[dest, row].float())
    # combine_v2 writes the rows of tokens with an active route only (moe_distribute_combine_v2.h, LocalWindowCopy)
    # into an output allocated uninitialised (op-plugin, MoeDistributeCombineKernelV2OpApi.cpp): NaN here
    out[~g.active.any(dim=1)] = float("nan")
    return out.to(expand_x.dtype)


# --- the torch_npu ops (signatures as torch_npu declares them) -------------------------------------


def npu_moe_distribute_dispatch_v2(
    x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, scales=None, x_active_mask=None,
    expert_scales=None, elastic_info=None, performance_info=None, group_tp="", tp_world_size=0, tp_rank_id=0,
    expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0, global_bs=0,
    expert_token_nums_type=1, comm_alg="", zero_expert_num=0, copy_expert_num=0, const_expert_num=0,
    y_dtype=None, x_dtype=None, scales_dtype=None,
):  # type: ignore[no-untyped-def]
    """Simulated ``torch_npu.npu_moe_distribute_dispatch_v2``: ``(expand_x, dynamic_scales,
    assist_info_for_combine, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales)``."""
    return _dispatch(2, enter("npu_moe_distribute_dispatch_v2", locals()))


def npu_moe_distribute_dispatch(
    x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, scales=None, x_active_mask=None,
    expert_scales=None, group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0, shared_expert_num=1,
    shared_expert_rank_num=0, quant_mode=0, global_bs=0, expert_token_nums_type=1,
):  # type: ignore[no-untyped-def]
    """Simulated ``torch_npu.npu_moe_distribute_dispatch`` (v1): as v2 with ``expand_idx [BS * K]``."""
    return _dispatch(1, enter("npu_moe_distribute_dispatch", locals()))


def npu_moe_distribute_combine_v2(
    expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep, ep_world_size,
    ep_rank_id, moe_expert_num, *, tp_send_counts=None, x_active_mask=None, expand_scales=None,
    shared_expert_x=None, elastic_info=None, ori_x=None, const_expert_alpha_1=None, const_expert_alpha_2=None,
    const_expert_v=None, performance_info=None, group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
    shared_expert_num=1, shared_expert_rank_num=0, global_bs=0, comm_quant_mode=0, comm_alg="",
    zero_expert_num=0, copy_expert_num=0, const_expert_num=0,
):  # type: ignore[no-untyped-def]
    """Simulated ``torch_npu.npu_moe_distribute_combine_v2``: ``[BS, H]``, ``sum_k expert_scales * row``."""
    return _combine(2, enter("npu_moe_distribute_combine_v2", locals()), "assist_info_for_combine")


def npu_moe_distribute_combine(
    expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, group_ep, ep_world_size, ep_rank_id,
    moe_expert_num, *, tp_send_counts=None, x_active_mask=None, activation_scale=None, weight_scale=None,
    group_list=None, expand_scales=None, shared_expert_x=None, group_tp="", tp_world_size=0, tp_rank_id=0,
    expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, global_bs=0, out_dtype=0,
    comm_quant_mode=0, group_list_type=0,
):  # type: ignore[no-untyped-def]
    """Simulated ``torch_npu.npu_moe_distribute_combine`` (v1)."""
    return _combine(1, enter("npu_moe_distribute_combine", locals()), "expand_idx")
