// Rotary embedding of q and k at per-token positions (kernels/reference.py rotary_embedding).
// cos_sin [max_pos, rot_dim] fp32 holds cos in its first half and sin in its second; the
// first rot_dim features of each head rotate, the rest pass through. NeoX pairs feature i
// with i + rot_dim/2; GPT-J pairs 2i with 2i+1. Math in fp32 with explicitly rounded
// products (no FMA contraction) so fp32 results match PyTorch's bit for bit.
// One CTA per token; work units of VEC elements (16-byte accesses where aligned).
#include "cuda_utils.cuh"

namespace ragged {
namespace {

__device__ __forceinline__ float rot_lo(float x1, float x2, float c, float s) {
  return __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
}
__device__ __forceinline__ float rot_hi(float x1, float x2, float c, float s) {
  return __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}

// NeoX unit u: features [u*VEC, u*VEC+VEC) against [half + u*VEC, ...).
template <typename T, int VEC>
__device__ __forceinline__ void neox_unit(const T* x, T* y, const float* cs, int half, int u) {
  const int i = u * VEC;
  float a[VEC], b[VEC], ya[VEC], yb[VEC];
  load_f<T, VEC>(x + i, a);
  load_f<T, VEC>(x + half + i, b);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const float c = cs[i + e], s = cs[half + i + e];
    ya[e] = rot_lo(a[e], b[e], c, s);
    yb[e] = rot_hi(a[e], b[e], c, s);
  }
  store_f<T, VEC>(y + i, ya);
  store_f<T, VEC>(y + half + i, yb);
}

// GPT-J unit u: features [2*u*W, 2*u*W + 2W) holding W interleaved pairs (W = max(VEC, 1)).
template <typename T, int VEC>
__device__ __forceinline__ void gptj_unit(const T* x, T* y, const float* cs, int half, int u) {
  const int i = 2 * u * VEC;
  float a[VEC], b[VEC];  // features i .. i+VEC and i+VEC .. i+2VEC
  load_f<T, VEC>(x + i, a);
  load_f<T, VEC>(x + i + VEC, b);
  float v[2 * VEC], o[2 * VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    v[e] = a[e];
    v[VEC + e] = b[e];
  }
#pragma unroll
  for (int e = 0; e < 2 * VEC; e += 2) {
    const int pair = u * VEC + e / 2;
    const float c = cs[pair], s = cs[half + pair];
    o[e] = rot_lo(v[e], v[e + 1], c, s);
    o[e + 1] = rot_hi(v[e], v[e + 1], c, s);
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    a[e] = o[e];
    b[e] = o[VEC + e];
  }
  store_f<T, VEC>(y + i, a);
  store_f<T, VEC>(y + i + VEC, b);
}

template <typename T, int VEC, bool NEOX>
__global__ void rotary_kernel(const RotaryParams p) {
  const int64_t t = blockIdx.x;
  const int64_t pos = p.positions[t * p.positions_stride];
  const bool in_range = pos >= 0 && pos < p.max_pos;  // out of range: copied unrotated
  const float* cs = p.cos_sin + (in_range ? pos : 0) * p.rot_dim;
  const int half = p.rot_dim / 2;
  const int nrot = half / VEC;  // rotary units per head: VEC pairs each (both layouts)
  const int npass = (p.head_dim - p.rot_dim) / VEC;
  const int per_head = nrot + npass;
  const int heads = p.num_q_heads + p.num_k_heads;
  for (int i = threadIdx.x; i < heads * per_head; i += blockDim.x) {
    const int h = i / per_head, u = i % per_head;
    const bool is_q = h < p.num_q_heads;
    const int hh = is_q ? h : h - p.num_q_heads;
    const T* x = is_q ? static_cast<const T*>(p.q) + t * p.q_stride_t + hh * p.q_stride_h
                      : static_cast<const T*>(p.k) + t * p.k_stride_t + hh * p.k_stride_h;
    T* y = is_q ? static_cast<T*>(p.q_out) + t * p.q_out_stride_t + hh * p.q_out_stride_h
                : static_cast<T*>(p.k_out) + t * p.k_out_stride_t + hh * p.k_out_stride_h;
    if (u < nrot && in_range) {
      if (NEOX) neox_unit<T, VEC>(x, y, cs, half, u);
      else gptj_unit<T, VEC>(x, y, cs, half, u);
    } else if (u < nrot) {  // invalid position: pass the rotary features through
      for (int k = 0; k < 2; ++k) {
        const int off = NEOX ? u * VEC + k * half : 2 * u * VEC + k * VEC;
        *reinterpret_cast<Pack<T, VEC>*>(y + off) = *reinterpret_cast<const Pack<T, VEC>*>(x + off);
      }
    } else if (x != y) {
      const int off = p.rot_dim + (u - nrot) * VEC;
      *reinterpret_cast<Pack<T, VEC>*>(y + off) = *reinterpret_cast<const Pack<T, VEC>*>(x + off);
    }
  }
}

template <typename T, int VEC>
cudaError_t launch(const RotaryParams& p, cudaStream_t stream) {
  const int half = p.rot_dim / 2;
  if (half % VEC != 0 || (p.head_dim - p.rot_dim) % VEC != 0) return cudaErrorInvalidValue;
  const int64_t work = static_cast<int64_t>(p.num_q_heads + p.num_k_heads) *
                       (half / VEC + (p.head_dim - p.rot_dim) / VEC);
  const int threads = row_threads(work, 256);
  if (p.is_neox)
    rotary_kernel<T, VEC, true><<<p.num_tokens, threads, 0, stream>>>(p);
  else
    rotary_kernel<T, VEC, false><<<p.num_tokens, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rotary_embedding(const RotaryParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_q_heads + p.num_k_heads == 0) return cudaSuccess;
  if (p.rot_dim <= 0 || p.rot_dim % 2 != 0 || p.rot_dim > p.head_dim)
    return cudaErrorInvalidValue;
  RAGGED_DISPATCH_DTYPE(p.dtype, {
    constexpr int V = 16 / sizeof(scalar_t);
    return p.vectorized ? launch<scalar_t, V>(p, stream) : launch<scalar_t, 1>(p, stream);
  });
  return cudaSuccess;
}

}  // namespace ragged
