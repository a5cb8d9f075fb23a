"""DeepEP's low-latency mode, simulated: ``low_latency_dispatch`` (BF16) into per-expert blocks in a
shuffled arrival order, ``low_latency_combine``, the two reused receive buffers, and the RDMA size hint."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moe_ops.packing import RowFormat
from moe_ops.testing.sim.deep_ep.common import (
    EventOverlap,
    align,
    check_tensor,
    checks,
    exchange,
    gather,
    pack,
    require,
)

# SWITCH_HIDDEN, csrc/kernels/launch.cuh (3072 since 73b6ea4): any other hidden asserts "Unsupported hidden"
LOW_LATENCY_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
LOW_LATENCY_MAX_TOP_K = 11  # kNumMaxTopK, csrc/kernels/internode_ll.cu, dispatch
BLOCK_BITS = 32
FP8_CHANNELS = 128  # kNumPerChannels, csrc/kernels/internode_ll.cu, dispatch: one scale per 128 columns
FP8_MARGIN = 1e-4  # kFP8Margin, csrc/kernels/utils.cuh: the amax floor
E4M3_MAX = torch.tensor(448.0)  # kFinfoAmaxE4M3, csrc/kernels/utils.cuh
E4M3_MAX_INV = torch.tensor(1 / 448.0)  # kFinfoAmaxInvE4M3 = 1 / 448.0f: 1/448 rounded to float32 once
UE8M0_NAN = -1  # four 0xFF bytes: UE8M0's NaN, in memory the kernel leaves unwritten


def fp8_cast(x: Tensor, round_scale: bool) -> tuple[Tensor, Tensor]:
    """DeepEP's low-latency FP8 cast of bf16 ``x [T, H]``: ``(q [T, H] float8_e4m3fn, scale_inv [T, H/128]
    float32)``, in float32 as the kernel computes it (csrc/kernels/internode_ll.cu, dispatch;
    csrc/kernels/utils.cuh, ``calculate_fp8_scales``, ``fast_log2_ceil``, ``fast_pow2``; 567632d and v1.2.1):
    ``amax = max(1e-4, max |x|)`` per 128 columns; with ``round_scale`` ``scale_inv = 2**ceil(log2(amax *
    float32(1/448)))`` and ``scale = 1 / scale_inv`` (exact), else ``scale_inv = amax * float32(1/448)`` and
    ``scale = 448 / amax``; ``q = x * scale`` rounded to nearest even and saturated to +-448
    (``__nv_cvt_float2_to_fp8x2(..., __NV_SATFINITE, __NV_E4M3)``)."""
    t, h = x.shape
    xf = x.float().view(t, h // FP8_CHANNELS, FP8_CHANNELS)
    amax = xf.abs().amax(dim=-1).clamp(min=FP8_MARGIN)
    if round_scale:
        bits = (amax * E4M3_MAX_INV).view(torch.int32)
        exponent = ((bits >> 23) & 0xFF) - 127 + (bits & 0x7FFFFF != 0).int()  # fast_log2_ceil
        scale, scale_inv = ((127 - exponent) << 23).view(torch.float32), ((exponent + 127) << 23).view(torch.float32)  # fast_pow2
    else:
        scale, scale_inv = E4M3_MAX / amax, amax * E4M3_MAX_INV
    q = (xf * scale.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(t, h), scale_inv


def ue8m0_packed(scales: Tensor) -> Tensor:
    """float32 power-of-two scales ``[..., S]`` as DeepEP's UE8M0 format: the exponent byte of each
    (``extract_required_scale_format``, csrc/kernels/utils.cuh), four to an int32 (``[..., S/4]``)."""
    exponent = (scales.view(torch.int32) >> 23).to(torch.uint8)
    return exponent.view(torch.int32)


def _fresh(t: Tensor) -> Tensor:
    """``t`` overwritten as memory no kernel wrote: NaN (float8: NaN bytes; packed UE8M0: 0xFF bytes)."""
    return t.fill_(UE8M0_NAN if t.dtype == torch.int32 else float("nan"))


class LowLatencyMode:
    """The low-latency methods of the simulated ``Buffer``."""

    group: Any
    group_size: int
    rank: int
    num_rdma_bytes: int
    num_qps_per_rank: int
    low_latency_mode: bool
    nvshmem_qp_depth: int
    destroyed: bool
    _dirty: bool
    _low_latency_outputs: list[tuple[Tensor, ...] | None]
    _low_latency_calls: int

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
        """Two send and two receive buffers of one BF16 message per (expert, token), plus signals."""
        message = hidden * 2 + 16
        send = num_max_dispatch_tokens_per_rank * message
        receive = num_experts * num_max_dispatch_tokens_per_rank * message
        return align(2 * (send + receive) + 2 * align(num_experts * 8))


    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        require(not self.destroyed, "the buffer was destroyed")  # deep_ep/buffer.py, Buffer.destroy: runtime = None
        # csrc/deep_ep.cpp, Buffer::clean_low_latency_buffer
        require(self.low_latency_mode, "clean_low_latency_buffer on a buffer not in low-latency mode")
        self._dirty = False

    def _low_latency_checks(self, max_tokens: int, hidden: int, num_experts: int) -> None:
        """Host-side checks of every low-latency kernel."""
        world = self.group_size
        require(not self.destroyed, "the buffer was destroyed")  # deep_ep/buffer.py, Buffer.destroy: runtime = None
        # csrc/deep_ep.cpp, Buffer::low_latency_dispatch / low_latency_combine
        require(self.low_latency_mode, "low-latency kernels need low_latency_mode=True")
        require(num_experts % world == 0, "num_experts must be a multiple of the group size")
        # deep_ep/buffer.py, Buffer.clean_low_latency_buffer: "after running the normal dispatch/combine, you
        # must run this function before executing any low-latency kernel"
        require(not self._dirty, "low-latency kernel after normal-mode kernels without clean_low_latency_buffer")
        # deep_ep/buffer.py, Buffer.__init__: "the low-latency mode requires that this number equals to the
        # number of local experts" (csrc/kernels/internode_ll.cu, dispatch: num_rc_per_pe >= num_local_experts)
        require(self.num_qps_per_rank == num_experts // world, "num_qps_per_rank must equal the local expert count")
        require(hidden in LOW_LATENCY_HIDDEN, f"hidden size {hidden} is not one the kernels are built for")
        # deep_ep/buffer.py, Buffer.low_latency_dispatch / low_latency_combine (since d981409)
        require(self.nvshmem_qp_depth >= (max_tokens + 1) * 2, f"NVSHMEM_QP_DEPTH {self.nvshmem_qp_depth} < (Tmax + 1) * 2 for Tmax {max_tokens}")
        needed = self.get_low_latency_rdma_size_hint(max_tokens, hidden, world, num_experts)
        # csrc/deep_ep.cpp, Buffer::low_latency_dispatch: layout.total_bytes <= num_rdma_bytes
        require(self.num_rdma_bytes >= needed, f"RDMA buffer of {self.num_rdma_bytes} bytes, this call needs {needed}")

    def _next_low_latency_buffer(self, max_tokens: int, hidden: int, num_experts: int) -> int:
        """Which of the two buffers this kernel uses (every rank must pass the same sizes); the tensor
        the kernel before the last one returned from it is overwritten (:func:`_fresh`)."""
        agreed = gather(self.group, torch.tensor([max_tokens, hidden, num_experts]))
        require(bool((agreed == agreed[0]).all()), f"ranks disagree on (Tmax, hidden, experts): {agreed.tolist()}")
        which = self._low_latency_calls % 2
        self._low_latency_calls += 1
        for reused in self._low_latency_outputs[which] or ():
            _fresh(reused)
        return which

    def low_latency_dispatch(
        self, x: Tensor, topk_idx: Tensor, num_max_dispatch_tokens_per_rank: int, num_experts: int,
        cumulative_local_expert_recv_stats: Tensor | None = None, dispatch_wait_recv_cost_stats: Tensor | None = None,
        use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[Tensor | tuple[Tensor, Tensor], Tensor, tuple[Any, ...], EventOverlap, None]:
        """``(recv_x [L, W*Tmax, H], recv_count [L] int32, handle, event, hook)``; handle is
        ``(src_info [L, W*Tmax] int32, layout_range [L, W] int64, Tmax, H, E)``. ``use_fp8``: ``recv_x`` is
        ``(float8_e4m3fn [L, W*Tmax, H], scales)``, rows cast by :func:`fp8_cast`; scales ``[L, W*Tmax, H/128]``
        float32, or with ``use_ue8m0`` ``[L, W*Tmax, H/512]`` int32 (:func:`ue8m0_packed`), column-major in the
        last two dimensions (a transposed view, csrc/deep_ep.cpp, Buffer::low_latency_dispatch)."""
        max_tokens, world, me = num_max_dispatch_tokens_per_rank, self.group_size, self.rank
        num_local, hidden = num_experts // world, x.shape[1]
        with checks(self.group):
            require(not return_recv_hook, "receive hooks are not simulated")
            if use_fp8:  # csrc/deep_ep.cpp, Buffer::low_latency_dispatch ("TODO: support unaligned cases")
                require(x.shape[1] % 512 == 0, f"FP8 needs hidden % 512 == 0, got {x.shape[1]}")
            # csrc/kernels/internode_ll.cu, dispatch (host side): "UE8M0 SF requires `round_scale=True`"
            require(not use_ue8m0 or round_scale, "UE8M0 SF requires round_scale=True")
            # csrc/deep_ep.cpp, Buffer::low_latency_dispatch (host asserts)
            require(x.dim() == 2 and x.is_contiguous() and x.dtype == torch.bfloat16, "x must be a contiguous [T, H] bf16 tensor")
            check_tensor("topk_idx", topk_idx, (x.shape[0], topk_idx.shape[1]), torch.int64)
            require(x.shape[0] <= max_tokens, f"{x.shape[0]} tokens > num_max_dispatch_tokens_per_rank={max_tokens}")
            require(world * max_tokens % 4 == 0, "TMA requires the number of tokens (num_ranks * Tmax) to be multiple of 4")
            # csrc/kernels/internode_ll.cu, dispatch (host side)
            require(topk_idx.shape[1] <= LOW_LATENCY_MAX_TOP_K, f"top-k {topk_idx.shape[1]} > {LOW_LATENCY_MAX_TOP_K}")
            self._low_latency_checks(max_tokens, hidden, num_experts)
        which = self._next_low_latency_buffer(max_tokens, hidden, num_experts)

        # One message per route, grouped by destination rank: the token (FP8: cast once on the sender, its
        # scales beside it), its expert there, its index.
        token, k = (topk_idx >= 0).nonzero(as_tuple=True)
        expert = topk_idx[token, k]
        order = torch.argsort(expert // num_local, stable=True)
        token, expert = token[order], expert[order]
        sent, sent_scales = fp8_cast(x, round_scale) if use_fp8 else (x, x.new_empty(x.shape[0], 0, dtype=torch.float32))
        row_format = RowFormat(((hidden, sent.dtype), (sent_scales.shape[1], torch.float32), (1, torch.int32), (1, torch.int32)))
        rows = pack(row_format, [sent[token], sent_scales[token], (expert % num_local).int().unsqueeze(1), token.int().unsqueeze(1)])
        got, from_each = exchange(self.group, rows, torch.bincount(expert // num_local, minlength=world).tolist())
        got_x, got_scales, got_expert, got_token = row_format.views(got)
        source = torch.repeat_interleave(torch.arange(world), torch.tensor(from_each, dtype=torch.int64))

        shape = (num_local, world * max_tokens, hidden)
        outputs = self._low_latency_outputs[which]
        if outputs is None or outputs[0].shape != shape or outputs[0].dtype != sent.dtype or len(outputs) != 1 + use_fp8:
            outputs = (sent.new_empty(shape),)
            if use_fp8:  # column-major scales: [L, S, W*Tmax] in memory
                stored = (hidden // 512, torch.int32) if use_ue8m0 else (hidden // FP8_CHANNELS, torch.float32)
                outputs += (torch.empty(num_local, stored[0], shape[1], dtype=stored[1]),)
            self._low_latency_outputs[which] = tuple(_fresh(t) for t in outputs)
        recv_x = outputs[0]
        if use_fp8:
            got_scales = ue8m0_packed(got_scales) if use_ue8m0 else got_scales
            recv_scales = outputs[1].transpose(1, 2)
        src_info = torch.full(shape[:2], -1, dtype=torch.int32)
        layout_range = torch.zeros(num_local, world, dtype=torch.int64)
        recv_count = torch.zeros(num_local, dtype=torch.int32)
        shuffle = torch.Generator().manual_seed(7919 * self._low_latency_calls + me)
        for e in range(num_local):  # blocks, and rows inside them, in a shuffled arrival order
            begin = 0
            for j in torch.randperm(world, generator=shuffle).tolist():
                rows_here = ((got_expert[:, 0] == e) & (source == j)).nonzero().squeeze(1)
                rows_here = rows_here[torch.randperm(rows_here.numel(), generator=shuffle)]
                count = rows_here.numel()
                recv_x[e, begin : begin + count] = got_x[rows_here]
                if use_fp8:
                    recv_scales[e, begin : begin + count] = got_scales[rows_here]
                src_info[e, begin : begin + count] = got_token[rows_here, 0]
                layout_range[e, j] = (begin << BLOCK_BITS) | count
                begin += count
            recv_count[e] = begin
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats += recv_count
        received = (recv_x, recv_scales) if use_fp8 else recv_x
        return received, recv_count, (src_info, layout_range, max_tokens, hidden, num_experts), EventOverlap(), None

    def low_latency_combine(
        self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, handle: tuple[Any, ...], use_logfmt: bool = False,
        zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False, out: Tensor | None = None,
        combine_wait_recv_cost_stats: Tensor | None = None,
    ) -> tuple[Tensor, EventOverlap, None]:
        """``out[t] = sum_k topk_weights[t, k] * x[expert k's row of t]`` on the source rank (float32),
        ``[T, H]`` bf16."""
        src_info, layout_range, max_tokens, hidden, num_experts = handle
        world, me = self.group_size, self.rank
        num_local = num_experts // world
        num_tokens, top_k = topk_idx.shape
        with checks(self.group):
            require(not (use_logfmt or zero_copy or return_recv_hook or out is not None), "only the plain combine is simulated")
            # csrc/deep_ep.cpp, Buffer::low_latency_combine (host asserts)
            require(num_tokens <= max_tokens, f"{num_tokens} tokens > num_max_dispatch_tokens_per_rank={max_tokens}")
            check_tensor("x", x, (num_local, world * max_tokens, hidden), torch.bfloat16)
            check_tensor("src_info", src_info, (num_local, world * max_tokens), torch.int32)
            check_tensor("layout_range", layout_range, (num_local, world), torch.int64)
            check_tensor("topk_idx", topk_idx, (num_tokens, top_k), torch.int64)
            check_tensor("topk_weights", topk_weights, (num_tokens, top_k), torch.float32)
            self._low_latency_checks(max_tokens, hidden, num_experts)
            # Expert side: each block's rows go back to their source rank, tagged (global expert, token).
            keys: list[list[Tensor]] = [[] for _ in range(world)]
            rows: list[list[Tensor]] = [[] for _ in range(world)]
            for e in range(num_local):
                for j in range(world):
                    begin, count = int(layout_range[e, j]) >> BLOCK_BITS, int(layout_range[e, j]) & ((1 << BLOCK_BITS) - 1)
                    require(begin + count <= world * max_tokens, f"layout_range[{e}, {j}] points past the buffer")
                    tokens = src_info[e, begin : begin + count].long()
                    keys[j].append(torch.stack([torch.full_like(tokens, me * num_local + e), tokens], dim=1))
                    rows[j].append(x[e, begin : begin + count])
        self._next_low_latency_buffer(max_tokens, hidden, num_experts)
        row_format = RowFormat(((hidden, x.dtype), (2, torch.int64)))
        send = pack(row_format, [torch.cat([torch.cat(r) for r in rows]), torch.cat([torch.cat(k) for k in keys])])
        got, _ = exchange(self.group, send, [sum(r.shape[0] for r in per_rank) for per_rank in rows])
        got_x, got_key = row_format.views(got)

        # Source side: slot (expert, token) holds the last row written there; sum with the weights.
        valid = topk_idx >= 0
        with checks(self.group):  # on a GPU: a receiver waiting forever, or reading the wrong slot
            require(bool((got_key[:, 1] < max_tokens).all()), "a row names a token past num_max_dispatch_tokens_per_rank")
            slot = torch.full((num_experts * max_tokens,), -1, dtype=torch.int64)
            slot.scatter_reduce_(0, got_key[:, 0] * max_tokens + got_key[:, 1], torch.arange(got.shape[0]), "amax")
            row = slot[torch.where(valid, topk_idx * max_tokens + torch.arange(num_tokens).unsqueeze(1), 0)]
            require(bool((row[valid] >= 0).all()), "a token's expert sent no row for it")
        picked = torch.zeros(num_tokens, top_k, hidden)
        picked[valid] = got_x[row[valid]].float()
        return (picked * topk_weights.unsqueeze(-1)).sum(dim=1).to(x.dtype), EventOverlap(), None
