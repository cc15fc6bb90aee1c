"""Triton ragged paged attention: decodes, speculative queries and prefill chunks in ONE launch.

Grid: one axis of programs x KV heads, KV head fastest, so all heads of a q block are
dispatched together. Two program classes, each an inlined `_attend` with its own constexpr
tile (the kernel's registers are the max of the two, its warps and stages the larger tile's):

* Direct class (decode-only launches, max_seqlen_q <= 16, and the short rows of mixed
  launches). Program b * splits + split serves sequence b (q_len < min_q), found by index:
  no search, no empty programs. A q block holds Q = BLOCK_M_D // G tokens x the G query
  heads sharing one KV head (GQA packing: tile row r is token r // G, head r % G), so each
  K/V tile is read once per KV head, not G times; a decode is one q block. Only this class
  splits KV (flash-decoding), and only its rows have workspace.
* Search class (launches with max_seqlen_q > 16). A program owns Q = BLOCK_M // G
  consecutive tokens of one sequence with q_len >= 17 (all sequences in a single-class
  launch). Sequence b's slots start at ``cu[b] // Q + cu[b] // 17`` (or ``+ b``), monotone
  in b and leaving b cdiv(q_len_b, Q) slots, so ``T // Q + min(B, T // 17)`` programs --
  host ints -- cover any batch; a program finds its sequence by binary search over
  cu_seqlens_q and exits at once if it has no tokens. Never split: a prefill keeps the SMs
  busy.
* KV tiles of BLOCK_N keys go through the block table with block_size a constexpr (shifts
  and masks for powers of two; any multiple of 16 up to 256): one block id per tile when a
  page holds whole tiles, else one per key. Block ids are loaded a tile ahead into
  registers, so the K/V loads' addresses depend only on loop-carried values and Triton's
  pipeliner keeps num_stages - 1 copy groups in flight. Page bases are int64 (block ids of
  131072+ times a block stride of 16 * 8 * 128 overflow int32), offsets inside a page int32.
* Masks are paid only where needed: the tiles a program visits split into a masked head
  (sliding window edge), an unmasked body (visible to every row) and a masked tail (the
  causal diagonal and the end of the sequence). A decode masks only its last tile.
* Split-KV: with few direct programs (sequences x KV heads below one wave of resident
  CTAs) a long context leaves SMs idle, so a program's tile range is split; every split
  writes its normalised partial output and log2-sum-exp to an fp32 workspace and a merge
  kernel combines them. Workspace rows: one per token in a decode-only launch, 16 per
  sequence in a mixed one (the host cannot tell which sequences are short), none when
  nothing splits (a lone prefill, short contexts); at most WORKSPACE_CAP bytes (fewer
  splits instead). With one split the kernel writes the output directly (one launch).
* fp8 e4m3 caches (KV_FP8): pages converted to q's dtype after the load; per-slot scales
  scale the scores and the probabilities, per-tensor ones are folded into the softmax
  scale and the output.

Online softmax in fp32 with exp2 (scale folded with log2(e)). Rows that see no key (q_len >
seq_len, or padding) produce zeros, never NaN. fp32 inputs use tl.dot(input_precision=
"ieee"): the TF32 default keeps 10 mantissa bits and would miss the fp32 tolerance.
No .item() / host sync anywhere: the call is CUDA-graph capturable given max_seqlen_q/k.
warmup() compiles every variant a run can launch (call it before timing).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
FP8_KV_OPS = ("paged_attention",)     # kernels/__init__.py passes k_scale/v_scale for fp8 caches


@triton.jit
def _load_2d(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load with only the masks that can be false (unmasked loads vectorise best)."""
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _tanh(x):
    """tanh from exp/log (the interpreter has no tanh) to a few ulps near 0 as well.

    1 - 2 / (e^2x + 1) loses ~eps / |x| relative accuracy for small |x|, which a softcap of
    30 turns into logit errors ~10x fp32 rounding. Instead tanh|x| = -e / (e + 2) with
    e = expm1(-2|x|), and expm1 by Kahan's trick (u - 1) * y / log(u), u = exp(y), whose
    rounding errors in u cancel.
    """
    y = -2.0 * tl.abs(x)
    u = tl.exp(y)
    log_u = tl.log(tl.where(u == 1.0, 0.5, u))            # guarded: no 0/0 where unused
    em = tl.where(u == 1.0, y, (u - 1.0) * y / log_u)
    em = tl.where(u == 0.0, -1.0, em)                     # |x| > ~45: exp underflows
    th = -em / (em + 2.0)
    return tl.where(x < 0.0, -th, th)


@triton.jit
def _page_ids(bt_row, kstart, n_pages, offs_n, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Physical block ids of keys [kstart, kstart + BLOCK_N) (kstart is a BLOCK_N multiple):
    ONE scalar load when the tile lies in one page (block size a multiple of BLOCK_N), else
    one per key, page = kstart / BLOCK_SIZE + (a loop-invariant vector) when BLOCK_N is a
    multiple of the block size. Pages past the sequence's last read block 0 (masked)."""
    if BLOCK_SIZE % BLOCK_N == 0:
        pg = kstart // BLOCK_SIZE
    elif BLOCK_N % BLOCK_SIZE == 0:
        pg = kstart // BLOCK_SIZE + offs_n // BLOCK_SIZE
    else:
        pg = (kstart + offs_n) // BLOCK_SIZE
    return tl.load(bt_row + pg, mask=pg < n_pages, other=0)


@triton.jit
def _in_page(kstart, offs_n, stride_ks, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """int32 offsets of the tile's keys inside their pages: < block_size * Hkv * D elements
    (2^31 needs 256 x 8 x 2^20), so only the page base needs int64."""
    if BLOCK_N % BLOCK_SIZE == 0:
        r = (offs_n % BLOCK_SIZE) * stride_ks          # the same for every tile: hoisted
    else:
        r = ((kstart + offs_n) % BLOCK_SIZE) * stride_ks
    return r


@triton.jit
def _kv_tiles(acc, m_i, l_i, q, k_head, v_head, bt_row, base, t_lo, t_hi, seq_len, n_pages,
              qpos, stride_kb, stride_ks, qk_scale, softcap, window, offs_n, offs_d, d_ok,
              ks_head, vs_head, num_kv_heads,
              MASK: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
              EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_SIZE: tl.constexpr, KV_FP8: tl.constexpr, PER_SLOT_SCALE: tl.constexpr):
    """Online softmax over KV tiles t_lo..t_hi-1 (keys base + t * BLOCK_N ...) for all rows.

    Block ids are software-pipelined one tile ahead in registers: tile t+1's are loaded
    before tile t's K/V, so their latency hides behind tile t's dots, and the K/V loads'
    addresses depend only on loop-carried values, which lets Triton's pipeliner keep
    num_stages - 1 K/V copy groups in flight (an in-iteration block-id load made it wait
    with num = 0: every copy drained each tile, bench/NOTES.md "Triton attention, issue 12").
    K is read [N, D] like V, so both share one address vector.
    fp8 pages (KV_FP8) are converted to q's dtype after the load (e4m3 is exact in fp16/bf16);
    per-slot scales (PER_SLOT_SCALE) multiply the scores (k) and the probabilities before
    P.V (v), loaded per key from (block * BLOCK_SIZE + offset) * Hkv + kv head. Per-tensor
    scales are folded into qk_scale and the output by the launcher."""
    blk = _page_ids(bt_row, base + t_lo * BLOCK_N, n_pages, offs_n, BLOCK_N, BLOCK_SIZE)
    for t in range(t_lo, t_hi):
        kstart = base + t * BLOCK_N
        kv_off = blk.to(tl.int64) * stride_kb + _in_page(kstart, offs_n, stride_ks, BLOCK_N,
                                                          BLOCK_SIZE)
        blk_cur = blk
        blk = _page_ids(bt_row, kstart + BLOCK_N, n_pages, offs_n, BLOCK_N, BLOCK_SIZE)
        kpos = kstart + offs_n
        k_ok = kpos < seq_len
        k = _load_2d(k_head + kv_off[:, None] + offs_d[None, :], k_ok, d_ok, MASK, not EVEN_D)
        if KV_FP8:
            k = k.to(q.dtype)
            if PER_SLOT_SCALE:
                slot = (blk_cur.to(tl.int64) * BLOCK_SIZE + (kpos % BLOCK_SIZE)) * num_kv_heads
                k_sc = tl.load(ks_head + slot, mask=k_ok, other=0.0)
                v_sc = tl.load(vs_head + slot, mask=k_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if KV_FP8:
            if PER_SLOT_SCALE:
                s = s * k_sc[None, :]
        if SOFTCAP:                   # softcap * tanh(s * scale / softcap), in log2 units
            s = _tanh(s * qk_scale) * (softcap * 1.4426950408889634)
        else:
            s = s * qk_scale
        if MASK:
            vis = k_ok[None, :] & (kpos[None, :] <= qpos[:, None])
            if WINDOW:
                vis = vis & (kpos[None, :] > qpos[:, None] - window)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)    # fully masked row: no NaN
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_2d(v_head + kv_off[:, None] + offs_d[None, :], k_ok, d_ok, MASK, not EVEN_D)
        if KV_FP8:
            v = v.to(q.dtype)
            if PER_SLOT_SCALE:
                if v.dtype == tl.float16:   # x 2^8, out again after the loop (see _attend)
                    p = p * (v_sc * 256.0)[None, :]
                else:
                    p = p * v_sc[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _kv_tiles_deferred(acc, m_i, l_i, p_prev, alpha_prev, blk_prev, t_first, q, k_head, v_head,
                       bt_row, base, t_lo, t_hi, seq_len, n_pages, stride_kb, stride_ks,
                       qk_scale, offs_n, offs_d, d_ok, EVEN_D: tl.constexpr,
                       DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr):
    """_kv_tiles' unmasked body (tiles every row sees whole; no softcap or fp8 pages:
    _defer_pv) with P.V deferred by one tile (the prefill tile on wgmma, DEFER_PV): iteration
    t issues S_t = Q K_t^T, waits for it, then issues tile t-1's O = alpha O + P V (async)
    and computes softmax(S_t) while that wgmma runs; O is next read after the following
    iteration's S wait. Triton's wgmma pipeliner keeps a dot in flight across an iteration
    only if its result from iteration i-1 is first used after the loop's first
    warp_group_dot_wait {pendings = 0} (here: S's), and in SASS the P.V HGMMAs of tile t-1 sit
    among tile t's MUFU.EX2 with their WARPGROUP.DEPBAR in the next iteration (bench/NOTES.md
    "Deferred P.V"). In the plain order the exp2 of a tile always waits for all its MMAs.

    Carried between tiles: p_prev (fp32 probabilities of the previous tile), alpha_prev (its
    rescale), blk_prev (its block ids; V's rows are recomputed from them in K's layout:
    carrying int64 row offsets instead cost 32 more warp-instructions a tile in a second
    layout). t_first: the loop's first tile; before it there is no previous tile: p_prev = 0
    and V masked to 0 (an offset before a page's start at block sizes >= 128). _flush_pv
    adds the last tile after the loop. No loop-carried value is yielded unchanged: Triton
    does not pipeline such loops."""
    blk = _page_ids(bt_row, base + t_lo * BLOCK_N, n_pages, offs_n, BLOCK_N, BLOCK_SIZE)
    for t in range(t_lo, t_hi):
        kstart = base + t * BLOCK_N
        kv_off = blk.to(tl.int64) * stride_kb + _in_page(kstart, offs_n, stride_ks, BLOCK_N,
                                                          BLOCK_SIZE)
        blk_cur = blk
        blk = _page_ids(bt_row, kstart + BLOCK_N, n_pages, offs_n, BLOCK_N, BLOCK_SIZE)
        k = _load_2d(k_head + kv_off[:, None] + offs_d[None, :], None, d_ok, False,
                     not EVEN_D)                    # rows unchecked: body tiles are whole
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        # tile t-1's P.V, issued before this tile's softmax so the two overlap (body tiles
        # are whole; before the first there is none: masked, zeros)
        voff = blk_prev.to(tl.int64) * stride_kb + _in_page(kstart - BLOCK_N, offs_n,
                                                            stride_ks, BLOCK_N, BLOCK_SIZE)
        v = _load_2d(v_head + voff[:, None] + offs_d[None, :], (offs_n * 0 + t) > t_first,
                     d_ok, True, not EVEN_D)
        acc = tl.dot(p_prev.to(v.dtype), v, acc * alpha_prev[:, None],
                     input_precision=DOT_PREC)
        # the scale after the row max (max(s) x scale = max(s x scale) for a scale > 0,
        # rounding is monotonic) and fused into exp2's argument: one FFMA per score instead
        # of an FMUL and an FADD (474 -> 444 warp-instructions per 128x64 tile)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)    # fully masked row: no NaN
        alpha_prev = tl.exp2(m_i - m_safe)
        p = tl.exp2(s * qk_scale - m_safe[:, None])
        l_i = l_i * alpha_prev + tl.sum(p, 1)
        p_prev = p
        blk_prev = tl.maximum(blk_cur, 0)   # ids >= 0: a copy Triton cannot fold (a yielded
        m_i = m_new                         # block argument would stop the pipeliner)
    return acc, m_i, l_i, p_prev, alpha_prev, blk_prev


@triton.jit
def _flush_pv(acc, p_prev, alpha_prev, blk_prev, t_first, t_end, base, seq_len, v_head,
              stride_kb, stride_ks, offs_n, offs_d, d_ok, EVEN_D: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The deferred P.V of the last tile, t_end - 1 (zeros if no tile was visited)."""
    kstart = base + (t_end - 1) * BLOCK_N
    voff = blk_prev.to(tl.int64) * stride_kb + _in_page(kstart, offs_n, stride_ks, BLOCK_N,
                                                        BLOCK_SIZE)
    v_ok = (kstart + offs_n < seq_len) & (t_end > t_first)
    v = _load_2d(v_head + voff[:, None] + offs_d[None, :], v_ok, d_ok, True, not EVEN_D)
    return tl.dot(p_prev.to(v.dtype), v, acc * alpha_prev[:, None], input_precision=DOT_PREC)


@triton.jit
def _attend(q_ptr, k_ptr, v_ptr, out_ptr, ws_o_ptr, ws_lse_ptr, bt_row, tok0, q_start, q_len,
            seq_len, kvh, split, num_splits, ws_row0, ws_rows, num_q_heads, group, q_per_block,
            qk_scale, softcap, window, stride_qt, stride_qh, stride_ot, stride_oh, stride_kb,
            stride_ks, stride_kh, ks_ptr, vs_ptr, num_kv_heads, out_scale,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, EVEN_D: tl.constexpr,
            TO_WS: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
            DOT_PREC: tl.constexpr, KV_FP8: tl.constexpr, PER_SLOT_SCALE: tl.constexpr,
            DEFER_PV: tl.constexpr):
    """One q block (q_per_block tokens from tok0, x G heads) of one sequence, one KV head,
    one split of its KV tiles. TO_WS: write the normalised partial output + lse to workspace
    row ws_row0 + token (of ws_rows per split); else write the output."""
    ctx = seq_len - q_len             # may be < 0 for malformed rows: they see fewer keys
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tok = tok0 + offs_m // group
    head = kvh * group + offs_m % group
    row_ok = (offs_m < q_per_block * group) & (tok < q_len)
    qpos = ctx + tok
    row_off = (q_start + tok).to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
    q = _load_2d(q_ptr + row_off[:, None] + offs_d[None, :], row_ok, d_ok, True, not EVEN_D)

    # Keys any row may see: [kv_lo, kv_hi); tiles start at a BLOCK_N multiple below kv_lo.
    tok_last = tl.minimum(tok0 + q_per_block, q_len) - 1
    p_first = ctx + tok0
    p_last = ctx + tok_last
    kv_hi = tl.minimum(seq_len, p_last + 1)
    if WINDOW:
        kv_lo = tl.maximum(p_first - window + 1, 0)
    else:
        kv_lo = p_first * 0
    base = (kv_lo // BLOCK_N) * BLOCK_N
    n_tiles = tl.maximum(kv_hi - base + BLOCK_N - 1, 0) // BLOCK_N
    per_split = (n_tiles + num_splits - 1) // num_splits
    t_lo = tl.minimum(split * per_split, n_tiles)
    t_hi = tl.minimum(t_lo + per_split, n_tiles)
    # Tiles every row sees whole: key end <= p_first and key start > p_last - window.
    full_hi = tl.maximum(p_first + 1 - base, 0) // BLOCK_N
    if WINDOW:
        full_lo = (tl.maximum(p_last - window + 1 - base, 0) + BLOCK_N - 1) // BLOCK_N
    else:
        full_lo = full_hi * 0
    a = tl.minimum(tl.maximum(full_lo, t_lo), t_hi)
    c = tl.maximum(tl.minimum(full_hi, t_hi), a)
    n_pages = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_head_off = kvh.to(tl.int64) * stride_kh
    k_head = k_ptr + kv_head_off
    v_head = v_ptr + kv_head_off
    # Tiles in three loops: the window edge, the fully visible body and the causal diagonal /
    # sequence end; only the body is unmasked. Online softmax takes tiles in any order, and
    # the order matters to ptxas: with the masked window-edge loop before the body it
    # serialised every wgmma of the kernel (C7515 "non wgmma instructions defining
    # accumulator registers": each HGMMA followed by WARPGROUP.DEPBAR.LE gsb0, 0x0; every
    # sliding-window variant), so wgmma-sized tiles with a window run the body first. Only
    # there: without a window the head loop is empty for causal rows, and the body-first
    # order cost decode tiles 6-10 registers and block size 128 a C7515 of its own.
    if DEFER_PV:
        # only the unmasked body defers P.V: carrying P through the masked loops as well cost
        # 16-64 bytes of spills at 255 registers (window, softcap, G=1, block 64, per-slot
        # fp8); its last P.V is added before the masked loops that follow
        if not WINDOW:
            acc, m_i, l_i = _kv_tiles(acc, m_i, l_i, q, k_head, v_head, bt_row, base, t_lo, a,
                                      seq_len, n_pages, qpos, stride_kb, stride_ks, qk_scale,
                                      softcap, window, offs_n, offs_d, d_ok, ks_ptr + kvh,
                                      vs_ptr + kvh, num_kv_heads, True, WINDOW, SOFTCAP, EVEN_D,
                                      DOT_PREC, BLOCK_N, BLOCK_SIZE, KV_FP8, PER_SLOT_SCALE)
        p_prev = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        alpha_prev = tl.full([BLOCK_M], 1.0, tl.float32)
        blk_prev = _page_ids(bt_row, base + a * BLOCK_N, n_pages, offs_n, BLOCK_N, BLOCK_SIZE)
        acc, m_i, l_i, p_prev, alpha_prev, blk_prev = _kv_tiles_deferred(
            acc, m_i, l_i, p_prev, alpha_prev, blk_prev, a, q, k_head, v_head, bt_row,
            base, a, c, seq_len, n_pages, stride_kb, stride_ks, qk_scale, offs_n, offs_d,
            d_ok, EVEN_D, DOT_PREC, BLOCK_N, BLOCK_SIZE)
        acc = _flush_pv(acc, p_prev, alpha_prev, blk_prev, a, c, base, seq_len, v_head,
                        stride_kb, stride_ks, offs_n, offs_d, d_ok, EVEN_D, DOT_PREC, BLOCK_N,
                        BLOCK_SIZE)
        if WINDOW:
            acc, m_i, l_i = _kv_tiles(acc, m_i, l_i, q, k_head, v_head, bt_row, base, t_lo, a,
                                      seq_len, n_pages, qpos, stride_kb, stride_ks, qk_scale,
                                      softcap, window, offs_n, offs_d, d_ok, ks_ptr + kvh,
                                      vs_ptr + kvh, num_kv_heads, True, WINDOW, SOFTCAP, EVEN_D,
                                      DOT_PREC, BLOCK_N, BLOCK_SIZE, KV_FP8, PER_SLOT_SCALE)
    elif WINDOW and BLOCK_M >= 64:
        acc, m_i, l_i = _kv_tiles(acc, m_i, l_i, q, k_head, v_head, bt_row, base, a, c,
                                  seq_len, n_pages, qpos, stride_kb, stride_ks, qk_scale,
                                  softcap, window, offs_n, offs_d, d_ok, ks_ptr + kvh,
                                  vs_ptr + kvh, num_kv_heads, False, WINDOW, SOFTCAP, EVEN_D,
                                  DOT_PREC, BLOCK_N, BLOCK_SIZE, KV_FP8, PER_SLOT_SCALE)
        acc, m_i, l_i = _kv_tiles(acc, m_i, l_i, q, k_head, v_head, bt_row, base, t_lo, a,
                                  seq_len, n_pages, qpos, stride_kb, stride_ks, qk_scale,
                                  softcap, window, offs_n, offs_d, d_ok, ks_ptr + kvh,
                                  vs_ptr + kvh, num_kv_heads, True, WINDOW, SOFTCAP, EVEN_D,
                                  DOT_PREC, BLOCK_N, BLOCK_SIZE, KV_FP8, PER_SLOT_SCALE)
    else:
        acc, m_i, l_i = _kv_tiles(acc, m_i, l_i, q, k_head, v_head, bt_row, base, t_lo, a,
                                  seq_len, n_pages, qpos, stride_kb, stride_ks, qk_scale,
                                  softcap, window, offs_n, offs_d, d_ok, ks_ptr + kvh,
                                  vs_ptr + kvh, num_kv_heads, True, WINDOW, SOFTCAP, EVEN_D,
                                  DOT_PREC, BLOCK_N, BLOCK_SIZE, KV_FP8, PER_SLOT_SCALE)
        acc, m_i, l_i = _kv_tiles(acc, m_i, l_i, q, k_head, v_head, bt_row, base, a, c,
                                  seq_len, n_pages, qpos, stride_kb, stride_ks, qk_scale,
                                  softcap, window, offs_n, offs_d, d_ok, ks_ptr + kvh,
                                  vs_ptr + kvh, num_kv_heads, False, WINDOW, SOFTCAP, EVEN_D,
                                  DOT_PREC, BLOCK_N, BLOCK_SIZE, KV_FP8, PER_SLOT_SCALE)
    acc, m_i, l_i = _kv_tiles(acc, m_i, l_i, q, k_head, v_head, bt_row, base, c, t_hi,
                              seq_len, n_pages, qpos, stride_kb, stride_ks, qk_scale,
                              softcap, window, offs_n, offs_d, d_ok, ks_ptr + kvh,
                              vs_ptr + kvh, num_kv_heads, True, WINDOW, SOFTCAP, EVEN_D,
                              DOT_PREC, BLOCK_N, BLOCK_SIZE, KV_FP8, PER_SLOT_SCALE)

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]          # rows with no key: 0
    if KV_FP8:
        if not PER_SLOT_SCALE:
            o = o * out_scale                                # per-tensor v scale
        elif q.dtype == tl.float16:
            # P x the keys' V scales (~|v| / 448) went to fp16 x 2^8 for P V (_kv_tiles): in
            # fp16's subnormals (< 6.1e-5) the small products lost their precision
            o = o * (1.0 / 256.0)
    if TO_WS:
        ws_row = (split.to(tl.int64) * ws_rows + ws_row0 + tok) * num_q_heads + head
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(ws_lse_ptr + ws_row, lse, mask=row_ok)
        tl.store(ws_o_ptr + ws_row[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        out_off = (q_start + tok).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
        tl.store(out_ptr + out_off[:, None] + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


# Runtime ints that change from step to step (or need no specialisation) are not specialised:
# Triton would otherwise compile a new variant whenever one of them happens to equal 1 or
# becomes divisible by 16 (the block table's row stride, q/out strides of views). Metadata
# pointers are views into one packed batch buffer (ragged/batch.py) whose offsets move with
# T and B: no alignment specialisation either (they are gathered scalars; nothing vectorises);
# nor for the fp8 scale pointers (gathered per key; a non-fp8 launch passes seq_lens there).
_RUNTIME_INTS = ["num_seqs", "search_iters", "num_search", "q_per_block", "seq_div", "min_q",
                 "splits", "q_per_block_d", "ws_rows", "window",
                 "stride_bt"]


@triton.jit(do_not_specialize=_RUNTIME_INTS,
            do_not_specialize_on_alignment=["bt_ptr", "cu_ptr", "seq_lens_ptr", "ks_ptr",
                                            "vs_ptr"])
def _paged_attn_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, cu_ptr, seq_lens_ptr, out_ptr, ws_o_ptr, ws_lse_ptr,
        ks_ptr, vs_ptr, out_scale, num_seqs, num_q_heads, num_kv_heads, group, search_iters, num_search, q_per_block,
        seq_div, min_q, splits, q_per_block_d, ws_rows,
        qk_scale, softcap, window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_M_D: tl.constexpr, BLOCK_N_D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, EVEN_D: tl.constexpr, SEARCH: tl.constexpr,
        DIRECT: tl.constexpr, SPLIT: tl.constexpr, WS_BY_SEQ: tl.constexpr, Q_LOOP: tl.constexpr,
        WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
        KV_FP8: tl.constexpr, PER_SLOT_SCALE: tl.constexpr, DEFER_PV: tl.constexpr):
    # 1-D grid, KV head fastest, so every head of one q block is dispatched together.
    pid = tl.program_id(0) // num_kv_heads
    kvh = tl.program_id(0) % num_kv_heads
    if SEARCH and pid < num_search:
        # Search class (BLOCK_M rows, never split). Reversed so the last q blocks -- the
        # longest causal rows of a prefill -- start first and short ones fill the tail.
        slot = num_search - 1 - pid
        # Sequence of this slot: the last b with start(b) <= slot (binary search), where
        # start(b) = cu[b] // Q + (b, or cu[b] // seq_div when only sequences with
        # q_len >= seq_div are served: each of them still gets cdiv(q_len, Q) slots).
        lo = slot * 0
        hi = lo + num_seqs - 1
        for _ in range(search_iters):
            mid = (lo + hi + 1) // 2
            cu_mid = tl.load(cu_ptr + mid)
            extra = tl.where(seq_div > 0, cu_mid // tl.maximum(seq_div, 1), mid)
            go_right = cu_mid // q_per_block + extra <= slot
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid - 1)
        b = lo
        q_start = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q_start
        extra_b = tl.where(seq_div > 0, q_start // tl.maximum(seq_div, 1), b)
        tok0 = (slot - (q_start // q_per_block + extra_b)) * q_per_block
        # spare slot of the grid's upper bound, or (mixed launch) a direct-class sequence
        if (tok0 < q_len) & (q_len >= min_q):
            seq_len = tl.load(seq_lens_ptr + b)
            bt_row = bt_ptr + b.to(tl.int64) * stride_bt
            _attend(q_ptr, k_ptr, v_ptr, out_ptr, ws_o_ptr, ws_lse_ptr, bt_row, tok0, q_start,
                    q_len, seq_len, kvh, 0, 1, 0, 0, num_q_heads, group, q_per_block,
                    qk_scale, softcap, window, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kb, stride_ks, stride_kh, ks_ptr, vs_ptr, num_kv_heads, out_scale,
                    HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_SIZE, EVEN_D, False, WINDOW,
                    SOFTCAP, DOT_PREC, KV_FP8, PER_SLOT_SCALE, DEFER_PV)
    elif DIRECT:
        # Direct class (BLOCK_M_D rows): program b * splits + split for each sequence with
        # q_len < min_q (every sequence of a decode-only launch), found by index: no search,
        # no empty programs. A short query of more than q_per_block_d tokens loops over its
        # q blocks (decodes: one iteration).
        if SEARCH:
            r = pid - num_search
        else:
            r = pid
        b = r // splits
        split = r % splits
        q_start = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q_start
        if q_len < min_q:
            seq_len = tl.load(seq_lens_ptr + b)
            bt_row = bt_ptr + b.to(tl.int64) * stride_bt
            if WS_BY_SEQ:             # mixed launch: 16 workspace rows per sequence
                ws_row0 = b * (min_q - 1)
            else:                     # decode-only launch: one per token
                ws_row0 = q_start
            if Q_LOOP:                # q_len may exceed one q block: loop over them
                for tok0 in range(0, q_len, q_per_block_d):
                    _attend(q_ptr, k_ptr, v_ptr, out_ptr, ws_o_ptr, ws_lse_ptr, bt_row, tok0,
                            q_start, q_len, seq_len, kvh, split, splits, ws_row0, ws_rows,
                            num_q_heads, group, q_per_block_d, qk_scale, softcap, window,
                            stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks,
                            stride_kh, ks_ptr, vs_ptr, num_kv_heads, out_scale, HEAD_DIM,
                            BLOCK_M_D, BLOCK_N_D, BLOCK_D, BLOCK_SIZE, EVEN_D, SPLIT, WINDOW,
                            SOFTCAP, DOT_PREC, KV_FP8, PER_SLOT_SCALE, False)
            else:                     # one q block (decodes): the loop cost 44 registers
                _attend(q_ptr, k_ptr, v_ptr, out_ptr, ws_o_ptr, ws_lse_ptr, bt_row, 0,
                        q_start, q_len, seq_len, kvh, split, splits, ws_row0, ws_rows,
                        num_q_heads, group, q_per_block_d, qk_scale, softcap, window,
                        stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks,
                        stride_kh, ks_ptr, vs_ptr, num_kv_heads, out_scale, HEAD_DIM,
                        BLOCK_M_D, BLOCK_N_D, BLOCK_D, BLOCK_SIZE, EVEN_D, SPLIT, WINDOW,
                        SOFTCAP, DOT_PREC, KV_FP8, PER_SLOT_SCALE, False)


@triton.jit(do_not_specialize=["ws_rows", "num_splits", "min_q", "stride_ot", "stride_oh"],
            do_not_specialize_on_alignment=["cu_ptr"])
def _merge_kernel(out_ptr, ws_o_ptr, ws_lse_ptr, cu_ptr, ws_rows, num_q_heads, num_splits,
                  min_q, stride_ot, stride_oh,
                  HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                  WS_BY_SEQ: tl.constexpr):
    """out[t, h] = sum_s 2^lse_s o_s / sum_s 2^lse_s over the splits of one (row, head).

    Only rows that split have workspace: WS_BY_SEQ (mixed launch): program b merges the
    q_len < min_q tokens of sequence b from rows b * (min_q - 1) + i; else program t merges
    token t (a decode-only launch: every token split). BLOCK_S = MAX_SPLITS always: one
    compiled variant for any split count."""
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    if WS_BY_SEQ:
        b = tl.program_id(0)
        t0 = tl.load(cu_ptr + b)
        n = tl.load(cu_ptr + b + 1) - t0
        n = tl.where(n < min_q, n, 0)
        row0 = b * (min_q - 1)
    else:
        t0 = tl.program_id(0)
        n = 1
        row0 = t0
    for i in range(0, n):
        rows = (offs_s.to(tl.int64) * ws_rows + row0 + i) * num_q_heads + h
        lse = tl.load(ws_lse_ptr + rows, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))      # empty split: weight 0
        denom = tl.sum(w, 0)
        o = tl.load(ws_o_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        res = tl.sum(o * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
        t = (t0 + i).to(tl.int64)
        tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d,
                 res.to(out_ptr.dtype.element_ty), mask=d_ok)


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Decode tiles (max q_len <= 16, and the direct class of mixed launches): memory bound, so
# few rows (>= 16 for tl.dot, >= G) and many small programs; prefill tiles: compute bound,
# FlashAttention-2-sized. A mixed launch compiles both into one kernel with the prefill
# tile's warps/stages. Register counts are ptxas's for sm_90 (bench/triton_compile_check.py,
# no GPU needed, prints every shipped config; bench/NOTES.md "Triton attention, issue 12"):
# bf16 D=128 decode 16x64 / 4 warps / 3 stages 158-196 regs, 71 KB (two K/V tiles in
# flight: async_wait num = 2); spec decode 64x64 / 4 warps 204-255; mixed 128x64 + 16x64 /
# 8 warps / 4 stages 218 regs, 160 KB (num = 4: two tiles ahead; 128x128 tiles: 255 regs,
# 16 bytes spilled, 224 KB: not shipped); D=256 prefill 64x32 spills with 4 warps, not
# with 8 (188-210). fp32 (ieee: no tensor-core path, an FMA dot) spills at
# 32x32 and up, so it gets 16x16 tiles; ptxas still spilled 4-16 bytes at 4 warps / 2 stages
# (D=64/80) and at 4 warps for D=256, hence the warps/stages below (sm_80: 8 warps / 3
# stages everywhere). It is the accuracy path, not a fast one. Stored, not autotuned:
# autotuning syncs and re-benchmarks per new shape, which breaks CUDA-graph capture.
_DECODE_MAX_Q = 16
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 512      # below this a split's fixed cost (q load, merge) dominates
TWO_CLASSES = True            # False: mixed launches use one (prefill) tile class; for A/B timing
DEFER_PV = True               # False: the prefill tile's P.V in tile order (no overlap); A/B timing


def _defer_pv(plan, dtype: torch.dtype, arch: int, softcap: bool = False,
              kv_fp8: bool = False) -> bool:
    """Defer P.V by one tile in the search class (_kv_tiles_deferred) where its dots are wgmma:
    sm_90+, half precision (fp32 runs an FMA dot: nothing async to overlap), >= 64 rows per
    warpgroup (wgmma's M). (That loop scales after the row max: the scale is > 0, which
    kernels.paged_attention checks.) Not with a softcap (its tanh makes the loop issue-bound,
    2400+ warp-instructions a tile, and the carried P spilled 56 bytes) nor fp8 pages (V is
    converted in registers and copied to one shared buffer, so Triton waits for the P.V
    wgmma at once: nothing overlaps, and the carried P took 254-255 registers). The direct
    (decode) class keeps tile order: its 16-row tiles run mma.sync, and carrying P would
    cost registers a memory-bound loop does not repay."""
    cfg = plan.cfg
    return (DEFER_PV and plan.search and arch >= 90 and dtype != torch.float32
            and cfg.block_m * 4 // cfg.num_warps >= 64
            and not (softcap or kv_fp8))


# Configs tuned offline per GPU model (bench/tune_triton.py measures candidates on the device
# and writes this file; nothing is tuned in the serving path). Keys "decode|prefill:d<D>:g<G>:
# <dtype>": decode = decode-only launches (q_len 1), prefill = launches with q_len > 16 (their
# prefill tile; a mixed launch's direct class takes the decode entry's tile, with the prefill
# entry's warps and stages). Anything absent
# uses the heuristics of _config.
TUNED_FILE = Path(__file__).with_name("tuned_attention.json")


def tuned_key(cls: str, head_dim: int, group: int, dtype: torch.dtype) -> str:
    return f"{cls}:d{head_dim}:g{group}:{str(dtype).removeprefix('torch.')}"


def _valid(cfg: _Config, cls: str, group: int) -> bool:
    pow2 = all(v > 0 and v & (v - 1) == 0 for v in (cfg.block_m, cfg.block_n, cfg.num_warps))
    return (pow2 and 16 <= cfg.block_m <= 256 and 16 <= cfg.block_n <= 256
            and cfg.block_m >= group and 1 <= cfg.num_warps <= 16 and 1 <= cfg.num_stages <= 8
            and (cls == "prefill" or cfg.block_m <= 64))


@functools.lru_cache(maxsize=None)
def _tuned(device_name: str, path: str) -> dict:
    """{key: _Config} stored for this device name; a malformed entry raises (a broken table
    must not silently fall back)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    table = {}
    for key, v in data.get("devices", {}).get(device_name, {}).items():
        cls = key.split(":")[0]
        cfg = _Config(*(int(x) for x in v["config"])) if isinstance(v, dict) else None
        group = int(key.split(":g")[1].split(":")[0]) if ":g" in key else 0
        if cfg is None or cls not in ("decode", "prefill") or not _valid(cfg, cls, group):
            raise ValueError(f"{path}: entry {key!r} for {device_name!r} is not a valid config: {v!r}")
        table[key] = cfg
    return table


def device_name(device: torch.device) -> str:
    """Key of the tuned table: the CUDA device name, or "interpreter" on CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"


@functools.lru_cache(maxsize=None)
def _config(head_dim: int, dtype: torch.dtype, group: int, max_seqlen_q: int,
            arch: int = 90, device_name: str = "", kv_fp8: bool = False) -> _Config:
    cls = "decode" if max_seqlen_q == 1 else "prefill" if max_seqlen_q > _DECODE_MAX_Q else ""
    if cls and device_name:
        cfg = _tuned(device_name, str(TUNED_FILE)).get(tuned_key(cls, head_dim, group, dtype))
        if cfg is not None:
            return cfg
    if dtype == torch.float32:
        if arch < 90:
            cfg = _Config(16, 16, 8, 3)
        else:
            cfg = _Config(16, 16, 8, 2) if head_dim > 128 else _Config(16, 16, 4, 3)
    elif kv_fp8 and max_seqlen_q <= _DECODE_MAX_Q and group * max_seqlen_q <= 16:
        # fp8 pages are converted in registers: 16x64 / 4 warps spilled 8 bytes (per-slot
        # scales, 168 regs) and 16x32 too; 2 warps: 254-255 regs, none, 4 CTAs per SM
        cfg = _Config(16, 64 if head_dim <= 128 else 32, 2, 3)
    elif max_seqlen_q <= _DECODE_MAX_Q:
        block_m = min(max(16, triton.next_power_of_2(max(1, group * max_seqlen_q))), 64)
        warps = 8 if block_m * head_dim > 32 * 256 else 4    # 64 x 256 at 4 warps spills
        # D <= 64: 128-key tiles (the same 32 KB of K+V per tile as 64 keys at D=128); with
        # 64 keys ptxas spilled one register at G=16 (96 regs, sm_90)
        cfg = _Config(block_m, 32, warps, 3) if head_dim > 128 else _Config(
            block_m, 128 if head_dim <= 64 else 64, 4, 3)
    else:
        cfg = _Config(64, 32, 8, 3) if head_dim > 128 else _Config(128, 64, 8, 4)
    if arch < 90 and dtype != torch.float32 and (cfg.block_m >= 64 or head_dim > 128):
        # sm_80 (mma.sync, no wgmma) spills 28-128 bytes at 255 regs with 128x64 / 8 warps,
        # 64x64 / 4 warps and 128x32 / 8 warps; 64 rows at 8 warps, 2 stages: 184, no spill.
        # D=256 decode 16x32: 8 warps get 128 regs and spill with a window or softcap (after
        # the block-id prefetch); 4 warps / 3 stages 208-230 regs, none, pipelined.
        if cfg.block_m <= 16 and head_dim > 128:
            cfg = _Config(cfg.block_m, cfg.block_n, 4, 3)
        elif max_seqlen_q > _DECODE_MAX_Q and head_dim <= 128:
            # prefill 64x64 / 8 warps: 3 stages pipeline (async_wait num 2), 186 regs, 88 KB
            cfg = _Config(64, cfg.block_n, 8, 3)
        else:                     # 64x128 (D <= 64 spec decode) spilled at 255 regs: 64 keys
            cfg = _Config(min(cfg.block_m, 64), min(cfg.block_n, 64), 8,
                          3 if max_seqlen_q > _DECODE_MAX_Q else 2)
    if cfg.block_m < group:       # a q block must hold at least one token's G heads
        cfg = _Config(triton.next_power_of_2(group), cfg.block_n, cfg.num_warps, cfg.num_stages)
    return cfg


@functools.lru_cache(maxsize=None)
def _arch(device: torch.device) -> int:
    """Compute capability as 80, 90, ...; the interpreter plans for an H100."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return device_name(device)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4                      # interpreter: a nominal small machine


# Resident-CTA model for the split count (per SM: 64K registers, 64 warps, shared memory
# below). Registers are not known on the host before a compile; this is the most ptxas gave
# a shipped decode tile that splits (bench/NOTES.md "Triton attention, issue 12": 16x64 bf16
# D=128, 4 warps, split: 196 at sm_90; 158 unsplit), rounded up to the granule of 8.
_DECODE_REGS = 200
_SMEM_PER_SM = {90: 228 * 1024, 80: 164 * 1024}
WORKSPACE_CAP = 256 * 2 ** 20  # bytes of split-KV workspace one launch may allocate


def _resident_ctas(cfg: _Config, block_d: int, elt: int, arch: int) -> int:
    """Decode-tile programs one SM holds at once: the tightest of registers, warps and the
    pipeline's shared memory (num_stages K and V tiles)."""
    by_regs = 65536 // (_DECODE_REGS * 32 * cfg.num_warps)
    smem = max(1, cfg.num_stages - 1) * 2 * cfg.block_n * block_d * elt   # K + V buffers
    by_smem = _SMEM_PER_SM.get(arch, 228 * 1024) // max(1, smem)
    return max(1, min(by_regs, 64 // cfg.num_warps, by_smem, 32))


def _num_splits(programs: int, max_seqlen_k: int, device: torch.device,
                resident: int = 4) -> int:
    """Split-KV factor from host ints, for `programs` (sequences x KV heads) that would split:
    fill one wave (SMs x resident CTAs per SM; fewer programs leave SMs idle, more than one
    wave only adds merge traffic) without splits shorter than MIN_KEYS_PER_SPLIT."""
    busy = max(1, programs)
    target = resident * _sm_count(device)
    if busy >= target:
        return 1
    by_len = max_seqlen_k // MIN_KEYS_PER_SPLIT
    return max(1, min(triton.cdiv(target, busy), by_len, MAX_SPLITS))


@dataclass(frozen=True)
class _Plan:
    """Host-int launch plan.

    Search class (mixed and single-class prefill launches): num_search slots of q_per_block
    tokens, found by binary search, for sequences with q_len >= min_q; never split. Direct
    class (decode-only and mixed launches): program b * direct_splits + split for every
    sequence with q_len < min_q, in q blocks of q_per_block_d tokens; only it splits, and
    only its rows have workspace: ws_rows per split, one per token (decode-only) or
    _DECODE_MAX_Q per sequence (ws_by_seq, mixed: the host cannot tell which are short)."""
    cfg: _Config                # the kernel's warps/stages: search tile if any, else direct
    mixed: bool
    search: bool
    direct: bool
    num_search: int
    q_per_block: int
    seq_div: int
    min_q: int
    block_m_d: int
    block_n_d: int
    q_per_block_d: int
    direct_splits: int
    ws_rows: int                # 0: no workspace
    ws_by_seq: bool
    q_loop: bool                # direct programs loop over q blocks (else one q block each)
    num_programs: int           # per KV head

    @property
    def splits(self) -> int:
        return self.direct_splits


_NO_SEARCH = 2 ** 31 - 1          # min_q of a decode-only launch: every sequence is direct


def _plan(T: int, B: int, Hkv: int, D: int, dtype: torch.dtype, group: int, max_seqlen_q: int,
          max_seqlen_k: int, num_kv_splits: Optional[int], device: torch.device,
          kv_dtype: Optional[torch.dtype] = None) -> _Plan:
    arch, name = _arch(device), _device_name(device)
    fp8 = kv_dtype == torch.float8_e4m3fn
    kv_elt = 1 if fp8 else torch.finfo(dtype).bits // 8
    cfg = _config(D, dtype, group, max_seqlen_q, arch, "" if fp8 else name, fp8)
    q_per_block = cfg.block_m // group
    dcfg = _config(D, dtype, group, 1, arch, "" if fp8 else name, fp8)
    Hq = Hkv * group
    block_d = max(16, triton.next_power_of_2(D))
    row_bytes = Hq * (D + 1) * 4              # fp32 partial output + lse, per row and split

    def splits_for(programs: int, ws_rows: int, c: _Config) -> int:
        s = num_kv_splits if num_kv_splits is not None else _num_splits(
            programs, max_seqlen_k, device,
            _resident_ctas(c, block_d, kv_elt, arch))
        s = max(1, min(int(s), MAX_SPLITS, WORKSPACE_CAP // max(1, ws_rows * row_bytes)))
        return s if s > 1 else 1

    if max_seqlen_q <= _DECODE_MAX_Q:
        # Decode-only launch (decodes, speculative queries): one class, sequence b's programs
        # found by index; any q_len still works (q blocks are looped), max_seqlen_q only
        # picks the tile. Every row may split: workspace one row per token.
        s = splits_for(B * Hkv, T, cfg)
        return _Plan(cfg, False, False, True, 0, q_per_block, 0, _NO_SEARCH, cfg.block_m,
                     cfg.block_n, q_per_block, s, T if s > 1 else 0, False,
                     max_seqlen_q > q_per_block, B * s)
    # A launch that may hold prefill rows (q_len > 16) gives the sequences with q_len <= 16
    # their own decode tile: a decode at G = 4 fills 4 of a 128-row prefill tile's rows.
    mixed = TWO_CLASSES and dcfg.block_m < cfg.block_m
    if not mixed:                 # one class: every sequence by search, any q_len, no split
        n = T // q_per_block + B
        return _Plan(cfg, False, True, False, n, q_per_block, 0, 0, 16, 16, 1, 1, 0, False,
                     False, n)
    # Search class: only q_len >= 17, so at most T // 17 such sequences: slot starts
    # cu[b] // Q + cu[b] // 17 still leave each cdiv(q_len, Q) slots. It never splits (a
    # prefill chunk keeps the SMs busy). Direct class: every sequence (the host cannot tell
    # which are short) x splits, which only decode-class rows use: a 64k-context decode
    # beside a chunk must still split, or it is the launch's tail long after the chunk.
    # No sequence can be short when B == 1 and T > 16 (a lone prefill): nothing splits.
    min_q = _DECODE_MAX_Q + 1
    seq_div = min_q if T // min_q < B else 0
    n = T // q_per_block + (T // min_q if seq_div else B)
    ws_rows = _DECODE_MAX_Q * B
    s = 1 if (B == 1 and T >= min_q) else splits_for(B * Hkv, ws_rows, dcfg)
    return _Plan(cfg, True, True, True, n, q_per_block, seq_div, min_q, dcfg.block_m,
                 dcfg.block_n, dcfg.block_m // group, s, ws_rows if s > 1 else 0, True,
                 True, n + B * s)


def workspace_bytes(num_tokens: int, num_seqs: int, num_q_heads: int, num_kv_heads: int,
                    head_dim: int, dtype: torch.dtype, max_seqlen_q: int, max_seqlen_k: int,
                    device: torch.device, num_kv_splits: Optional[int] = None,
                    kv_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of split-KV workspace one launch of this shape allocates (0: none), besides its
    output; at most WORKSPACE_CAP. For memory planning (ragged/profiling.py)."""
    if num_tokens == 0 or num_seqs == 0:
        return 0
    p = _plan(num_tokens, num_seqs, num_kv_heads, head_dim, dtype, num_q_heads // num_kv_heads,
              max_seqlen_q, max_seqlen_k, num_kv_splits, device, kv_dtype)
    return p.direct_splits * p.ws_rows * num_q_heads * (head_dim + 1) * 4 if p.ws_rows else 0


# --------------------------------------------------------------------------- launcher
def _launch(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, scale: float,
            max_seqlen_q: int, max_seqlen_k: int, sliding_window: Optional[int],
            softcap: Optional[float], num_kv_splits: Optional[int], k_scale=None,
            v_scale=None) -> None:
    T, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    B = seq_lens.shape[0]
    if k_cache.shape[-1] != D or Hq % Hkv != 0:
        raise ValueError(f"k_cache: shape {tuple(k_cache.shape)} does not fit q's {tuple(q.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache: caches must be contiguous")
    if q.stride(-1) != 1 or out.stride(-1) != 1 or out.shape != q.shape:
        raise ValueError("out: must match q's shape with a contiguous last dimension")
    group = Hq // Hkv
    if group > 128:
        raise ValueError(f"q: {group} query heads per KV head is more than the supported 128")
    if T == 0 or B == 0:
        return
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 and q.device.type == "cuda" and _arch(q.device) < 89:
        raise ValueError("k_cache: fp8 e4m3 caches need compute capability >= 8.9 with the "
                         "Triton backend (Triton has no e4m3 conversion before sm_89)")
    plan = _plan(T, B, Hkv, D, q.dtype, group, max_seqlen_q, max_seqlen_k, num_kv_splits,
                 q.device, k_cache.dtype)
    cfg, splits = plan.cfg, plan.direct_splits
    block_d = max(16, triton.next_power_of_2(D))
    if plan.ws_rows:
        ws_o = torch.empty(splits, plan.ws_rows, Hq, D, dtype=torch.float32, device=q.device)
        ws_lse = torch.empty(splits, plan.ws_rows, Hq, dtype=torch.float32, device=q.device)
    else:
        ws_o = ws_lse = out                       # unused (nothing splits)
    use_softcap = softcap is not None and softcap > 0
    window = int(sliding_window) if sliding_window else 0
    per_slot = fp8 and isinstance(k_scale, torch.Tensor)
    ks, vs = (k_scale, v_scale) if per_slot else (seq_lens, seq_lens)   # unused if not per slot
    if fp8 and not per_slot:      # per-tensor: k's scale rides on the scores, v's on the output
        scale = scale * float(k_scale)
    out_scale = float(v_scale) if fp8 and not per_slot else 1.0
    _paged_attn_kernel[(plan.num_programs * Hkv,)](
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, ws_o, ws_lse,
        ks, vs, out_scale, B, Hq, Hkv, group, B.bit_length(), plan.num_search, plan.q_per_block, plan.seq_div,
        plan.min_q, splits, plan.q_per_block_d, plan.ws_rows,
        scale / softcap if use_softcap else scale * LOG2E,
        float(softcap) if use_softcap else 0.0, window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_M_D=plan.block_m_d,
        BLOCK_N_D=plan.block_n_d, BLOCK_D=block_d, BLOCK_SIZE=block_size, EVEN_D=block_d == D,
        SEARCH=plan.search, DIRECT=plan.direct, SPLIT=splits > 1, WS_BY_SEQ=plan.ws_by_seq,
        Q_LOOP=plan.q_loop,
        WINDOW=window > 0, SOFTCAP=use_softcap,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", KV_FP8=fp8,
        PER_SLOT_SCALE=per_slot,
        DEFER_PV=_defer_pv(plan, q.dtype, _arch(q.device), use_softcap, fp8),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1:
        _merge_kernel[(B if plan.ws_by_seq else T, Hq)](
            out, ws_o, ws_lse, cu_seqlens_q, plan.ws_rows, Hq, splits, plan.min_q,
            out.stride(0), out.stride(1), HEAD_DIM=D, BLOCK_S=MAX_SPLITS, BLOCK_D=block_d,
            WS_BY_SEQ=plan.ws_by_seq, num_warps=4 if D > 64 else 2)


def warmup(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
           block_size: int, device, *, sliding_window: Optional[int] = None,
           softcap: Optional[float] = None, max_query_len: int = 1, prefill: bool = True,
           scale: Optional[float] = None, kv_cache_dtype: Optional[torch.dtype] = None,
           per_slot_scales: bool = True) -> int:
    """Compile every kernel variant a run with these model constants can launch, by running
    each once on a tiny batch, so no JIT compile (2-3 s each on a GPU) lands in a timed step.
    Call once per attention shape after the model is built, before serving or timing.

    A variant is fixed by constexprs only: the tile class (decode-only launches: one per
    distinct tile over max_seqlen_q = 1..max_query_len, the largest query a decode step can
    hold, e.g. 1 + speculative tokens; mixed/prefill launches when `prefill`), split or not,
    the window/softcap flags and the block size. Every runtime int that varies between steps
    is in do_not_specialize, q/out strides are those of contiguous [T, Hq, D] tensors (what
    the model passes) and cache strides depend only on block size, Hkv and D, so the same
    variants serve any batch. kv_cache_dtype torch.float8_e4m3fn: the fp8 variants (per-slot
    or per-tensor scales). Returns the number of launches run."""
    device = torch.device(device)
    kw = dict(dtype=dtype, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    D = head_dim
    scale = D ** -0.5 if scale is None else scale
    cache = torch.zeros(4, block_size, num_kv_heads, D, dtype=kv_cache_dtype or dtype,
                        device=device)
    ks = vs = None
    if cache.dtype == torch.float8_e4m3fn:
        ks = vs = (torch.ones(4, block_size, num_kv_heads, dtype=torch.float32, device=device)
                   if per_slot_scales else 1.0)
    shapes = [[mq, mq] for mq in range(1, min(max_query_len, _DECODE_MAX_Q) + 1)]
    if prefill:
        shapes.append([_DECODE_MAX_Q + 1, 1])   # mixed (or single-class prefill) launch
    n = 0
    for q_lens in shapes:
        seq_lens = [q + 2 for q in q_lens]
        T = sum(q_lens)
        q = torch.zeros(T, num_q_heads, D, **kw)
        cu = torch.tensor([0, q_lens[0], T], **i32)
        table = torch.zeros(2, 4, **i32)
        for splits in (1, 2):
            _launch(q, cache, cache, table, cu, torch.tensor(seq_lens, **i32),
                    torch.empty_like(q), scale, max(q_lens), max(seq_lens), sliding_window,
                    softcap, splits, ks, vs)
            n += 1
    return n


# torch.compile sees an opaque op that mutates `out`; eager calls skip the dispatcher. Scales
# travel as optional tensors (per slot) or optional floats (per tensor): one schema for both.
@torch.library.custom_op("ragged_triton::paged_attention", mutates_args=("out",))
def _paged_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_table: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        seq_lens: torch.Tensor, out: torch.Tensor, scale: float,
                        max_seqlen_q: int, max_seqlen_k: int, sliding_window: Optional[int],
                        softcap: Optional[float], num_kv_splits: Optional[int],
                        k_scale: Optional[torch.Tensor] = None,
                        v_scale: Optional[torch.Tensor] = None,
                        k_scale_f: Optional[float] = None,
                        v_scale_f: Optional[float] = None) -> None:
    _launch(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, scale,
            max_seqlen_q, max_seqlen_k, sliding_window, softcap, num_kv_splits,
            k_scale if k_scale is not None else k_scale_f,
            v_scale if v_scale is not None else v_scale_f)


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, scale, max_seqlen_q,
      max_seqlen_k, sliding_window, softcap, num_kv_splits, k_scale=None, v_scale=None,
      k_scale_f=None, v_scale_f=None) -> None:
    return None


# --------------------------------------------------------------------------- public
def paged_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *, scale: float,
                    max_seqlen_q: int, max_seqlen_k: int, sliding_window: Optional[int] = None,
                    softcap: Optional[float] = None, out: Optional[torch.Tensor] = None,
                    num_kv_splits: Optional[int] = None, k_scale=None,
                    v_scale=None) -> torch.Tensor:
    """Ragged paged attention -> [T, Hq, D] (written into ``out`` when given).

    num_kv_splits above MAX_SPLITS is clamped to it (results do not depend on it).
    k_scale/v_scale: for float8_e4m3fn caches (FP8_INTERFACE: per-slot float32 tensors
    [num_blocks, block_size, Hkv] or per-tensor floats), checked by kernels.paged_attention.

    Arguments as kernels.paged_attention (which validates them); max_seqlen_k is a host bound
    used only for the split heuristic; max_seqlen_q picks the tile class and must bound every
    q_len of a decode-only launch (max_seqlen_q <= 16: one q block per sequence unless
    max_seqlen_q exceeds it; the batch builder passes the true maximum).
    """
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if torch.compiler.is_compiling():
        t = isinstance(k_scale, torch.Tensor)
        _paged_attention_op(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out,
                            float(scale), int(max_seqlen_q), int(max_seqlen_k), sliding_window,
                            softcap, num_kv_splits, k_scale if t else None,
                            v_scale if t else None,
                            None if t or k_scale is None else float(k_scale),
                            None if t or v_scale is None else float(v_scale))
    else:
        _launch(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, float(scale),
                int(max_seqlen_q), int(max_seqlen_k), sliding_window, softcap, num_kv_splits,
                k_scale, v_scale)
    return out
