"""Triton rotary embedding of q and k at per-token positions, in one launch.

Grid (T, q head blocks + k head blocks): a program loads its token's cos/sin row once and
rotates BLOCK_H heads of q or of k, writing new contiguous [T, H, D] tensors. q and k may be
strided views (slices of a fused QKV output): rows and heads are addressed by their strides.
The first rot_dim features are rotated in float32 (the reference's precision) and rounded
once; features past rot_dim (partial rotary) are copied through. Layouts: NeoX/Llama
rotate-half (pairs (i, i + rot/2)) and GPT-J interleaved (pairs (2i, 2i + 1)).

fp8 caches (rotary_write_kv): the rotated k row is rounded to k's dtype (what the unfused
path and the reference store), then quantised with its row scale (kernels/triton_fp8.py)
straight into the uint8 view of the cache; v rows likewise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fp8 import quantize_rows, scale_of, write_rows
from .triton_write_kv import fp8_config, split_scales

# Ops of this module that take fp8 caches (checked by kernels/__init__.py).
FP8_KV_OPS = ("rotary_write_kv",)


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, src_row, src_stride_h, dst_row, n_heads, head0, cos, sin,
                  D: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr,
                  BLOCK_H: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr):
    h = head0 + tl.arange(0, BLOCK_H)
    hmask = h < n_heads
    src = src_ptr + src_row + h[:, None].to(tl.int64) * src_stride_h
    dst = dst_ptr + dst_row + h[:, None].to(tl.int64) * D
    i = tl.arange(0, HALF_PAD)
    m = hmask[:, None] & (i < HALF)[None, :]
    out_ty = dst_ptr.dtype.element_ty
    if IS_NEOX:                       # pairs (i, i + HALF): two contiguous half-rows
        x1 = tl.load(src + i[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + i[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(dst + i[None, :], (x1 * cos - x2 * sin).to(out_ty), mask=m)
        tl.store(dst + HALF + i[None, :], (x2 * cos + x1 * sin).to(out_ty), mask=m)
    else:                             # pairs (2i, 2i + 1): load whole contiguous rows
        r = tl.arange(0, 2 * HALF_PAD)  # (16-byte accesses), split even/odd in registers
        mr = hmask[:, None] & (r < 2 * HALF)[None, :]
        x = tl.load(src + r[None, :], mask=mr, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, HALF_PAD, 2)))
        y = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
        tl.store(dst + r[None, :], tl.reshape(y, (BLOCK_H, 2 * HALF_PAD)).to(out_ty), mask=mr)
    if 2 * HALF < D:                  # partial rotary: the tail passes through unchanged
        p = 2 * HALF + tl.arange(0, PASS_PAD)
        pm = hmask[:, None] & (p < D)[None, :]
        tl.store(dst + p[None, :], tl.load(src + p[None, :], mask=pm), mask=pm)


@triton.jit
def _rotate_heads_fp8(src_ptr, dst_ptr, scale_ptr, scale_f, src_row, src_stride_h, dst_row,
                      scale_row, n_heads, head0, cos, sin, D: tl.constexpr,
                      HALF: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr,
                      HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr, PER_SLOT: tl.constexpr):
    """_rotate_heads into an fp8 cache (dst_ptr uint8): the rotated pieces of each head row,
    rounded to the source dtype, share one scale (the amax over the whole row, tail included)."""
    h = head0 + tl.arange(0, BLOCK_H)
    hmask = h < n_heads
    src = src_ptr + src_row + h[:, None].to(tl.int64) * src_stride_h
    dst = dst_ptr + dst_row + h[:, None].to(tl.int64) * D
    in_ty = src_ptr.dtype.element_ty
    i = tl.arange(0, HALF_PAD)
    m = hmask[:, None] & (i < HALF)[None, :]
    if IS_NEOX:
        x1 = tl.load(src + i[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + i[None, :], mask=m, other=0.0).to(tl.float32)
        y1 = (x1 * cos - x2 * sin).to(in_ty).to(tl.float32)
        y2 = (x2 * cos + x1 * sin).to(in_ty).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(y1), axis=1), tl.max(tl.abs(y2), axis=1))
    else:
        r = tl.arange(0, 2 * HALF_PAD)
        mr = hmask[:, None] & (r < 2 * HALF)[None, :]
        x = tl.load(src + r[None, :], mask=mr, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, HALF_PAD, 2)))
        y = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
        y = tl.reshape(y, (BLOCK_H, 2 * HALF_PAD)).to(in_ty).to(tl.float32)
        amax = tl.max(tl.abs(y), axis=1)
    p = 2 * HALF + tl.arange(0, PASS_PAD)
    pm = hmask[:, None] & (p < D)[None, :]
    tail = tl.load(src + p[None, :], mask=pm, other=0.0).to(tl.float32)
    if 2 * HALF < D:
        amax = tl.maximum(amax, tl.max(tl.abs(tail), axis=1))
    if PER_SLOT:
        scale = scale_of(amax)
        tl.store(scale_ptr + scale_row + h.to(tl.int64), scale, mask=hmask)
    else:
        scale = tl.full([BLOCK_H], scale_f, tl.float32)
    if IS_NEOX:
        tl.store(dst + i[None, :], quantize_rows(y1, scale).to(tl.uint8), mask=m)
        tl.store(dst + HALF + i[None, :], quantize_rows(y2, scale).to(tl.uint8), mask=m)
    else:
        tl.store(dst + r[None, :], quantize_rows(y, scale).to(tl.uint8), mask=mr)
    if 2 * HALF < D:
        tl.store(dst + p[None, :], quantize_rows(tail, scale).to(tl.uint8), mask=pm)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cs_ptr, qo_ptr, ko_ptr, pos_stride,
                   q_stride_t, q_stride_h, k_stride_t, k_stride_h, cs_stride, HQ, HK,
                   D: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr,
                   BLOCK_H: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    pos = tl.load(pos_ptr + t * pos_stride).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    cs = cs_ptr + pos * cs_stride
    cos = tl.load(cs + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    nqb = tl.cdiv(HQ, BLOCK_H)
    if hb < nqb:
        _rotate_heads(q_ptr, qo_ptr, t * q_stride_t, q_stride_h, t * HQ * D, HQ, hb * BLOCK_H,
                      cos, sin, D, HALF, IS_NEOX, BLOCK_H, HALF_PAD, PASS_PAD)
    else:
        _rotate_heads(k_ptr, ko_ptr, t * k_stride_t, k_stride_h, t * HK * D, HK,
                      (hb - nqb) * BLOCK_H, cos, sin, D, HALF, IS_NEOX, BLOCK_H, HALF_PAD,
                      PASS_PAD)


@triton.jit
def _cos_sin(cs_ptr, pos_ptr, t, pos_stride, cs_stride, HALF: tl.constexpr,
             HALF_PAD: tl.constexpr):
    pos = tl.load(pos_ptr + t * pos_stride).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    cs = cs_ptr + pos * cs_stride
    cos = tl.load(cs + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def _rotary_kv_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, cs_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
                      pos_stride, q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t,
                      v_stride_h, cs_stride, slot_stride, HQ, HK, ks_ptr, vs_ptr, k_scale_f,
                      v_scale_f, D: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr,
                      BLOCK_H: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr,
                      D_PAD: tl.constexpr, KV_FP8: tl.constexpr = False,
                      PER_SLOT: tl.constexpr = False):
    """Rotary + KV-cache write in one launch. Grid (T, q blocks + k blocks + v blocks): q
    programs write the rotated q ([T, Hq, D], for attention); k programs write the rotated
    k straight into its cache slot (no k_rot tensor round trip); v programs copy v there.
    Slots < 0 (padding) write nothing. KV_FP8: the caches are uint8 views of e4m3 pages,
    written quantised (scales at ks_ptr/vs_ptr + slot * HK + h when PER_SLOT)."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    nqb = tl.cdiv(HQ, BLOCK_H)
    nkb = tl.cdiv(HK, BLOCK_H)
    if hb < nqb:
        cos, sin = _cos_sin(cs_ptr, pos_ptr, t, pos_stride, cs_stride, HALF, HALF_PAD)
        _rotate_heads(q_ptr, qo_ptr, t * q_stride_t, q_stride_h, t * HQ * D, HQ, hb * BLOCK_H,
                      cos, sin, D, HALF, IS_NEOX, BLOCK_H, HALF_PAD, PASS_PAD)
    else:
        slot = tl.load(slot_ptr + t * slot_stride).to(tl.int64)
        if slot >= 0:
            row = slot * HK * D           # int64: slot * Hkv * D overflows int32 in big caches
            if hb < nqb + nkb:
                cos, sin = _cos_sin(cs_ptr, pos_ptr, t, pos_stride, cs_stride, HALF, HALF_PAD)
                if KV_FP8:
                    _rotate_heads_fp8(k_ptr, kc_ptr, ks_ptr, k_scale_f, t * k_stride_t,
                                      k_stride_h, row, slot * HK, HK, (hb - nqb) * BLOCK_H,
                                      cos, sin, D, HALF, IS_NEOX, BLOCK_H, HALF_PAD, PASS_PAD,
                                      PER_SLOT)
                else:
                    _rotate_heads(k_ptr, kc_ptr, t * k_stride_t, k_stride_h, row, HK,
                                  (hb - nqb) * BLOCK_H, cos, sin, D, HALF, IS_NEOX, BLOCK_H,
                                  HALF_PAD, PASS_PAD)
            else:
                h = (hb - nqb - nkb) * BLOCK_H + tl.arange(0, BLOCK_H)
                d = tl.arange(0, D_PAD)
                m = (h < HK)[:, None] & (d < D)[None, :]
                src = v_ptr + t * v_stride_t + h[:, None].to(tl.int64) * v_stride_h + d[None, :]
                dst = vc_ptr + row + h[:, None].to(tl.int64) * D + d[None, :]
                if KV_FP8:
                    v = tl.load(src, mask=m, other=0.0).to(tl.float32)
                    write_rows(v, m, dst, vs_ptr + slot * HK + h.to(tl.int64), v_scale_f,
                               PER_SLOT)
                else:
                    tl.store(dst, tl.load(src, mask=m), mask=m)


# --------------------------------------------------------------------------- configs
def _config(num_heads: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps): about 2048 elements per program (Llama-3-8B: 16 heads of 128,
    so q is 2 programs and k 1 per token)."""
    block_h = min(triton.next_power_of_2(max(num_heads, 1)),
                  max(1, 2048 // triton.next_power_of_2(head_dim)))
    return block_h, 4


# --------------------------------------------------------------------------- launcher
def _launch(positions, q, k, cos_sin_cache, is_neox: bool):
    T, HQ, D = q.shape
    HK = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T == 0 or D == 0 or HQ + HK == 0:
        return q_out, k_out
    rot = cos_sin_cache.shape[1]
    if rot % 2 or rot > D:
        raise ValueError(f"cos_sin_cache: rotary dim {rot} must be even and at most {D}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q: last dimension must be contiguous (and k's, cos_sin_cache's)")
    block_h, warps = _config(max(HQ, HK), D)
    half = rot // 2
    grid = (T, triton.cdiv(HQ, block_h) + triton.cdiv(HK, block_h))
    _rotary_kernel[grid](positions, q, k, cos_sin_cache, q_out, k_out, positions.stride(0),
                         q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         cos_sin_cache.stride(0), HQ, HK, D=D, HALF=half, IS_NEOX=is_neox,
                         BLOCK_H=block_h, HALF_PAD=triton.next_power_of_2(half),
                         PASS_PAD=triton.next_power_of_2(max(D - rot, 1)), num_warps=warps)
    return q_out, k_out


# Opaque to torch.compile (fullgraph); eager calls bypass the dispatcher.
@torch.library.custom_op("ragged_triton::rotary_embedding", mutates_args=())
def _rotary_op(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(positions, q, k, cos_sin_cache, is_neox)


@_rotary_op.register_fake
def _(positions, q, k, cos_sin_cache, is_neox):
    return q.new_empty(q.shape), k.new_empty(k.shape)


# --------------------------------------------------------------------------- public
def rotary_embedding(positions, q, k, cos_sin_cache, is_neox: bool):
    """(q, k) rotated by cos_sin_cache[positions] -> new tensors (q_rot, k_rot)."""
    if torch.compiler.is_compiling():
        return torch.ops.ragged_triton.rotary_embedding(positions, q, k, cos_sin_cache, is_neox)
    return _launch(positions, q, k, cos_sin_cache, is_neox)


# --------------------------------------------------------------------------- fused with write_kv
def _launch_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox: bool,
               k_scale=None, v_scale=None):
    T, HQ, D = q.shape
    HK = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if T == 0 or D == 0:
        return q_out
    rot = cos_sin_cache.shape[1]
    if rot % 2 or rot > D:
        raise ValueError(f"cos_sin_cache: rotary dim {rot} must be even and at most {D}")
    if any(x.stride(-1) != 1 for x in (q, k, v, cos_sin_cache)):
        raise ValueError("q: last dimension must be contiguous (and k's, v's, cos_sin_cache's)")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache: caches must be contiguous")
    block_h, warps = _config(max(HQ, HK), D)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    ks, vs, ksf, vsf, per_slot = split_scales(k_scale, v_scale) if fp8 else (
        None, None, 1.0, 1.0, False)
    if fp8:
        if v_cache.dtype != k_cache.dtype:
            raise ValueError(f"v_cache: dtype {v_cache.dtype} differs from k_cache's fp8")
        # the k programs hold whole rows in fp8 mode (amax): the fp8 write config bounds
        # them to about 2048 elements, as the q programs are
        block_h = min(block_h, fp8_config(HK, D)[0])
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    half = rot // 2
    nkb = triton.cdiv(HK, block_h)
    grid = (T, triton.cdiv(HQ, block_h) + 2 * nkb)
    _rotary_kv_kernel[grid](positions, q, k, v, cos_sin_cache, q_out, k_cache, v_cache,
                            slot_mapping, positions.stride(0), q.stride(0), q.stride(1),
                            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                            cos_sin_cache.stride(0), slot_mapping.stride(0), HQ, HK,
                            ks if per_slot else k_cache, vs if per_slot else v_cache, ksf, vsf,
                            D=D, HALF=half, IS_NEOX=is_neox, BLOCK_H=block_h,
                            HALF_PAD=triton.next_power_of_2(half),
                            PASS_PAD=triton.next_power_of_2(max(D - rot, 1)),
                            D_PAD=triton.next_power_of_2(D), KV_FP8=fp8, PER_SLOT=per_slot,
                            num_warps=warps)
    return q_out


@torch.library.custom_op("ragged_triton::rotary_write_kv", mutates_args=("k_cache", "v_cache"))
def _rotary_kv_op(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, is_neox: bool) -> torch.Tensor:
    return _launch_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox)


@_rotary_kv_op.register_fake
def _(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox):
    return q.new_empty(q.shape)


@torch.library.custom_op("ragged_triton::rotary_write_kv_fp8",
                         mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _rotary_kv_fp8_op(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor, is_neox: bool,
                      k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                      k_scale_f: float, v_scale_f: float) -> torch.Tensor:
    return _launch_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                      is_neox, k_scale if k_scale is not None else k_scale_f,
                      v_scale if v_scale is not None else v_scale_f)


@_rotary_kv_fp8_op.register_fake
def _(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox, k_scale,
      v_scale, k_scale_f, v_scale_f):
    return q.new_empty(q.shape)


def rotary_write_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                    is_neox: bool, k_scale=None, v_scale=None):
    """q rotated -> new tensor; k rotated and v written to the caches at slot_mapping (fp8
    caches: quantised, with per-slot scales or per-tensor floats k_scale/v_scale)."""
    args = (positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox)
    if k_cache.dtype == torch.float8_e4m3fn:
        if torch.compiler.is_compiling():
            return torch.ops.ragged_triton.rotary_write_kv_fp8(
                *args, *split_scales(k_scale, v_scale)[:4])
        return _launch_kv(*args, k_scale, v_scale)
    if torch.compiler.is_compiling():
        return torch.ops.ragged_triton.rotary_write_kv(*args)
    return _launch_kv(*args)
