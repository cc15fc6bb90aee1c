// Torch-free interface between the CUDA kernels (csrc/*.cu) and the torch bindings
// (csrc/bindings.cpp). Only raw pointers, element strides and a cudaStream_t cross it, so the
// .cu files compile without torch headers (nvcc with torch headers costs ~1.5 min a file).
//
// Every launcher returns the cudaError_t of its launch (cudaGetLastError); the bindings turn a
// failure into a Python exception. Strides are in elements, addresses are computed in int64.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace ragged {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

// ------------------------------------------------------------------ paged attention
// Head dims the kernel handles: multiples of 8 up to 256 (64, 80, 96, 128 and 256 have
// their own instantiation; the others share a bucket's kernel with a run-time head dim).
bool paged_attention_head_dim_supported(int head_dim);

struct PagedAttentionParams {
  DType dtype;
  void* out;                  // [T, Hq, D], last dim contiguous
  int64_t out_stride_t, out_stride_h;
  const void* q;              // [T, Hq, D], last dim contiguous
  int64_t q_stride_t, q_stride_h;
  const void* k_cache;        // [num_blocks, block_size, Hkv, D] contiguous
  const void* v_cache;
  const int32_t* block_table; // [B, max_blocks], last dim contiguous
  int64_t block_table_stride;
  const int32_t* cu_seqlens_q;  // [B + 1]
  const int32_t* seq_lens;      // [B]
  // Split-KV workspace, only when num_kv_splits > 1 (else nullptr):
  // partial_out [S, T, Hq, D] fp32, partial_lse [S, T, Hq] fp32.
  float* partial_out;
  float* partial_lse;
  int num_seqs, num_tokens, num_q_heads, num_kv_heads, head_dim, block_size;
  int max_seqlen_q;     // host-side bound of q_len: sizes the grid (never read from the device)
  int tiles_per_seq;    // set by the launcher (callers leave it 0): the CTA layout, see .cu
  int block_shift;      // set by the launcher: log2(block_size), or -1 when not a power of 2
  int num_kv_splits;    // host-side upper bound; each sequence picks its own count on the device
  int sliding_window;   // <= 0: off
  float scale, softcap; // softcap <= 0: off
  // fp8 (float8_e4m3fn) caches: k_cache/v_cache hold e4m3 codes, `dtype` is q's. Per-slot
  // scales k_scale/v_scale float32 [num_blocks, block_size, Hkv] (address: flat slot * Hkv +
  // head); nullptr: the per-tensor k_scale_f/v_scale_f.
  bool kv_fp8;
  const float* k_scale; const float* v_scale;
  float k_scale_f, v_scale_f;
};
cudaError_t paged_attention(const PagedAttentionParams& p, cudaStream_t stream);

// ------------------------------------------------------------------ KV-cache write
struct WriteKvParams {
  DType dtype;
  const void* key;  int64_t key_stride_t, key_stride_h;    // [T, Hkv, D], last dim contiguous
  const void* value; int64_t value_stride_t, value_stride_h;
  void* k_cache; void* v_cache;   // [num_blocks, block_size, Hkv, D] contiguous
  const int64_t* slot_mapping; int64_t slot_stride;        // [T]; < 0 skips the token
  int64_t num_slots;              // num_blocks * block_size; slots beyond are skipped
  int num_tokens, num_heads, head_dim;
  bool vectorized;                // 16-byte accesses (pointers and strides allow it)
  // fp8 (float8_e4m3fn) caches: k_cache/v_cache hold e4m3 codes (1 byte), `dtype` is the
  // key's. Per-slot scales: k_scale/v_scale float32 [num_slots, num_heads]; nullptr: the
  // per-tensor k_scale_f/v_scale_f. Head dims up to kWriteKvFp8MaxHeadDim.
  bool fp8;
  float* k_scale; float* v_scale;
  float k_scale_f, v_scale_f;
};
constexpr int kWriteKvFp8MaxHeadDim = 256;
cudaError_t write_kv(const WriteKvParams& p, cudaStream_t stream);

// ------------------------------------------------------------------ RMSNorm
struct RmsNormParams {
  DType dtype;          // of x, residual, out, residual_out
  bool weight_fp32;     // weight is float32 (else x's dtype)
  void* out; int64_t out_stride;                     // [rows, H]
  void* residual_out; int64_t residual_out_stride;   // nullptr: no fused add
  const void* x; int64_t x_stride;
  const void* residual; int64_t residual_stride;
  const void* weight;                                // [H]
  int64_t rows; int hidden;
  float eps;
  bool vectorized;
};
cudaError_t rms_norm(const RmsNormParams& p, cudaStream_t stream);

// ------------------------------------------------------------------ rotary embedding
struct RotaryParams {
  DType dtype;
  const int64_t* positions; int64_t positions_stride;   // [T]
  const void* q; int64_t q_stride_t, q_stride_h;        // [T, Hq, D]
  const void* k; int64_t k_stride_t, k_stride_h;        // [T, Hk, D]
  void* q_out; int64_t q_out_stride_t, q_out_stride_h;  // may alias q
  void* k_out; int64_t k_out_stride_t, k_out_stride_h;  // may alias k
  const float* cos_sin;    // [max_pos, rot_dim] contiguous: cos half then sin half
  int64_t max_pos;
  int num_tokens, num_q_heads, num_k_heads, head_dim, rot_dim;
  bool is_neox;
  bool vectorized;
};
cudaError_t rotary_embedding(const RotaryParams& p, cudaStream_t stream);

// ------------------------------------------------------------------ SiLU-and-mul
struct SiluMulParams {
  DType dtype;
  void* out; int64_t out_stride;          // [rows, I]
  const void* x; int64_t x_stride;        // [rows, 2I]
  int64_t rows; int inter;
  bool vectorized;
};
cudaError_t silu_and_mul(const SiluMulParams& p, cudaStream_t stream);

}  // namespace ragged
