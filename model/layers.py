"""One decoder layer over a ragged batch: every op on the flat [T, hidden] tokens except attention.

Selective batching (Orca): the projections, norms, RoPE and SiLU run on all T new tokens of all
sequences at once, whatever their phase; only write_kv + paged_attention look at sequences, and
they do it in one launch each from AttentionMetadata. Weights are fused so each step makes one
GEMM for q/k/v ([(Hq + 2 Hkv) D, hidden]) and one for gate/up ([2 I, hidden]); q, k and v are
views of the fused output (no copies) and write_kv takes the strided v view as it is.
Parameters are created empty, directly on the target device in the target dtype; the loader
fills them (from safetensors or at random).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .config import ModelConfig


def _param(*shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.eps = cfg.head_dim, cfg.rms_norm_eps
        self.scale = cfg.head_dim ** -0.5
        self.sliding_window = cfg.sliding_window
        kw = dict(dtype=dtype, device=device)
        self.qkv_weight = _param(cfg.qkv_size, cfg.hidden_size, **kw)
        self.qkv_bias = _param(cfg.qkv_size, **kw) if cfg.attention_bias else None
        self.o_weight = _param(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, **kw)
        self.q_norm = _param(cfg.head_dim, **kw) if cfg.qk_norm else None
        self.k_norm = _param(cfg.head_dim, **kw) if cfg.qk_norm else None

    def forward(self, x, positions, cos_sin_cache, attn: kernels.AttentionMetadata,
                k_cache, v_cache, backend, k_scale=None, v_scale=None):
        T = x.shape[0]
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)            # [T, (Hq + 2 Hkv) D]
        q = qkv[:, : Hq * D].view(T, Hq, D)                          # strided views, no copy
        k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
        v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
        if self.q_norm is not None:                                  # Qwen3: before RoPE, as HF
            q = kernels.rms_norm(q, self.q_norm, self.eps, backend=backend)
            k = kernels.rms_norm(k, self.k_norm, self.eps, backend=backend)
        # RoPE and the KV-cache write in one op (one launch on Triton): k goes from the
        # rotation straight to its cache slot.
        # fp8 caches: k_scale/v_scale (model/kv_cache.py) go to both ops; None otherwise.
        q = kernels.rotary_write_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache,
                                    attn.slot_mapping, True, backend=backend, k_scale=k_scale,
                                    v_scale=v_scale)
        o = kernels.paged_attention(q, k_cache, v_cache, attn.block_table, attn.cu_seqlens_q,
                                    attn.seq_lens, scale=self.scale,
                                    max_seqlen_q=attn.max_seqlen_q, max_seqlen_k=attn.max_seqlen_k,
                                    sliding_window=self.sliding_window,
                                    num_kv_splits=attn.num_kv_splits, k_scale=k_scale,
                                    v_scale=v_scale, backend=backend)
        return F.linear(o.reshape(T, Hq * D), self.o_weight)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_up_weight = _param(2 * cfg.intermediate_size, cfg.hidden_size, **kw)
        self.down_weight = _param(cfg.hidden_size, cfg.intermediate_size, **kw)

    def forward(self, x, backend):
        h = kernels.silu_and_mul(F.linear(x, self.gate_up_weight), backend=backend)
        return F.linear(h, self.down_weight)


class DecoderLayer(nn.Module):
    """Pre-norm block. The residual add is fused into the next RMSNorm: each layer returns
    (output, residual) unsummed, and the next norm computes norm(output + residual) and the
    new residual in one pass (vLLM's layout)."""

    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.input_norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.post_attn_norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.attn = Attention(cfg, dtype, device)
        self.mlp = MLP(cfg, dtype, device)

    def forward(self, h, residual, positions, cos_sin_cache, attn, k_cache, v_cache, backend,
                k_scale=None, v_scale=None):
        if residual is None:
            residual = h
            x = kernels.rms_norm(h, self.input_norm, self.eps, backend=backend)
        else:
            x, residual = kernels.rms_norm(h, self.input_norm, self.eps, residual=residual,
                                           backend=backend)
        h = self.attn(x, positions, cos_sin_cache, attn, k_cache, v_cache, backend, k_scale,
                      v_scale)
        x, residual = kernels.rms_norm(h, self.post_attn_norm, self.eps, residual=residual,
                                       backend=backend)
        return self.mlp(x, backend), residual
