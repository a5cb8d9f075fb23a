"""torch_npu's MoE permute kernels simulated on CPU: ``npu_moe_token_permute`` (a stable sort of the
routes by their keys) and ``npu_moe_token_unpermute`` (the weighted sum back per token)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moe_ops.testing.sim.torch_npu.common import enter, require

_SORT_LIMIT = 16777215


def npu_moe_token_permute(tokens: Tensor, indices: Tensor, num_out_tokens: int | None = None, padded_mode: bool = False) -> tuple[Tensor, Tensor]:
    """Simulated ``torch_npu.npu_moe_token_permute``: rows of ``tokens`` per route sorted by ``indices``
    (stably), the first ``num_out_tokens`` kept; ``sorted_indices[i]`` = row of flat route ``i``."""
    enter("npu_moe_token_permute", dict(tokens=tokens, indices=indices, num_out_tokens=num_out_tokens, padded_mode=padded_mode))
    require(not padded_mode, "padded_mode is not supported")
    require(tokens.dim() == 2 and tokens.dtype in (torch.float16, torch.bfloat16, torch.float32), "tokens must be 2-D fp16/bf16/fp32")
    require(indices.dim() in (1, 2) and indices.dtype in (torch.int32, torch.int64), "indices must be 1-D or 2-D int32/int64")
    flat = indices.reshape(-1).long()
    require(flat.numel() < _SORT_LIMIT and bool(((flat >= 0) & (flat < _SORT_LIMIT)).all()), "indices outside [0, 16777215)")
    top_k = 1 if indices.dim() == 1 else indices.shape[1]
    order = torch.sort(flat, stable=True).indices
    kept = flat.numel() if not num_out_tokens else min(num_out_tokens, flat.numel()) if num_out_tokens > 0 else flat.numel() + num_out_tokens
    sorted_indices = torch.empty_like(order, dtype=torch.int32).scatter_(0, order, torch.arange(flat.numel(), dtype=torch.int32))
    return tokens[order[:kept] // top_k], sorted_indices


def npu_moe_token_unpermute(
    permuted_tokens: Tensor, sorted_indices: Tensor, probs: Tensor | None = None, padded_mode: bool = False, restore_shape: Any = None
) -> Tensor:
    """Simulated ``torch_npu.npu_moe_token_unpermute``: ``out[t] = sum_k probs[t, k] * permuted_tokens[sorted_indices[t K + k]]``
    (float32 accumulation)."""
    enter("npu_moe_token_unpermute", dict(permuted_tokens=permuted_tokens, sorted_indices=sorted_indices, probs=probs, padded_mode=padded_mode))
    require(not padded_mode and restore_shape is None, "padded_mode / restore_shape are not supported")
    rows = permuted_tokens.shape[0]
    require(sorted_indices.dtype == torch.int32 and sorted_indices.shape == (rows,), "sorted_indices must be int32 [tokens * topK]")
    require(torch.equal(sorted_indices.sort().values, torch.arange(rows, dtype=torch.int32)), "sorted_indices must be a permutation of [0, tokens * topK)")
    top_k = 1 if probs is None else probs.shape[1]
    picked = permuted_tokens[sorted_indices.long()].float().view(rows // top_k, top_k, -1)
    if probs is not None:
        picked = picked * probs.float().unsqueeze(-1)
    return picked.sum(1).to(permuted_tokens.dtype)
