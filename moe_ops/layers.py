"""A reference MoE block (router → dispatch → SwiGLU experts → combine), used by the demo and benchmarks.

Experts run as one grouped GEMM over the ragged layout (``torch._grouped_mm``, offsets =
``cumsum(tokens_per_expert)``) or as a batched GEMM over the padded ``[L, C, H]`` layout. Where
``torch._grouped_mm`` cannot run (it takes bfloat16 only, and needs compute capability 9.0 on CUDA) a
masked loop over the local experts stands in: correct, but it computes every row through every expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_ops.api import Dispatcher


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs (eager and compiled) for these operands."""
    if dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu"


def _grouped_linear(rows: Tensor, weight: Tensor, tokens_per_expert: Tensor, use_grouped_mm: bool) -> Tensor:
    """``rows [N, H]`` (expert-major, ``tokens_per_expert [L]`` rows each, then rows of no expert where the
    layout is bounded) times ``weight [L, H, F]``; rows of no expert are left unspecified."""
    ends = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
    if use_grouped_mm:
        return torch._grouped_mm(rows, weight, offs=ends)
    num_local = weight.shape[0]
    expert_of_row = torch.searchsorted(ends, torch.arange(rows.shape[0], device=rows.device, dtype=ends.dtype), right=True)
    out = rows.new_zeros(rows.shape[0], weight.shape[2])
    for e in range(num_local):
        out = out + (expert_of_row == e).unsqueeze(1).to(rows.dtype) * (rows @ weight[e])
    return out


class MoEBlock(nn.Module):
    """Top-k softmax router over ``num_experts`` experts, this rank's ``L`` SwiGLU experts, and a
    :class:`Dispatcher` moving tokens between them. ``forward(x [T, H]) -> [T, H]``."""

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        top_k: int,
        dispatcher: Dispatcher,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.dispatcher = dispatcher
        num_local = dispatcher.num_local_experts
        factory = dict(device=device, dtype=dtype)
        self.router = nn.Linear(hidden, dispatcher.num_experts, bias=False, **factory)
        self.w_gate_up = nn.Parameter(torch.randn(num_local, hidden, 2 * ffn_hidden, **factory) / hidden**0.5)
        self.w_down = nn.Parameter(torch.randn(num_local, ffn_hidden, hidden, **factory) / ffn_hidden**0.5)
        self.use_grouped_mm = grouped_mm_supported(self.w_down.device, dtype)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(topk_idx [T, K] int64, topk_weights [T, K] float32)``, weights renormalized over the top k."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        return idx, weights / weights.sum(dim=-1, keepdim=True)

    def experts(self, recv_x: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """SwiGLU of every row by its local expert, in the dispatch layout (ragged or padded)."""
        if recv_x.dim() == 3:
            gate, up = torch.bmm(recv_x, self.w_gate_up).chunk(2, dim=-1)
            return torch.bmm(F.silu(gate) * up, self.w_down)
        gate, up = _grouped_linear(recv_x, self.w_gate_up, tokens_per_expert, self.use_grouped_mm).chunk(2, dim=-1)
        return _grouped_linear((F.silu(gate) * up).contiguous(), self.w_down, tokens_per_expert, self.use_grouped_mm)

    def expert(self, local_expert: int, rows: Tensor) -> Tensor:
        """One local expert applied to ``rows [n, H]`` directly (no dispatch): what the reference calls."""
        gate, up = (rows @ self.w_gate_up[local_expert]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_down[local_expert]

    def forward(self, x: Tensor) -> Tensor:
        topk_idx, topk_weights = self.route(x)
        dispatched = self.dispatcher.dispatch(x, topk_idx, topk_weights)
        return self.dispatcher.combine(self.experts(dispatched.recv_x, dispatched.tokens_per_expert), dispatched)
