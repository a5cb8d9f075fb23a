"""Quantizing token rows in Triton, as :func:`moe_ops.quant.quantize` defines it (bit for bit).

``_quantize_block`` quantizes one hidden block of a row; the layout kernels call it in their copy (rows
quantized on the way into the layout), :func:`quantize_rows` quantizes rows before a transport packs them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_ops import quant
from moe_ops.quant import QuantSpec
from moe_ops.stage.kernels import INTERPRETING, unit_columns
from moe_ops.stage.kernels.launch import launch

ROWS_WARPS = 8
DEQUANTIZE_H_BLOCK = 4096  # columns per program of dequantize_rows (H200: 197 us for 32768 x 7168 e4m3 -> bf16, 0.86x copy bandwidth)
DEQUANTIZE_WARPS = 4
#: e4m3 through the GPU's own conversion (one instruction per two values); the interpreter, whose casts
#: round ties away from zero, builds the bytes from the float32 bits instead (the same bytes: the CUDA
#: tests compare the compiled kernels with plain torch, the CPU tests the interpreted ones)
HARDWARE_CAST: tl.constexpr = tl.constexpr(not INTERPRETING)


@triton.jit
def _round_even(v):
    """``v`` (``|v| < 2**22``) rounded to an integer, half to even: adding 1.5 * 2**23 pushes the fraction
    out of a float32's mantissa, which the hardware rounds to nearest even."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quantize_block(v, QMAX: tl.constexpr, QMAX_INV: tl.constexpr, GROUP: tl.constexpr, INT8: tl.constexpr,
                    ROUND_SCALE: tl.constexpr, AMAX_FLOOR: tl.constexpr, H_BLOCK: tl.constexpr):
    """A hidden block ``v [H_BLOCK]`` (zero past the row) quantized as :func:`moe_ops.quant.quantize`
    defines it: ``(q [H_BLOCK], scales [H_BLOCK // GROUP])``, ``q`` the values to store: int8 as float32
    integers, e4m3 as its bytes (int32; store them through a byte view of the rows)."""
    g = tl.reshape(v.to(tl.float32), [H_BLOCK // GROUP, GROUP])
    amax = tl.maximum(tl.max(tl.abs(g), axis=1), AMAX_FLOOR)
    if ROUND_SCALE:  # the least power of two >= amax / QMAX (a positive normal float32), and its exact inverse
        bits = (amax * QMAX_INV).to(tl.int32, bitcast=True)
        exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = (exponent << 23).to(tl.float32, bitcast=True)
        factor = ((254 - exponent) << 23).to(tl.float32, bitcast=True)
    else:
        factor = tl.math.div_rn(tl.full([H_BLOCK // GROUP], QMAX, tl.float32), amax)
        if INT8:  # MC2's scale: the reciprocal of the factor
            scale = tl.math.div_rn(tl.full([H_BLOCK // GROUP], 1.0, tl.float32), factor)
        else:  # DeepEP's
            scale = amax * QMAX_INV
    q = g * tl.broadcast_to(factor[:, None], (H_BLOCK // GROUP, GROUP))
    # Rounded as magnitudes, the sign put back after: the rounding adds to |q|, never to the product
    # itself, which the compiler could fuse into one FMA (rounding the unrounded product: a different
    # integer at ties); the interpreter's e4m3 is built from bits, sign bit included (-0.0 too)
    magnitude = tl.abs(q)
    negative = q.to(tl.int32, bitcast=True) < 0  # the sign bit: -0.0 too
    if INT8:
        magnitude = tl.minimum(_round_even(magnitude), 127.0)
        out = tl.where(negative, -magnitude, magnitude)
    elif HARDWARE_CAST:  # the GPU's conversion: round to nearest even, saturating, the sign kept
        out = tl.minimum(tl.maximum(q, -QMAX), QMAX).to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    else:  # to e4m3's grid (3 mantissa bits; below 2**-6 the subnormals' step 2**-9), then its bits
        exponent = tl.maximum(((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
        step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
        inverse = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)  # powers of two: both products exact
        out = _e4m3_bits(tl.minimum(_round_even(magnitude * inverse) * step, QMAX), negative)
    return tl.reshape(out, [H_BLOCK]), scale


@triton.jit
def _e4m3_bits(magnitude, negative):
    """The float8_e4m3fn encoding (int32 holding a byte) of ``magnitude`` (on e4m3's grid, at most 448) with
    the sign ``negative``, built from the float32 bits (under the interpreter, whose casts round ties away
    from zero)."""
    bits = magnitude.to(tl.int32, bitcast=True)
    biased = bits >> 23
    normal = ((biased - 120) << 3) | ((bits >> 20) & 7)  # e4m3's exponent bias is 7, float32's 127
    subnormal = (magnitude * 512.0).to(tl.int32)  # below 2**-6: multiples of 2**-9, exactly
    return tl.where(biased >= 121, normal, subnormal) | tl.where(negative, 0x80, 0)


@triton.jit
def _quantize_rows(
    x_ptr, x_stride, hidden, q_ptr, scales_ptr, num_scales,
    QMAX: tl.constexpr, QMAX_INV: tl.constexpr, GROUP: tl.constexpr, INT8: tl.constexpr, ROUND_SCALE: tl.constexpr,
    AMAX_FLOOR: tl.constexpr, H_BLOCK: tl.constexpr,
):
    """Program (j, b): hidden block b of row j, quantized in groups of ``GROUP`` columns."""
    j = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * H_BLOCK + tl.arange(0, H_BLOCK)
    v = tl.load(x_ptr + j * x_stride + cols, mask=cols < hidden, other=0)
    q, scale = _quantize_block(v, QMAX, QMAX_INV, GROUP, INT8, ROUND_SCALE, AMAX_FLOOR, H_BLOCK)
    tl.store(q_ptr + j * hidden + cols, q.to(q_ptr.dtype.element_ty), mask=cols < hidden)
    sc = tl.program_id(1) * (H_BLOCK // GROUP) + tl.arange(0, H_BLOCK // GROUP)
    tl.store(scales_ptr + j * num_scales + sc, scale, mask=sc < num_scales)


def quantize_flags(spec: QuantSpec | None, group: int) -> dict[str, object]:
    """The constexprs :func:`_quantize_block` takes for ``spec`` (``None``: the kernel quantizes nothing;
    ``group``: the columns per scale of per-token scales, the caller's block over the whole row)."""
    if spec is None:
        return dict(QMAX=0.0, QMAX_INV=0.0, GROUP=group, INT8=False, ROUND_SCALE=False, AMAX_FLOOR=quant.AMAX_FLOOR)
    return dict(QMAX=spec.qmax, QMAX_INV=quant.inverse_qmax(spec), GROUP=spec.block or group, INT8=spec.dtype == torch.int8,
                ROUND_SCALE=spec.round_scale, AMAX_FLOOR=quant.AMAX_FLOOR)


def quantize_rows(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """``x [M, H]`` (rows may be strided) quantized: ``(q [M, H] spec.dtype, scales [M, S] float32)``; one
    launch (a program per row and block of 128 columns, or per row with one scale per token)."""
    assert unit_columns(x)
    m, hidden = x.shape
    if not hidden:
        return quant.quantize(x, spec)
    num_scales = quant.scale_columns(hidden, spec.block)
    q = torch.empty(m, hidden, dtype=spec.dtype, device=x.device)
    q_out = q if spec.dtype == torch.int8 else q.view(torch.uint8)  # e4m3 stored as the bytes the kernel builds
    scales = torch.empty(m, num_scales, dtype=torch.float32, device=x.device)
    h_block = spec.block or triton.next_power_of_2(max(hidden, 1))
    if m:
        launch(_quantize_rows, (m, triton.cdiv(hidden, h_block)),
            x, x.stride(0), hidden, q_out, scales, num_scales, **quantize_flags(spec, h_block), H_BLOCK=h_block,
            num_warps=ROWS_WARPS,
        )
    return q, scales


@triton.jit
def _e4m3_value(bits):
    """The float32 value of float8_e4m3fn bytes ``bits`` (int32 holding a byte), from the bits: the same
    on the GPU and under the interpreter."""
    biased = (bits >> 3) & 0xF
    mantissa = bits & 7
    normal = (((biased + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)  # biases 7 and 127
    magnitude = tl.where(biased > 0, normal, mantissa.to(tl.float32) * 0.001953125)  # subnormals: m * 2**-9
    magnitude = tl.where((bits & 0x7F) == 0x7F, float("nan"), magnitude)
    return tl.where((bits & 0x80) != 0, -magnitude, magnitude)


@triton.jit
def _dequantize_rows(q_ptr, scales_ptr, num_scales, hidden, out_ptr, GROUP: tl.constexpr, INT8: tl.constexpr, BF16_BITS: tl.constexpr,
                     H_BLOCK: tl.constexpr):
    """Program (j, b): hidden block b of row j times its scales (``GROUP`` columns each; 0: one per row),
    the product in float32 rounded once to the output's dtype (``BF16_BITS``: to bfloat16's bits by hand,
    nearest even, for the interpreter, whose bfloat16 cast truncates; ``out_ptr`` then holds int16)."""
    j = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * H_BLOCK + tl.arange(0, H_BLOCK)
    mask = cols < hidden
    raw = tl.load(q_ptr + j * hidden + cols, mask=mask, other=0)
    if INT8:
        v = raw.to(tl.float32)
    elif HARDWARE_CAST:  # the GPU's conversion (exact: every e4m3 value is a float32)
        v = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        v = _e4m3_value(raw.to(tl.int32) & 0xFF)
    scale = tl.load(scales_ptr + j * num_scales + (cols * 0 if GROUP == 0 else cols // GROUP), mask=mask, other=0.0)
    y = v * scale
    if BF16_BITS:
        bits = y.to(tl.int32, bitcast=True)
        y = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16)
    tl.store(out_ptr + j * hidden + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_rows(q: Tensor, scales: Tensor, block: int, dtype: torch.dtype) -> Tensor:
    """:func:`moe_ops.quant.dequantize` in one launch: ``q [..., H]`` (float8_e4m3fn or int8, contiguous)
    times its float32 ``scales [..., S]`` (``block`` columns each, 0: one per row), in ``dtype``."""
    assert q.dtype in (torch.float8_e4m3fn, torch.int8) and q.is_contiguous() and scales.is_contiguous()
    hidden = q.shape[-1]
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    rows = q.numel() // hidden if hidden else 0
    if rows:
        h_block = min(DEQUANTIZE_H_BLOCK, triton.next_power_of_2(hidden))
        bf16_bits = dtype == torch.bfloat16 and not HARDWARE_CAST
        launch(_dequantize_rows, (rows, triton.cdiv(hidden, h_block)),
            q if q.dtype == torch.int8 else q.view(torch.uint8), scales, scales.shape[-1], hidden,
            out.view(torch.int16) if bf16_bits else out, GROUP=block, INT8=q.dtype == torch.int8, BF16_BITS=bf16_bits, H_BLOCK=h_block,
            num_warps=DEQUANTIZE_WARPS,
        )
    return out
