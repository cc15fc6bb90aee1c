"""Triton fp8 KV-cache writes (write_kv, fused rotary_write_kv) against the reference.

On CPU (interpreter) the codes and scales must be identical to the reference's: the kernels
use IEEE division and an exact integer e4m3 conversion (kernels/triton_fp8.py). On the GPU
the rotation may round k differently (FMA contraction), so codes may move by 1 e4m3 ulp and
scales by k's rounding (FP8_INTERFACE.md)."""
import pytest
import torch
import triton
import triton.language as tl

import kernels
from kernels import reference as ref
from kernels.triton_fp8 import e4m3_bits
from tests.fp8_cases import FP8, assert_fp8_write_matches, float_rows, make_fp8_caches


def _write(backend, key, value, slots, shape, mode, device="cpu"):
    kc, vc, ks, vs = make_fp8_caches(*shape, mode, device=device)
    kernels.write_kv(key, value, kc, vc, slots, backend=backend, k_scale=ks, v_scale=vs)
    return kc, vc, ks, vs


def _slots(T, nb, bs, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[torch.rand(T, generator=g) < 0.25] = -1           # padding tokens
    return slots.to(device)


@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
@pytest.mark.parametrize("T,h,d,bs,dtype", [
    (7, 3, 40, 16, torch.float16),
    (5, 5, 80, 32, torch.float32),
    (9, 1, 128, 16, torch.float16),
])
def test_triton_write_kv_fp8_matches_reference(T, h, d, bs, dtype, mode):
    nb = 4
    key, value = float_rows(T, h, d, dtype, seed=1), float_rows(T, h, d, dtype, seed=2)
    key = torch.cat([key, key], dim=-1)[..., :d]            # strided view (fused-QKV style)
    slots = _slots(T, nb, bs, seed=T)
    got = _write("triton", key, value, slots, (nb, bs, h, d), mode)
    want = _write("torch", key, value, slots, (nb, bs, h, d), mode)
    assert_fp8_write_matches(got, want, name=f"triton write_kv {mode} {dtype}")


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
@pytest.mark.parametrize("T,hq,hk,d,rot,dtype", [
    (6, 4, 2, 64, 64, torch.float16),
    (5, 6, 3, 80, 48, torch.float32),                       # partial rotary: tail in the amax
])
def test_triton_rotary_write_kv_fp8_matches_reference(T, hq, hk, d, rot, dtype, mode, is_neox):
    nb, bs = 3, 16
    cs = ref.rope_cos_sin_cache(rot, 128)
    pos = torch.randint(0, 128, (T,))
    q = float_rows(T, hq, d, dtype, seed=3)
    k, v = float_rows(T, hk, d, dtype, seed=4), float_rows(T, hk, d, dtype, seed=5)
    slots = _slots(T, nb, bs, seed=7)
    out = {}
    for b in ("torch", "triton"):
        kc, vc, ks, vs = make_fp8_caches(nb, bs, hk, d, mode)
        q_rot = kernels.rotary_write_kv(pos, q, k, v, cs, kc, vc, slots, is_neox, backend=b,
                                        k_scale=ks, v_scale=vs)
        out[b] = (q_rot, (kc, vc, ks, vs))
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=0, atol=0)
    assert_fp8_write_matches(out["triton"][1], out["torch"][1],
                             name=f"triton rotary_write_kv {mode} neox={is_neox} {dtype}")


@triton.jit
def _convert(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(o_ptr + i, e4m3_bits(tl.load(x_ptr + i, mask=m)).to(tl.uint8), mask=m)


def test_triton_e4m3_conversion_matches_torch_on_every_code_and_many_floats():
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    fin = vals[~vals.isnan()].unique()
    mids = (fin[1:] + fin[:-1]) / 2                          # ties: round to even
    near = torch.cat([mids.nextafter(mids + 1), mids.nextafter(mids - 1)])
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(20000, generator=g) * 10.0 ** torch.empty(20000).uniform_(-12, 2.65, generator=g)
    x = torch.cat([fin, mids, near, rand, torch.tensor([0.0, -0.0, 448.0, -448.0, 1e-45])])
    x = x.clamp(-448, 448).contiguous()
    got = torch.empty(x.shape, dtype=torch.uint8)
    _convert[(triton.cdiv(x.numel(), 1024),)](x, got, x.numel(), BLOCK=1024)
    want = x.to(FP8).view(torch.uint8)
    bad = got != want
    assert not bad.any(), f"{int(bad.sum())} of {x.numel()} differ, e.g. {x[bad][:5].tolist()}"
    nan = torch.empty(1, dtype=torch.uint8)
    _convert[(1,)](torch.tensor([float("nan")]), nan, 1, BLOCK=16)
    assert nan.view(FP8).float().isnan().all()


# opcheck's schema test compares mutated tensors with arithmetic that fp8 CPU tensors lack
# ("mul_cpu_reduced_float" not implemented for Float8_e4m3fn, torch 2.11)
_UTILS = ("test_faketensor", "test_aot_dispatch_dynamic")


def test_triton_fp8_custom_ops_opcheck():
    """The custom ops torch.compile sees (schema, fake, mutation of caches and scales)."""
    import kernels.triton_rotary  # noqa: F401  (registers the ops)
    import kernels.triton_write_kv  # noqa: F401
    T, hq, hk, d = 3, 2, 1, 16
    key, value = float_rows(T, hk, d, torch.float16, seed=1), float_rows(T, hk, d, torch.float16)
    slots = torch.tensor([0, -1, 17])
    cs = ref.rope_cos_sin_cache(d, 8)
    for mode in ("per_slot", "per_tensor"):
        kc, vc, ks, vs = make_fp8_caches(2, 16, hk, d, mode)
        tensors = (ks, vs, 1.0, 1.0) if mode == "per_slot" else (None, None, ks, vs)
        torch.library.opcheck(torch.ops.ragged_triton.write_kv_fp8.default,
                              (key, value, kc, vc, slots, *tensors), test_utils=_UTILS)
        if mode == "per_tensor":      # the fused op's scale plumbing is write_kv's
            continue
        q = float_rows(T, hq, d, torch.float16, seed=3)
        torch.library.opcheck(torch.ops.ragged_triton.rotary_write_kv_fp8.default,
                              (torch.tensor([0, 3, 7]), q, key, value, cs, kc, vc, slots, True,
                               *tensors), test_utils=_UTILS)


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,h,d,bs", [(1, 8, 128, 16), (77, 5, 80, 32), (300, 1, 256, 256)])
def test_triton_write_kv_fp8_gpu(T, h, d, bs, dtype, mode):
    nb = -(-T // bs) + 2
    key = float_rows(T, h, d, dtype, seed=1, device="cuda")
    value = float_rows(T, h, d, dtype, seed=2, device="cuda")
    slots = _slots(T, nb, bs, seed=3, device="cuda")
    got = _write("triton", key, value, slots, (nb, bs, h, d), mode, device="cuda")
    want = _write("torch", key, value, slots, (nb, bs, h, d), mode, device="cuda")
    # div_rn and the integer conversion make the GPU codes exact too
    assert_fp8_write_matches(got, want, name=f"gpu triton write_kv {mode} {dtype}")


@pytest.mark.gpu
def test_triton_write_kv_fp8_gpu_int64_addressing():
    # 40000 blocks x 16 x 8 x 128 = 655M codes: slot * Hkv * D overflows int32
    nb, bs, h, d = 40000, 16, 8, 128
    kc = torch.zeros(nb, bs, h, d, dtype=FP8, device="cuda")
    vc = torch.zeros_like(kc)
    ks = torch.zeros(nb, bs, h, device="cuda")
    vs = torch.zeros_like(ks)
    key = float_rows(3, h, d, torch.float16, device="cuda")
    slots = torch.tensor([nb * bs - 1, 0, 35000 * bs + 3], device="cuda")
    kernels.write_kv(key, key, kc, vc, slots, backend="triton", k_scale=ks, v_scale=vs)
    codes, s = ref.quantize_fp8(key)
    flat = kc.view(-1, h, d)
    assert torch.equal(flat[slots].view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(ks.view(-1, h)[slots], s)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_rotary_write_kv_fp8_gpu(dtype, mode):
    T, hq, hk, d, nb, bs = 61, 32, 8, 128, 8, 16
    cs = ref.rope_cos_sin_cache(d, 4096).cuda()
    pos = torch.randint(0, 4096, (T,), device="cuda")
    q = float_rows(T, hq, d, dtype, seed=3, device="cuda")
    k = float_rows(T, hk, d, dtype, seed=4, device="cuda")
    v = float_rows(T, hk, d, dtype, seed=5, device="cuda")
    slots = _slots(T, nb, bs, seed=6, device="cuda")
    res = {}
    for b in ("torch", "triton"):
        kc, vc, ks, vs = make_fp8_caches(nb, bs, hk, d, mode, device="cuda")
        kernels.rotary_write_kv(pos, q, k, v, cs, kc, vc, slots, True, backend=b, k_scale=ks,
                                v_scale=vs)
        res[b] = (kc, vc, ks, vs)
    eps = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert_fp8_write_matches(res["triton"], res["torch"], ulps=1, scale_rtol=eps,
                             name=f"gpu triton rotary_write_kv {mode} {dtype}")


def test_triton_fp8_writes_compile_fullgraph():
    """The public API with fp8 caches traces under torch.compile(fullgraph=True) (the
    dispatcher's FP8_KV_OPS check and the custom ops), both scale modes, same bytes as eager."""
    T, hq, hk, d = 3, 2, 1, 16
    key, value = float_rows(T, hk, d, torch.float16, seed=1), float_rows(T, hk, d, torch.float16)
    q = float_rows(T, hq, d, torch.float16, seed=3)
    slots, pos = torch.tensor([0, -1, 17]), torch.tensor([0, 3, 7])
    cs = ref.rope_cos_sin_cache(d, 8)

    def step(kc, vc, ks, vs):
        kernels.write_kv(key, value, kc, vc, slots, backend="triton", k_scale=ks, v_scale=vs)
        return kernels.rotary_write_kv(pos, q, key, value, cs, kc, vc, slots + 1,
                                       backend="triton", k_scale=ks, v_scale=vs)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for mode in ("per_slot", "per_tensor"):
        got, want = make_fp8_caches(2, 16, hk, d, mode), make_fp8_caches(2, 16, hk, d, mode)
        q_eager = step(*want)           # eager first: imports the backend modules (see _module)
        torch.testing.assert_close(compiled(*got), q_eager, rtol=0, atol=0)
        assert_fp8_write_matches(got, want, name=f"compiled {mode}")
