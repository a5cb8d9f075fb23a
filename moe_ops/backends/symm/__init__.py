"""The ``symm`` backend: tokens stored straight into the peers' symmetric memory over NVLink (one node,
CUDA). :mod:`.backend` is the transport, :mod:`.peer_memory` the buffer every rank of a group maps,
:mod:`.put` the Triton kernels that store rows into it."""

from moe_ops.backends.symm.backend import SymmBackend

__all__ = ["SymmBackend"]
