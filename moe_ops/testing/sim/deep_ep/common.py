"""What the parts of the DeepEP simulator share: its error, the checks every rank agrees on, the state of
one simulated process, and the exchanges over the gloo group that stand in for DeepEP's NVLink and RDMA
traffic."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops.packing import RowFormat, round_up

ALIGNMENT = 128  # bytes: buffer sizes are multiples of this (NUM_BUFFER_ALIGNMENT_BYTES, csrc/kernels/configs.cuh)


@dataclasses.dataclass
class Process:
    """One simulated process: whether NVSHMEM was initialised in it (once per process), and what happened to
    its buffers, in order (``"made normal"``, ``"made low-latency"``, ``"made normal+low-latency"``,
    ``"destroyed ..."``)."""

    nvshmem: bool = False
    log: list[str] = dataclasses.field(default_factory=list)


def align(num_bytes: int) -> int:
    return round_up(num_bytes, ALIGNMENT)


class SimulatedDeepEPError(RuntimeError):
    """A call DeepEP would reject (a host-side assert) or mishandle (a kernel reading the wrong rows)."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise SimulatedDeepEPError(f"deep_ep (simulated): {message}")


@contextlib.contextmanager
def checks(group: Any) -> Iterator[None]:
    """Host-side checks before a call's first collective: a failure on any rank raises on every rank
    (on a GPU, DeepEP would assert on one rank and leave the others waiting; a test should fail fast)."""
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    if not bool(gather(group, torch.tensor([int(error is not None)])).any()):
        return
    messages: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
    raise SimulatedDeepEPError("; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)) from error


class EventOverlap:
    """The slot of DeepEP's event wrapper in the returned tuples: every simulated call is synchronous and
    the backend never waits on it."""


def exchange(group: Any, rows: Tensor, counts: list[int]) -> tuple[Tensor, list[int]]:
    """All-to-all of ``rows [S, B]`` (uint8; the first ``counts[0]`` to rank 0, and so on); returns the
    rows received, grouped by source rank in rank order, and how many came from each."""
    sent = torch.tensor(counts, dtype=torch.int64)
    received_counts = torch.empty_like(sent)
    dist.all_to_all_single(received_counts, sent, group=group)
    got = received_counts.tolist()
    out = rows.new_empty(sum(got), rows.shape[1])
    dist.all_to_all_single(out, rows.contiguous(), got, counts, group=group)
    return out, got


def pack(row_format: RowFormat, fields: list[Tensor]) -> Tensor:
    """Rows of ``row_format`` holding ``fields`` (each ``[n, width]``)."""
    rows = row_format.empty(fields[0].shape[0], fields[0].device)
    for view, field in zip(row_format.views(rows), fields, strict=True):
        view.copy_(field)
    return rows


def gather(group: Any, values: Tensor) -> Tensor:
    """``[W, n]``: every rank's int64 ``values [n]``."""
    out = values.new_empty(dist.get_world_size(group), values.numel())
    dist.all_gather(list(out.unbind(0)), values.contiguous(), group=group)
    return out


def check_tensor(name: str, t: Any, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    require(isinstance(t, Tensor), f"{name} must be a tensor")
    require(tuple(t.shape) == tuple(shape), f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    require(t.dtype == dtype and t.is_contiguous(), f"{name} must be contiguous {dtype}, got {t.dtype}")
