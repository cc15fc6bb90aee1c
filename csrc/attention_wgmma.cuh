// The tensor-core tile of paged_attention_kernel on sm_90a: wgmma.mma_async (csrc/wgmma.cuh)
// in place of mma.sync + ldmatrix. Included by paged_attention.cu inside its namespace, after
// copy_kv_chunk / LeanCfg (it reuses both); the kernel's tc branch calls wgmma_tile when
// RAGGED_WGMMA (sm_90a, or the emulator's arch-90 build).
//
// Same CTA contract as the mma.sync tile: 64 rows (one warpgroup, 16 per warp), keys [lo, hi)
// of one split, K/V tiles of WgmmaCfg::NK keys (16 KB: 32 keys at D 128, 64 at D 64; 32 KB,
// 64 keys, with Q in registers at D 128; D 80 / 96 (16-bit caches only): 32 keys in D 128's
// padded layout, 10 / 12 KB of it written), 2
// cp.async stages, fp8 caches dequantised at the copy (copy_kv_chunk), FA2 online softmax in
// fp32 registers. Per tile: S = Q K^T by D / 16 wgmma m64n{NK}k16 (B = K, K-major in shared
// memory; A = Q from registers in the QR instantiations (prefill launches, 3 CTAs/SM: Q's
// fragments read once per CTA, load_q), else K-major in shared memory too), then O += P V
// by NK / 16 wgmma m64n{D}k16 (A = P from registers: the accumulator fragment of S is the A
// fragment of P, as with mma.sync; B = V, N-major with the transpose bit: V is [key][d]).
// One wgmma instruction does the work of 16 HMMA.16816 (64 x N x 16 against 16 x 8 x 16) and
// needs no ldmatrix: the report counts the loop's instructions (bench/kernel_report.py), and
// the per-score softmax is what remains.
// Shared memory: Q [D / 64 panels][64 rows][128 B], then 2 stages of K, V [D / 64][NK][128 B];
// each panel row holds 64 values of a row's D with its 16-byte chunk c at c ^ (row % 8) (the
// 128B swizzle), so every 8-row group is one 1024-byte swizzle atom. D 80 / 96: Q and K take
// 2 panels (DP = 128) of which only the D / 8 real chunks are copied and read (QK^T's k-steps
// 0..D/16-1: k-step 4 / 4-5 in panel 1); V takes [D / 16 | D / 32 panels][NK][32 | 64 B]
// in the 32B / 64B swizzle (wgmma.cuh: N = D must be whole swizzle rows), so P V is one
// m64n80k16 / m64n96k16 per 16 keys (predicted H100 prefill 2k: 344 / 398 TFLOP/s, 463 /
// 480 warp-instructions a tile, 7 / 8 HGMMA; the lean tile: 15.8 / 17.6 TFLOP/s). The base is
// rounded up to 1024 bytes of the shared window (the swizzle is on address bits): see
// WgmmaCfg. wgmma
// runs on every warp of the warpgroup even with no rows (missing rows are zero Q and fully
// masked scores), so the warpgroup collectives always see 128 threads.
// Tiles every row of the CTA sees whole run a loop without the mask code, softcap has its own
// loops (run): the prefill loop the report reads (bench.kernel_report, bf16 D 128) is 770
// warp-instructions a 64-key tile with Q in registers (477 a 32-key tile before; 514 with Q
// in shared memory; the mma.sync tile: 1086). Predicted H100 Llama-3-8B prefill 2k: 338-661
// TFLOP/s (no overlap - issue ceiling) at 2 CTAs/SM, 254 registers, no spills, against
// 302-533 with 32-key tiles at 3 CTAs/SM and 261-495 with A = Q from shared memory:
// predicted, no GPU ran.
#pragma once
// (wgmma.cuh is included by paged_attention.cu at file scope: this file is inside its namespace.)

// Shared memory of the wgmma tile: 16 B of stash (the epilogue's indices, see wgmma_tile),
// then Q and 2 stages from the next 1024-byte boundary: dynamic shared memory is 16-byte
// aligned, so stash + padding take 16..1024 bytes. The launch takes the max with the lean
// tile's 49792 B: 50176 B at D 128, so 2 CTAs/SM still fit sm_86/89's 100 KB (2 x (50176 +
// 1 KB reserved) = 100 KB exactly), 3 sm_80's 164 KB, 4 sm_90's 228 KB.
// D 80 / 96 take D 128's padded layout (DP = 128: NK 32, the same bytes, so the same CTAs/SM).
// QR at D 128 (Q in registers, prefill launches): 64-key tiles, 32 KB a stage. The per-tile
// work that does not scale with keys (O's rescale: 64 FMULs a thread, the barriers, waits and
// descriptors) is then paid once per 64 keys: predicted H100 prefill 2k 307-551 -> 336-681
// TFLOP/s (747 warp-instructions per 64-key tile against 2 x 462), at 243 registers and
// 81 KB, 2 CTAs/SM (MinBlocks); the other classes keep 16 KB tiles (4 CTAs/SM).
template <typename T, int DM, bool QR = false>
struct WgmmaCfg {
  static constexpr int DP = (DM + 63) / 64 * 64;  // D padded to whole 64-value panels
  static constexpr int NK = (QR && DM == 128 ? 2 : 1) * kTileBytes /
                            (2 * DP * static_cast<int>(sizeof(T)));
  static constexpr uint32_t TILES = kTcRows * DP * sizeof(T) + 2 * 2 * NK * DP * sizeof(T);
  static constexpr size_t SMEM = TILES + 1024;
};

struct TcArgs {
  int b, q_start, ctx, row0, nrows, G, kvh, lo, hi, split, nsplit;
};

#if RAGGED_WGMMA
// The tile's state over its K/V loop (registers once inlined: every member function is
// __forceinline__, the object a local of wgmma_tile).
template <typename T, int DM, bool FP8, bool QR>
struct WgmmaTile {
  using LC = LeanCfg<T, DM, true>;
  // NC lanes a group copy chunks c < CH (D 80 / 96: the lean tile's 16-lane groups, 10 / 12
  // real chunks; the lanes past them copy nothing), DT = CH 8-column accumulator tiles.
  static constexpr int VEC = LC::VEC, NC = LC::NC, NG = LC::NG, DT = DM / 8;
  static constexpr int NK = WgmmaCfg<T, DM, QR && !FP8>::NK, LOADS = NK * NC / kThreads;
  static constexpr int CH = DM / 8, DP = WgmmaCfg<T, DM>::DP;
  static constexpr int QB = kTcRows * 128, KB = NK * 128;   // bytes of a Q panel, a K/V panel
  static constexpr int QBYTES = QB * (DP / 64), STAGE = 2 * KB * (DP / 64);
  // V's swizzle (wgmma.cuh): 128B rows at D 64 / 128 (V then has K's layout), 64B rows at D 96,
  // 32B at D 80, so that N = D is whole swizzle rows of VW / 2 values (canonical MN-major).
  static constexpr int VW = DM % 64 == 0 ? 128 : DM % 32 == 0 ? 64 : 32, VCPR = VW / 16;
  static_assert(NK * NC % kThreads == 0 && NK * VW % 1024 == 0 && sizeof(T) == 2 &&
                    (DM == 64 || DM == 80 || DM == 96 || DM == 128) && !(FP8 && DM % 64),
                "wgmma tile: 16-bit D 64/80/96/128 (fp8 caches: D 64/128)");

  const PagedAttentionParams& p;
  char* base;        // the 1024-aligned start (generic address), Q then the stages
  uint32_t sbase;    // its shared-window address (descriptors)
  const int32_t* bt;
  int lo, hi, nt, t4, qposA, qposB, stage;
  int wkey, wbi, woff;  // the block walk of this thread's next key (keys grp + j NG, tile order)
  int64_t wpage;
  float sl2, inv_cap;
  float o[DM / 2];      // O [64 x DM] accumulators (wgmma fragment: o[4d + q] is mma's o[d][q])
  // QREG: Q in registers, the A fragments of QK^T's k-steps (load_q), fixed over the loop:
  // the QR instantiations (MinBlocks: 3 CTAs/SM). Not for fp8 caches: their D 128 tile is at
  // 162 of 3 CTAs/SM's 168 registers already.
  static constexpr bool QREG = QR && !FP8;
  uint32_t qf[QREG ? DM / 16 : 1][4];
  float mA, mB, lA, lB; // running max (log2 units) and this lane's part of the sum, rows A/B

  // Byte offset of 16-byte chunk ch of row r in a swizzled [panels][rows][128 B] array.
  static __device__ __forceinline__ int off(int r, int ch, int rows) {
    return (ch >> 3) * rows * 128 + r * 128 + (((ch & 7) ^ (r & 7)) << 4);
  }
  // The same for V: [D / (VW / 2) panels][NK keys][VW bytes], chunk c of key k at chunk
  // c % VCPR ^ the key's address bits 7.. (the swizzle XORs bits 4.. with 7..; = off at 128).
  static __device__ __forceinline__ int voff(int k, int ch) {
    return (ch / VCPR) * NK * VW + k * VW + (((ch % VCPR) ^ (k * VW / 128 % VCPR)) << 4);
  }
  __device__ __forceinline__ int64_t page_of(int bi) const {
    return static_cast<int64_t>(bt[bi]) *
           (static_cast<int64_t>(p.num_kv_heads) * DM * p.block_size);
  }
  // K/V of the next tile into `st`: thread (grp, c) copies chunk c of keys grp + j NG, the
  // mma.sync tile's walk (the block index stepped, never divided, in the loop).
  __device__ __forceinline__ void load(int st) {
    const int grp = threadIdx.x / NC, c = threadIdx.x % NC;
    const int head_c = blockIdx.y * DM + c * VEC;   // < 2^24: Hkv <= 65535, D <= 256
    char* ks = base + QBYTES + st * STAGE;
#pragma unroll
    for (int j = 0; j < LOADS; ++j) {
      const int k = grp + j * NG;
      const bool valid = wkey < hi;
      const int64_t src =
          wpage + static_cast<int64_t>(woff) * (p.num_kv_heads * DM) + head_c;
      if (c < CH)  // D 80 / 96: K columns 80 / 96 .. 127 are never written, never read
        copy_kv_chunk<T, FP8, VEC>(reinterpret_cast<T*>(ks + off(k, c, NK)),
                                   reinterpret_cast<T*>(ks + STAGE / 2 + voff(k, c)), p, src,
                                   valid, bt, wbi, woff, blockIdx.y);
      wkey += NG;
      woff += NG;
      if (woff >= p.block_size) {
        woff -= p.block_size;
        ++wbi;
        if (wkey < hi) wpage = page_of(wbi);
      }
    }
  }
  // This warp's Q rows as wgmma A fragments (wgmma.cuh: a[0] (g, 2t), a[1] (g+8, 2t), a[2]
  // (g, 2t+8), a[3] (g+8, 2t+8) of k-step kk's 16 columns, i.e. chunks 2kk and 2kk+1), read
  // once per CTA from the swizzled Q tile: QK^T then reads only K from shared memory (RS),
  // 8 KB a 32-key tile less at D 128 than A = Q by descriptor (SS).
  __device__ __forceinline__ void load_q() {
    if constexpr (!QREG) return;
    const int lane = threadIdx.x & 31, r = (threadIdx.x >> 5) * 16 + (lane >> 2), t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < DM / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        qf[kk][i] = *reinterpret_cast<const uint32_t*>(
            base + off(r + 8 * (i & 1), 2 * kk + (i >> 1), kTcRows) + 4 * t);
  }
  // One K/V tile: prefetch the next, S = Q K^T, online softmax, O += P V. MASK: apply the
  // causal / window / `hi` / missing-row masks (the tiles the CTA does not see whole: the
  // caller runs the others without); CAP: softcap.
  template <bool MASK, bool CAP>
  __device__ __forceinline__ void step(int it) {
    if (it + 1 < nt) load(stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();  // the copies (generic proxy) before wgmma's reads (async proxy)
    __syncthreads();
    const uint32_t ks = sbase + QBYTES + stage * STAGE, vs = ks + STAGE / 2;
    float s[NK / 2];  // S [64 x NK]: s[4n + j] is mma.sync's sc[n][j]
    wgmma_pin(s);     // (CUTLASS pins the chain's accumulators before its fence; S has no
                      // definition before it, the first wgmma ignores its old value)
    if constexpr (QREG) {
#pragma unroll
      for (int kk = 0; kk < DM / 16; ++kk) wgmma_pin(qf[kk]);  // Q stays in registers
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < DM / 16; ++kk) {
      const uint64_t dk = gmma_desc(ks + (kk >> 2) * KB + (kk & 3) * 32, 16, 1024);
      if constexpr (QREG)
        wgmma_rs<T, NK, false>(s, qf[QREG ? kk : 0], dk, kk > 0);
      else
        wgmma_ss<T, NK, false>(s, gmma_desc(sbase + (kk >> 2) * QB + (kk & 3) * 32, 16, 1024),
                               dk, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_pin(s);
    // Scores stay unscaled until the exp2's FFMA (x f), as in the mma.sync tile.
    float f = sl2;
    if constexpr (CAP) {
#pragma unroll
      for (int j = 0; j < NK / 2; ++j) s[j] = p.softcap * tanhf(s[j] * sl2 * inv_cap) * kLog2e;
      f = 1.f;
    }
    if constexpr (MASK) {
      const int key0 = lo + it * NK, window = p.sliding_window;
#pragma unroll
      for (int j = 0; j < NK / 2; ++j) {
        const int key = key0 + 8 * (j >> 2) + 2 * t4 + (j & 1);
        const int qp = (j & 2) ? qposB : qposA;
        const bool ok = key < hi && key <= qp && (window <= 0 || key > qp - window);
        if (!ok) s[j] = -INFINITY;
      }
    }
    float mxA = -INFINITY, mxB = -INFINITY;
#pragma unroll
    for (int n = 0; n < NK / 8; ++n) {
      mxA = fmaxf(mxA, fmaxf(s[4 * n], s[4 * n + 1]));
      mxB = fmaxf(mxB, fmaxf(s[4 * n + 2], s[4 * n + 3]));
    }
#pragma unroll
    for (int w = 1; w <= 2; w <<= 1) {
      mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, w));
      mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, w));
    }
    const float nA = fmaxf(mA, mxA * f), nB = fmaxf(mB, mxB * f);  // f > 0
    const float uA = nA == -INFINITY ? 0.f : nA, uB = nB == -INFINITY ? 0.f : nB;
    const float aA = fast_exp2(mA - uA), aB = fast_exp2(mB - uB);
    mA = nA;
    mB = nB;
    float sA = 0.f, sB = 0.f;
#pragma unroll
    for (int n = 0; n < NK / 8; ++n) {
      s[4 * n] = fast_exp2(fmaf(s[4 * n], f, -uA));
      s[4 * n + 1] = fast_exp2(fmaf(s[4 * n + 1], f, -uA));
      s[4 * n + 2] = fast_exp2(fmaf(s[4 * n + 2], f, -uB));
      s[4 * n + 3] = fast_exp2(fmaf(s[4 * n + 3], f, -uB));
      sA += s[4 * n] + s[4 * n + 1];
      sB += s[4 * n + 2] + s[4 * n + 3];
    }
    lA = lA * aA + sA;
    lB = lB * aB + sB;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      o[4 * d] *= aA; o[4 * d + 1] *= aA;
      o[4 * d + 2] *= aB; o[4 * d + 3] *= aB;
    }
    uint32_t pa[NK / 16][4];
#pragma unroll
    for (int kt = 0; kt < NK / 16; ++kt) {
      pa[kt][0] = pack2<T>(s[8 * kt], s[8 * kt + 1]);
      pa[kt][1] = pack2<T>(s[8 * kt + 2], s[8 * kt + 3]);
      pa[kt][2] = pack2<T>(s[8 * kt + 4], s[8 * kt + 5]);
      pa[kt][3] = pack2<T>(s[8 * kt + 6], s[8 * kt + 7]);
    }
#pragma unroll
    for (int kt = 0; kt < NK / 16; ++kt) wgmma_pin(pa[kt]);
    wgmma_pin(o);   // the rescale and the packs above the fence (CUTLASS warpgroup_fence_operand)
    wgmma_fence();  // O was rescaled and P written by ordinary instructions
#pragma unroll
    for (int kt = 0; kt < NK / 16; ++kt)  // 16 keys = 2 8-row groups of V (SBO 8 VW apart)
      wgmma_rs<T, DM, true>(o, pa[kt], gmma_desc<VW>(vs + kt * 16 * VW, NK * VW, 8 * VW), true);
    wgmma_commit();
    wgmma_wait<0>();  // O complete, and this stage's K/V no longer read ...
    wgmma_pin(o);     // (P's registers: ptxas tracks HGMMA's A operands until the wait)
    __syncthreads();  // ... by anyone: the next step's prefetch overwrites it
    stage ^= 1;
  }
  // Tiles [0, t_lo) and [t_hi, nt) masked, [t_lo, t_hi) not. One masked loop serves both
  // ends (the seg loop), so the loop body exists twice, not three times.
  template <bool CAP>
  __device__ __forceinline__ void run(int t_lo, int t_hi) {
    int it = 0;
    for (int seg = 0; seg < 2; ++seg) {
      const int end = seg == 0 ? t_lo : nt;
      for (; it < end; ++it) step<true, CAP>(it);
      if (seg == 0)
        for (; it < t_hi; ++it) step<false, CAP>(it);
    }
  }
};

template <typename T, int DM, bool FP8, bool QR>
__device__ __forceinline__ void wgmma_tile(const PagedAttentionParams& p, void* smem_raw,
                                           const TcArgs& a) {
  using W = WgmmaTile<T, DM, FP8, QR>;
  constexpr int CH = W::CH, NK = W::NK, VEC = W::VEC;
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t sbase = (raw + 16 + 1023u) & ~1023u;  // >= 16 B below it for the stash
  char* base = static_cast<char*>(smem_raw) + (sbase - raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // The host's sizing (WgmmaCfg::SMEM, set where kernel_arch says this tile runs), checked on
  // the GPU too: one compare per CTA, and a mis-sized launch traps instead of corrupting.
  if (sbase - raw + WgmmaCfg<T, DM, QR && !FP8>::TILES > dynamic_smem_bytes())
    device_trap("wgmma tile: dynamic shared memory below WgmmaCfg::SMEM");
  // The epilogue's indices wait in shared memory (16 B just below the tiles), not in registers
  // over the loop: at D 128 the loop holds O (64) + S (16) + P (8) and sat at the 128-register
  // cap of 4 CTAs/SM with 16 bytes spilled until these were taken out. kvh < 2^16 (grid.y),
  // nrows <= 64, split < kMaxSplits = 128.
  int4* stash = reinterpret_cast<int4*>(base - 16);
  if (tid == 0)
    *stash = make_int4(a.q_start, a.row0, a.G,
                       a.kvh | a.nrows << 16 | a.split << 23 | (a.nsplit == 1) << 30);
  const int G = a.G, nrows = a.nrows, row0 = a.row0, ctx = a.ctx;
  const T* q = static_cast<const T*>(p.q);
  for (int i = tid; i < kTcRows * CH; i += kThreads) {  // D 80 / 96: columns past D unwritten
    const int r = i / CH, ch = i % CH;
    const bool ok = r < nrows;
    const int rr = row0 + (ok ? r : 0);
    cp_async16(base + W::off(r, ch, kTcRows),
               q + (a.q_start + rr / G) * p.q_stride_t + (a.kvh * G + rr % G) * p.q_stride_h +
                   ch * VEC, ok);
  }
  W x{p, base, sbase, p.block_table + static_cast<int64_t>(a.b) * p.block_table_stride};
  x.lo = a.lo;
  x.hi = a.hi;
  x.nt = a.hi > a.lo ? (a.hi - a.lo + NK - 1) / NK : 0;
  x.t4 = lane & 3;
  const int rA = warp * 16 + (lane >> 2), rB = rA + 8;
  x.qposA = rA < nrows ? ctx + (row0 + rA) / G : -1;  // a missing row sees no key
  x.qposB = rB < nrows ? ctx + (row0 + rB) / G : -1;
  x.stage = 0;
  x.wkey = a.lo + tid / W::NC;
  x.wbi = p.block_shift >= 0 ? x.wkey >> p.block_shift : x.wkey / p.block_size;
  x.woff = x.wkey - x.wbi * p.block_size;
  x.wpage = x.wkey < a.hi ? x.page_of(x.wbi) : 0;
  const bool has_cap = p.softcap > 0.f;
  x.inv_cap = has_cap ? 1.f / p.softcap : 0.f;
  x.sl2 = has_cap ? p.scale : p.scale * kLog2e;
#pragma unroll
  for (int j = 0; j < DM / 2; ++j) x.o[j] = 0.f;
  x.mA = x.mB = -INFINITY;
  x.lA = x.lB = 0.f;
  // Tiles every row of the CTA sees whole (no mask): kmax < hi and kmax <= the first row's
  // position (causal), key0 > the last row's position - window; none with missing rows.
  int t_lo = 0, t_hi = 0;
  if (nrows == kTcRows) {
    const int qmin = ctx + row0 / G, qmax = ctx + (row0 + nrows - 1) / G;
    const int X = min(qmin + 1, a.hi) - a.lo;        // keys [lo, lo + X) precede both bounds
    t_hi = X > 0 ? X / NK : 0;
    if (p.sliding_window > 0) {
      const int Y = qmax - p.sliding_window - a.lo + 1;  // first key offset the window allows
      t_lo = Y > 0 ? (Y + NK - 1) / NK : 0;
    }
    t_lo = min(t_lo, x.nt);
    t_hi = min(max(t_hi, t_lo), x.nt);
  }
  cp_async_commit();  // Q
  if (x.nt > 0) x.load(0);
  cp_async_commit();  // tile 0
  cp_async_wait<1>();
  __syncthreads();    // Q landed (every thread's copies): its fragments, tile 0 in flight
  x.load_q();
  if (has_cap) x.template run<true>(t_lo, t_hi);
  else x.template run<false>(t_lo, t_hi);
  cp_async_wait<0>();
  __syncthreads();  // the stash is visible (the loop's barriers may not have run: nt == 0)
  const int4 e = *stash;
  const int e_q_start = e.x, e_row0 = e.y, e_G = e.z, e_kvh = e.w & 0xffff;
  const int e_nrows = e.w >> 16 & 0x7f, e_split = e.w >> 23 & 0x7f;
  const bool e_one = e.w >> 30 & 1;
  if (warp * 16 >= e_nrows) return;
  float lA = x.lA, lB = x.lB;
#pragma unroll
  for (int w = 1; w <= 2; w <<= 1) {
    lA += __shfl_xor_sync(0xffffffffu, lA, w);
    lB += __shfl_xor_sync(0xffffffffu, lB, w);
  }
  const int t4 = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = h ? rB : rA;
    if (r >= e_nrows) continue;
    const float l = h ? lB : lA, mm = h ? x.mB : x.mA;
    const float inv = l > 0.f ? 1.f / l : 0.f;  // a row that sees no key gives zeros
    const int rr = e_row0 + r;
    const int64_t t = e_q_start + rr / e_G;
    const int qh = e_kvh * e_G + rr % e_G;
    if (e_one) {
      T* out = static_cast<T*>(p.out) + t * p.out_stride_t + qh * p.out_stride_h;
#pragma unroll
      for (int d = 0; d < W::DT; ++d) {
        const float f2[2] = {x.o[4 * d + 2 * h] * inv, x.o[4 * d + 2 * h + 1] * inv};
        store_f<T, 2>(out + 8 * d + 2 * t4, f2);
      }
    } else {
      const int64_t row =
          (static_cast<int64_t>(e_split) * p.num_tokens + t) * p.num_q_heads + qh;
      float* po = p.partial_out + row * DM;
#pragma unroll
      for (int d = 0; d < W::DT; ++d)
        *reinterpret_cast<float2*>(po + 8 * d + 2 * t4) =
            make_float2(x.o[4 * d + 2 * h] * inv, x.o[4 * d + 2 * h + 1] * inv);
      if (t4 == 0) p.partial_lse[row] = l > 0.f ? (mm + log2f(l)) / kLog2e : -INFINITY;
    }
  }
}
#endif  // RAGGED_WGMMA
