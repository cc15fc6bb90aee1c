"""Paged attention in plain PyTorch, vectorised over the batch: the "torch" backend's fast path.

kernels/reference.py loops over sequences in Python (clear, and the ground truth of every
test); this file computes the same function with a handful of batched tensor ops, so a CPU
run measures the model and the scheduler rather than a Python loop. Semantics are the
reference's, argument for argument (DESIGN.md, "Kernel API"): bottom-right causal mask,
optional sliding window and softcap, GQA (query head h reads KV head h // (Hq // Hkv)), rows
that see no key are zero, and an fp8 KV cache (float8_e4m3fn codes, value = code * scale) is
dequantised with its per-slot or per-tensor scales right after the gather.

How: the sequences are split into two groups, decodes (q_len == 1) and the rest, because one
padded batch of both would pad every decode to the longest prefill chunk (a 256-token chunk
beside 127 decodes: 256x the decode scores). Within a group:
  1. gather each sequence's pages by its block table into a padded [n, Lk, Hkv, D] batch,
  2. gather its queries into a padded [n, Hkv, G * q_max, D] batch (G = Hq / Hkv query heads
     share one KV head, so the KV batch is never repeated G times),
  3. one masked attention over the padded batch,
  4. scatter the valid rows back to the flat [T, Hq, D] output.
Step 3 is F.scaled_dot_product_attention with a boolean mask (on a loaded 2-core CPU it
was 10-50% faster than explicit matmuls: 11.8 vs 13.2 ms for 128 decodes at ~200 context,
Hq/Hkv/D 8/4/32), and where SDPA cannot follow (softcap) explicit per-head matmuls as the
reference computes them: QK^T and PV in the input dtype, softmax in float32 (float64).
Padded key slots enter the products with probability 0, so caches must hold finite values
there, as for the Triton kernel (the engine allocates them zero-filled).
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

# fp8 caches (k_scale/v_scale, docs/fp8_kv.md) are dequantised after the gather
FP8_KV_OPS = ("paged_attention",)
_USE_SDPA = True   # False: the matmul path everywhere (tests run both)
FP8 = getattr(torch, "float8_e4m3fn", None)


# Reused gather buffers, per (K or V, dtype, device). A fresh multi-MB tensor per layer and
# step costs its page faults every time: with reuse the attention of 64 decodes at ~100
# context (Hq/Hkv/D 8/4/32, fp32, 1 thread, load ~10) took 18-22 ms instead of 26-33 ms.
# Buffers above _WORKSPACE_MAX_BYTES are not kept (a long prefill must not pin its size).
_WORKSPACE: dict = {}
_WORKSPACE_MAX_BYTES = 64 << 20


def _workspace(slot: int, rows: int, cache: torch.Tensor) -> torch.Tensor:
    """An uninitialised [rows, *cache.shape[1:]] tensor like cache, from a reused buffer."""
    shape = (rows,) + tuple(cache.shape[1:])
    numel = math.prod(shape)
    if numel * cache.element_size() > _WORKSPACE_MAX_BYTES or cache.requires_grad:
        return torch.empty(shape, dtype=cache.dtype, device=cache.device)
    # A buffer made under torch.inference_mode (the engine's steps) cannot be written outside
    # it, and the other way round: one buffer per mode.
    # One buffer per thread too: concurrent callers (tensor-parallel ranks simulated as
    # threads in tests) would overwrite each other's gathered pages.
    key = (slot, cache.dtype, cache.device, torch.is_inference_mode_enabled(),
           threading.get_ident())
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACE[key] = torch.empty(numel, dtype=cache.dtype, device=cache.device)
    return buf[:numel].view(shape)


def _dequant(pages: torch.Tensor, scale, page_idx: torch.Tensor, dtype) -> torch.Tensor:
    """fp8 pages [n, nblk, bs, Hkv, D] -> dtype, times their per-slot or per-tensor scale."""
    x = pages.to(torch.float64 if dtype == torch.float64 else torch.float32)
    if isinstance(scale, torch.Tensor):            # per slot: [num_blocks, block_size, Hkv]
        x = x * scale[page_idx].to(x.dtype)[..., None]
    else:                                          # per tensor: a python float
        x = x * float(scale)
    return x.to(dtype)


def _matmul_attention(qb, kp, vp, mask, scale, softcap, q_max):
    """qb [n, Hkv, G q_max, D], kp/vp [n, Lk, Hkv, D], mask [n, q_max, Lk] -> [Hkv, n, G q_max, D]."""
    n, Hkv, R, D = qb.shape
    G, Lk, cdt = R // q_max, kp.shape[1], qb.dtype
    masked = ~mask[:, None].expand(n, G, q_max, Lk).reshape(n, R, Lk)
    sm_dt = torch.float64 if cdt == torch.float64 else torch.float32
    o = torch.empty(Hkv, n, R, D, dtype=cdt, device=qb.device)
    # Per KV head: kp[:, :, h] is a strided [n, Lk, D] view that bmm reads in place (one
    # batched matmul over all heads would first copy K and V into a head-major layout:
    # measured 18 ms vs 9 ms for a 128-sequence decode at 200 context, Hkv 4, D 32, 2 cores)
    for h in range(Hkv):
        s = torch.bmm(qb[:, h], kp[:, :, h].transpose(1, 2)) * scale     # [n, G q_max, Lk]
        s = s.to(sm_dt)
        if softcap is not None and softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(masked, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(cdt)            # rows with no key -> 0
        torch.bmm(p, vp[:, :, h], out=o[h])
    return o


def _group(q, k_cache, v_cache, block_table, out, seqs, cu, q_lens, kv_lens, *, scale,
           sliding_window, softcap, k_scale, v_scale):
    """Attention of the sequences `seqs` (indices into the batch) in one padded batch."""
    dev = q.device
    _, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    n = len(seqs)
    q_max, k_max = max(q_lens[b] for b in seqs), max(kv_lens[b] for b in seqs)
    nblk = -(-k_max // bs)
    Lk = nblk * bs
    sel = torch.tensor(seqs, dtype=torch.long, device=dev)
    ql = torch.tensor([q_lens[b] for b in seqs], dtype=torch.long, device=dev)
    kl = torch.tensor([kv_lens[b] for b in seqs], dtype=torch.long, device=dev)
    start = torch.tensor([cu[b] for b in seqs], dtype=torch.long, device=dev)

    # 1. pages -> [n, Lk, Hkv, D]; unused table entries are valid ids (DESIGN.md), masked below
    page_idx = block_table.index_select(0, sel)[:, :nblk].long()
    flat = page_idx.reshape(-1)
    kp = torch.index_select(k_cache, 0, flat, out=_workspace(0, flat.numel(), k_cache))
    vp = torch.index_select(v_cache, 0, flat, out=_workspace(1, flat.numel(), v_cache))
    kp = kp.view(n, nblk, bs, Hkv, D)
    vp = vp.view(n, nblk, bs, Hkv, D)
    cdt = q.dtype
    if FP8 is not None and k_cache.dtype == FP8:
        kp = _dequant(kp, k_scale, page_idx, cdt)
        vp = _dequant(vp, v_scale, page_idx, cdt)
    kp = kp.view(n, Lk, Hkv, D)
    vp = vp.view(n, Lk, Hkv, D)
    kpos = torch.arange(Lk, device=dev)

    # 2. queries -> [n, Hkv, G * q_max, D]; padded rows read token `start` and are dropped
    qi = torch.arange(q_max, device=dev)
    row_ok = qi[None, :] < ql[:, None]                          # [n, q_max]
    tok = torch.where(row_ok, start[:, None] + qi[None, :], start[:, None])
    qb = q[tok.reshape(-1)].view(n, q_max, Hkv, G, D).permute(0, 2, 3, 1, 4)
    qb = qb.reshape(n, Hkv, G * q_max, D)

    qpos = (kl - ql)[:, None] + qi[None, :]                     # [n, q_max] absolute positions
    mask = kpos[None, None, :] <= qpos[:, :, None]              # [n, q_max, Lk]
    if sliding_window is not None:
        mask &= kpos[None, None, :] > (qpos - sliding_window)[:, :, None]
    masked = ~mask[:, None].expand(n, G, q_max, Lk).reshape(n, G * q_max, Lk)
    if _USE_SDPA and not softcap:
        # [n, Hq, q_max, D] queries against strided [n, Hkv, Lk, D] views of the pages. Rows
        # that see no key (q_len > kv_len) are dropped below: torch 2.11 already returns 0
        # for them, older versions NaN
        qh = qb.view(n, Hkv, G, q_max, D).reshape(n, Hq, q_max, D)
        o = F.scaled_dot_product_attention(
            qh, kp.permute(0, 2, 1, 3), vp.permute(0, 2, 1, 3), attn_mask=mask[:, None],
            scale=scale, enable_gqa=True)                       # [n, Hq, q_max, D]
        o = o.permute(0, 2, 1, 3)                                # [n, q_max, Hq, D]
        row_ok = row_ok & (qpos >= 0)
    else:
        o = _matmul_attention(qb, kp, vp, mask, scale, softcap, q_max)
        o = o.view(Hkv, n, G, q_max, D).permute(1, 3, 0, 2, 4).reshape(n, q_max, Hq, D)

    # 4. valid rows back to their tokens
    out[tok[row_ok]] = o[row_ok].to(out.dtype)


def paged_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *, scale=None,
                    sliding_window=None, softcap=None, k_scale=None, v_scale=None, **_ignored):
    """kernels.reference.paged_attention's function (same arguments, same result up to float
    rounding), batched: q [T, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D]
    (float8_e4m3fn with k_scale/v_scale: float32 [num_blocks, block_size, Hkv] or floats); block_table int32 [B, max_blocks];
    cu_seqlens_q int32 [B+1]; seq_lens int32 [B] -> [T, Hq, D] in q's dtype.

    Reads cu_seqlens_q and seq_lens on the host once (free on CPU; on CUDA one sync, which the
    torch backend accepts: it is the fallback there, not the fast path)."""
    T, _, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    cu, kv_lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    q_lens = [cu[b + 1] - cu[b] for b in range(len(kv_lens))]
    live = [b for b in range(len(kv_lens)) if q_lens[b] > 0 and kv_lens[b] > 0]
    decodes = [b for b in live if q_lens[b] == 1]
    rest = [b for b in live if q_lens[b] > 1]
    for seqs in (decodes, rest):
        if seqs:
            _group(q, k_cache, v_cache, block_table, out, seqs, cu, q_lens, kv_lens,
                   scale=scale, sliding_window=sliding_window, softcap=softcap,
                   k_scale=k_scale, v_scale=v_scale)
    return out
