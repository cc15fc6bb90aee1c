"""The per-layer paged KV cache and its storage formats ("auto", "fp8_e4m3").

"auto" keeps the model dtype: one (k_cache, v_cache) pair per layer, each [num_blocks,
block_size, Hkv, D]. "fp8_e4m3" stores float8_e4m3fn pages (half the bytes of bf16) plus
their scales (docs/fp8_kv.md): per slot (default) a float32 [num_blocks, block_size, Hkv]
tensor beside each cache, written by write_kv with each row's amax / 448; or per tensor
(kv_scales=(k_scale, v_scale) floats, as checkpoints provide) with nothing extra stored.

A layer's cache is a KVCache: a 2-tuple, so everything that unpacks ``k, v = cache`` (graphs,
profiling, tests) keeps working, with the scales as attributes (None for "auto").
"""
from __future__ import annotations

import math

import torch

KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
FP8_DTYPE = torch.float8_e4m3fn
SCALE_BYTES = 4                   # one float32 per (slot, KV head): 4 / (D bytes) of the pages


class KVCache(tuple):
    """One layer's (k_cache, v_cache), with .k_scale / .v_scale: per-slot float32 tensors or
    per-tensor floats for an fp8 cache, None otherwise."""

    def __new__(cls, k_cache, v_cache, k_scale=None, v_scale=None):
        self = super().__new__(cls, (k_cache, v_cache))
        self.k_scale, self.v_scale = k_scale, v_scale
        return self

    def nbytes(self) -> int:
        """Device bytes of the pages and of per-slot scales."""
        n = sum(t.numel() * t.element_size() for t in self)
        return n + sum(s.numel() * s.element_size() for s in (self.k_scale, self.v_scale)
                       if isinstance(s, torch.Tensor))


def check_format(kv_cache_dtype, kv_scales) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: {kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}")
    if kv_scales is None:
        return
    if kv_cache_dtype != "fp8_e4m3":
        raise ValueError("kv_scales: per-tensor scales need kv_cache_dtype='fp8_e4m3'")
    ok = isinstance(kv_scales, (tuple, list)) and len(kv_scales) == 2 and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < math.inf
        for s in kv_scales)
    if not ok:
        raise ValueError(f"kv_scales: must be None or (k_scale, v_scale), two positive finite "
                         f"floats, got {kv_scales!r}")


def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, model_dtype,
                    kv_cache_dtype="auto", kv_scales=None) -> int:
    """Bytes of one block in all layers, K and V, scales included."""
    check_format(kv_cache_dtype, kv_scales)
    slots = 2 * num_layers * block_size * num_kv_heads
    if kv_cache_dtype == "auto":
        return slots * head_dim * torch.empty((), dtype=model_dtype).element_size()
    return slots * head_dim + (slots * SCALE_BYTES if kv_scales is None else 0)


def allocate(num_layers, num_blocks, block_size, num_kv_heads, head_dim, *, dtype, device,
             kv_cache_dtype="auto", kv_scales=None) -> list[KVCache]:
    """Per layer a zero-filled KVCache (zeros: kernels that mask a block's tail multiply the
    masked probabilities by whatever the slots hold, and 0 * NaN is NaN; zero fp8 codes with
    unit scales dequantise to 0 too)."""
    check_format(kv_cache_dtype, kv_scales)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    fp8 = kv_cache_dtype == "fp8_e4m3"
    kw = dict(dtype=FP8_DTYPE if fp8 else dtype, device=device)
    out = []
    for _ in range(num_layers):
        k, v = torch.zeros(shape, **kw), torch.zeros(shape, **kw)
        if not fp8:
            out.append(KVCache(k, v))
        elif kv_scales is not None:
            out.append(KVCache(k, v, float(kv_scales[0]), float(kv_scales[1])))
        else:
            ones = dict(dtype=torch.float32, device=device)
            out.append(KVCache(k, v, torch.ones(shape[:3], **ones), torch.ones(shape[:3], **ones)))
    return out
