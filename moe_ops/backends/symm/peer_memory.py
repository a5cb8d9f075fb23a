"""One buffer per group that every rank of the group can store into: the transport of the ``symm``
backend.

On CUDA the buffer is ``torch.distributed._symmetric_memory`` memory (``empty`` + ``rendezvous``): each
rank maps its peers' buffers over NVLink, so a kernel on one rank writes straight into another rank's
buffer, and the handle's ``barrier`` (a kernel signalling through the signal pads, with a timeout)
orders those writes with the readers. NVLink multicast is never used: the buffer is made with
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` unless the caller set that variable otherwise.

A buffer is made on the first call that needs it and replaced by a larger one when a later call needs
more. Making one is a collective call of the group; every rank makes the same decision at the same
call, because the sizes come from values the ranks agreed on (shapes and the handshake's counts).
Inside a CUDA-graph capture no buffer can be made: capture after one eager call of the same shapes.

The library is ``torch.distributed._symmetric_memory``, found through :mod:`moe_ops.libraries`, where
tests put a simulator in its place (:mod:`moe_ops.testing.sim.symmetric_memory`: shared memory between
the processes of a gloo group, for CPU tensors).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_ops import config, libraries
from moe_ops.comm import Comm, library_call
from moe_ops.errors import MoEInputError

MIN_BYTES = 1 << 20  # the first buffer of a group (even for a call with no tokens)


@dataclass(frozen=True)
class PeerBuffer:
    """This rank's view of a group's buffer."""

    local: Tensor  #: uint8 [nbytes]: this rank's buffer
    peers: Tensor  #: int64 [W] on the buffer's device: address of every rank's buffer, as mapped here
    barrier: Callable[[], None]  #: returns on the host at once; orders the stream after every rank's earlier writes
    owner: object = None  #: what keeps the mappings valid (the symmetric-memory handle, the simulator's files)

    @property
    def nbytes(self) -> int:
        return self.local.numel()


# by (group name, group, device type): a group made later under a destroyed group's name gets its own
_buffers: dict[tuple[str, object, str], PeerBuffer] = {}


def device_types() -> frozenset[str]:
    return frozenset({"cuda"}) | libraries.simulated_device_types("symmetric_memory")


def get(comm: Comm, nbytes: int, device: torch.device) -> PeerBuffer:
    """The group's buffer, at least ``nbytes`` long (made or enlarged here: collective)."""
    key = (comm.group_name, comm.group, device.type)
    held = _buffers.get(key)
    if held is not None and held.nbytes >= nbytes:
        return held
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise MoEInputError(
            "the symm backend needs a larger peer buffer, which cannot be made inside a CUDA-graph capture; "
            "run the step once eagerly with the same shapes before capturing"
        )
    size = max(nbytes, 2 * held.nbytes if held is not None else MIN_BYTES)  # geometric growth: few re-allocations
    _buffers[key] = held = library_call("symmetric memory rendezvous", comm, _make, comm, size, device)
    return held


def release(group_name: str | None = None) -> None:
    """Forget the buffers of ``group_name`` (all groups: ``None``); their memory goes when unused. Call it
    before destroying a group to free its buffer at once."""
    for key in [k for k in _buffers if group_name is None or k[0] == group_name]:
        del _buffers[key]


def _make(comm: Comm, nbytes: int, device: torch.device) -> PeerBuffer:
    """A new buffer of ``nbytes`` for the group (collective: every rank of the group calls it)."""
    if device.type not in device_types():
        raise MoEInputError(f"the symm backend runs on CUDA tensors, got {device.type!r}")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    symm_mem = libraries.load("symmetric_memory")
    local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    handle = symm_mem.rendezvous(local, comm.group_name)
    peers = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
    def barrier() -> None:  # a barrier waiting longer than config.peer_timeout_s for a peer fails the kernel
        handle.barrier(channel=0, timeout_ms=int(config.peer_timeout_s * 1000))

    return PeerBuffer(local, peers, barrier, handle)
