"""The fp8 (e4m3) KV-cache reference: quantisation against a float64 ground truth, the
write rule (saturation, zero rows, skipped slots, both scale modes), dequantising attention,
and the argument checks of the public API (docs/fp8_kv.md)."""
import pytest
import torch

import kernels
from kernels import reference as ref
from tests.attention_cases import attn_args, make_batch, quantize_cache

FP8 = torch.float8_e4m3fn
CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8)
VALUES = CODES.double()                                   # all 256 codes, exactly, in float64
FINITE = ~VALUES.isnan()


def nearest_e4m3(y: torch.Tensor) -> torch.Tensor:
    """float64 ground truth of round-to-nearest-even e4m3fn, saturating at +-448: the value of
    the finite code nearest to y, ties to the code with an even mantissa (even byte)."""
    y = y.double().clamp(-448.0, 448.0).reshape(-1, 1)
    vals, codes = VALUES[FINITE], torch.arange(256)[FINITE]
    dist = (y - vals[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    tied = dist == best
    # among the (at most two) nearest codes prefer the even byte; +0 over -0 is irrelevant
    pick = torch.where(tied & (codes[None, :] % 2 == 0), 0, 1) + torch.where(tied, 0, 2)
    return vals[pick.argmin(dim=1)]                        # flat; callers reshape


def rows(n=64, h=3, d=40, seed=0):
    """Rows spanning magnitudes (1e-6 .. 1e4), so codes land in the subnormal range too."""
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** torch.empty(n, h, 1, dtype=torch.float64).uniform_(-6, 4, generator=g)
    x = torch.randn(n, h, d, dtype=torch.float64, generator=g) * mag
    x[:, :, :3] *= torch.rand(n, h, 3, dtype=torch.float64, generator=g) * 1e-3   # tiny entries
    return x


def test_torch_e4m3_conversion_is_round_nearest_even_on_every_code_midpoint():
    # the ground truth itself: every code, and every midpoint between neighbours (the ties)
    vals = VALUES[FINITE].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    probe = torch.cat([vals, mids, mids.nextafter(torch.tensor(1e9, dtype=torch.float64)),
                       mids.nextafter(torch.tensor(-1e9, dtype=torch.float64))])
    got = probe.float().clamp(-448, 448).to(FP8).double()
    torch.testing.assert_close(got, nearest_e4m3(probe.float().double()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_quantize_per_slot_against_float64_ground_truth(dtype):
    x = rows().to(dtype)
    codes, s = ref.quantize_fp8(x)
    assert codes.dtype == FP8 and s.dtype == torch.float32 and s.shape == x.shape[:2]
    x64 = x.float().double()                               # the rule starts from x.float()
    amax = x64.abs().amax(-1)
    # fp32 division is correctly rounded, and so is float64 division rounded once to fp32
    assert torch.equal(s, (amax / 448.0).float())
    y = (x.float() / s[..., None]).double()                # the rule's fp32 quotient, exactly
    assert torch.equal(codes.double(), nearest_e4m3(y).reshape(y.shape))
    assert (codes.double().abs().amax(-1) == 448.0).all()  # each row's amax maps to +-448
    # dequantised error: half an e4m3 ulp (2^-4 relative for normals, 2^-10 x scale for
    # subnormals) plus the fp32 rounding of the quotient
    deq = ref.dequantize_fp8(codes, s, torch.float64)
    bound = torch.maximum(x64.abs() * 2.0 ** -4, s.double()[..., None] * 2.0 ** -10) * (1 + 2 ** -20)
    assert ((deq - x64).abs() <= bound).all()


def test_quantize_per_tensor_saturates_at_448_and_zero_rows_get_scale_one():
    x = rows(16, 2, 24).float()
    scale = 0.5
    codes, s = ref.quantize_fp8(x, scale)
    assert torch.equal(s, torch.full((16, 2), 0.5))
    big = (x / scale).abs() > 448
    assert big.any() and not codes.double().isnan().any()
    assert torch.equal(codes.double()[big].abs(), torch.full((int(big.sum()),), 448.0, dtype=torch.float64))
    assert torch.equal(codes.double(), nearest_e4m3((x / scale).double()).reshape(x.shape))
    z = torch.zeros(3, 2, 8)
    z[1, 0, 4] = -3.0
    codes, s = ref.quantize_fp8(z)
    assert torch.equal(s, torch.tensor([[1.0, 1.0], [3.0 / 448.0, 1.0], [1.0, 1.0]]))
    assert codes.double().abs().sum() == 448.0 and codes[1, 0, 4].double() == -448.0


@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
def test_write_kv_quantises_into_pages_and_skips_negative_slots(mode):
    nb, bs, h, d = 5, 16, 2, 24
    kc = torch.full((nb, bs, h, d), 7.0).to(FP8)          # sentinels: untouched slots keep 7
    vc = torch.full((nb, bs, h, d), -7.0).to(FP8)
    per_slot = mode == "per_slot"
    ks = torch.full((nb, bs, h), 3.0) if per_slot else 0.02
    vs = torch.full((nb, bs, h), 5.0) if per_slot else 0.03
    key, val = rows(6, h, d, seed=1).float(), rows(6, h, d, seed=2).half()
    slots = torch.tensor([5, -1, 79, 16, -7, 0])
    ref.write_kv(key, val, kc, vc, slots, ks, vs)
    keep = slots >= 0
    for x, cache, sc in ((key, kc, ks), (val, vc, vs)):
        flat = cache.view(-1, h, d)
        codes, s = ref.quantize_fp8(x[keep], None if per_slot else sc)
        assert torch.equal(flat[slots[keep]].view(torch.uint8), codes.view(torch.uint8))
        untouched = torch.ones(nb * bs, dtype=torch.bool)
        untouched[slots[keep]] = False
        assert (flat[untouched].double().abs() == 7.0).all()
        if per_slot:
            sflat = sc.view(-1, h)
            assert torch.equal(sflat[slots[keep]], s)
            assert (sflat[untouched] == sflat[untouched][0, 0]).all()     # 3.0 or 5.0 kept


def test_rotary_write_kv_quantises_the_rotated_key_in_keys_dtype():
    T, hq, hk, d = 5, 4, 2, 32
    cs = ref.rope_cos_sin_cache(d, 64)
    pos = torch.tensor([0, 3, 9, 63, 1])
    q, k, v = (torch.randn(T, n, d).half() for n in (hq, hk, hk))
    slots = torch.tensor([3, 17, -1, 40, 0])
    kc, vc = torch.zeros(4, 16, hk, d).to(FP8), torch.zeros(4, 16, hk, d).to(FP8)
    ks, vs = torch.zeros(4, 16, hk), torch.zeros(4, 16, hk)
    q_rot = ref.rotary_write_kv(pos, q, k, v, cs, kc, vc, slots, True, ks, vs)
    qr, kr = ref.rotary_embedding(pos, q, k, cs)
    kc2, vc2, ks2, vs2 = (torch.zeros_like(t) for t in (kc, vc, ks, vs))
    ref.write_kv(kr, v, kc2, vc2, slots, ks2, vs2)
    assert torch.equal(q_rot, qr)
    for a, b in ((kc, kc2), (vc, vc2)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert torch.equal(ks, ks2) and torch.equal(vs, vs2) and (ks.view(-1, hk)[17] > 0).all()


@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
def test_paged_attention_dequantises_the_gathered_pages(mode):
    b = make_batch([1, 7, 3], [33, 7, 50], num_q_heads=6, num_kv_heads=2, head_dim=16,
                   block_size=16, dtype=torch.float64)
    b8 = quantize_cache(b, mode)
    ks, vs = b8["k_scale"], b8["v_scale"]
    deq_k = ref.dequantize_fp8(b8["k_cache"], ks, torch.float64)
    deq_v = ref.dequantize_fp8(b8["v_cache"], vs, torch.float64)
    got = ref.paged_attention(*attn_args(b8), k_scale=ks, v_scale=vs, sliding_window=9)
    want = ref.paged_attention(b["q"], deq_k, deq_v, *attn_args(b)[3:], sliding_window=9)
    assert torch.equal(got, want)
    # the dequantised cache is close to the float one (the fp8 error, not a kernel error)
    assert (deq_k - b["k_cache"]).abs().max() < 0.07 * b["k_cache"].abs().max()
    # and the public op (torch backend) takes the fp8 cache with fp16 and fp32 queries
    for dt in (torch.float16, torch.float32):
        out = kernels.paged_attention(b["q"].to(dt), b8["k_cache"], b8["v_cache"],
                                      *attn_args(b)[3:], k_scale=ks, v_scale=vs,
                                      sliding_window=9, backend="torch")
        assert out.dtype == dt
        assert (out.double() - got).abs().max() < 1e-2


def _fp8_write_args(h=2, d=8):
    kc = torch.zeros(3, 16, h, d).to(FP8)
    return dict(key=torch.randn(4, h, d), value=torch.randn(4, h, d), k_cache=kc,
                v_cache=kc.clone(), slot_mapping=torch.tensor([0, 1, -1, 5]),
                k_scale=torch.zeros(3, 16, h), v_scale=torch.zeros(3, 16, h))


@pytest.mark.parametrize("change,name", [
    (dict(k_scale=None), "k_scale"),
    (dict(v_scale=None), "v_scale"),
    (dict(k_scale=torch.zeros(3, 16, 2, dtype=torch.float16)), "k_scale"),
    (dict(v_scale=torch.zeros(3, 16, 3)), "v_scale"),
    (dict(k_scale=torch.zeros(3, 2, 16).transpose(1, 2)), "k_scale"),
    (dict(k_scale=0.0), "k_scale"),
    (dict(v_scale=float("inf")), "v_scale"),
    (dict(v_scale=0.5), "v_scale"),                                  # modes mixed
    (dict(v_cache=torch.zeros(3, 16, 2, 8)), "v_cache"),             # fp8 k, float v
    (dict(k_cache=torch.zeros(3, 16, 2, 8), v_cache=torch.zeros(3, 16, 2, 8)), "k_scale"),
])
def test_fp8_argument_errors_name_the_argument(change, name):
    args = dict(_fp8_write_args(), **change)
    with pytest.raises(ValueError, match=f"^{name}:"):
        kernels.write_kv(**args, backend="torch")


def test_attention_and_rotary_fp8_argument_errors():
    b = quantize_cache(make_batch([1], [20], num_q_heads=2, num_kv_heads=1, head_dim=8,
                                  dtype=torch.float32))
    with pytest.raises(ValueError, match="^v_scale:"):
        kernels.paged_attention(*attn_args(b), k_scale=b["k_scale"], backend="torch")
    with pytest.raises(ValueError, match="^k_scale:"):
        kernels.paged_attention(*attn_args(b), k_scale=b["k_scale"][:1], v_scale=b["v_scale"],
                                backend="torch")
    a = _fp8_write_args()
    cs = ref.rope_cos_sin_cache(8, 16)
    with pytest.raises(ValueError, match="^k_scale:"):
        kernels.rotary_write_kv(torch.arange(4), torch.randn(4, 2, 8), a["key"], a["value"], cs,
                                a["k_cache"], a["v_cache"], a["slot_mapping"], backend="torch",
                                v_scale=a["v_scale"])


def test_backend_without_fp8_support_raises_naming_k_cache(monkeypatch):
    monkeypatch.setattr(ref, "FP8_KV_OPS", ("paged_attention",))
    with pytest.raises(ValueError, match="^k_cache: fp8.*not supported by backend 'torch'"):
        kernels.write_kv(**_fp8_write_args(), backend="torch")
    # non-fp8 caches never look at the list (the dispatcher passes no scale arguments)
    a = _fp8_write_args()
    kernels.write_kv(a["key"], a["value"], torch.zeros(3, 16, 2, 8), torch.zeros(3, 16, 2, 8),
                     a["slot_mapping"], backend="torch")
