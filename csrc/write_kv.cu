// Scatter the new tokens' keys and values into the paged KV cache (kernels/reference.py
// write_kv). One CTA per token, threads over 16-byte chunks of [Hkv, D]. key/value may be
// strided views (slices of a fused QKV output); slot < 0 (padding) and slots past the cache
// are skipped, so a bad slot can never write out of bounds.
//
// fp8 caches (float8_e4m3fn): each (token, KV head) row is quantised by the rule of
// kernels/reference.py quantize_fp8: scale = amax / 448 (1 for a zero row) or the per-tensor
// scale, code = e4m3(clamp(x / scale, -448, 448)) rounded to nearest even. One warp per row:
// the amax needs the whole row (a warp max), then each lane converts its <= 8 elements. The
// division is IEEE (nvcc's default, no --use_fast_math in setup.py) and the conversion is
// cuda_fp8.h's __nv_cvt_float_to_fp8 (cvt.rn.satfinite on sm_89+, its exact software path on
// sm_80 and on the host, where the CPU emulator runs it), so the codes and scales equal the
// reference's.
#include <cuda_fp8.h>

#include "cuda_utils.cuh"

namespace ragged {
namespace {

template <typename T, int VEC>
__global__ void write_kv_kernel(const WriteKvParams p) {
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t * p.slot_stride];
  if (slot < 0 || slot >= p.num_slots) return;
  const int per_head = p.head_dim / VEC;
  const int chunks = p.num_heads * per_head;
  const int64_t dst_row = slot * p.num_heads * p.head_dim;
  const T* key = static_cast<const T*>(p.key) + t * p.key_stride_t;
  const T* value = static_cast<const T*>(p.value) + t * p.value_stride_t;
  T* kc = static_cast<T*>(p.k_cache) + dst_row;
  T* vc = static_cast<T*>(p.v_cache) + dst_row;
  for (int i = threadIdx.x; i < chunks; i += blockDim.x) {
    const int h = i / per_head, c = (i % per_head) * VEC;
    const int64_t dst = static_cast<int64_t>(h) * p.head_dim + c;
    using P = Pack<T, VEC>;
    *reinterpret_cast<P*>(kc + dst) = *reinterpret_cast<const P*>(key + h * p.key_stride_h + c);
    *reinterpret_cast<P*>(vc + dst) =
        *reinterpret_cast<const P*>(value + h * p.value_stride_h + c);
  }
}

constexpr float kFp8Max = 448.f;            // largest finite e4m3fn value
constexpr int kFp8PerLane = kWriteKvFp8MaxHeadDim / 32;

// One row [D] of key or value -> codes at dst, its scale at *scale_dst (per slot) or the
// per-tensor scale_f. Called by a whole warp (the warp max needs every lane).
template <typename T>
__device__ __forceinline__ void quantize_row(const T* src, uint8_t* dst, float* scale_dst,
                                             float scale_f, int D, int lane) {
  float x[kFp8PerLane];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < kFp8PerLane; ++i) {
    const int d = lane + 32 * i;
    x[i] = d < D ? to_f<T>(src[d]) : 0.f;
    amax = fmaxf(amax, fabsf(x[i]));
  }
  float scale = scale_f;
  if (scale_dst != nullptr) {
    amax = warp_max(amax);
    scale = amax > 0.f ? amax / kFp8Max : 1.f;
    if (lane == 0) *scale_dst = scale;
  }
#pragma unroll
  for (int i = 0; i < kFp8PerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < D) {
      const float y = fminf(fmaxf(x[i] / scale, -kFp8Max), kFp8Max);
      dst[d] = __nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3);
    }
  }
}

template <typename T>
__global__ void write_kv_fp8_kernel(const WriteKvParams p) {
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t * p.slot_stride];
  if (slot < 0 || slot >= p.num_slots) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const T* key = static_cast<const T*>(p.key) + t * p.key_stride_t;
  const T* value = static_cast<const T*>(p.value) + t * p.value_stride_t;
  uint8_t* kc = static_cast<uint8_t*>(p.k_cache) + slot * p.num_heads * p.head_dim;
  uint8_t* vc = static_cast<uint8_t*>(p.v_cache) + slot * p.num_heads * p.head_dim;
  const int64_t srow = slot * p.num_heads;
  for (int h = warp; h < p.num_heads; h += nwarps) {   // warp-uniform loop
    const int64_t off = static_cast<int64_t>(h) * p.head_dim;
    quantize_row<T>(key + h * p.key_stride_h, kc + off, p.k_scale ? p.k_scale + srow + h : nullptr,
                    p.k_scale_f, p.head_dim, lane);
    quantize_row<T>(value + h * p.value_stride_h, vc + off,
                    p.v_scale ? p.v_scale + srow + h : nullptr, p.v_scale_f, p.head_dim, lane);
  }
}

template <typename T, int VEC>
cudaError_t launch(const WriteKvParams& p, cudaStream_t stream) {
  const int64_t chunks = static_cast<int64_t>(p.num_heads) * p.head_dim / VEC;
  write_kv_kernel<T, VEC><<<p.num_tokens, row_threads(chunks, 256), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t write_kv(const WriteKvParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_heads == 0 || p.head_dim == 0) return cudaSuccess;
  if (p.fp8) {
    if (p.head_dim > kWriteKvFp8MaxHeadDim || (p.k_scale == nullptr) != (p.v_scale == nullptr))
      return cudaErrorInvalidValue;
    // a warp per head, up to 8 warps (Llama-3-8B: 8 KV heads, one CTA of 256 per token)
    const int threads = 32 * (p.num_heads < 8 ? p.num_heads : 8);
    RAGGED_DISPATCH_DTYPE(p.dtype, {
      write_kv_fp8_kernel<scalar_t><<<p.num_tokens, threads, 0, stream>>>(p);
      return cudaGetLastError();
    });
    return cudaSuccess;
  }
  RAGGED_DISPATCH_DTYPE(p.dtype, {
    constexpr int V = 16 / sizeof(scalar_t);
    if (p.vectorized && p.head_dim % V != 0) return cudaErrorInvalidValue;
    return p.vectorized ? launch<scalar_t, V>(p, stream) : launch<scalar_t, 1>(p, stream);
  });
  return cudaSuccess;
}

}  // namespace ragged
