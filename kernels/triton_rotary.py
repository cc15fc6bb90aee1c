"""Triton rotary embedding of q and k at per-token positions, in one launch.

Grid (T, q head blocks + k head blocks): a program loads its token's cos/sin row once and
rotates BLOCK_H heads of q or of k, writing new contiguous [T, H, D] tensors. q and k may be
strided views (slices of a fused QKV output): rows and heads are addressed by their strides.
The first rot_dim features are rotated in float32 (the reference's precision) and rounded
once; features past rot_dim (partial rotary) are copied through. Layouts: NeoX/Llama
rotate-half (pairs (i, i + rot/2)) and GPT-J interleaved (pairs (2i, 2i + 1)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
                      v_stride_h, cs_stride, slot_stride, HQ, HK,
                      D: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr,
                      BLOCK_H: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr,
                      D_PAD: tl.constexpr):
    """Rotary + KV-cache write in one launch. Grid (T, q blocks + k blocks + v blocks): q
    programs write the rotated q ([T, Hq, D], for attention); k programs write the rotated
    k straight into its cache slot (no k_rot tensor round trip); v programs copy v there.
    Slots < 0 (padding) write nothing."""
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
                _rotate_heads(k_ptr, kc_ptr, t * k_stride_t, k_stride_h, row, HK,
                              (hb - nqb) * BLOCK_H, cos, sin, D, HALF, IS_NEOX, BLOCK_H,
                              HALF_PAD, PASS_PAD)
            else:
                h = (hb - nqb - nkb) * BLOCK_H + tl.arange(0, BLOCK_H)
                d = tl.arange(0, D_PAD)
                m = (h < HK)[:, None] & (d < D)[None, :]
                src = v_ptr + t * v_stride_t + h[:, None].to(tl.int64) * v_stride_h + d[None, :]
                dst = vc_ptr + row + h[:, None].to(tl.int64) * D + d[None, :]
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
def _launch_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox: bool):
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
    half = rot // 2
    nkb = triton.cdiv(HK, block_h)
    grid = (T, triton.cdiv(HQ, block_h) + 2 * nkb)
    _rotary_kv_kernel[grid](positions, q, k, v, cos_sin_cache, q_out, k_cache, v_cache,
                            slot_mapping, positions.stride(0), q.stride(0), q.stride(1),
                            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                            cos_sin_cache.stride(0), slot_mapping.stride(0), HQ, HK, D=D,
                            HALF=half, IS_NEOX=is_neox, BLOCK_H=block_h,
                            HALF_PAD=triton.next_power_of_2(half),
                            PASS_PAD=triton.next_power_of_2(max(D - rot, 1)),
                            D_PAD=triton.next_power_of_2(D), num_warps=warps)
    return q_out


@torch.library.custom_op("ragged_triton::rotary_write_kv", mutates_args=("k_cache", "v_cache"))
def _rotary_kv_op(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, is_neox: bool) -> torch.Tensor:
    return _launch_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox)


@_rotary_kv_op.register_fake
def _(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox):
    return q.new_empty(q.shape)


def rotary_write_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                    is_neox: bool):
    """q rotated -> new tensor; k rotated and v written to the caches at slot_mapping."""
    args = (positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox)
    if torch.compiler.is_compiling():
        return torch.ops.ragged_triton.rotary_write_kv(*args)
    return _launch_kv(*args)
