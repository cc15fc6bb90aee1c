"""Shared checks of fp8 KV-cache writes (Triton, CUDA, CPU emulator) against the reference."""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn


def e4m3_ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in e4m3 steps between two code tensors (+0 and -0 are the same point);
    NaN codes (0x7F/0xFF) count as far from everything."""
    def ordered(x):
        u = x.view(torch.uint8).to(torch.int32)
        mag = u & 0x7F
        return torch.where(u >= 128, -mag, mag), mag == 0x7F
    oa, na = ordered(a)
    ob, nb = ordered(b)
    d = (oa - ob).abs()
    return torch.where(na | nb, torch.full_like(d, 1 << 20), d)


def float_rows(T, h, d, dtype, seed=0, device="cpu"):
    """Rows over many magnitudes (1e-3 .. 1e3 per row, some tiny entries, one zero row and one
    row with a single nonzero): subnormal codes, saturation and the amax == 0 rule all occur."""
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** torch.empty(T, h, 1).uniform_(-3, 3, generator=g)
    x = torch.randn(T, h, d, generator=g) * mag
    x[..., : min(3, d)] *= 1e-3
    if T > 1:
        x[1, 0] = 0.0
        x[-1, -1] = 0.0
        x[-1, -1, d // 2] = -2.5
    return x.to(dtype).to(device)


def make_fp8_caches(nb, bs, h, d, mode, device="cpu"):
    """Sentinel-filled fp8 caches (code 0x38 = 1.0) and scales (-1.0), so writes to skipped
    slots show up; per-tensor mode returns the floats (1/64, 1/32): rows above 448/64 = 7
    saturate."""
    kc = torch.full((nb, bs, h, d), 1.0, device=device).to(FP8)
    vc = kc.clone()
    if mode == "per_slot":
        return kc, vc, torch.full((nb, bs, h), -1.0, device=device), torch.full(
            (nb, bs, h), -1.0, device=device)
    return kc, vc, 1.0 / 64, 1.0 / 32


def assert_fp8_write_matches(got, want, *, ulps=0, scale_rtol=0.0, name=""):
    """got/want: (k_cache, v_cache, k_scale, v_scale) after the kernel / the reference write.
    Codes within ``ulps`` e4m3 steps (0: identical bytes), scales within ``scale_rtol``."""
    for which, a, b in (("k_cache", got[0], want[0]), ("v_cache", got[1], want[1])):
        dist = e4m3_ulp_distance(a.cpu(), b.cpu())
        print(f"{name} {which}: {int((dist > 0).sum())} codes differ, max {int(dist.max())} ulp")
        assert int(dist.max()) <= ulps, f"{name} {which}: codes differ by {int(dist.max())} ulp"
    for which, a, b in (("k_scale", got[2], want[2]), ("v_scale", got[3], want[3])):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=scale_rtol, atol=0,
                                       msg=lambda m: f"{name} {which}: {m}")
