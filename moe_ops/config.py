"""Run-time switches of moe_ops, read by the op kernels each time they run.

``check_values``: validate *values* of the routing inputs before any communication (expert ids in
``[0, num_experts)``, no duplicate id within a row, no NaN router weight). Off by default because it
needs a device-to-host sync per call and cannot run inside a CUDA-graph capture. With it off, ids
outside the range behave as masked (``-1``) routes; no kernel reads or writes out of bounds whatever
the values. The environment variable ``MOE_OPS_CHECK_VALUES=1`` turns it on at import.

``handshake``: when a multi-rank call agrees with its peers (moe_ops/handshake.py) before moving
tokens. ``"auto"`` (default): on every call where that costs no device-to-host sync — the ragged
layout (which syncs anyway) and CPU tensors — and, for the static layouts (padded; ragged with
``max_recv_rows``) on an accelerator, on the first call of each signature only (so those steps neither
sync nor break CUDA-graph capture).
``"always"``: on every call outside a CUDA-graph capture (one small sync per padded call on GPU).
``MOE_OPS_HANDSHAKE`` sets it at import.

``kernels``: who runs the local stage (layout, permute, reductions). ``"auto"`` (default): the Triton
kernels on CUDA tensors when Triton imports, torch_npu's MoE kernels on NPU tensors where they fit
(moe_ops/stage/npu.py), plain torch elsewhere. ``"torch"``: plain torch always. ``"triton"``: Triton
always, CPU tensors too (only meaningful under ``TRITON_INTERPRET=1``, which is how CI tests the
kernels). ``"npu"``: torch_npu's kernels wherever they fit, CPU tensors too (only meaningful with the
torch_npu simulator of moe_ops.testing.sim installed, which is how CI tests that path).
``MOE_OPS_KERNELS`` sets it at import.

``deepep_num_sms``: streaming multiprocessors DeepEP's normal-mode (high-throughput) kernels may use,
set through ``deep_ep.Buffer.set_num_sms`` before each normal-mode call (DeepEP keeps it class-wide, so
it is shared with any other DeepEP user in the process). Even; default 20, DeepEP V1's own default and
Megatron-Core's ``moe_deepep_num_sms``. Low-latency kernels size themselves. ``MOE_OPS_DEEPEP_NUM_SMS``
sets it at import. Read at trace time too (it fixes the shape of DeepEP's channel matrices in the
handle), so change it before compiling.

``peer_timeout_s``: how long a rank waits for its peers in any one exchange before the call fails with
``MoECommunicationError`` (a peer died or hangs). Applies to every collective moe_ops runs on a CPU (gloo)
group, to the ``symm`` backend's barriers, and to the transports' libraries where they take a timeout; on
NCCL and HCCL groups the process group's own ``timeout`` (``init_process_group(timeout=...)``) bounds the
wait, since a host-side timed wait there would be a device-to-host sync (and break CUDA-graph capture).
Either way a rank never waits longer than its process group's timeout. Default 300 s (ranks compiling
the same graph have drifted 130 s apart on a loaded host). ``MOE_OPS_PEER_TIMEOUT_S`` sets it at import.

``symm_num_sms``: programs (one per streaming multiprocessor in practice) of the ``symm`` backend's
kernel that stores rows into the peers' buffers; the rest of the GPU stays free for compute that
overlaps the transfer. Default 32 (of 132 on an H100 or H200). ``MOE_OPS_SYMM_NUM_SMS`` sets it at import.

``pdl``: launch the kernels of a dispatch with programmatic dependent launch on GPUs that have it (compute
capability 9.0 and later): each of dispatch's kernels starts while the one before it finishes and waits on the
device for its results, and the row copy loads its source rows before that wait. Default on;
``MOE_OPS_PDL=0`` turns it off at import (for a comparison, or a driver that mishandles it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

check_values: bool = os.environ.get("MOE_OPS_CHECK_VALUES", "0") == "1"
handshake: str = os.environ.get("MOE_OPS_HANDSHAKE", "auto")
kernels: str = os.environ.get("MOE_OPS_KERNELS", "auto")
deepep_num_sms: int = int(os.environ.get("MOE_OPS_DEEPEP_NUM_SMS", "20"))
symm_num_sms: int = int(os.environ.get("MOE_OPS_SYMM_NUM_SMS", "32"))
peer_timeout_s: float = float(os.environ.get("MOE_OPS_PEER_TIMEOUT_S", "300"))
pdl: bool = os.environ.get("MOE_OPS_PDL", "1") != "0"


def handshake_every_call(static: bool, device_type: str) -> bool:
    """Whether a multi-rank call on ``device_type`` tensors agrees with its peers every time (``static``: a
    padded or bounded layout, which must not sync on an accelerator)."""
    return handshake == "always" or check_values or not static or device_type == "cpu"


@contextlib.contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """Temporarily switch :data:`check_values`."""
    global check_values
    previous, check_values = check_values, enabled
    try:
        yield
    finally:
        check_values = previous
