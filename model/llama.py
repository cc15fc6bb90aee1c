"""The Llama-family causal LM (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over ragged batches.

forward() takes the flat new tokens of all scheduled sequences (no padding), their positions,
the step's AttentionMetadata and the per-layer paged KV caches; it returns float32 logits only
for the rows in logits_indices (the final norm and lm_head run on those S rows, not on all T:
for a prefill chunk of thousands of tokens that skips a [T, vocab] GEMM). No host syncs, no
per-token Python: everything is a fixed sequence of kernel launches per layer.
"""
from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels.reference import rope_cos_sin_cache

from . import kv_cache
from .config import ModelConfig
from .layers import DecoderLayer, _param
from .parallel import SINGLE, ParallelLMHead, TPGroup, VocabParallelEmbedding


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype=torch.float32, device="cpu", backend=None,
                 tp: TPGroup = SINGLE):
        """tp: this rank's tensor-parallel group (model/parallel.py); SINGLE = the whole model."""
        super().__init__()
        device = torch.device(device)
        self.config, self.backend, self.tp = config, backend, tp
        kw = dict(dtype=dtype, device=device, tp=tp)
        V, H = config.vocab_size, config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(V, H, **kw)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, device, tp)
                                    for _ in range(config.num_hidden_layers))
        self.norm = _param(H, dtype=dtype, device=device)
        tied = self.embed_tokens.weight if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(V, H, weight=tied, **kw)
        # Built once; Llama-3 / linear scaling is baked into the table. float32 whatever the
        # model dtype (the kernels compute RoPE in float32).
        cache = rope_cos_sin_cache(config.head_dim, config.max_position_embeddings,
                                   config.rope_theta, config.rope_scaling)
        self.register_buffer("cos_sin_cache", cache.to(device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.device

    # ------------------------------------------------------------------ KV cache
    def kv_cache_bytes_per_block(self, block_size: int, kv_cache_dtype: str = "auto",
                                 kv_scales=None) -> int:
        """Bytes of one block in all layers, K and V, this rank's KV heads only (fp8: the e4m3
        pages plus per-slot float32 scales; model/kv_cache.py)."""
        c = self.config
        return kv_cache.bytes_per_block(c.num_hidden_layers, block_size, self.num_kv_heads,
                                        c.head_dim, self.dtype, kv_cache_dtype, kv_scales)

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank caches (all of them at tensor_parallel_size 1)."""
        return self.layers[0].attn.num_kv_heads

    def allocate_kv_cache(self, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto",
                          kv_scales=None) -> list[kv_cache.KVCache]:
        """Per layer a KVCache, unpacking as (k_cache, v_cache), each [num_blocks, block_size,
        Hkv, D] zero-filled; kv_cache_dtype "fp8_e4m3" stores e4m3 pages and their scales
        (per-slot tensors, or kv_scales=(k, v) per-tensor floats)."""
        for name, v in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: must be a positive int, got {v!r}")
        c = self.config
        return kv_cache.allocate(c.num_hidden_layers, num_blocks, block_size,
                                 self.num_kv_heads, c.head_dim, dtype=self.dtype,
                                 device=self.device, kv_cache_dtype=kv_cache_dtype,
                                 kv_scales=kv_scales)

    def warmup_kernels(self, block_size: int, max_query_len: int = 1,
                       kv_cache_dtype: str = "auto", kv_scales=None) -> int:
        """Compile every Triton attention variant the engine can launch with this model
        (tile classes for queries up to max_query_len, split or not, the fp8 format), so no
        JIT compile (2-3 s each on a GPU) lands in a served or timed step. A no-op (0) unless
        attention resolves to Triton on a CUDA device. Returns the launches run."""
        dev = self.device
        if dev.type != "cuda" or kernels._resolve(self.backend, dev) != "triton":
            return 0
        from kernels import triton_attention
        a = self.layers[0].attn
        windows = {layer.attn.sliding_window for layer in self.layers}
        return sum(triton_attention.warmup(
            a.num_heads, a.num_kv_heads, a.head_dim, self.dtype, block_size, dev,
            sliding_window=w, scale=a.scale, max_query_len=max_query_len,
            kv_cache_dtype=torch.float8_e4m3fn if kv_cache_dtype == "fp8_e4m3" else None,
            per_slot_scales=kv_scales is None) for w in windows)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: kernels.AttentionMetadata, kv_caches, logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids, positions int64 [T]; kv_caches per layer (k, v) (allocate_kv_cache's
        KVCaches, which carry fp8 scales); logits_indices int64 [S]
        -> logits float32 [S, vocab]. Writes this step's K/V at attn.slot_mapping."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"positions: shape {tuple(positions.shape)} must equal input_ids' "
                             f"{tuple(input_ids.shape)} (both 1-D [T])")
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches: {len(kv_caches)} layers given, model has {len(self.layers)}")
        backend = self.backend
        h = self.embed_tokens(input_ids)
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            k_cache, v_cache = cache     # a KVCache (fp8: with scales) or a plain pair
            h, residual = layer(h, residual, positions, self.cos_sin_cache, attn, k_cache,
                                v_cache, backend, k_scale=getattr(cache, "k_scale", None),
                                v_scale=getattr(cache, "v_scale", None))
        if logits_indices.shape[0] == 0:        # only mid-prompt chunks: nothing to sample
            return torch.empty(0, self.config.vocab_size, dtype=torch.float32, device=h.device)
        # Only the sampled rows go through the last residual add, the final norm and lm_head.
        h, residual = h.index_select(0, logits_indices), residual.index_select(0, logits_indices)
        h, _ = kernels.rms_norm(h, self.norm, self.config.rms_norm_eps, residual=residual,
                                backend=backend)
        return self.lm_head(h)
