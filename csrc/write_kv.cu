// Scatter the new tokens' keys and values into the paged KV cache (kernels/reference.py
// write_kv). One CTA per token, threads over 16-byte chunks of [Hkv, D]. key/value may be
// strided views (slices of a fused QKV output); slot < 0 (padding) and slots past the cache
// are skipped, so a bad slot can never write out of bounds.
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

template <typename T, int VEC>
cudaError_t launch(const WriteKvParams& p, cudaStream_t stream) {
  const int64_t chunks = static_cast<int64_t>(p.num_heads) * p.head_dim / VEC;
  write_kv_kernel<T, VEC><<<p.num_tokens, row_threads(chunks, 256), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t write_kv(const WriteKvParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_heads == 0 || p.head_dim == 0) return cudaSuccess;
  RAGGED_DISPATCH_DTYPE(p.dtype, {
    constexpr int V = 16 / sizeof(scalar_t);
    if (p.vectorized && p.head_dim % V != 0) return cudaErrorInvalidValue;
    return p.vectorized ? launch<scalar_t, V>(p, stream) : launch<scalar_t, 1>(p, stream);
  });
  return cudaSuccess;
}

}  // namespace ragged
