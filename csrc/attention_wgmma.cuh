// The tensor-core tile of paged_attention_kernel on sm_90a: wgmma.mma_async (csrc/wgmma.cuh)
// in place of mma.sync + ldmatrix. Included by paged_attention.cu inside its namespace, after
// copy_kv_chunk / LeanCfg (it reuses both); the kernel's tc branch calls wgmma_tile when
// RAGGED_WGMMA (sm_90a, or the emulator's arch-90 build).
//
// Same CTA contract as the mma.sync tile: 64 rows (one warpgroup, 16 per warp), keys [lo, hi)
// of one split, K/V tiles of WgmmaCfg::NK keys (16 KB: 32 keys at D 128, 64 at D 64; 32 KB,
// 64 keys, with Q in registers at D 128 (16-bit caches); D 80 / 96 (16-bit caches only): 32
// keys in D 128's padded layout, 10 / 12 KB of it written), 2 cp.async stages, FA2 online
// softmax in fp32 registers. fp8 caches (every fp8 row on sm_90a, decodes too:
// kFp8WgmmaRows): the e4m3 codes and per-slot scales of tile t + 1 travel by cp.async into a
// 2-slot ring while tile t computes; a convert pass writes tile t's codes, unscaled, into one
// T panel stage (e4m3 is exact in fp16 / bf16), fenced for the async proxy; the scales
// multiply S's columns (K) and P's (V) in registers (per tensor: the softmax scale and the
// output). See load8 / convert / step.
// Per tile: S = Q K^T by D / 16 wgmma m64n{NK}k16 (B = K, K-major in shared
// memory; A = Q from registers in the QR and fp8 instantiations (3 CTAs/SM: Q's
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
// QR at D 128 with a 16-bit cache (Q in registers, prefill launches): 64-key tiles, 32 KB a
// stage. The per-tile work that does not scale with keys (O's rescale: 64 FMULs a thread, the
// barriers, waits and descriptors) is then paid once per 64 keys: predicted H100 prefill 2k
// 302-533 -> 338-661 TFLOP/s (770 warp-instructions per 64-key tile against 2 x 477), at 254
// registers and 81 KB, 2 CTAs/SM (MinBlocks); the other classes keep 16 KB tiles.
// fp8 caches (FP8): Q, ONE T stage of K/V panels (the convert pass's output, what wgmma
// reads), then a 2-slot ring of what cp.async brings: e4m3 codes K, V [NK][DM] (16-byte
// chunks XOR-swizzled, see sw8) and the keys' float32 scales K, V [NK] (RING bytes a slot).
// Q is read into registers once (QREG), so its area is ring slot 1 where it fits (D 128:
// 8448 <= 16384 B): 41488 B of tiles at D 128, 42256 at D 64 (with END's 272 B); a second
// slot instead would make 49936 B (> the 49152 that keeps 2 CTAs/SM on sm_86/89).
template <typename T, int DM, bool FP8 = false, bool QR = false>
struct WgmmaCfg {
  static constexpr int DP = (DM + 63) / 64 * 64;  // D padded to whole 64-value panels
  static constexpr int NK = (QR && !FP8 && DM == 128 ? 2 : 1) * kTileBytes /
                            (2 * DP * static_cast<int>(sizeof(T)));
  static constexpr uint32_t QBYTES = kTcRows * DP * sizeof(T), PANEL = 2 * NK * DP * sizeof(T);
  static constexpr uint32_t RING = 2 * NK * DM + 2 * NK * 4;
  static constexpr bool RING_IN_Q = RING <= QBYTES;
  // fp8: + 16 B for t_hi, lo and 256 B for the rows' positions at the end (see END)
  static constexpr uint32_t TILES =
      !FP8 ? QBYTES + 2 * PANEL : QBYTES + PANEL + (RING_IN_Q ? 1 : 2) * RING + 16 + 4 * kTcRows;
  static constexpr uint32_t END = TILES - 16 - 4 * kTcRows;
  static constexpr size_t SMEM = TILES + 1024;
};

struct TcArgs {
  int b, q_start, ctx, row0, nrows, G, kvh, lo, hi, split, nsplit;
};

#if RAGGED_WGMMA
// The tile's state over its K/V loop (registers once inlined: every member function is
// __forceinline__, the object a local of wgmma_tile).
// A descriptor `bytes` further on (bytes % 16 == 0): the start address field (bits 0-13,
// address >> 4) plus bytes >> 4, a 32-bit add (no carry out: shared addresses < 2^18).
__device__ __forceinline__ uint64_t desc_plus(uint64_t d, uint32_t bytes) {
  return (d & 0xffffffff00000000ull) | (static_cast<uint32_t>(d) + (bytes >> 4));
}

template <typename T, int DM, bool FP8, bool QR>
struct WgmmaTile {
  using LC = LeanCfg<T, DM, true>;
  // NC lanes a group copy chunks c < CH (D 80 / 96: the lean tile's 16-lane groups, 10 / 12
  // real chunks; the lanes past them copy nothing), DT = CH 8-column accumulator tiles.
  static constexpr int VEC = LC::VEC, NC = LC::NC, NG = LC::NG, DT = DM / 8;
  static constexpr int NK = WgmmaCfg<T, DM, FP8, QR>::NK, LOADS = NK * NC / kThreads;
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
  int wblk;             // fp8: bt[wbi] (per-slot scales: (block * block_size + off) * Hkv + h)
  int64_t wpage;
  float sl2, inv_cap;
  float o[DM / 2];      // O [64 x DM] accumulators (wgmma fragment: o[4d + q] is mma's o[d][q])
  // QREG: Q in registers, the A fragments of QK^T's k-steps (load_q), fixed over the loop:
  // the QR instantiations and every fp8 one (MinBlocks: 3 CTAs/SM). fp8: Q's shared memory
  // becomes ring slot 1 (WgmmaCfg), and QK^T reads 8 KB a tile less from shared memory (RS).
  static constexpr bool QREG = QR || FP8;
  // fp8 copies: NC8 lanes a key, CB8 bytes each (16 at D 128, 8 at D 64: NG8 = 16 keys apart,
  // <= the block size, so the block walk steps at most once a key), LOADS8 keys a thread.
  using WC = WgmmaCfg<T, DM, FP8, QR>;
  static constexpr int NC8 = DM / 16 >= 8 ? DM / 16 : 8, CB8 = DM / NC8, NG8 = kThreads / NC8;
  static constexpr int LOADS8 = NK / NG8, CVT = 2 * NK * DM / 16 / kThreads;
  static_assert(!FP8 || (NG8 <= 16 && NK % NG8 == 0 && CVT * kThreads * 16 == 2 * NK * DM),
                "fp8 wgmma copy / convert split");
  uint32_t qf[QREG ? DM / 16 : 1][4];
  float mA, mB, lA, lB; // running max (log2 units) and this lane's part of the sum, rows A/B
  // exp2 offset of P (see step): fp8 caches with fp16 q only
  static constexpr float kPShift = FP8 && std::is_same<T, __half>::value ? 8.f : 0.f;

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
  // fp8 ring slot `slot` (0 / 1; tile it lives in slot it & 1), from base.
  static __device__ __forceinline__ int ring(int slot) {
    return slot == 0 ? QBYTES + STAGE
                     : (WC::RING_IN_Q ? 0 : QBYTES + STAGE + static_cast<int>(WC::RING));
  }
  // Byte offset of 16-byte code chunk cc of key k in a ring slot's [NK][DM] codes: XOR-swizzled
  // by the key's 128-byte line so that 8 consecutive keys' chunk cc (one phase of the convert
  // pass's 16-byte loads) hit 8 distinct bank groups (D 128: row = line, cc ^ k % 8; D 64:
  // 2 rows a line, cc ^ (k / 2) % 4).
  static __device__ __forceinline__ int sw8(int k, int cc) {
    return k * DM + ((cc ^ ((k * DM / 128) & (DM / 16 - 1))) << 4);
  }
  // fp8: the e4m3 codes (and per-slot scales) of the next tile into ring slot `slot` by
  // cp.async, nothing converted: the copy stays in flight while this tile computes (the
  // synchronous dequantising copy, copy_kv_chunk, left none). Thread (grp, c) copies CB8 codes
  // at byte c CB8 of keys grp + j NG8; lanes c 0 / 1 also the key's K / V scale (per slot).
  __device__ __forceinline__ void load8(int slot) {
    const int grp = threadIdx.x / NC8, c = threadIdx.x % NC8;
    const int head_c = blockIdx.y * DM + c * CB8;   // < 2^24: Hkv <= 65535, D <= 256
    char* rs = base + ring(slot);
    const uint8_t* kc = static_cast<const uint8_t*>(p.k_cache);
    const uint8_t* vc = static_cast<const uint8_t*>(p.v_cache);
    const bool per_slot = p.k_scale != nullptr;
    const float* ssrc = c == 0 ? p.k_scale : p.v_scale;
#pragma unroll
    for (int j = 0; j < LOADS8; ++j) {
      const int k = grp + j * NG8;
      const bool valid = wkey < hi;  // past hi: zero codes, zero scales (nothing read)
      // The key's slot from (wblk, woff), in 32 bits (num_blocks x block_size < 2^31: a cache
      // of 2^31 slots would be >= 128 GiB a layer), widened for the byte offset; no 64-bit
      // page offset kept over the loop (2 of the registers that had the D 128 tile spill at
      // 168). Past hi the address stays in bounds without a select: wblk is the last block
      // read (0 before any) and woff < block_size, and src-size 0 reads nothing.
      const int slot = wblk * p.block_size + woff;
      const int64_t src = static_cast<int64_t>(slot) * (p.num_kv_heads * DM) + head_c;
      const int d8 = sw8(k, c * CB8 / 16) + (c * CB8) % 16;
      if constexpr (CB8 == 16) {
        cp_async16(rs + d8, kc + src, valid);
        cp_async16(rs + NK * DM + d8, vc + src, valid);
      } else {
        cp_async_ca<CB8>(rs + d8, kc + src, valid);
        cp_async_ca<CB8>(rs + NK * DM + d8, vc + src, valid);
      }
      if (per_slot && c < 2) {
        const int64_t si = static_cast<int64_t>(slot) * p.num_kv_heads + blockIdx.y;
        cp_async_ca<4>(rs + 2 * NK * DM + (c * NK + k) * 4, ssrc + si, valid);
      }
      wkey += NG8;
      woff += NG8;
      if (woff >= p.block_size) {
        woff -= p.block_size;
        ++wbi;
        if (wkey < hi) wblk = bt[wbi];
      }
    }
  }
  // Two e4m3 codes (the low 16 bits) -> two T, packed. The codes convert unscaled (every e4m3
  // value is exact in fp16 and bf16), the scales go on S's and P's columns in registers
  // (step): per sm_90 code pair fp16 1 instruction (F2FP.F16.E4M3.UNPACK_B), bf16 4 (+ 2
  // HADD2.F32 + 1 F2FP pack): 32 / 128 of the D 128 loop's 452 / 550 warp-instructions a
  // tile (SASS). Scaling at conversion would add 2 FMULs a code (64 a thread a tile, and the
  // fp16 path would need the fp32 detour too: ~+96); on S / P in registers it is 32 FMULs +
  // 8 LDS.64 a thread a tile per slot, none per tensor (folded into sl2 and the epilogue).
  static __device__ __forceinline__ uint32_t cvt8x2(uint32_t two) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(
        static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), __NV_E4M3);
    if constexpr (IsBf16<T>::value) {
      const float2 f = __half22float2(__half2(h));
      return pack2<T>(f.x, f.y);
    } else {
      uint32_t r;
      memcpy(&r, &h, 4);
      return r;
    }
  }
  // fp8: the convert pass, ring slot -> the T panels wgmma reads (the 16-bit tile's layout).
  // Item i = (matrix, code chunk cc, key k), k fastest: 8 consecutive threads load chunk cc
  // of 8 keys (sw8: no bank conflict) and store T chunks 2cc, 2cc + 1 of those keys (off:
  // 128B-swizzled rows, none either). Plain st.shared (generic proxy): the caller fences.
  __device__ __forceinline__ void convert(int slot) {
    // Unsigned, power-of-two index math (the signed `i % NK` form cost ~20 instructions an
    // item in the rolled loop); rolled: unrolled, the items' registers spilled at 168.
    constexpr unsigned CPR = DM / 16, RS = kThreads / NK;
    static_assert(kThreads % NK == 0 && (CPR & (CPR - 1)) == 0, "convert items");
    const unsigned t = threadIdx.x, k = t % NK, r0 = t / NK;
    const unsigned sk = (k * DM / 128) & (CPR - 1), k7 = k & 7;
    const char* src = base + ring(slot) + k * DM;
    char* dst = base + QBYTES + k * 128;
#pragma unroll
    for (unsigned j = 0; j < CVT; ++j) {
      const unsigned r = r0 + RS * j, cc = r % CPR, m = r / CPR;
      const uint4 w = *reinterpret_cast<const uint4*>(src + m * (NK * DM) + ((cc ^ sk) << 4));
      const uint4 lo = make_uint4(cvt8x2(w.x), cvt8x2(w.x >> 16), cvt8x2(w.y), cvt8x2(w.y >> 16));
      const uint4 hi8 = make_uint4(cvt8x2(w.z), cvt8x2(w.z >> 16), cvt8x2(w.w), cvt8x2(w.w >> 16));
      // T chunks 2cc, 2cc + 1 of key k: off(k, ch, NK) = (ch / 8) NK 128 + k 128 +
      // ((ch % 8) ^ k % 8) 16; the odd chunk differs in bit 4 only (the rest is 128-aligned)
      const unsigned o0 = m * (STAGE / 2) + (cc >> 2) * (NK * 128) + ((((2 * cc) & 7) ^ k7) << 4);
      char* d0 = dst + o0;
      char* d1 = dst + (o0 ^ 16u);
      *reinterpret_cast<uint4*>(d0) = lo;
      *reinterpret_cast<uint4*>(d1) = hi8;
#if defined(RAGGED_EMU)
      emu_generic_write(d0, 16);  // generic-proxy stores: wgmma needs fence.proxy.async
      emu_generic_write(d1, 16);
#endif
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
    if constexpr (FP8) {
      // The ring: tile it + 1's codes in flight into slot (it + 1) & 1 (tile it - 1's, read
      // before the last step's closing barrier) while tile it's are converted into the panel
      // (free: the last step's PV wait and barrier).
      if (it + 1 < nt) load8((it + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();   // this thread's copies of tile it landed ...
      __syncthreads();      // ... and everyone's: the pass converts chunks others copied
      convert(it & 1);
      fence_proxy_async();  // the panel's st.shared (generic proxy) before wgmma's reads
      __syncthreads();
    } else {
      if (it + 1 < nt) load(stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
      fence_proxy_async();  // the copies (generic proxy) before wgmma's reads (async proxy)
      __syncthreads();
    }
    const uint32_t ks = sbase + QBYTES + (FP8 ? 0 : stage * STAGE), vs = ks + STAGE / 2;
    // fp8: one panel stage, so the descriptors are loop-invariant; each k-step's is the base's
    // plus its byte offset / 16 in the start field (desc_plus: 1 add, not gmma_desc's 4)
    const uint64_t dk0 = gmma_desc(ks, 16, 1024), dv0 = gmma_desc(vs, KB, 1024);
    // fp8 per slot: this tile's K / V scales in its ring slot (thread's columns 8n + 2t4 + e)
    const float* ksc = reinterpret_cast<const float*>(base + ring(it & 1) + 2 * NK * DM);
    const bool per_slot = FP8 && p.k_scale != nullptr;
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
      const uint64_t dk = FP8 ? desc_plus(dk0, (kk >> 2) * KB + (kk & 3) * 32)
                              : gmma_desc(ks + (kk >> 2) * KB + (kk & 3) * 32, 16, 1024);
      if constexpr (QREG)
        wgmma_rs<T, NK, false>(s, qf[QREG ? kk : 0], dk, kk > 0);
      else
        wgmma_ss<T, NK, false>(s, gmma_desc(sbase + (kk >> 2) * QB + (kk & 3) * 32, 16, 1024),
                               dk, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_pin(s);
    if (per_slot) {  // the keys' K scales (per tensor: in sl2), before the softcap and masks
#pragma unroll
      for (int n = 0; n < NK / 8; ++n) {
        const float2 k2 = *reinterpret_cast<const float2*>(ksc + 8 * n + 2 * t4);
        s[4 * n] *= k2.x; s[4 * n + 1] *= k2.y;
        s[4 * n + 2] *= k2.x; s[4 * n + 3] *= k2.y;
      }
    }
    // Scores stay unscaled until the exp2's FFMA (x f), as in the mma.sync tile.
    float f = sl2;
    if constexpr (CAP) {
#pragma unroll
      for (int j = 0; j < NK / 2; ++j) s[j] = p.softcap * tanhf(s[j] * sl2 * inv_cap) * kLog2e;
      f = 1.f;
    }
    if constexpr (MASK) {
      const int* ends = reinterpret_cast<const int*>(base + WC::END);
      const int rA = threadIdx.x / 32 * 16 + threadIdx.x % 32 / 4;
      const int key0 = (FP8 ? ends[1] : lo) + it * NK, window = p.sliding_window;
      const int qA = FP8 ? ends[4 + rA] : qposA, qB = FP8 ? ends[12 + rA] : qposB;
#pragma unroll
      for (int j = 0; j < NK / 2; ++j) {
        const int key = key0 + 8 * (j >> 2) + 2 * t4 + (j & 1);
        const int qp = (j & 2) ? qB : qA;
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
    // P in [0, 2^kPShift] (O and l both carry the 2^kPShift; the split partial's lse takes it
    // out): fp8 with fp16 q packs P x the keys' V scales (~|v| / 448) into fp16, whose
    // subnormals (< 6.1e-5) lost the small products: 2-12x PyTorch's own fp16 error on a
    // 2048-key decode with small V (a review's finding); the shift costs no instruction.
    const float eA = uA - kPShift, eB = uB - kPShift;
    float sA = 0.f, sB = 0.f;
#pragma unroll
    for (int n = 0; n < NK / 8; ++n) {
      s[4 * n] = fast_exp2(fmaf(s[4 * n], f, -eA));
      s[4 * n + 1] = fast_exp2(fmaf(s[4 * n + 1], f, -eA));
      s[4 * n + 2] = fast_exp2(fmaf(s[4 * n + 2], f, -eB));
      s[4 * n + 3] = fast_exp2(fmaf(s[4 * n + 3], f, -eB));
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
    if (per_slot) {  // P x the keys' V scales (l above sums the unscaled P; per tensor: at the end)
      const float* vsc = ksc + NK;
#pragma unroll
      for (int kt = 0; kt < NK / 16; ++kt) {
        const float2 v0 = *reinterpret_cast<const float2*>(vsc + 16 * kt + 2 * t4);
        const float2 v1 = *reinterpret_cast<const float2*>(vsc + 16 * kt + 8 + 2 * t4);
        s[8 * kt] *= v0.x; s[8 * kt + 1] *= v0.y; s[8 * kt + 2] *= v0.x; s[8 * kt + 3] *= v0.y;
        s[8 * kt + 4] *= v1.x; s[8 * kt + 5] *= v1.y; s[8 * kt + 6] *= v1.x; s[8 * kt + 7] *= v1.y;
      }
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
      wgmma_rs<T, DM, true>(o, pa[kt], FP8 ? desc_plus(dv0, kt * 2048)
                                           : gmma_desc<VW>(vs + kt * 16 * VW, NK * VW, 8 * VW),
                            true);
    wgmma_commit();
    wgmma_wait<0>();  // O complete, and this stage's K/V no longer read ...
    wgmma_pin(o);     // (P's registers: ptxas tracks HGMMA's A operands until the wait)
    __syncthreads();  // ... by anyone: the next step's prefetch overwrites it
    stage ^= 1;
  }
  // Tiles [0, t_lo) and [t_hi, nt) masked, [t_lo, t_hi) not. One masked loop serves both
  // ends (the seg loop), so the loop body exists twice, not three times.
  // fp8: t_hi is read from shared memory (WgmmaCfg::END, written by wgmma_tile) after the
  // first masked loop: kept in a register over it, it was spilled (8 B) at D 128.
  template <bool CAP>
  __device__ __forceinline__ void run(int t_lo, int t_hi) {
    int it = 0;
    for (int seg = 0; seg < 2; ++seg) {
      const int end = seg == 0 ? t_lo : nt;
      for (; it < end; ++it) step<true, CAP>(it);
      if (seg == 0) {
        const int th = FP8 ? *reinterpret_cast<const int*>(base + WC::END) : t_hi;
        for (; it < th; ++it) step<false, CAP>(it);
      }
    }
  }
};

// threadIdx.x read again (a fresh S2R): a value the compiler cannot keep live from before.
__device__ __forceinline__ int fresh_tid() {
#if defined(RAGGED_EMU)
  return static_cast<int>(threadIdx.x);
#else
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
#endif
}

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
  if (sbase - raw + WgmmaCfg<T, DM, FP8, QR>::TILES > dynamic_smem_bytes())
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
  x.wkey = a.lo + tid / (FP8 ? W::NC8 : W::NC);
  x.wbi = p.block_shift >= 0 ? x.wkey >> p.block_shift : x.wkey / p.block_size;
  x.woff = x.wkey - x.wbi * p.block_size;
  x.wblk = x.wkey < a.hi ? x.bt[x.wbi] : 0;
  x.wpage = static_cast<int64_t>(x.wblk) *
            (static_cast<int64_t>(p.num_kv_heads) * DM * p.block_size);
  const bool has_cap = p.softcap > 0.f;
  x.inv_cap = has_cap ? 1.f / p.softcap : 0.f;
  x.sl2 = has_cap ? p.scale : p.scale * kLog2e;
  if (FP8 && p.k_scale == nullptr) x.sl2 *= p.k_scale_f;  // per tensor: K's scale on S
#pragma unroll
  for (int j = 0; j < DM / 2; ++j) x.o[j] = 0.f;
  x.mA = x.mB = -INFINITY;
  x.lA = x.lB = 0.f;
  // Tiles every row of the CTA sees whole (no mask): kmax < hi and kmax <= the first row's
  // position (causal), key0 > the last row's position - window; none with missing rows.
  // fp8 (decodes, spec-verify: 4-16 rows) also with missing rows: their Q is zero-filled, so
  // unmasked they score 0 against every key (finite: zero codes and scales past hi) and are
  // never stored; the mask code is ~3 instructions a score.
  int t_lo = 0, t_hi = 0;
  if (nrows == kTcRows || FP8) {
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
  if (x.nt > 0) {
    if constexpr (FP8) x.load8(0);
    else x.load(0);
  }
  cp_async_commit();  // tile 0
  cp_async_wait<1>();
  __syncthreads();    // Q landed (every thread's copies): its fragments, tile 0 in flight
  x.load_q();
  if constexpr (FP8) {
    // kept out of the loop's registers (3 CTAs/SM's 168 at D 128): t_hi, lo, the positions
    // of the 64 rows (qposA / qposB), read where used (run, the masks)
    int* ends = reinterpret_cast<int*>(base + W::WC::END);
    if (tid == 0) ends[0] = t_hi, ends[1] = a.lo;
    if (tid < kTcRows) ends[4 + tid] = tid < nrows ? ctx + (row0 + tid) / G : -1;
    __syncthreads();  // Q read by all: its area is ring slot 1 (tile 1); t_hi visible
  }
  if (has_cap) x.template run<true>(t_lo, t_hi);
  else x.template run<false>(t_lo, t_hi);
  cp_async_wait<0>();
  __syncthreads();  // the stash is visible (the loop's barriers may not have run: nt == 0)
  const int4 e = *stash;
  const int e_q_start = e.x, e_row0 = e.y, e_G = e.z, e_kvh = e.w & 0xffff;
  const int e_nrows = e.w >> 16 & 0x7f, e_split = e.w >> 23 & 0x7f;
  const bool e_one = e.w >> 30 & 1;
  // fp8: the thread's indices read again, not kept over the loop (they were spilled there:
  // the fp8 D 128 loop fills 3 CTAs/SM's 168 registers; 16-bit: the same values)
  const int etid = FP8 ? fresh_tid() : tid, elane = etid & 31, ewarp = etid >> 5;
  const int erA = ewarp * 16 + (elane >> 2), erB = erA + 8;
  if (ewarp * 16 >= e_nrows) return;
  float lA = x.lA, lB = x.lB;
#pragma unroll
  for (int w = 1; w <= 2; w <<= 1) {
    lA += __shfl_xor_sync(0xffffffffu, lA, w);
    lB += __shfl_xor_sync(0xffffffffu, lB, w);
  }
  const int t4 = elane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = h ? erB : erA;
    if (r >= e_nrows) continue;
    const float l = h ? lB : lA, mm = h ? x.mB : x.mA;
    // (fp8 per tensor: V's scale here; a row that sees no key gives zeros)
    const float vsf = FP8 && p.k_scale == nullptr ? p.v_scale_f : 1.f;
    const float inv = l > 0.f ? vsf / l : 0.f;
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
      if (t4 == 0)
        p.partial_lse[row] = l > 0.f ? (mm + log2f(l) - W::kPShift) / kLog2e : -INFINITY;
    }
  }
}
#endif  // RAGGED_WGMMA
