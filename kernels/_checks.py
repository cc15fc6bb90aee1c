"""Argument checks shared by every backend: bad arguments raise ValueError naming the argument.

Only host-side properties (shape, dtype, device, strides) are checked: nothing here reads a
device tensor, so the checks never synchronise and never break CUDA-graph capture.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# float64 is accepted by the torch reference only (it is how tests build the ground truth).
REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)
MAX_HEAD_DIM = 256
MAX_BLOCK_SIZE = 256
FP8_DTYPE = torch.float8_e4m3fn


def _fail(name: str, msg: str):
    raise ValueError(f"{name}: {msg}")


def tensor(name, t, *, ndim=None, dtypes=None, device=None, last_contiguous=False,
           contiguous=False):
    if not isinstance(t, torch.Tensor):
        _fail(name, f"expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        _fail(name, f"expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(name, f"dtype {t.dtype} not supported (expected one of "
                    f"{', '.join(str(d) for d in dtypes)})")
    if device is not None and t.device != device:
        _fail(name, f"is on {t.device}, expected {device} (same device as the first input)")
    if contiguous and not t.is_contiguous():
        _fail(name, "must be contiguous")
    if last_contiguous and t.numel() > 0 and t.stride(-1) != 1:
        _fail(name, f"last dimension must be contiguous (stride(-1) == 1), got strides {t.stride()}")


def same_dtype(name, t, ref_name, ref):
    if t.dtype != ref.dtype:
        _fail(name, f"dtype {t.dtype} differs from {ref_name}'s {ref.dtype}")


def value_dtypes(backend):
    return REFERENCE_DTYPES if backend == "torch" else FLOAT_DTYPES


def kv_caches(k_cache, v_cache, ref_name, ref, dev, dts):
    """The two caches: 4-d, contiguous, on ``dev``, in ref's dtype or both float8_e4m3fn.
    Returns True for an fp8 cache."""
    fp8 = isinstance(k_cache, torch.Tensor) and k_cache.dtype == FP8_DTYPE
    cdts = (FP8_DTYPE,) if fp8 else dts
    tensor("k_cache", k_cache, ndim=4, dtypes=cdts, device=dev, contiguous=True)
    tensor("v_cache", v_cache, ndim=4, dtypes=cdts, device=dev, contiguous=True)
    if not fp8:
        same_dtype("k_cache", k_cache, ref_name, ref)
        same_dtype("v_cache", v_cache, ref_name, ref)
    if v_cache.shape != k_cache.shape:
        _fail("v_cache", f"shape {tuple(v_cache.shape)} differs from k_cache's {tuple(k_cache.shape)}")
    return fp8


def kv_scales(fp8, k_cache, k_scale, v_scale):
    """fp8 caches need both scales, in the same mode: float32 contiguous tensors shaped
    [num_blocks, block_size, Hkv] on the cache's device (per slot) or positive finite floats
    (per tensor). Other caches take none."""
    if not fp8:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is not None:
                _fail(name, f"only fp8 (float8_e4m3fn) caches take scales; k_cache is "
                            f"{k_cache.dtype}: pass None")
        return
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            _fail(name, "required for a float8_e4m3fn cache (a float32 tensor [num_blocks, "
                        "block_size, Hkv] or a positive float)")
        if isinstance(s, torch.Tensor):
            tensor(name, s, ndim=3, dtypes=(torch.float32,), device=k_cache.device,
                   contiguous=True)
            if tuple(s.shape) != tuple(k_cache.shape[:3]):
                _fail(name, f"shape {tuple(s.shape)} differs from k_cache's [num_blocks, "
                            f"block_size, Hkv] {tuple(k_cache.shape[:3])}")
        elif isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < float("inf"):
            _fail(name, f"must be a float32 tensor or a positive finite float, got {s!r}")
    if isinstance(k_scale, torch.Tensor) != isinstance(v_scale, torch.Tensor):
        _fail("v_scale", "must be in k_scale's mode (both per-slot tensors or both floats)")


def attention_args(backend, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *,
                   scale, max_seqlen_q, max_seqlen_k, sliding_window, softcap, out,
                   num_kv_splits, k_scale=None, v_scale=None):
    dts = value_dtypes(backend)
    tensor("q", q, ndim=3, dtypes=dts, last_contiguous=True)
    dev = q.device
    fp8 = kv_caches(k_cache, v_cache, "q", q, dev, dts)
    kv_scales(fp8, k_cache, k_scale, v_scale)
    T, Hq, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    if Dk != D:
        _fail("k_cache", f"head dim {Dk} differs from q's {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        _fail("q", f"{Hq} query heads is not a multiple of k_cache's {Hkv} KV heads")
    if backend != "torch":
        if D > MAX_HEAD_DIM or D % 8 != 0:
            _fail("q", f"head dim {D} not supported (a multiple of 8 up to {MAX_HEAD_DIM})")
        if block_size % 16 != 0 or block_size > MAX_BLOCK_SIZE:
            _fail("k_cache", f"block size {block_size} not supported (a multiple of 16 up to "
                             f"{MAX_BLOCK_SIZE})")
    tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=dev,
           last_contiguous=True)
    tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=dev, contiguous=True)
    tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,), device=dev,
           contiguous=True)
    B = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != B + 1:
        _fail("cu_seqlens_q", f"expected {B + 1} entries (len(seq_lens) + 1), got {cu_seqlens_q.shape[0]}")
    if block_table.shape[0] != B:
        _fail("block_table", f"expected {B} rows (len(seq_lens)), got {block_table.shape[0]}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        _fail("scale", f"must be a positive number, got {scale!r}")
    for name, v in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if v is not None and (not isinstance(v, int) or v < 0):
            _fail(name, f"must be a non-negative int, got {v!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 0):
        _fail("sliding_window", f"must be None or a positive int, got {sliding_window!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or softcap < 0):
        _fail("softcap", f"must be None or a non-negative number, got {softcap!r}")
    if num_kv_splits is not None and (not isinstance(num_kv_splits, int) or num_kv_splits < 1):
        _fail("num_kv_splits", f"must be None or a positive int, got {num_kv_splits!r}")
    if out is not None:
        tensor("out", out, dtypes=(q.dtype,), device=dev, last_contiguous=True)
        if out.shape != q.shape:
            _fail("out", f"shape {tuple(out.shape)} differs from q's {tuple(q.shape)}")


def write_kv_args(backend, key, value, k_cache, v_cache, slot_mapping, k_scale=None,
                  v_scale=None):
    dts = value_dtypes(backend)
    tensor("key", key, ndim=3, dtypes=dts, last_contiguous=True)
    dev = key.device
    tensor("value", value, ndim=3, dtypes=dts, device=dev, last_contiguous=True)
    same_dtype("value", value, "key", key)
    fp8 = kv_caches(k_cache, v_cache, "key", key, dev, dts)
    kv_scales(fp8, k_cache, k_scale, v_scale)
    if value.shape != key.shape:
        _fail("value", f"shape {tuple(value.shape)} differs from key's {tuple(key.shape)}")
    if tuple(key.shape[1:]) != tuple(k_cache.shape[2:]):
        _fail("key", f"[heads, head_dim] {tuple(key.shape[1:])} differs from k_cache's "
                     f"{tuple(k_cache.shape[2:])}")
    tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=dev)
    if slot_mapping.shape[0] != key.shape[0]:
        _fail("slot_mapping", f"expected {key.shape[0]} entries (key.shape[0]), got {slot_mapping.shape[0]}")


def rms_norm_args(backend, x, weight, eps, residual):
    dts = value_dtypes(backend)
    tensor("x", x, dtypes=dts, last_contiguous=True)
    if x.dim() < 1:
        _fail("x", "must have at least one dimension")
    tensor("weight", weight, ndim=1, dtypes=dts, device=x.device, contiguous=True)
    if weight.shape[0] != x.shape[-1]:
        _fail("weight", f"size {weight.shape[0]} differs from x's last dim {x.shape[-1]}")
    if not isinstance(eps, (int, float)) or eps <= 0:
        _fail("eps", f"must be a positive number, got {eps!r}")
    if residual is not None:
        tensor("residual", residual, dtypes=(x.dtype,), device=x.device, last_contiguous=True)
        if residual.shape != x.shape:
            _fail("residual", f"shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")


def rotary_args(backend, positions, q, k, cos_sin_cache, is_neox):
    dts = value_dtypes(backend)
    tensor("positions", positions, ndim=1, dtypes=(torch.int64, torch.int32))
    dev = positions.device
    tensor("q", q, ndim=3, dtypes=dts, device=dev, last_contiguous=True)
    tensor("k", k, ndim=3, dtypes=(q.dtype,), device=dev, last_contiguous=True)
    tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32, torch.float64),
           device=dev, contiguous=True)
    T = positions.shape[0]
    if q.shape[0] != T or k.shape[0] != T:
        _fail("q", f"q has {q.shape[0]} rows and k {k.shape[0]}, positions has {T}")
    if k.shape[2] != q.shape[2]:
        _fail("k", f"head dim {k.shape[2]} differs from q's {q.shape[2]}")
    rot = cos_sin_cache.shape[1]
    if rot % 2 != 0 or rot == 0 or rot > q.shape[2]:
        _fail("cos_sin_cache", f"rotary dim {rot} must be even and at most head dim {q.shape[2]}")
    if not isinstance(is_neox, bool):
        _fail("is_neox", f"must be a bool, got {is_neox!r}")


def rotary_write_kv_args(backend, positions, q, k, v, cos_sin_cache, k_cache, v_cache,
                         slot_mapping, is_neox, k_scale=None, v_scale=None):
    rotary_args(backend, positions, q, k, cos_sin_cache, is_neox)
    write_kv_args(backend, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def silu_and_mul_args(backend, x):
    tensor("x", x, dtypes=value_dtypes(backend), last_contiguous=True)
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        _fail("x", f"last dim must be even (gate and up halves), got shape {tuple(x.shape)}")
