"""Triton selective-batching ops (write_kv, rms_norm, rotary, silu_and_mul) vs the references.

CPU runs them under the Triton interpreter (fp16/fp32, small awkward shapes); the `gpu` tests
repeat them at serving sizes in fp16/bf16/fp32 and opcheck the custom ops. Floating-point
ops must be within 2x PyTorch's own error in the same dtype (tests/tolerance.py); write_kv is
a copy and must be exact. Inputs are slices of a fused buffer on purpose (strided rows).
"""
import json

import pytest
import torch

import kernels
from kernels import reference as ref
from tests.op_cases import LLAMA3, check_rotary, check_rotary_write_kv, check_write_kv
from tests.tolerance import assert_close

# `interpreter`: on a GPU machine conftest runs this module's CPU tests in a TRITON_INTERPRET=1 child.
pytestmark = pytest.mark.interpreter

CPU_DTYPES = [torch.float16, torch.float32]
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# --------------------------------------------------------------------------- write_kv
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("T,hkv,d,block_size", [(1, 1, 64, 16), (17, 3, 80, 32),
                                                (97, 1, 96, 256), (17, 3, 128, 16)])
def test_write_kv(T, hkv, d, block_size, dtype):
    check_write_kv("triton", T, hkv, d, block_size, num_blocks=-(-3 * T // block_size) + 2,
                   dtype=dtype, device="cpu")


def test_write_kv_matches_reference_and_empty():
    key = torch.randn(9, 2, 16)
    kc, vc = torch.zeros(2, 16, 2, 16), torch.zeros(2, 16, 2, 16)
    kc2, vc2 = kc.clone(), vc.clone()
    slots = torch.tensor([0, 31, -1, 7, 8, -2, 20, 21, 5])
    kernels.write_kv(key, key * 2, kc, vc, slots, backend="triton")
    ref.write_kv(key, key * 2, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    e = torch.empty(0, 2, 16)
    kernels.write_kv(e, e, kc, vc, torch.empty(0, dtype=torch.int64), backend="triton")
    assert torch.equal(kc, kc2)


# --------------------------------------------------------------------------- rms_norm
def check_rms_norm(shape, dtype, device, residual, eps=1e-6):
    n = shape[-1]
    rows = torch.randn(*shape[:-1], n + 24, dtype=torch.float64).to(dtype).to(device)
    x = rows[..., 3:n + 3]                                  # strided rows
    r = torch.randn(shape, dtype=torch.float64).to(dtype).to(device) if residual else None
    w = (1 + 0.1 * torch.randn(n, dtype=torch.float64)).to(dtype).to(device)
    out = kernels.rms_norm(x, w, eps, r, backend="triton")
    gt = ref.rms_norm(x.double(), w.double(), eps, r.double() if residual else None)
    lowp = ref.rms_norm(x, w, eps, r)
    if residual:
        assert torch.equal(out[1], lowp[1])                 # the sum rounds exactly like torch
        out, gt, lowp = out[0], gt[0], lowp[0]
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, gt, lowp, f"rms_norm {tuple(shape)} {dtype} residual={residual}")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (17, 1000), (97, 896), (2, 5, 96)])
def test_rms_norm(shape, residual, dtype):
    check_rms_norm(shape, dtype, "cpu", residual)


def test_rms_norm_empty_and_fp32_weight():
    y, s = kernels.rms_norm(torch.empty(0, 64), torch.ones(64), 1e-5, torch.empty(0, 64),
                            backend="triton")
    assert y.shape == s.shape == (0, 64)
    x, w = torch.randn(5, 40, dtype=torch.float16), torch.randn(40)        # mixed dtypes
    assert_close(kernels.rms_norm(x, w, 1e-5, backend="triton"),
                 ref.rms_norm(x.double(), w.double(), 1e-5), ref.rms_norm(x, w, 1e-5), "mixed")


# --------------------------------------------------------------------------- rotary
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("T,hq,hk,d,rot", [(1, 4, 1, 64, 64), (17, 6, 3, 80, 80),
                                           (97, 4, 1, 128, 64), (17, 2, 2, 96, 32)])
def test_rotary(T, hq, hk, d, rot, is_neox, dtype):
    check_rotary("triton", T, hq, hk, d, rot, is_neox, dtype, "cpu")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("T,hq,hk,d,rot,bs,pad", [(1, 4, 1, 64, 64, 16, 0), (17, 10, 2, 80, 80, 16, 1),
                                                  (33, 4, 4, 96, 32, 32, 0)])
def test_rotary_write_kv_fused(T, hq, hk, d, rot, bs, pad, is_neox, dtype):
    """One launch for RoPE + the KV write: bitwise the two separate Triton ops, within
    tolerance of the float64 reference; GQA 5, partial rotary, misaligned strided views."""
    check_rotary_write_kv("triton", T, hq, hk, d, rot, is_neox, bs, dtype, "cpu", pad=pad)


def test_rotary_write_kv_bad_arguments():
    q = torch.randn(3, 4, 64)
    k = v = torch.randn(3, 2, 64)
    kc = vc = torch.zeros(4, 16, 2, 64)
    cache = ref.rope_cos_sin_cache(64, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        kernels.rotary_write_kv(torch.arange(3), q, k, v, cache, kc, vc, torch.arange(2),
                                backend="triton")
    with pytest.raises(ValueError, match="k_cache"):
        kernels.rotary_write_kv(torch.arange(3), q, k, v, cache, torch.zeros(4, 16, 3, 64), vc,
                                torch.arange(3), backend="triton")
    with pytest.raises(ValueError, match="positions"):
        kernels.rotary_write_kv(torch.arange(3.0), q, k, v, cache, kc, vc, torch.arange(3),
                                backend="triton")


@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_llama3_cache_int32_positions(is_neox):
    check_rotary("triton", 17, 8, 2, 128, 128, is_neox, torch.float16, "cpu", pos_dtype=torch.int32,
                 scaling=LLAMA3, max_pos=32768)


def test_rotary_empty():
    qr, kr = kernels.rotary_embedding(torch.empty(0, dtype=torch.int64), torch.empty(0, 4, 64),
                                      torch.empty(0, 2, 64), ref.rope_cos_sin_cache(64, 8), True,
                                      backend="triton")
    assert qr.shape == (0, 4, 64) and kr.shape == (0, 2, 64)


# --------------------------------------------------------------------------- silu_and_mul
def check_silu_and_mul(shape, dtype, device):
    full = torch.randn(*shape[:-1], shape[-1] + 16, dtype=torch.float64).to(dtype).to(device)
    x = full[..., 8:shape[-1] + 8]                          # strided rows
    out = kernels.silu_and_mul(x, backend="triton")
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert_close(out, ref.silu_and_mul(x.double()), ref.silu_and_mul(x), f"silu_and_mul {shape} {dtype}")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 192), (17, 2000), (97, 6144), (2, 3, 160)])
def test_silu_and_mul(shape, dtype):
    check_silu_and_mul(shape, dtype, "cpu")


def test_silu_and_mul_empty():
    assert kernels.silu_and_mul(torch.empty(0, 32), backend="triton").shape == (0, 16)


# --------------------------------------------------------------------------- validation
def _raises(name, fn, *args, **kw):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        fn(*args, **kw, backend="triton")


def test_validation_errors_name_the_argument():
    k = torch.randn(4, 2, 16)
    kc = torch.zeros(2, 16, 2, 16)
    s = torch.arange(4)
    _raises("slot_mapping", kernels.write_kv, k, k, kc, kc.clone(), s.int())
    _raises("key", kernels.write_kv, k.transpose(1, 2), k, kc, kc.clone(), s)
    _raises("k_cache", kernels.write_kv, k, k, kc.half(), kc.clone(), s)
    _raises("v_cache", kernels.write_kv, k, k, kc, kc[:1].clone(), s)
    x, w = torch.randn(3, 32), torch.randn(32)
    _raises("weight", kernels.rms_norm, x, torch.randn(31), 1e-6)
    _raises("residual", kernels.rms_norm, x, w, 1e-6, torch.randn(3, 31))
    _raises("eps", kernels.rms_norm, x, w, 0.0)
    _raises("x", kernels.rms_norm, torch.randn(1, 70000), torch.randn(70000), 1e-6)  # row limit
    q, cache = torch.randn(4, 2, 16), ref.rope_cos_sin_cache(16, 8)
    _raises("positions", kernels.rotary_embedding, s.float(), q, q, cache, True)
    _raises("cos_sin_cache", kernels.rotary_embedding, s, q, q, torch.randn(8, 18), True)
    _raises("is_neox", kernels.rotary_embedding, s, q, q, cache, 1)
    _raises("k", kernels.rotary_embedding, s, q, q.half(), cache, True)
    _raises("x", kernels.silu_and_mul, torch.randn(3, 7))
    _raises("x", kernels.silu_and_mul, torch.randn(3, 8).t())


# --------------------------------------------------------------------------- custom ops
def _op_cases(device, dtype=torch.float32):
    from kernels import triton_rms_norm, triton_rotary, triton_silu_mul, triton_write_kv  # noqa: F401
    t = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    x, r, w = t(5, 96), t(5, 96), t(96)
    q, k = t(5, 4, 64), t(5, 2, 64)
    cache = ref.rope_cos_sin_cache(32, 50).to(device)
    kc = torch.zeros(4, 16, 2, 64, device=device, dtype=dtype)
    slots = torch.tensor([0, 5, -1, 9, 63], device=device)
    ops = torch.ops.ragged_triton
    return [(ops.rms_norm.default, (x, w, 1e-6)), (ops.fused_add_rms_norm.default, (x, w, 1e-6, r)),
            (ops.silu_and_mul.default, (x,)),
            (ops.rotary_embedding.default, (torch.arange(5, device=device), q, k, cache, False)),
            (ops.write_kv.default, (k, k, kc, kc.clone(), slots))]


def test_opcheck_cpu():
    for op, args in _op_cases("cpu"):
        torch.library.opcheck(op, args)


def _block(x, r, w, q, k, pos, cache, kc, vc, slots):
    """One decoder-layer's worth of selective-batching ops through the Triton modules."""
    from kernels import triton_rms_norm, triton_rotary, triton_silu_mul, triton_write_kv
    y, s = triton_rms_norm.rms_norm(x, w, 1e-6, r)
    qr, kr = triton_rotary.rotary_embedding(pos, q, k, cache, True)
    triton_write_kv.write_kv(kr, k, kc, vc, slots)
    return triton_silu_mul.silu_and_mul(y), triton_rms_norm.rms_norm(s, w, 1e-5), qr, s


def check_compile_fullgraph(device, backend):
    t = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    args = [t(5, 96), t(5, 96), t(96), t(5, 4, 64), t(5, 2, 64), torch.arange(5, device=device),
            ref.rope_cos_sin_cache(32, 50).to(device), torch.zeros(4, 16, 2, 64, device=device),
            torch.zeros(4, 16, 2, 64, device=device), torch.tensor([0, 5, -1, 9, 63], device=device)]
    eager_args = [a.clone() for a in args]
    got = torch.compile(_block, fullgraph=True, backend=backend)(*args)
    want = _block(*eager_args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(args[7], eager_args[7]) and torch.equal(args[8], eager_args[8])
    assert args[7].abs().sum() > 0                          # the compiled graph did write


def test_compile_fullgraph_cpu():
    check_compile_fullgraph("cpu", "aot_eager")


# --------------------------------------------------------------------------- compiles for sm_90
_COMPILE_SCRIPT = r"""
import re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import triton_rms_norm as R, triton_rotary as RO, triton_silu_mul as S, triton_write_kv as W

def ptx(fn, sig, const, warps):
    sig = dict(sig, **dict.fromkeys(const, "constexpr"))
    div = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t != "constexpr"}
    k = triton.compile(ASTSource(fn, sig, const, div), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})
    return set(re.findall(r"(?:ld|st)\.global\.v4\.b32", k.asm["ptx"]))

p, i32 = "*" + sys.argv[1], "i32"
b, w = W._config(8 * 128)
print("write_kv", ptx(W._write_kv_kernel, dict(key_ptr=p, value_ptr=p, k_cache_ptr=p, v_cache_ptr=p,
      slot_ptr="*i64", key_stride_t=i32, key_stride_h=i32, value_stride_t=i32, value_stride_h=i32,
      slot_stride=i32, HD=i32), dict(D=128, BLOCK=b), w))
b, w = R._config(4096)
print("rms_norm", ptx(R._rms_norm_kernel, dict(x_ptr=p, res_ptr=p, w_ptr=p, y_ptr=p, sum_ptr=p,
      x_stride=i32, res_stride=i32, N=i32, eps="fp32"), dict(HAS_RESIDUAL=True, BLOCK_N=b), w))
b, w = S._config(14336)
print("silu", ptx(S._silu_and_mul_kernel, dict(x_ptr=p, out_ptr=p, x_stride=i32, I=i32), dict(BLOCK=b), w))
for neox in (True, False):
    b, w = RO._config(32, 128)
    print("rotary", ptx(RO._rotary_kernel, dict(pos_ptr="*i64", q_ptr=p, k_ptr=p, cs_ptr="*fp32",
          qo_ptr=p, ko_ptr=p, pos_stride=i32, q_stride_t=i32, q_stride_h=i32, k_stride_t=i32,
          k_stride_h=i32, cs_stride=i32, HQ=i32, HK=i32), dict(D=128, HALF=48, IS_NEOX=neox,
          BLOCK_H=b, HALF_PAD=64, PASS_PAD=32), w))
"""


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_kernels_compile_for_sm90_with_16_byte_accesses(tmp_path, dtype):
    """The CPU suite runs the kernels interpreted; this compiles them (no GPU needed) for H100
    at Llama-3-8B shapes so a kernel that does not compile cannot land, and checks the
    memory-bound kernels use 16-byte global loads and stores."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, dtype], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    lines = res.stdout.splitlines()
    assert len(lines) == 5, res.stdout
    for line in lines:                  # write_kv, rms_norm, silu, rotary NeoX and GPT-J
        assert "ld.global.v4.b32" in line and "st.global.v4.b32" in line, line


# --------------------------------------------------------------------------- benchmark smoke
def test_bench_kernels_cpu_quick(tmp_path):
    from bench import kernels as bk
    path = bk.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    data = json.loads(path.read_text())
    assert {"run_info", "copy_bandwidth_gbs", "results"} <= set(data)
    assert data["run_info"]["device"].startswith("cpu")
    rows = data["results"]
    kinds = {r["kind"] for r in rows}
    assert {"decode", "prefill", "mixed", "op"} <= kinds
    timed = [r for r in rows if r.get("median_us") is not None]
    assert timed, rows
    for r in timed:
        assert r["median_us"] > 0 and r["gbs"] > 0 and "pct_copy_bw" in r
    assert any(r["impl"] == "torch-sdpa" for r in timed)
    assert any(r["impl"] == "triton" and r["kind"] == "op" for r in timed)
    assert any(r["kind"] == "decode-fp8" and r["impl"] == "torch" for r in timed)   # fp8 rows


def test_bench_refuses_to_time_a_wrong_kernel():
    from bench import kernels as bk
    x = torch.randn(64, 8)
    rows = []
    ctx = dict(device=torch.device("cpu"), dtype=torch.float32, bw=1e9, warmup=0, iters=1)
    bk.measure(rows, "op", "t", {}, [("good", lambda: x), ("close", lambda: x + 1e-6),
                                     ("wrong", lambda: x * 1.01), ("broken", lambda: 1 / 0)],
               x.numel() * 4, 0, ctx)
    good, close, wrong, broken = rows
    assert good["median_us"] > 0 and close["median_us"] > 0 and close["max_err"] > 0
    assert wrong["median_us"] is None and "mismatch" in wrong["error"]
    assert broken["median_us"] is None and "ZeroDivisionError" in broken["error"]


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_write_kv_gpu_int64_addressing(dtype):
    # 133120 blocks x 16 x 8 x 128: the last slots sit past 2**31 elements
    num_blocks, bs, T = 133120, 16, 8192
    # Distinct slots (two tokens writing one slot would race): the random ones avoid the top 64.
    slots = torch.randperm(num_blocks * bs - 64)[:T]
    slots[:64] = num_blocks * bs - 1 - torch.arange(64)     # the very top of the cache
    check_write_kv("triton", T, 8, 128, bs, num_blocks, dtype, "cuda", slot_sample=slots)
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("T,hkv,d,bs", [(97, 3, 80, 32), (8192, 1, 96, 256), (1, 8, 128, 16)])
def test_write_kv_gpu_shapes(T, hkv, d, bs, dtype):
    check_write_kv("triton", T, hkv, d, bs, -(-2 * T // bs) + 3, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(8192, 4096), (8192, 1000), (3, 7, 896), (1, 16384)])
def test_rms_norm_gpu(shape, residual, dtype):
    check_rms_norm(shape, dtype, "cuda", residual)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("T,hq,hk,d,rot,bs,pad", [(8192, 32, 8, 128, 128, 16, 0),
                                                  (97, 14, 2, 64, 64, 32, 1), (17, 5, 1, 256, 128, 16, 0)])
def test_rotary_write_kv_fused_gpu(T, hq, hk, d, rot, bs, pad, dtype):
    check_rotary_write_kv("triton", T, hq, hk, d, rot, True, bs, dtype, "cuda", pad=pad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("T,hq,hk,d,rot", [(8192, 32, 8, 128, 128), (97, 14, 2, 64, 64),
                                           (1025, 32, 32, 80, 40), (17, 5, 1, 256, 128)])
def test_rotary_gpu(T, hq, hk, d, rot, is_neox, dtype):
    check_rotary("triton", T, hq, hk, d, rot, is_neox, dtype, "cuda", scaling=LLAMA3, max_pos=131072,
                 pos_dtype=torch.int32 if T == 97 else torch.int64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(8192, 2 * 14336), (8192, 2 * 11008), (5, 7, 2 * 3072),
                                   (97, 2 * 1000)])
def test_silu_and_mul_gpu(shape, dtype):
    check_silu_and_mul(shape, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_opcheck_gpu(dtype):
    for op, args in _op_cases("cuda", dtype):
        torch.library.opcheck(op, args)


@pytest.mark.gpu
def test_compile_fullgraph_gpu_inductor():
    check_compile_fullgraph("cuda", "inductor")
