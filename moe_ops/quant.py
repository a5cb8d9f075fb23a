"""Quantized rows: the modes a dispatch can quantize tokens to, and the one definition of the rounding.

A quantized token row is ``q [H]`` (float8_e4m3fn or int8) with float32 scales ``s [S]``: group ``g`` of
``G`` consecutive columns (``G = 128``, or the whole row: ``S = 1``) dequantizes as ``q[c] * s[g]``.
Quantizing a row (docs/contract.md, "Quantized dispatch"), in float32 throughout, each product and
quotient rounded to nearest: the arithmetic of the kernels that define each format in practice, DeepEP's
for FP8 (``calculate_fp8_scales``) and CANN MC2's for INT8 (``QuantProcess``):

* ``amax[g] = max(max |x[c]| over the group's columns, AMAX_FLOOR)`` (the floor keeps an all-zero group's
  scale finite, as DeepEP clamps at 1e-4);
* the factor ``f[g] = QMAX / amax[g]`` (``QMAX`` 448 for e4m3, 127 for int8) and the scale ``s[g]``: e4m3
  ``amax[g] * (1 / QMAX)`` (``1 / QMAX`` rounded to float32 once), int8 ``1 / f[g]``; with ``round_scale``
  (UE8M0 scales, DeepEP's ``round_scale`` / ``use_ue8m0``) ``s[g]`` is the least power of two at or above
  ``amax[g] * (1 / QMAX)`` and ``f[g] = 1 / s[g]`` exactly;
* ``q[c] = x[c] * f[g]``, then to the format: float8 by round-to-nearest-even, int8 by
  round-half-to-even, clamped to ``[-QMAX, QMAX]`` (``|x * f| <= QMAX`` up to one rounding, so the
  clamp only catches that rounding).

Every step is a multiplication or one division per group: the same bits on CPU, CUDA and in Triton
(torch divides a tensor by a Python number as a multiplication by its reciprocal on CUDA, so nothing
here divides by a Python number).
:func:`quantize` is that definition in plain torch; the Triton kernels compute the same bits, and the
tests hold both to a float64 reference.
"""

from __future__ import annotations

import struct
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from moe_ops.errors import MoEInputError

Mode = Literal["fp8_e4m3", "int8"]

#: the quantized formats: mode -> (dtype, QMAX)
FORMATS: dict[str, tuple[torch.dtype, float]] = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "int8": (torch.int8, 127.0)}
#: the dtypes a pre-quantized ``x`` may have
QUANTIZED_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
BLOCK = 128  #: columns per scale in block-scaled rows (DeepSeek-V3's, DeepEP's)
AMAX_FLOOR = 1e-4


class QuantSpec(NamedTuple):
    """How a dispatch quantizes ``x`` (``quant``, ``quant_block``, ``round_scale`` of ``moe.dispatch_quantized``)."""

    mode: Mode
    block: int = BLOCK  #: columns per scale; 0: one scale per token
    round_scale: bool = False  #: scales rounded up to powers of two (UE8M0)

    @property
    def dtype(self) -> torch.dtype:
        return FORMATS[self.mode][0]

    @property
    def qmax(self) -> float:
        return FORMATS[self.mode][1]


class RowScales(NamedTuple):
    """The scales a quantized dispatch moves with each row (``DispatchPlan.scales``)."""

    columns: int  #: ``S``, float32 scales per row
    quantize: QuantSpec | None  #: quantize ``x`` inside the dispatch; ``None``: ``x`` arrives quantized with its scales

    @property
    def block(self) -> int:
        """Columns per scale (0: one scale for the whole row)."""
        if self.quantize is not None:
            return self.quantize.block
        return 0 if self.columns == 1 else BLOCK


def scale_columns(hidden: int, block: int) -> int:
    """``S``: scales per row of ``hidden`` columns (``block`` 0: one per token)."""
    return 1 if block == 0 else -(-hidden // block)


def make_spec(quant: str, block: int, round_scale: bool) -> QuantSpec:
    """Check the quantization options of a dispatch (``MoEInputError`` naming the argument)."""
    if quant not in FORMATS:
        raise MoEInputError(f"quant must be one of {sorted(FORMATS)} (or '' with a pre-quantized x), got {quant!r}")
    if block not in (0, BLOCK):
        raise MoEInputError(f"quant_block must be {BLOCK} (block scales) or 0 (one scale per token), got {block}")
    return QuantSpec(quant, block, round_scale)  # type: ignore[arg-type]


def power_of_two_ceil(s: Tensor) -> Tensor:
    """The least power of two ``>= s`` (positive normal float32), exactly: a float32 whose mantissa bits
    are not all zero moves up to the next exponent."""
    bits = s.view(torch.int32)
    exponent = (bits >> 23) + (bits & 0x7FFFFF != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def quantize(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """``x [T, H]`` (bf16/fp16/fp32) quantized as the module docstring defines: ``(q [T, H] spec.dtype,
    scales [T, S] float32)``."""
    t, h = x.shape
    group = h if spec.block == 0 else spec.block
    s_cols = scale_columns(h, spec.block)
    xf = x.float()
    padded = xf if s_cols * group == h else torch.nn.functional.pad(xf, (0, s_cols * group - h))
    amax = padded.view(t, s_cols, group).abs().amax(dim=-1).clamp(min=AMAX_FLOOR) if h else xf.new_full((t, s_cols), AMAX_FLOOR)
    if spec.round_scale:
        scales = power_of_two_ceil(amax * inverse_qmax(spec))
        factor = torch.reciprocal(scales)  # exact: a power of two
    else:
        factor = torch.full_like(amax, spec.qmax) / amax
        scales = torch.ones_like(factor) / factor if spec.dtype == torch.int8 else amax * inverse_qmax(spec)
    q = xf * (factor.repeat_interleave(group, dim=1)[:, :h] if h else factor[:, :0])
    if spec.dtype == torch.int8:
        return torch.round(q).clamp(-127, 127).to(torch.int8), scales
    return q.clamp(-spec.qmax, spec.qmax).to(spec.dtype), scales


def inverse_qmax(spec: QuantSpec) -> float:
    """``1 / QMAX`` rounded to float32 (as a Python float holding that float32 value)."""
    return struct.unpack("f", struct.pack("f", 1.0 / spec.qmax))[0]


def dequantize(q: Tensor, scales: Tensor, block: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q [..., H]`` times its scales ``[..., S]`` (``block`` columns each, 0: one per row): the product in
    float32, rounded once to ``dtype``."""
    h = q.shape[-1]
    group = h if block == 0 else block
    if h % max(group, 1) == 0:  # whole groups: broadcast each scale over its columns
        groups = q.float().unflatten(-1, (scales.shape[-1], h // scales.shape[-1] if scales.shape[-1] else 0))
        return (groups * scales.unsqueeze(-1)).flatten(-2).to(dtype)
    return (q.float() * scales.repeat_interleave(group, dim=-1)[..., :h]).to(dtype)
