"""Triton kernels of the local stage (CUDA; ``TRITON_INTERPRET=1`` runs them on CPU tensors in tests).

:mod:`moe_ops.stage.kernels.layout` lays routes out and moves token rows into the expert-major layout;
:mod:`moe_ops.stage.kernels.reduce` sums rows back per token and computes combine's backward. They compute
exactly what :mod:`moe_ops.stage.plain` computes in plain torch; backends reach either through
:mod:`moe_ops.stage`; the ``symm`` backend's put kernels use the block helpers below. Importing this package imports Triton.
"""

import functools
import os

import torch
import triton
from torch import Tensor

from moe_ops import config

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Block shapes come from short lists, so that the shapes met in practice compile few kernel variants.


def block_size(n: int, cap: int) -> int:
    """Elements per program along a row of ``n``: 64 or 256 where that covers ``n``, else ``cap``."""
    return next((b for b in (64, 256) if n <= b <= cap), cap)


def bins_for(num_local: int) -> int:
    """Histogram bins for ``num_local`` experts: a power of two >= ``num_local``."""
    return next((b for b in (32, 256, 1024, 4096) if num_local <= b), triton.next_power_of_2(num_local))


def k_block(top_k: int) -> int:
    """Lanes for the ``top_k`` routes of a row."""
    return max(8, triton.next_power_of_2(top_k))


def unit_columns(t: Tensor) -> bool:
    """Whether the kernels can address ``t``'s rows as ``base + row * stride(0) + column``: its columns
    are unit-stride, or their stride is never used (one column, or no rows — an empty tensor counts as
    contiguous whatever its strides, so ``.contiguous()`` keeps them)."""
    return t.stride(-1) == 1 or t.shape[-1] <= 1 or t.numel() == 0


@functools.cache
def _has_pdl(device: int) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl(t: Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with programmatic dependent launch (``config.pdl``; a CUDA
    device of compute capability 9.0 or later; not under the interpreter): a kernel so launched may start
    before the one it follows finishes, so it must ``gdc_wait`` before it reads what that one wrote."""
    if not (config.pdl and t.is_cuda) or INTERPRETING:
        return False
    return _has_pdl(torch.cuda.current_device() if t.device.index is None else t.device.index)
