"""DeepEP's normal mode (intranode, W = 2, 4, 8), simulated: ``get_dispatch_layout``, ``dispatch``
(and its cached-handle form), ``combine``, and the ``Config`` with its size hints."""

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

INTRANODE_RANKS = (2, 4, 8)  # SWITCH_RANKS, csrc/kernels/launch.cuh
# deep_ep/buffer.py, Buffer.get_dispatch_config / get_combine_config: the group sizes with a recommendation
CONFIG_RANKS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)
TOKEN_META_BYTES = 2048  # per queued token: source index, up to 128 top-k ids and weights, scales
# csrc/kernels/intranode.cu, dispatch (SM90 build): a token is staged in a per-warp TMA buffer of
# kNumTMABytesPerWarp bytes, in two halves plus an 8-byte mbarrier (a device trap beyond)
TMA_BYTES_PER_WARP = 8192
FP8_BLOCK = 128  # deep_ep/buffer.py, Buffer.dispatch: FP8 x comes with a float32 scale per 128 columns


class Config:
    """DeepEP's performance config: SMs and queue depths. The simulator uses ``num_sms`` (channels)."""

    def __init__(
        self,
        num_sms: int,
        num_max_nvl_chunked_send_tokens: int,
        num_max_nvl_chunked_recv_tokens: int,
        num_max_rdma_chunked_send_tokens: int = 6,
        num_max_rdma_chunked_recv_tokens: int = 256,
    ) -> None:
        require(num_sms >= 0 and 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens, "bad Config")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """NVLink buffer bytes for tokens of ``hidden_bytes``: per channel and rank, a queue of tokens."""
        queues = self.num_sms // 2 * min(num_ranks, 8)
        return align(queues * (self.num_max_nvl_chunked_recv_tokens * (hidden_bytes + TOKEN_META_BYTES) + 16))


def _channel_of_tokens(num_tokens: int, num_channels: int) -> Tensor:
    """``[T]``: the channel carrying each token (contiguous ranges of ``ceil(T / channels)`` tokens)."""
    per_channel = max(1, -(-num_tokens // num_channels))
    return torch.arange(num_tokens) // per_channel


def _per_channel_counts(in_rank: Tensor, num_channels: int) -> Tensor:
    """``[W, channels]`` int64: tokens each channel sends to each rank."""
    counts = torch.zeros(in_rank.shape[1], num_channels, dtype=torch.int64)
    counts.index_add_(1, _channel_of_tokens(in_rank.shape[0], num_channels), in_rank.T.long())
    return counts


class NormalMode:
    """The normal-mode methods of the simulated ``Buffer`` (and its SM setting, shared class-wide as DeepEP's)."""

    num_sms: int = 20
    group: Any
    group_size: int
    rank: int
    num_nvl_bytes: int
    low_latency_mode: bool
    destroyed: bool
    _dirty: bool

    @classmethod
    def set_num_sms(cls, new_num_sms: int) -> None:
        require(new_num_sms % 2 == 0, "the SM count must be even")  # deep_ep/buffer.py, Buffer.set_num_sms
        cls.num_sms = new_num_sms

    @classmethod
    def get_dispatch_config(cls, num_ranks: int) -> Config:
        assert num_ranks in CONFIG_RANKS, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(cls.num_sms, 6, 256, 6, 128)

    @classmethod
    def get_combine_config(cls, num_ranks: int) -> Config:
        assert num_ranks in CONFIG_RANKS, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(cls.num_sms, 4, 256, 6, 128)


    def _normal_call(self, x: Tensor, config: Config | None, combine: bool, x_scales: Tensor | None = None) -> Config:
        """Checks of every normal-mode kernel (``x_scales``: FP8 ``x``); returns the config it runs with."""
        world = self.group_size
        require(not self.destroyed, "the buffer was destroyed")  # deep_ep/buffer.py, Buffer.destroy: runtime = None
        require(world in INTRANODE_RANKS, f"normal-mode kernels run on 2, 4 or 8 ranks within a node, not {world}")
        config = config or (self.get_combine_config(world) if combine else self.get_dispatch_config(world))
        # csrc/deep_ep.cpp, Buffer::intranode_dispatch / intranode_combine (host asserts)
        require(config.num_sms % 2 == 0, "the SM count must be even")
        if x_scales is None:
            require(x.dim() == 2 and x.is_contiguous() and x.dtype == torch.bfloat16, "x must be a contiguous [N, H] bf16 tensor")
        else:  # deep_ep/buffer.py, Buffer.dispatch: (float8_e4m3fn [T, H], float [T, H // 128] "(requiring divisible)");
            # csrc/deep_ep.cpp, Buffer::intranode_dispatch: x.element_size() == 1, x_scales 2-D with T rows
            require(x.dim() == 2 and x.is_contiguous() and x.dtype == torch.float8_e4m3fn, "FP8 x must be a contiguous [N, H] float8_e4m3fn tensor")
            require(x.shape[1] % FP8_BLOCK == 0, f"FP8 hidden size {x.shape[1]} is not divisible by {FP8_BLOCK}")
            check_tensor("x_scales", x_scales, (x.shape[0], x.shape[1] // FP8_BLOCK), torch.float32)
        hidden_bytes = x.shape[1] * x.element_size()
        require(hidden_bytes % 16 == 0, f"hidden size {x.shape[1]} is not a whole number of 16-byte chunks")
        if not combine:  # csrc/kernels/intranode.cu, dispatch: hidden_int4 % 2 == 0 and half_hidden_bytes + 8 <= 8192
            require(
                hidden_bytes % 32 == 0 and hidden_bytes // 2 + 8 <= TMA_BYTES_PER_WARP,
                f"hidden size {x.shape[1]} does not fit the dispatch kernel's TMA staging buffer (a device trap)",
            )
        needed = config.get_nvl_buffer_size_hint(hidden_bytes, world)
        require(self.num_nvl_bytes >= needed, f"NVLink buffer of {self.num_nvl_bytes} bytes, this call needs {needed}")
        self._dirty = self.low_latency_mode
        return config

    def get_dispatch_layout(
        self, topk_idx: Tensor, num_experts: int, previous_event: Any = None, async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[Tensor, None, Tensor, Tensor, EventOverlap]:
        """``(tokens per rank [W] int32, None, tokens per expert [E] int32, is_token_in_rank [T, W] bool, event)``."""
        require(not self.destroyed, "the buffer was destroyed")  # deep_ep/buffer.py, Buffer.destroy: runtime = None
        # csrc/deep_ep.cpp, Buffer::get_dispatch_layout (host asserts; the int64 type is topk_idx_t's default)
        require(topk_idx.dim() == 2 and topk_idx.is_contiguous() and topk_idx.dtype == torch.int64, "topk_idx must be [T, K] int64")
        world = self.group_size
        valid = topk_idx >= 0
        dest = torch.where(valid, topk_idx // (num_experts // world), world)
        in_rank = torch.zeros(topk_idx.shape[0], world + 1, dtype=torch.bool).scatter_(1, dest, True)[:, :world].contiguous()
        per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).int()
        return in_rank.sum(0).int(), None, per_expert, in_rank, EventOverlap()

    def dispatch(
        self, x: Tensor, handle: tuple[Tensor, ...] | None = None, num_tokens_per_rank: Tensor | None = None,
        num_tokens_per_rdma_rank: Tensor | None = None, is_token_in_rank: Tensor | None = None,
        num_tokens_per_expert: Tensor | None = None, topk_idx: Tensor | None = None, topk_weights: Tensor | None = None,
        expert_alignment: int = 1, num_worst_tokens: int = 0, config: Config | None = None, previous_event: Any = None,
        async_finish: bool = False, allocate_on_comm_stream: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, list[int] | None, tuple[Tensor, ...] | None, EventOverlap]:
        """``(recv_x, recv_topk_idx, recv_topk_weights, per-expert counts, handle, event)``; with ``handle``
        (cached mode) only ``recv_x``. ``x`` may be DeepEP's FP8 tuple ``(x [T, H] float8_e4m3fn, x_scales
        [T, H/128] float32)``; ``recv_x`` is then ``(recv_x, recv_x_scales [M, H/128])``."""
        x, x_scales = x if isinstance(x, tuple) else (x, None)  # deep_ep/buffer.py, Buffer.dispatch
        if handle is not None:
            require(x_scales is None, "a cached FP8 dispatch is not simulated")
            return self._cached_dispatch(x, handle, config, topk_idx is None and topk_weights is None), None, None, None, None, EventOverlap()
        world, me = self.group_size, self.rank
        with checks(self.group):
            config = self._normal_call(x, config, combine=False, x_scales=x_scales)
            require(expert_alignment == 1, "expert_alignment other than 1 is not simulated")
            # csrc/deep_ep.cpp, Buffer::intranode_dispatch (host asserts on the layout and the top-k tensors)
            require(topk_idx is not None and topk_weights is not None, "dispatch without top-k is not simulated")
            require(all(t is not None for t in (num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)), "dispatch needs the layout")
            num_tokens, top_k = topk_idx.shape
            num_experts = num_tokens_per_expert.numel()
            num_local, num_channels = num_experts // world, config.num_sms // 2
            check_tensor("is_token_in_rank", is_token_in_rank, (num_tokens, world), torch.bool)
            check_tensor("num_tokens_per_rank", num_tokens_per_rank, (world,), torch.int32)
            check_tensor("num_tokens_per_expert", num_tokens_per_expert, (num_experts,), torch.int32)
            check_tensor("topk_weights", topk_weights, (num_tokens, top_k), torch.float32)
            require(num_experts % world == 0 and x.shape[0] == num_tokens, "inconsistent dispatch arguments")
            require(torch.equal(num_tokens_per_rank, is_token_in_rank.sum(0).int()), "num_tokens_per_rank disagrees with is_token_in_rank")

        per_channel = _per_channel_counts(is_token_in_rank, num_channels)  # [W, channels] sent from here
        meta = gather(self.group, torch.cat([num_tokens_per_rank.long(), num_tokens_per_expert.long(), per_channel.flatten()]))
        counts = meta[:, :world]  # [source, destination]
        rank_prefix = counts.cumsum(0)
        received_per_expert = meta[:, world : world + num_experts].sum(0)[me * num_local : (me + 1) * num_local]
        from_sources = meta[:, world + num_experts :].view(world, world, num_channels)[:, me]  # [source, channel]
        block_start = rank_prefix[:, me] - counts[:, me]
        recv_channel_prefix = block_start.unsqueeze(1) + from_sources.cumsum(1) - from_sources

        # One row per (token, destination), in token order: the token, its index, its ids made local there.
        # (FP8: and the token's scales)
        widths = [(x.shape[1], x.dtype), (1, torch.int32), (top_k, torch.int64), (top_k, torch.float32)]
        row_format = RowFormat(tuple(widths if x_scales is None else [*widths, (x_scales.shape[1], torch.float32)]))
        rank, token = is_token_in_rank.T.nonzero(as_tuple=True)  # grouped by destination, in token order
        local = topk_idx[token] - (rank * num_local).unsqueeze(1)
        mine = (topk_idx[token] >= 0) & (local >= 0) & (local < num_local)
        fields = [x[token], token.int().unsqueeze(1), torch.where(mine, local, -1), torch.where(mine, topk_weights[token], 0)]
        rows = pack(row_format, fields if x_scales is None else [*fields, x_scales[token]])
        got, _ = exchange(self.group, rows, counts[me].tolist())
        received = int(rank_prefix[-1, me])
        num_rows = num_worst_tokens if num_worst_tokens > 0 else received
        with checks(self.group):  # on a GPU: writes past the receive buffers
            require(num_rows >= received, f"num_worst_tokens={num_worst_tokens} but {received} tokens arrived")
        # past the count DeepEP writes only the ids (-1): the rest is garbage (NaN; FP8 rows NaN bytes 0x7F)
        garbage = (float("nan"), 2**31 - 1, -1, float("nan"), float("nan"))
        recv_x, recv_src, recv_ids, recv_weights, *recv_scales = (
            torch.cat([field, field.new_full((num_rows - received, *field.shape[1:]), fill)])
            for field, fill in zip(row_format.views(got), garbage, strict=False)
        )
        sent_before = is_token_in_rank.long().cumsum(0) - 1  # position among the tokens sent to each rank
        channel_start = (per_channel.cumsum(1) - per_channel).T  # [channel, W]
        channel = _channel_of_tokens(num_tokens, num_channels)
        send_head = torch.where(is_token_in_rank, sent_before - channel_start[channel], -1).int()
        handle = (
            rank_prefix.int(),
            per_channel.cumsum(1).int(),
            recv_channel_prefix.int(),
            recv_src.squeeze(1).contiguous(),
            is_token_in_rank,
            send_head,
        )
        counts_list = [] if num_worst_tokens > 0 else received_per_expert.tolist()
        return (recv_x, *recv_scales) if recv_scales else recv_x, recv_ids, recv_weights, counts_list, handle, EventOverlap()

    def _cached_dispatch(self, x: Tensor, handle: tuple[Tensor, ...], config: Config | None, no_top_k: bool) -> Tensor:
        """Dispatch ``x`` as the dispatch that made ``handle`` did (rank prefix, send-side channel
        prefix, receive count and ``is_token_in_rank`` are what DeepEP reads)."""
        world, me = self.group_size, self.rank
        with checks(self.group):
            config = self._normal_call(x, config, combine=False)
            # deep_ep/buffer.py, Buffer.dispatch (cached mode) and csrc/deep_ep.cpp, Buffer::intranode_dispatch
            require(no_top_k, "cached dispatch takes no top-k")
            rank_prefix, channel_prefix, _, recv_src_idx, in_rank, _ = handle
            num_channels = config.num_sms // 2
            check_tensor("rank_prefix_matrix", rank_prefix, (world, world), torch.int32)
            check_tensor("channel_prefix_matrix", channel_prefix, (world, num_channels), torch.int32)
            check_tensor("is_token_in_rank", in_rank, (x.shape[0], world), torch.bool)
            require(recv_src_idx.dim() == 1 and recv_src_idx.dtype == torch.int32, "recv_src_idx must be 1-D int32")
            per_channel = _per_channel_counts(in_rank, num_channels)
            require(torch.equal(channel_prefix.long(), per_channel.cumsum(1)), "channel_prefix_matrix does not describe is_token_in_rank")
        token = in_rank.T.nonzero(as_tuple=True)[1]
        got, from_each = exchange(self.group, x[token].view(torch.uint8), in_rank.sum(0).tolist())
        column = rank_prefix[:, me].long()
        with checks(self.group):
            require(from_each == (column - torch.cat([column.new_zeros(1), column[:-1]])).tolist(), "rank_prefix_matrix does not match what arrived")
            require(recv_src_idx.shape[0] >= got.shape[0], "fewer receive rows than tokens arrived")
        recv_x = x.new_full((recv_src_idx.shape[0], x.shape[1]), float("nan"))
        recv_x[: got.shape[0]] = got.view(x.dtype)
        return recv_x

    def combine(
        self, x: Tensor, handle: tuple[Tensor, ...], topk_weights: Tensor | None = None, bias: Any = None,
        config: Config | None = None, previous_event: Any = None, async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[Tensor, Tensor | None, EventOverlap]:
        """Sum (no weights) each token's rows over the ranks it was dispatched to: ``(combined_x [T, H],
        combined_topk_weights [T, K] or None, event)``."""
        world, me = self.group_size, self.rank
        top_k = 0 if topk_weights is None else topk_weights.shape[1]
        with checks(self.group):
            config = self._normal_call(x, config, combine=True)
            require(bias is None, "bias is not simulated")
            # csrc/deep_ep.cpp, Buffer::intranode_combine (host asserts on the handle and topk_weights)
            rank_prefix, _, recv_channel_prefix, src_idx, _, send_head = handle  # the receive-side channel prefix
            num_channels = config.num_sms // 2
            check_tensor("rank_prefix_matrix", rank_prefix, (world, world), torch.int32)
            check_tensor("channel_prefix_matrix", recv_channel_prefix, (world, num_channels), torch.int32)
            check_tensor("src_idx", src_idx, (x.shape[0],), torch.int32)
            require(send_head.dim() == 2 and send_head.shape[1] == world and send_head.dtype == torch.int32, "send_head must be [T, W] int32")
            if topk_weights is not None:
                check_tensor("topk_weights", topk_weights, (x.shape[0], top_k), torch.float32)
            # Rank s's rows are its block; channel c runs from recv_channel_prefix[s, c] to the next offset.
            end = rank_prefix[:, me].long()
            start = torch.cat([end.new_zeros(1), end[:-1]])
            position, channel, slot = (torch.cat(parts) for parts in zip(
                *(self._channel_rows(recv_channel_prefix[s].long(), int(start[s]), int(end[s])) for s in range(world)), strict=True
            ))
        fields = [x[position], channel.int().unsqueeze(1), slot.int().unsqueeze(1)]
        widths = [(x.shape[1], x.dtype), (1, torch.int32), (1, torch.int32)]
        if topk_weights is not None:
            fields.append(topk_weights[position])
            widths.append((top_k, torch.float32))
        row_format = RowFormat(tuple(widths))
        got, from_each = exchange(self.group, pack(row_format, fields), (end - start).tolist())

        # Source side: token t's row from rank r is slot send_head[t, r] of its channel's stream from r.
        views = row_format.views(got)
        num_tokens = send_head.shape[0]
        token_channel = _channel_of_tokens(num_tokens, num_channels)
        out = torch.zeros(num_tokens, x.shape[1])
        weights = torch.zeros(num_tokens, top_k)
        with checks(self.group):  # on a GPU: a receiver waiting forever, or reading the wrong slot
            first = 0
            for r, count in enumerate(from_each):
                got_channel, got_slot = views[1][first : first + count, 0].long(), views[2][first : first + count, 0].long()
                lookup = torch.full((num_channels * (num_tokens + 1),), -1, dtype=torch.int64)
                require(bool((got_slot <= num_tokens).all()), f"rank {r} sent a row past its channel queue")
                lookup[got_channel * (num_tokens + 1) + got_slot] = torch.arange(first, first + count)
                wanted = send_head[:, r].long()
                row = lookup[token_channel * (num_tokens + 1) + wanted.clamp(0, num_tokens)]
                tokens = (wanted >= 0).nonzero().squeeze(1)
                require(bool((row[tokens] >= 0).all()), f"a token waits for a row rank {r} never sent (send_head is stale)")
                out.index_add_(0, tokens, views[0][row[tokens]].float())
                if topk_weights is not None:
                    weights.index_add_(0, tokens, views[3][row[tokens]])
                first += count
        return out.to(x.dtype), weights if topk_weights is not None else None, EventOverlap()

    @staticmethod
    def _channel_rows(offsets: Tensor, start: int, end: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(position, channel, slot in channel)`` of the rows ``[start, end)`` a source rank sent here,
        its channels starting at ``offsets [channels]``."""
        bounds = torch.cat([offsets, offsets.new_full((1,), end)])
        require(
            bool(bounds[0] == start) and bool((bounds[1:] >= bounds[:-1]).all()),
            f"channel offsets {offsets.tolist()} fall outside the rows {start}..{end} of their rank",
        )
        lengths = bounds[1:] - bounds[:-1]
        channel = torch.repeat_interleave(torch.arange(offsets.numel()), lengths)
        slot = torch.arange(channel.numel()) - (lengths.cumsum(0) - lengths)[channel]
        return torch.arange(start, end), channel, slot
