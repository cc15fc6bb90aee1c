"""Builders of ragged paged-attention inputs shared by the reference, Triton and CUDA tests."""
from __future__ import annotations

import torch


def make_batch(q_lens, kv_lens, *, num_q_heads, num_kv_heads, head_dim, block_size=16,
               dtype=torch.float32, device="cpu", extra_blocks=3, generator=None):
    """Random q, a paged cache holding every sequence's KV in shuffled (non-contiguous) blocks,
    and the metadata. Unused block-table entries point at random valid blocks.
    Returns a dict of the paged_attention arguments plus max_seqlen_q/k and slot_mapping of
    the new tokens (the last q_len positions of each sequence)."""
    assert len(q_lens) == len(kv_lens) and all(q <= k for q, k in zip(q_lens, kv_lens))
    g = generator
    B = len(q_lens)
    nblk = [-(-k // block_size) for k in kv_lens]
    max_blocks = max([1] + nblk)
    total = sum(nblk) + extra_blocks
    perm = torch.randperm(total, generator=g)
    table = torch.randint(0, total, (B, max_blocks), generator=g, dtype=torch.int32)
    slots, i = [], 0
    for b in range(B):
        table[b, :nblk[b]] = perm[i:i + nblk[b]].to(torch.int32)
        i += nblk[b]
        for p in range(kv_lens[b] - q_lens[b], kv_lens[b]):
            slots.append(int(table[b, p // block_size]) * block_size + p % block_size)
    k_cache = torch.randn(total, block_size, num_kv_heads, head_dim, generator=g, dtype=torch.float64)
    v_cache = torch.randn(total, block_size, num_kv_heads, head_dim, generator=g, dtype=torch.float64)
    T = sum(q_lens)
    q = torch.randn(T, num_q_heads, head_dim, generator=g, dtype=torch.float64)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int64), 0).to(torch.int32)
    return dict(
        q=q.to(dtype).to(device), k_cache=k_cache.to(dtype).to(device),
        v_cache=v_cache.to(dtype).to(device), block_table=table.to(device),
        cu_seqlens_q=cu.to(device), seq_lens=torch.tensor(kv_lens, dtype=torch.int32).to(device),
        max_seqlen_q=max([0] + list(q_lens)), max_seqlen_k=max([0] + list(kv_lens)),
        slot_mapping=torch.tensor(slots, dtype=torch.int64).to(device))


def cast(batch: dict, dtype, device=None) -> dict:
    """The same batch with float tensors in ``dtype`` (and optionally on another device)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device) if device is not None else v
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


ATTN_KEYS = ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens")


def attn_args(batch: dict):
    return [batch[k] for k in ATTN_KEYS]


def check_paged_attention(backend, q_lens=None, kv_lens=None, *, hq=4, hkv=2, d=64, bs=16,
                          dtype=torch.float16, device="cpu", window=None, softcap=None,
                          splits=None, scale=None, out=None, batch=None, name=""):
    """Run kernels.paged_attention on ``backend`` and assert it against the float64 reference,
    with PyTorch's own error in ``dtype`` as the yardstick (tests/tolerance.py).
    ``batch``: a float64 make_batch result to reuse instead of building one."""
    import kernels
    from kernels import reference
    from tests.tolerance import assert_close

    b64 = batch if batch is not None else make_batch(
        q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs,
        dtype=torch.float64, device=device)
    bl = cast(b64, dtype)
    kw = dict(scale=scale, sliding_window=window, softcap=softcap)
    got = kernels.paged_attention(*attn_args(bl), max_seqlen_q=bl["max_seqlen_q"],
                                  max_seqlen_k=bl["max_seqlen_k"], out=out,
                                  num_kv_splits=splits, backend=backend, **kw)
    want = reference.paged_attention(*attn_args(b64), **kw)
    lowp = reference.paged_attention(*attn_args(bl), **kw)
    assert_close(got, want, lowp,
                 name=name or f"{backend} {dtype} q{q_lens} kv{kv_lens} splits={splits}")
    return got, want, lowp
