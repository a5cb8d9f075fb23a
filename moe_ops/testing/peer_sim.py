"""A CPU simulator of :mod:`moe_ops.peer_memory` for tests: the peer buffers of a gloo group as shared
memory files that every process of the group maps, so the ``symm`` backend's put kernel (run under
``TRITON_INTERPRET=1``, which dereferences raw addresses) stores into the other processes' buffers as
it stores into the peers' memory on a GPU. The barrier is a gloo barrier; CPU kernels finish before
they return, so the ordering it gives is the one the CUDA barrier gives on a GPU.

``install()`` registers the factory for CPU tensors; nothing in moe_ops calls it. Not modelled: NVLink
timing, concurrent writers racing within a transfer (the interpreter runs one program at a time), and
the CUDA barrier's timeout.
"""

from __future__ import annotations

import os
import tempfile
import uuid

import torch
import torch.distributed as dist

from moe_ops import peer_memory
from moe_ops.groups import Comm

made: list[int] = []  #: sizes of the buffers this process made, in order (tests read it)


def _shared_buffer(comm: Comm, nbytes: int, device: torch.device) -> peer_memory.PeerBuffer:
    name = os.path.join(os.environ.get("MOE_OPS_SHM_DIR", "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()),
                        f"moe_ops_peer_{uuid.uuid4().hex}")
    local = torch.from_file(name, shared=True, size=nbytes, dtype=torch.uint8)
    names: list[str | None] = [None] * comm.world_size
    dist.all_gather_object(names, name, group=comm.group)
    mapped = [local if peer == name else torch.from_file(peer, shared=True, size=nbytes, dtype=torch.uint8) for peer in names]
    dist.barrier(group=comm.group)  # every rank has mapped every file: the names can go
    os.unlink(name)
    made.append(nbytes)
    peers = torch.tensor([t.data_ptr() for t in mapped], dtype=torch.int64)

    def barrier() -> None:
        dist.barrier(group=comm.group)

    return peer_memory.PeerBuffer(local, peers, barrier, mapped)


def install() -> None:
    """Let the ``symm`` backend run on CPU tensors of a gloo group (with ``TRITON_INTERPRET=1``)."""
    peer_memory.install("cpu", _shared_buffer)


def install_on_rank(rank: int) -> None:
    """:class:`moe_ops.testing.harness.World` task: install the simulator in that worker."""
    install()


def buffers_made(rank: int) -> list[int]:
    """World task: the sizes of the peer buffers this worker made so far."""
    return list(made)
