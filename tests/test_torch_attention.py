"""kernels/torch_attention.py (the "torch" backend's batched attention) against the float64
reference, both of its paths (SDPA, and the explicit matmul used for softcap), on awkward
shapes: decodes beside prefill chunks, GQA groups 5 and 7, head dims 24/80, block sizes 4
and 16, windows, softcap, empty sequences, rows that see no key, an fp8 cache."""
import pytest
import torch

import kernels
from kernels import reference, torch_attention
from tests.attention_cases import attn_args, cast, check_paged_attention, make_batch
from tests.tolerance import assert_close

# (q_lens, kv_lens, hq, hkv, d, bs): mixed decode + prefill (and chunks with context), empty
# sequences in the middle, one sequence alone, decodes only at different lengths.
CASES = [
    ((1, 17, 1, 0, 5, 1), (40, 17, 1, 0, 97, 33), 10, 2, 24, 4),     # GQA 5, bs 4
    ((3, 1, 1, 64, 0), (3, 130, 16, 100, 7), 7, 1, 80, 16),          # GQA 7, D 80
    ((1, 1, 1, 1), (1, 16, 17, 250), 4, 4, 32, 16),                  # decode only, MHA
    ((33,), (33,), 6, 2, 16, 16),                                    # one prefill, no decode
]


@pytest.fixture(params=["sdpa", "matmul"])
def path(request, monkeypatch):
    monkeypatch.setattr(torch_attention, "_USE_SDPA", request.param == "sdpa")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(path, case, dtype):
    q_lens, kv_lens, hq, hkv, d, bs = CASES[case]
    check_paged_attention("torch", q_lens, kv_lens, hq=hq, hkv=hkv, d=d, bs=bs, dtype=dtype,
                          name=f"{path} case {case} {dtype}")


@pytest.mark.parametrize("window,softcap", [(1, None), (8, None), (None, 5.0), (20, 2.0)])
def test_window_and_softcap(path, window, softcap):
    # softcap always takes the matmul path (SDPA cannot cap logits): both fixtures still run
    check_paged_attention("torch", (1, 23, 1, 0), (60, 40, 9, 0), hq=10, hkv=2, d=24, bs=4,
                          dtype=torch.float32, window=window, softcap=softcap,
                          name=f"{path} window={window} softcap={softcap}")


def test_float64_equals_reference(path):
    b = make_batch((1, 9, 0, 1), (50, 30, 0, 3), num_q_heads=7, num_kv_heads=1, head_dim=40,
                   block_size=4, dtype=torch.float64)
    got = kernels.paged_attention(*attn_args(b), sliding_window=12, backend="torch")
    want = reference.paged_attention(*attn_args(b), sliding_window=12)
    err = (got - want).abs().max().item()
    print(path, "float64 max err", err)
    assert got.dtype == torch.float64 and err < 1e-12


def test_rows_without_keys_and_tokens_outside_sequences_are_zero(path):
    """q_len > kv_len (ctx < 0: the first rows see no key), kv_len 0 with q_len > 0, and a
    token past cu_seqlens_q[-1]: all zeros, never NaN, exactly as the reference."""
    g = torch.Generator().manual_seed(1)
    kc, vc = (torch.randn(6, 4, 2, 16, generator=g) for _ in range(2))
    q = torch.randn(8, 4, 16, generator=g)
    table = torch.tensor([[3, 1], [0, 2], [5, 4]], dtype=torch.int32)
    cu = torch.tensor([0, 3, 5, 7], dtype=torch.int32)
    lens = torch.tensor([2, 0, 5], dtype=torch.int32)
    got = torch_attention.paged_attention(q, kc, vc, table, cu, lens, scale=0.3)
    want = reference.paged_attention(q, kc, vc, table, cu, lens, scale=0.3)
    assert not torch.isnan(got).any()
    assert (got[0] == 0).all() and (got[3:5] == 0).all() and (got[7] == 0).all()
    assert got[1:3].abs().sum() > 0
    assert_close(got, want.double(), want, name=f"{path} no-key rows")


def test_public_torch_backend_is_the_batched_path_and_fills_out(monkeypatch):
    calls = []
    real = torch_attention.paged_attention
    monkeypatch.setattr(torch_attention, "paged_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    b = cast(make_batch((1, 5), (9, 5), num_q_heads=4, num_kv_heads=2, head_dim=16,
                        dtype=torch.float64), torch.float32)
    out = torch.full_like(b["q"], float("nan"))
    res = kernels.paged_attention(*attn_args(b), out=out, backend="torch")
    assert calls == [1] and res is out
    want = reference.paged_attention(*attn_args(b))
    assert_close(out, want.double(), want, name="out=")


FP8 = getattr(torch, "float8_e4m3fn", None)


@pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")
@pytest.mark.parametrize("per_slot", [True, False])
def test_fp8_cache_dequantised_like_the_interface(path, per_slot):
    """/work FP8 interface: value = code.float() * scale (per slot [num_blocks, bs, Hkv] or a
    float). The ground truth is the float64 reference on the dequantised caches."""
    b = make_batch((1, 7, 1), (30, 7, 12), num_q_heads=6, num_kv_heads=2, head_dim=16,
                   block_size=4, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    shape = b["k_cache"].shape[:3]
    if per_slot:
        ks, vs = (torch.rand(shape, generator=g, dtype=torch.float32) + 0.01 for _ in range(2))
    else:
        ks, vs = 0.02, 0.5
    k8, v8 = (c.float().clamp(-448, 448).to(FP8) for c in (b["k_cache"] * 50, b["v_cache"] * 50))
    deq = {"k_cache": k8.double() * (ks.double()[..., None] if per_slot else ks),
           "v_cache": v8.double() * (vs.double()[..., None] if per_slot else vs)}
    want = reference.paged_attention(*attn_args(b | deq))
    q = b["q"].float()
    got = torch_attention.paged_attention(q, k8, v8, *attn_args(b)[3:], k_scale=ks, v_scale=vs)
    lowp = reference.paged_attention(*attn_args(cast(b | deq, torch.float32)))
    assert_close(got, want, lowp, name=f"{path} fp8 per_slot={per_slot}")


def test_reused_gather_buffers_never_alias_a_result(path):
    """The gathers reuse module-level buffers: a result must not change when the next call
    (smaller, then larger) overwrites them, and the big-buffer cutoff gives the same numbers."""
    a = cast(make_batch((1, 6, 1), (40, 6, 90), num_q_heads=4, num_kv_heads=2, head_dim=16,
                        block_size=4, dtype=torch.float64), torch.float32)
    b = cast(make_batch((1, 1), (3, 200), num_q_heads=4, num_kv_heads=2, head_dim=16,
                        block_size=4, dtype=torch.float64), torch.float32)
    first = kernels.paged_attention(*attn_args(a), backend="torch")
    kept = first.clone()
    kernels.paged_attention(*attn_args(b), backend="torch")
    kernels.paged_attention(*attn_args(a), backend="torch")
    assert torch.equal(first, kept)
    old = torch_attention._WORKSPACE_MAX_BYTES
    try:
        torch_attention._WORKSPACE_MAX_BYTES = 0          # every gather allocates afresh
        assert torch.equal(kernels.paged_attention(*attn_args(a), backend="torch"), kept)
    finally:
        torch_attention._WORKSPACE_MAX_BYTES = old


def test_gather_buffers_survive_inference_mode_switches():
    """The engine runs under torch.inference_mode; tests and users call outside it: a buffer
    made in one mode must never be written in the other (RuntimeError: inplace update to an
    inference tensor)."""
    b = cast(make_batch((1, 3), (20, 3), num_q_heads=4, num_kv_heads=2, head_dim=16,
                        block_size=4, dtype=torch.float64), torch.float32)
    torch_attention._WORKSPACE.clear()
    with torch.inference_mode():
        inside = kernels.paged_attention(*attn_args(b), backend="torch")
    outside = kernels.paged_attention(*attn_args(b), backend="torch")
    with torch.inference_mode():
        again = kernels.paged_attention(*attn_args(b), backend="torch")
    assert torch.equal(inside, outside) and torch.equal(outside, again)
