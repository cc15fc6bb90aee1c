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
    """The same batch with float tensors in ``dtype`` (and optionally on another device).
    fp8 caches and their float32 scales (quantize_cache) keep their dtypes."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device) if device is not None else v
            if v.is_floating_point() and v.dtype != torch.float8_e4m3fn and k not in FP8_SCALE_KEYS:
                v = v.to(dtype)
        out[k] = v
    return out


FP8_SCALE_KEYS = ("k_scale", "v_scale")
# Per-tensor scales for randn caches: |x| <= ~5 maps to <= 448 at 5 / 448 ~ 0.011, so no row
# saturates; the two differ so a kernel that swaps them fails.
PER_TENSOR_SCALES = (5.0 / 448.0, 4.5 / 448.0)


def quantize_cache(batch: dict, mode: str = "per_slot", scales=PER_TENSOR_SCALES) -> dict:
    """The batch with its float k_cache/v_cache replaced by float8_e4m3fn caches quantised by
    the reference write (every slot of every block, so unused blocks hold codes too), plus
    k_scale/v_scale: float32 [num_blocks, block_size, Hkv] (mode "per_slot") or the floats
    ``scales`` (mode "per_tensor"). Other entries (q, metadata) are shared, not copied."""
    from kernels import reference
    if mode not in ("per_slot", "per_tensor"):
        raise ValueError(f"mode: {mode!r} is not 'per_slot' or 'per_tensor'")
    kc, vc = batch["k_cache"], batch["v_cache"]
    nb, bs, h, d = kc.shape
    k8 = torch.empty(kc.shape, dtype=torch.float8_e4m3fn, device=kc.device)
    v8 = torch.empty_like(k8)
    if mode == "per_slot":
        ks = torch.empty(nb, bs, h, dtype=torch.float32, device=kc.device)
        vs = torch.empty_like(ks)
    else:
        ks, vs = float(scales[0]), float(scales[1])
    slots = torch.arange(nb * bs, dtype=torch.int64, device=kc.device)
    reference.write_kv(kc.reshape(-1, h, d), vc.reshape(-1, h, d), k8, v8, slots, ks, vs)
    return dict(batch, k_cache=k8, v_cache=v8, k_scale=ks, v_scale=vs)


ATTN_KEYS = ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens")


def attn_args(batch: dict):
    return [batch[k] for k in ATTN_KEYS]


def check_paged_attention(backend, q_lens=None, kv_lens=None, *, hq=4, hkv=2, d=64, bs=16,
                          dtype=torch.float16, device="cpu", window=None, softcap=None,
                          splits=None, scale=None, out=None, batch=None, name="", fp8=None):
    """Run kernels.paged_attention on ``backend`` and assert it against the float64 reference,
    with PyTorch's own error in ``dtype`` as the yardstick (tests/tolerance.py).
    ``batch``: a float64 make_batch result to reuse instead of building one.
    ``fp8``: None, "per_slot" or "per_tensor": the cache is quantised (quantize_cache) and the
    reference dequantises the same codes, so the tolerance measures the kernel, not fp8."""
    import kernels
    from kernels import reference
    from tests.tolerance import assert_close

    b64 = batch if batch is not None else make_batch(
        q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs,
        dtype=torch.float64, device=device)
    if fp8 is not None:
        b64 = quantize_cache(b64, fp8)
    bl = cast(b64, dtype)
    kw = dict(scale=scale, sliding_window=window, softcap=softcap)
    if fp8 is not None:
        kw.update(k_scale=b64["k_scale"], v_scale=b64["v_scale"])
    got = kernels.paged_attention(*attn_args(bl), max_seqlen_q=bl["max_seqlen_q"],
                                  max_seqlen_k=bl["max_seqlen_k"], out=out,
                                  num_kv_splits=splits, backend=backend, **kw)
    want = reference.paged_attention(*attn_args(b64), **kw)
    lowp = reference.paged_attention(*attn_args(bl), **kw)
    assert_close(got, want, lowp,
                 name=name or f"{backend} {dtype} q{q_lens} kv{kv_lens} splits={splits} fp8={fp8}")
    return got, want, lowp
