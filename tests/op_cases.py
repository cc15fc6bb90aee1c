"""Shared checks of the selective-batching ops, run for each backend ("triton", "cuda")."""
from __future__ import annotations

import torch

import kernels
from kernels import reference as ref
from tests.tolerance import assert_close

SENTINEL = -7.25
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def fused_qkv(T, hq, hkv, d, dtype, device, pad=0):
    """q, k, v as [T, H, D] views of one [T, pad + (hq + 2 hkv) * d] projection output
    (pad elements in front: pad = 1 makes every view misaligned for 16-byte accesses)."""
    qkv = torch.randn(T, pad + (hq + 2 * hkv) * d, dtype=torch.float64).to(dtype).to(device)
    qkv = qkv[:, pad:]
    q = qkv[:, :hq * d].view(T, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(T, hkv, d)
    return q, k, v


def check_write_kv(backend, T, hkv, d, block_size, num_blocks, dtype, device, slot_sample=None,
                   pad=0):
    """write_kv of strided k/v views must be an exact copy; every other cache entry keeps the
    sentinel bit for bit; negative slots are skipped. slot_sample: distinct slots to use."""
    _, k, v = fused_qkv(T, 2 * hkv, hkv, d, dtype, device, pad=pad)
    assert T == 1 or not k.is_contiguous()
    kc = torch.full((num_blocks, block_size, hkv, d), SENTINEL, dtype=dtype, device=device)
    vc = torch.full_like(kc, SENTINEL)
    slots = slot_sample if slot_sample is not None else torch.randperm(num_blocks * block_size)[:T]
    slots = slots.clone()
    slots[::5] = -1                                         # padding tokens are skipped
    if T > 3:
        slots[3] = -12345
    slots = slots.to(device)
    kernels.write_kv(k, v, kc, vc, slots, backend=backend)
    keep = slots >= 0
    assert torch.equal(kc.view(-1, hkv, d)[slots[keep]], k[keep])      # exact copy
    assert torch.equal(vc.view(-1, hkv, d)[slots[keep]], v[keep])
    kc.view(-1, hkv, d)[slots[keep]] = SENTINEL
    vc.view(-1, hkv, d)[slots[keep]] = SENTINEL
    assert bool((kc == SENTINEL).all()) and bool((vc == SENTINEL).all())  # nothing else written


def check_rotary(backend, T, hq, hk, d, rot, is_neox, dtype, device, pos_dtype=torch.int64,
                 scaling=None, max_pos=4096, pad=0):
    """Rotary of strided q/k views vs the float64 reference; the un-rotated tail passes through
    exactly. Returns (kernel q, kernel k, low-precision reference q, k)."""
    q, k, _ = fused_qkv(T, hq, hk, d, dtype, device, pad=pad)
    cache = ref.rope_cos_sin_cache(rot, max_pos, base=500000.0, scaling=scaling).to(device)
    pos = torch.randint(0, max_pos, (T,), dtype=pos_dtype).to(device)
    qr, kr = kernels.rotary_embedding(pos, q, k, cache, is_neox, backend=backend)
    gq, gk = ref.rotary_embedding(pos, q.double(), k.double(), cache.double(), is_neox)
    lq, lk = ref.rotary_embedding(pos, q, k, cache, is_neox)
    name = f"{backend} rotary T={T} {hq}/{hk}x{d} rot={rot} neox={is_neox} {dtype}"
    assert_close(qr, gq, lq, name + " q")
    assert_close(kr, gk, lk, name + " k")
    assert torch.equal(qr[..., rot:], q[..., rot:]) and torch.equal(kr[..., rot:], k[..., rot:])
    return qr, kr, lq, lk


def check_rotary_write_kv(backend, T, hq, hk, d, rot, is_neox, block_size, dtype, device,
                          pad=0, slots=None):
    """The fused op equals rotary_embedding + write_kv on the same backend bit for bit (the
    same rotation, rounded once), and the float64 reference within tolerance; negative
    slots and every other cache entry stay untouched."""
    q, k, v = fused_qkv(T, hq, hk, d, dtype, device, pad=pad)
    cache = ref.rope_cos_sin_cache(rot, 4096, base=500000.0).to(device)
    pos = torch.randint(0, 4096, (T,)).to(device)
    nblk = -(-2 * T // block_size) + 2
    if slots is None:
        slots = torch.randperm(nblk * block_size)[:T]
        slots[::4] = -1
    slots = slots.to(device)
    kc = torch.full((nblk, block_size, hk, d), SENTINEL, dtype=dtype, device=device)
    vc = torch.full_like(kc, SENTINEL)
    q_rot = kernels.rotary_write_kv(pos, q, k, v, cache, kc, vc, slots, is_neox, backend=backend)
    sq, sk = kernels.rotary_embedding(pos, q, k, cache, is_neox, backend=backend)
    kc2, vc2 = torch.full_like(kc, SENTINEL), torch.full_like(vc, SENTINEL)
    kernels.write_kv(sk, v, kc2, vc2, slots, backend=backend)
    assert torch.equal(q_rot, sq) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    gq, gk = ref.rotary_embedding(pos, q.double(), k.double(), cache.double(), is_neox)
    lq, lk = ref.rotary_embedding(pos, q, k, cache, is_neox)
    keep = slots >= 0
    name = f"{backend} rotary_write_kv T={T} {hq}/{hk}x{d} rot={rot} neox={is_neox} {dtype}"
    assert_close(q_rot, gq, lq, name + " q")
    assert_close(kc.view(-1, hk, d)[slots[keep]], gk[keep], lk[keep], name + " k in cache")
    assert torch.equal(vc.view(-1, hk, d)[slots[keep]], v[keep])
    kc.view(-1, hk, d)[slots[keep]] = SENTINEL
    vc.view(-1, hk, d)[slots[keep]] = SENTINEL
    assert bool((kc == SENTINEL).all()) and bool((vc == SENTINEL).all())
