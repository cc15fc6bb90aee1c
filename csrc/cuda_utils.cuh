// Device helpers shared by the kernels: dtype conversion, 16-byte packed loads/stores,
// warp/block reductions, cp.async. Torch-free on purpose (see ragged_kernels.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ragged_kernels.h"

namespace ragged {

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N elements of T loaded/stored as one access; N * sizeof(T) == 16 gives a 128-bit access.
// The caller guarantees the alignment (the host picks N = 1 where it cannot).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_f(const T* p, float (&f)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) f[i] = to_f<T>(pk.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_f(T* p, const float (&f)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_f<T>(f[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// 2^x by the SFU in one instruction (ex2.approx.ftz: ~2 ulp, results below 2^-126 flush to
// 0, harmless in a softmax); exp2f costs 4 (its denormal range fix-up). Host/emulator: exp2f.
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__) && !defined(RAGGED_EMU)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// Round a float through T (the value a tensor of dtype T would hold).
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_f<T>(from_f<T>(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the total.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  v = lane < nwarps ? partial[lane] : 0.f;
  return warp_sum(v);
}

// 16-byte global->shared copy that does not stall the thread (sm_80+); with valid == false
// the destination is zero-filled and nothing is read (src must still be a valid address).
// The emulator (csrc/emu/emu.h, RAGGED_EMU) queues it until the wait and poisons the target.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if defined(RAGGED_EMU)
  emu_cp_async16(smem, gmem, valid);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;
  // "memory": the compiler must not move shared-memory accesses across the copy or the waits
  // (the kernels also fence with __syncthreads; this keeps the helpers safe on their own).
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n)
               : "memory");
#else
  *reinterpret_cast<uint4*>(smem) =
      valid ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

// 4- or 8-byte variant (cp.async.ca: .cg takes 16 bytes only): fp8 chunks of 4 / 8 codes and
// per-key scales. Same zero-fill and emulation as cp_async16.
template <int N>
__device__ __forceinline__ void cp_async_ca(void* smem, const void* gmem, bool valid) {
  static_assert(N == 4 || N == 8, "cp.async.ca of 4 or 8 bytes");
#if defined(RAGGED_EMU)
  emu_cp_async(smem, gmem, valid, N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? N : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(gmem), "n"(N),
               "r"(n)
               : "memory");
#else
  using W = std::conditional_t<N == 8, uint2, uint32_t>;
  *reinterpret_cast<W*>(smem) = valid ? *reinterpret_cast<const W*>(gmem) : W{};
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(RAGGED_EMU)
  emu_cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(RAGGED_EMU)
  emu_cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ------------------------------------------------------------------ tensor cores (sm_80+)
// Fragments of mma.sync.aligned.m16n8k16 (PTX ISA "Matrix fragments for mma.m16n8k16"):
// lane l, g = l / 4, t = l % 4; two 16-bit elements per register, lower index in the low half.
//   A 16x16 (row): a[0] (g, 2t..2t+1)  a[1] (g+8, 2t..)  a[2] (g, 2t+8..)  a[3] (g+8, 2t+8..)
//   B 16x8 (col):  b[0] (k = 2t..2t+1, n = g)  b[1] (k = 2t+8.., n = g)
//   C 16x8 fp32:   c[0], c[1] (g, 2t..2t+1)  c[2], c[3] (g+8, 2t..2t+1)
// ldmatrix .xN: lanes 8i..8i+7 give the 16-byte row addresses of 8x8 matrix i; register i of
// lane l gets (row l/4, cols 2(l%4)..+1) of matrix i, or of its transpose with .trans.
template <typename T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<__nv_bfloat16> { static constexpr bool value = true; };

// d += a b (fp32 accumulate); T is __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
#if defined(RAGGED_EMU)
  emu_mma_16816(d, a, b, d, IsBf16<T>::value);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (IsBf16<T>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

template <int N, bool TRANS>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* smem_row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix .x1/.x2/.x4");
#if defined(RAGGED_EMU)
  emu_ldmatrix(r, N, TRANS, smem_row);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  if constexpr (N == 4 && TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s) : "memory");
  else if constexpr (N == 4)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s) : "memory");
  else if constexpr (N == 2 && TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(s) : "memory");
  else if constexpr (N == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(s) : "memory");
  else if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(s) : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(s) : "memory");
#endif
}

// Two floats -> one register of two 16-bit T (lo in the low half), for an mma A/B operand.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = from_f<T>(lo), h = from_f<T>(hi);
  uint16_t a, b;
  memcpy(&a, &l, 2);
  memcpy(&b, &h, 2);
  return static_cast<uint32_t>(a) | static_cast<uint32_t>(b) << 16;
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Threads for a row-wise kernel handling `chunks` work items per row: a multiple of 32.
inline int row_threads(int64_t chunks, int max_threads) {
  int t = static_cast<int>(chunks < max_threads ? chunks : max_threads);
  t = round_up(t < 1 ? 1 : t, 32);
  return t > max_threads ? max_threads : t;
}

}  // namespace ragged

// Dispatch a runtime DType to a template type named `scalar_t`.
#define RAGGED_DISPATCH_DTYPE(dtype, ...)                      \
  switch (dtype) {                                             \
    case ::ragged::DType::kHalf: {                             \
      using scalar_t = __half;                                 \
      __VA_ARGS__;                                             \
      break;                                                   \
    }                                                          \
    case ::ragged::DType::kBFloat16: {                         \
      using scalar_t = __nv_bfloat16;                          \
      __VA_ARGS__;                                             \
      break;                                                   \
    }                                                          \
    case ::ragged::DType::kFloat: {                            \
      using scalar_t = float;                                  \
      __VA_ARGS__;                                             \
      break;                                                   \
    }                                                          \
    default:                                                   \
      return cudaErrorInvalidValue;                            \
  }
