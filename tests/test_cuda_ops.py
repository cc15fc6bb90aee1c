"""CUDA C++ ops (csrc/, torch.ops.ragged.*, kernels.cuda_ops) on CPU machines.

The extension must be built wherever a toolchain exists (nvcc + a CUDA build of torch): then
every op is registered with its schema and a fake implementation, and the wrappers trace under
FakeTensorMode and torch.compile(fullgraph=True). Without a toolchain those tests skip; with
one and no extension they FAIL, so a broken build cannot pass silently.
The kernels' own source also runs here through a CPU emulation (csrc/emu/) against the
references. The GPU tests are in tests/test_cuda_gpu.py. Tolerance (tests/tolerance.py):
err(kernel vs float64) <= 2 x err(PyTorch in the kernel's dtype vs float64) + a few-ulp floor.
"""
import os

import pytest
import torch

import kernels
from kernels import cuda_ops
from kernels import reference as ref
from tests.attention_cases import attn_args, cast, make_batch, quantize_cache
from tests.op_cases import LLAMA3, SENTINEL
from tests.tolerance import assert_close

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
A = "Tensor(a!)"
SCHEMAS = {
    "paged_attention": f"ragged::paged_attention({A} out, Tensor q, Tensor k_cache, Tensor v_cache, "
                       "Tensor block_table, Tensor cu_seqlens_q, Tensor seq_lens, float scale, "
                       "int max_seqlen_q, int max_seqlen_k, int sliding_window, float softcap, "
                       "int num_kv_splits, Tensor? k_scale=None, Tensor? v_scale=None, "
                       "float k_scale_f=1., float v_scale_f=1.) -> ()",
    "write_kv": f"ragged::write_kv(Tensor key, Tensor value, {A} k_cache, Tensor(b!) v_cache, "
                "Tensor slot_mapping, Tensor(c!)? k_scale=None, Tensor(d!)? v_scale=None, "
                "float k_scale_f=1., float v_scale_f=1.) -> ()",
    "rms_norm": f"ragged::rms_norm({A} out, Tensor x, Tensor weight, float eps) -> ()",
    "fused_add_rms_norm": f"ragged::fused_add_rms_norm({A} out, Tensor(b!) residual_out, Tensor x, "
                          "Tensor residual, Tensor weight, float eps) -> ()",
    "rotary_embedding": f"ragged::rotary_embedding({A} query_out, Tensor(b!) key_out, "
                        "Tensor positions, Tensor query, Tensor key, Tensor cos_sin_cache, "
                        "bool is_neox) -> ()",
    "silu_and_mul": f"ragged::silu_and_mul({A} out, Tensor x) -> ()",
}


def _toolchain_present() -> bool:
    if torch.version.cuda is None or os.environ.get("RAGGED_SKIP_CUDA_BUILD") == "1":
        return False
    from torch.utils.cpp_extension import CUDA_HOME
    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


@pytest.fixture
def ext():
    if not cuda_ops.extension_loaded():
        if _toolchain_present():
            pytest.fail("kernels._C is not built although nvcc and a CUDA torch are present: "
                        "pip install -e . --no-build-isolation (see setup.py)")
        pytest.skip("no CUDA toolchain: kernels._C cannot be built here")


# =========================================================================== CPU
def test_ops_registered_with_schemas(ext):
    for name, schema in SCHEMAS.items():
        got = str(getattr(torch.ops.ragged, name).default._schema)
        assert got == schema, f"{name}: {got}"


def test_fake_implementations(ext):
    from torch._subclasses.fake_tensor import FakeTensorMode
    for name in SCHEMAS:      # register_fake gives each op a Meta kernel
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ragged::{name}", "Meta"), name
    with FakeTensorMode():
        dev, h = "cuda", torch.bfloat16
        e = lambda *shape, dtype=h: torch.empty(*shape, dtype=dtype, device=dev)  # noqa: E731
        i32 = torch.int32
        q, kc = e(4, 4, 64), e(6, 16, 2, 64)
        out = cuda_ops.paged_attention(q, kc, kc.clone(), e(2, 3, dtype=i32), e(3, dtype=i32),
                                       e(2, dtype=i32), scale=0.125, max_seqlen_q=3,
                                       max_seqlen_k=20, sliding_window=None, softcap=None,
                                       out=None, num_kv_splits=4)
        assert out.shape == q.shape and out.dtype == h and out.device.type == "cuda"
        k8 = e(6, 16, 2, 64, dtype=torch.float8_e4m3fn)
        for ks in (e(6, 16, 2, dtype=torch.float32), 0.01):   # per slot, per tensor
            out = cuda_ops.paged_attention(q, k8, k8.clone(), e(2, 3, dtype=i32),
                                           e(3, dtype=i32), e(2, dtype=i32), scale=0.125,
                                           max_seqlen_q=3, max_seqlen_k=20, sliding_window=None,
                                           softcap=None, out=None, num_kv_splits=2,
                                           k_scale=ks, v_scale=ks)
            assert out.shape == q.shape and out.dtype == h
        cuda_ops.write_kv(kc[0], kc[0], kc, kc.clone(), torch.arange(16, device=dev))
        x, w = torch.empty(5, 96, dtype=h, device=dev), torch.empty(96, dtype=h, device=dev)
        y = cuda_ops.rms_norm(x, w, 1e-6, None)
        y2, s = cuda_ops.rms_norm(x, w.float(), 1e-6, x)
        assert y.shape == y2.shape == s.shape == (5, 96) and y.dtype == s.dtype == h
        q, k = torch.empty(5, 4, 64, dtype=h, device=dev), torch.empty(5, 2, 64, dtype=h, device=dev)
        pos = torch.zeros(5, dtype=torch.int32, device=dev)
        qr, kr = cuda_ops.rotary_embedding(pos, q, k, torch.empty(8, 32, device=dev), False)
        assert qr.shape == q.shape and kr.shape == k.shape and qr.dtype == h
        z = cuda_ops.silu_and_mul(torch.empty(2, 3, 10, dtype=h, device=dev))
        assert z.shape == (2, 3, 5) and z.dtype == h


def test_wrappers_compile_fullgraph(ext, monkeypatch):
    # Dynamo traces the wrappers into one graph of torch.ops.ragged calls (no graph break), and
    # AOT autograd functionalises the in-place schemas; meta tensors run the fake kernels.
    # Regression: an lru_cache'd extension check made Dynamo trace into register_fake.
    monkeypatch.setattr(cuda_ops, "_sm_count", lambda device: 132)
    monkeypatch.setattr(cuda_ops, "_sm_arch", lambda device: ((9, 0), 228 * 1024))
    e = lambda *s, dtype=torch.float16: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    i32, i64 = torch.int32, torch.int64

    def block(x, r, w, pos, q, k, cache, kc, vc, slots, bt, cu, sl):
        y, s = cuda_ops.rms_norm(x, w, 1e-6, r)
        qr, kr = cuda_ops.rotary_embedding(pos, q, k, cache, True)
        cuda_ops.write_kv(kr, k, kc, vc, slots)
        o = cuda_ops.paged_attention(qr, kc, vc, bt, cu, sl, scale=0.125, max_seqlen_q=3,
                                     max_seqlen_k=3000, sliding_window=None, softcap=None,
                                     out=None, num_kv_splits=None)
        return cuda_ops.silu_and_mul(y), s, o

    args = (e(6, 32), e(6, 32), e(32), e(6, dtype=i64), e(6, 8, 64), e(6, 2, 64),
            e(512, 64, dtype=torch.float32), e(4, 16, 2, 64), e(4, 16, 2, 64), e(6, dtype=i64),
            e(3, 200, dtype=i32), e(4, dtype=i32), e(3, dtype=i32))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    torch._dynamo.reset()
    y, s, o = torch.compile(block, fullgraph=True, backend=backend)(*args)
    assert y.shape == (6, 16) and s.shape == (6, 32) and o.shape == (6, 8, 64)
    called = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    ops = [getattr(torch.ops.ragged, n) for n in ("fused_add_rms_norm", "rotary_embedding",
                                                  "write_kv", "paged_attention", "silu_and_mul")]
    assert [c for c in called if c in ops] == ops


def test_no_cuda_backend_for_cpu_tensors():
    assert "cuda" not in kernels.available_backends("cpu")
    if not torch.cuda.is_available():
        assert not cuda_ops.is_available()
    b = make_batch([2, 1], [5, 3], num_q_heads=4, num_kv_heads=2, head_dim=64)
    with pytest.raises(ValueError, match="^backend:"):
        kernels.paged_attention(*attn_args(b), backend="cuda")
    k = torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match="^backend:"):
        kernels.write_kv(k, k, b["k_cache"], b["v_cache"], torch.arange(4), backend="cuda")
    with pytest.raises(ValueError, match="^backend:"):
        kernels.rms_norm(torch.randn(3, 8), torch.randn(8), backend="cuda")
    with pytest.raises(ValueError, match="^backend:"):
        kernels.silu_and_mul(torch.randn(3, 8), backend="cuda")


def test_unsupported_head_dim_names_q():
    q = torch.empty(2, 4, 44)
    with pytest.raises(ValueError, match="^q: head dim 44"):
        cuda_ops.paged_attention(q, None, None, None, None, None, scale=1.0, max_seqlen_q=1,
                                 max_seqlen_k=1, sliding_window=None, softcap=None, out=None,
                                 num_kv_splits=1)


def test_split_count_bound_names_num_kv_splits():
    q = torch.empty(2, 4, 64)
    with pytest.raises(ValueError, match="^num_kv_splits: 129"):
        cuda_ops.paged_attention(q, None, None, None, None, None, scale=1.0, max_seqlen_q=1,
                                 max_seqlen_k=1, sliding_window=None, softcap=None, out=None,
                                 num_kv_splits=129)


def test_default_num_kv_splits(monkeypatch):
    monkeypatch.setattr(cuda_ops, "_sm_count", lambda device: 132)
    monkeypatch.setattr(cuda_ops, "_sm_arch", lambda device: ((9, 0), 228 * 1024))
    q = torch.empty(1, 32, 128, device="meta")
    kc = torch.empty(1, 16, 8, 128, device="meta")
    assert cuda_ops.default_num_kv_splits(q, kc, 1, 1, 100) == 1          # short: no split
    s = cuda_ops.default_num_kv_splits(q, kc, 1, 1, 32768)                # 8 CTAs, 132 SMs
    # 4 x 132 / 8 = 66 resident, but 66 -> 512-key chunks, 64 used: the grid is sized to 64
    assert s == 64 and cuda_ops._used_splits(66, 32768) == 64
    q1 = torch.empty(1, 4, 128, device="meta")                            # 1 CTA: the maximum
    assert cuda_ops.default_num_kv_splits(q1, kc[:, :, :1], 1, 1, 1 << 20) == cuda_ops.MAX_KV_SPLITS
    assert cuda_ops.default_num_kv_splits(q, kc, 1, 1, 300) == 3          # >= 128 keys a split
    q = torch.empty(256, 32, 128, device="meta")
    assert cuda_ops.default_num_kv_splits(q, kc, 256, 1, 4096) == 1       # busy batch
    q = torch.empty(65536, 32, 128, device="meta")                        # (synthetic: 1 GiB
    assert cuda_ops.default_num_kv_splits(q, kc, 1, 1, 65536) == 1        # a split) workspace cap


def test_kv_splits_fill_whole_waves(monkeypatch):
    # Decode B=32 x 8k, Llama-3-8B heads on H100: 256 CTAs unsplit, 528 resident (4 x 132).
    # Rounding 528 / 256 up gave 3 splits = 768 CTAs, a second wave 45% full (predicted 73% of
    # HBM); 2 splits fill one wave. Every count chosen is one the kernel's plan_splits uses.
    monkeypatch.setattr(cuda_ops, "_sm_count", lambda device: 132)
    monkeypatch.setattr(cuda_ops, "_sm_arch", lambda device: ((9, 0), 228 * 1024))
    q = torch.empty(32, 32, 128, device="meta", dtype=torch.bfloat16)
    kc = torch.empty(1, 16, 8, 128, device="meta", dtype=torch.bfloat16)
    assert cuda_ops.default_num_kv_splits(q, kc, 32, 1, 8192) == 2
    monkeypatch.setattr(cuda_ops, "_sm_arch", lambda device: ((8, 0), 164 * 1024))
    monkeypatch.setattr(cuda_ops, "_sm_count", lambda device: 108)   # A100: 3 x 108 = 324
    assert cuda_ops.default_num_kv_splits(q[:1], kc, 1, 1, 32768) == 40   # 41 would use 40
    assert cuda_ops.default_num_kv_splits(q[:1], kc[:, :, :1], 1, 1, 1 << 20) == 128  # 1 CTA
    for ctas in (1, 3, 8, 100, 256, 300, 700):
        for kv in (129, 1000, 8192, 32768, 100000):
            s = cuda_ops._wave_splits(ctas, 528, min(128, -(-kv // 128)), kv)
            assert cuda_ops._used_splits(s, kv) == s and 1 <= s <= 128, (ctas, kv)
            if ctas * 2 <= 528 and kv >= 2048:
                assert s > 1, (ctas, kv)          # a half-empty wave with long contexts splits


def test_ctas_per_sm_mirrors_the_kernels():
    # paged_attention.cu's MinBlocks and LeanCfg shared memory: what one wave of splits is
    # sized by (registers and spills: the kernel report checks the compiled kernels).
    H100, A100, L40 = ((9, 0), 228 << 10), ((8, 0), 164 << 10), ((8, 9), 100 << 10)
    c = cuda_ops._ctas_per_sm
    assert c(*H100, 128, 2, False, 4) == 4 and c(*A100, 128, 2, False, 4) == 3
    assert c(*L40, 128, 2, False, 4) == 2                  # 49.8 KB tiles in 100 KB
    # fp8 at D 64 / 128: on sm_90a the tensor-core kernel for every row count (the wgmma tile
    # with its code ring, 3); sm_80: its lean-only kernel up to 16 rows at D 128 (3, as before;
    # the launcher asks kernel_arch), the tensor-core kernel past them (3); sm_89's 100 KB: the
    # lean-only kernel's 26 KB fit 3
    assert c(*H100, 128, 2, True, 1) == 3 and c(*H100, 128, 2, True, 16) == 3
    assert c(*H100, 128, 2, True, 17) == 3 and c(*H100, 64, 2, True, 4) == 3
    assert c(*A100, 128, 2, True, 4) == 3 and c(*A100, 128, 2, True, 17) == 3
    assert c(*L40, 128, 2, True, 4) == 3 and c(*L40, 128, 2, True, 17) == 2
    # 16-bit on sm_90a: Q-in-registers tile (3) only past one 64-row tile; lean-only <= 4
    assert c(*H100, 128, 2, False, 8) == 4 and c(*H100, 64, 2, False, 8) == 4
    assert c(*H100, 128, 2, False, 64) == 4 and c(*H100, 128, 2, False, 65) == 2
    assert c(*H100, 64, 2, False, 65) == 3 and c(*A100, 128, 2, False, 65) == 3
    assert c(*H100, 128, 4, False, 65) == 4 and c(*H100, 64, 2, True, 65) == 3
    assert c(*H100, 256, 2, True, 4) == 4 and c(*A100, 256, 2, True, 4) == 3
    assert c(*H100, 80, 2, False, 4) == 4 and c(*A100, 96, 2, True, 4) == 4   # strided tiles
    # 16-bit D 80 / 96 on sm_90a: lean-only <= 4 rows, the wgmma tile (SS, then Q in
    # registers) past 4 / 64 rows, 4 each (128 registers, no spills); sm_80: lean-only 4, the
    # mma.sync tile's 49 KB past 4 rows 3 (2 in sm_89's 100 KB); fp8 caches stay lean: 4
    for d in (80, 96):
        for rows in (4, 5, 64, 65):
            assert c(*H100, d, 2, False, rows) == 4
            assert c(*A100, d, 2, False, rows) == (4 if rows <= 4 else 3)
        assert c(*L40, d, 2, False, 5) == 2
        assert c(*H100, d, 2, True, 65) == 4 and c(*A100, d, 2, True, 65) == 4
    kc8 = torch.empty(1, 16, 8, 128, device="meta", dtype=torch.float8_e4m3fn)
    q = torch.empty(1, 32, 128, device="meta", dtype=torch.bfloat16)
    import unittest.mock as mock
    with mock.patch.object(cuda_ops, "_sm_count", lambda device: 132), \
            mock.patch.object(cuda_ops, "_sm_arch", lambda device: H100):
        # 3 x 132 / 8 = 49.5 (the wgmma tile): 47, the count plan_splits uses for <= 49
        assert cuda_ops.default_num_kv_splits(q, kc8, 1, 1, 32768) == 47
        assert cuda_ops.default_num_kv_splits(q, kc8, 1, 17, 32768) == 47


# --------------------------------------------------------------------------- emulated kernels
# The kernels' own CUDA source, compiled by g++ against a CPU emulation of blocks, barriers,
# shared memory and warp shuffles (csrc/emu/emu.h): index math, masks, online softmax and the
# split merge are checked here on every CI run; the gpu tests below check the real hardware.
def _emulated():
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "csrc", "emu", "emulated.py")
    spec = importlib.util.spec_from_file_location("ragged_emulated", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not mod.available():
        pytest.skip("no g++ or CUDA headers for the emulated kernels")
    mod.build()
    return mod


@pytest.fixture(scope="module")
def emu():
    return _emulated()


EMU_CASES = [  # q_lens, kv_lens, hq, hkv, d, block size, dtype, splits, window, softcap
    ([1, 3, 1, 8, 2, 1], [97, 17, 1, 25, 2, 300], 8, 2, 64, 16, torch.float16, 1, None, None),
    ([1, 3, 1, 8, 2, 1], [97, 17, 1, 25, 2, 300], 8, 2, 64, 16, torch.float16, 3, None, None),
    ([1, 3, 1, 8, 2, 1], [97, 17, 1, 25, 2, 300], 8, 2, 64, 16, torch.bfloat16, 3, None, None),
    ([5, 1, 2], [40, 300, 2], 5, 1, 80, 32, torch.float16, 4, 7, None),
    ([1, 2], [200, 70], 14, 2, 96, 48, torch.float32, 3, None, None),
    ([1, 3], [260, 30], 32, 2, 128, 16, torch.float32, 2, None, 5.0),
    ([2, 1], [150, 33], 4, 2, 256, 256, torch.bfloat16, 2, 40, None),
    # head dims without their own instantiation (run-time head dim, bucket 64 / 128 / 256)
    ([3, 1], [40, 200], 4, 2, 16, 16, torch.float32, 2, None, None),
    ([3, 1], [40, 200], 6, 2, 24, 16, torch.float16, 1, None, None),
    ([2, 1], [33, 130], 4, 1, 112, 32, torch.bfloat16, 2, None, None),
    ([2, 1], [33, 130], 4, 4, 192, 16, torch.float32, 2, None, 10.0),
    # a GQA group of 24 > 16 rows per CTA: row tiles straddle tokens
    ([3, 1], [40, 200], 48, 2, 64, 16, torch.float16, 2, None, None),
    # a chunk among decodes and empty sequences: searched CTA layout (19 slots, not 80)
    ([37, 1, 0, 1, 1, 5, 0, 1], [100, 150, 0, 1, 260, 5, 3, 33], 8, 2, 64, 16, torch.float16,
     3, None, None),
    # spec-verify queries (q_len 2-16) at G 4: 8-64 rows, lean tiles of 1, 2 and 4 row groups
    ([2, 16, 5, 1, 3], [40, 130, 5, 77, 3], 8, 2, 128, 16, torch.float16, 2, None, None),
    # prefill chunks with cached context at G 1 / 5 / 8; block sizes 32, 48 (not a power of
    # two: the division path) and 64; a window and a softcap on the lean tile
    ([37, 1], [140, 60], 4, 4, 64, 32, torch.bfloat16, 2, None, None),
    ([21, 3], [90, 200], 20, 4, 64, 48, torch.float16, 3, 50, None),
    ([19, 1], [120, 50], 16, 2, 64, 64, torch.float32, 2, None, 3.0),
    # a tensor-core CTA with an idle warp (45 rows of 64) over 5 tiles of one split
    ([9, 1], [300, 20], 10, 2, 64, 16, torch.float16, 1, None, None),
    # D 256 in bf16 over 16 rows: lean tiles only (no tensor-core tile at D 256), 2 CTAs
    ([9, 1], [40, 70], 4, 2, 256, 32, torch.bfloat16, 2, None, None),
    # the maximum split count: 16384 keys / 128 keys a split = 128 splits merged
    ([1, 1, 2], [16384, 300, 5], 2, 1, 64, 16, torch.float16, 128, None, None),
]
# CTA layouts (paged_attention.cu): searched in cases 0-3, 11, 12; uniform in 4-10.
# Dynamic shared memory over 48 KB (the emulated launch fails without the kernel's opt-in):
# bf16 d=256 (case 6) 50 KB, fp32 d=192 in the 256 bucket (case 10) 62 KB.


def check_emulated_case(emu, case, name, generator=None, fp8=None, arch=80):
    """One row of a case table (q_lens, kv_lens, hq, hkv, d, bs, dtype, splits, window,
    softcap) through the emulated kernel against the fp64 reference; fp8 "per_slot" /
    "per_tensor": the cache quantised to e4m3 with those scales (the reference dequantises);
    arch 90: the emulator's sm_90a build (wgmma tile)."""
    q_lens, kv_lens, hq, hkv, d, bs, dtype, splits, window, softcap = case
    b64 = make_batch(q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                     block_size=bs, dtype=torch.float64, generator=generator)
    kw = dict(scale=0.7 / d ** 0.5, sliding_window=window, softcap=softcap)
    if fp8 is not None:
        b64 = quantize_cache(b64, fp8)
        kw.update(k_scale=b64["k_scale"], v_scale=b64["v_scale"])
    bl = cast(b64, dtype)
    got = emu.paged_attention(*attn_args(bl), max_seqlen_q=bl["max_seqlen_q"],
                              num_kv_splits=splits, arch=arch, **kw)
    assert got.dtype == dtype
    assert_close(got, ref.paged_attention(*attn_args(b64), **kw),
                 ref.paged_attention(*attn_args(bl), **kw), name=name)


@pytest.mark.parametrize("case", range(len(EMU_CASES)))
def test_emulated_paged_attention(emu, case):
    check_emulated_case(emu, EMU_CASES[case], f"emulated case {case}")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_emulated_paged_attention_random_mixed(emu, seed):
    # random mixes of empty sequences, decodes and chunks (both CTA layouts, any split count)
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    q_lens = [pick([0, 1, 1, 1, 2, 5, 23]) for _ in range(7)]
    kv_lens = [q + int(torch.randint(0, 150, (1,), generator=g)) for q in q_lens]
    splits = pick([1, 2, 4])
    b64 = make_batch(q_lens, kv_lens, num_q_heads=6, num_kv_heads=2, head_dim=32,
                     dtype=torch.float64, generator=g)
    bl = cast(b64, torch.float32)
    got = emu.paged_attention(*attn_args(bl), scale=0.2, max_seqlen_q=bl["max_seqlen_q"],
                              num_kv_splits=splits)
    assert_close(got, ref.paged_attention(*attn_args(b64), scale=0.2),
                 ref.paged_attention(*attn_args(bl), scale=0.2),
                 name=f"random q{q_lens} kv{kv_lens} splits={splits}")


def test_emulated_paged_attention_empty_and_keyless(emu):
    b = make_batch([0, 3, 0, 2, 1, 4], [9, 12, 0, 5, 1, 6], num_q_heads=4, num_kv_heads=2,
                   head_dim=64, dtype=torch.float64)
    b["seq_lens"][3] = 0                                    # new tokens but no key at all
    b["seq_lens"][5] = 1                                    # only the last new token sees one
    bl = cast(b, torch.float16)
    cu = b["cu_seqlens_q"].tolist()
    for splits in (1, 2):
        got = emu.paged_attention(*attn_args(bl), scale=0.125, max_seqlen_q=4,
                                  num_kv_splits=splits)
        assert_close(got, ref.paged_attention(*attn_args(b), scale=0.125),
                     ref.paged_attention(*attn_args(bl), scale=0.125), name=f"keyless {splits}")
        assert got[cu[3]:cu[4]].abs().max() == 0 and got[cu[5]:cu[5] + 3].abs().max() == 0


def test_emulated_paged_attention_grid_limit(emu):
    # KV heads sit on gridDim.y (at most 65535): the launcher refuses rather than launching a
    # grid the GPU would reject (the bindings raise a ValueError naming k_cache before this).
    # Sequences and row tiles share gridDim.x (2^31 - 1), so the batch size has no such limit.
    q, kc = torch.randn(1, 65536, 8), torch.randn(1, 16, 65536, 8)
    with pytest.raises(RuntimeError, match="cudaError 9"):   # cudaErrorInvalidConfiguration
        emu.paged_attention(q, kc, kc, torch.zeros(1, 1, dtype=torch.int32),
                            torch.tensor([0, 1], dtype=torch.int32),
                            torch.tensor([1], dtype=torch.int32), scale=0.125, max_seqlen_q=1)


# fp8 (float8_e4m3fn) caches: the lean / tensor-core tiles dequantise each chunk at the copy,
# the generic tile (D 24, 80 here) scales scores and probabilities; checked against the
# reference on the SAME codes (quantize_cache), so the tolerance measures the kernel.
FP8_EMU_CASES = [  # q_lens, kv_lens, hq, hkv, d, block size, q dtype, splits, window, softcap
    # decodes (lean) + a prefill chunk (tensor cores), searched layout, GQA group 5, split-KV
    ([1, 21, 1, 0, 3], [97, 60, 1, 4, 150], 10, 2, 64, 16, torch.float16, 3, None, None),
    # block size 48 (division path), window, bf16 q
    ([1, 9, 2], [130, 40, 70], 10, 2, 64, 48, torch.bfloat16, 2, 30, None),
    # softcap, fp32 q, D 128 (lean tile only: no fp32 tensor-core tile), one split
    ([2, 1, 17], [50, 140, 30], 8, 2, 128, 16, torch.float32, 1, None, 5.0),
    # D 24 (8-byte copies: not a multiple of 16), block size 48, window + softcap
    ([3, 1], [40, 100], 10, 2, 24, 48, torch.float16, 2, 25, 3.0),
    # D 80 (exact generic instantiation), many splits over a long decode
    ([1, 4], [700, 90], 5, 1, 80, 16, torch.bfloat16, 6, None, None),
    # D 128 bf16: tensor-core chunk + lean decodes; D 256 fp16: lean only
    ([1, 11, 1], [60, 30, 200], 8, 2, 128, 32, torch.bfloat16, 2, None, None),
    ([3, 1], [50, 120], 4, 2, 256, 16, torch.float16, 2, None, None),
]


@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
@pytest.mark.parametrize("case", range(len(FP8_EMU_CASES)))
def test_emulated_paged_attention_fp8(emu, case, mode):
    check_emulated_case(emu, FP8_EMU_CASES[case], f"emulated fp8 {mode} {case}",
                        torch.Generator().manual_seed(case), fp8=mode)


@pytest.mark.parametrize("arch", [80, 90])   # 90: the wgmma tile (scales on S / P)
@pytest.mark.parametrize("d", [32, 64])   # generic tile; lean + tensor-core tiles
def test_emulated_paged_attention_fp8_scales_matter(emu, d, arch):
    # Per-slot scales spread over 4 orders of magnitude: a kernel that ignored, swapped or
    # misaddressed them (slot * Hkv + head) would be off by O(1), far outside the tolerance.
    g = torch.Generator().manual_seed(7)
    b64 = make_batch([1, 6, 20], [80, 50, 40], num_q_heads=4, num_kv_heads=2, head_dim=d,
                     dtype=torch.float64, generator=g)
    mag = torch.logspace(-2, 2, b64["k_cache"].shape[0] * 16 * 2, dtype=torch.float64)
    mag = mag[torch.randperm(mag.numel(), generator=g)].view(-1, 16, 2, 1)
    b64["k_cache"] = b64["k_cache"] * mag
    b64["v_cache"] = b64["v_cache"] * mag.flip(0)
    b64 = quantize_cache(b64, "per_slot")
    bl = cast(b64, torch.float16)
    kw = dict(scale=0.05, k_scale=b64["k_scale"], v_scale=b64["v_scale"])
    got = emu.paged_attention(*attn_args(bl), max_seqlen_q=20, num_kv_splits=1, arch=arch,
                              **kw)
    assert_close(got, ref.paged_attention(*attn_args(b64), **kw),
                 ref.paged_attention(*attn_args(bl), **kw), name="fp8 scale spread")


@pytest.mark.parametrize("arch", [80, 90])   # 90: the wgmma tile's code ring, decodes too
@pytest.mark.parametrize("d", [24, 64, 128])   # generic tile; lean + tensor-core tiles
def test_emulated_paged_attention_fp8_never_reads_past_the_keys(emu, d, arch):
    # Every slot no query may read (past seq_len in each last block, the unused blocks) holds
    # NaN codes (0x7f) and NaN scales: a tile that read one, even times a zero scale or
    # probability, would put NaN in P V.
    g = torch.Generator().manual_seed(3)
    b64 = quantize_cache(make_batch([1, 13, 2], [37, 20, 50], num_q_heads=8, num_kv_heads=2,
                                    head_dim=d, block_size=16, dtype=torch.float64,
                                    generator=g), "per_slot")
    nb, bs = b64["k_cache"].shape[:2]
    live = torch.zeros(nb * bs, dtype=torch.bool)
    for b, n in enumerate(b64["seq_lens"].tolist()):
        pos = torch.arange(n)
        live[b64["block_table"][b, pos // bs].long() * bs + pos % bs] = True
    dead = ~live.view(nb, bs)
    assert dead.all(1).sum() == 3 and dead.any(1).sum() > 3   # 3 unused blocks + tails
    # make block 0 an unused one (a kernel that read "address 0" for a masked key hits it)
    z = int(dead.all(1).nonzero()[0])
    for t in ("k_cache", "v_cache", "k_scale", "v_scale"):
        b64[t][[0, z]] = b64[t][[z, 0]].clone()
    bt = b64["block_table"]
    b64["block_table"] = torch.where(bt == 0, z, torch.where(bt == z, 0, bt)).to(bt.dtype)
    dead[[0, z]] = dead[[z, 0]].clone()
    for c in ("k_cache", "v_cache"):
        b64[c].view(torch.uint8)[dead] = 0x7F
    for s in ("k_scale", "v_scale"):
        b64[s][dead] = float("nan")
    bl = cast(b64, torch.float16)
    kw = dict(scale=0.1, k_scale=b64["k_scale"], v_scale=b64["v_scale"])
    for splits in (1, 3):
        got = emu.paged_attention(*attn_args(bl), max_seqlen_q=13, num_kv_splits=splits,
                                  arch=arch, **kw)
        assert not got.isnan().any()
        assert_close(got, ref.paged_attention(*attn_args(b64), **kw),
                     ref.paged_attention(*attn_args(bl), **kw), name=f"fp8 poisoned {splits}")


# Head dims 80 / 96 in 16-bit types: the strided lean tile (16 lanes a group, 5 / 6 elements a
# lane, 10 / 12 chunk copies a key; paged_attention.cu LeanCfg). Decodes at G 1/4/5/8, block
# sizes 16 and 48, splits, windows, a softcap; spec-verify q_len 2-16 at G 1/4/8 (8-128 rows:
# 1, 2 and 4 row groups; past 8 rows the mma.sync tile, test_emulated_mma_d80_d96). fp32 q
# stays on the generic tile (20 / 24 chunks of 4 floats do not fit 16 lanes).
STRIDED_CASES = [  # q_lens, kv_lens, hq, hkv, d, block size, dtype, splits, window, softcap
    ([1, 1, 3, 1], [70, 1, 40, 200], 2, 2, 80, 16, torch.bfloat16, 2, None, None),       # G 1
    ([1, 2, 1], [150, 33, 90], 8, 2, 80, 48, torch.float16, 3, 20, None),                # G 4
    ([1, 4, 1], [61, 30, 130], 10, 2, 96, 16, torch.bfloat16, 1, None, 5.0),             # G 5
    ([1, 1, 3], [100, 250, 20], 16, 2, 96, 48, torch.float16, 4, None, None),            # G 8
    ([2, 7, 16, 1], [40, 90, 60, 33], 2, 2, 96, 16, torch.float16, 2, None, None),      # spec G 1
    ([2, 5, 16], [50, 64, 100], 8, 2, 80, 16, torch.bfloat16, 2, 30, None),             # spec G 4
    ([3, 9, 16], [30, 70, 48], 8, 1, 96, 48, torch.float16, 2, None, None),             # spec G 8
    ([21, 1], [60, 80], 8, 2, 80, 16, torch.float16, 2, None, None),      # a prefill chunk
    ([1, 3], [90, 20], 8, 2, 80, 16, torch.float32, 2, None, None),       # fp32: generic tile
]


@pytest.mark.parametrize("case", range(len(STRIDED_CASES)))
def test_emulated_paged_attention_d80_d96(emu, case):
    check_emulated_case(emu, STRIDED_CASES[case], f"strided case {case}",
                        torch.Generator().manual_seed(100 + case))


# 16-bit D 80 / 96 past 8 rows: the mma.sync tile with rows padded to D 128's pitch (10 / 12
# chunks a row copied, 5 / 6 k-steps: D 80's last alone, ldmatrix .x2; 10 / 12 n-tiles of
# P V). Cached context, G 1 / 4 / 5, splits, windows, a softcap, a mixed batch, spec-verify;
# then G 1 either side of the class edges (8 rows: lean-only, no mma; 9, 64, 65: the tile).
MMA_STRIDED_CASES = [  # as STRIDED_CASES
    ([70, 1], [200, 50], 2, 2, 80, 16, torch.float16, 1, None, None),              # G 1
    ([40, 1, 3], [300, 90, 20], 8, 2, 96, 16, torch.bfloat16, 2, None, None),      # G 4
    ([30, 1], [260, 70], 10, 2, 80, 48, torch.float16, 3, 50, None),               # G 5
    ([9], [333], 8, 2, 96, 32, torch.bfloat16, 2, 40, 3.0),                        # softcap
    ([20], [260], 8, 2, 80, 16, torch.float16, 1, None, 4.0),                      # softcap
    ([37, 1, 0, 1, 1, 21, 0, 1], [100, 150, 0, 1, 260, 60, 3, 33], 8, 2, 80, 16,
     torch.float16, 3, None, None),                                                # mixed
    ([2, 3, 4, 16, 1], [40, 90, 60, 120, 33], 8, 2, 96, 16, torch.float16, 2, None, None),
    ([2, 9, 16, 5], [30, 77, 60, 40], 2, 2, 80, 16, torch.bfloat16, 2, None, None),  # spec
] + [([q, 1], [q + 70, 150], 2, 2, d, 16, torch.float16, 2, None, None)
     for d in (80, 96) for q in (4, 5, 64, 65)]


@pytest.mark.parametrize("case", range(len(MMA_STRIDED_CASES)))
def test_emulated_mma_d80_d96(emu, case):
    c = MMA_STRIDED_CASES[case]
    ops = emu.mma_ops()
    check_emulated_case(emu, c, f"mma d80/96 case {case}",
                        torch.Generator().manual_seed(300 + case))
    rows = max(q * c[2] // c[3] for q in c[0])
    assert (emu.mma_ops() > ops) == (rows > 4)   # the tensor-core rows took the mma tile
                                                 # (kLeanRows)


# fp8 caches in the lean tile (e4m3 codes staged by cp.async, converted at use, scales on the
# scores / P) at D 80 / 96 and the D 128 lean-only kernel; per-slot or per-tensor scales.
STRIDED_FP8_CASES = [  # as STRIDED_CASES
    ([1, 4, 1], [130, 40, 70], 8, 2, 80, 16, torch.bfloat16, 3, None, None),
    ([1, 16, 1], [60, 50, 100], 10, 2, 96, 48, torch.float16, 2, 25, None),
    ([2, 1], [40, 90], 8, 2, 80, 16, torch.float32, 2, None, None),      # fp32 q: generic tile
    # D 128 with q_len x G <= 16 everywhere: the lean-only fp8 kernel (no tensor-core tile)
    ([1, 4, 1], [300, 50, 90], 8, 2, 128, 16, torch.bfloat16, 3, None, None),
    ([1, 2], [77, 40], 16, 2, 64, 48, torch.float16, 2, 30, 4.0),        # D 64, G 8, softcap
]


@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
@pytest.mark.parametrize("case", range(len(STRIDED_FP8_CASES)))
def test_emulated_paged_attention_d80_d96_fp8(emu, case, mode):
    check_emulated_case(emu, STRIDED_FP8_CASES[case], f"strided fp8 {mode} {case}",
                        torch.Generator().manual_seed(200 + case), fp8=mode)


# Spec-verify queries (q_len 2-16) at G 1 / 4 / 8: up to 4 rows stay on the lean tile, 5-16
# rows take the tensor-core tile with only warp 0 computing (paged_attention.cu kLeanRows),
# longer ones its usual 64-row CTAs. Splits, windows, a softcap; D 64 and 128.
SPEC_CASES = [  # q_lens, kv_lens, hq, hkv, d, block size, dtype, splits, window, softcap
    ([2, 9, 12, 16, 8], [30, 77, 140, 60, 9], 2, 2, 64, 16, torch.float16, 2, None, None),   # G 1
    ([3, 4, 2, 1], [120, 35, 64, 200], 8, 2, 128, 16, torch.bfloat16, 3, 40, None),          # G 4
    ([2, 16, 1, 5], [70, 90, 50, 33], 16, 2, 64, 48, torch.bfloat16, 2, None, 5.0),          # G 8
    ([4, 3], [260, 100], 8, 1, 128, 32, torch.float16, 4, None, None),     # G 8, 24-32 rows
]


@pytest.mark.parametrize("case", range(len(SPEC_CASES)))
def test_emulated_paged_attention_spec_verify(emu, case):
    check_emulated_case(emu, SPEC_CASES[case], f"spec-verify case {case}",
                        torch.Generator().manual_seed(300 + case))


# ---- the emulator's own model of the GPU (csrc/emu/emu.h), checked on tiny kernels in shim.cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_mma_fragment_layouts(emu, dtype):
    # ldmatrix .x4/.x4.trans/.x2/.x2.trans feeding mma.sync.m16n8k16 must compute A B + C: a
    # wrong lane -> (row, col) map in any fragment permutes elements and fails by O(1).
    g = torch.Generator().manual_seed(0)
    A, B = (torch.randn(16, 16, generator=g).to(dtype), torch.randn(16, 8, generator=g).to(dtype))
    C = torch.randn(16, 8, generator=g)
    want = A.double() @ B.double() + C.double()
    for mode, a, b in ((0, A, B), (1, A, B.t()), (2, A.t(), B)):
        d = emu.mma_test(a, b, C, mode)
        err = (d.double() - want).abs().max().item()
        print(f"mma mode {mode}: max err {err:.2e}")
        assert err <= 4 * 2.0 ** -23 * want.abs().max().item() * 16, f"mode {mode}"


def test_emulated_shuffle_masks(emu):
    assert emu.shfl_test(0).tolist() == [float(lane ^ 1) for lane in range(32)]
    half = emu.shfl_test(2)                              # lanes 0-15, mask 0xffff: fine
    assert half[:16].tolist() == [float(lane ^ 1) for lane in range(16)]
    with pytest.raises(RuntimeError, match="partial warp"):
        emu.shfl_test(1)                                 # full mask, lane 5 has exited
    with pytest.raises(RuntimeError, match="source lane not in the mask"):
        emu.shfl_test(3)                                 # xor 16 from a half-warp mask


def test_emulated_cp_async_groups(emu):
    nan = float("nan")
    got = emu.cp_async_test()
    want = torch.tensor([[1, nan, nan, nan],             # wait_group 2: oldest group only
                         [1, 2, nan, nan],               # wait_group 1
                         [1, 2, 3, nan]])                # 0: all committed; not the open copy
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vectorized", [True, False])
def test_emulated_selective_ops(emu, dtype, vectorized):
    g = lambda *s: torch.randn(*s, dtype=torch.float64).to(dtype)  # noqa: E731
    # write_kv: strided slices of a fused QKV, padding slots and a slot past the cache
    T, H, D = 13, 3, 80
    qkv = g(T, 9 * D)
    k, v = qkv[:, 3 * D:6 * D].view(T, H, D), qkv[:, 6 * D:].view(T, H, D)
    kc = torch.full((4, 32, H, D), SENTINEL, dtype=dtype)
    vc, kc2, vc2 = kc.clone(), kc.clone(), kc.clone()
    slots = torch.randperm(128)[:T]
    slots[::4] = -1
    emu.write_kv(k, v, kc, vc, torch.cat([slots[:1], torch.tensor([128 + 5]), slots[2:]]),
                 vectorized)
    slots[1] = -1
    ref.write_kv(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    # rms_norm (with/without residual, weight in x's dtype or fp32) on strided rows
    Hd = 200 if vectorized else 203
    x = g(7, Hd + 8)[:, 8:] if vectorized else g(7, Hd + 8)[:, 1:Hd + 1]
    r = g(7, Hd)
    for w in ((1 + 0.1 * g(Hd)), (1 + 0.1 * torch.randn(Hd))):
        y = emu.rms_norm(x, w, 1e-6, None, vectorized)
        assert_close(y, ref.rms_norm(x.double(), w.double(), 1e-6), ref.rms_norm(x, w, 1e-6),
                     f"rms_norm w={w.dtype}")
        y, s = emu.rms_norm(x, w, 1e-6, r, vectorized)
        want, lowp = ref.rms_norm(x.double(), w.double(), 1e-6, r.double()), ref.rms_norm(x, w, 1e-6, r)
        assert torch.equal(s, lowp[1])
        assert_close(y, want[0], lowp[0], f"fused_add_rms_norm w={w.dtype}")
    # rotary, both layouts, partial rotary dim, Llama-3 cache
    d, rot = (96, 64) if vectorized else (80, 40)
    qkv = g(9, 7 * d)
    q, k = qkv[:, :3 * d].view(9, 3, d), qkv[:, 3 * d:5 * d].view(9, 2, d)
    cache = ref.rope_cos_sin_cache(rot, 4096, base=500000.0, scaling=LLAMA3)
    pos = torch.randint(0, 4096, (9,))
    for neox in (True, False):
        qr, kr = emu.rotary_embedding(pos, q, k, cache, neox, vectorized)
        gq, gk = ref.rotary_embedding(pos, q.double(), k.double(), cache.double(), neox)
        lq, lk = ref.rotary_embedding(pos, q, k, cache, neox)
        assert_close(qr, gq, lq, f"rotary q neox={neox}")
        assert_close(kr, gk, lk, f"rotary k neox={neox}")
        assert torch.equal(qr[..., rot:], q[..., rot:])
    # silu_and_mul on strided rows
    x = g(5, 2 * 96 + 8)[:, 8:] if vectorized else g(5, 2 * 37 + 1)[:, 1:]
    assert_close(emu.silu_and_mul(x, vectorized), ref.silu_and_mul(x.double()),
                 ref.silu_and_mul(x), "silu_and_mul")
