// Paged attention over a ragged batch (semantics: kernels/reference.py paged_attention).
//
// One CTA per (row tile of a sequence, KV split) x KV head. A "row" is one (new token, query
// head of the GQA group) pair, so in decode every query head of the group shares each K/V
// tile the CTA streams through shared memory: K/V bytes are read once per KV head. Each CTA
// picks its tile class (one launch serves a mixed batch):
// - tensor cores (16-bit types, D 64/128, and D 80/96 with 16-bit caches (rows padded to
//   D 128's layout), sequences with q_len x G > 4 rows (> 16 with an fp8 cache; every row
//   with an fp8 cache on sm_90a, kFp8WgmmaRows): prefill chunks, spec-verify queries, G 5-8
//   decodes): 64 rows a CTA, mma.sync.m16n8k16 + ldmatrix from XOR-swizzled shared memory,
//   FA2 online softmax in registers, 2 cp.async stages (the Q tile takes the third stage's
//   space); on sm_80 5-16-row sequences use its warp 0 only (kLeanRows). sm_90a:
//   wgmma.mma_async instead (attention_wgmma.cuh; fp8: a cp.async ring of e4m3 codes
//   converted into its T panels).
// - lean CUDA-core tile (D 64/80/96/128/256 in 16-bit types, 64/128 in fp32, the other rows:
//   decodes, short spec-verify; D 80/96 with fp8 caches every row): Q in registers, 3
//   cp.async stages of 16 KB (D 80/96: 10/12 KB; fp8: e4m3 codes + scales, converted at
//   use), one page offset per key shared by K and V, the lanes of a group spanning D (see
//   LeanCfg).
// - the generic tile (other head dims: run-time ones, 80/96 in fp32): the first version of
//   this kernel, kept for coverage; scores/softmax/PV through shared memory, 2 stages.
// Split-KV: each sequence picks its own split count on the device (plan_splits, bounded by the
// host's num_kv_splits <= kMaxSplits, which sizes the grid). A sequence with one split writes
// `out` directly; otherwise each split writes a normalised fp32 partial and its log-sum-exp,
// and merge_splits_kernel combines them. Grids depend on host ints only (graph capturable).
//
// Row tiles -> CTAs (grid.x = slots x splits, KV head on grid.y): with B sequences whose
// q_len all fit one bound (decodes, uniform chunks) every sequence gets the same number of
// slots, max_seqlen_q * G / kRows rounded up, and a CTA finds its sequence by a division.
// A mixed batch (one 2048-token chunk + 256 decodes) would make that B x 512 slots, 99.8 %
// of them empty CTAs; there sequence b owns slots from cu_seqlens_q[b] * G / kRows + b on
// (floor(T G / kRows) + B slots in all) and a CTA finds b by binary search over cu_seqlens_q.
#include <cuda_fp8.h>

#include <cfloat>
#include <type_traits>

#include "cuda_utils.cuh"
#include "wgmma.cuh"

namespace ragged {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 16;           // (token, head) rows per CTA: a whole GQA group up to 16
constexpr int kSplitMinKeys = 128;  // fewer keys per split costs more in merging than it saves
constexpr int kSplitAlign = 64;

struct SplitPlan {
  int lo;     // first key any query of the sequence can see
  int chunk;  // keys per split
  int n;      // splits used by this sequence, 1 <= n <= max_splits
};

// Must give the same answer in the attention and the merge kernel (both call it).
__device__ __forceinline__ SplitPlan plan_splits(int kv_len, int q_len, int window,
                                                 int max_splits) {
  const int ctx = kv_len - q_len;
  const int lo = window > 0 ? max(0, ctx - window + 1) : 0;
  const int eff = max(kv_len - lo, 0);
  int chunk = max((eff + max_splits - 1) / max_splits, kSplitMinKeys);
  chunk = (chunk + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
  const int n = max(1, (eff + chunk - 1) / chunk);
  return {lo, chunk, n};
}

// First row-tile slot of sequence b in the searched layout: floor(cu[b] G / kRows) + b slots
// come before it; it owns at least ceil(q_len G / kRows) (floor(a + x) - floor(a) + 1 >= ceil(x)).
__device__ __forceinline__ int64_t first_slot(const int32_t* cu, int b, int G) {
  return static_cast<int64_t>(cu[b]) * G / kRows + b;
}

// The sequence owning `slot` (the last b with first_slot(b) <= slot; first_slot increases).
__device__ __forceinline__ int find_seq(const int32_t* cu, int num_seqs, int G, int64_t slot) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (first_slot(cu, mid, G) <= slot) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Sizes for head dims up to DM (the kernel's compile-time bound; the common head dims get an
// exact instantiation, others run a bucket's kernel with the head dim read at run time).
template <typename T, int DM>
struct AttnCfg {
  static constexpr int VEC = 16 / sizeof(T);    // elements per 16-byte access
  static constexpr int NCM = DM / VEC;          // 16-byte chunks per head vector, at most
  static constexpr int NK = (DM * sizeof(T) <= 256) ? 32 : 16;  // keys per tile
  static constexpr int RGM = kThreads / NCM;    // row groups in the PV product, at least
  static constexpr int MAXR = (kRows + RGM - 1) / RGM;  // rows per thread in the PV product
  static_assert(DM % VEC == 0 && NCM <= kThreads, "head dim bound");
  // Layout: Qs fp32 [kRows][d] | Ss fp32 [kRows][NK] | m, l, alpha, pad [kRows] each |
  // K/V tiles [2 stages][K, V][NK][d + VEC] (row pitch +16 B against bank conflicts).
  static size_t smem(int d) {
    return sizeof(float) * (kRows * d + kRows * NK + 4 * kRows) +
           sizeof(T) * 2 * 2 * NK * static_cast<size_t>(d + VEC);
  }
  // fp8 caches: the K/V tiles hold e4m3 bytes ([2][2][NK][d + 16]), then their scales
  // fp32 [2 stages][K, V][NK].
  static size_t smem_fp8(int d) {
    return sizeof(float) * (kRows * d + kRows * NK + 4 * kRows) +
           2 * 2 * NK * static_cast<size_t>(d + 16) + sizeof(float) * 2 * 2 * NK;
  }
};

// N e4m3 codes (N * 1 bytes, N-byte aligned) -> float, two at a time (cvt.f16x2.e4m3x2 on
// sm_89+, cuda_fp8.h's exact software path elsewhere and on the emulator's host). Read as
// 32-bit words (16-bit for N = 2) whose halves feed the cvt directly: assembling the pairs
// from bytes cost ~80 LOP3s per warp per lean fp8 tile on sm_90a.
__device__ __forceinline__ float2 fp8x2_to_float2(uint32_t two) {
  return __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(
      static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), __NV_E4M3)));
}
template <int N>
__device__ __forceinline__ void load_fp8(const uint8_t* p, float (&f)[N]) {
  static_assert(N == 2 || N % 4 == 0, "pairs or whole 32-bit words of codes");
  if constexpr (N == 2) {
    const float2 x = fp8x2_to_float2(*reinterpret_cast<const uint16_t*>(p));
    f[0] = x.x;
    f[1] = x.y;
  } else {
    const Pack<uint32_t, N / 4> pk = *reinterpret_cast<const Pack<uint32_t, N / 4>*>(p);
#pragma unroll
    for (int w = 0; w < N / 4; ++w) {
      const float2 lo = fp8x2_to_float2(pk.v[w]), hi = fp8x2_to_float2(pk.v[w] >> 16);
      f[4 * w] = lo.x;
      f[4 * w + 1] = lo.y;
      f[4 * w + 2] = hi.x;
      f[4 * w + 3] = hi.y;
    }
  }
}

// A K/V chunk of the generic tile as floats: KT is T (16-bit/fp32 caches) or uint8_t (fp8).
template <typename KT, typename T, int N>
__device__ __forceinline__ void load_kv(const KT* p, float (&f)[N]) {
  if constexpr (std::is_same_v<KT, uint8_t>) load_fp8<N>(p, f);
  else load_f<T, N>(p, f);
}

// N e4m3 codes x scale (in fp32) -> N T values in shared memory, two codes at a time; zeros
// when !valid (nothing read: a code there may be NaN, and NaN x 0 would reach P V).
template <typename T, int N>
__device__ __forceinline__ void dequant_store(T* dst, const uint8_t* src, float scale,
                                              bool valid) {
  Pack<uint8_t, N> in;
  if (valid) in = *reinterpret_cast<const Pack<uint8_t, N>*>(src);
  else
#pragma unroll
    for (int i = 0; i < N; ++i) in.v[i] = 0;
  Pack<T, N> out;
#pragma unroll
  for (int i = 0; i < N; i += 2) {
    const __nv_fp8x2_storage_t two = static_cast<__nv_fp8x2_storage_t>(
        in.v[i] | static_cast<unsigned>(in.v[i + 1]) << 8);
    const float2 x = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(two, __NV_E4M3)));
    out.v[i] = from_f<T>(x.x * scale);
    out.v[i + 1] = from_f<T>(x.y * scale);
  }
  *reinterpret_cast<Pack<T, N>*>(dst) = out;
#if defined(RAGGED_EMU)
  emu_generic_write(dst, sizeof out);  // a generic-proxy store: wgmma needs fence.proxy.async
#endif
}

// One 16-byte chunk (N = 16 / sizeof(T) elements) of a key's K and of its V into the lean /
// tensor-core tiles' T layout. 16-bit/fp32 caches: two cp.async copies. fp8 caches (only the
// mma.sync tile now, sm_80/89; the lean tile stages codes by cp.async, see LeanCfg::TILE8, and
// so does the sm_90a wgmma tile, see WgmmaTile::load8): N e4m3
// codes each, dequantised (code x the key's scale, in fp32, rounded to T: what the reference
// does in q's dtype) and stored, so the tiles' math runs unchanged. `bi`, `boff`: the key's
// block-table index and offset in its block (read only when valid).
template <typename T, bool FP8, int N>
__device__ __forceinline__ void copy_kv_chunk(T* ks, T* vs, const PagedAttentionParams& p,
                                              int64_t off, bool valid, const int32_t* bt,
                                              int bi, int boff, int kvh) {
  if constexpr (!FP8) {
    cp_async16(ks, static_cast<const T*>(p.k_cache) + (valid ? off : 0), valid);
    cp_async16(vs, static_cast<const T*>(p.v_cache) + (valid ? off : 0), valid);
  } else {
    // K, then V, each packed to T as converted (2 bytes in, 1 value out at a time). A plain
    // load, not cp.async: the conversion needs the bytes (see MinBlocks for the registers).
    float a = 0.f, b = 0.f;  // past `hi`: zeros, as the cp.async path's zero-fill
    if (valid) {
      a = p.k_scale_f;
      b = p.v_scale_f;
      if (p.k_scale != nullptr) {
        const int64_t i =
            (static_cast<int64_t>(bt[bi]) * p.block_size + boff) * p.num_kv_heads + kvh;
        a = p.k_scale[i];
        b = p.v_scale[i];
      }
    }
    dequant_store<T, N>(ks, static_cast<const uint8_t*>(p.k_cache) + off, a, valid);
    dequant_store<T, N>(vs, static_cast<const uint8_t*>(p.v_cache) + off, b, valid);
  }
}

// The lean decode-class tile (head dims 64/80/96/128/256 in 16-bit types, 64/128 in fp32; any
// rows <= kRows): K/V tiles of 16 KB, kStages deep; thread (grp, c) owns 16-byte chunk c of D
// (D 80/96: 16 lanes of 5/6 strided elements, see LeanCfg)
// (NC lanes per group, one warp or part of one) and, within a tile, 4 keys per sub-tile. Groups
// are split into NRG row groups of 4 rows (only the groups that exist: 1 for G <= 4) times
// NG / NRG key groups. Each group keeps its own online-softmax state for its keys (no block
// barrier per tile beyond the pipeline's one); the groups merge once, after the last tile.
constexpr int kStages = 3;     // cp.async tiles in flight: 2 while one is computed
constexpr int kTileBytes = 16 * 1024;  // K + V bytes per tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kTcRows = 64;   // rows of a tensor-core CTA: 16 per warp (one mma M tile)
// Sequences of 5-16 rows (spec-verify q_len x G, e.g. 4 x 4; G 5-8 decodes) take the
// tensor-core tile: on sm_80 its warp 0 alone computes (one 16-row mma M tile over every key;
// warps 1-3 only copy), on sm_90a the warpgroup's m64 wgmma (its missing rows zero Q). On the
// lean tile they run 4 row groups, 4x the FMAs a key (predicted 44 % of H100 HBM, issue-bound,
// for spec-verify q=4 B=64 ctx=2048); one warp's ~1100 instructions (64 HMMA) per 16 KB tile
// keep it memory-bound even when the 4 CTAs' computing warps share a scheduler (predicted
// 3.9 TB/s issue ceiling). <= 4 rows stay lean (one row group, 97 % predicted). 5-8 rows ran
// two row groups there, 2x the FMAs a key: G 8 decode B=256 x 2k predicted 83 % of H100 HBM
// (58 % of H200's) on the lean tile, 97 % / 97 % on the tensor-core tile (the mixed
// 2048+256x2048 G 8 launch 74 -> 98 %); kernel report, bench/results/static/.
// fp8 caches elsewhere (sm_80/89: the mma.sync tile dequantises synchronously at the copy)
// keep <= 16 rows on the lean tile, whose copy is asynchronous.
constexpr int kLeanRows = 4;
// fp8 caches on sm_90a: sequences with more rows than this take the wgmma tile, whose fp8
// path keeps a cp.async ring of e4m3 codes in flight and converts each code once into the T
// panels (attention_wgmma.cuh), instead of the lean tile's convert + FMA per (row, key, d):
// every row, decodes included. Predicted (kernel report, Llama-3-8B bf16 q, block 16, H100 /
// H200): decode B=256 x 2k 524 -> 385 / 370 us (lean: 904 warp-instructions per 8 KB tile,
// wgmma: 568), 0.58x / 0.80x the bf16 cache's time; spec-verify q 4 B=64: 477 -> 97 us;
// D 64 decode 271 -> 259 us. The 64-row tile pads a 4-row decode 16x on the tensor cores
// (1 MFLOP a 32-key tile: ~60 % of the dense peak at H200's HBM rate), but decode is bound
// by issue slots per byte, and those drop 1.6x. The host launches the tensor-core kernel for
// every fp8 row count at D 64 / 128 where kernel_arch says sm_90 (elsewhere, as before, the
// lean-only kernel when no sequence has more than kRows rows).
constexpr int kFp8WgmmaRows = 0;

template <typename T, int DM, bool EXACT>
struct LeanCfg {
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int NCH = DM / VEC;                   // 16-byte chunks of a K/V row
  // Strided (16-bit D 80 / 96: 10 / 12 chunks, no power-of-two lane count): 16 lanes a group,
  // lane l owns the element pairs l + 16 j (j < NP) and, for D 80, element 32 NP + l, so all
  // 16 lanes compute (5 / 6 elements each). Padding to 16 lanes of 8 elements instead would
  // issue D 128's ~3000 warp-instructions per tile for 10 / 12 KB (3.4 / 4.1 B/instr, 37 / 25 %
  // of the FMAs on zeros); this way the FMAs and converts scale with D. The copy keeps the
  // chunk layout (lanes >= NCH copy nothing), rows padded by 16 bytes: without it the two
  // groups of a warp, 4 keys apart, read the same banks (4 x 160 / 192 B = 0 mod 128 B).
  static constexpr bool STRIDED = EXACT && sizeof(T) == 2 && (DM == 80 || DM == 96);
  static constexpr int NC = STRIDED ? 16 : NCH;          // lanes per group
  static constexpr bool OK = EXACT && DM % VEC == 0 &&
                             (STRIDED || NC == 8 || NC == 16 || NC == 32);
  static constexpr int NG = kThreads / NC;               // groups
  static constexpr int NK = STRIDED ? 4 * NG                           // keys/tile
                                    : kTileBytes / (2 * DM * static_cast<int>(sizeof(T)));
  static_assert(!OK || NK == 4 * NG, "4 keys per group per sub-tile");
  static constexpr int E = STRIDED ? DM / 16 : VEC;      // elements of Q / K / V / acc a lane
  static constexpr int NP = DM / 32;                     // strided: element pairs a lane
  static constexpr int KP = STRIDED ? DM + VEC : DM;     // K/V row pitch in the tile
  static constexpr int LOADS = NK * NC / kThreads;      // 16-byte K (and V) copies per thread
  static constexpr int NEND = 16 / NC > 1 ? 16 / NC : 1; // scores per lane after the reduce
  static constexpr int TILE = 2 * NK * KP * static_cast<int>(sizeof(T));  // bytes a stage
  // Layout: K/V [kStages][K, V][NK][KP] | per-group P [NG][16] + alpha [NG][4] fp32; after
  // the loop the stage area holds the per-group m, l [NG][4] and acc [NG][4][DM] fp32.
  static constexpr size_t SMEM = static_cast<size_t>(kStages) * TILE + NG * 20 * 4;
  static_assert(NG * 4 * (DM + 2) * 4 <= kStages * TILE, "merge area fits the stages");
  // fp8 caches, lean tile: a stage holds e4m3 codes [K, V][NK][KP8] (cp.async of VEC codes,
  // the T copy's layout at half / quarter the bytes: every lane copies, as in 16-bit) then
  // the keys' scales fp32 [K, V][NK] (4-byte cp.async, per slot); codes convert at use, the
  // scales multiply the scores (K) and P (V). Synchronous dequantising loads here left no copy
  // in flight: 5180 warp-instructions per 8 KB tile, predicted 31 % of H100 HBM at B=256 x 2k
  // (1.6x the bf16 time); this way 3600, 69 % (0.73x; the e4m3 -> f32 converts are most of
  // the difference to bf16's 3044). KP8: strided D 96 rows padded by 16 bytes (4 x 96 = 0 mod
  // 128: the two groups of a warp on the same banks), D 80's 4 x 80 = 64 mod 128 needs none.
  static constexpr int KP8 = STRIDED && DM % 32 == 0 ? DM + 16 : DM;
  static constexpr int TILE8 = 2 * NK * KP8 + 2 * NK * 4;
  static_assert(NG * 4 * (DM + 2) * 4 <= kStages * TILE8, "merge area fits the fp8 stages");
  // The tensor-core tile (16-bit D 64/128; DM 256: O needs 128 registers; strided D 80/96:
  // with 16-bit caches only, TC16) keeps 16-bit tiles (mma.sync: fp8 ones dequantised at the
  // copy; the wgmma tile's fp8 ring fits in less, WgmmaCfg): its SMEM.
  static constexpr bool TC = OK && !STRIDED && sizeof(T) == 2 && DM <= 128;
  // The head dims of the tensor-core tiles with 16-bit caches: D 80 / 96 too (padded to D
  // 128's shared layout, 5 / 6 k-steps; mma.sync and wgmma alike); fp8 caches there stay lean.
  static constexpr bool TC16 = TC || STRIDED;
  static constexpr size_t smem(bool fp8, bool tcp) {
    const size_t s8 = static_cast<size_t>(kStages) * TILE8 + NG * 20 * 4;
    return !fp8 ? SMEM : TC && tcp && SMEM > s8 ? SMEM : s8;
  }
};

// Elements e = 0..E-1 of lane gl of a lean group (Q, K, V rows alike; see LeanCfg): chunk
// layout, 16-byte chunk gl; strided, pairs gl + 16 j then element 32 NP + gl (D 80).
template <typename LC, typename T>
__device__ __forceinline__ void lean_load(const T* row, int gl, float (&f)[LC::E]) {
  if constexpr (!LC::STRIDED) {
    load_f<T, LC::VEC>(row + gl * LC::VEC, f);
  } else {
#pragma unroll
    for (int j = 0; j < LC::NP; ++j) {
      const Pack<T, 2> pk = *reinterpret_cast<const Pack<T, 2>*>(row + 2 * (gl + 16 * j));
      f[2 * j] = to_f<T>(pk.v[0]);
      f[2 * j + 1] = to_f<T>(pk.v[1]);
    }
    if constexpr (LC::E > 2 * LC::NP) f[2 * LC::NP] = to_f<T>(row[32 * LC::NP + gl]);
  }
}

// e4m3 codes for the lean tile, as floats / kFp8Unit (exact). Where the GPU has no e4m3
// conversion (sm_80/86: cuda_fp8.h's software path, ~86 warp-instructions a code pair in
// the lean fp8 loop: 13948 per tile on sm_80, predicted 2.9x the bf16 time; this way 4208,
// 0.89x, 53 % of A100 HBM) the code's bits
// are moved into an fp16 by integer ops: sign -> bit 15, exponent and mantissa -> bits 13-7,
// i.e. the exponent rebiased from 7 to 15 without adding: value / 256, subnormals and zero
// included (NaN codes 0x7f / 0xff read as +-480 / 256: the quantiser saturates, never writes
// them). The tile folds kFp8Unit into the Q scale (K) and P (V). The emulator takes this path
// too, so the CPU tests check it; sm_89+ converts in hardware (cvt.f16x2.e4m3x2, unit 1).
#if defined(RAGGED_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890)
#define RAGGED_FP8_BITS 1
constexpr float kFp8Unit = 256.f;
#else
constexpr float kFp8Unit = 1.f;
#endif

// Two codes (the low 16 bits of `two`) -> floats / kFp8Unit.
__device__ __forceinline__ float2 fp8x2_unit(uint32_t two) {
#ifdef RAGGED_FP8_BITS
  const uint32_t y = (two & 0xffu) | ((two & 0xff00u) << 8);  // codes at bits 0 and 16
  const uint32_t h = ((y & 0x007f007fu) << 7) | ((y & 0x00800080u) << 8);
  __half2 hh;
  memcpy(&hh, &h, 4);
  return __half22float2(hh);
#else
  return fp8x2_to_float2(two);
#endif
}

// The same elements of a row of e4m3 codes (fp8 caches), as floats / kFp8Unit (exact).
template <typename LC>
__device__ __forceinline__ void lean_load8(const uint8_t* row, int gl, float (&f)[LC::E]) {
  if constexpr (!LC::STRIDED) {
    const Pack<uint32_t, LC::VEC / 4> pk =
        *reinterpret_cast<const Pack<uint32_t, LC::VEC / 4>*>(row + gl * LC::VEC);
#pragma unroll
    for (int w = 0; w < LC::VEC / 4; ++w) {
      const float2 lo = fp8x2_unit(pk.v[w]), hi = fp8x2_unit(pk.v[w] >> 16);
      f[4 * w] = lo.x;
      f[4 * w + 1] = lo.y;
      f[4 * w + 2] = hi.x;
      f[4 * w + 3] = hi.y;
    }
  } else {
#pragma unroll
    for (int j = 0; j < LC::NP; ++j) {
      const float2 x = fp8x2_unit(*reinterpret_cast<const uint16_t*>(row + 2 * (gl + 16 * j)));
      f[2 * j] = x.x;
      f[2 * j + 1] = x.y;
    }
    if constexpr (LC::E > 2 * LC::NP) f[2 * LC::NP] = fp8x2_unit(row[32 * LC::NP + gl]).x;
  }
}

// The same elements of an fp32 row (the merge area), stored.
template <typename LC>
__device__ __forceinline__ void lean_store(float* row, int gl, const float (&f)[LC::E]) {
  if constexpr (!LC::STRIDED) {
#pragma unroll
    for (int e = 0; e < LC::VEC; e += 4)
      *reinterpret_cast<float4*>(row + gl * LC::VEC + e) =
          make_float4(f[e], f[e + 1], f[e + 2], f[e + 3]);
  } else {
#pragma unroll
    for (int j = 0; j < LC::NP; ++j)
      *reinterpret_cast<float2*>(row + 2 * (gl + 16 * j)) = make_float2(f[2 * j], f[2 * j + 1]);
    if constexpr (LC::E > 2 * LC::NP) row[32 * LC::NP + gl] = f[2 * LC::NP];
  }
}

// Sum N per-lane partials over the L lanes of a group while spreading the results: at the
// end lane l holds NEND = max(N / L, 1) sums, value index j + NEND * ((l % L) >> log2(L / N))
// (L > N: pairs of lanes hold the same sum). N - 1 shuffles for N <= L, not N log2 L.
template <int N, int W>
__device__ __forceinline__ void transpose_reduce(float* v, int lane) {
  if constexpr (W >= 1) {
    if constexpr (N > 1) {
      constexpr int H = N / 2;
      const bool up = lane & W;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const float send = up ? v[i] : v[i + H];
        const float keep = up ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, W);
      }
      transpose_reduce<H, W / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], W);
      transpose_reduce<1, W / 2>(v, lane);
    }
  }
}

// CTAs/SM the register budget is sized for. The lean/tensor-core kernels take 48.3-49.3 KB of
// shared memory (LeanCfg::SMEM): 4 CTAs fit sm_90's 228 KB (<= 128 registers), but sm_80's
// 164 KB hold 3 (+ 1 KB reserve each; sm_86/89's 100 KB hold 2), so there asking for 4 only
// forced spills (40 bytes at D=128) for occupancy shared memory never allows: 3 (<= 168
// registers) costs nothing. The strided D 80 / 96 lean tiles (30.6 / 36.6 KB, 108-116
// registers) fit 4 on sm_80 too: their lean-only kernels (TCP = false) take 4; with the
// tensor-core tile (TCP, 16-bit caches: 49 KB, 143 / 156 registers, no spills) 3. fp8 lean
// tiles (25-26 KB) would fit 4 on sm_80 by shared memory, but 4 spilled 16-24 bytes at D
// 64/128/256 there: 3.
// fp8 caches on sm_90a (TCP: the kernel has the tensor-core tile, which every fp8 launch at
// D 64 / 128 takes there, kFp8WgmmaRows): the wgmma tile's fp8 path keeps Q in registers (its
// shared memory is a ring slot) beside O: 168 of 3 CTAs/SM's 168 registers at D 64 and 128,
// no spills (attention_wgmma.cuh: the loop-invariant values it had spilled live in shared
// memory). Plain sm_90 / the host: D 128 at 3 (the mma.sync tile's dequantising copy spilled
// 24 B at 4). fp8 D 80 / 96 / 256 (lean only): 115-127 registers at 4, no spills.
// kernels/cuda_ops.py's _ctas_per_sm mirrors this table.
// QR (16-bit caches, sm_90a): the tensor-core tile keeps Q in registers as QK^T's A
// fragments (attention_wgmma.cuh: +32 registers at D 128, +16 at D 64, over a tile at exactly
// 128): sized for 3 (<= 168; 168 used at D 64, no spills); at D 128 with 64-key tiles (S and
// P twice as large: 254 registers, 81 KB of shared memory, WgmmaCfg) for 2. D 80 / 96 (O 40 / 48 registers, Q
// +20 / +24) fit 128 with Q in registers (128 used, no spills): 4 at every row count. Only
// launches with a row tile past kTcRows (prefill chunks) take it: the others stay at 4,
// which their memory-bound loops need (spec-verify q 4 x G 4, predicted H100: 97% of HBM at
// 4, 65% at 3), and launches with no tensor-core row (max q_len x G <= kLeanRows) take the
// TCP = false lean-only kernel.
template <typename T, int DM, bool EXACT, bool FP8, bool TCP, bool QR = false>
struct MinBlocks {
  using LC = LeanCfg<T, DM, EXACT>;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  static constexpr int value = LC::OK && (!LC::STRIDED || (TCP && !FP8)) ? 3 : 4;
#else
  static constexpr int value =
      TCP && LC::TC && !FP8 && QR && static_cast<bool>(RAGGED_WGMMA) && DM == 128 ? 2
      : TCP && LC::TC && (FP8 ? DM == 128 || static_cast<bool>(RAGGED_WGMMA)
                              : QR && static_cast<bool>(RAGGED_WGMMA)) ? 3 : 4;
#endif
};

#include "attention_wgmma.cuh"  // sm_90a's tensor-core tile (wgmma); uses the helpers above

// FP8: the cache holds e4m3 codes (p.kv_fp8). The lean tile stages codes and per-slot scales by
// cp.async and converts at use (LeanCfg::TILE8); the sm_90a wgmma tile stages them the same
// way and converts each tile once into its T panels (attention_wgmma.cuh); the mma.sync tile
// dequantises each chunk into its T tile at the copy (copy_kv_chunk); the generic tile (other
// head dims) keeps e4m3 bytes in shared memory and scales scores / probabilities.
template <typename T, int DM, bool EXACT, bool FP8, bool TCP, bool QR = false>
__global__ void __launch_bounds__(kThreads, (MinBlocks<T, DM, EXACT, FP8, TCP, QR>::value))
paged_attention_kernel(const PagedAttentionParams p) {
  using C = AttnCfg<T, DM>;
  using LC = LeanCfg<T, DM, EXACT>;
  constexpr int VEC = C::VEC, NCM = C::NCM, NK = C::NK, MAXR = C::MAXR;
  const int D = EXACT ? DM : p.head_dim;  // a constant in the exact instantiations
  // K/V tile elements: T, or e4m3 bytes for fp8 caches; rows padded by 16 bytes either way.
  using KT = std::conditional_t<FP8, uint8_t, T>;
  const int NC = D / VEC, KROW = D + 16 / static_cast<int>(sizeof(KT)), RG = kThreads / NC;
  extern __shared__ float4 smem_raw[];  // float4: 16-byte alignment for every section
  float* Qs = reinterpret_cast<float*>(smem_raw);     // [kRows][D], pre-scaled
  float* Ss = Qs + kRows * D;                          // [kRows][NK] scores, then P
  float* m_s = Ss + kRows * NK;                        // running max per row
  float* l_s = m_s + kRows;                            // running sum per row
  float* alpha_s = l_s + kRows;                        // rescale of this tile per row
  KT* kv_s = reinterpret_cast<KT*>(alpha_s + 2 * kRows); // [2][2][NK][KROW]
  float* kvsc_s = reinterpret_cast<float*>(kv_s + 2 * 2 * NK * KROW);  // fp8: [2][2][NK]

  const int S = p.num_kv_splits;
  const int split = static_cast<int>(blockIdx.x % S);
  const int64_t slot = blockIdx.x / S;
  const int kvh = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  const int G = p.num_q_heads / p.num_kv_heads;
  int b, rtile;
  if (p.tiles_per_seq > 0) {  // uniform layout
    b = static_cast<int>(slot / p.tiles_per_seq);
    rtile = static_cast<int>(slot % p.tiles_per_seq);
  } else {                    // searched layout (mixed batches)
    b = find_seq(p.cu_seqlens_q, p.num_seqs, G, slot);
    rtile = static_cast<int>(slot - first_slot(p.cu_seqlens_q, b, G));
  }
  const int q_start = p.cu_seqlens_q[b];
  const int q_len = p.cu_seqlens_q[b + 1] - q_start;
  const int kv_len = p.seq_lens[b];
  const int64_t total_rows = static_cast<int64_t>(max(q_len, 0)) * G;
  const int64_t row0_64 = static_cast<int64_t>(rtile) * kRows;
  if (row0_64 >= total_rows) return;            // q_len 0, or a tile past this sequence
  const int row0 = static_cast<int>(row0_64);
  // Tile class of this CTA: tensor cores for the sequences with more than kLeanRows rows in
  // 16-bit types (prefill chunks, spec-verify queries; fp8: more than kRows, every row on
  // sm_90a), 64 rows a CTA (the CTA of every 4th 16-row slot; the other 3 exit); the lean
  // CUDA-core tile for the others (decodes).
  // See LeanCfg (TC16: with D 80 / 96, 16-bit caches only); TCP: compiled in (MinBlocks).
  constexpr bool TC_OK = (FP8 ? LC::TC : LC::TC16) && TCP;
  const bool tc =
      TC_OK && total_rows > (FP8 ? (RAGGED_WGMMA ? kFp8WgmmaRows : kRows) : kLeanRows);
  if (tc && (rtile & 3)) return;
  const int tile_rows = tc ? kTcRows : kRows;
  const int nrows = total_rows - row0_64 < tile_rows ? static_cast<int>(total_rows - row0_64)
                                                     : tile_rows;
  const SplitPlan plan = plan_splits(kv_len, q_len, p.sliding_window, S);
  if (split >= plan.n) return;

  const int window = p.sliding_window;
  // One division per CTA, not one per score (an IEEE division is ~10 instructions + a slow path).
  const float inv_cap = p.softcap > 0.f ? 1.f / p.softcap : 0.f;
  const int ctx = kv_len - q_len;
  const int tok_first = row0 / G, tok_last = (row0 + nrows - 1) / G;
  // Keys any row of this CTA can see, within this split.
  int lo = window > 0 ? max(0, ctx + tok_first - window + 1) : 0;
  int hi = min(kv_len, ctx + tok_last + 1);
  const int split_lo = plan.lo + split * plan.chunk;
  lo = max(lo, split_lo);
  const int64_t split_hi = static_cast<int64_t>(split_lo) + plan.chunk;  // may pass INT_MAX
  if (split_hi < hi) hi = static_cast<int>(split_hi);
  const int ntiles = hi > lo ? (hi - lo + NK - 1) / NK : 0;

  if constexpr (TC_OK) {
    if (tc) {
#if RAGGED_WGMMA
      wgmma_tile<T, DM, FP8, QR>(p, smem_raw, TcArgs{b, q_start, ctx, row0, nrows, G, kvh, lo, hi,
                                                 split, plan.n});  // sm_90a: wgmma
      return;
#endif
      // FA2-style tile on mma.sync.m16n8k16 (fp32 accumulate): warp w owns rows 16w..16w+15;
      // S = Q K^T and O += P V with P kept in registers (the C fragment of S is the A fragment
      // of P), online softmax per row in fp32. Shared memory: Q [64][DM] and 2 stages of K/V
      // [NK][DM], 16-byte chunk c of row r stored at chunk c ^ (r % 8) so that the 8 row
      // addresses of every ldmatrix phase hit distinct banks.
      constexpr int TVEC = LC::VEC, TNC = LC::NC, TNG = LC::NG, TNK = LC::NK;
      // NT 8-key tiles a chunk of CK keys (S of 16 x CK: CK / 2 registers). D 64 takes 16-key
      // chunks: with 32 (16 more live registers for S while P V runs) sm_90a spilled 8 bytes at
      // the 128-register cap of 4 CTAs/SM; the extra rescale of O is 32 FMULs per 16 HMMAs.
      // D 128 keeps 32 (16 keys spilled 16 bytes there: O's 64 registers dominate anyway).
      // D 80 / 96: rows padded to DP = 128 (16 chunks: c ^ (r % 8) stays in the row for the
      // 10 / 12 real chunks c, the only ones copied and read), KS = 5 / 6 k-steps (an odd
      // last one alone: ldmatrix .x2), DT = 10 / 12 8-column tiles of O. Predicted A100
      // prefill 2k: 104 / 120 TFLOP/s (the lean tile: 10.5 / 11.8), mixed 2048+256x2048
      // 76 / 79 % of HBM (25 / 27 %).
      constexpr int KS = DM / 16, NT = DM <= 64 ? 2 : 4, DT = DM / 8, CK = 8 * NT;
      constexpr int DP = (DM + 63) / 64 * 64, CH = DM / 8;
      static_assert(kTcRows * DP * 2 + 2 * kTileBytes <= kStages * kTileBytes &&
                        2 * TNK * DP * 2 == kTileBytes, "TC smem");
      T* Qs = reinterpret_cast<T*>(smem_raw);
      T* kvs = Qs + kTcRows * DP;
      auto sw = [](int r, int ch) { return r * DP + ((ch ^ (r & 7)) * TVEC); };
      const int nt_tiles = hi > lo ? (hi - lo + TNK - 1) / TNK : 0;
      const T* q = static_cast<const T*>(p.q);
      for (int i = tid; i < kTcRows * CH; i += kThreads) {
        const int r = i / CH, ch = i % CH;
        const bool ok = r < nrows;
        const int rr = row0 + (ok ? r : 0);
        cp_async16(Qs + sw(r, ch),
                   q + (q_start + rr / G) * p.q_stride_t + (kvh * G + rr % G) * p.q_stride_h +
                       ch * TVEC, ok);
      }
      const int grp = tid / TNC, c = tid % TNC;
      const int bs = p.block_size;
      // Registers are the TC tile's limit (128 for 4 CTAs/SM; O alone holds 64): the cache
      // pointers and the block stride are re-read from the kernel parameters (constant bank
      // operands) rather than held, the head/chunk offset and token stride are 32-bit.
      const int head_c = kvh * DM + c * TVEC;      // < 2^24: Hkv <= 65535, D <= 256
      const int tok_stride = p.num_kv_heads * DM;
      const int32_t* bt = p.block_table + static_cast<int64_t>(b) * p.block_table_stride;
      int wkey = lo + grp;  // the lean tile's block walk (keys grp + j NG, in tile order)
      int wbi = p.block_shift >= 0 ? wkey >> p.block_shift : wkey / bs;
      int woff = wkey - wbi * bs;
      auto page_of = [&](int bi) {
        return static_cast<int64_t>(bt[bi]) * (static_cast<int64_t>(p.num_kv_heads) * DM * bs);
      };
      int64_t wpage = wkey < hi ? page_of(wbi) : 0;
      auto load = [&](int stage) {
        T* ks = kvs + stage * 2 * TNK * DP;
#pragma unroll
        for (int j = 0; j < LC::LOADS; ++j) {
          const int k = grp + j * TNG;
          const bool valid = wkey < hi;
          const int64_t off = wpage + static_cast<int64_t>(woff) * tok_stride + head_c;
          if (TNC == CH || c < CH)  // D 80 / 96: 16-lane groups, 10 / 12 chunks copied
            copy_kv_chunk<T, FP8, TVEC>(ks + sw(k, c), ks + TNK * DP + sw(k, c), p, off, valid,
                                        bt, wbi, woff, kvh);
          wkey += TNG;
          woff += TNG;
          if (woff >= bs) {
            woff -= bs;
            ++wbi;
            if (wkey < hi) wpage = page_of(wbi);
          }
        }
      };
      const int g = lane >> 2, t4 = lane & 3, wr0 = warp * 16;
      const bool warp_rows = wr0 < nrows;
      const int rA = wr0 + g, rB = rA + 8;
      // A missing row sees no key: position -1 (and fewer live registers than a flag).
      const int qposA = rA < nrows ? ctx + (row0 + rA) / G : -1;
      const int qposB = rB < nrows ? ctx + (row0 + rB) / G : -1;
      const bool warp_full = wr0 + 16 <= nrows;
      const int qpos_lo = ctx + (row0 + min(wr0, nrows - 1)) / G;
      const int qpos_hi = ctx + (row0 + min(wr0 + 15, nrows - 1)) / G;
      const bool has_cap = p.softcap > 0.f;
      const float sl2 = has_cap ? p.scale : p.scale * kLog2e;
      float o[DT][4];
#pragma unroll
      for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
      float mA = -INFINITY, mB = -INFINITY, lA = 0.f, lB = 0.f;  // l: this lane's part
      if (nt_tiles > 0) load(0);
      cp_async_commit();  // Q and tile 0
      int stage = 0;
      for (int it = 0; it < nt_tiles; ++it) {
        if (it + 1 < nt_tiles) load(stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        // CK keys at a time (S of 16 x CK in CK / 2 registers).
        for (int kc2 = 0; kc2 < TNK / CK && warp_rows; ++kc2) {
          const T* Ks = kvs + stage * 2 * TNK * DP + kc2 * CK * DP;
          const T* Vs = Ks + TNK * DP;
          float sc[NT][4];
#pragma unroll
          for (int n = 0; n < NT; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
          for (int k2 = 0; k2 < KS; k2 += 2) {
            const bool pair = k2 + 1 < KS;  // false: D 80's k-step 4 alone
            uint32_t qa[2][4];
#pragma unroll
            for (int h = 0; h < 2; ++h)
              if (h == 0 || pair)
                ldmatrix<4, false>(qa[h], Qs + sw(wr0 + (lane & 7) + 8 * ((lane >> 3) & 1),
                                                  2 * (k2 + h) + (lane >> 4)));
#pragma unroll
            for (int n = 0; n < NT; ++n) {
              if (pair) {
                uint32_t kb[4];
                ldmatrix<4, false>(kb, Ks + sw(8 * n + (lane & 7), 2 * k2 + (lane >> 3)));
                const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
                mma_16816<T>(sc[n], qa[0], b0);
                mma_16816<T>(sc[n], qa[1], b1);
              } else {
                uint32_t b0[2];  // lanes 0-15's rows: chunks 2 k2, 2 k2 + 1
                ldmatrix<2, false>(b0, Ks + sw(8 * n + (lane & 7), 2 * k2 + ((lane >> 3) & 1)));
                mma_16816<T>(sc[n], qa[0], b0);
              }
            }
          }
          // Scores stay unscaled (x f inside the exp2's FFMA); masks only on the tiles that
          // need them (a partial last tile, the causal diagonal, a window edge, missing rows):
          // in a long chunk most tiles skip ~10 instructions a score.
          const int key0 = lo + it * TNK + kc2 * CK, kmax = key0 + CK - 1;
          float f = sl2;
          if (has_cap) {
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
              for (int j = 0; j < 4; ++j)
                sc[n][j] = p.softcap * tanhf(sc[n][j] * sl2 * inv_cap) * kLog2e;
            f = 1.f;
          }
          const bool full = warp_full && kmax < hi && kmax <= qpos_lo &&
                            (window <= 0 || key0 > qpos_hi - window);
          if (!full) {
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const int key = key0 + 8 * n + 2 * t4 + (j & 1);
                const int qp = j < 2 ? qposA : qposB;
                const bool ok = key < hi && key <= qp && (window <= 0 || key > qp - window);
                if (!ok) sc[n][j] = -INFINITY;
              }
          }
          float mxA = -INFINITY, mxB = -INFINITY;
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            mxA = fmaxf(mxA, fmaxf(sc[n][0], sc[n][1]));
            mxB = fmaxf(mxB, fmaxf(sc[n][2], sc[n][3]));
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
          for (int n = 0; n < NT; ++n) {
            sc[n][0] = fast_exp2(fmaf(sc[n][0], f, -uA));
            sc[n][1] = fast_exp2(fmaf(sc[n][1], f, -uA));
            sc[n][2] = fast_exp2(fmaf(sc[n][2], f, -uB));
            sc[n][3] = fast_exp2(fmaf(sc[n][3], f, -uB));
            sA += sc[n][0] + sc[n][1];
            sB += sc[n][2] + sc[n][3];
          }
          lA = lA * aA + sA;
          lB = lB * aB + sB;
#pragma unroll
          for (int d = 0; d < DT; ++d) {
            o[d][0] *= aA; o[d][1] *= aA;
            o[d][2] *= aB; o[d][3] *= aB;
          }
#pragma unroll
          for (int kt = 0; kt < NT / 2; ++kt) {
            const uint32_t pa[4] = {pack2<T>(sc[2 * kt][0], sc[2 * kt][1]),
                                    pack2<T>(sc[2 * kt][2], sc[2 * kt][3]),
                                    pack2<T>(sc[2 * kt + 1][0], sc[2 * kt + 1][1]),
                                    pack2<T>(sc[2 * kt + 1][2], sc[2 * kt + 1][3])};
#pragma unroll
            for (int d2 = 0; d2 < DT; d2 += 2) {
              uint32_t vb[4];
              ldmatrix<4, true>(vb, Vs + sw(16 * kt + 8 * ((lane >> 3) & 1) + (lane & 7),
                                            d2 + (lane >> 4)));
              const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
              mma_16816<T>(o[d2], pa, b0);
              mma_16816<T>(o[d2 + 1], pa, b1);
            }
          }
        }
        __syncthreads();  // the next iteration's prefetch overwrites this stage
        stage ^= 1;
      }
      cp_async_wait<0>();
      if (!warp_rows) return;
#pragma unroll
      for (int w = 1; w <= 2; w <<= 1) {
        lA += __shfl_xor_sync(0xffffffffu, lA, w);
        lB += __shfl_xor_sync(0xffffffffu, lB, w);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = h ? rB : rA;
        if (r >= nrows) continue;
        const float l = h ? lB : lA, mm = h ? mB : mA;
        const float inv = l > 0.f ? 1.f / l : 0.f;  // a row that sees no key gives zeros
        const int rr = row0 + r;
        const int64_t t = q_start + rr / G;
        const int qh = kvh * G + rr % G;
        if (plan.n == 1) {
          T* out = static_cast<T*>(p.out) + t * p.out_stride_t + qh * p.out_stride_h;
#pragma unroll
          for (int d = 0; d < DT; ++d) {
            const float f2[2] = {o[d][2 * h] * inv, o[d][2 * h + 1] * inv};
            store_f<T, 2>(out + 8 * d + 2 * t4, f2);
          }
        } else {
          const int64_t row = (static_cast<int64_t>(split) * p.num_tokens + t) * p.num_q_heads + qh;
          float* po = p.partial_out + row * DM;
#pragma unroll
          for (int d = 0; d < DT; ++d)
            *reinterpret_cast<float2*>(po + 8 * d + 2 * t4) =
                make_float2(o[d][2 * h] * inv, o[d][2 * h + 1] * inv);
          if (t4 == 0) p.partial_lse[row] = l > 0.f ? (mm + log2f(l)) / kLog2e : -INFINITY;
        }
      }
      return;
    }
  }
  if constexpr (LC::OK) {
    constexpr int LVEC = LC::VEC, LNC = LC::NC, NG = LC::NG, LNK = LC::NK, NEND = LC::NEND;
    constexpr int LE = LC::E, KP = LC::KP, NCH = LC::NCH, KP8 = LC::KP8;
    const int nt = hi > lo ? (hi - lo + LNK - 1) / LNK : 0;
    // Stages of [K, V][LNK][KP] T (fp8: LC::TILE8 bytes, see LeanCfg), then [NG][20] fp32.
    constexpr int STAGE_BYTES = FP8 ? LC::TILE8 : LC::TILE;
    char* sm = reinterpret_cast<char*>(smem_raw);
    float* sc = reinterpret_cast<float*>(sm + kStages * STAGE_BYTES);  // [NG][20]
    const bool per_slot = FP8 && p.k_scale != nullptr;  // fp8: scales per slot, else floats
    const int grp = tid / LNC, c = tid % LNC, glane = tid % LNC;
    const int nrg = nrows <= 4 ? 1 : nrows <= 8 ? 2 : 4;  // row groups that exist
    const int rg = grp % nrg, kg = grp / nrg, nkg = NG / nrg;
    const bool has_cap = p.softcap > 0.f;
    // Q rows rg*4 + i of chunk c in registers, pre-scaled (by log2 e too: exp2 below).
    // fp8 per-tensor: the K scale folds in here, the V scale into P (per slot: from the tile).
    float qscale = has_cap ? p.scale : p.scale * kLog2e;
    if (FP8) qscale *= per_slot ? kFp8Unit : kFp8Unit * p.k_scale_f;  // see lean_load8
    const T* q = static_cast<const T*>(p.q);
    float qr[4][LE];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = rg * 4 + i;
      if (r < nrows) {
        const int rr = row0 + r;
        lean_load<LC>(q + (q_start + rr / G) * p.q_stride_t + (kvh * G + rr % G) * p.q_stride_h,
                      glane, qr[i]);
#pragma unroll
        for (int e = 0; e < LE; ++e) qr[i][e] *= qscale;
      } else {
#pragma unroll
        for (int e = 0; e < LE; ++e) qr[i][e] = 0.f;
      }
    }
    // The (row, key) of this lane's reduced scores are fixed: value index i * 4 + kk, all NEND
    // of them in one row i (my_i); the keys kk of a row sit in-lane (j) and on lanes KW0, 2 KW0.
    constexpr int SH = LNC > 16 ? 1 : 0;  // lanes per sum after the reduce (2 when NC = 32)
    constexpr int KW0 = NEND == 1 ? (1 << SH) : 1, KLEV = NEND == 1 ? 2 : 1;
    const int idx0 = NEND * (glane >> SH);
    const int my_i = idx0 / 4, my_r = rg * 4 + my_i;
    const bool my_row = my_r < nrows;
    const int my_qpos = ctx + (row0 + min(my_r, nrows - 1)) / G;
    const bool my_writer = SH == 0 || (glane & 1) == 0;
    const int bs = p.block_size;
    const int64_t tok_stride = static_cast<int64_t>(p.num_kv_heads) * DM;
    const int64_t blk_stride = tok_stride * bs;
    const int32_t* bt = p.block_table + static_cast<int64_t>(b) * p.block_table_stride;
    // This lane's chunk c of a K/V row: LVEC elements (16 bytes; fp8: LVEC codes). fp8 per
    // slot: lane 0 of a group also copies the key's K scale, lane 1 its V scale.
    const int64_t head_c = static_cast<int64_t>(kvh) * DM + c * LVEC;
    const float* scale_src = c == 0 ? p.k_scale : p.v_scale;
    // This thread copies keys lo + grp + j NG (j = 0, 1, ...) in tile order, chunk c of K and
    // of V from one page offset. Consecutive keys are NG <= 16 <= block_size apart, so the
    // block index is walked (at most one step a key) instead of divided: one division (or
    // shift, for a power-of-two block size) per CTA, none in the loop.
    int wkey = lo + grp;
    int wbi = p.block_shift >= 0 ? wkey >> p.block_shift : wkey / bs;
    int woff = wkey - wbi * bs;
    int wblk = wkey < hi ? bt[wbi] : 0;  // fp8 per-slot scales: (block * bs + off) * Hkv + h
    int64_t wpage = static_cast<int64_t>(wblk) * blk_stride;
    auto load = [&](int stage) {
      char* sb = sm + stage * STAGE_BYTES;
#pragma unroll
      for (int j = 0; j < LC::LOADS; ++j) {
        const int k = grp + j * NG;
        const bool valid = wkey < hi;
        const int64_t off = wpage + static_cast<int64_t>(woff) * tok_stride + head_c;
        if constexpr (!FP8) {
          T* ks = reinterpret_cast<T*>(sb);
          if (!LC::STRIDED || c < NCH)  // strided: lanes past the row's chunks copy nothing
            copy_kv_chunk<T, false, LVEC>(ks + k * KP + c * LVEC, ks + (LNK + k) * KP + c * LVEC,
                                          p, off, valid, bt, wbi, woff, kvh);
        } else {
          const uint8_t* kc8 = static_cast<const uint8_t*>(p.k_cache);
          const uint8_t* vc8 = static_cast<const uint8_t*>(p.v_cache);
          if (!LC::STRIDED || c < NCH) {
            cp_async_ca<LVEC>(sb + k * KP8 + c * LVEC, kc8 + (valid ? off : 0), valid);
            cp_async_ca<LVEC>(sb + (LNK + k) * KP8 + c * LVEC, vc8 + (valid ? off : 0), valid);
          }
          if (per_slot && c < 2) {
            const int64_t si =
                (static_cast<int64_t>(wblk) * bs + woff) * p.num_kv_heads + kvh;
            float* sd = reinterpret_cast<float*>(sb + 2 * LNK * KP8) + c * LNK + k;
            cp_async_ca<4>(sd, scale_src + (valid ? si : 0), valid);
          }
        }
        wkey += NG;
        woff += NG;
        if (woff >= bs) {
          woff -= bs;
          ++wbi;
          if (wkey < hi) {
            wblk = bt[wbi];
            wpage = static_cast<int64_t>(wblk) * blk_stride;
          }
        }
      }
    };
    float acc[4][LE];
    float m = -INFINITY, l = 0.f;  // running max (log2 units) and sum of row my_i
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < LE; ++e) acc[i][e] = 0.f;
    float* gs = sc + grp * 20;  // P [key kk][row i], then alpha [row i]
#pragma unroll
    for (int s0 = 0; s0 < kStages - 1; ++s0) {
      if (s0 < nt) load(s0);
      cp_async_commit();
    }
    int stage = 0;
    for (int it = 0; it < nt; ++it) {
      cp_async_wait<kStages - 2>();  // tile `it` landed (this thread's copies) ...
      __syncthreads();               // ... everyone's; and stage it-1 is no longer read
      {
        const int nxt = it + kStages - 1;
        int ns = stage + kStages - 1;
        if (ns >= kStages) ns -= kStages;
        if (nxt < nt) load(ns);
        cp_async_commit();
      }
      const char* sb = sm + stage * STAGE_BYTES;
      const T* Ks = reinterpret_cast<const T*>(sb);              // 16-bit / fp32 caches
      const T* Vs = Ks + LNK * KP;
      const uint8_t* K8 = reinterpret_cast<const uint8_t*>(sb);  // fp8: codes, then scales
      const uint8_t* V8 = K8 + LNK * KP8;
      const float* ksc = reinterpret_cast<const float*>(V8 + LNK * KP8);
      const float* vsc = ksc + LNK;
      const int key0 = lo + it * LNK;
      for (int sub = 0; sub < nrg; ++sub) {
        const int kb = (sub * nkg + kg) * 4;  // first key of this group's sub-tile
        float sv[16];                          // [row i][key kk] partial dots of chunk c
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          float kf[LE];
          if constexpr (FP8) lean_load8<LC>(K8 + (kb + kk) * KP8, glane, kf);
          else lean_load<LC>(Ks + (kb + kk) * KP, glane, kf);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            float d = 0.f;
#pragma unroll
            for (int e = 0; e < LE; ++e) d = fmaf(qr[i][e], kf[e], d);
            sv[i * 4 + kk] = d;
          }
        }
        transpose_reduce<16, LNC / 2>(sv, glane);
        // Masks, then the online softmax of row my_i over the 4 keys (lanes of the row).
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < NEND; ++j) {
          const int key = key0 + kb + (idx0 + j) % 4;
          float s = sv[j];
          if (per_slot) s *= ksc[kb + (idx0 + j) % 4];  // the key's scale, before the softcap
          if (has_cap) s = p.softcap * tanhf(s * inv_cap) * kLog2e;
          const bool ok = my_row && key < hi && key <= my_qpos &&
                          (window <= 0 || key > my_qpos - window);
          sv[j] = ok ? s : -INFINITY;
          mx = fmaxf(mx, sv[j]);
        }
#pragma unroll
        for (int lv = 0, w = KW0; lv < KLEV; ++lv, w <<= 1)
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, w));
        const float m_new = fmaxf(m, mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no (-inf) - (-inf)
        const float alpha = fast_exp2(m - m_use);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < NEND; ++j) {
          sv[j] = fast_exp2(sv[j] - m_use);
          sum += sv[j];
        }
#pragma unroll
        for (int lv = 0, w = KW0; lv < KLEV; ++lv, w <<= 1)
          sum += __shfl_xor_sync(0xffffffffu, sum, w);
        l = l * alpha + sum;
        m = m_new;
        __syncwarp();  // every lane of the group has read the previous sub-tile's P
        if (my_writer) {
#pragma unroll
          for (int j = 0; j < NEND; ++j) {
            float pv = sv[j];  // fp8: P x the key's V scale (l sums the unscaled P)
            if constexpr (FP8) pv *= kFp8Unit * (per_slot ? vsc[kb + (idx0 + j) % 4] : p.v_scale_f);
            gs[((idx0 + j) % 4) * 4 + my_i] = pv;
          }
          if ((idx0 % 4) == 0) gs[16 + my_i] = alpha;
        }
        __syncwarp();
        const float4 a4 = *reinterpret_cast<const float4*>(gs + 16);
        const float al[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int e = 0; e < LE; ++e) acc[i][e] *= al[i];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const float4 p4 = *reinterpret_cast<const float4*>(gs + kk * 4);
          const float pr[4] = {p4.x, p4.y, p4.z, p4.w};
          float vf[LE];
          if constexpr (FP8) lean_load8<LC>(V8 + (kb + kk) * KP8, glane, vf);
          else lean_load<LC>(Vs + (kb + kk) * KP, glane, vf);
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int e = 0; e < LE; ++e) acc[i][e] = fmaf(pr[i], vf[e], acc[i][e]);
        }
      }
      if (++stage == kStages) stage = 0;
    }
    cp_async_wait<0>();
    __syncthreads();  // the stage area becomes the merge area
    float* mb = reinterpret_cast<float*>(smem_raw);  // [NG][4] max, then [NG][4] sum
    float* lb = mb + NG * 4;
    float* ob = lb + NG * 4;                          // [NG][4][DM]
    if (my_writer && idx0 % 4 == 0) {
      mb[grp * 4 + my_i] = m;
      lb[grp * 4 + my_i] = l;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) lean_store<LC>(ob + (grp * 4 + i) * DM, glane, acc[i]);
    __syncthreads();
    for (int item = tid; item < nrows * NCH; item += kThreads) {
      const int r = item / NCH, cc = item % NCH, rgi = r / 4, i = r % 4;
      float mx = -INFINITY;
      for (int k2 = 0; k2 < nkg; ++k2) mx = fmaxf(mx, mb[(k2 * nrg + rgi) * 4 + i]);
      const float m_use = mx == -INFINITY ? 0.f : mx;
      float lsum = 0.f, o[LVEC];
#pragma unroll
      for (int e = 0; e < LVEC; ++e) o[e] = 0.f;
      for (int k2 = 0; k2 < nkg; ++k2) {
        const int g2 = (k2 * nrg + rgi) * 4 + i;
        const float w = fast_exp2(mb[g2] - m_use);
        lsum = fmaf(w, lb[g2], lsum);
#pragma unroll
        for (int e = 0; e < LVEC; ++e) o[e] = fmaf(w, ob[g2 * DM + cc * LVEC + e], o[e]);
      }
      const float inv = lsum > 0.f ? 1.f / lsum : 0.f;  // a row that sees no key gives zeros
#pragma unroll
      for (int e = 0; e < LVEC; ++e) o[e] *= inv;
      const int rr = row0 + r;
      const int64_t t = q_start + rr / G;
      const int qh = kvh * G + rr % G;
      if (plan.n == 1) {
        store_f<T, LVEC>(static_cast<T*>(p.out) + t * p.out_stride_t + qh * p.out_stride_h +
                             cc * LVEC, o);
      } else {
        const int64_t row = (static_cast<int64_t>(split) * p.num_tokens + t) * p.num_q_heads + qh;
        float* po = p.partial_out + row * DM + cc * LVEC;
#pragma unroll
        for (int e = 0; e < LVEC; e += 4)
          *reinterpret_cast<float4*>(po + e) = make_float4(o[e], o[e + 1], o[e + 2], o[e + 3]);
        if (cc == 0) p.partial_lse[row] = lsum > 0.f ? (mx + log2f(lsum)) / kLog2e : -INFINITY;
      }
    }
  } else {

  // Q rows -> fp32 smem, scaled once here rather than per score.
  const T* q = static_cast<const T*>(p.q);
  for (int i = tid; i < kRows * NC; i += kThreads) {
    const int r = i / NC, c = i % NC;
    float f[VEC];
    if (r < nrows) {
      const int rg = row0 + r;
      const int64_t t = q_start + rg / G;
      const int qh = kvh * G + rg % G;
      load_f<T, VEC>(q + t * p.q_stride_t + qh * p.q_stride_h + c * VEC, f);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) f[e] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) Qs[r * D + c * VEC + e] = f[e] * p.scale;
  }
  if (tid < kRows) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
    alpha_s[tid] = 1.f;
  }

  const KT* kc = static_cast<const KT*>(p.k_cache);
  const KT* vc = static_cast<const KT*>(p.v_cache);
  const int64_t tok_stride = static_cast<int64_t>(p.num_kv_heads) * D;
  const int64_t blk_stride = tok_stride * p.block_size;
  const int32_t* bt = p.block_table + static_cast<int64_t>(b) * p.block_table_stride;
  const int64_t head_off = static_cast<int64_t>(kvh) * D;

  auto load_tile = [&](int tile, int stage) {
    const int key0 = lo + tile * NK;
    if constexpr (FP8) {
      // e4m3 rows: 16-byte cp.async copies (16 codes) when D % 16 == 0, else 8-byte plain
      // copies (D = 8, 24, 40, ...: cp.async.cg takes 16 bytes only). Then each key's K and V
      // scale (per slot: flat slot * Hkv + head; per tensor: the floats), 0 past `hi`.
      const int CB = (D & 15) ? 8 : 16, KNC = D / CB;
      for (int i = tid; i < 2 * NK * KNC; i += kThreads) {
        const int which = i / (NK * KNC);
        const int rem = i % (NK * KNC);
        const int k = rem / KNC, c = rem % KNC;
        const int key = key0 + k;
        const bool valid = key < hi;
        const KT* base = which ? vc : kc;
        const KT* src = base;
        if (valid) {
          const int64_t blk = bt[key / p.block_size];
          src = base + blk * blk_stride + static_cast<int64_t>(key % p.block_size) * tok_stride +
                head_off + c * CB;
        }
        KT* dst = kv_s + ((stage * 2 + which) * NK + k) * KROW + c * CB;
        if (CB == 16) cp_async16(dst, src, valid);
        else *reinterpret_cast<uint2*>(dst) =
                 valid ? *reinterpret_cast<const uint2*>(src) : make_uint2(0u, 0u);
      }
      for (int i = tid; i < 2 * NK; i += kThreads) {
        const int which = i / NK, k = i % NK, key = key0 + k;
        const float* sp = which ? p.v_scale : p.k_scale;
        float sc = 0.f;
        if (key < hi) {
          if (sp != nullptr) {
            const int64_t slot = static_cast<int64_t>(bt[key / p.block_size]) * p.block_size +
                                 key % p.block_size;
            sc = sp[slot * p.num_kv_heads + kvh];
          } else {
            sc = which ? p.v_scale_f : p.k_scale_f;
          }
        }
        kvsc_s[(stage * 2 + which) * NK + k] = sc;
      }
      return;
    }
    for (int i = tid; i < 2 * NK * NC; i += kThreads) {
      const int which = i / (NK * NC);  // 0: K, 1: V
      const int rem = i % (NK * NC);
      const int k = rem / NC, c = rem % NC;
      const int key = key0 + k;
      const bool valid = key < hi;
      const KT* base = which ? vc : kc;
      const KT* src = base;  // a valid address even when nothing is read
      if (valid) {
        const int64_t blk = bt[key / p.block_size];
        src = base + blk * blk_stride + static_cast<int64_t>(key % p.block_size) * tok_stride +
              head_off + c * VEC;
      }
      cp_async16(kv_s + ((stage * 2 + which) * NK + k) * KROW + c * VEC, src, valid);
    }
  };

  float acc[MAXR][VEC];
#pragma unroll
  for (int j = 0; j < MAXR; ++j)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[j][e] = 0.f;
  const int pv_c = tid % NC, pv_rg = tid / NC;
  const bool pv_active = pv_rg < RG;

  if (ntiles > 0) load_tile(0, 0);
  cp_async_commit();
  __syncthreads();  // Qs and the row statistics are visible to every thread

  for (int it = 0; it < ntiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < ntiles) load_tile(it + 1, stage ^ 1);
    cp_async_commit();    // possibly empty group: keeps "all but the newest" == tile `it`
    cp_async_wait<1>();
    __syncthreads();
    const KT* Ks = kv_s + (stage * 2) * NK * KROW;
    const KT* Vs = Ks + NK * KROW;
    const float* Ksc = kvsc_s + (stage * 2) * NK;  // fp8 only: K scales, then V scales
    const float* Vsc = Ksc + NK;
    const int key0 = lo + it * NK;

    // Scores; consecutive threads take consecutive keys of one row (Q row is a broadcast).
    for (int i = tid; i < nrows * NK; i += kThreads) {
      const int r = i / NK, k = i % NK;
      const int key = key0 + k;
      const int qpos = ctx + (row0 + r) / G;
      float s = -INFINITY;
      if (key < hi && key <= qpos && (window <= 0 || key > qpos - window)) {
        const float* qr = Qs + r * D;
        const KT* kr = Ks + k * KROW;
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < NCM; ++c) {
          if (c >= NC) break;  // only in the run-time head dim kernels
          float kf[VEC];
          load_kv<KT, T, VEC>(kr + c * VEC, kf);
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot = fmaf(qr[c * VEC + e], kf[e], dot);
        }
        s = dot;
        if constexpr (FP8) s *= Ksc[k];  // the key's scale (before the softcap)
        if (p.softcap > 0.f) s = p.softcap * tanhf(s * inv_cap);
      }
      Ss[r * NK + k] = s;
    }
    __syncthreads();

    // Online softmax: one warp per row.
    for (int r = warp; r < nrows; r += kWarps) {
      float mx = -INFINITY;
      for (int k = lane; k < NK; k += 32) mx = fmaxf(mx, Ss[r * NK + k]);
      mx = warp_max(mx);
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int k = lane; k < NK; k += 32) {
        const float pr = m_new == -INFINITY ? 0.f : expf(Ss[r * NK + k] - m_new);
        Ss[r * NK + k] = pr;
        sum += pr;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float alpha = m_new == -INFINITY ? 1.f : expf(m_old - m_new);
        alpha_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();

    // acc = alpha * acc + P V; thread (pv_rg, pv_c) owns 16 bytes of D for rows pv_rg + j*RG.
    if (pv_active) {
#pragma unroll
      for (int j = 0; j < MAXR; ++j) {
        const int r = pv_rg + j * RG;
        if (r < nrows) {
          const float a = alpha_s[r];
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j][e] *= a;
        }
      }
      for (int k = 0; k < NK; ++k) {
        float vf[VEC];
        load_kv<KT, T, VEC>(Vs + k * KROW + pv_c * VEC, vf);
        const float vsc = FP8 ? Vsc[k] : 1.f;  // p * v scale before P V (0 past `hi`)
#pragma unroll
        for (int j = 0; j < MAXR; ++j) {
          const int r = pv_rg + j * RG;
          if (r < nrows) {
            const float pr = FP8 ? Ss[r * NK + k] * vsc : Ss[r * NK + k];
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[j][e] = fmaf(pr, vf[e], acc[j][e]);
          }
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  cp_async_wait<0>();

  if (!pv_active) return;
#pragma unroll
  for (int j = 0; j < MAXR; ++j) {
    const int r = pv_rg + j * RG;
    if (r >= nrows) continue;
    const int rg = row0 + r;
    const int64_t t = q_start + rg / G;
    const int qh = kvh * G + rg % G;
    const float l = l_s[r];
    const float inv = l > 0.f ? 1.f / l : 0.f;  // a row that sees no key gives zeros
    float o[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[e] = acc[j][e] * inv;
    if (plan.n == 1) {
      T* out = static_cast<T*>(p.out) + t * p.out_stride_t + qh * p.out_stride_h + pv_c * VEC;
      store_f<T, VEC>(out, o);
    } else {
      const int64_t row = (static_cast<int64_t>(split) * p.num_tokens + t) * p.num_q_heads + qh;
      float* po = p.partial_out + row * D + pv_c * VEC;
#pragma unroll
      for (int e = 0; e < VEC; e += 4)
        *reinterpret_cast<float4*>(po + e) = make_float4(o[e], o[e + 1], o[e + 2], o[e + 3]);
      if (pv_c == 0) p.partial_lse[row] = l > 0.f ? m_s[r] + logf(l) : -INFINITY;
    }
  }
  }  // generic tile
}

// Combine the splits of every (token, query head) of sequences that used more than one.
// Grid (T, ceil(Hq / kWarps)): one warp per (token, query head), so a batch-1 decode merges
// its Hq heads on Hq warps (32 for Llama-3), not on the 4 warps of one CTA. Lanes first span
// the splits (log-sum-exp by a warp reduction: split s on lane s % 32), then D in float4s with
// each split's weight broadcast by a shuffle. The token's sequence is found by binary search
// over cu_seqlens_q (a (max_seqlen_q, B) grid would be mostly empty CTAs in a mixed batch).
constexpr int kMaxSplits = 128;               // = cuda_ops.MAX_KV_SPLITS
constexpr int kSplitsPerLane = kMaxSplits / 32;
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_splits_kernel(const PagedAttentionParams p) {
  const int64_t t = blockIdx.x;
  const int qh = blockIdx.y * kWarps + (threadIdx.x >> 5);
  const int32_t* cu = p.cu_seqlens_q;
  if (t < cu[0] || t >= cu[p.num_seqs] || qh >= p.num_q_heads) return;  // whole warps
  int lo = 0, hi = p.num_seqs - 1;                // the last b with cu[b] <= t
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (cu[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  const int b = lo;
  const int q_len = cu[b + 1] - cu[b];
  const SplitPlan plan = plan_splits(p.seq_lens[b], q_len, p.sliding_window, p.num_kv_splits);
  if (plan.n <= 1) return;  // written directly by the attention kernel
  const int D = p.head_dim, lane = threadIdx.x & 31;
  const int64_t split_stride = static_cast<int64_t>(p.num_tokens) * p.num_q_heads;
  const int64_t row = t * p.num_q_heads + qh;
  float w[kSplitsPerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < kSplitsPerLane; ++j) {
    const int s = lane + 32 * j;
    w[j] = s < plan.n ? p.partial_lse[s * split_stride + row] : -INFINITY;
    mx = fmaxf(mx, w[j]);
  }
  mx = warp_max(mx);
  float wsum = 0.f;
#pragma unroll
  for (int j = 0; j < kSplitsPerLane; ++j) {
    w[j] = w[j] == -INFINITY ? 0.f : expf(w[j] - mx);  // an empty split weighs 0
    wsum += w[j];
  }
  wsum = warp_sum(wsum);
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  float a[2][4] = {};  // D <= 256: two float4 chunks a lane
  const float* po = p.partial_out + row * D + lane * 4;
#pragma unroll
  for (int j = 0; j < kSplitsPerLane; ++j) {
    if (32 * j >= plan.n) break;
    for (int sl = 0; sl < 32 && 32 * j + sl < plan.n; ++sl) {
      const float ws = __shfl_sync(0xffffffffu, w[j], sl);  // every lane: a full warp
      if (ws == 0.f) continue;  // an empty split: its partial was never written
      const float* ps = po + (32 * j + sl) * split_stride * D;
#pragma unroll
      for (int ci = 0; ci < 2; ++ci) {
        if (lane * 4 + ci * 128 >= D) break;
        const float4 v = *reinterpret_cast<const float4*>(ps + ci * 128);
        a[ci][0] = fmaf(ws, v.x, a[ci][0]);
        a[ci][1] = fmaf(ws, v.y, a[ci][1]);
        a[ci][2] = fmaf(ws, v.z, a[ci][2]);
        a[ci][3] = fmaf(ws, v.w, a[ci][3]);
      }
    }
  }
  T* out = static_cast<T*>(p.out) + t * p.out_stride_t + qh * p.out_stride_h;
#pragma unroll
  for (int ci = 0; ci < 2; ++ci) {
    const int d = lane * 4 + ci * 128;
    if (d >= D) break;
#pragma unroll
    for (int e = 0; e < 4; ++e) out[d + e] = from_f<T>(a[ci][e] * inv);
  }
}

// The arch of the cubin the attention kernels run as on the current device
// (cudaFuncAttributes::binaryVersion of `kernel`: 80, 90, ...; every instantiation is built
// for the same gencode list, so one query per device serves them all), 0 when unknown. The
// host sizes shared memory for the tile that device runs: sm_90a's wgmma tile takes more than
// sm_80's mma.sync tile (81 KB against 48 KB with Q in registers at D 128), and sizing sm_80
// for it would cost a CTA/SM there (164 KB: 2 instead of 3).
inline int kernel_arch(void (*kernel)(PagedAttentionParams)) {
  static int arch[32] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 32) dev = 0;
  if (arch[dev] == 0) {
    cudaFuncAttributes a{};
    arch[dev] = cudaFuncGetAttributes(&a, kernel) == cudaSuccess ? a.binaryVersion : -1;
  }
  return arch[dev] > 0 ? arch[dev] : 0;
}

template <typename T, int DM, bool EXACT, bool FP8, bool TCP, bool QR = false>
cudaError_t launch(const PagedAttentionParams& p, cudaStream_t stream) {
  using C = AttnCfg<T, DM>;
  const int G = p.num_q_heads / p.num_kv_heads;
  const int64_t rows = static_cast<int64_t>(p.max_seqlen_q) * G;  // rows index as int32
  const int64_t tiles_per_seq = (rows + kRows - 1) / kRows;
  const int64_t uniform = tiles_per_seq * p.num_seqs;
  const int64_t searched = static_cast<int64_t>(p.num_tokens) * G / kRows + p.num_seqs;
  PagedAttentionParams q = p;
  q.tiles_per_seq = uniform <= searched ? static_cast<int>(tiles_per_seq) : 0;
  const int64_t gx = (q.tiles_per_seq > 0 ? uniform : searched) * p.num_kv_splits;
  if (rows > 0x7fffffffLL - kRows || gx > 0x7fffffffLL || p.num_kv_heads > 65535)
    return cudaErrorInvalidConfiguration;
  size_t smem = LeanCfg<T, DM, EXACT>::OK ? LeanCfg<T, DM, EXACT>::smem(FP8, TCP)
               : FP8                       ? C::smem_fp8(p.head_dim)
                                           : C::smem(p.head_dim);
  // The TC tiles: 2 stages of 16 KB + Q (WgmmaCfg<T, DM>: sm_90a's wgmma tile, and the
  // mma.sync tile at D 80 / 96, whose lean tile takes only 30.6 / 36.6 KB); on sm_90a with Q
  // in registers at D 128, 64-key tiles (WgmmaCfg<T, DM, false, true>: 81 KB), set only where
  // kernel_arch says the wgmma tile runs (unknown: the larger, which only costs occupancy).
  using LC = LeanCfg<T, DM, EXACT>;
  auto kernel = paged_attention_kernel<T, DM, EXACT, FP8, TCP, QR>;
  if constexpr (TCP && (LC::TC || (LC::TC16 && !FP8))) {
    constexpr size_t tc = WgmmaCfg<T, DM, FP8>::SMEM, wg = WgmmaCfg<T, DM, FP8, QR>::SMEM;
    size_t need = tc;
    if (wg > tc) {
      const int arch = kernel_arch(kernel);
      if (arch == 0 || arch >= 90) need = wg;
    }
    if (smem < need) smem = need;
  }
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  // All of the unified L1/shared array as shared memory: 4 lean CTAs need 4 x 49.5 KB; the
  // driver's default carveout may leave fewer resident (the kernel reads K/V once: little L1).
  {
    const cudaError_t e = cudaFuncSetAttribute(
        kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
    if (e != cudaSuccess) return e;
  }
  q.block_shift = (p.block_size & (p.block_size - 1)) == 0 ? __builtin_ctz(p.block_size) : -1;
  kernel<<<dim3(static_cast<unsigned>(gx), p.num_kv_heads), kThreads, smem, stream>>>(q);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || p.num_kv_splits <= 1) return e;
  const dim3 mgrid(p.num_tokens, (p.num_q_heads + kWarps - 1) / kWarps);
  merge_splits_kernel<T><<<mgrid, kThreads, 0, stream>>>(q);
  return cudaGetLastError();
}

template <typename T, bool FP8>
cudaError_t dispatch_head_dim(const PagedAttentionParams& p, cudaStream_t stream) {
  // 16-bit at D 64 / 128: no tensor-core row (max_seqlen_q x G <= kLeanRows): the lean-only
  // kernel, 4 CTAs/SM; Q in registers (QR, 3 CTAs/SM on sm_90a) only with a row tile past
  // kTcRows, else 4. fp8: the tensor-core kernel where kernel_arch says sm_90 (kFp8WgmmaRows:
  // on sm_90a every fp8 row takes the wgmma tile); elsewhere at D 128 the lean-only kernel
  // when no sequence has more than kRows rows (sm_86/89: 3 CTAs/SM, not the tensor-core
  // kernel's 2). The other dims need no second instantiation.
  const int64_t rows = static_cast<int64_t>(p.max_seqlen_q) * (p.num_q_heads / p.num_kv_heads);
  const bool lean_only = rows <= kLeanRows, qr = rows > kTcRows;
  switch (p.head_dim) {
    case 64:
      if constexpr (!FP8 && LeanCfg<T, 64, true>::TC) {
        if (lean_only) return launch<T, 64, true, FP8, false>(p, stream);
        if (qr) return launch<T, 64, true, FP8, true, true>(p, stream);
      }
      return launch<T, 64, true, FP8, true>(p, stream);
    case 80:  // 16-bit caches: as D 64 / 128 (fp8 caches: the lean tile for every row)
      if constexpr (!FP8 && LeanCfg<T, 80, true>::TC16) {
        if (lean_only) return launch<T, 80, true, FP8, false>(p, stream);
        if (qr) return launch<T, 80, true, FP8, true, true>(p, stream);
      }
      return launch<T, 80, true, FP8, true>(p, stream);
    case 96:
      if constexpr (!FP8 && LeanCfg<T, 96, true>::TC16) {
        if (lean_only) return launch<T, 96, true, FP8, false>(p, stream);
        if (qr) return launch<T, 96, true, FP8, true, true>(p, stream);
      }
      return launch<T, 96, true, FP8, true>(p, stream);
    case 128:
      if constexpr (!FP8 && LeanCfg<T, 128, true>::TC) {
        if (lean_only) return launch<T, 128, true, FP8, false>(p, stream);
        if (qr) return launch<T, 128, true, FP8, true, true>(p, stream);
      }
      if constexpr (FP8) {
        const int arch = kernel_arch(paged_attention_kernel<T, 128, true, FP8, false>);
        if (rows <= kRows && arch > 0 && arch < 90)
          return launch<T, 128, true, FP8, false>(p, stream);
      }
      return launch<T, 128, true, FP8, true>(p, stream);
    case 256: return launch<T, 256, true, FP8, true>(p, stream);
    default: break;
  }
  if (!paged_attention_head_dim_supported(p.head_dim)) return cudaErrorInvalidValue;
  if (p.head_dim <= 64) return launch<T, 64, false, FP8, true>(p, stream);
  if (p.head_dim <= 128) return launch<T, 128, false, FP8, true>(p, stream);
  return launch<T, 256, false, FP8, true>(p, stream);
}

}  // namespace

bool paged_attention_head_dim_supported(int d) { return d > 0 && d % 8 == 0 && d <= 256; }

cudaError_t paged_attention(const PagedAttentionParams& p, cudaStream_t stream) {
  if (p.num_seqs == 0 || p.num_tokens == 0 || p.max_seqlen_q == 0) return cudaSuccess;
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0 || p.num_kv_splits < 1 ||
      p.num_kv_splits > kMaxSplits || p.block_size <= 0)
    return cudaErrorInvalidValue;
  if (p.num_kv_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr))
    return cudaErrorInvalidValue;
  if (p.kv_fp8) {
    if (!(p.k_scale == nullptr) != !(p.v_scale == nullptr)) return cudaErrorInvalidValue;
    RAGGED_DISPATCH_DTYPE(p.dtype, return dispatch_head_dim<scalar_t, true>(p, stream));
  } else {
    RAGGED_DISPATCH_DTYPE(p.dtype, return dispatch_head_dim<scalar_t, false>(p, stream));
  }
  return cudaSuccess;
}

}  // namespace ragged
