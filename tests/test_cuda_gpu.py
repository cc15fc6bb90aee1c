"""CUDA C++ ops (csrc/, backend="cuda") on a GPU, against the PyTorch references.

Every test here is `gpu`-marked (skipped on CPU machines, where tests/test_cuda_ops.py runs the
same kernels' source through the CPU emulation). fp16, bf16 and fp32. Tolerance
(tests/tolerance.py): err(kernel vs float64) <= 2 x err(PyTorch in the kernel's dtype vs
float64) + a few-ulp floor; write_kv is a copy and must be exact.
"""
import pytest
import torch

import kernels
from kernels import cuda_ops
from kernels import reference as ref
from tests.attention_cases import (attn_args, cast, check_paged_attention, make_batch,
                                   quantize_cache)
from tests.op_cases import LLAMA3, check_rotary, check_rotary_write_kv, check_write_kv, fused_qkv
from tests.tolerance import EPS, FACTOR, assert_close, errors

GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]

pytestmark = pytest.mark.gpu


def _check_attn(q_lens=None, kv_lens=None, **kw):
    """The CUDA kernel through kernels.paged_attention, asserted against the reference."""
    return check_paged_attention("cuda", q_lens, kv_lens, device="cuda", **kw)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_attention_mixed_batch(dtype, splits):
    _check_attn([40, 1, 3, 1, 8, 2, 1, 300], [97, 1000, 17, 1, 25, 2, 4097, 1333], hq=8, hkv=2,
                d=128, dtype=dtype, splits=splits)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_attention_all_decode(dtype):
    kv = [1 + (37 * i) % 2049 for i in range(67)]
    _check_attn([1] * 67, kv, hq=32, hkv=8, d=128, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 80, 96, 128])
@pytest.mark.parametrize("q_len", [1, 2, 16, 17])
def test_attention_16bit_launch_classes(dtype, d, q_len):
    # G 4, max rows 4 / 8 / 64 / 68 (paged_attention.cu dispatch_head_dim): the lean-only
    # kernel, the tensor-core tile with Q in shared memory (both 4 CTAs/SM), and past one
    # 64-row tile the one with Q in registers (wgmma RS on sm_90a, 3 CTAs/SM; D 80 / 96: 4,
    # their padded tiles: V in the 32B / 64B swizzle on sm_90a, 5 / 6 k-steps)
    _check_attn([q_len, 1, q_len], [q_len + 200, 900, 2100], hq=16, hkv=4, d=d, dtype=dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("q_len", [2, 3, 5, 8])
def test_attention_short_queries(dtype, q_len):
    _check_attn([q_len, q_len, 1], [q_len, 530, 77], hq=28, hkv=4, d=128, dtype=dtype, splits=3)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_attention_empty_sequences_and_keyless_rows(dtype):
    b = make_batch([0, 3, 0, 2, 1, 4, 1], [9, 12, 0, 5, 1, 6, 700], num_q_heads=4,
                   num_kv_heads=2, head_dim=64, dtype=torch.float64, device="cuda")
    b["seq_lens"][3] = 0
    b["seq_lens"][5] = 1
    for splits in (1, 5):
        out = torch.full(b["q"].shape, float("nan"), dtype=dtype, device="cuda")
        got, _, _ = _check_attn(dtype=dtype, batch=b, out=out, splits=splits,
                                name=f"empty/keyless splits={splits}")
        cu = b["cu_seqlens_q"].tolist()
        assert not got.isnan().any()                      # every row written
        assert got[cu[3]:cu[4]].abs().max() == 0          # seq_len 0: zeros
        assert got[cu[5]:cu[5] + 3].abs().max() == 0      # rows before key 0 is visible
        assert got[cu[5] + 3].abs().max() > 0


@pytest.mark.parametrize("group", [1, 5, 7, 16, 24])
@pytest.mark.parametrize("d", [16, 40, 64, 80, 96, 128, 192, 256])
def test_attention_group_sizes_and_head_dims(group, d):
    dtype = GPU_DTYPES[(group + d // 16) % 3]               # every dtype across the grid
    _check_attn([20, 1, 3, 1], [450, 300, 3, 17], hq=2 * group, hkv=2, d=d, dtype=dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("bs", [16, 32, 48, 256])
def test_attention_block_sizes(dtype, bs):
    _check_attn([20, 1, 4, 1], [300, 97, 260, 1025], hq=4, hkv=1, d=64, bs=bs, dtype=dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("window", [1, 7, 70, 1000])
def test_attention_sliding_window(dtype, window):
    _check_attn([30, 1, 5, 1], [150, 2000, 40, 3], hq=8, hkv=2, d=128, dtype=dtype,
                window=window, splits=8)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_attention_softcap_and_scale(dtype):
    _check_attn([20, 1, 4], [600, 300, 9], hq=4, hkv=2, d=64, dtype=dtype, softcap=5.0, scale=0.3)
    _check_attn([20, 1, 4], [600, 300, 9], hq=4, hkv=2, d=64, dtype=dtype, softcap=30.0, window=9)


# ---- issue 13: tile classes (lean CUDA-core decode, tensor-core prefill), splits up to 128
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("q_len", [2, 4, 7, 16])
def test_attention_spec_verify(dtype, q_len):
    # Llama-3 heads: q_len x 4 rows = 8..64 (lean tile <= 4 rows, tensor cores above: 5-16 rows
    # on warp 0 alone on sm_80, paged_attention.cu kLeanRows)
    _check_attn([q_len] * 5 + [1], [q_len + 9, 700, 2048, q_len, 77, 900], hq=32, hkv=8,
                d=128, dtype=dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("group", [1, 4, 5, 8])
@pytest.mark.parametrize("d", [64, 80, 96, 128])
def test_attention_prefill_chunk_with_context(dtype, group, d):
    # chunks after cached context (tensor-core tiles in fp16/bf16, 64 rows a CTA, partial
    # last CTA with idle warps) beside decodes in one launch
    _check_attn([300, 1, 129, 1, 17], [1324, 2000, 129, 5, 600], hq=2 * group, hkv=2, d=d,
                dtype=dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("bs", [16, 32, 48, 64])
def test_attention_block_sizes_lean_and_tc(dtype, bs):
    # 48: not a power of two (the division in the block walk's start)
    _check_attn([1, 40, 1, 3], [4097, 500, 33, 260], hq=32, hkv=8, d=128, bs=bs, dtype=dtype,
                splits=5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("splits", [64, 100, 128])
def test_attention_max_split_counts(dtype, splits):
    # 128 keys a split at least: 16384 keys give all 128 splits to the merge's 4 lanes a warp
    _check_attn([1, 1, 2], [16384, 9000, 300], hq=32, hkv=8, d=128, dtype=dtype, splits=splits)


def test_attention_split_bound_names_num_kv_splits():
    b = make_batch([1], [300], num_q_heads=4, num_kv_heads=2, head_dim=64, device="cuda")
    with pytest.raises(ValueError, match="num_kv_splits"):
        kernels.paged_attention(*attn_args(b), max_seqlen_q=1, max_seqlen_k=300,
                                num_kv_splits=129, backend="cuda")


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_attention_split_count_invariance(dtype):
    b = make_batch([1, 3, 1, 20], [3000, 1500, 2, 2000], num_q_heads=8, num_kv_heads=2,
                   head_dim=128, dtype=torch.float64, device="cuda")
    outs = {s: _check_attn(dtype=dtype, batch=b, splits=s, name=f"splits={s}")
            for s in (1, 2, 5, 13, 64)}
    _, want, lowp = outs[1]
    tol = FACTOR * errors(lowp, want)[0] + 4 * EPS[dtype] * want.abs().max().item()
    for s in (2, 5, 13, 64):
        diff = (outs[s][0].double() - outs[1][0].double()).abs().max().item()
        print(f"splits {s} vs 1: max diff {diff:.3e} (tol {tol:.3e})")
        assert diff <= tol


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_attention_strided_q_and_misaligned_out(dtype):
    b64 = make_batch([6, 1, 2], [20, 900, 2], num_q_heads=4, num_kv_heads=2, head_dim=64,
                     dtype=torch.float64, device="cuda")
    bl = cast(b64, dtype)
    qkv = torch.randn(bl["q"].shape[0], 8, 64, device="cuda").to(dtype)
    qkv[:, :4] = bl["q"]
    bl["q"] = qkv[:, :4]                                    # a slice of a fused QKV output
    for lo in (32, 1):                                      # aligned, then misaligned view
        backing = torch.zeros(bl["q"].shape[0], 4, 128, dtype=dtype, device="cuda")
        out = backing[..., lo:lo + 64]
        got = kernels.paged_attention(*attn_args(bl), max_seqlen_q=6, max_seqlen_k=900,
                                      out=out, num_kv_splits=3, backend="cuda")
        assert got.data_ptr() == out.data_ptr()
        assert_close(got, ref.paged_attention(*attn_args(b64)),
                     ref.paged_attention(*attn_args(bl)), name=f"strided q, out@{lo}")
        assert backing[..., :lo].abs().max() == 0 and backing[..., lo + 64:].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_int64_addressing_high_blocks(dtype):
    # Blocks of 16 x 8 heads x 128 = 2**14 elements: block ids from 131072 on start past 2**31
    # elements, so the sequences live in blocks 132893..133119 (an int32 block id x block
    # stride would wrap there; 131072 blocks would not reach it). 2 x 4.4 GB in fp16/bf16.
    small = make_batch([1, 7, 1], [3000, 530, 17], num_q_heads=32, num_kv_heads=8,
                       head_dim=128, dtype=torch.float64, device="cuda")
    nb, used = 133120, small["k_cache"].shape[0]
    assert (nb - used) * 16 * 8 * 128 >= 2 ** 31
    bl = cast(small, dtype)
    big = dict(bl)
    for name in ("k_cache", "v_cache"):
        c = torch.zeros(nb, 16, 8, 128, dtype=dtype, device="cuda")
        c[nb - used:] = bl[name]
        big[name] = c
    big["block_table"] = bl["block_table"] + (nb - used)
    for splits in (1, 6):
        got = kernels.paged_attention(*attn_args(big), max_seqlen_q=7, max_seqlen_k=3000,
                                      num_kv_splits=splits, backend="cuda")
        assert_close(got, ref.paged_attention(*attn_args(small)),
                     ref.paged_attention(*attn_args(bl)), name=f"high blocks splits={splits}")
    del big, c                                              # both caches, before empty_cache
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_attention_cuda_graph_replay(dtype):
    # grid and workspace depend only on host ints: capture once, replay on new contents
    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        kv = [int(x) for x in torch.randint(8, 2000, (6,), generator=g)]
        return cast(make_batch([1, 4, 1, 1, 2, 1], kv, num_q_heads=16, num_kv_heads=4,
                               head_dim=128, dtype=torch.float64, generator=g), dtype, "cuda")
    first, second = batch(1), batch(2)
    static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in first.items()}
    static["block_table"] = torch.zeros(6, 200, dtype=torch.int32, device="cuda")
    static["k_cache"] = torch.zeros(1300, 16, 4, 128, dtype=dtype, device="cuda")
    static["v_cache"] = torch.zeros_like(static["k_cache"])
    out = torch.empty_like(first["q"])

    def load(b):
        for k in ("q", "cu_seqlens_q", "seq_lens"):
            static[k].copy_(b[k])
        static["block_table"][:, :b["block_table"].shape[1]].copy_(b["block_table"])
        static["k_cache"][:b["k_cache"].shape[0]].copy_(b["k_cache"])
        static["v_cache"][:b["v_cache"].shape[0]].copy_(b["v_cache"])

    def run():
        kernels.paged_attention(*attn_args(static), max_seqlen_q=4, max_seqlen_k=2000, out=out,
                                backend="cuda")
    load(first)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()                                               # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for b in (second, first):
        load(b)
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        b64 = cast(b, torch.float64)
        assert_close(out, ref.paged_attention(*attn_args(b64)), ref.paged_attention(*attn_args(b)),
                     name="graph replay")


# --------------------------------------------------------------------------- selective batching
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("T,hkv,d,bs,pad", [(97, 3, 80, 32, 0), (8192, 1, 96, 256, 0),
                                            (1, 8, 128, 16, 0), (33, 2, 64, 48, 1)])
def test_write_kv_gpu(T, hkv, d, bs, pad, dtype):
    check_write_kv("cuda", T, hkv, d, bs, -(-2 * T // bs) + 3, dtype, "cuda", pad=pad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_write_kv_gpu_int64_addressing(dtype):
    num_blocks, bs, T = 133120, 16, 4096                    # top slots sit past 2**31 elements
    # distinct slots (a duplicate would be a write race): the random ones stay below the top 64
    slots = torch.randperm(num_blocks * bs - 64)[:T]
    slots[:64] = num_blocks * bs - 1 - torch.arange(64)
    check_write_kv("cuda", T, 8, 128, bs, num_blocks, dtype, "cuda", slot_sample=slots)
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape,offset", [((8192, 4096), 0), ((8192, 1000), 3), ((3, 7, 896), 8),
                                          ((1, 16384), 0), ((5, 40), 1)])
def test_rms_norm_gpu(shape, offset, residual, dtype):
    n = shape[-1]
    rows = torch.randn(*shape[:-1], n + 24, dtype=torch.float64).to(dtype).cuda()
    x = rows[..., offset:n + offset]                        # strided (and maybe misaligned) rows
    r = torch.randn(shape, dtype=torch.float64).to(dtype).cuda() if residual else None
    w = (1 + 0.1 * torch.randn(n, dtype=torch.float64)).to(dtype).cuda()
    out = kernels.rms_norm(x, w, 1e-6, r, backend="cuda")
    gt = ref.rms_norm(x.double(), w.double(), 1e-6, r.double() if residual else None)
    lowp = ref.rms_norm(x, w, 1e-6, r)
    if residual:
        assert torch.equal(out[1], lowp[1])                 # the sum rounds exactly like torch
        out, gt, lowp = out[0], gt[0], lowp[0]
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, gt, lowp, f"rms_norm {shape}@{offset} {dtype} residual={residual}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_gpu_fp32_weight(dtype):
    x, w = torch.randn(17, 1000, device="cuda").to(dtype), torch.randn(1000, device="cuda")
    assert_close(kernels.rms_norm(x, w, 1e-5, backend="cuda"),
                 ref.rms_norm(x.double(), w.double(), 1e-5), ref.rms_norm(x, w, 1e-5), "mixed")


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("T,hq,hk,d,rot,bs,pad", [(1025, 32, 8, 128, 128, 16, 0),
                                                  (97, 14, 2, 64, 64, 32, 1)])
def test_rotary_write_kv_gpu(T, hq, hk, d, rot, bs, pad, dtype):
    """The CUDA backend composes its rotary and write_kv kernels (not fused yet)."""
    check_rotary_write_kv("cuda", T, hq, hk, d, rot, False, bs, dtype, "cuda", pad=pad)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("T,hq,hk,d,rot,pad", [(8192, 32, 8, 128, 128, 0), (97, 14, 2, 64, 64, 0),
                                               (1025, 32, 32, 80, 40, 0), (17, 5, 1, 256, 128, 0),
                                               (33, 4, 2, 96, 64, 1)])
def test_rotary_gpu(T, hq, hk, d, rot, pad, is_neox, dtype):
    qr, kr, lq, lk = check_rotary("cuda", T, hq, hk, d, rot, is_neox, dtype, "cuda",
                                  pos_dtype=torch.int32 if T == 97 else torch.int64,
                                  scaling=LLAMA3, max_pos=131072, pad=pad)
    if dtype == torch.float32:                              # unfused products: bit-exact
        assert torch.equal(qr, lq) and torch.equal(kr, lk)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape,offset", [((8192, 2 * 14336), 0), ((97, 2 * 1000), 8),
                                          ((5, 7, 2 * 3072), 0), ((3, 2 * 37), 1)])
def test_silu_and_mul_gpu(shape, offset, dtype):
    full = torch.randn(*shape[:-1], shape[-1] + 16, dtype=torch.float64).to(dtype).cuda()
    x = full[..., offset:shape[-1] + offset]
    out = kernels.silu_and_mul(x, backend="cuda")
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert_close(out, ref.silu_and_mul(x.double()), ref.silu_and_mul(x), f"silu {shape} {dtype}")


def test_selective_ops_empty_inputs():
    e = torch.empty(0, 64, device="cuda", dtype=torch.float16)
    y, s = kernels.rms_norm(e, torch.ones(64, device="cuda", dtype=torch.float16), 1e-5, e,
                            backend="cuda")
    assert y.shape == s.shape == (0, 64)
    assert kernels.silu_and_mul(e, backend="cuda").shape == (0, 32)
    q = torch.empty(0, 4, 64, device="cuda")
    qr, kr = kernels.rotary_embedding(torch.empty(0, dtype=torch.int64, device="cuda"), q, q,
                                      ref.rope_cos_sin_cache(64, 8).cuda(), True, backend="cuda")
    assert qr.shape == kr.shape == (0, 4, 64)
    kc = torch.zeros(2, 16, 4, 64, device="cuda")
    kernels.write_kv(q, q, kc, kc.clone(), torch.empty(0, dtype=torch.int64, device="cuda"),
                     backend="cuda")
    assert kc.abs().max() == 0


# --------------------------------------------------------------------------- dispatcher
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_opcheck_every_op(dtype):
    t = lambda *s: torch.randn(*s, device="cuda").to(dtype)  # noqa: E731
    ops = torch.ops.ragged
    b = cast(make_batch([3, 1, 0, 2], [300, 20, 4, 2], num_q_heads=8, num_kv_heads=2,
                        head_dim=64), dtype, "cuda")
    x, r, w = t(5, 96), t(5, 96), t(96)
    q, k = t(5, 4, 64), t(5, 2, 64)
    kc = torch.zeros(4, 16, 2, 64, device="cuda", dtype=dtype)
    cases = [
        (ops.paged_attention.default,
         (torch.empty_like(b["q"]), *attn_args(b), 0.125, 3, 300, 0, 0.0, 3)),
        (ops.write_kv.default, (k, k, kc, kc.clone(), torch.tensor([0, 5, -1, 9, 63], device="cuda"))),
        (ops.rms_norm.default, (torch.empty_like(x), x, w, 1e-6)),
        (ops.fused_add_rms_norm.default, (torch.empty_like(x), torch.empty_like(x), x, r, w, 1e-6)),
        (ops.rotary_embedding.default,
         (torch.empty_like(q), torch.empty_like(k), torch.arange(5, device="cuda"), q, k,
          ref.rope_cos_sin_cache(32, 50).cuda(), False)),
        (ops.silu_and_mul.default, (torch.empty(5, 48, device="cuda", dtype=dtype), x)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_selective_ops_cuda_graph_replay():
    dt = torch.bfloat16
    x, r, w = (torch.randn(*s, device="cuda").to(dt) for s in ((9, 256), (9, 256), (256,)))
    q, k, _ = fused_qkv(9, 4, 2, 64, dt, "cuda")
    pos = torch.arange(9, device="cuda")
    cache = ref.rope_cos_sin_cache(64, 64).cuda()

    def run():
        y, s = kernels.rms_norm(x, w, 1e-6, r, backend="cuda")
        qr, kr = kernels.rotary_embedding(pos, q, k, cache, True, backend="cuda")
        return kernels.silu_and_mul(y, backend="cuda"), s, qr, kr

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    x.copy_(torch.randn_like(x))
    pos.copy_(torch.randint(0, 64, (9,), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, run()):
        assert torch.equal(got, want)


def test_compile_fullgraph_inductor():
    # the mutating ops functionalise (register_fake + Tensor(a!) schemas) inside a full graph
    t = lambda *s: torch.randn(*s, device="cuda").to(torch.bfloat16)  # noqa: E731
    b = cast(make_batch([3, 1, 2], [300, 20, 2], num_q_heads=8, num_kv_heads=2, head_dim=64),
             torch.bfloat16, "cuda")
    x, r, w = t(6, 96), t(6, 96), t(96)
    k = t(6, 2, 64)
    cache = ref.rope_cos_sin_cache(64, 512).cuda()
    pos = torch.arange(6, device="cuda") + 290

    def block(x, r, q, k, kc, vc):
        y, s = cuda_ops.rms_norm(x, w, 1e-6, r)
        qr, kr = cuda_ops.rotary_embedding(pos, q, k, cache, True)
        cuda_ops.write_kv(kr, k, kc, vc, b["slot_mapping"])
        o = cuda_ops.paged_attention(qr, kc, vc, b["block_table"], b["cu_seqlens_q"],
                                     b["seq_lens"], scale=0.125, max_seqlen_q=3,
                                     max_seqlen_k=300, sliding_window=None, softcap=None,
                                     out=None, num_kv_splits=3)
        return cuda_ops.silu_and_mul(y), s, o

    args = [x, r, b["q"], k, b["k_cache"].clone(), b["v_cache"].clone()]
    eager_args = [a.clone() for a in args]
    got = torch.compile(block, fullgraph=True, backend="inductor")(*args)
    want = block(*eager_args)
    for g, e in zip(got, want):
        assert torch.equal(g, e)
    assert torch.equal(args[4], eager_args[4]) and torch.equal(args[5], eager_args[5])


# --------------------------------------------------------------------------- fp8 KV cache
# fp8 (float8_e4m3fn) caches: the lean tile stages e4m3 codes by cp.async and converts at use,
# the mma.sync tile (sm_80/89) dequantises each K/V chunk at its copy into shared memory, the
# generic tile keeps e4m3 in shared memory (lean and generic: scores x k scale, probabilities
# x v scale); checked on the same codes as the reference. On sm_90a every fp8 row at D 64 /
# 128 (decodes too) takes the wgmma tile: a cp.async ring of codes + scales, a convert pass
# into its 16-bit panels, scales on S / P (attention_wgmma.cuh).
FP8_MODES = ["per_slot", "per_tensor"]


@pytest.mark.parametrize("mode", FP8_MODES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_attention_fp8_mixed_batch(mode, dtype, splits):
    _check_attn([40, 1, 3, 1, 8, 2, 1, 300], [97, 1000, 17, 1, 25, 2, 4097, 1333], hq=8, hkv=2,
                d=128, dtype=dtype, splits=splits, fp8=mode)


@pytest.mark.parametrize("mode", FP8_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_fp8_all_decode(mode, dtype):
    kv = [1 + (37 * i) % 2049 for i in range(67)]
    _check_attn([1] * 67, kv, hq=32, hkv=8, d=128, dtype=dtype, fp8=mode)


@pytest.mark.parametrize("mode", FP8_MODES)
@pytest.mark.parametrize("group", [1, 5, 8])
@pytest.mark.parametrize("d", [24, 64, 80, 128, 256])
def test_attention_fp8_group_sizes_and_head_dims(mode, group, d):
    dtype = GPU_DTYPES[(group + d // 16) % 3]
    _check_attn([20, 1, 3, 1], [450, 300, 3, 17], hq=2 * group, hkv=2, d=d, dtype=dtype,
                fp8=mode)


@pytest.mark.parametrize("fp8", [None] + FP8_MODES)
@pytest.mark.parametrize("d", [80, 96])
@pytest.mark.parametrize("bs", [16, 48])
def test_attention_strided_lean_tile_d80_d96(fp8, d, bs):
    # the strided lean tile (16 lanes of 5 / 6 elements) at Llama-like heads: decodes, spec-
    # verify up to 16 rows, split-KV, a window; fp32 q stays on the generic tile
    for dtype in GPU_DTYPES:
        _check_attn([1] * 30 + [4, 2], [1 + (97 * i) % 3000 for i in range(32)], hq=32, hkv=8,
                    d=d, bs=bs, dtype=dtype, splits=None if bs == 16 else 6,
                    window=None if bs == 16 else 500, fp8=fp8)


@pytest.mark.parametrize("mode", FP8_MODES)
@pytest.mark.parametrize("bs", [16, 48, 256])
def test_attention_fp8_block_sizes_window_softcap(mode, bs):
    _check_attn([7, 1, 1], [300, 800, 33], hq=10, hkv=2, d=64, bs=bs, dtype=torch.float16,
                splits=3, window=70, softcap=20.0, fp8=mode)


@pytest.mark.parametrize("mode", FP8_MODES)
def test_attention_fp8_cuda_graph_replay(mode):
    # static pointers (pages, scales, metadata) captured once, replayed on new contents
    b64 = quantize_cache(make_batch([1, 1, 5], [300, 17, 40], num_q_heads=8, num_kv_heads=2,
                                    head_dim=128, dtype=torch.float64, device="cuda"), mode)
    bl = cast(b64, torch.bfloat16)
    kw = dict(scale=0.09, k_scale=b64["k_scale"], v_scale=b64["v_scale"])
    args = attn_args(bl)
    run = lambda: kernels.paged_attention(*args, max_seqlen_q=5, max_seqlen_k=300,  # noqa: E731
                                          num_kv_splits=2, backend="cuda", **kw)
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    args[0].copy_(torch.randn_like(args[0]))
    g.replay()
    torch.cuda.synchronize()
    assert_close(out, ref.paged_attention(*attn_args(cast(bl, torch.float64)), **kw),
                 ref.paged_attention(*args, **kw), name=f"fp8 graph {mode}")
