"""Input checks of the ops: metadata always (on real and fake tensors alike), values behind a switch.

Every message names the argument at fault. Metadata checks use shapes, dtypes and devices only, so
they run identically in the fake kernels (at trace time) and before any communication at run time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ops import quant
from moe_ops.errors import MoEInputError

TOKEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)
WEIGHT_DTYPES = (torch.float32, torch.float64)
QUANTIZABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  #: what ``quant`` quantizes


def _require_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise MoEInputError(f"{name} must be a Tensor, got {type(t).__name__}")
    return t


def _check_tensor(name: str, t: object, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    t = _require_tensor(name, t)
    if t.dim() != ndim:
        raise MoEInputError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise MoEInputError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if not t.is_contiguous():
        raise MoEInputError(f"{name} must be contiguous, got strides {t.stride()}")


def check_dispatch(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    num_experts: int,
    world_size: int,
    layout: str,
    capacity: int | None,
    max_tokens_per_rank: int | None,
    max_recv_rows: int | None = None,
    pad_multiple: int = 1,
    token_dtypes: tuple[torch.dtype, ...] = TOKEN_DTYPES,
) -> None:
    """Metadata checks of ``moe.dispatch`` (see docs/contract.md); ``x`` must have a dtype in
    ``token_dtypes``. Messages are built on failure only: this runs on every call."""
    _check_tensor("x", x, 2, token_dtypes)
    _check_tensor("topk_idx", topk_idx, 2, ID_DTYPES)
    _check_tensor("topk_weights", topk_weights, 2, WEIGHT_DTYPES)
    for name, t in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
        if t.device != x.device:
            raise MoEInputError(f"{name} is on {t.device} but x is on {x.device}")
    if topk_idx.shape[0] != x.shape[0]:
        raise MoEInputError(f"topk_idx has {topk_idx.shape[0]} rows but x has {x.shape[0]} tokens")
    if topk_idx.shape[1] < 1:
        raise MoEInputError("topk_idx must have at least one column (top-k >= 1)")
    if topk_weights.shape != topk_idx.shape:
        raise MoEInputError(
            f"topk_weights has shape {tuple(topk_weights.shape)} but topk_idx has {tuple(topk_idx.shape)}"
        )
    check_options(num_experts, world_size, layout, capacity, max_tokens_per_rank, max_recv_rows, pad_multiple)
    if max_tokens_per_rank is not None and x.shape[0] > max_tokens_per_rank:
        raise MoEInputError(f"x has {x.shape[0]} tokens, more than max_tokens_per_rank={max_tokens_per_rank}")


def check_quantized(x: object, x_scales: object, mode: str, block: int, round_scale: bool, dequantize: bool = False) -> quant.RowScales:
    """The quantization arguments of ``moe.dispatch_quantized``: either ``x_scales`` (``x`` already
    quantized: float8/int8 ``[T, H]`` with float32 scales ``[T, ceil(H / 128)]`` or ``[T, 1]``) or
    ``quant`` (``x`` bf16/fp16/fp32, quantized inside; ``dequantize`` only here). Returns the scales the
    rows carry."""
    if x_scales is None:
        spec = quant.make_spec(mode, block, round_scale)
        _check_tensor("x", x, 2, QUANTIZABLE_DTYPES)
        assert isinstance(x, Tensor)
        return quant.RowScales(quant.scale_columns(x.shape[1], spec.block), spec)
    if mode or round_scale:
        raise MoEInputError("give x_scales (x is already quantized) or quant and round_scale (quantize x in dispatch), not both")
    if dequantize:
        raise MoEInputError("dequantize=True needs quant= (x in bf16/fp16/fp32, quantized for the wire), not a pre-quantized x with x_scales")
    _check_tensor("x", x, 2, quant.QUANTIZED_DTYPES)
    _check_tensor("x_scales", x_scales, 2, (torch.float32,))
    assert isinstance(x, Tensor) and isinstance(x_scales, Tensor)
    allowed = (1, quant.scale_columns(x.shape[1], quant.BLOCK))
    if x_scales.shape[0] != x.shape[0] or x_scales.shape[1] not in allowed:
        raise MoEInputError(
            f"x_scales has shape {tuple(x_scales.shape)}, expected [{x.shape[0]}, {allowed[1]}] (a scale per "
            f"{quant.BLOCK} columns) or [{x.shape[0]}, 1] (one per token) for x of shape {tuple(x.shape)}"
        )
    if x_scales.device != x.device:
        raise MoEInputError(f"x_scales is on {x_scales.device} but x is on {x.device}")
    return quant.RowScales(int(x_scales.shape[1]), None)


def quantized_token_dtypes(scales: quant.RowScales) -> tuple[torch.dtype, ...]:
    """The dtypes ``x`` may have in a quantized dispatch."""
    return quant.QUANTIZED_DTYPES if scales.quantize is None else QUANTIZABLE_DTYPES


def check_options(
    num_experts: int,
    world_size: int,
    layout: str,
    capacity: int | None,
    max_tokens_per_rank: int | None,
    max_recv_rows: int | None,
    pad_multiple: int,
) -> None:
    """The checks of dispatch's options that need no tensor (``Dispatcher`` runs them when built)."""
    if num_experts < 1:
        raise MoEInputError(f"num_experts must be >= 1, got {num_experts}")
    if num_experts % world_size:
        raise MoEInputError(f"num_experts={num_experts} is not divisible by the group size {world_size}")
    if layout not in ("ragged", "padded"):
        raise MoEInputError(f"layout must be 'ragged' or 'padded', got {layout!r}")
    if layout == "ragged" and capacity is not None:
        raise MoEInputError("capacity applies to layout='padded' only (leave it None)")
    if layout == "ragged" and max_tokens_per_rank is not None and max_recv_rows is None:
        raise MoEInputError("max_tokens_per_rank applies to layout='padded' and to max_recv_rows only (leave it None)")
    if max_recv_rows is not None and layout != "ragged":
        raise MoEInputError("max_recv_rows bounds the ragged layout; layout='padded' takes capacity instead")
    if max_recv_rows is not None and max_recv_rows < 0:
        raise MoEInputError(f"max_recv_rows must be >= 0, got {max_recv_rows}")
    if not isinstance(pad_multiple, (int, torch.SymInt)) or isinstance(pad_multiple, bool) or pad_multiple < 1:
        raise MoEInputError(f"pad_multiple must be an int >= 1, got {pad_multiple!r}")
    if max_recv_rows is not None and max_recv_rows % pad_multiple:
        raise MoEInputError(f"max_recv_rows={max_recv_rows} must be a multiple of pad_multiple={pad_multiple}")
    if capacity is not None and capacity < 0:
        raise MoEInputError(f"capacity must be >= 0 (None: the worst case, which never drops), got {capacity}")
    if max_tokens_per_rank is not None and max_tokens_per_rank < 0:
        raise MoEInputError(f"max_tokens_per_rank must be >= 0 (None: x's token count), got {max_tokens_per_rank}")


def check_placement(expert_map: object, log2phy: object, num_experts: int, world_size: int, device: torch.device) -> None:
    """Metadata of the optional placement tables: ``expert_map [W, E]`` and ``log2phy [E_logical]``, int."""
    if expert_map is not None:
        _check_tensor("expert_map", expert_map, 2, ID_DTYPES)
        assert isinstance(expert_map, Tensor)
        if tuple(expert_map.shape) != (world_size, num_experts):
            raise MoEInputError(
                f"expert_map has shape {tuple(expert_map.shape)}, expected (group size, num_experts) = "
                f"({world_size}, {num_experts}): row r maps global expert ids to rank r's local ids"
            )
        if expert_map.device != device:
            raise MoEInputError(f"expert_map is on {expert_map.device} but x is on {device}")
    if log2phy is not None:
        _check_tensor("log2phy", log2phy, 1, ID_DTYPES)
        assert isinstance(log2phy, Tensor)
        if log2phy.device != device:
            raise MoEInputError(f"log2phy is on {log2phy.device} but x is on {device}")


def check_placement_values(expert_map: Tensor | None, log2phy: Tensor | None, num_local: int, num_experts: int) -> None:
    """Value checks of the placement tables (host sync): local ids in ``[-1, L)``, no expert on two ranks,
    physical ids in ``[0, E)``."""
    if expert_map is not None:
        if bool(((expert_map < -1) | (expert_map >= num_local)).any()):
            raise MoEInputError(f"expert_map holds a local id outside [-1, {num_local})")
        if bool(((expert_map >= 0).sum(dim=0) > 1).any()):
            raise MoEInputError("expert_map places one expert on two ranks")
    if log2phy is not None and bool(((log2phy < 0) | (log2phy >= num_experts)).any()):
        raise MoEInputError(f"log2phy holds a physical id outside [0, {num_experts})")


def check_values(topk_idx: Tensor, topk_weights: Tensor, num_experts: int) -> None:
    """Value checks (host sync): ids in ``[0, num_experts)`` or ``-1``, no duplicates per row, no NaN weight."""
    valid = topk_idx >= 0
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if bool(bad.any()):
        first = topk_idx[bad][0].item()
        raise MoEInputError(f"topk_idx holds id {first}, outside [0, {num_experts}) and not -1")
    ordered = torch.sort(torch.where(valid, topk_idx, -1 - torch.arange(
        topk_idx.shape[1], device=topk_idx.device, dtype=topk_idx.dtype)), dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise MoEInputError("topk_idx has a duplicate expert id within one row")
    if bool(torch.isnan(topk_weights).any()):
        raise MoEInputError("topk_weights holds NaN")


def _same_shape(a: tuple, b: tuple) -> bool:
    """Shape equality that never guards on unbacked (data-dependent) sizes: those are deferred to run time."""
    if len(a) != len(b):
        return False
    if all(isinstance(d, int) for d in (*a, *b)):
        return tuple(a) == tuple(b)
    for da, db in zip(a, b):
        torch._check(da == db, lambda: f"shape mismatch {tuple(a)} vs {tuple(b)}")
    return True


def check_rows(name: str, t: object, rows_shape: tuple, trailing: int, dtypes: tuple[torch.dtype, ...]) -> None:
    """``t`` must be ``rows_shape`` plus ``trailing`` more dims (the dispatch layout), of a dtype in ``dtypes``."""
    t = _require_tensor(name, t)
    lead = len(rows_shape)
    if t.dim() != lead + trailing or not _same_shape(tuple(t.shape[:lead]), tuple(rows_shape)):
        raise MoEInputError(
            f"{name} has shape {tuple(t.shape)}, expected leading dims {tuple(rows_shape)} then {trailing} more "
            "(the layout of the dispatch that made the handle)"
        )
    _check_tensor(name, t, lead + trailing, dtypes)
