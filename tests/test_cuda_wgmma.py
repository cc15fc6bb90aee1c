"""The sm_90a tensor-core tile (csrc/attention_wgmma.cuh: wgmma.mma_async) on CPU, through the
emulator's arch-90 build (csrc/emu/emulated.py build(arch=90), RAGGED_EMU_SM90): the wgmma
model alone against torch matmul, then attention through the wgmma tile against
kernels/reference.py (tests/tolerance.py). The default (arch 80) build, mma.sync, is tested by
tests/test_cuda_ops.py; both builds run the same kernel source, only the tc branch differs.
A cold arch-90 emulator build takes ~30 s (g++, cached under build/emu90-*).
"""
import pytest
import torch

from kernels import reference as ref
from tests.attention_cases import attn_args, cast, make_batch, quantize_cache
from tests.test_cuda_ops import EMU_CASES, FP8_EMU_CASES, _emulated
from tests.tolerance import assert_close


@pytest.fixture(scope="module")
def emu():
    mod = _emulated()
    mod.build(90)
    return mod


# ---- the model alone: one warpgroup, one wgmma (shim.cpp wgmma_test_kernel)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [32, 64, 128])
def test_emulated_wgmma_gemm(emu, dtype, n):
    # SS with B K-major, RS with B N-major (transpose bit), SS with B N-major, and a chained
    # pair (scale-d 0 then 1, no wait between): a wrong fragment map, descriptor stride or
    # swizzle permutes elements and fails by O(1).
    g = torch.Generator().manual_seed(n)
    A = torch.randn(64, 16, generator=g).to(dtype)
    B = torch.randn(16, n, generator=g).to(dtype)
    C = torch.randn(64, n, generator=g)
    ab = A.double() @ B.double()
    for mode, want in ((0, ab + C.double()), (1, ab + C.double()), (2, ab + C.double()),
                       (3, 2 * ab)):
        d = emu.wgmma_test(A, B, C, n, mode)
        err = (d.double() - want).abs().max().item()
        print(f"wgmma n={n} mode {mode}: max err {err:.2e}")
        assert err <= 4 * 2.0 ** -23 * want.abs().max().item() * 16, f"mode {mode}"


def test_emulated_wgmma_async_rules(emu):
    # What the model must refuse: a wgmma with no wgmma.fence, shared memory an in-flight
    # wgmma reads overwritten before wgmma.wait_group; and the accumulators read before the
    # wait hold NaN.
    A, B, C = torch.randn(64, 16).half(), torch.randn(16, 64).half(), torch.randn(64, 64)
    with pytest.raises(RuntimeError, match="without a wgmma.fence"):
        emu.wgmma_test(A, B, C, 64, 0, mutate=1)
    assert emu.wgmma_test(A, B, C, 64, 0, mutate=2).isnan().all()
    with pytest.raises(RuntimeError, match="overwritten before its wgmma.wait_group"):
        emu.wgmma_test(A, B, C, 64, 0, mutate=3)


def test_emulated_wgmma_proxy_fence(emu):
    # Operands stored by st.shared (generic proxy) reach wgmma (async proxy) only through each
    # writer's fence.proxy.async before the barrier: one thread of 128 without it must fail
    # (the GPU may feed wgmma stale bytes), SS and RS alike; with every fence the same launch
    # passes (test_emulated_wgmma_gemm). The attention tile's cp.async path: deleting its
    # fence fails test_emulated_wgmma_attention (checked by hand, see the emu.h header).
    A, B, C = torch.randn(64, 16).half(), torch.randn(16, 64).half(), torch.randn(64, 64)
    for mode in (0, 1):
        with pytest.raises(RuntimeError, match="without fence.proxy.async after its generic"):
            emu.wgmma_test(A, B, C, 64, mode, mutate=4)
    d = emu.wgmma_test(A, B, C, 64, 0)
    assert (d.double() - (A.double() @ B.double() + C.double())).abs().max() < 1e-3


def test_emulated_wgmma_register_hazards(emu):
    # The A registers (RS) and accumulators belong to the in-flight wgmma until its wait:
    # one thread's store to either must fail (undefined on a GPU), chained or not.
    A, B, C = torch.randn(64, 16).half(), torch.randn(16, 64).half(), torch.randn(64, 64)
    with pytest.raises(RuntimeError, match="A registers of an in-flight"):
        emu.wgmma_test(A, B, C, 64, 1, mutate=5)
    for mode in (0, 3):
        with pytest.raises(RuntimeError, match="accumulators of an in-flight"):
            emu.wgmma_test(A, B, C, 64, mode, mutate=6)


# ---- attention through the wgmma tile (q_len x G > 16 rows, 16-bit q, D 64 / 128)
WGMMA_CASES = [  # q_lens, kv_lens, hq, hkv, d, block size, dtype, splits, window, softcap
    # G 1, D 64: a full 64-row CTA (unmasked tiles) + a 6-row one, cached context
    ([70, 1], [200, 50], 2, 2, 64, 16, torch.float16, 1, None, None),
    # G 4, D 128, bf16, split-KV, a decode and a short spec-verify query beside the chunk
    ([40, 1, 3], [300, 90, 20], 8, 2, 128, 16, torch.bfloat16, 2, None, None),
    # G 5, D 64, block size 48 (division walk), a window (masked tiles at both ends), 3 splits
    ([30, 1], [260, 70], 10, 2, 64, 48, torch.float16, 3, 50, None),
    # G 8, D 128, block size 64, softcap
    ([17, 2], [150, 40], 16, 2, 128, 64, torch.float16, 1, None, 5.0),
    # G 4, D 128, block size 32, window + softcap, bf16, 2 splits
    ([33], [333], 8, 2, 128, 32, torch.bfloat16, 2, 40, 3.0),
    # mixed batch: chunks among decodes and empty sequences (searched layout), G 4, D 64
    ([37, 1, 0, 1, 1, 21, 0, 1], [100, 150, 0, 1, 260, 60, 3, 33], 8, 2, 64, 16,
     torch.float16, 3, None, None),
]


def _run(emu, case):
    q_lens, kv_lens, hq, hkv, d, bs, dtype, splits, window, softcap = case
    b64 = make_batch(q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                     block_size=bs, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(1))
    bl = cast(b64, dtype)
    kw = dict(scale=0.7 / d ** 0.5, sliding_window=window, softcap=softcap)
    ops = emu.wgmma_ops()
    got = emu.paged_attention(*attn_args(bl), max_seqlen_q=bl["max_seqlen_q"],
                              num_kv_splits=splits, arch=90, **kw)
    return (got, ref.paged_attention(*attn_args(b64), **kw),
            ref.paged_attention(*attn_args(bl), **kw), emu.wgmma_ops() - ops)


@pytest.mark.parametrize("case", range(len(WGMMA_CASES)))
def test_emulated_wgmma_attention(emu, case):
    got, want, torch_low, ops = _run(emu, WGMMA_CASES[case])
    print(f"wgmma case {case}: {ops} wgmma ops")
    assert ops > 0    # the tensor-core rows took the wgmma tile, not the mma.sync fallback
    assert_close(got, want, torch_low, name=f"wgmma case {case}")


# Both sides of the 64-row boundary of dispatch_head_dim (G 4): q 16 = one full 64-row CTA, Q
# in shared memory (SS, 4 CTAs/SM); q 17 = 68 rows, Q in registers (RS, the QR instantiation,
# its second CTA 4 rows); q 2 = 8 rows: the SS tile (kLeanRows = 4); q 1 = 4 rows: the
# lean-only kernel, no wgmma.
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("q_len", [1, 2, 16, 17])
def test_emulated_wgmma_launch_classes(emu, d, q_len):
    case = ([q_len, 1, q_len], [q_len + 200, 900, 700], 16, 4, d, 16, torch.float16, 2, None,
            None)
    got, want, torch_low, ops = _run(emu, case)
    assert (ops > 0) == (q_len > 1)
    assert_close(got, want, torch_low, name=f"launch class d {d} q {q_len}")


# D 80 / 96 (16-bit caches): D 128's padded Q / K panels (only the 10 / 12 real 16-byte chunks
# a row copied, QK^T over 5 / 6 k-steps) and V in the 32B / 64B swizzle (one m64n80k16 /
# m64n96k16 per 16 keys). Prefill chunks with cached context, G 1 / 4 / 5, splits, block size
# 48, windows, a softcap, a mixed batch and spec-verify rows (9-16 rows: warp 0's rows only).
WGMMA_STRIDED_CASES = [  # as WGMMA_CASES
    # G 1, D 80: 70 rows = a full 64-row CTA (unmasked tiles, QR) + 6 rows, cached context
    ([70, 1], [200, 50], 2, 2, 80, 16, torch.float16, 1, None, None),
    # G 4, D 96, bf16, 2 splits, a decode and a short spec-verify query beside the chunk (QR)
    ([40, 1, 3], [300, 90, 20], 8, 2, 96, 16, torch.bfloat16, 2, None, None),
    # G 5, D 80, block size 48 (division walk), a window (masked tiles at both ends), 3 splits
    ([30, 1], [260, 70], 10, 2, 80, 48, torch.float16, 3, 50, None),
    # G 4, D 96: 36 rows (Q in shared memory, SS), window + softcap, bf16
    ([9], [333], 8, 2, 96, 32, torch.bfloat16, 2, 40, 3.0),
    # G 4, D 80: 80 rows (QR: a full CTA, its unmasked softcap loop, + 16 rows), softcap
    ([20], [260], 8, 2, 80, 16, torch.float16, 1, None, 4.0),
    # mixed batch: chunks among decodes and empty sequences (searched layout), G 4, D 80
    ([37, 1, 0, 1, 1, 21, 0, 1], [100, 150, 0, 1, 260, 60, 3, 33], 8, 2, 80, 16,
     torch.float16, 3, None, None),
    # spec-verify q 2-16 at G 4, D 96: 8 rows lean, 12 / 16 rows warp 0 only, 64 rows (SS)
    ([2, 3, 4, 16, 1], [40, 90, 60, 120, 33], 8, 2, 96, 16, torch.float16, 2, None, None),
    # spec-verify at G 1, D 80, bf16: q 9 / 16 on the tile (warp 0), q 2 / 5 lean
    ([2, 9, 16, 5], [30, 77, 60, 40], 2, 2, 80, 16, torch.bfloat16, 2, None, None),
]


@pytest.mark.parametrize("case", range(len(WGMMA_STRIDED_CASES)))
def test_emulated_wgmma_attention_d80_d96(emu, case):
    got, want, torch_low, ops = _run(emu, WGMMA_STRIDED_CASES[case])
    assert ops > 0
    assert_close(got, want, torch_low, name=f"wgmma d80/96 case {case}")


# D 80 / 96 either side of the class edges at G 1 (rows = q_len): 4 the lean-only kernel (no
# wgmma; kLeanRows), 5 the SS tile, 64 one full SS CTA, 65 the QR (Q in registers) tile, its
# second CTA 1 row. An fp8 cache at D 80 / 96 keeps every row on the lean tile (no wgmma).
@pytest.mark.parametrize("d", [80, 96])
@pytest.mark.parametrize("q_len", [4, 5, 64, 65])
def test_emulated_wgmma_strided_launch_classes(emu, d, q_len):
    case = ([q_len, 1], [q_len + 70, 150], 2, 2, d, 16, torch.float16, 2, None, None)
    got, want, torch_low, ops = _run(emu, case)
    assert (ops > 0) == (q_len > 4)
    assert_close(got, want, torch_low, name=f"launch class d {d} q {q_len}")


def test_emulated_wgmma_strided_fp8_stays_lean(emu):
    b64 = quantize_cache(make_batch([40, 1], [120, 60], num_q_heads=8, num_kv_heads=2,
                                    head_dim=80, block_size=16, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(7)), "per_slot")
    bl = cast(b64, torch.float16)
    kw = dict(scale=0.1, k_scale=b64["k_scale"], v_scale=b64["v_scale"])
    ops = emu.wgmma_ops()
    got = emu.paged_attention(*attn_args(bl), max_seqlen_q=40, num_kv_splits=2, arch=90, **kw)
    assert emu.wgmma_ops() == ops
    assert_close(got, ref.paged_attention(*attn_args(b64), **kw),
                 ref.paged_attention(*attn_args(bl), **kw), name="fp8 d80 lean")


# Q in registers at D 128 (> 64 rows): 64-key tiles on sm_90a, 16 KB Q + 2 x 32 KB stages +
# 1 KB of alignment (WgmmaCfg<T, 128, true>); the host sizes that only where kernel_arch says
# the wgmma tile runs: the sm_80 build keeps the mma.sync tile's 2 x 16 KB (3 CTAs/SM on an
# A100, 2 at 81 KB). One split: the attention kernel is the last launch.
def test_emulated_wgmma_qr_smem_follows_the_arch(emu):
    case = ([17, 1], [300, 90], 8, 2, 128, 16, torch.float16, 1, None, None)
    got, want, torch_low, ops = _run(emu, case)
    assert ops > 0
    assert_close(got, want, torch_low, name="qr d 128")
    assert emu.last_dyn_smem(arch=90) == 64 * 128 * 2 + 2 * 2 * 64 * 128 * 2 + 1024
    q_lens, kv_lens, hq, hkv, d, bs, dtype, splits, window, softcap = case
    b = cast(make_batch(q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                        block_size=bs, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1)), dtype)
    got80 = emu.paged_attention(*attn_args(b), max_seqlen_q=b["max_seqlen_q"], num_kv_splits=1,
                                scale=0.7 / d ** 0.5, arch=80)
    assert_close(got80, want, torch_low, name="qr d 128 sm_80")
    assert emu.last_dyn_smem(arch=80) < 52 * 1024


# The sm_80 suite's cases with a tensor-core CTA (and a few without), through the arch-90
# build: there the tensor-core rows take the wgmma tile; the other tiles are the same code.
@pytest.mark.parametrize("case", [0, 2, 11, 12, 13, 14, 15, 17])
def test_emulated_paged_attention_sm90(emu, case):
    got, want, torch_low, _ = _run(emu, EMU_CASES[case])
    assert_close(got, want, torch_low, name=f"sm90 emulated case {case}")


# fp8 caches: the wgmma tile's code ring (cp.async of e4m3 codes + scales, a convert pass into
# the T panels, fence.proxy.async, scales on S / P). The FP8_EMU_CASES (0, 1, 5) see 1-2 K/V
# tiles a CTA; these two see 5-10, so the ring's steady state runs too. Mutations (checked by
# hand): deleting the step's cp_async_wait<1>, the barrier after it, or the fence after the
# convert pass fails all 15 fp8 cases here (NaN-poisoned codes / "without fence.proxy.async").
FP8_WGMMA_CASES = [FP8_EMU_CASES[0], FP8_EMU_CASES[1], FP8_EMU_CASES[5],
                   ([70, 1], [300, 50], 2, 2, 128, 16, torch.float16, 1, None, None),
                   ([40, 2], [400, 30], 8, 2, 64, 48, torch.bfloat16, 1, 200, None)]


@pytest.mark.parametrize("case", range(len(FP8_WGMMA_CASES)))
def test_emulated_wgmma_attention_fp8(emu, case):
    q_lens, kv_lens, hq, hkv, d, bs, dtype, splits, window, softcap = FP8_WGMMA_CASES[case]
    g = torch.Generator().manual_seed(case)
    b64 = quantize_cache(make_batch(q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv,
                                    head_dim=d, block_size=bs, dtype=torch.float64,
                                    generator=g), "per_slot")
    bl = cast(b64, dtype)
    kw = dict(scale=0.7 / d ** 0.5, sliding_window=window, softcap=softcap,
              k_scale=b64["k_scale"], v_scale=b64["v_scale"])
    ops = emu.wgmma_ops()
    got = emu.paged_attention(*attn_args(bl), max_seqlen_q=bl["max_seqlen_q"],
                              num_kv_splits=splits, arch=90, **kw)
    assert emu.wgmma_ops() > ops
    assert_close(got, ref.paged_attention(*attn_args(b64), **kw),
                 ref.paged_attention(*attn_args(bl), **kw), name=f"wgmma fp8 {case}")


# fp8 on sm_90a: every row (decodes included, kFp8WgmmaRows = 0) takes the wgmma tile, whose
# fp8 path stages e4m3 codes + per-slot scales by cp.async in a 2-slot ring and converts
# them into the T panels (attention_wgmma.cuh). Both scale modes; each case spans >= 3 K/V
# tiles so the ring's steady state (tile t + 1 in flight, t converted) runs.
FP8_RING_CASES = [  # q_lens, kv_lens, hq, hkv, d, block size, q dtype, splits, window, softcap
    # decodes G 4, D 128, bf16, 2 splits: 4 of 64 rows, unmasked full tiles + a partial one
    ([1, 1], [150, 97], 4, 1, 128, 16, torch.bfloat16, 2, None, None),
    # decodes G 8, D 64, fp16, block size 32 (NK 64: 8-byte code copies)
    ([1, 1], [200, 70], 8, 1, 64, 32, torch.float16, 1, None, None),
    # spec-verify q 2 / 16 / 5 at G 4 (8 / 64 / 20 rows), D 128, fp16
    ([2, 16, 5], [100, 120, 70], 4, 1, 128, 16, torch.float16, 1, None, None),
    # a prefill chunk with cached context, D 64, block size 48, window (masked tile ends)
    ([24, 1], [180, 60], 4, 1, 64, 48, torch.bfloat16, 1, 50, None),
    # softcap, decode + short verify, D 128, block size 64
    ([3, 1], [110, 140], 8, 2, 128, 64, torch.bfloat16, 1, None, 4.0),
]


@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
@pytest.mark.parametrize("case", range(len(FP8_RING_CASES)))
def test_emulated_wgmma_fp8_ring(emu, case, mode):
    from tests.test_cuda_ops import check_emulated_case
    ops = emu.wgmma_ops()
    check_emulated_case(emu, FP8_RING_CASES[case], f"wgmma fp8 ring {mode} {case}",
                        torch.Generator().manual_seed(10 + case), fp8=mode, arch=90)
    assert emu.wgmma_ops() > ops   # the decodes too: no lean tile for fp8 on arch 90


# fp16 q, per-slot scales, small V (|v| ~ 1e-2: V scales ~ 7e-5): P x the keys' V scales, packed
# into fp16 for P V, fell into fp16's subnormals on a long decode (2-12x PyTorch's own error,
# the review's finding); P now carries 2^8 (attention_wgmma.cuh kPShift). Two splits: the
# partial's log-sum-exp takes the 2^8 out again.
@pytest.mark.parametrize("splits", [1, 2])
def test_emulated_wgmma_fp8_fp16_small_v(emu, splits):
    b64 = make_batch([1, 1], [1024, 700], num_q_heads=4, num_kv_heads=1, head_dim=128,
                     block_size=16, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(21))
    b64 = quantize_cache(dict(b64, v_cache=b64["v_cache"] * 1e-2), "per_slot")
    bl = cast(b64, torch.float16)
    kw = dict(scale=0.7 / 128 ** 0.5, k_scale=b64["k_scale"], v_scale=b64["v_scale"])
    got = emu.paged_attention(*attn_args(bl), max_seqlen_q=1, num_kv_splits=splits, arch=90,
                              **kw)
    want = ref.paged_attention(*attn_args(b64), **kw)
    assert want.abs().max() < 1e-2      # the regime: every P x scale below 6.1e-5
    # no absolute floor: the outputs are ~1e-3, below the floor's 1e-3 scale, where the
    # subnormal loss (2.4x PyTorch's own error before the fix) would hide under it
    assert_close(got, want, ref.paged_attention(*attn_args(bl), **kw), floor_ulps=0.0,
                 name=f"wgmma fp8 fp16 small v, {splits} splits")


# The sm_80 suite's fp8 cases with 16-bit q at D 64 / 128 (mixed batches, GQA 5, block 48,
# window, splits), both scale modes, through the arch-90 build: there every row of them,
# decodes included, takes the wgmma tile's code ring.
@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
@pytest.mark.parametrize("case", [0, 1, 5])
def test_emulated_paged_attention_fp8_sm90(emu, case, mode):
    from tests.test_cuda_ops import check_emulated_case
    ops = emu.wgmma_ops()
    check_emulated_case(emu, FP8_EMU_CASES[case], f"sm90 emulated fp8 {mode} {case}",
                        torch.Generator().manual_seed(case), fp8=mode, arch=90)
    assert emu.wgmma_ops() > ops
