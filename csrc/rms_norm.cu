// RMSNorm with an optional fused residual add (kernels/reference.py rms_norm), rounded like
// the reference: s = x + residual rounded to the dtype (written to residual_out), the
// normalisation in fp32, cast to the dtype, times the weight (product rounded once more).
// One CTA per row, 16-byte accesses where aligned; the second pass re-reads the row (each
// thread reads back exactly what it wrote, so residual_out may alias residual or x).
#include "cuda_utils.cuh"

namespace ragged {
namespace {

template <typename T, typename W, int VEC, bool RESIDUAL>
__global__ void rms_norm_kernel(const RmsNormParams p) {
  const int64_t row = blockIdx.x;
  const int H = p.hidden;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  const T* res = RESIDUAL ? static_cast<const T*>(p.residual) + row * p.residual_stride : nullptr;
  T* res_out = RESIDUAL ? static_cast<T*>(p.residual_out) + row * p.residual_out_stride : nullptr;
  const T* src = RESIDUAL ? res_out : x;
  T* out = static_cast<T*>(p.out) + row * p.out_stride;
  const W* w = static_cast<const W*>(p.weight);

  float ss = 0.f;
  for (int c = threadIdx.x * VEC; c < H; c += blockDim.x * VEC) {
    float v[VEC];
    load_f<T, VEC>(x + c, v);
    if (RESIDUAL) {
      float r[VEC];
      load_f<T, VEC>(res + c, r);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = round_to<T>(v[e] + r[e]);
      store_f<T, VEC>(res_out + c, v);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) ss = fmaf(v[e], v[e], ss);
  }
  const float rstd = rsqrtf(block_sum(ss) / static_cast<float>(H) + p.eps);

  for (int c = threadIdx.x * VEC; c < H; c += blockDim.x * VEC) {
    float v[VEC], y[VEC];
    load_f<T, VEC>(src + c, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) y[e] = to_f<W>(w[c + e]) * round_to<T>(v[e] * rstd);
    store_f<T, VEC>(out + c, y);
  }
}

template <typename T, typename W, int VEC>
cudaError_t launch(const RmsNormParams& p, cudaStream_t stream) {
  const int threads = row_threads(p.hidden / VEC, 512);
  if (p.residual_out != nullptr)
    rms_norm_kernel<T, W, VEC, true><<<p.rows, threads, 0, stream>>>(p);
  else
    rms_norm_kernel<T, W, VEC, false><<<p.rows, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t dispatch_vec(const RmsNormParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (!p.vectorized) return launch<T, W, 1>(p, stream);
  if (p.hidden % V != 0) return cudaErrorInvalidValue;
  return launch<T, W, V>(p, stream);
}

}  // namespace

cudaError_t rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.hidden == 0) return cudaSuccess;
  if (p.rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  RAGGED_DISPATCH_DTYPE(p.dtype, {
    return p.weight_fp32 ? dispatch_vec<scalar_t, float>(p, stream)
                         : dispatch_vec<scalar_t, scalar_t>(p, stream);
  });
  return cudaSuccess;
}

}  // namespace ragged
