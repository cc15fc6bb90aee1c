// SiLU-and-mul (kernels/reference.py silu_and_mul): out = silu(gate) * up for x = [gate | up].
// Rounded like PyTorch in the input dtype: silu(gate) is rounded to the dtype before the
// product, which is rounded again. One CTA per row, 16-byte accesses where aligned.
#include "cuda_utils.cuh"

namespace ragged {
namespace {

template <typename T, int VEC>
__global__ void silu_mul_kernel(const SiluMulParams p) {
  const int64_t row = blockIdx.x;
  const T* gate = static_cast<const T*>(p.x) + row * p.x_stride;
  const T* up = gate + p.inter;
  T* out = static_cast<T*>(p.out) + row * p.out_stride;
  for (int c = threadIdx.x * VEC; c < p.inter; c += blockDim.x * VEC) {
    float g[VEC], u[VEC], y[VEC];
    load_f<T, VEC>(gate + c, g);
    load_f<T, VEC>(up + c, u);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float s = round_to<T>(g[e] / (1.f + expf(-g[e])));
      y[e] = s * u[e];
    }
    store_f<T, VEC>(out + c, y);
  }
}

template <typename T, int VEC>
cudaError_t launch(const SiluMulParams& p, cudaStream_t stream) {
  silu_mul_kernel<T, VEC><<<p.rows, row_threads(p.inter / VEC, 256), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t silu_and_mul(const SiluMulParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.inter == 0) return cudaSuccess;
  if (p.rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  RAGGED_DISPATCH_DTYPE(p.dtype, {
    constexpr int V = 16 / sizeof(scalar_t);
    if (p.vectorized && p.inter % V != 0) return cudaErrorInvalidValue;
    return p.vectorized ? launch<scalar_t, V>(p, stream) : launch<scalar_t, 1>(p, stream);
  });
  return cudaSuccess;
}

}  // namespace ragged
