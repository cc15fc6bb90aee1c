"""Public kernel API: one function per op, dispatching to a backend.

Backends: "torch" (kernels/reference.py, the ground truth), "triton" (kernels/triton_*.py; on
CPU tensors only under TRITON_INTERPRET=1), "cuda" (csrc/, through torch.ops.ragged).
``backend=None`` picks the best available for the tensors' device: the environment variable
RAGGED_BACKEND if set, else "triton" on CUDA tensors and "torch" on CPU tensors.
Semantics are identical across backends (DESIGN.md, "Kernel API").
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys

import torch

from . import _checks
from .metadata import AttentionMetadata

__all__ = ["AttentionMetadata", "paged_attention", "write_kv", "rms_norm", "rotary_embedding",
           "rotary_write_kv", "silu_and_mul", "available_backends", "BACKENDS"]

BACKENDS = ("torch", "triton", "cuda")
_MODULES = {
    "torch": dict.fromkeys(("paged_attention", "write_kv", "rms_norm", "rotary_embedding",
                            "rotary_write_kv", "silu_and_mul"), "kernels.reference"),
    "triton": {"paged_attention": "kernels.triton_attention",
               "write_kv": "kernels.triton_write_kv",
               "rms_norm": "kernels.triton_rms_norm",
               "rotary_embedding": "kernels.triton_rotary",
               "rotary_write_kv": "kernels.triton_rotary",
               "silu_and_mul": "kernels.triton_silu_mul"},
    "cuda": dict.fromkeys(("paged_attention", "write_kv", "rms_norm", "rotary_embedding",
                           "rotary_write_kv", "silu_and_mul"), "kernels.cuda_ops"),
}


# Looked up once: torch.compile cannot trace importlib calls inside the public functions.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_usable(device: torch.device) -> bool:
    if not _HAS_TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _cuda_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return _module("kernels.cuda_ops").is_available()


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on tensors of ``device``."""
    device = torch.device(device)
    out = ["torch"]
    if _triton_usable(device):
        out.append("triton")
    if _cuda_usable(device):
        out.append("cuda")
    return out


def _resolve(backend, device: torch.device) -> str:
    if backend is None:
        backend = os.environ.get("RAGGED_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {BACKENDS}")
    if backend == "triton" and not _triton_usable(device):
        raise ValueError(f"backend: 'triton' cannot run on {device} tensors "
                         "(needs CUDA, or TRITON_INTERPRET=1 set before triton is imported)")
    if backend == "cuda" and not _cuda_usable(device):
        raise ValueError(f"backend: 'cuda' is unavailable for {device} tensors "
                         "(needs CUDA tensors and the compiled kernels._C extension)")
    return backend


def _module(name: str):
    # sys.modules first: torch.compile(fullgraph=True) traces a dict lookup but not an import,
    # so a backend module imported once (eagerly, or by the model) compiles without a break.
    mod = sys.modules.get(name)
    return mod if mod is not None else importlib.import_module(name)


def _impl(op: str, backend: str):
    return getattr(_module(_MODULES[backend][op]), op)


def _fp8_kwargs(op: str, backend: str, k_cache, k_scale, v_scale) -> dict:
    """{} for a non-fp8 cache (backends are called exactly as before); else the scales, after
    checking that the backend's module lists ``op`` in its FP8_KV_OPS (the one seam through
    which a backend declares fp8 support, docs/fp8_kv.md)."""
    if k_cache.dtype != torch.float8_e4m3fn:
        return {}
    if op not in getattr(_module(_MODULES[backend][op]), "FP8_KV_OPS", ()):
        raise ValueError(f"k_cache: fp8 (float8_e4m3fn) caches are not supported by backend "
                         f"{backend!r} for {op} (pick another backend or kv_cache_dtype='auto')")
    return {"k_scale": k_scale, "v_scale": v_scale}


def paged_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *, scale=None,
                    max_seqlen_q=None, max_seqlen_k=None, sliding_window=None, softcap=None,
                    out=None, num_kv_splits=None, k_scale=None, v_scale=None, backend=None):
    """Attention of a ragged batch of new tokens over a paged KV cache -> [T, Hq, D].

    q [T, Hq, D] (new tokens of all sequences, sequence after sequence); k_cache/v_cache
    [num_blocks, block_size, Hkv, D]; block_table int32 [B, max_blocks]; cu_seqlens_q int32
    [B+1]; seq_lens int32 [B] (KV length including the new tokens). Bottom-right causal mask,
    optional sliding window and softcap (tanh capping of the logits; None or 0 = off).
    max_seqlen_q/max_seqlen_k are host-side bounds; when None they are read from the device
    (one sync: pass them on hot paths and under CUDA-graph capture). num_kv_splits forces the
    split-KV factor (None: heuristic); results do not depend on it beyond rounding.
    k_scale/v_scale: required for float8_e4m3fn caches (docs/fp8_kv.md), None otherwise:
    float32 [num_blocks, block_size, Hkv] per-slot scales or per-tensor floats.
    """
    b = _resolve(backend, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"))
    _checks.attention_args(b, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens,
                           scale=scale, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                           sliding_window=sliding_window, softcap=softcap, out=out,
                           num_kv_splits=num_kv_splits, k_scale=k_scale, v_scale=v_scale)
    fp8 = _fp8_kwargs("paged_attention", b, k_cache, k_scale, v_scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    softcap = float(softcap) if softcap else None
    if b == "torch":
        res = _impl("paged_attention", b)(q, k_cache, v_cache, block_table, cu_seqlens_q,
                                          seq_lens, scale=scale, sliding_window=sliding_window,
                                          softcap=softcap, **fp8)
        return res if out is None else out.copy_(res)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if seq_lens.numel() else 0
    if max_seqlen_k is None:
        max_seqlen_k = int(seq_lens.max().item()) if seq_lens.numel() else 0
    return _impl("paged_attention", b)(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens,
                                       scale=scale, max_seqlen_q=max_seqlen_q,
                                       max_seqlen_k=max_seqlen_k, sliding_window=sliding_window,
                                       softcap=softcap, out=out, num_kv_splits=num_kv_splits,
                                       **fp8)


def write_kv(key, value, k_cache, v_cache, slot_mapping, backend=None, *, k_scale=None,
             v_scale=None):
    """Scatter key/value [T, Hkv, D] into the paged caches at slot_mapping (int64 [T]; < 0 skips).

    key and value may be strided views (e.g. slices of a fused QKV output) as long as their
    last dimension is contiguous. In place; returns None. float8_e4m3fn caches store the
    quantised rows (reference.quantize_fp8) and, with per-slot k_scale/v_scale tensors, each
    row's scale at the same slot; with per-tensor float scales only the codes.
    """
    b = _resolve(backend, key.device if isinstance(key, torch.Tensor) else torch.device("cpu"))
    _checks.write_kv_args(b, key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    fp8 = _fp8_kwargs("write_kv", b, k_cache, k_scale, v_scale)
    _impl("write_kv", b)(key, value, k_cache, v_cache, slot_mapping, **fp8)


def rms_norm(x, weight, eps=1e-6, residual=None, backend=None):
    """RMSNorm over the last dim. With ``residual``: returns (norm(x + residual), x + residual)."""
    b = _resolve(backend, x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))
    _checks.rms_norm_args(b, x, weight, eps, residual)
    return _impl("rms_norm", b)(x, weight, float(eps), residual)


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox=True, backend=None):
    """Rotary embedding of q [T, Hq, D] and k [T, Hk, D] at per-token positions -> (q_rot, k_rot).

    cos_sin_cache [max_pos, rot_dim] float32 from kernels.reference.rope_cos_sin_cache (cos
    half then sin half; Llama-3 scaling is baked into it). is_neox=True is the Llama/NeoX
    rotate-half layout, False the GPT-J interleaved one.
    """
    b = _resolve(backend, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"))
    _checks.rotary_args(b, positions, q, k, cos_sin_cache, is_neox)
    return _impl("rotary_embedding", b)(positions, q, k, cos_sin_cache, is_neox)


def rotary_write_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
                    is_neox=True, backend=None, *, k_scale=None, v_scale=None):
    """rotary_embedding of q and k, then write_kv of the rotated k and of v, fused where the
    backend can (Triton: one launch, k goes from registers to its cache slot) -> rotated q.

    Same arguments and semantics as the two ops (slots < 0 skip the write); k_rot is not
    returned: attention reads k from the cache. fp8 caches and k_scale/v_scale as in write_kv
    (the rotated k is quantised as rounded to k's dtype).
    """
    b = _resolve(backend, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"))
    _checks.rotary_write_kv_args(b, positions, q, k, v, cos_sin_cache, k_cache, v_cache,
                                 slot_mapping, is_neox, k_scale, v_scale)
    fp8 = _fp8_kwargs("rotary_write_kv", b, k_cache, k_scale, v_scale)
    return _impl("rotary_write_kv", b)(positions, q, k, v, cos_sin_cache, k_cache, v_cache,
                                       slot_mapping, is_neox, **fp8)


def silu_and_mul(x, backend=None):
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:]."""
    b = _resolve(backend, x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))
    _checks.silu_and_mul_args(b, x)
    return _impl("silu_and_mul", b)(x)
