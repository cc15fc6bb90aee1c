"""CUDA fp8 KV-cache write (csrc/write_kv.cu): its own source through the CPU emulator
(csrc/emu/), against the reference, and cuda_fp8.h's host conversion against torch's on every
code and many floats; the schema and fake with the extension; gpu tests for the device.

The emulated kernel divides in IEEE fp32 and converts with __nv_cvt_float_to_fp8 (software on
the host, cvt.rn.satfinite on sm_90), so the codes and scales must equal the reference's."""
import pytest
import torch

import kernels
from kernels import cuda_ops
from kernels import reference as ref
from tests.fp8_cases import FP8, assert_fp8_write_matches, float_rows, make_fp8_caches
from tests.test_cuda_ops import _emulated, ext  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def emu():
    return _emulated()


@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_emulated_write_kv_fp8_matches_reference(emu, dtype, mode):
    T, h, d, nb, bs = 9, 3, 80, 4, 32
    qkv = torch.cat([float_rows(T, h, d, dtype, seed=1), float_rows(T, h, d, dtype, seed=2),
                     float_rows(T, h, d, dtype, seed=3)], dim=1)
    key, value = qkv[:, h:2 * h], qkv[:, 2 * h:]            # strided views of a fused QKV
    slots = torch.randperm(nb * bs)[:T]
    slots[::4] = -1
    bad = slots.clone()
    bad[1] = nb * bs + 5                                     # past the cache: skipped
    got = make_fp8_caches(nb, bs, h, d, mode)
    emu.write_kv_fp8(key, value, *got[:2], bad, *got[2:])
    slots[1] = -1
    want = make_fp8_caches(nb, bs, h, d, mode)
    ref.write_kv(key, value, *want[:2], slots, *want[2:])
    assert_fp8_write_matches(got, want, name=f"emu write_kv fp8 {mode} {dtype}")


def test_emulated_fp8_head_dim_limit(emu):
    key = torch.randn(2, 1, 264)
    kc, vc, ks, vs = make_fp8_caches(2, 16, 1, 264, "per_slot")
    with pytest.raises(RuntimeError, match="cudaError 1"):  # cudaErrorInvalidValue
        emu.write_kv_fp8(key, key, kc, vc, torch.tensor([0, 1]), ks, vs)


def test_host_e4m3_conversion_matches_torch_on_every_code_and_many_floats(emu):
    # per-tensor scale 1: the kernel's code is e4m3(clamp(x)); x spans every code, every
    # midpoint (ties to even), their neighbours and random floats from 1e-12 to 448
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    fin = vals[~vals.isnan()].unique()
    mids = (fin[1:] + fin[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(8000, generator=g) * 10.0 ** torch.empty(8000).uniform_(-12, 2.65, generator=g)
    x = torch.cat([fin, mids, mids.nextafter(mids + 1), mids.nextafter(mids - 1), rand,
                   torch.tensor([0.0, -0.0, 448.0, -448.0, 500.0, -1e30, 1e-45])])
    d = 64
    x = torch.cat([x, torch.zeros(-x.numel() % d)]).view(-1, 1, d)
    kc, vc, _, _ = make_fp8_caches(x.shape[0], 1, 1, d, "per_tensor")
    emu.write_kv_fp8(x, x, kc, vc, torch.arange(x.shape[0]), 1.0, 1.0)
    want = x.clamp(-448, 448).to(FP8).view(torch.uint8)
    got = kc.view(x.shape[0], 1, d).view(torch.uint8)
    bad = got != want
    assert not bad.any(), f"{int(bad.sum())} of {x.numel()} differ, e.g. {x[bad][:5].tolist()}"


def test_cuda_backend_declares_fp8_ops():
    # paged_attention joined with the kernel's fp8 tile (branch cufp8, tests/test_cuda_ops.py)
    assert set(cuda_ops.FP8_KV_OPS) == {"write_kv", "rotary_write_kv", "paged_attention"}


def test_fp8_write_kv_traces_with_the_fake(ext):
    # the schema itself is in tests/test_cuda_ops.py SCHEMAS (optional scales, defaults)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        kc = torch.empty(4, 16, 2, 64, dtype=FP8, device="cuda")
        ks = torch.empty(4, 16, 2, device="cuda")
        key = torch.empty(3, 2, 64, dtype=torch.bfloat16, device="cuda")
        slots = torch.zeros(3, dtype=torch.int64, device="cuda")
        cuda_ops.write_kv(key, key, kc, kc, slots, ks, ks)
        cuda_ops.write_kv(key, key, kc, kc, slots, 0.5, 0.25)


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,h,d,bs", [(1, 8, 128, 16), (77, 5, 80, 32), (300, 9, 256, 256)])
def test_cuda_write_kv_fp8_gpu(T, h, d, bs, dtype, mode):
    nb = -(-T // bs) + 2
    key = float_rows(T, h, d, dtype, seed=1, device="cuda")
    value = float_rows(T, h, d, dtype, seed=2, device="cuda")
    slots = torch.randperm(nb * bs, device="cuda")[:T]
    slots[::5] = -1
    res = {}
    for b in ("torch", "cuda"):
        kc, vc, ks, vs = make_fp8_caches(nb, bs, h, d, mode, device="cuda")
        kernels.write_kv(key, value, kc, vc, slots, backend=b, k_scale=ks, v_scale=vs)
        res[b] = (kc, vc, ks, vs)
    assert_fp8_write_matches(res["cuda"], res["torch"], name=f"gpu cuda write_kv {mode} {dtype}")


@pytest.mark.gpu
def test_cuda_write_kv_fp8_opcheck_gpu():
    kc, vc, ks, vs = make_fp8_caches(4, 16, 2, 64, "per_slot", device="cuda")
    key = float_rows(3, 2, 64, torch.bfloat16, device="cuda")
    slots = torch.tensor([0, -1, 63], device="cuda")
    torch.library.opcheck(torch.ops.ragged.write_kv.default, (key, key, kc, vc, slots, ks, vs))
    torch.library.opcheck(torch.ops.ragged.write_kv.default,
                          (key, key, kc, vc, slots, None, None, 0.5, 0.25))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
def test_cuda_rotary_write_kv_fp8_gpu(mode):
    T, hq, hk, d, nb, bs = 33, 32, 8, 128, 6, 16
    cs = ref.rope_cos_sin_cache(d, 4096).cuda()
    pos = torch.randint(0, 4096, (T,), device="cuda")
    q = float_rows(T, hq, d, torch.bfloat16, seed=3, device="cuda")
    k = float_rows(T, hk, d, torch.bfloat16, seed=4, device="cuda")
    v = float_rows(T, hk, d, torch.bfloat16, seed=5, device="cuda")
    slots = torch.randperm(nb * bs, device="cuda")[:T]
    res = {}
    for b in ("torch", "cuda"):
        kc, vc, ks, vs = make_fp8_caches(nb, bs, hk, d, mode, device="cuda")
        kernels.rotary_write_kv(pos, q, k, v, cs, kc, vc, slots, True, backend=b, k_scale=ks,
                                v_scale=vs)
        res[b] = (kc, vc, ks, vs)
    # the CUDA rotation may round k differently from torch's (FMA): 1 ulp, bf16 scale rounding
    assert_fp8_write_matches(res["cuda"], res["torch"], ulps=1, scale_rtol=2.0 ** -7,
                             name=f"gpu cuda rotary_write_kv {mode}")
