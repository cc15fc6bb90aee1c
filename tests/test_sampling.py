"""SamplingParams validation and the batched sampler: greedy, temperature, top-k, top-p against
a per-row reference, the sampled distribution, and seeded rows that do not depend on the batch."""
import pytest
import torch

from ragged.sampling import Sampler, SamplingParams, apply_top_k_top_p


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 2.0), ("temperature", -0.1), ("temperature", float("nan")),
    ("temperature", "hot"), ("top_k", -1), ("top_k", 1.5), ("top_p", 0.0), ("top_p", 1.01),
    ("seed", -3), ("seed", 1.0), ("stop_token_ids", 5), ("stop_token_ids", (1, -2)),
    ("ignore_eos", 1),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_valid_params():
    p = SamplingParams(max_tokens=3, temperature=0, top_k=5, top_p=0.5, seed=7, stop_token_ids=[4, 5])
    assert p.greedy and p.stop_token_ids == (4, 5)


def reference_filter(logits, k, p):
    """Row by row, the textbook way: keep the top k, then the smallest prefix of mass >= p."""
    out = torch.full_like(logits, float("-inf"))
    for r in range(logits.shape[0]):
        vals, idx = logits[r].sort(descending=True)
        keep = len(vals) if k[r] == 0 else min(int(k[r]), len(vals))
        probs = vals[:keep].softmax(-1)
        if p[r] < 1:
            cum, n = 0.0, 0
            while n < keep and cum < p[r]:
                cum += float(probs[n])
                n += 1
            keep = n
        out[r, idx[:keep]] = logits[r, idx[:keep]]
    return out


def test_top_k_top_p_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 97, generator=g) * 3
    k = torch.tensor([0, 1, 5, 0, 96, 200, 3])
    p = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.9, 0.05, 0.999])
    got = apply_top_k_top_p(logits, k, p)
    ref = reference_filter(logits, k, p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.equal(got[~torch.isinf(got)], ref[~torch.isinf(ref)])


def test_greedy_and_degenerate_filters_are_argmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=1),
              SamplingParams(temperature=2.0, top_p=1e-6), SamplingParams(temperature=0, top_k=3),
              SamplingParams(temperature=0, seed=3), SamplingParams(temperature=1.0, top_k=1, seed=9)]
    tok = Sampler("cpu", seed=0)(logits, params, [0] * 6)
    assert tok.tolist() == logits.argmax(-1).tolist()


def test_distribution_follows_softmax_of_filtered_logits():
    """10k draws from one row: frequencies within 5 sigma of the filtered softmax, and no
    token outside top-k."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 10_000
    params = SamplingParams(temperature=0.8, top_k=4)
    tok = Sampler("cpu", seed=123)(logits.repeat(n, 1), [params] * n, list(range(n)))
    freq = torch.bincount(tok, minlength=6).double() / n
    want = torch.zeros(6, dtype=torch.float64)
    want[:4] = (logits[:4].double() / 0.8).softmax(-1)
    sigma = (want * (1 - want) / n).sqrt()
    print("freq", freq.tolist(), "want", want.tolist())
    assert freq[4:].sum() == 0
    assert ((freq - want).abs() <= 5 * sigma + 1e-12).all()


def test_seeded_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(2)
    row = torch.randn(1, 300, generator=g)
    others = torch.randn(5, 300, generator=g)
    seeded = SamplingParams(temperature=1.0, seed=42)
    plain = SamplingParams(temperature=1.0)
    alone = [Sampler("cpu", seed=s)(row, [seeded], [i]).item() for s, i in ((0, 0), (1, 1), (2, 2))]
    batched = []
    for i in range(3):
        batch = torch.cat([others[:i + 1], row, others[i + 1:]])
        params = [plain] * (i + 1) + [seeded] + [plain] * (4 - i)
        batched.append(Sampler("cpu", seed=100 + i)(batch, params, [7] * (i + 1) + [i] + [7] * (4 - i))[i + 1].item())
    assert alone == batched
    # Different token indices draw different noise (a flat row makes it visible).
    flat = torch.zeros(1, 1000)
    draws = {Sampler("cpu")(flat, [seeded], [i]).item() for i in range(20)}
    assert len(draws) > 10


def test_unseeded_rows_follow_the_engine_seed():
    logits = torch.zeros(4, 1000)
    p = [SamplingParams(temperature=1.0)] * 4
    a = Sampler("cpu", seed=5)(logits, p, [0] * 4)
    b = Sampler("cpu", seed=5)(logits, p, [0] * 4)
    c = Sampler("cpu", seed=6)(logits, p, [0] * 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
