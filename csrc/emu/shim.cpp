// C entry points over the emulated kernels, called through ctypes by csrc/emu/emulated.py.
// Each fills the params struct of ragged_kernels.h and runs the real launcher.
#include "emu.h"
#include "src/cuda_utils.cuh"
#include "src/wgmma.cuh"

using namespace ragged;

namespace {
// One warp: D = A B + C through ldmatrix + mma.sync, to test the fragment layouts against
// torch. mode 0: A row-major [m][k] (ldmatrix.x4), B [k][n] (x2.trans); mode 1: B given as
// Bt [n][k] (x2); mode 2: A given as At [k][m] (x4.trans), B [k][n] (x2.trans).
struct MmaTestParams { int mode; const void* a; const void* b; const float* c; float* d; };
template <typename T>
__global__ void mma_test_kernel(MmaTestParams p) {
  alignas(16) static T As[16 * 16], Bs[16 * 8];
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) As[i] = static_cast<const T*>(p.a)[i];
  for (int i = lane; i < 128; i += 32) Bs[i] = static_cast<const T*>(p.b)[i];
  __syncwarp();
  const int mi = lane / 8, r = lane % 8;
  uint32_t a[4], b[2];
  if (p.mode == 2) ldmatrix<4, true>(a, &As[((mi / 2) * 8 + r) * 16 + (mi % 2) * 8]);
  else ldmatrix<4, false>(a, &As[(r + 8 * (mi & 1)) * 16 + 8 * (mi >> 1)]);
  if (p.mode == 1) ldmatrix<2, false>(b, &Bs[(lane % 8) * 16 + 8 * ((lane / 8) & 1)]);
  else ldmatrix<2, true>(b, &Bs[(lane & 15) * 8]);
  const int g = lane / 4, t = lane % 4;
  float d[4] = {p.c[g * 8 + 2 * t], p.c[g * 8 + 2 * t + 1], p.c[(g + 8) * 8 + 2 * t],
                p.c[(g + 8) * 8 + 2 * t + 1]};
  mma_16816<T>(d, a, b);
  p.d[g * 8 + 2 * t] = d[0]; p.d[g * 8 + 2 * t + 1] = d[1];
  p.d[(g + 8) * 8 + 2 * t] = d[2]; p.d[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// One warpgroup: D = A B + C through one wgmma.mma_async.m64nNk16, operands stored the way
// the attention tile stores them (128B swizzle: 16-byte chunk c of a 128-byte row r at c ^
// (r % 8), 1024-byte aligned groups), written here by their own formula, not the emulator's
// descriptor decode. mode & 3: 0 SS with B K-major (B^T rows, A and B at k offset 16 of
// their rows: start + 32 bytes), 1 RS with B N-major, 2 SS with B N-major, 3 SS K-major
// twice, chained without a wait, the first with scale-d 0 (D = 2 A B). mode >> 4: 1 no fence,
// 2 D read before the wait, 3 B overwritten before the wait, 4 thread 5 skips its
// fence.proxy.async after its stores, 5 thread 7 writes an A register (RS) before the wait,
// 6 thread 9 writes an accumulator before the wait.
struct WgmmaTestParams { int mode; const void* a; const void* b; const float* c; float* d; };
template <typename T, int N>
__global__ void wgmma_test_kernel(WgmmaTestParams p) {
  const int tid = threadIdx.x, mode = p.mode & 15, mut = p.mode >> 4;
  char* raw = static_cast<char*>(emu_dyn_smem);
  char* base = raw + (((smem_u32(raw) + 1023u) & ~1023u) - smem_u32(raw));
  char* As = base;                // 64 rows x 128 B
  char* Bs = base + 8192;         // K-major: N rows x 128 B; N-major: [N / 64][16 rows][128 B]
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const bool kmaj = mode == 0 || mode == 3;
  auto kchunk = [](int r, int byte) { return r * 128 + (((byte >> 4) ^ (r & 7)) << 4) + (byte & 15); };
  auto st = [](char* dst, T v) {  // st.shared: a generic-proxy write (emu.h's proxy model)
    *reinterpret_cast<T*>(dst) = v;
    emu_generic_write(dst, sizeof(T));
  };
  for (int i = tid; i < 64 * 16; i += 128) {
    const int r = i / 16, k = i % 16;
    st(As + kchunk(r, 32 + 2 * k), a[i]);
  }
  for (int i = tid; i < 16 * N; i += 128) {
    const int k = i / N, n = i % N;
    if (kmaj) st(Bs + kchunk(n, 32 + 2 * k), b[i]);
    else st(Bs + (n / 64) * 2048 + kchunk(k, 2 * (n % 64)), b[i]);
  }
  // mutate 4: no fence.proxy.async (only thread 5's writes: one thread's missing fence fails)
  if (mut != 4 || tid != 5) fence_proxy_async();
  __syncthreads();
  const int w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
  float d[N / 2];
  for (int j = 0; j < N / 2; ++j)
    d[j] = p.c[(16 * w + g + 8 * (j % 4 / 2)) * N + 8 * (j / 4) + 2 * t + j % 2];
  const uint64_t da = gmma_desc(smem_u32(As) + 32, 16, 1024);
  const uint64_t dbk = gmma_desc(smem_u32(Bs) + 32, 16, 1024);
  const uint64_t dbn = gmma_desc(smem_u32(Bs), 2048, 1024);
  if (mut != 1) wgmma_fence();
  if (mode == 0) wgmma_ss<T, N, false>(d, da, dbk, true);
  if (mode == 2) wgmma_ss<T, N, true>(d, da, dbn, true);
  if (mode == 3) {
    wgmma_ss<T, N, false>(d, da, dbk, false);
    wgmma_ss<T, N, false>(d, da, dbk, true);
  }
  uint32_t ar[4];  // (lives until the wait: the in-flight op owns it)
  if (mode == 1) {
    for (int r = 0; r < 4; ++r) {
      const int row = 16 * w + g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
      ar[r] = pack2<T>(to_f<T>(a[row * 16 + col]), to_f<T>(a[row * 16 + col + 1]));
    }
    wgmma_rs<T, N, true>(d, ar, dbn, true);
    if (mut == 5 && tid == 7) ar[2] ^= 1u;  // A registers written while the op is in flight
  }
  if (mut == 6 && tid == 9) d[3] = 0.f;     // an accumulator written while in flight
  wgmma_commit();
  if (mut == 3 && tid == 0) Bs[40] ^= 1;
  if (mut == 2) {
    for (int j = 0; j < N / 2; ++j)
      p.d[(16 * w + g + 8 * (j % 4 / 2)) * N + 8 * (j / 4) + 2 * t + j % 2] = d[j];
    return;
  }
  wgmma_wait<0>();
  for (int j = 0; j < N / 2; ++j)
    p.d[(16 * w + g + 8 * (j % 4 / 2)) * N + 8 * (j / 4) + 2 * t + j % 2] = d[j];
}

// A warp collective with a lane missing (the lane exits first): must fail the launch.
struct ShflTestParams { int mode; float* out; };
__global__ void shfl_test_kernel(ShflTestParams p) {
  const int lane = threadIdx.x & 31;
  if (p.mode == 1 && lane == 5) return;                       // partial warp, full mask
  const unsigned mask = p.mode >= 2 ? 0x0000ffffu : 0xffffffffu;  // 2: half warp, its mask
  if (p.mode >= 2 && lane >= 16) return;
  float v = static_cast<float>(lane);
  v = __shfl_xor_sync(mask, v, p.mode == 3 ? 16 : 1);         // mode 3: source outside mask
  p.out[lane] = v;
}

// cp.async groups: lane 0 commits three one-copy groups plus one uncommitted copy, then reads
// all four after wait_group 2, 1, 0: out[4 w + i] = value of copy i after the w-th wait.
struct CpAsyncTestParams { const float* src; float* out; };
__global__ void cp_async_test_kernel(CpAsyncTestParams p) {
  alignas(16) static float dst[4][4];
  if (threadIdx.x != 0) return;
  for (int i = 0; i < 4; ++i) {
    cp_async16(dst[i], p.src + 4 * i, true);
    if (i < 3) cp_async_commit();
  }
  cp_async_wait<2>();
  for (int i = 0; i < 4; ++i) p.out[i] = dst[i][0];
  cp_async_wait<1>();
  for (int i = 0; i < 4; ++i) p.out[4 + i] = dst[i][0];
  cp_async_wait<0>();
  for (int i = 0; i < 4; ++i) p.out[8 + i] = dst[i][0];
}
}  // namespace

extern "C" {

int emu_cp_async_test(const float* src, float* out) {
  emu_message.clear();
  emu_launch(cp_async_test_kernel, dim3(1), dim3(32), 0, nullptr, CpAsyncTestParams{src, out});
  return static_cast<int>(cudaGetLastError());
}

const char* emu_last_message() { return emu_message.c_str(); }

unsigned long long emu_wgmma_ops() { return emu_wgmma_count; }  // since the library loaded
unsigned long long emu_mma_ops() { return emu_mma_count; }  // mma.sync, one per thread
unsigned long long emu_last_smem() { return emu_dyn_smem_size; }  // the last launch's dynamic smem

int emu_mma_test(int dtype, int mode, const void* a, const void* b, const float* c, float* d) {
  MmaTestParams p{mode, a, b, c, d};
  emu_message.clear();
  if (dtype == 1) emu_launch(mma_test_kernel<__nv_bfloat16>, dim3(1), dim3(32), 0, nullptr, p);
  else emu_launch(mma_test_kernel<__half>, dim3(1), dim3(32), 0, nullptr, p);
  return static_cast<int>(cudaGetLastError());
}

int emu_wgmma_test(int dtype, int n, int mode, const void* a, const void* b, const float* c,
                   float* d) {
  WgmmaTestParams p{mode, a, b, c, d};
  emu_message.clear();
  const size_t smem = 1024 + 8192 + 16384;
#define RAGGED_WG_TEST(N)                                                                  \
  if (n == N) {                                                                            \
    auto k = dtype == 1 ? wgmma_test_kernel<__nv_bfloat16, N> : wgmma_test_kernel<__half, N>; \
    emu_launch(k, dim3(1), dim3(128), smem, nullptr, p);                                   \
  }
  RAGGED_WG_TEST(32)
  RAGGED_WG_TEST(64)
  RAGGED_WG_TEST(128)
#undef RAGGED_WG_TEST
  return static_cast<int>(cudaGetLastError());
}

int emu_shfl_test(int mode, float* out) {
  ShflTestParams p{mode, out};
  emu_message.clear();
  emu_launch(shfl_test_kernel, dim3(1), dim3(32), 0, nullptr, p);
  return static_cast<int>(cudaGetLastError());
}

int emu_paged_attention_fp8(int dtype, void* out, int64_t ost, int64_t osh, const void* q,
                            int64_t qst, int64_t qsh, const void* kc, const void* vc,
                            const int32_t* bt, int64_t bts, const int32_t* cu, const int32_t* sl,
                            float* po, float* pl, int B, int T, int Hq, int Hkv, int D, int bs,
                            int mq, int S, int W, float scale, float cap, int fp8,
                            const float* ks, const float* vs, float ksf, float vsf) {
  PagedAttentionParams p{};
  p.dtype = static_cast<DType>(dtype);
  p.out = out; p.out_stride_t = ost; p.out_stride_h = osh;
  p.q = q; p.q_stride_t = qst; p.q_stride_h = qsh;
  p.k_cache = kc; p.v_cache = vc; p.block_table = bt; p.block_table_stride = bts;
  p.cu_seqlens_q = cu; p.seq_lens = sl; p.partial_out = po; p.partial_lse = pl;
  p.num_seqs = B; p.num_tokens = T; p.num_q_heads = Hq; p.num_kv_heads = Hkv;
  p.head_dim = D; p.block_size = bs; p.max_seqlen_q = mq; p.num_kv_splits = S;
  p.sliding_window = W; p.scale = scale; p.softcap = cap;
  p.kv_fp8 = fp8; p.k_scale = ks; p.v_scale = vs; p.k_scale_f = ksf; p.v_scale_f = vsf;
  return static_cast<int>(paged_attention(p, nullptr));
}

// 16-bit / fp32 caches (the signature bench/kernel_report.py records too).
int emu_paged_attention(int dtype, void* out, int64_t ost, int64_t osh, const void* q,
                        int64_t qst, int64_t qsh, const void* kc, const void* vc,
                        const int32_t* bt, int64_t bts, const int32_t* cu, const int32_t* sl,
                        float* po, float* pl, int B, int T, int Hq, int Hkv, int D, int bs,
                        int mq, int S, int W, float scale, float cap) {
  return emu_paged_attention_fp8(dtype, out, ost, osh, q, qst, qsh, kc, vc, bt, bts, cu, sl, po,
                                 pl, B, T, Hq, Hkv, D, bs, mq, S, W, scale, cap, 0, nullptr,
                                 nullptr, 1.f, 1.f);
}

int emu_write_kv(int dtype, const void* k, int64_t kst, int64_t ksh, const void* v, int64_t vst,
                 int64_t vsh, void* kc, void* vc, const int64_t* slots, int64_t ss,
                 int64_t nslots, int T, int H, int D, int vec) {
  WriteKvParams p{};
  p.dtype = static_cast<DType>(dtype);
  p.key = k; p.key_stride_t = kst; p.key_stride_h = ksh;
  p.value = v; p.value_stride_t = vst; p.value_stride_h = vsh;
  p.k_cache = kc; p.v_cache = vc; p.slot_mapping = slots; p.slot_stride = ss;
  p.num_slots = nslots; p.num_tokens = T; p.num_heads = H; p.head_dim = D; p.vectorized = vec;
  return static_cast<int>(write_kv(p, nullptr));
}

int emu_write_kv_fp8(int dtype, const void* k, int64_t kst, int64_t ksh, const void* v,
                     int64_t vst, int64_t vsh, void* kc, void* vc, const int64_t* slots,
                     int64_t ss, int64_t nslots, int T, int H, int D, float* ks, float* vs,
                     float ksf, float vsf) {
  WriteKvParams p{};
  p.dtype = static_cast<DType>(dtype);
  p.key = k; p.key_stride_t = kst; p.key_stride_h = ksh;
  p.value = v; p.value_stride_t = vst; p.value_stride_h = vsh;
  p.k_cache = kc; p.v_cache = vc; p.slot_mapping = slots; p.slot_stride = ss;
  p.num_slots = nslots; p.num_tokens = T; p.num_heads = H; p.head_dim = D;
  p.fp8 = true; p.k_scale = ks; p.v_scale = vs; p.k_scale_f = ksf; p.v_scale_f = vsf;
  return static_cast<int>(write_kv(p, nullptr));
}

int emu_rms_norm(int dtype, int wf32, void* out, void* rout, const void* x, int64_t xs,
                 const void* r, int64_t rs, const void* w, int64_t rows, int H, float eps,
                 int vec) {
  RmsNormParams p{};
  p.dtype = static_cast<DType>(dtype);
  p.weight_fp32 = wf32; p.out = out; p.out_stride = H;
  p.residual_out = rout; p.residual_out_stride = H;
  p.x = x; p.x_stride = xs; p.residual = r; p.residual_stride = rs; p.weight = w;
  p.rows = rows; p.hidden = H; p.eps = eps; p.vectorized = vec;
  return static_cast<int>(rms_norm(p, nullptr));
}

int emu_rotary(int dtype, const int64_t* pos, const void* q, int64_t qst, int64_t qsh,
               const void* k, int64_t kst, int64_t ksh, void* qo, void* ko, const float* cs,
               int64_t maxpos, int T, int Hq, int Hk, int D, int rot, int neox, int vec) {
  RotaryParams p{};
  p.dtype = static_cast<DType>(dtype);
  p.positions = pos; p.positions_stride = 1;
  p.q = q; p.q_stride_t = qst; p.q_stride_h = qsh;
  p.k = k; p.k_stride_t = kst; p.k_stride_h = ksh;
  p.q_out = qo; p.q_out_stride_t = static_cast<int64_t>(Hq) * D; p.q_out_stride_h = D;
  p.k_out = ko; p.k_out_stride_t = static_cast<int64_t>(Hk) * D; p.k_out_stride_h = D;
  p.cos_sin = cs; p.max_pos = maxpos; p.num_tokens = T; p.num_q_heads = Hq;
  p.num_k_heads = Hk; p.head_dim = D; p.rot_dim = rot; p.is_neox = neox; p.vectorized = vec;
  return static_cast<int>(rotary_embedding(p, nullptr));
}

int emu_silu(int dtype, void* out, const void* x, int64_t xs, int64_t rows, int I, int vec) {
  SiluMulParams p{};
  p.dtype = static_cast<DType>(dtype);
  p.out = out; p.out_stride = I; p.x = x; p.x_stride = xs; p.rows = rows; p.inter = I;
  p.vectorized = vec;
  return static_cast<int>(silu_and_mul(p, nullptr));
}

}  // extern "C"
