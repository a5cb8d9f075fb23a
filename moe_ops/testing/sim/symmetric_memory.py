"""A CPU simulator of ``torch.distributed._symmetric_memory`` (the parts the ``symm`` backend calls), for
tests: ``empty`` makes a buffer in a shared-memory file, and ``rendezvous`` maps every peer's file, so
the backend's put kernel (run under ``TRITON_INTERPRET=1``, which dereferences raw addresses) stores
into the other processes' buffers as it stores into the peers' memory on a GPU. The handle's barrier is
a gloo barrier; CPU kernels finish before they return, so the ordering it gives is the one the CUDA
barrier gives on a GPU.

Installed in a test worker by ``moe_ops.testing.sim.install("symmetric_memory")``. Not modelled: NVLink
timing, concurrent writers racing within a transfer (the interpreter runs one program at a time), the
signal pads.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group

SIMULATED_DEVICE_TYPES = frozenset({"cpu"})
made: list[int] = []  #: sizes of the buffers this process made, in order (tests read it)
_files: dict[int, str] = {}  # data_ptr of a buffer made by empty() -> its file


def _directory() -> str:
    return os.environ.get("MOE_OPS_SHM_DIR", "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())


def empty(nbytes: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``[nbytes]`` buffer in a shared-memory file (``torch.distributed._symmetric_memory.empty``)."""
    assert dtype == torch.uint8 and torch.device(device).type == "cpu", "the simulator makes CPU uint8 buffers"
    name = os.path.join(_directory(), f"moe_ops_peer_{uuid.uuid4().hex}")
    local = torch.from_file(name, shared=True, size=nbytes, dtype=torch.uint8)
    _files[local.data_ptr()] = name
    made.append(nbytes)
    return local


@dataclass(frozen=True)
class Handle:
    """What ``rendezvous`` returns: every rank's buffer mapped here, and the group's barrier."""

    buffer_ptrs: list[int]
    group: dist.ProcessGroup
    mapped: list[Tensor]  # keeps the mappings alive

    def barrier(self, channel: int = 0, timeout_ms: int = 0) -> None:
        """The group's barrier, failing after ``timeout_ms`` (``RuntimeError``; on a GPU the barrier kernel
        traps, which fails the next CUDA call)."""
        work = dist.barrier(group=self.group, async_op=True)
        if timeout_ms:
            work.wait(timeout=datetime.timedelta(milliseconds=timeout_ms))
        else:
            work.wait()


def rendezvous(local: Tensor, group_name: str) -> Handle:
    """Map every peer's buffer (collective over the group named ``group_name``)."""
    group = _resolve_process_group(group_name)
    name = _files.pop(local.data_ptr())
    names: list[str | None] = [None] * group.size()
    dist.all_gather_object(names, name, group=group)
    mapped = [local if peer == name else torch.from_file(peer, shared=True, size=local.numel(), dtype=torch.uint8) for peer in names]
    dist.barrier(group=group)  # every rank has mapped every file: the names can go
    os.unlink(name)
    return Handle([t.data_ptr() for t in mapped], group, mapped)


def buffers_made(rank: int) -> list[int]:
    """World task: the sizes of the peer buffers this worker made so far."""
    return list(made)
