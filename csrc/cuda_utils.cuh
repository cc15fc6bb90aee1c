// Device helpers shared by the kernels: dtype conversion, 16-byte packed loads/stores,
// warp/block reductions, cp.async. Torch-free on purpose (see ragged_kernels.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
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

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
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
