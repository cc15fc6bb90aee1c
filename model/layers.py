"""One decoder layer over a ragged batch: every op on the flat [T, hidden] tokens except attention.

Selective batching (Orca): the projections, norms, RoPE and SiLU run on all T new tokens of all
sequences at once, whatever their phase; only write_kv + paged_attention look at sequences, and
they do it in one launch each from AttentionMetadata. Weights are fused so each step makes one
GEMM for q/k/v ([(Hq + 2 Hkv) D, hidden]) and one for gate/up ([2 I, hidden]); q, k and v are
views of the fused output (no copies) and write_kv takes the strided v view as it is.
Parameters are created empty, directly on the target device in the target dtype; the loader
fills them (from safetensors or at random). Under tensor parallelism (model/parallel.py) the
same code runs on each rank's shard: its query heads and KV heads (replicated when fewer KV
heads than ranks), its slice of the MLP; o_proj and down_proj all-reduce (tp.size 1: no-ops).
"""
from __future__ import annotations

from torch import nn

import kernels

from .config import ModelConfig
from .parallel import (SINGLE, ColumnParallelLinear, RowParallelLinear, TPGroup, kv_head_shard,
                       replicated)


def _param(*shape, dtype, device) -> nn.Parameter:
    return replicated(*shape, dtype=dtype, device=device)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device, tp: TPGroup = SINGLE):
        super().__init__()
        D = cfg.head_dim
        q0, self.num_heads = tp.split(cfg.num_attention_heads, "num_attention_heads")
        k0, self.num_kv_heads = kv_head_shard(cfg.num_key_value_heads, tp)   # this rank's heads
        self.head_dim, self.eps = D, cfg.rms_norm_eps
        self.scale = D ** -0.5
        self.sliding_window = cfg.sliding_window
        kw = dict(dtype=dtype, device=device)
        kv = (cfg.num_key_value_heads * D, k0 * D, self.num_kv_heads * D)
        self.qkv = ColumnParallelLinear(cfg.hidden_size, [(cfg.num_attention_heads * D, q0 * D,
                                                          self.num_heads * D), kv, kv],
                                        bias=cfg.attention_bias, tp=tp, **kw)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * D, cfg.hidden_size, tp=tp, **kw)
        self.q_norm = _param(cfg.head_dim, **kw) if cfg.qk_norm else None
        self.k_norm = _param(cfg.head_dim, **kw) if cfg.qk_norm else None

    def forward(self, x, positions, cos_sin_cache, attn: kernels.AttentionMetadata,
                k_cache, v_cache, backend, k_scale=None, v_scale=None):
        T = x.shape[0]
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)                                            # [T, (Hq + 2 Hkv) D]
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
        return self.o_proj(o.reshape(T, Hq * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device, tp: TPGroup = SINGLE):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        I = cfg.intermediate_size
        part = (I, *tp.split(I, "intermediate_size"))
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, [part, part], tp=tp, **kw)
        self.down = RowParallelLinear(I, cfg.hidden_size, tp=tp, **kw)

    def forward(self, x, backend):
        return self.down(kernels.silu_and_mul(self.gate_up(x), backend=backend))


class DecoderLayer(nn.Module):
    """Pre-norm block. The residual add is fused into the next RMSNorm: each layer returns
    (output, residual) unsummed, and the next norm computes norm(output + residual) and the
    new residual in one pass (vLLM's layout)."""

    def __init__(self, cfg: ModelConfig, dtype, device, tp: TPGroup = SINGLE):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.input_norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.post_attn_norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.attn = Attention(cfg, dtype, device, tp)
        self.mlp = MLP(cfg, dtype, device, tp)

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
