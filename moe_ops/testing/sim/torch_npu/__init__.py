"""A CPU simulator of the torch_npu ops moe_ops calls, for tests on machines without an Ascend NPU.

``moe_ops.testing.sim.install("torch_npu", version=2, tamper=None, soc="A3")`` puts a module built by
:func:`simulator` in torch_npu's place (through :mod:`moe_ops.libraries`), holding CPU implementations
of the *documented* behaviour of ``npu_moe_distribute_dispatch_v2`` / ``npu_moe_distribute_combine_v2``
and their v1 forms (``npu_moe_distribute_dispatch`` / ``combine``, ``expand_idx``) in :mod:`.mc2`, and
of ``npu_moe_token_permute`` / ``npu_moe_token_unpermute`` in :mod:`.permute`. It runs on CPU tensors
and gloo groups (a group's "HCCL communicator name" is ``"sim-hccl:" + group name``). It reports a real
SoC (``torch_npu.npu.get_device_name()``: Atlas A3 by default, A2 with ``soc="A2"``) and enforces that
SoC's limits, as the operators' tiling does; the backend applies the same limits before calling. Only
tests install it. The MC2 ops exchange real data between processes (``all_gather_object`` over the
group), return tensors of the shapes torch_npu's meta functions give, and reject what the tiling and
the documentation reject. :mod:`.common` records every call.

Sources, cited at each rule: CANN's ops-transformer (hicann/ops-transformer c29bc10, 2025-11-15; A2's
hierarchy EP bound from a later revision), its operator documentation, torch_npu's op-plugin (meta
functions and op wrappers, Ascend/op-plugin 517f2e7d, 2026-08-21).

Modelled (documented): the routing of every active route ``(t, k)`` to the rank owning expert
``expert_ids[t, k]`` and back; ``expand_x`` grouped by local expert; ``expert_token_nums`` as counts
or cumulative counts (``expert_token_nums_type``); ``ep_recv_counts`` as cumulative counts per
(expert, source rank); ``A = (global_bs or BS * W) * min(L, K)`` with an error where more rows arrive;
``global_bs`` (equal on every rank; 0 only when every BS is equal; else ``>= max BS * W``);
``x_active_mask`` (v2: 1-D with true before false, or 2-D; only with equal batches; v1: reserved,
rejected); ids in ``[0, E)`` without repeats in a row; ``quant_mode`` 2 as the kernels compute it
(:func:`.mc2.dynamic_quant`: ``m = 127 / max|row|``, ``q = rint(row * m)``, ``dynamic_scales = 1 / m``, in
float32; the ops' other quantization modes are refused, as the tiling refuses them); ``expert_scales`` -> ``expand_scales`` and
combine's weighted sum ``sum_k expert_scales[t, k] * row(t, k)`` (float32 accumulation, one rounding);
combine rows must come back in the shape and from the ranks its dispatch sent them to.

Decided where the documentation is silent: rows of one expert arrive in (source rank, token) order;
rows past the filled ones, which the ops allocate uninitialised and leave unwritten, are NaN in
``expand_x`` and ``dynamic_scales`` (int8 ``expand_x``: -128, which MC2's quantization never writes; also
where the source leaves a conversion undefined: an all-zero row's NaN products); combine accumulates in float32; ``assist_info_for_combine``
uses this module's own encoding (a header, then (source rank, token, k) per row) and combine sends each
row where it says, checking nothing else (as MC2, which documents the handle as opaque: the handle of
another dispatch of the same shapes gives wrong sums, not an error); ``expand_idx`` holds each source
route's row at its destination; ``npu_moe_token_permute`` sorts stably.

Not modelled: timing, overlap and the HCCL window buffer (HCCL_BUFFSIZE is only checked by the backend),
shared experts, TP domains, elastic scaling, special (zero/copy/const) experts, smooth ``scales``,
``comm_alg`` (the backend passes none), int8 combine
(``comm_quant_mode``), and what the hardware does that neither the tiling nor the documentation says.
"""

from __future__ import annotations

import types

from moe_ops.testing.sim.torch_npu import mc2, permute
from moe_ops.testing.sim.torch_npu.common import Call, Tamper, calls, reset

SOC_DEVICE_NAMES = {"A2": "Ascend910B3", "A3": "Ascend910_9382"}


def simulator(version: int = 2, tamper: Tamper | None = None, soc: str = "A3") -> types.ModuleType:
    """A fresh ``torch_npu`` stand-in: the MC2 ops of ``version`` 2 and 1 (or 1 only) and the permute
    kernels; calls recorded from now on, each edited by ``tamper(op, kwargs)`` first if given; SoC ``soc``
    ("A2" or "A3") reported and its limits enforced."""
    reset(tamper, soc)
    module = types.ModuleType("torch_npu", "CPU simulator of torch_npu's MoE ops (moe_ops.testing.sim.torch_npu)")
    ops = [mc2.npu_moe_distribute_dispatch, mc2.npu_moe_distribute_combine, permute.npu_moe_token_permute, permute.npu_moe_token_unpermute]
    if version == 2:
        ops += [mc2.npu_moe_distribute_dispatch_v2, mc2.npu_moe_distribute_combine_v2]
    for op in ops:
        setattr(module, op.__name__, op)
    module.SIMULATED_DEVICE_TYPES = frozenset({"cpu"})  # type: ignore[attr-defined]
    module.simulated_comm_name = mc2.comm_name  # type: ignore[attr-defined]
    module.npu = types.SimpleNamespace(get_device_name=lambda: SOC_DEVICE_NAMES[soc])  # type: ignore[attr-defined]
    return module


__all__ = ["Call", "Tamper", "calls", "simulator"]
