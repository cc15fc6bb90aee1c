"""Triton helpers that quantise KV rows to fp8 e4m3 (the rule of reference.quantize_fp8).

Shared by the write paths (triton_write_kv, triton_rotary). The e4m3 code is formed from the
float32 bits in integer arithmetic and stored through a uint8 view of the cache, rather than
with ``.to(tl.float8e4nv)``: Triton 3.6's interpreter converts float32 -> fp8 wrongly (it
rounds ties up, drops the mantissa carry and truncates subnormals: 140 of the 252 midpoints
between e4m3 values and ~11% of random rows came out different from torch's conversion,
measured on CPU), so the cast path could not be tested in CI. The integer path gives the
same codes in the interpreter and on the GPU (no fp8 type needed, so sm_80 works too), at
~15 integer ops per element in a kernel that is bound by its few bytes of memory traffic.
Divisions are IEEE (div_rn), as torch's, so the codes and scales equal the reference's.
"""
from __future__ import annotations

import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)   # largest finite e4m3fn value


@triton.jit
def e4m3_bits(y):
    """float32 y (already clamped to [-448, 448]) -> int32 e4m3fn code in [0, 255], rounded
    to nearest even; NaN -> 0x7F."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = bits & 0x7FFFFFFF
    # normal e4m3 (|y| >= 2^-6, float32 biased exponent >= 121): drop 20 mantissa bits with
    # round-to-nearest-even; a carry moves into the exponent by itself; rebias 127 -> 7.
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal e4m3 (multiples of 2^-9): the 24-bit significand shifted right by
    # 141 - exponent, rounded to nearest even (shift capped at 26: the result is 0 there).
    e = a >> 23
    m = (a & 0x7FFFFF) | 0x800000
    s = tl.minimum(141 - e, 26)
    q = m >> s
    rem = m & ((1 << s) - 1)
    half = 1 << (s - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    mag = tl.where(e >= 121, normal, q)
    mag = tl.where(a > 0x7F800000, 0x7F, mag)
    return (sign << 7) | mag


@triton.jit
def quantize_rows(x, scale):
    """x float32 [R, C] -> int32 e4m3 codes [R, C] of clamp(x / scale[:, None]) (scale [R])."""
    y = tl.math.div_rn(x, scale[:, None])
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    return e4m3_bits(y)


@triton.jit
def scale_of(amax):
    """Per-slot scale of rows with absolute maximum ``amax``: amax / 448, or 1 for a zero row."""
    return tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32)),
                    1.0)


@triton.jit
def row_scales(x):
    """Per-slot scales of x float32 [R, C] (masked-off entries must be 0)."""
    return scale_of(tl.max(tl.abs(x), axis=1))


@triton.jit
def write_rows(x, valid, dst, scale_dst, scale_f, PER_SLOT: tl.constexpr):
    """Quantise x float32 [R, C] (0 where not ``valid``) and store its codes at ``dst`` (uint8
    pointers [R, C]) and, PER_SLOT, its row scales at ``scale_dst`` (float32 pointers [R]);
    otherwise every row uses the per-tensor float ``scale_f``."""
    rows = tl.max(valid.to(tl.int32), axis=1) > 0
    if PER_SLOT:
        scale = row_scales(x)
        tl.store(scale_dst, scale, mask=rows)
    else:
        scale = tl.full([x.shape[0]], scale_f, tl.float32)
    tl.store(dst, quantize_rows(x, scale).to(tl.uint8), mask=valid)
