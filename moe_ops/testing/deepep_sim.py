"""A CPU simulator of the parts of DeepEP's V1 ``deep_ep.Buffer`` API that moe_ops' DeepEP backends
call, for tests: real exchanges between the ranks of a gloo group, real outputs in DeepEP's documented
layouts. ``install()`` puts this module in ``sys.modules["deep_ep"]`` (so ``import deep_ep`` finds it)
and declares CPU a device it simulates; nothing in moe_ops installs it.

Modelled, from DeepEP's docstrings, its tests' layout checks and its kernels' host-side asserts:

* the buffer: one collective construction per group (every rank must pass the same sizes), the
  documented group sizes, size hints that grow with the hidden size, and a size check on every call;
  the low-latency rule ``num_qps_per_rank == local experts`` and that low-latency kernels need
  ``clean_low_latency_buffer`` after normal-mode kernels used the buffer;
* normal mode, intranode (W = 2, 4, 8): ``get_dispatch_layout``; ``dispatch`` delivering each token
  once per receiving rank, in (source rank, source token) order, with top-k ids made local (-1 for
  experts elsewhere, weight 0 there), the per-expert counts as a Python list, and the six-tensor
  handle (rank and channel prefix matrices, ``recv_src_idx``, ``is_token_in_rank``, ``send_head``);
  ``num_worst_tokens`` (receive buffers of that many rows, id -1 and NaN garbage past the count);
  cached-handle ``dispatch``; ``combine`` summing each token's rows over the ranks it went to (float32,
  and ``topk_weights`` likewise). Tokens move per channel (``num_sms / 2`` contiguous token ranges):
  combine finds a rank's rows by the receive-side channel offsets and a token's row by ``send_head``,
  so a handle whose tensors are swapped or stale produces an error or wrong sums, as on a GPU;
* low-latency mode: ``low_latency_dispatch`` (BF16) returning ``[L, W * Tmax, H]`` with ``recv_count``,
  source-rank blocks described by ``layout_range`` (start ``<< 32`` | length) and ``src_info``, blocks
  and rows in a shuffled order (DeepEP's come in atomic arrival order); the received tensor reuses one
  of two buffers, which the next-but-one low-latency kernel overwrites (with NaN first);
  ``low_latency_combine`` reducing on the source rank with the given weights (float32).

Not modelled: kernel timing and overlap, SM use (``num_sms`` only shapes the channel matrices),
NVSHMEM, RDMA and CUDA IPC, internode normal mode (W > 8), FP8 / UE8M0 / LogFMT, ``expert_alignment``
other than 1, async events, receive hooks (hook-based overlap), zero-copy combine, and DeepEP's exact
size formulas (the hints here are a simple model with the same inputs).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops.packing import RowFormat
from moe_ops.testing.problems import Problem

SIMULATED_DEVICE_TYPES = frozenset({"cpu"})
_LOW_LATENCY_HIDDEN = (2048, 2560, 4096, 5120, 6144, 7168, 8192)
_LOW_LATENCY_MAX_TOP_K = 11
_INTRANODE_RANKS = (2, 4, 8)
_CONFIG_RANKS = (2, 4, 8, 16, 24, 32, 64, 128, 144, 160)  # where get_*_config has a recommendation
_ALIGNMENT = 128  # bytes: buffer sizes are multiples of this
_TOKEN_META_BYTES = 2048  # per queued token: source index, up to 128 top-k ids and weights, scales
_BLOCK_BITS = 32
_created: list[tuple[int, int, bool]] = []  # (nvl bytes, rdma bytes, low-latency) of each Buffer made


class SimulatedDeepEPError(RuntimeError):
    """A call DeepEP would reject (a host-side assert) or mishandle (a kernel reading the wrong rows)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SimulatedDeepEPError(f"deep_ep (simulated): {message}")


@contextlib.contextmanager
def _checks(group: Any) -> Iterator[None]:
    """Host-side checks before a call's first collective: a failure on any rank raises on every rank
    (on a GPU, DeepEP would assert on one rank and leave the others waiting; a test should fail fast)."""
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    if not bool(_gather(group, torch.tensor([int(error is not None)])).any()):
        return
    messages: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
    raise SimulatedDeepEPError("; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)) from error


def install() -> None:
    """Make ``import deep_ep`` return this simulator (in this process)."""
    sys.modules["deep_ep"] = sys.modules[__name__]


def uninstall() -> None:
    if sys.modules.get("deep_ep") is sys.modules[__name__]:
        del sys.modules["deep_ep"]


def install_on_rank(rank: int) -> None:
    """:class:`moe_ops.testing.harness.World` task: install the simulator in that worker."""
    install()


def buffers_made_on_new_group(rank: int, calls: list[tuple[Problem, str]]) -> tuple[int, int, list[tuple[int, int, bool]]]:
    """World task: on a new group of every rank, trace the conformance pipeline of each ``(problem,
    backend)`` with fake tensors, then run it. Returns the buffers the group had before (0: none is made
    at import), the buffers made while tracing (0: fake kernels make none), and ``(nvl bytes, rdma
    bytes, low-latency)`` of each ``Buffer`` the runs made."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from moe_ops.backends.deepep import runtime
    from moe_ops.testing import conformance

    group = dist.new_group(list(range(dist.get_world_size())))
    before, existing = len(_created), int((group.group_name, group) in runtime._buffers)
    for problem, backend in calls:
        step = conformance.pipeline(problem, rank, group=group.group_name, backend=backend)
        make_fx(step, tracing_mode="symbolic", _allow_non_fake_inputs=True)(problem.xs[rank], problem.topk_idx[rank], problem.topk_weights[rank])
    traced = len(_created) - before
    for problem, backend in calls:
        conformance.run_rank(problem, rank, group=group.group_name, backend=backend)
    return existing, traced, _created[before:]


def _align(num_bytes: int) -> int:
    return -(-num_bytes // _ALIGNMENT) * _ALIGNMENT


class EventOverlap:
    """The slot of DeepEP's event wrapper in the returned tuples: every simulated call is synchronous and
    the backend never waits on it."""


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
        _require(num_sms >= 0 and 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens, "bad Config")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """NVLink buffer bytes for tokens of ``hidden_bytes``: per channel and rank, a queue of tokens."""
        queues = self.num_sms // 2 * min(num_ranks, 8)
        return _align(queues * (self.num_max_nvl_chunked_recv_tokens * (hidden_bytes + _TOKEN_META_BYTES) + 16))

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0 within a node (the only case simulated)."""
        _require(num_ranks <= 8, "internode normal mode is not simulated")
        return 0


# --- exchange helpers -----------------------------------------------------------------------------


def _exchange(group: Any, rows: Tensor, counts: list[int]) -> tuple[Tensor, list[int]]:
    """All-to-all of ``rows [S, B]`` (uint8; the first ``counts[0]`` to rank 0, and so on); returns the
    rows received, grouped by source rank in rank order, and how many came from each."""
    sent = torch.tensor(counts, dtype=torch.int64)
    received_counts = torch.empty_like(sent)
    dist.all_to_all_single(received_counts, sent, group=group)
    got = received_counts.tolist()
    out = rows.new_empty(sum(got), rows.shape[1])
    dist.all_to_all_single(out, rows.contiguous(), got, counts, group=group)
    return out, got


def _pack(row_format: RowFormat, fields: list[Tensor]) -> Tensor:
    """Rows of ``row_format`` holding ``fields`` (each ``[n, width]``)."""
    rows = row_format.empty(fields[0].shape[0], fields[0].device)
    for view, field in zip(row_format.views(rows), fields, strict=True):
        view.copy_(field)
    return rows


def _gather(group: Any, values: Tensor) -> Tensor:
    """``[W, n]``: every rank's int64 ``values [n]``."""
    out = values.new_empty(dist.get_world_size(group), values.numel())
    dist.all_gather(list(out.unbind(0)), values.contiguous(), group=group)
    return out


def _channel_of_tokens(num_tokens: int, num_channels: int) -> Tensor:
    """``[T]``: the channel carrying each token (contiguous ranges of ``ceil(T / channels)`` tokens)."""
    per_channel = max(1, -(-num_tokens // num_channels))
    return torch.arange(num_tokens) // per_channel


def _per_channel_counts(in_rank: Tensor, num_channels: int) -> Tensor:
    """``[W, channels]`` int64: tokens each channel sends to each rank."""
    counts = torch.zeros(in_rank.shape[1], num_channels, dtype=torch.int64)
    counts.index_add_(1, _channel_of_tokens(in_rank.shape[0], num_channels), in_rank.T.long())
    return counts


def _check_tensor(name: str, t: Any, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    _require(isinstance(t, Tensor), f"{name} must be a tensor")
    _require(tuple(t.shape) == tuple(shape), f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    _require(t.dtype == dtype and t.is_contiguous(), f"{name} must be contiguous {dtype}, got {t.dtype}")


class Buffer:
    """``deep_ep.Buffer`` (V1), simulated over the gloo ``group``."""

    num_sms: int = 20

    def __init__(
        self,
        group: Any,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
    ) -> None:
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode, self.num_qps_per_rank = low_latency_mode, num_qps_per_rank
        world = self.group_size
        with _checks(group):
            _require(world < 8 or world % 8 == 0, f"a group of {world} ranks")
            _require(num_nvl_bytes % _ALIGNMENT == 0 and num_rdma_bytes % _ALIGNMENT == 0, "unaligned buffer size")
            _require(num_rdma_bytes == 0 or world > 8 or low_latency_mode, "RDMA bytes within a node need low-latency mode")
        sizes: list[Any] = [None] * world  # construction is collective: every rank must agree
        dist.all_gather_object(sizes, (num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank), group=group)
        _require(len(set(sizes)) == 1, f"ranks created buffers of different sizes: {sizes}")
        self._dirty = False  # normal-mode kernels ran since the low-latency buffer was cleaned
        self._low_latency_outputs: list[Tensor | None] = [None, None]
        self._low_latency_calls = 0
        _created.append((num_nvl_bytes, num_rdma_bytes, low_latency_mode))

    # --- static API -------------------------------------------------------------------------------

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        _require(new_num_sms % 2 == 0, "the SM count must be even")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        assert num_ranks in _CONFIG_RANKS, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        assert num_ranks in _CONFIG_RANKS, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, 4, 256, 6, 128)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
        """Two send and two receive buffers of one BF16 message per (expert, token), plus signals."""
        message = hidden * 2 + 16
        send = num_max_dispatch_tokens_per_rank * message
        receive = num_experts * num_max_dispatch_tokens_per_rank * message
        return _align(2 * (send + receive) + 2 * _align(num_experts * 8))

    # --- normal mode ------------------------------------------------------------------------------

    def _normal_call(self, x: Tensor, config: Config | None, combine: bool) -> Config:
        """Checks of every normal-mode kernel; returns the config it runs with."""
        world = self.group_size
        _require(world in _INTRANODE_RANKS, f"normal-mode kernels run on 2, 4 or 8 ranks within a node, not {world}")
        config = config or (self.get_combine_config(world) if combine else self.get_dispatch_config(world))
        _require(config.num_sms % 2 == 0, "the SM count must be even")
        _require(x.dim() == 2 and x.is_contiguous() and x.dtype == torch.bfloat16, "x must be a contiguous [N, H] bf16 tensor")
        hidden_bytes = x.shape[1] * x.element_size()
        _require(hidden_bytes % 16 == 0, f"hidden size {x.shape[1]} is not a whole number of 16-byte chunks")
        needed = config.get_nvl_buffer_size_hint(hidden_bytes, world)
        _require(self.num_nvl_bytes >= needed, f"NVLink buffer of {self.num_nvl_bytes} bytes, this call needs {needed}")
        self._dirty = self.low_latency_mode
        return config

    def get_dispatch_layout(
        self, topk_idx: Tensor, num_experts: int, previous_event: Any = None, async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[Tensor, None, Tensor, Tensor, EventOverlap]:
        """``(tokens per rank [W] int32, None, tokens per expert [E] int32, is_token_in_rank [T, W] bool, event)``."""
        _require(topk_idx.dim() == 2 and topk_idx.is_contiguous() and topk_idx.dtype == torch.int64, "topk_idx must be [T, K] int64")
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
        (cached mode) only ``recv_x``."""
        if handle is not None:
            return self._cached_dispatch(x, handle, config, topk_idx is None and topk_weights is None), None, None, None, None, EventOverlap()
        world, me = self.group_size, self.rank
        with _checks(self.group):
            config = self._normal_call(x, config, combine=False)
            _require(expert_alignment == 1, "expert_alignment other than 1 is not simulated")
            _require(topk_idx is not None and topk_weights is not None, "dispatch without top-k is not simulated")
            _require(all(t is not None for t in (num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)), "dispatch needs the layout")
            num_tokens, top_k = topk_idx.shape
            num_experts = num_tokens_per_expert.numel()
            num_local, num_channels = num_experts // world, config.num_sms // 2
            _check_tensor("is_token_in_rank", is_token_in_rank, (num_tokens, world), torch.bool)
            _check_tensor("num_tokens_per_rank", num_tokens_per_rank, (world,), torch.int32)
            _check_tensor("num_tokens_per_expert", num_tokens_per_expert, (num_experts,), torch.int32)
            _check_tensor("topk_weights", topk_weights, (num_tokens, top_k), torch.float32)
            _require(num_experts % world == 0 and x.shape[0] == num_tokens, "inconsistent dispatch arguments")
            _require(torch.equal(num_tokens_per_rank, is_token_in_rank.sum(0).int()), "num_tokens_per_rank disagrees with is_token_in_rank")

        per_channel = _per_channel_counts(is_token_in_rank, num_channels)  # [W, channels] sent from here
        meta = _gather(self.group, torch.cat([num_tokens_per_rank.long(), num_tokens_per_expert.long(), per_channel.flatten()]))
        counts = meta[:, :world]  # [source, destination]
        rank_prefix = counts.cumsum(0)
        received_per_expert = meta[:, world : world + num_experts].sum(0)[me * num_local : (me + 1) * num_local]
        from_sources = meta[:, world + num_experts :].view(world, world, num_channels)[:, me]  # [source, channel]
        block_start = rank_prefix[:, me] - counts[:, me]
        recv_channel_prefix = block_start.unsqueeze(1) + from_sources.cumsum(1) - from_sources

        # One row per (token, destination), in token order: the token, its index, its ids made local there.
        row_format = RowFormat(((x.shape[1], x.dtype), (1, torch.int32), (top_k, torch.int64), (top_k, torch.float32)))
        rank, token = is_token_in_rank.T.nonzero(as_tuple=True)  # grouped by destination, in token order
        local = topk_idx[token] - (rank * num_local).unsqueeze(1)
        mine = (topk_idx[token] >= 0) & (local >= 0) & (local < num_local)
        rows = _pack(row_format, [x[token], token.int().unsqueeze(1), torch.where(mine, local, -1), torch.where(mine, topk_weights[token], 0)])
        got, _ = _exchange(self.group, rows, counts[me].tolist())
        received = int(rank_prefix[-1, me])
        num_rows = num_worst_tokens if num_worst_tokens > 0 else received
        with _checks(self.group):  # on a GPU: writes past the receive buffers
            _require(num_rows >= received, f"num_worst_tokens={num_worst_tokens} but {received} tokens arrived")
        garbage = (float("nan"), 2**31 - 1, -1, float("nan"))  # past the count: DeepEP writes only the ids (-1)
        recv_x, recv_src, recv_ids, recv_weights = (
            torch.cat([field, field.new_full((num_rows - received, *field.shape[1:]), fill)])
            for field, fill in zip(row_format.views(got), garbage, strict=True)
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
        return recv_x, recv_ids, recv_weights, counts_list, handle, EventOverlap()

    def _cached_dispatch(self, x: Tensor, handle: tuple[Tensor, ...], config: Config | None, no_top_k: bool) -> Tensor:
        """Dispatch ``x`` as the dispatch that made ``handle`` did (rank prefix, send-side channel
        prefix, receive count and ``is_token_in_rank`` are what DeepEP reads)."""
        world, me = self.group_size, self.rank
        with _checks(self.group):
            config = self._normal_call(x, config, combine=False)
            _require(no_top_k, "cached dispatch takes no top-k")
            rank_prefix, channel_prefix, _, recv_src_idx, in_rank, _ = handle
            num_channels = config.num_sms // 2
            _check_tensor("rank_prefix_matrix", rank_prefix, (world, world), torch.int32)
            _check_tensor("channel_prefix_matrix", channel_prefix, (world, num_channels), torch.int32)
            _check_tensor("is_token_in_rank", in_rank, (x.shape[0], world), torch.bool)
            _require(recv_src_idx.dim() == 1 and recv_src_idx.dtype == torch.int32, "recv_src_idx must be 1-D int32")
            per_channel = _per_channel_counts(in_rank, num_channels)
            _require(torch.equal(channel_prefix.long(), per_channel.cumsum(1)), "channel_prefix_matrix does not describe is_token_in_rank")
        token = in_rank.T.nonzero(as_tuple=True)[1]
        got, from_each = _exchange(self.group, x[token].view(torch.uint8), in_rank.sum(0).tolist())
        column = rank_prefix[:, me].long()
        with _checks(self.group):
            _require(from_each == (column - torch.cat([column.new_zeros(1), column[:-1]])).tolist(), "rank_prefix_matrix does not match what arrived")
            _require(recv_src_idx.shape[0] >= got.shape[0], "fewer receive rows than tokens arrived")
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
        with _checks(self.group):
            config = self._normal_call(x, config, combine=True)
            _require(bias is None, "bias is not simulated")
            rank_prefix, _, recv_channel_prefix, src_idx, _, send_head = handle  # the receive-side channel prefix
            num_channels = config.num_sms // 2
            _check_tensor("rank_prefix_matrix", rank_prefix, (world, world), torch.int32)
            _check_tensor("channel_prefix_matrix", recv_channel_prefix, (world, num_channels), torch.int32)
            _check_tensor("src_idx", src_idx, (x.shape[0],), torch.int32)
            _require(send_head.dim() == 2 and send_head.shape[1] == world and send_head.dtype == torch.int32, "send_head must be [T, W] int32")
            if topk_weights is not None:
                _check_tensor("topk_weights", topk_weights, (x.shape[0], top_k), torch.float32)
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
        got, from_each = _exchange(self.group, _pack(row_format, fields), (end - start).tolist())

        # Source side: token t's row from rank r is slot send_head[t, r] of its channel's stream from r.
        views = row_format.views(got)
        num_tokens = send_head.shape[0]
        token_channel = _channel_of_tokens(num_tokens, num_channels)
        out = torch.zeros(num_tokens, x.shape[1])
        weights = torch.zeros(num_tokens, top_k)
        with _checks(self.group):  # on a GPU: a receiver waiting forever, or reading the wrong slot
            first = 0
            for r, count in enumerate(from_each):
                got_channel, got_slot = views[1][first : first + count, 0].long(), views[2][first : first + count, 0].long()
                lookup = torch.full((num_channels * (num_tokens + 1),), -1, dtype=torch.int64)
                _require(bool((got_slot <= num_tokens).all()), f"rank {r} sent a row past its channel queue")
                lookup[got_channel * (num_tokens + 1) + got_slot] = torch.arange(first, first + count)
                wanted = send_head[:, r].long()
                row = lookup[token_channel * (num_tokens + 1) + wanted.clamp(0, num_tokens)]
                tokens = (wanted >= 0).nonzero().squeeze(1)
                _require(bool((row[tokens] >= 0).all()), f"a token waits for a row rank {r} never sent (send_head is stale)")
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
        _require(
            bool(bounds[0] == start) and bool((bounds[1:] >= bounds[:-1]).all()),
            f"channel offsets {offsets.tolist()} fall outside the rows {start}..{end} of their rank",
        )
        lengths = bounds[1:] - bounds[:-1]
        channel = torch.repeat_interleave(torch.arange(offsets.numel()), lengths)
        slot = torch.arange(channel.numel()) - (lengths.cumsum(0) - lengths)[channel]
        return torch.arange(start, end), channel, slot

    # --- low-latency mode -------------------------------------------------------------------------

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        _require(self.low_latency_mode, "clean_low_latency_buffer on a buffer not in low-latency mode")
        self._dirty = False

    def _low_latency_checks(self, max_tokens: int, hidden: int, num_experts: int) -> None:
        """Host-side checks of every low-latency kernel."""
        world = self.group_size
        _require(self.low_latency_mode, "low-latency kernels need low_latency_mode=True")
        _require(not self._dirty, "low-latency kernel after normal-mode kernels without clean_low_latency_buffer")
        _require(num_experts % world == 0, "num_experts must be a multiple of the group size")
        _require(self.num_qps_per_rank == num_experts // world, "num_qps_per_rank must equal the local expert count")
        _require(hidden in _LOW_LATENCY_HIDDEN, f"hidden size {hidden} is not one the kernels are built for")
        needed = self.get_low_latency_rdma_size_hint(max_tokens, hidden, world, num_experts)
        _require(self.num_rdma_bytes >= needed, f"RDMA buffer of {self.num_rdma_bytes} bytes, this call needs {needed}")

    def _next_low_latency_buffer(self, max_tokens: int, hidden: int, num_experts: int) -> int:
        """Which of the two buffers this kernel uses (every rank must pass the same sizes); the tensor
        the kernel before the last one returned from it is overwritten (with NaN)."""
        agreed = _gather(self.group, torch.tensor([max_tokens, hidden, num_experts]))
        _require(bool((agreed == agreed[0]).all()), f"ranks disagree on (Tmax, hidden, experts): {agreed.tolist()}")
        which = self._low_latency_calls % 2
        self._low_latency_calls += 1
        reused = self._low_latency_outputs[which]
        if reused is not None:
            reused.fill_(float("nan"))
        return which

    def low_latency_dispatch(
        self, x: Tensor, topk_idx: Tensor, num_max_dispatch_tokens_per_rank: int, num_experts: int,
        cumulative_local_expert_recv_stats: Tensor | None = None, dispatch_wait_recv_cost_stats: Tensor | None = None,
        use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[Tensor, Tensor, tuple[Any, ...], EventOverlap, None]:
        """``(recv_x [L, W*Tmax, H], recv_count [L] int32, handle, event, hook)``; handle is
        ``(src_info [L, W*Tmax] int32, layout_range [L, W] int64, Tmax, H, E)``."""
        max_tokens, world, me = num_max_dispatch_tokens_per_rank, self.group_size, self.rank
        num_local, hidden = num_experts // world, x.shape[1]
        with _checks(self.group):
            _require(not (use_fp8 or return_recv_hook), "only BF16 without receive hooks is simulated")
            _require(x.dim() == 2 and x.is_contiguous() and x.dtype == torch.bfloat16, "x must be a contiguous [T, H] bf16 tensor")
            _check_tensor("topk_idx", topk_idx, (x.shape[0], topk_idx.shape[1]), torch.int64)
            _require(topk_idx.shape[1] <= _LOW_LATENCY_MAX_TOP_K, f"top-k {topk_idx.shape[1]} > {_LOW_LATENCY_MAX_TOP_K}")
            _require(x.shape[0] <= max_tokens, f"{x.shape[0]} tokens > num_max_dispatch_tokens_per_rank={max_tokens}")
            self._low_latency_checks(max_tokens, hidden, num_experts)
        which = self._next_low_latency_buffer(max_tokens, hidden, num_experts)

        # One row per route, grouped by destination rank: the token, its expert there, its index.
        token, k = (topk_idx >= 0).nonzero(as_tuple=True)
        expert = topk_idx[token, k]
        order = torch.argsort(expert // num_local, stable=True)
        token, expert = token[order], expert[order]
        row_format = RowFormat(((hidden, x.dtype), (1, torch.int32), (1, torch.int32)))
        rows = _pack(row_format, [x[token], (expert % num_local).int().unsqueeze(1), token.int().unsqueeze(1)])
        got, from_each = _exchange(self.group, rows, torch.bincount(expert // num_local, minlength=world).tolist())
        got_x, got_expert, got_token = row_format.views(got)
        source = torch.repeat_interleave(torch.arange(world), torch.tensor(from_each, dtype=torch.int64))

        shape = (num_local, world * max_tokens, hidden)
        recv_x = self._low_latency_outputs[which]
        if recv_x is None or recv_x.shape != shape:
            recv_x = self._low_latency_outputs[which] = x.new_full(shape, float("nan"))
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
                src_info[e, begin : begin + count] = got_token[rows_here, 0]
                layout_range[e, j] = (begin << _BLOCK_BITS) | count
                begin += count
            recv_count[e] = begin
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats += recv_count
        return recv_x, recv_count, (src_info, layout_range, max_tokens, hidden, num_experts), EventOverlap(), None

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
        with _checks(self.group):
            _require(not (use_logfmt or zero_copy or return_recv_hook or out is not None), "only the plain combine is simulated")
            _check_tensor("x", x, (num_local, world * max_tokens, hidden), torch.bfloat16)
            _check_tensor("src_info", src_info, (num_local, world * max_tokens), torch.int32)
            _check_tensor("layout_range", layout_range, (num_local, world), torch.int64)
            _check_tensor("topk_idx", topk_idx, (num_tokens, top_k), torch.int64)
            _check_tensor("topk_weights", topk_weights, (num_tokens, top_k), torch.float32)
            self._low_latency_checks(max_tokens, hidden, num_experts)
            # Expert side: each block's rows go back to their source rank, tagged (global expert, token).
            keys: list[list[Tensor]] = [[] for _ in range(world)]
            rows: list[list[Tensor]] = [[] for _ in range(world)]
            for e in range(num_local):
                for j in range(world):
                    begin, count = int(layout_range[e, j]) >> _BLOCK_BITS, int(layout_range[e, j]) & ((1 << _BLOCK_BITS) - 1)
                    _require(begin + count <= world * max_tokens, f"layout_range[{e}, {j}] points past the buffer")
                    tokens = src_info[e, begin : begin + count].long()
                    keys[j].append(torch.stack([torch.full_like(tokens, me * num_local + e), tokens], dim=1))
                    rows[j].append(x[e, begin : begin + count])
        self._next_low_latency_buffer(max_tokens, hidden, num_experts)
        row_format = RowFormat(((hidden, x.dtype), (2, torch.int64)))
        send = _pack(row_format, [torch.cat([torch.cat(r) for r in rows]), torch.cat([torch.cat(k) for k in keys])])
        got, _ = _exchange(self.group, send, [sum(r.shape[0] for r in per_rank) for per_rank in rows])
        got_x, got_key = row_format.views(got)

        # Source side: slot (expert, token) holds the last row written there; sum with the weights.
        valid = topk_idx >= 0
        with _checks(self.group):  # on a GPU: a receiver waiting forever, or reading the wrong slot
            _require(bool((got_key[:, 1] < max_tokens).all()), "a row names a token past num_max_dispatch_tokens_per_rank")
            slot = torch.full((num_experts * max_tokens,), -1, dtype=torch.int64)
            slot.scatter_reduce_(0, got_key[:, 0] * max_tokens + got_key[:, 1], torch.arange(got.shape[0]), "amax")
            row = slot[torch.where(valid, topk_idx * max_tokens + torch.arange(num_tokens).unsqueeze(1), 0)]
            _require(bool((row[valid] >= 0).all()), "a token's expert sent no row for it")
        picked = torch.zeros(num_tokens, top_k, hidden)
        picked[valid] = got_x[row[valid]].float()
        return (picked * topk_weights.unsqueeze(-1)).sum(dim=1).to(x.dtype), EventOverlap(), None
