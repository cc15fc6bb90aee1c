// C entry points over the emulated kernels, called through ctypes by csrc/emu/emulated.py.
// Each fills the params struct of ragged_kernels.h and runs the real launcher.
#include "emu.h"
#include "src/ragged_kernels.h"

using namespace ragged;

extern "C" {

int emu_paged_attention(int dtype, void* out, int64_t ost, int64_t osh, const void* q,
                        int64_t qst, int64_t qsh, const void* kc, const void* vc,
                        const int32_t* bt, int64_t bts, const int32_t* cu, const int32_t* sl,
                        float* po, float* pl, int B, int T, int Hq, int Hkv, int D, int bs,
                        int mq, int S, int W, float scale, float cap) {
  PagedAttentionParams p{};
  p.dtype = static_cast<DType>(dtype);
  p.out = out; p.out_stride_t = ost; p.out_stride_h = osh;
  p.q = q; p.q_stride_t = qst; p.q_stride_h = qsh;
  p.k_cache = kc; p.v_cache = vc; p.block_table = bt; p.block_table_stride = bts;
  p.cu_seqlens_q = cu; p.seq_lens = sl; p.partial_out = po; p.partial_lse = pl;
  p.num_seqs = B; p.num_tokens = T; p.num_q_heads = Hq; p.num_kv_heads = Hkv;
  p.head_dim = D; p.block_size = bs; p.max_seqlen_q = mq; p.num_kv_splits = S;
  p.sliding_window = W; p.scale = scale; p.softcap = cap;
  return static_cast<int>(paged_attention(p, nullptr));
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
