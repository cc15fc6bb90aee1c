"""Size the GPU KV cache: measure peak activation memory with one forward at the full token
budget, give the cache what is left of gpu_memory_utilization. The CUDA graphs captured
afterwards keep one memory pool, about one decode forward of max_num_seqs rows (smaller than
this profile's forward at the whole budget); it lives in the 1 - gpu_memory_utilization margin.

The profiling forward (one prefill of the whole budget) splits no KV, so the Triton
attention's split-KV workspace never shows in its peak; attention_workspace_bytes adds the
worst step's (capped per launch by kernels.triton_attention.WORKSPACE_CAP) to it."""
from __future__ import annotations

import torch

from .config import EngineConfig
from .sampling import Sampler, SamplingParams


def attention_workspace_bytes(model, config: EngineConfig, budget: int, device) -> int:
    """Largest split-KV workspace one Triton attention launch of any step can allocate (one
    launch at a time: each layer's is freed before the next's): decode-only steps of 1 ..
    max_num_seqs sequences and mixed steps of `budget` tokens beside 1 .. max_num_seqs - 1
    decodes, all at max_model_len keys. 0 for other attention backends."""
    import kernels
    if kernels._resolve(model.backend, torch.device(device)) != "triton":
        return 0
    from kernels import triton_attention as ta
    c = model.config
    L = config.max_model_len or c.max_position_embeddings
    S = config.max_num_seqs
    counts = sorted({min(S, 2 ** i) for i in range(S.bit_length() + 1)} | {S})
    shapes = [(B, B, 1) for B in counts]                                   # decode-only
    shapes += [(budget, B, budget) for B in counts if 1 < B < budget]      # chunk + decodes
    return max([0] + [ta.workspace_bytes(T, B, c.num_attention_heads, c.num_key_value_heads,
                                         c.head_dim, model.dtype, mq, L, torch.device(device))
                      for T, B, mq in shapes])


def profile_num_blocks(model, config: EngineConfig, budget: int) -> int:
    """KV blocks that fit on the GPU: run one forward at the full token budget (and sample
    max_num_seqs rows) to measure peak activation memory, then give the KV cache what is left
    of gpu_memory_utilization * total memory."""
    dev = model.device
    bs = config.block_size
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    nblk = -(-budget // bs)
    kv_fmt = config.kv_cache_kwargs()           # fp8: e4m3 pages + float32 scales
    kv = model.allocate_kv_cache(nblk, bs, **kv_fmt)
    rows = min(budget, config.max_num_seqs)
    from kernels import AttentionMetadata
    i32 = dict(dtype=torch.int32, device=dev)
    attn = AttentionMetadata(torch.tensor([0, budget], **i32), torch.tensor([budget], **i32),
                             torch.arange(nblk, **i32)[None], torch.arange(budget, device=dev),
                             budget, budget)
    ids = torch.zeros(budget, dtype=torch.int64, device=dev)
    with torch.inference_mode():
        # Positions wrap at the RoPE table's size (a budget can exceed a small model's).
        pos = torch.arange(budget, device=dev) % model.config.max_position_embeddings
        logits = model.forward(ids, pos, attn, kv,
                               torch.arange(budget - rows, budget, device=dev))
        # A throwaway sampler: the engine's generator must not be advanced by profiling.
        Sampler(dev)(logits, [SamplingParams(temperature=1.0, top_p=0.9, top_k=50)] * rows, [0] * rows)
    torch.cuda.synchronize(dev)
    kv_bytes = nblk * model.kv_cache_bytes_per_block(bs, **kv_fmt)
    peak = torch.cuda.max_memory_allocated(dev) - kv_bytes
    del kv, logits
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    # Memory held outside torch's allocator (CUDA context, other processes) is total - free -
    # reserved; torch's own share is the measured peak (weights + activations).
    other = total - free - torch.cuda.memory_reserved(dev)
    avail = (config.gpu_memory_utilization * total - other - peak
             - attention_workspace_bytes(model, config, budget, dev))
    num_blocks = int(avail // model.kv_cache_bytes_per_block(bs, **kv_fmt))
    if num_blocks < 1:
        raise ValueError(f"gpu_memory_utilization: {config.gpu_memory_utilization} leaves no "
                         f"memory for the KV cache (peak use {peak / 2**30:.2f} GiB)")
    return num_blocks
