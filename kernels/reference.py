"""Plain-PyTorch references: the ground truth of every kernel test.

Written for clarity, not speed (Python loops over sequences are fine here). Every function
computes in the dtype of its inputs unless ``upcast=True``: call it on float64 inputs for the
ground truth, and on the kernel's low-precision inputs to measure PyTorch's own rounding
error, which sets the test tolerance (flash-attention's rule; see tests/tolerance.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- attention
def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Logical [kv_len, H, D] view of one sequence's keys (or values) in a paged cache; also
    gathers a per-slot scale cache [num_blocks, block_size, H] into [kv_len, H]."""
    block_size = cache.shape[1]
    num_blocks = -(-kv_len // block_size)
    blocks = block_table_row[:num_blocks].long()
    return cache[blocks].flatten(0, 1)[:kv_len]


# --------------------------------------------------------------------------- fp8 KV cache
# Ops of this backend that take fp8 caches (kernels/__init__.py checks this list).
FP8_KV_OPS = ("paged_attention", "write_kv", "rotary_write_kv")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0      # largest finite e4m3fn value; torch maps |x| > 464 to NaN, so clamp first


def is_fp8(cache) -> bool:
    return isinstance(cache, torch.Tensor) and cache.dtype == FP8_DTYPE


def quantize_fp8(x: torch.Tensor, scale=None):
    """x [N, H, D] -> (codes float8_e4m3fn [N, H, D], scale float32 [N, H]) by the one rule
    every backend follows (docs/fp8_kv.md):
        x32 = x.float()
        per-slot (scale None): amax = max_d |x32|, scale = amax / 448 if amax > 0 else 1
        per-tensor (scale a float): that scale for every row
        code = clamp(x32 / scale, -448, 448) rounded to nearest-even e4m3
    """
    x32 = x.float()
    if scale is None:
        amax = x32.abs().amax(dim=-1) if x32.shape[-1] else x32.new_zeros(x32.shape[:-1])
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    else:
        s = torch.full(x32.shape[:-1], float(scale), dtype=torch.float32, device=x.device)
    codes = (x32 / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, s


def dequantize_fp8(codes: torch.Tensor, scale, dtype=torch.float32) -> torch.Tensor:
    """codes [..., D] float8_e4m3fn times scale ([...] tensor or a float) -> ``dtype``.
    Formed in float64 for a float64 result (the ground truth), else in float32 and rounded."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = scale.to(acc)[..., None] if isinstance(scale, torch.Tensor) else float(scale)
    return (codes.to(acc) * s).to(dtype)


def attention_mask(q_len: int, kv_len: int, sliding_window: int | None,
                   device=None) -> torch.Tensor:
    """Bool [q_len, kv_len]: True where query i (at position ctx + i) may attend key j.

    Bottom-right causal: ctx = kv_len - q_len, key j visible iff j <= ctx + i, and, with a
    window W, also j > ctx + i - W.
    """
    ctx = kv_len - q_len
    qpos = torch.arange(q_len, device=device)[:, None] + ctx
    kpos = torch.arange(kv_len, device=device)[None, :]
    mask = kpos <= qpos
    if sliding_window is not None:
        mask &= kpos > qpos - sliding_window
    return mask


def paged_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *, scale=None,
                    sliding_window=None, softcap=None, upcast=False, k_scale=None, v_scale=None,
                    **_ignored):
    """Attention of each sequence's new tokens over its paged KV history.

    q [T, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_table int32
    [B, max_blocks]; cu_seqlens_q int32 [B+1]; seq_lens int32 [B]. Query head h reads KV head
    h // (Hq // Hkv) (GQA). Returns [T, Hq, D] in q's dtype; rows that see no key are zero.
    Low precision (upcast=False): QK^T and PV in the input dtype, softmax in float32, as
    flash-attention's reference does.
    fp8 caches (float8_e4m3fn) need k_scale/v_scale: float32 [num_blocks, block_size, Hkv]
    (per slot) or floats (per tensor); the gathered pages are dequantised (codes x scale) to
    the compute dtype before the usual attention (float64 for float64 q: the ground truth).
    """
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdt = torch.float32 if upcast and q.dtype != torch.float64 else q.dtype
    out = torch.zeros(T, Hq, D, dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    for b, kv_len in enumerate(seq_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        q_len = end - start
        if q_len == 0 or kv_len == 0:
            continue
        qb = q[start:end].to(cdt).transpose(0, 1)                                # [Hq, q, D]
        kb = _gather_dequant(k_cache, k_scale, block_table[b], kv_len, cdt)
        vb = _gather_dequant(v_cache, v_scale, block_table[b], kv_len, cdt)
        kb = kb.repeat_interleave(group, dim=1).transpose(0, 1)                  # [Hq, k, D]
        vb = vb.repeat_interleave(group, dim=1).transpose(0, 1)
        s = (qb @ kb.transpose(1, 2)) * scale                                     # [Hq, q, k]
        sm_dt = torch.float64 if cdt == torch.float64 else torch.float32
        s = s.to(sm_dt)
        if softcap is not None and softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        mask = attention_mask(q_len, kv_len, sliding_window, q.device)
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(cdt)
        out[start:end] = (p @ vb).transpose(0, 1).to(q.dtype)
    return out


def _gather_dequant(cache, scale, block_table_row, kv_len, dtype):
    x = gather_kv(cache, block_table_row, kv_len)
    if not is_fp8(cache):
        return x.to(dtype)
    s = gather_kv(scale, block_table_row, kv_len) if isinstance(scale, torch.Tensor) else scale
    return dequantize_fp8(x, s, dtype)


def _write_one(x, cache, scale, keep, slots):
    flat = cache.view(-1, *cache.shape[2:])
    if not is_fp8(cache):
        flat[slots] = x[keep].to(cache.dtype)
        return
    per_slot = isinstance(scale, torch.Tensor)
    codes, s = quantize_fp8(x[keep], None if per_slot else scale)
    flat[slots] = codes
    if per_slot:
        scale.view(-1, cache.shape[2])[slots] = s


def write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """k_cache.view(-1, Hkv, D)[slot] = key[t] for every t with slot_mapping[t] >= 0 (in place).

    fp8 caches store quantize_fp8(key[t]) instead; with per-slot scales (float32 tensors
    [num_blocks, block_size, Hkv]) the row's scale goes to k_scale.view(-1, Hkv)[slot], with
    a per-tensor scale (a float) only the codes are written. Skipped slots touch neither.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    _write_one(key, k_cache, k_scale, keep, slots)
    _write_one(value, v_cache, v_scale, keep, slots)


# ------------------------------------------------------------- selective-batching ops
def rms_norm(x, weight, eps=1e-6, residual=None, upcast=False):
    """Llama RMSNorm over the last dim, with an optional fused residual add.

    Without residual returns y. With residual returns (y, x + residual): the sum is what
    the next layer's residual stream carries. Like Hugging Face: the sum in the input dtype,
    the normalisation in float32, cast back, then multiplied by the weight.
    """
    if residual is not None:
        x = x + residual
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(acc)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = (weight.to(acc) * h) if upcast else weight * h.to(x.dtype)
    y = y.to(x.dtype)
    return y if residual is None else (y, x)


def rope_inv_freq(rot_dim: int, base: float = 10000.0, scaling: dict | None = None,
                  dtype=torch.float32) -> torch.Tensor:
    """Inverse frequencies [rot_dim / 2], with optional Llama-3 ("llama3") or "linear" scaling."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).to(dtype) / rot_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin_cache(rot_dim: int, max_position: int, base: float = 10000.0,
                       scaling: dict | None = None, dtype=torch.float32) -> torch.Tensor:
    """[max_position, rot_dim]: cos of each (position, frequency) in the first half, sin in the second."""
    inv_freq = rope_inv_freq(rot_dim, base, scaling, dtype)
    freqs = torch.outer(torch.arange(max_position, dtype=dtype), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _rotate(x, cos, sin, is_neox):
    rot = cos.shape[-1] * 2
    xr, xp = x[..., :rot], x[..., rot:]
    if is_neox:      # Llama / NeoX: rotate the first half against the second half
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:            # GPT-J: rotate interleaved pairs (0,1), (2,3), ...
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, xp], dim=-1)


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox=True, upcast=False):
    """Rotate q [T, Hq, D] and k [T, Hk, D] by their token's position; returns (q_rot, k_rot).

    cos_sin_cache [max_pos, rot_dim] (rope_cos_sin_cache); the first rot_dim features of each
    head are rotated, the rest pass through. Computed in float32 (float64 for float64 input).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    cs = cos_sin_cache[positions.long()].to(acc)
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    return (_rotate(q.to(acc), cos, sin, is_neox).to(q.dtype),
            _rotate(k.to(acc), cos, sin, is_neox).to(k.dtype))


def rotary_write_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                    is_neox=True, k_scale=None, v_scale=None):
    """rotary_embedding then write_kv of the rotated k (and v); returns the rotated q.
    For fp8 caches the rotated k is quantised as rotary_embedding returns it (rounded to k's
    dtype), so the fused kernels and the unfused two-op path store the same codes."""
    q_rot, k_rot = rotary_embedding(positions, q, k, cos_sin_cache, is_neox)
    write_kv(k_rot, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q_rot


def silu_and_mul(x, upcast=False):
    """x [..., 2 I] -> silu(x[..., :I]) * x[..., I:]  (gate then up, the fused MLP layout)."""
    d = x.shape[-1] // 2
    if upcast and x.dtype != torch.float64:
        return (F.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype)
    return F.silu(x[..., :d]) * x[..., d:]
