// Torch glue for the CUDA kernels: TORCH_LIBRARY(ragged) schemas, CUDA implementations that
// check arguments, pick the current stream and call the torch-free launchers declared in
// ragged_kernels.h. The only file compiled against torch headers (by the host compiler).
//
// Outputs are written in place (`Tensor(a!)`); the Python wrappers in kernels/cuda_ops.py
// allocate them. Nothing here reads device memory, so every op is CUDA-graph capturable
// (the split-KV workspace comes from the caching allocator, which capture supports).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <utility>

#include "ragged_kernels.h"

namespace {

using at::Tensor;

ragged::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return ragged::DType::kHalf;
    case at::kBFloat16: return ragged::DType::kBFloat16;
    case at::kFloat: return ragged::DType::kFloat;
    default:
      TORCH_CHECK_VALUE(false, name, ": dtype ", t.scalar_type(),
                        " not supported (float16, bfloat16, float32)");
  }
}

void check_tensor(const Tensor& t, const char* name, const Tensor& ref, int64_t ndim) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, ": must be a CUDA tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": is on ", t.device(), ", expected ",
                    ref.device());
  TORCH_CHECK_VALUE(ndim < 0 || t.dim() == ndim, name, ": expected ", ndim,
                    " dimensions, got ", t.sizes());
}

// fp8 caches: per-slot scales (both or neither) are contiguous float32 [num_blocks,
// block_size, Hkv] on ref's device; without them the per-tensor floats must be > 0.
void check_fp8_scales(const std::optional<Tensor>& k_scale, const std::optional<Tensor>& v_scale,
                      const Tensor& ref, const Tensor& k_cache, double k_scale_f,
                      double v_scale_f) {
  for (const auto* s : {&k_scale, &v_scale}) {
    if (!s->has_value()) continue;
    const char* name = s == &k_scale ? "k_scale" : "v_scale";
    check_tensor(**s, name, ref, 3);
    TORCH_CHECK_VALUE((*s)->scalar_type() == at::kFloat && (*s)->is_contiguous(), name,
                      ": must be a contiguous float32 tensor");
    TORCH_CHECK_VALUE((*s)->sizes() == k_cache.sizes().slice(0, 3), name, ": shape ",
                      (*s)->sizes(), " differs from k_cache's [num_blocks, block_size, Hkv]");
  }
  if (!k_scale.has_value())
    TORCH_CHECK_VALUE(k_scale_f > 0 && v_scale_f > 0, "k_scale_f, v_scale_f: must be > 0");
}

void check_same_dtype(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, ": dtype ", t.scalar_type(),
                    " differs from ", ref_name, "'s ", ref.scalar_type());
}

void check_last_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.numel() == 0 || t.stride(-1) == 1, name,
                    ": last dimension must be contiguous, got strides ", t.strides());
}

// 16-byte vector accesses are legal: aligned start, and every stride but the last (== 1)
// a whole number of 16-byte units.
bool aligned16(const Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if ((t.stride(d) * t.element_size()) % 16 != 0) return false;
  return t.dim() == 0 || t.size(-1) == 1 || t.stride(-1) == 1;
}

int32_t to_int(int64_t v, const char* name) {
  TORCH_CHECK_VALUE(v >= 0 && v <= INT_MAX, name, ": ", v, " out of range [0, 2^31)");
  return static_cast<int32_t>(v);
}

cudaStream_t stream_of(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// ----------------------------------------------------------------- paged attention
void paged_attention(Tensor& out, const Tensor& q_in, const Tensor& k_cache,
                     const Tensor& v_cache, const Tensor& block_table,
                     const Tensor& cu_seqlens_q, const Tensor& seq_lens, double scale,
                     int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t sliding_window,
                     double softcap, int64_t num_kv_splits,
                     const std::optional<Tensor>& k_scale, const std::optional<Tensor>& v_scale,
                     double k_scale_f, double v_scale_f) {
  check_tensor(q_in, "q", q_in, 3);
  // fp8 (float8_e4m3fn) caches: per-slot k_scale/v_scale float32 [num_blocks, block_size,
  // Hkv], or neither with the per-tensor k_scale_f/v_scale_f (kernels/reference.py).
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    check_tensor(*t, name, q_in, 4);
    if (fp8) check_same_dtype(*t, name, k_cache, "k_cache");
    else check_same_dtype(*t, name, q_in, "q");
    // fp8 rows are D bytes: 8-byte aligned for D % 16 == 8 (D = 24, 40, ...; the kernel then
    // copies 8 bytes at a time), so only the base address must be 16-byte aligned.
    const bool aligned = fp8 ? reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0
                             : aligned16(*t);
    TORCH_CHECK_VALUE(t->is_contiguous() && aligned, name,
                      ": must be contiguous and 16-byte aligned");
  }
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache: shape ", v_cache.sizes(),
                    " differs from k_cache's ", k_cache.sizes());
  if (fp8) {
    TORCH_CHECK_VALUE(k_scale.has_value() == v_scale.has_value(),
                      "v_scale: must be given exactly when k_scale is");
    check_fp8_scales(k_scale, v_scale, q_in, k_cache, k_scale_f, v_scale_f);
  } else {
    TORCH_CHECK_VALUE(!k_scale.has_value() && !v_scale.has_value(),
                      "k_scale: only fp8 (float8_e4m3fn) caches take scales");
  }
  check_tensor(out, "out", q_in, 3);
  check_same_dtype(out, "out", q_in, "q");
  TORCH_CHECK_VALUE(out.sizes() == q_in.sizes(), "out: shape ", out.sizes(), " differs from q's ",
                    q_in.sizes());
  check_last_contiguous(q_in, "q");
  check_last_contiguous(out, "out");
  const auto dtype = dtype_of(q_in, "q");
  const int64_t T = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "k_cache: head dim ", k_cache.size(3),
                    " differs from q's ", D);
  TORCH_CHECK_VALUE(ragged::paged_attention_head_dim_supported(static_cast<int>(D)),
                    "q: head dim ", D, " not supported (a multiple of 8 up to 256)");
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "q: ", Hq,
                    " query heads is not a multiple of k_cache's ", Hkv, " KV heads");
  TORCH_CHECK_VALUE(block_size > 0 && block_size % 16 == 0 && block_size <= 256,
                    "k_cache: block size ", block_size, " not supported (multiple of 16 up to 256)");
  check_tensor(block_table, "block_table", q_in, 2);
  check_tensor(seq_lens, "seq_lens", q_in, 1);
  check_tensor(cu_seqlens_q, "cu_seqlens_q", q_in, 1);
  for (auto [t, name] : {std::pair{&block_table, "block_table"}, {&seq_lens, "seq_lens"},
                         {&cu_seqlens_q, "cu_seqlens_q"}})
    TORCH_CHECK_VALUE(t->scalar_type() == at::kInt, name, ": must be int32, got ",
                      t->scalar_type());
  TORCH_CHECK_VALUE(seq_lens.is_contiguous() && cu_seqlens_q.is_contiguous(),
                    "seq_lens, cu_seqlens_q: must be contiguous");
  check_last_contiguous(block_table, "block_table");
  const int64_t B = seq_lens.size(0);
  TORCH_CHECK_VALUE(cu_seqlens_q.size(0) == B + 1, "cu_seqlens_q: expected ", B + 1,
                    " entries, got ", cu_seqlens_q.size(0));
  TORCH_CHECK_VALUE(block_table.size(0) == B, "block_table: expected ", B, " rows, got ",
                    block_table.size(0));
  TORCH_CHECK_VALUE(scale > 0, "scale: must be positive, got ", scale);
  TORCH_CHECK_VALUE(softcap >= 0, "softcap: must be >= 0 (0 = off), got ", softcap);
  TORCH_CHECK_VALUE(num_kv_splits >= 1 && num_kv_splits <= 128, "num_kv_splits: ",
                    num_kv_splits, " out of range [1, 128]");  // the merge's kMaxSplits
  to_int(max_seqlen_k, "max_seqlen_k");
  TORCH_CHECK_VALUE(B <= INT_MAX - 1, "seq_lens: too many sequences (", B, ")");
  TORCH_CHECK_VALUE(Hkv <= 65535, "k_cache: at most 65535 KV heads, got ", Hkv);
  if (T == 0 || B == 0 || max_seqlen_q == 0) return;

  const c10::cuda::OptionalCUDAGuard guard(q_in.device());
  // 16-byte loads of q need an aligned view; copy the rare misaligned one (cheap next to
  // attention), and compute into a temporary when `out` is the misaligned one.
  const Tensor q = aligned16(q_in) ? q_in : q_in.clone(at::MemoryFormat::Contiguous);
  Tensor dst = aligned16(out) ? out : at::empty(out.sizes(), out.options());
  Tensor ws_out, ws_lse;
  if (num_kv_splits > 1) {
    ws_out = at::empty({num_kv_splits, T, Hq, D}, q.options().dtype(at::kFloat));
    ws_lse = at::empty({num_kv_splits, T, Hq}, q.options().dtype(at::kFloat));
  }
  ragged::PagedAttentionParams p{};
  p.dtype = dtype;
  p.out = dst.data_ptr();
  p.out_stride_t = dst.stride(0);
  p.out_stride_h = dst.stride(1);
  p.q = q.data_ptr();
  p.q_stride_t = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_table = block_table.data_ptr<int32_t>();
  p.block_table_stride = block_table.stride(0);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.partial_out = num_kv_splits > 1 ? ws_out.data_ptr<float>() : nullptr;
  p.partial_lse = num_kv_splits > 1 ? ws_lse.data_ptr<float>() : nullptr;
  p.num_seqs = static_cast<int>(B);
  p.num_tokens = to_int(T, "q.shape[0]");
  p.num_q_heads = to_int(Hq, "q.shape[1]");
  p.num_kv_heads = static_cast<int>(Hkv);
  p.head_dim = static_cast<int>(D);
  p.block_size = static_cast<int>(block_size);
  p.max_seqlen_q = to_int(max_seqlen_q, "max_seqlen_q");
  p.num_kv_splits = static_cast<int>(num_kv_splits);
  p.sliding_window = sliding_window > 0 ? to_int(sliding_window, "sliding_window") : 0;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.kv_fp8 = fp8;
  p.k_scale = fp8 && k_scale.has_value() ? k_scale->data_ptr<float>() : nullptr;
  p.v_scale = fp8 && v_scale.has_value() ? v_scale->data_ptr<float>() : nullptr;
  p.k_scale_f = static_cast<float>(k_scale_f);
  p.v_scale_f = static_cast<float>(v_scale_f);
  C10_CUDA_CHECK(ragged::paged_attention(p, stream_of(q)));
  if (!dst.is_same(out)) out.copy_(dst);
}

// ----------------------------------------------------------------- KV-cache write
// fp8 (float8_e4m3fn) caches: k_scale/v_scale float32 [num_blocks, block_size, Hkv] (per
// slot, written) or absent with the per-tensor k_scale_f/v_scale_f (kernels/reference.py).
void write_kv(const Tensor& key, const Tensor& value, Tensor& k_cache, Tensor& v_cache,
              const Tensor& slot_mapping, const std::optional<Tensor>& k_scale,
              const std::optional<Tensor>& v_scale, double k_scale_f, double v_scale_f) {
  check_tensor(key, "key", key, 3);
  check_tensor(value, "value", key, 3);
  check_tensor(k_cache, "k_cache", key, 4);
  check_tensor(v_cache, "v_cache", key, 4);
  check_tensor(slot_mapping, "slot_mapping", key, 1);
  const auto dtype = dtype_of(key, "key");
  check_same_dtype(value, "value", key, "key");
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  if (fp8) {
    check_same_dtype(v_cache, "v_cache", k_cache, "k_cache");
    TORCH_CHECK_VALUE(k_scale.has_value() == v_scale.has_value(),
                      "v_scale: must be given exactly when k_scale is");
    TORCH_CHECK_VALUE(key.size(2) <= ragged::kWriteKvFp8MaxHeadDim, "key: head dim ",
                      key.size(2), " over ", ragged::kWriteKvFp8MaxHeadDim, " for fp8 caches");
    check_fp8_scales(k_scale, v_scale, key, k_cache, k_scale_f, v_scale_f);
  } else {
    check_same_dtype(k_cache, "k_cache", key, "key");
    check_same_dtype(v_cache, "v_cache", key, "key");
    TORCH_CHECK_VALUE(!k_scale.has_value() && !v_scale.has_value(),
                      "k_scale: only fp8 (float8_e4m3fn) caches take scales");
  }
  check_last_contiguous(key, "key");
  check_last_contiguous(value, "value");
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(),
                    "k_cache, v_cache: must be contiguous");
  TORCH_CHECK_VALUE(value.sizes() == key.sizes(), "value: shape differs from key's");
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache: shape differs from k_cache's");
  TORCH_CHECK_VALUE(key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3),
                    "key: [heads, head_dim] ", key.sizes().slice(1), " differs from k_cache's ",
                    k_cache.sizes().slice(2));
  TORCH_CHECK_VALUE(slot_mapping.scalar_type() == at::kLong, "slot_mapping: must be int64");
  TORCH_CHECK_VALUE(slot_mapping.size(0) == key.size(0), "slot_mapping: expected ",
                    key.size(0), " entries, got ", slot_mapping.size(0));
  if (key.size(0) == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(key.device());
  const int64_t vec = 16 / key.element_size();
  ragged::WriteKvParams p{};
  p.dtype = dtype;
  p.key = key.data_ptr();
  p.key_stride_t = key.stride(0);
  p.key_stride_h = key.stride(1);
  p.value = value.data_ptr();
  p.value_stride_t = value.stride(0);
  p.value_stride_h = value.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.slot_stride = slot_mapping.stride(0);
  p.num_slots = k_cache.size(0) * k_cache.size(1);
  p.num_tokens = to_int(key.size(0), "key.shape[0]");
  p.num_heads = static_cast<int>(key.size(1));
  p.head_dim = static_cast<int>(key.size(2));
  p.vectorized = !fp8 && key.size(2) % vec == 0 && aligned16(key) && aligned16(value) &&
                 aligned16(k_cache) && aligned16(v_cache);
  p.fp8 = fp8;
  p.k_scale = fp8 && k_scale.has_value() ? k_scale->data_ptr<float>() : nullptr;
  p.v_scale = fp8 && v_scale.has_value() ? v_scale->data_ptr<float>() : nullptr;
  p.k_scale_f = static_cast<float>(k_scale_f);
  p.v_scale_f = static_cast<float>(v_scale_f);
  C10_CUDA_CHECK(ragged::write_kv(p, stream_of(key)));
}

// ----------------------------------------------------------------- RMSNorm
void rms_norm_impl(Tensor& out, Tensor* residual_out, const Tensor& x, const Tensor* residual,
                   const Tensor& weight, double eps) {
  check_tensor(x, "x", x, -1);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: must have at least one dimension");
  const auto dtype = dtype_of(x, "x");
  const int64_t H = x.size(-1);
  check_last_contiguous(x, "x");
  check_tensor(weight, "weight", x, 1);
  TORCH_CHECK_VALUE(weight.size(0) == H, "weight: size ", weight.size(0),
                    " differs from x's last dim ", H);
  TORCH_CHECK_VALUE(weight.is_contiguous(), "weight: must be contiguous");
  const bool weight_fp32 = weight.scalar_type() == at::kFloat;
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type() || weight_fp32, "weight: dtype ",
                    weight.scalar_type(), " must be x's ", x.scalar_type(), " or float32");
  TORCH_CHECK_VALUE(eps > 0, "eps: must be positive, got ", eps);
  check_tensor(out, "out", x, -1);
  check_same_dtype(out, "out", x, "x");
  TORCH_CHECK_VALUE(out.sizes() == x.sizes() && out.is_contiguous(),
                    "out: must be contiguous with x's shape ", x.sizes());
  if (residual != nullptr) {
    check_tensor(*residual, "residual", x, -1);
    check_same_dtype(*residual, "residual", x, "x");
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "residual: shape differs from x's");
    check_last_contiguous(*residual, "residual");
    check_tensor(*residual_out, "residual_out", x, -1);
    check_same_dtype(*residual_out, "residual_out", x, "x");
    TORCH_CHECK_VALUE(residual_out->sizes() == x.sizes() && residual_out->is_contiguous(),
                      "residual_out: must be contiguous with x's shape ", x.sizes());
  }
  if (x.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const Tensor x2 = x.reshape({-1, H});
  const Tensor r2 = residual != nullptr ? residual->reshape({-1, H}) : Tensor();
  const int64_t vec = 16 / x.element_size();
  ragged::RmsNormParams p{};
  p.dtype = dtype;
  p.weight_fp32 = weight_fp32 && x.scalar_type() != at::kFloat;
  p.out = out.data_ptr();
  p.out_stride = H;
  p.x = x2.data_ptr();
  p.x_stride = x2.stride(0);
  p.weight = weight.data_ptr();
  p.rows = x2.size(0);
  p.hidden = to_int(H, "x.shape[-1]");
  p.eps = static_cast<float>(eps);
  p.vectorized = H % vec == 0 && aligned16(x2) && aligned16(out);
  if (residual != nullptr) {
    p.residual_out = residual_out->data_ptr();
    p.residual_out_stride = H;
    p.residual = r2.data_ptr();
    p.residual_stride = r2.stride(0);
    p.vectorized = p.vectorized && aligned16(r2) && aligned16(*residual_out);
  }
  C10_CUDA_CHECK(ragged::rms_norm(p, stream_of(x)));
}

void rms_norm(Tensor& out, const Tensor& x, const Tensor& weight, double eps) {
  rms_norm_impl(out, nullptr, x, nullptr, weight, eps);
}

void fused_add_rms_norm(Tensor& out, Tensor& residual_out, const Tensor& x,
                        const Tensor& residual, const Tensor& weight, double eps) {
  rms_norm_impl(out, &residual_out, x, &residual, weight, eps);
}

// ----------------------------------------------------------------- rotary embedding
void rotary_embedding(Tensor& query_out, Tensor& key_out, const Tensor& positions,
                      const Tensor& query, const Tensor& key, const Tensor& cos_sin_cache,
                      bool is_neox) {
  check_tensor(positions, "positions", positions, 1);
  TORCH_CHECK_VALUE(positions.scalar_type() == at::kLong, "positions: must be int64");
  const int64_t T = positions.size(0);
  for (auto [t, name] : {std::pair{&query, "query"}, {&key, "key"}, {&query_out, "query_out"},
                         {&key_out, "key_out"}}) {
    check_tensor(*t, name, positions, 3);
    check_same_dtype(*t, name, query, "query");
    check_last_contiguous(*t, name);
    TORCH_CHECK_VALUE(t->size(0) == T && t->size(2) == query.size(2), name, ": shape ",
                      t->sizes(), " does not match ", T, " tokens of head dim ", query.size(2));
  }
  const auto dtype = dtype_of(query, "query");
  TORCH_CHECK_VALUE(query_out.sizes() == query.sizes(), "query_out: shape differs from query's");
  TORCH_CHECK_VALUE(key_out.sizes() == key.sizes(), "key_out: shape differs from key's");
  check_tensor(cos_sin_cache, "cos_sin_cache", positions, 2);
  TORCH_CHECK_VALUE(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.is_contiguous(),
                    "cos_sin_cache: must be contiguous float32");
  const int64_t D = query.size(2), rot = cos_sin_cache.size(1);
  TORCH_CHECK_VALUE(rot > 0 && rot % 2 == 0 && rot <= D, "cos_sin_cache: rotary dim ", rot,
                    " must be even and at most head dim ", D);
  if (T == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const int64_t vec = 16 / query.element_size();
  ragged::RotaryParams p{};
  p.dtype = dtype;
  p.positions = positions.data_ptr<int64_t>();
  p.positions_stride = positions.stride(0);
  p.q = query.data_ptr();
  p.q_stride_t = query.stride(0);
  p.q_stride_h = query.stride(1);
  p.k = key.data_ptr();
  p.k_stride_t = key.stride(0);
  p.k_stride_h = key.stride(1);
  p.q_out = query_out.data_ptr();
  p.q_out_stride_t = query_out.stride(0);
  p.q_out_stride_h = query_out.stride(1);
  p.k_out = key_out.data_ptr();
  p.k_out_stride_t = key_out.stride(0);
  p.k_out_stride_h = key_out.stride(1);
  p.cos_sin = cos_sin_cache.data_ptr<float>();
  p.max_pos = cos_sin_cache.size(0);
  p.num_tokens = to_int(T, "positions.shape[0]");
  p.num_q_heads = to_int(query.size(1), "query.shape[1]");
  p.num_k_heads = to_int(key.size(1), "key.shape[1]");
  p.head_dim = static_cast<int>(D);
  p.rot_dim = static_cast<int>(rot);
  p.is_neox = is_neox;
  p.vectorized = (rot / 2) % vec == 0 && (D - rot) % vec == 0 && aligned16(query) &&
                 aligned16(key) && aligned16(query_out) && aligned16(key_out);
  C10_CUDA_CHECK(ragged::rotary_embedding(p, stream_of(query)));
}

// ----------------------------------------------------------------- SiLU-and-mul
void silu_and_mul(Tensor& out, const Tensor& x) {
  check_tensor(x, "x", x, -1);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) % 2 == 0,
                    "x: last dim must be even (gate and up halves), got shape ", x.sizes());
  check_last_contiguous(x, "x");
  const auto dtype = dtype_of(x, "x");
  const int64_t I = x.size(-1) / 2;
  check_tensor(out, "out", x, x.dim());
  check_same_dtype(out, "out", x, "x");
  TORCH_CHECK_VALUE(out.is_contiguous() && out.size(-1) == I &&
                        out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    "out: must be contiguous of shape x.shape[:-1] + (", I, ",)");
  if (out.numel() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const Tensor x2 = x.reshape({-1, 2 * I});
  const int64_t vec = 16 / x.element_size();
  ragged::SiluMulParams p{};
  p.dtype = dtype;
  p.out = out.data_ptr();
  p.out_stride = I;
  p.x = x2.data_ptr();
  p.x_stride = x2.stride(0);
  p.rows = x2.size(0);
  p.inter = to_int(I, "x.shape[-1] / 2");
  p.vectorized = I % vec == 0 && aligned16(x2) && aligned16(out);
  C10_CUDA_CHECK(ragged::silu_and_mul(p, stream_of(x)));
}

}  // namespace

TORCH_LIBRARY(ragged, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
        "Tensor block_table, Tensor cu_seqlens_q, Tensor seq_lens, float scale, "
        "int max_seqlen_q, int max_seqlen_k, int sliding_window, float softcap, "
        "int num_kv_splits, Tensor? k_scale=None, Tensor? v_scale=None, "
        "float k_scale_f=1.0, float v_scale_f=1.0) -> ()");
  m.def("write_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, Tensor(c!)? k_scale=None, Tensor(d!)? v_scale=None, "
        "float k_scale_f=1.0, float v_scale_f=1.0) -> ()");
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) out, Tensor(b!) residual_out, Tensor x, Tensor residual, "
        "Tensor weight, float eps) -> ()");
  m.def("rotary_embedding(Tensor(a!) query_out, Tensor(b!) key_out, Tensor positions, Tensor query, "
        "Tensor key, Tensor cos_sin_cache, bool is_neox) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
}

TORCH_LIBRARY_IMPL(ragged, CUDA, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("write_kv", &write_kv);
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("silu_and_mul", &silu_and_mul);
}

// `import kernels._C` needs a module init function; the ops register themselves when the
// shared library loads (static initialisers above), so the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "ragged CUDA ops (torch.ops.ragged)",
                            -1, nullptr};
  return PyModule_Create(&def);
}
