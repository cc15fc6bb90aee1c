"""Triton KV-cache write: scatter this step's key/value rows into the paged caches.

One program copies one tile of one token's [Hkv, D] key and value rows to the cache slot
slot_mapping[t] (slots < 0 are padding and are skipped). key/value may be strided views (a
slice of a fused QKV projection viewed as [T, Hkv, D]): only the last dim must be contiguous,
so a token's row is addressed as t * stride_t + h * stride_h + d. The cache side is
contiguous, so the destination of a token is one run of Hkv * D elements; with D a compile-
time constant and the strides specialised (Triton specialises ints divisible by 16) both
sides compile to 16-byte vector loads/stores for D a multiple of 8. Cache offsets are int64:
slot * Hkv * D overflows int32 past 32768 blocks of 16 x 8 x 128.

fp8 (float8_e4m3fn) caches: a second kernel quantises each (token, KV head) row by the
reference rule (kernels/triton_fp8.py) into the uint8 view of the pages and stores its
float32 scale at scale[slot * Hkv + h] (per-slot mode) or uses the per-tensor float scales.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fp8 import write_rows

# Ops of this module that take fp8 caches (checked by kernels/__init__.py).
FP8_KV_OPS = ("write_kv",)


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     key_stride_t, key_stride_h, value_stride_t, value_stride_h, slot_stride,
                     HD, D: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t * slot_stride).to(tl.int64)
    if slot < 0:                      # padding token: nothing to write
        return
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)       # flat index in [Hkv * D)
    mask = n < HD
    h = (n // D).to(tl.int64)
    d = n % D
    dst = slot * HD + n
    k = tl.load(key_ptr + t * key_stride_t + h * key_stride_h + d, mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    v = tl.load(value_ptr + t * value_stride_t + h * value_stride_h + d, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


@triton.jit
def _write_kv_fp8_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr,
                         v_scale_ptr, slot_ptr, key_stride_t, key_stride_h, value_stride_t,
                         value_stride_h, slot_stride, HK, k_scale_f, v_scale_f,
                         D: tl.constexpr, BLOCK_H: tl.constexpr, D_PAD: tl.constexpr,
                         PER_SLOT: tl.constexpr):
    """Grid (T, head blocks): BLOCK_H whole [D] rows of key and of value per program (a row's
    amax needs all of it); caches as uint8, scales float32 [num_slots, HK]."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t * slot_stride).to(tl.int64)
    if slot < 0:
        return
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, D_PAD)
    m = (h < HK)[:, None] & (d < D)[None, :]
    h64 = h.to(tl.int64)
    dst = slot * HK * D + h64[:, None] * D + d[None, :]
    srow = slot * HK + h64
    k = tl.load(key_ptr + t * key_stride_t + h64[:, None] * key_stride_h + d[None, :], mask=m,
                other=0.0).to(tl.float32)
    write_rows(k, m, k_cache_ptr + dst, k_scale_ptr + srow, k_scale_f, PER_SLOT)
    v = tl.load(value_ptr + t * value_stride_t + h64[:, None] * value_stride_h + d[None, :],
                mask=m, other=0.0).to(tl.float32)
    write_rows(v, m, v_cache_ptr + dst, v_scale_ptr + srow, v_scale_f, PER_SLOT)


# --------------------------------------------------------------------------- configs
def _config(hd: int) -> tuple[int, int]:
    """(BLOCK, num_warps): a whole token row per program up to 4096 elements (Llama-3-8B's
    8 x 128 = 1024 is one program of 4 warps, 8 fp16 per thread = one 16-byte access)."""
    block = min(triton.next_power_of_2(hd), 4096)
    return block, max(1, min(8, block // 256))


def fp8_config(num_heads: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_H, D_PAD) of the fp8 kernels: whole heads, about 2048 elements per program
    (Llama-3-8B's 8 x 128 = one program per token)."""
    d_pad = triton.next_power_of_2(max(head_dim, 1))
    return min(triton.next_power_of_2(max(num_heads, 1)), max(1, 2048 // d_pad)), d_pad


def split_scales(k_scale, v_scale):
    """(k_scale tensor or None, v_scale tensor or None, k float, v float, per_slot) for the
    kernels: per-slot tensors travel as pointers, per-tensor floats as scalars."""
    if isinstance(k_scale, torch.Tensor):
        return k_scale, v_scale, 1.0, 1.0, True
    return None, None, float(k_scale), float(v_scale), False


# --------------------------------------------------------------------------- launcher
def _launch(key, value, k_cache, v_cache, slot_mapping) -> None:
    T, Hkv, D = key.shape
    if T == 0 or Hkv * D == 0:
        return
    if k_cache.dtype != key.dtype or v_cache.dtype != key.dtype:
        raise ValueError(f"k_cache: dtype {k_cache.dtype} must equal key's {key.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache: caches must be contiguous")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key: last dimension must be contiguous")
    hd = Hkv * D
    block, warps = _config(hd)
    grid = (T, triton.cdiv(hd, block))
    _write_kv_kernel[grid](key, value, k_cache, v_cache, slot_mapping,
                           key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                           slot_mapping.stride(0), hd, D=D, BLOCK=block, num_warps=warps)


def _launch_fp8(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    T, Hkv, D = key.shape
    if T == 0 or Hkv * D == 0:
        return
    if k_cache.dtype != torch.float8_e4m3fn or v_cache.dtype != torch.float8_e4m3fn:
        raise ValueError(f"k_cache: dtype {k_cache.dtype} is not float8_e4m3fn (and v_cache's)")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache: caches must be contiguous")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key: last dimension must be contiguous")
    ks, vs, ksf, vsf, per_slot = split_scales(k_scale, v_scale)
    if per_slot and not (ks.is_contiguous() and vs.is_contiguous()):
        raise ValueError("k_scale: per-slot scales must be contiguous (and v_scale)")
    kc, vc = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    block_h, d_pad = fp8_config(Hkv, D)
    grid = (T, triton.cdiv(Hkv, block_h))
    _write_kv_fp8_kernel[grid](key, value, kc, vc, ks if per_slot else kc,
                               vs if per_slot else vc, slot_mapping, key.stride(0),
                               key.stride(1), value.stride(0), value.stride(1),
                               slot_mapping.stride(0), Hkv, ksf, vsf, D=D, BLOCK_H=block_h,
                               D_PAD=d_pad, PER_SLOT=per_slot, num_warps=4)


# The custom op makes the call opaque to torch.compile (fullgraph) with the cache mutation
# declared; eager calls skip the dispatcher (a few microseconds per layer per step).
@torch.library.custom_op("ragged_triton::write_kv", mutates_args=("k_cache", "v_cache"))
def _write_kv_op(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    _launch(key, value, k_cache, v_cache, slot_mapping)


@_write_kv_op.register_fake
def _(key, value, k_cache, v_cache, slot_mapping) -> None:
    return None


# fp8: per-slot scales are tensors (mutated), per-tensor ones floats; one op covers both.
@torch.library.custom_op("ragged_triton::write_kv_fp8",
                         mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _write_kv_fp8_op(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                     k_scale_f: float, v_scale_f: float) -> None:
    _launch_fp8(key, value, k_cache, v_cache, slot_mapping,
                k_scale if k_scale is not None else k_scale_f,
                v_scale if v_scale is not None else v_scale_f)


@_write_kv_fp8_op.register_fake
def _(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale, k_scale_f, v_scale_f):
    return None


# --------------------------------------------------------------------------- public
def write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """k_cache.view(-1, Hkv, D)[slot_mapping[t]] = key[t] (and v), skipping slots < 0; fp8
    caches get the quantised rows and (per slot) their scales."""
    if k_cache.dtype == torch.float8_e4m3fn:
        if torch.compiler.is_compiling():
            torch.ops.ragged_triton.write_kv_fp8(key, value, k_cache, v_cache, slot_mapping,
                                                 *split_scales(k_scale, v_scale)[:4])
        else:
            _launch_fp8(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    if torch.compiler.is_compiling():
        torch.ops.ragged_triton.write_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        _launch(key, value, k_cache, v_cache, slot_mapping)
