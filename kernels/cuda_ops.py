"""The "cuda" backend: thin wrappers over torch.ops.ragged.* (csrc/, built as kernels._C).

The ops write their outputs in place (``Tensor(a!)`` schemas); the wrappers here allocate the
outputs and pick the host-side launch parameters (split-KV count). Arguments were already
checked by kernels._checks; the C++ side re-checks what the kernels rely on.

Importing this module never touches the device: it loads the extension (guarded: a missing
build leaves the module importable) and ``is_available()`` only says whether it loaded and a
CUDA device exists.
"""
from __future__ import annotations

import torch

MAX_KV_SPLITS = 128                  # = kMaxSplits in paged_attention.cu (the merge's bound)
_SPLIT_MIN_KEYS = 128                # keep in step with kSplitMinKeys in paged_attention.cu
_WORKSPACE_BYTES = 256 << 20         # cap of the fp32 split-KV partials [S, T, Hq, D]


def _load() -> bool:
    try:
        import kernels._C  # noqa: F401
    except (ImportError, OSError):
        return False
    _register_fakes()
    return True


def _register_fakes():
    """Fake (meta) implementations: the ops only mutate their outputs, so they return None."""
    def fake(name):
        return torch.library.register_fake(f"ragged::{name}")

    @fake("paged_attention")
    def _(out, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, scale, max_seqlen_q,
          max_seqlen_k, sliding_window, softcap, num_kv_splits, k_scale=None, v_scale=None,
          k_scale_f=1.0, v_scale_f=1.0):
        return None

    @fake("write_kv")
    def _(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None,
          k_scale_f=1.0, v_scale_f=1.0):
        return None

    @fake("rms_norm")
    def _(out, x, weight, eps):
        return None

    @fake("fused_add_rms_norm")
    def _(out, residual_out, x, residual, weight, eps):
        return None

    @fake("rotary_embedding")
    def _(query_out, key_out, positions, query, key, cos_sin_cache, is_neox):
        return None

    @fake("silu_and_mul")
    def _(out, x):
        return None


# Loaded once at import (loading a shared library touches no device). A plain module constant,
# not an lru_cache: torch.compile traces through lru_cache wrappers into the loader, whose
# register_fake calls it cannot trace (fullgraph=True then fails).
_LOADED = _load()


def extension_loaded() -> bool:
    """True when kernels._C imported (its ops are registered in torch.ops.ragged)."""
    return _LOADED


def is_available() -> bool:
    """True when the extension is built and a CUDA device exists (no device is touched)."""
    return _LOADED and torch.cuda.is_available()


def _ops():
    if not _LOADED:
        raise RuntimeError("kernels._C is not built (pip install -e . --no-build-isolation "
                           "with a CUDA toolkit and a CUDA build of torch)")
    return torch.ops.ragged


_SM_COUNT: dict[int, int] = {}  # device index -> SMs (a dict, traceable, unlike lru_cache)
_SM_ARCH: dict[int, tuple] = {}  # device index -> ((major, minor), shared memory bytes per SM)


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(index)
    if n is None:
        n = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return n


def _sm_arch(device: torch.device) -> tuple:
    index = device.index if device.index is not None else torch.cuda.current_device()
    a = _SM_ARCH.get(index)
    if a is None:
        pr = torch.cuda.get_device_properties(index)
        cap = (pr.major, pr.minor)
        smem = getattr(pr, "shared_memory_per_multiprocessor", 0) or (
            228 if cap >= (9, 0) else 164 if cap == (8, 0) else 100) * 1024
        a = _SM_ARCH[index] = (cap, smem)
    return a


def _ctas_per_sm(cap: tuple, smem_sm: int, d: int, elem: int, fp8: bool, rows: int) -> int:
    """Resident attention CTAs per SM of the instantiation a launch runs: min of its register
    budget (paged_attention.cu MinBlocks, which this mirrors) and of its shared memory (LeanCfg
    / AttnCfg sizes + 1 KB reserved per CTA). rows = max_seqlen_q x G (16-bit caches: no
    tensor-core row at <= 4, D 64 / 128 then run their lean-only kernels; 16-bit rows > 64:
    the Q-in-registers tile, at D 128 with 64-key tiles). fp8 caches at D 64 / 128 on sm_90
    always launch the kernel with the tensor-core tile (kFp8WgmmaRows = 0: every fp8 row takes
    the wgmma tile); elsewhere fp8 D 128 runs its lean-only kernel up to 16 rows."""
    vec = 16 // elem
    strided = elem == 2 and d in (80, 96)
    nc = 16 if strided else d // vec
    lean = strided or (d in (64, 128, 256) and nc in (8, 16, 32))
    if lean:
        ng = 128 // nc
        nk = 4 * ng if strided else 16384 // (2 * d * elem)
        smem = 3 * 2 * nk * (d + vec if strided else d) * elem + ng * 80
        tc = not strided and elem == 2 and d <= 128 and (
            (cap >= (9, 0) or rows > 16 or d != 128) if fp8 else rows > 4)
        if fp8:
            kp8 = d + 16 if strided and d % 32 == 0 else d
            s8 = 3 * (2 * nk * kp8 + 8 * nk) + ng * 80
            smem = smem if tc and smem > s8 else s8
        # 16-bit D 80 / 96 with tensor-core rows: the tensor-core tiles in D 128's padded
        # layout (attention_wgmma.cuh WgmmaCfg: 50176 B, the launch's max with the lean tile)
        strided_tc = strided and not fp8 and rows > 4
        if strided_tc:
            smem = max(smem, 50176)
        if cap >= (9, 0):
            # sm_90a: fp8's wgmma tile (Q in registers, the code ring; D 64 / 128: 3); 16-bit
            # past 64 rows holds Q in registers too (wgmma RS), at D 128 with 64-key tiles
            # (254 registers, 81 KB: 2), except D 80 / 96 whose Q-in-registers tile fits 128
            # registers (no spills): 4
            qr = tc and not fp8 and rows > 64
            regs = 2 if qr and d == 128 else 3 if qr or (tc and fp8) else 4
        else:
            regs = 4 if strided and not strided_tc else 3
    else:                        # the generic tile (AttnCfg); 4 = its register floor
        nk = 32 if d * elem <= 256 else 16
        base = 4 * (16 * d + 16 * nk + 64)
        smem = base + (4 * nk * (d + 16) + 16 * nk if fp8 else 4 * nk * (d + vec) * elem)
        regs = 4
    return max(1, min(regs, smem_sm // (smem + 1024)))


def _used_splits(s: int, kv_len: int) -> int:
    """Splits a sequence of kv_len visible keys uses under a host bound s: paged_attention.cu
    plan_splits (chunk = ceil(kv / s) keys, at least kSplitMinKeys, rounded up to
    kSplitAlign = 64), so the grid can be sized to the CTAs that do work."""
    chunk = max(-(-kv_len // s), _SPLIT_MIN_KEYS)
    chunk = -(-chunk // 64) * 64
    return max(1, -(-kv_len // chunk))


_WAVE_SPLITS: dict[tuple, int] = {}  # one search per step: every layer asks the same (a dict,
                                     # traceable, unlike lru_cache: see _SM_COUNT)


def _wave_splits(ctas: int, wave: int, cap: int, kv_len: int) -> int:
    """The split count s <= cap, of those the kernel uses as given (_used_splits(s) == s),
    with the least predicted time: ceil(ctas s / wave) waves of resident CTAs, each CTA
    streaming ceil(kv / s) keys plus a fixed cost of kSplitMinKeys keys (its prologue,
    pipeline fill, fp32 partial and merge), ties to the smaller s. Rounding wave / ctas up
    made a second, mostly empty wave: decode B=32 x 8k on H100 (256 CTAs, 528 resident)
    took 3 splits, 768 CTAs, predicted 73% of HBM; 2 (512 CTAs, one wave) predict 97%."""
    key = (ctas, wave, cap, kv_len)
    best = _WAVE_SPLITS.get(key)
    if best is not None:
        return best

    def cost(s):
        return -(-ctas * s // wave) * (-(-kv_len // s) + _SPLIT_MIN_KEYS)
    best = 1
    for s in range(2, cap + 1):
        if cost(s) < cost(best) and _used_splits(s, kv_len) == s:
            best = s
    if len(_WAVE_SPLITS) > 4096:
        _WAVE_SPLITS.clear()
    _WAVE_SPLITS[key] = best
    return best


def default_num_kv_splits(q, k_cache, num_seqs: int, max_seqlen_q: int, max_seqlen_k: int) -> int:
    """Host-side upper bound of the split-KV factor; each sequence picks its own count on the
    device from its length (so short sequences in a mixed batch are not split). Aim: whole
    waves of resident CTAs (SMs x the launch's CTAs/SM, _ctas_per_sm; _wave_splits); no
    split below _SPLIT_MIN_KEYS keys; the fp32 workspace stays capped."""
    if max_seqlen_k <= _SPLIT_MIN_KEYS:
        return 1
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    # row tiles of 16 (token, head) rows: the fewer of the kernel's two layouts (uniform
    # B x tiles of the longest query, or searched T G / 16 + B; paged_attention.cu)
    row_tiles = min(num_seqs * -(-max_seqlen_q * G // 16), T * G // 16 + num_seqs)
    ctas = max(1, Hkv * row_tiles)
    sms = _sm_count(q.device)
    cap, smem_sm = _sm_arch(q.device)
    per_sm = _ctas_per_sm(cap, smem_sm, D, q.element_size(),
                          k_cache.dtype == torch.float8_e4m3fn, max_seqlen_q * G)
    limit = min(MAX_KV_SPLITS, -(-max_seqlen_k // _SPLIT_MIN_KEYS),
                max(1, _WORKSPACE_BYTES // max(1, T * Hq * D * 4)))
    return _wave_splits(ctas, per_sm * sms, limit, max_seqlen_k)


def paged_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *, scale,
                    max_seqlen_q, max_seqlen_k, sliding_window, softcap, out, num_kv_splits,
                    k_scale=None, v_scale=None):
    # fp8 caches (float8_e4m3fn; k_scale/v_scale given by the dispatcher, kernels/_checks):
    # per-slot float32 tensors or per-tensor floats; the kernel dequantises in its tile.
    d = q.shape[-1]
    if d % 8 != 0 or not 0 < d <= 256:
        raise ValueError(f"q: head dim {d} not supported by the cuda backend (a multiple of 8 "
                         "up to 256)")
    if num_kv_splits is not None and num_kv_splits > MAX_KV_SPLITS:
        raise ValueError(f"num_kv_splits: {num_kv_splits} exceeds the cuda backend's "
                         f"{MAX_KV_SPLITS} (the split merge's bound)")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(q, k_cache, seq_lens.shape[0], max_seqlen_q,
                                              max_seqlen_k)
    args = (out, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, float(scale),
            int(max_seqlen_q), int(max_seqlen_k), int(sliding_window or 0),
            float(softcap or 0.0), int(num_kv_splits))
    if k_cache.dtype != torch.float8_e4m3fn:
        _ops().paged_attention(*args)
    elif isinstance(k_scale, torch.Tensor):     # per slot
        _ops().paged_attention(*args, k_scale, v_scale)
    else:                                       # per tensor: floats
        _ops().paged_attention(*args, None, None, float(k_scale), float(v_scale))
    return out


# Ops of this backend that take fp8 (float8_e4m3fn) caches (kernels/__init__.py checks it).
FP8_KV_OPS = ("write_kv", "rotary_write_kv", "paged_attention")


def write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    if k_cache.dtype != torch.float8_e4m3fn:
        _ops().write_kv(key, value, k_cache, v_cache, slot_mapping)
        return
    if key.shape[-1] > 256:
        raise ValueError(f"key: head dim {key.shape[-1]} not supported by the cuda backend's "
                         "fp8 write (up to 256)")
    if isinstance(k_scale, torch.Tensor):       # per slot: the kernel writes the scales
        _ops().write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:                                       # per tensor: floats
        _ops().write_kv(key, value, k_cache, v_cache, slot_mapping, None, None,
                        float(k_scale), float(v_scale))


def rms_norm(x, weight, eps, residual):
    # The kernel takes the weight in x's dtype or in float32 (the product is then formed in
    # float32, as PyTorch's type promotion does for mixed dtypes).
    if weight.dtype != x.dtype:
        weight = weight.float()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual is None:
        _ops().rms_norm(out, x, weight, float(eps))
        return out
    residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _ops().fused_add_rms_norm(out, residual_out, x, residual, weight, float(eps))
    return out, residual_out


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox):
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    # int32 positions and a float64 cache are accepted by the API; the kernel reads int64
    # and float32 (the reference computes in float32 for these dtypes too).
    _ops().rotary_embedding(q_out, k_out, positions.to(torch.int64), q, k,
                            cos_sin_cache.to(torch.float32), bool(is_neox))
    return q_out, k_out


def rotary_write_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, is_neox,
                    k_scale=None, v_scale=None):
    # Not fused on this backend yet: the two kernels, with the rotated k in between (for fp8
    # caches that k, rounded to k's dtype, is what the reference quantises too).
    q_rot, k_rot = rotary_embedding(positions, q, k, cos_sin_cache, is_neox)
    write_kv(k_rot, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q_rot


def silu_and_mul(x):
    out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
    _ops().silu_and_mul(out, x)
    return out
