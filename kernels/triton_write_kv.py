"""Triton KV-cache write: scatter this step's key/value rows into the paged caches.

One program copies one tile of one token's [Hkv, D] key and value rows to the cache slot
slot_mapping[t] (slots < 0 are padding and are skipped). key/value may be strided views (a
slice of a fused QKV projection viewed as [T, Hkv, D]): only the last dim must be contiguous,
so a token's row is addressed as t * stride_t + h * stride_h + d. The cache side is
contiguous, so the destination of a token is one run of Hkv * D elements; with D a compile-
time constant and the strides specialised (Triton specialises ints divisible by 16) both
sides compile to 16-byte vector loads/stores for D a multiple of 8. Cache offsets are int64:
slot * Hkv * D overflows int32 past 32768 blocks of 16 x 8 x 128.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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


# --------------------------------------------------------------------------- configs
def _config(hd: int) -> tuple[int, int]:
    """(BLOCK, num_warps): a whole token row per program up to 4096 elements (Llama-3-8B's
    8 x 128 = 1024 is one program of 4 warps, 8 fp16 per thread = one 16-byte access)."""
    block = min(triton.next_power_of_2(hd), 4096)
    return block, max(1, min(8, block // 256))


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


# The custom op makes the call opaque to torch.compile (fullgraph) with the cache mutation
# declared; eager calls skip the dispatcher (a few microseconds per layer per step).
@torch.library.custom_op("ragged_triton::write_kv", mutates_args=("k_cache", "v_cache"))
def _write_kv_op(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    _launch(key, value, k_cache, v_cache, slot_mapping)


@_write_kv_op.register_fake
def _(key, value, k_cache, v_cache, slot_mapping) -> None:
    return None


# --------------------------------------------------------------------------- public
def write_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """k_cache.view(-1, Hkv, D)[slot_mapping[t]] = key[t] (and v), skipping slots < 0."""
    if torch.compiler.is_compiling():
        torch.ops.ragged_triton.write_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        _launch(key, value, k_cache, v_cache, slot_mapping)
