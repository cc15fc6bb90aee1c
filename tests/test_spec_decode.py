"""Speculative decoding (ragged/spec_decode) on CPU: greedy outputs with speculation (ngram and
draft model, k 1..8) equal outputs without it, token for token, for every model family, under
chunked prefill, preemption, prefix caching, the padded CUDA-graph path and async scheduling;
stops and max_tokens inside an accepted run; the rejection sampler's output distribution is
the target's (chi-square); seeded ngram sampling gives plain decoding's tokens; KV rollback
leaks no block (hypothesis workloads with the checking model of test_scheduler); bad configs
raise ValueError."""
import bisect
import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from model import PRESETS, load_model
from ragged import LLM, Engine, EngineConfig, SamplingParams, SpeculativeConfig
from ragged.batch import BatchBuilder
from ragged.block_manager import BlockManager
from ragged.sampling import Sampler
from ragged.sequence import Sequence
from ragged.spec_decode.ngram import ngram_propose
from ragged.spec_decode.rejection import verify
from tests.hf_models import FAMILIES, make_hf_model
from tests.test_scheduler import V, CheckingModel, expected, rule


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()        # tiny models: threads only spin (see test_engine.py)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_spec")
    return {f: make_hf_model(f, root / f, seed=3) for f in FAMILIES}


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", seed=0)


def spanned_prompts(seed=0, lens=(13, 40, 1, 27, 58)):
    """Prompts that repeat spans (something for ngram to find) and one that is a single token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lens:
        span = torch.randint(3, 259, (max(1, n // 3),), generator=g).tolist()
        noise = torch.randint(3, 259, (n,), generator=g).tolist()
        p = (span + noise[:2] + span + noise[2:4] + span)[:n]
        out.append(p)
    return out


def gen(model, ps, params, **kw):
    if isinstance(model, str):
        kw.setdefault("device", "cpu")     # CPU tests stay on CPU on a GPU machine too
    llm = LLM(model, **kw)
    outs = llm.generate(ps, params, use_tqdm=False)
    return llm, [o.token_ids for o in outs]


def assert_all_free(llm):
    eng = llm.engine
    for bm in [eng.block_manager] + ([eng.spec.proposer.bm] if hasattr(
            getattr(eng.spec, "proposer", None), "bm") else []):
        assert bm.num_free_blocks == bm.num_blocks
        bm.check()
    assert not eng.has_unfinished_requests()


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

# Conditions of the engine (each also changes the batch mix the verifications share).
# max_num_seqs <= the budget (one decode per running sequence must fit a step).
CONDITIONS = {
    "chunked": dict(max_num_batched_tokens=16, max_num_seqs=8),
    "preemption": dict(block_size=4, num_blocks=20, max_num_batched_tokens=32, max_num_seqs=8),
    "prefix_caching": dict(max_num_batched_tokens=24, max_num_seqs=8, enable_prefix_caching=True),
    "cuda_graphs": dict(max_num_batched_tokens=64, max_num_seqs=6, cuda_graphs=True),
    "async": dict(block_size=4, num_blocks=24, max_num_batched_tokens=16, max_num_seqs=8,
                  async_scheduling=True, cuda_graphs=True),
}


def spec(method, k, draft=None, **kw):
    return SpeculativeConfig(method=method, num_speculative_tokens=k,
                             draft_model=draft if method == "draft" else None, **kw)


# ------------------------------------------------------------------ greedy equality
# Every family x both methods, each combination under a different engine condition and k.
FAMILY_CASES = [(f, m, cond, k) for i, f in enumerate(FAMILIES) for j, m in
                enumerate(("ngram", "draft"))
                for cond, k in [(list(CONDITIONS)[(i + 2 * j) % 5], 1 + (3 * i + 5 * j) % 8)]]


@pytest.mark.parametrize("family,method,cond,k", FAMILY_CASES)
def test_greedy_equal_without_speculation_every_family(model_dirs, tiny, family, method, cond, k):
    """The draft is the family's own checkpoint (loaded from its directory: every draft
    accepted, long accepted runs through the family's attention, e.g. Mistral's sliding
    window) for llama, mistral, qwen3, and the `tiny` preset (another architecture, same
    259-token vocabulary: drafts mostly rejected) for llama3 and qwen2."""
    path = model_dirs[family]
    self_draft = method == "draft" and FAMILIES.index(family) % 2 == 0
    ps = spanned_prompts(seed=len(family))
    kw = CONDITIONS[cond]
    if cond == "prefix_caching":
        ps = ps + [ps[1][:30] + [7, 8, 9], ps[1][:33]]       # prefix-cache hits on ps[1]
    _, want = gen(path, ps, GREEDY, **kw)
    llm, got = gen(path, ps, GREEDY, speculative=spec(method, k, path if self_draft else tiny),
                   **kw)
    st_ = llm.engine.stats
    print(family, method, cond, k, "verifications", st_.num_spec_verifications, "drafts",
          st_.num_draft_tokens, "accepted", st_.num_accepted_tokens, "steps", st_.num_steps,
          "preemptions", st_.num_preemptions, "prefix hits", st_.prefix_hit_tokens)
    assert got == want
    assert st_.num_spec_verifications > 0
    if self_draft:
        assert st_.num_accepted_tokens == st_.num_draft_tokens > 0
    if cond == "preemption":
        assert st_.num_preemptions > 0
    if cond == "prefix_caching":
        assert st_.prefix_hit_tokens > 0
    if cond in ("cuda_graphs", "async"):
        log = llm.engine.step_log
        assert all(s.graph_batch == 0 for s in log if s.num_spec_tokens)   # verify: eager
    assert_all_free(llm)


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("cond", list(CONDITIONS))
def test_greedy_equal_tiny_every_condition(tiny, method, cond):
    """Both methods under every condition on the tiny preset; the draft is the target itself
    (every draft accepted: long runs, stops and length limits inside them)."""
    ps = spanned_prompts(seed=9)
    params = [dataclasses.replace(GREEDY, max_tokens=n) for n in (1, 2, 9, 12, 20)]
    kw = CONDITIONS[cond]
    _, want = gen(tiny, ps, params, **kw)
    k = {"chunked": 8, "preemption": 3, "prefix_caching": 5, "cuda_graphs": 2, "async": 4}[cond]
    llm, got = gen(tiny, ps, params, speculative=spec(method, k, tiny), **kw)
    assert got == want
    s = llm.engine.stats
    assert s.num_accepted_tokens > 0
    if method == "draft":                 # the target as its own draft: all accepted
        assert s.num_accepted_tokens == s.num_draft_tokens
    assert_all_free(llm)


def test_stop_token_and_max_tokens_inside_an_accepted_run(tiny):
    """A self-draft proposes runs of k=8 that are all accepted; a stop token or max_tokens
    falling inside a run must cut the output exactly where plain decoding stops."""
    ps = spanned_prompts(seed=3, lens=(20, 31))
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    _, full = gen(tiny, ps, free)
    sp = spec("draft", 8, tiny)
    for cut in (1, 3, 6, 10):
        stop = full[0][cut]
        if stop in full[0][:cut]:
            continue
        params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                 stop_token_ids=[stop]),
                  SamplingParams(temperature=0.0, max_tokens=cut + 2, ignore_eos=True)]
        llm = LLM(tiny, speculative=sp)
        outs = llm.generate(ps, params, use_tqdm=False)
        assert outs[0].token_ids == full[0][:cut + 1] and outs[0].finish_reason == "stop"
        assert outs[1].token_ids == full[1][:cut + 2] and outs[1].finish_reason == "length"
        assert_all_free(llm)
    # max_model_len reached inside a run (with max_tokens that exactly fit it): proposals
    # never run past it.
    llm = LLM(tiny, max_model_len=27, speculative=sp)
    out = llm.generate(ps[:1], dataclasses.replace(free, max_tokens=7), use_tqdm=False)[0]
    assert out.token_ids == full[0][:7] and out.finish_reason == "length"
    assert_all_free(llm)


@pytest.mark.interpreter      # Triton on CPU tensors (a TRITON_INTERPRET=1 child on GPU machines)
def test_triton_backend_verifies_in_the_mixed_batch():
    """The Triton kernels (interpreter) see verification queries (q_len 1 + k) next to
    prefill chunks and decodes in one launch."""
    m = load_model("tiny", seed=0, backend="triton")
    ref = load_model("tiny", seed=0, backend="torch")         # same weights, reference kernels
    ps = spanned_prompts(seed=4, lens=(3, 14))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    _, want = gen(ref, ps, params, max_num_batched_tokens=8, max_num_seqs=4)
    llm, got = gen(m, ps, params, max_num_batched_tokens=8, max_num_seqs=4,
                   speculative=spec("ngram", 3))
    log = llm.engine.step_log
    mixed = [s for s in log if s.num_spec_tokens and s.num_prefill_tokens]
    print("verification steps", sum(1 for s in log if s.num_spec_tokens), "mixed with prefill",
          len(mixed))
    assert got == want and mixed
    assert_all_free(llm)


# ------------------------------------------------------------------ sampling
def test_seeded_ngram_sampling_equals_plain_decoding(tiny):
    """ngram drafts are a point mass and each row is drawn with plain decoding's noise for
    (seed, token index): seeded requests get plain decoding's exact tokens."""
    ps = spanned_prompts(seed=6)
    params = [SamplingParams(temperature=0.4, top_k=20, seed=11 + i, max_tokens=16,
                             ignore_eos=True) for i in range(len(ps))]
    _, want = gen(tiny, ps, params)
    llm, got = gen(tiny, ps, params, speculative=spec("ngram", 4))
    assert llm.engine.stats.num_accepted_tokens > 0
    assert got == want


def test_seeded_draft_sampling_reproducible(tiny):
    """Draft-model sampling: the draft's and the verifier's draws are seeded per (seed, token
    index), so a seeded request repeats its tokens, alone or in another batch."""
    ps = spanned_prompts(seed=7)
    params = [SamplingParams(temperature=0.8, seed=3 + i, max_tokens=10, ignore_eos=True)
              for i in range(len(ps))]
    draft = load_model("tiny", seed=1)
    sp = spec("draft", 3, draft)
    _, a = gen(tiny, ps, params, speculative=sp)
    llm, b = gen(tiny, ps, params, speculative=sp)
    _, alone = gen(tiny, ps[1:2], params[1:2], speculative=sp)
    assert a == b and alone[0] == a[1]
    assert llm.engine.stats.num_draft_tokens > 0


def test_engine_warms_up_the_draft_model_too(monkeypatch):
    """The draft's attention variants compile at start-up like the target's (queries up to
    1 + k: the catch-up after k accepted drafts), and both count in warmup_launches."""
    calls = []

    def fake(self, block_size, max_query_len=1, **kw):
        calls.append((self, block_size, max_query_len))
        return 5
    target, draft = load_model("tiny", seed=0), load_model("tiny", seed=1)
    monkeypatch.setattr(type(target), "warmup_kernels", fake)
    llm = LLM(target, device="cpu", block_size=16, speculative=spec("draft", 3, draft))
    assert [(m is target, m is draft, b, q) for m, b, q in calls] == [
        (False, True, 16, 4), (True, False, 16, 4)]
    assert llm.engine.warmup_launches == 10


def test_self_draft_sampling_accepts_almost_everything(tiny):
    """The target as its own draft under temperature / top-k / top-p: q equals p up to float
    noise at every position, so min(1, p/q) ~ 1. A q row misaligned by one position, or
    processed with other sampling parameters than the target's, drops this far below."""
    ps = spanned_prompts(seed=5)
    params = [SamplingParams(temperature=0.9, top_k=30, top_p=0.95, seed=i, max_tokens=12,
                             ignore_eos=True) for i in range(len(ps))]
    llm, _ = gen(tiny, ps, params, max_num_batched_tokens=32, max_num_seqs=8,
                 speculative=spec("draft", 4, tiny))
    s = llm.engine.stats
    print("accepted", s.num_accepted_tokens, "of", s.num_draft_tokens)
    assert s.num_draft_tokens > 20 and s.num_accepted_tokens >= 0.95 * s.num_draft_tokens
    assert_all_free(llm)


def chi_square(counts, probs):
    n = counts.sum()
    return float(((counts - n * probs) ** 2 / (n * probs)).sum())


# chi-square 0.999 quantile, 5 degrees of freedom (V = 6): a correct sampler fails 1 in 1000.
CHI2_5_999 = 20.515


@pytest.mark.parametrize("point_mass", [False, True])
def test_rejection_sampler_output_distribution_is_the_target(point_mass):
    """k=2 drafts per row drawn from q (a point mass for ngram); the first emitted token and,
    given the first draft accepted, the second must be distributed as the target p."""
    Vs, N = 6, 12000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, Vs, generator=g) * 1.5      # target rows 0, 1, 2 (bonus)
    p = logits.softmax(-1)
    q = (torch.randn(2, Vs, generator=g) * 1.5).softmax(-1)
    if point_mass:
        d = torch.randint(Vs, (N, 2), generator=g)     # any draft: each row's q is a point mass
        qs = [None] * N
    else:
        d = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g)
                         for j in range(2)], 1)
        qs = [q] * N
    sampler = Sampler("cpu", seed=1)
    params = [SamplingParams(temperature=1.0)] * N
    runs = verify(sampler, logits.repeat(N, 1), d.tolist(), qs, params, [0] * N)
    first = np.bincount([r[0] for r in runs], minlength=Vs)
    stat = chi_square(first, p[0].double().numpy())
    # Second token, among runs whose first draft was accepted: distributed as p[1].
    # (r[0] == d_1 only when d_1 was accepted: a redraw never returns it, p - q <= 0 there)
    second = np.bincount([r[1] for r, dr in zip(runs, d.tolist()) if r[0] == dr[0]],
                         minlength=Vs)
    stat2 = chi_square(second, p[1].double().numpy())
    accepted = np.mean([len(r) - 1 for r in runs])
    print("chi2 first", stat, "second", stat2, "n second", second.sum(), "mean accepted", accepted)
    assert stat < CHI2_5_999 and stat2 < CHI2_5_999
    assert all(1 <= len(r) <= 3 for r in runs)


def test_rejection_sampler_greedy_rule():
    logits = torch.full((7, 5), -1.0)
    for r, t in enumerate([3, 1, 4, 0, 2, 2, 1]):
        logits[r, t] = 1.0
    g = SamplingParams(temperature=0.0)
    # seq 0: drafts 3,1,0 vs argmax 3,1,4,0 -> accept 2, then 4; seq 1: no drafts; seq 2: 2
    runs = verify(Sampler("cpu"), logits, [[3, 1, 0], [], [2]], [None] * 3, [g] * 3, [0, 0, 0])
    assert runs == [[3, 1, 4], [2], [2, 1]]


# ------------------------------------------------------------------ ngram proposer
def test_ngram_propose():
    a = np.array
    assert ngram_propose(a([5, 1, 2, 9, 1, 2]), 4, 1, 2) == [9, 1, 2, 9]   # overlapping copy
    assert ngram_propose(a([7, 7, 7]), 5, 1, 4) == [7] * 5
    assert ngram_propose(a([1, 2, 3, 4]), 3, 1, 4) == []
    # longest n first: [2, 3] recurs at 1 (-> 8) while [3] alone last occurred at 5 (-> 6)
    assert ngram_propose(a([0, 2, 3, 8, 9, 3, 6, 2, 3]), 1, 1, 2) == [8]
    assert ngram_propose(a([0, 2, 3, 8, 9, 3, 6, 2, 3]), 1, 1, 1) == [6]
    assert ngram_propose(a([4]), 3, 1, 3) == []

    def naive(tokens, k, n_min, n_max):           # the definition, by brute force
        L = len(tokens)
        for n in range(min(n_max, L - 1), n_min - 1, -1):
            hits = [i for i in range(L - n) if tokens[i:i + n] == tokens[L - n:]]
            if hits:
                out = []
                for j in range(k):
                    src = hits[-1] + n + j
                    out.append(tokens[src] if src < L else out[src - L])
                return out
        return []
    rng = np.random.default_rng(0)
    for _ in range(300):
        t = rng.integers(0, 3, size=int(rng.integers(1, 30))).tolist()
        k, lo = int(rng.integers(1, 6)), int(rng.integers(1, 3))
        hi = lo + int(rng.integers(0, 3))
        assert ngram_propose(np.array(t), k, lo, hi) == naive(t, k, lo, hi), (t, k, lo, hi)


# ------------------------------------------------------------------ block manager rollback
def test_block_manager_truncate():
    bm = BlockManager(8, 4)
    s = Sequence("a", list(range(6)), SamplingParams(), 0, 0.0, 0)
    assert bm.ensure_slots(s, 6 + 5)                 # 11 slots: 3 blocks
    s.num_computed_tokens = 6
    bm.commit(s)
    assert len(s.block_table) == 3 and len(s.block_hashes) == 1
    bm.truncate(s)                                   # 6 computed: 2 blocks stay
    assert len(s.block_table) == 2 and bm.num_free_blocks == 6
    bm.check()
    s.num_computed_tokens = 4
    bm.truncate(s)
    assert len(s.block_table) == 1 and bm.num_free_blocks == 7
    bm.free(s)
    assert bm.num_free_blocks == 8
    bm.check()


# ------------------------------------------------------------------ metrics and the large-batch rule
def test_metrics_per_request_and_per_run(tiny):
    ps = spanned_prompts(seed=2)
    llm = LLM(tiny, speculative=spec("draft", 4, tiny))
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    s, log = llm.engine.stats, llm.engine.step_log
    assert s.num_draft_tokens == sum(x.num_spec_tokens for x in log) > 0
    assert s.num_accepted_tokens == sum(x.num_accepted_tokens for x in log)
    assert sum(x.num_output_tokens for x in log) == s.num_generated_tokens == sum(
        len(o.token_ids) for o in outs)
    assert sum(o.metrics.num_draft_tokens for o in outs) == s.num_draft_tokens
    for o in outs:
        m = o.metrics
        if m.num_spec_verifications:
            assert m.acceptance_rate == 1.0                  # self-draft, greedy
            assert 1 <= m.mean_accepted_tokens <= 4
            # each verification yields accepted + 1 tokens, the prompt's step one more (and
            # steps left without a proposal, at the max_tokens edge, one each)
            assert len(o.token_ids) >= 1 + m.num_spec_verifications + m.num_accepted_tokens
    # a plain run has the fields, all zero
    plain = LLM(tiny).generate(ps[:1], GREEDY, use_tqdm=False)[0]
    assert plain.metrics.num_draft_tokens == 0 and plain.metrics.acceptance_rate is None


def test_large_batch_rule():
    c = SpeculativeConfig(num_speculative_tokens=4, max_verify_tokens=256)
    assert [c.num_tokens_for(n) for n in (1, 51, 52, 64, 65, 85, 86, 128, 129, 256)] == \
        [4, 4, 3, 3, 2, 2, 1, 1, 0, 0]
    assert SpeculativeConfig(max_verify_tokens=None).num_tokens_for(10**6) == 4
    # In the engine: 6 decodes x (1 + k) capped at 12 tokens -> k = 1 while all 6 decode.
    eng = Engine(load_model("tiny"), EngineConfig(speculative=spec("ngram", 4, max_verify_tokens=12)))
    for i, p in enumerate(spanned_prompts(seed=1, lens=(9, 12, 15, 18, 21, 24))):
        eng.add_request(str(i), p, GREEDY)
    while eng.has_unfinished_requests():
        eng.step()
    for s in eng.step_log:
        if s.num_spec_tokens and not s.num_prefill_tokens:
            assert s.num_spec_tokens <= 12 // s.num_seqs * s.num_seqs - s.num_seqs
    assert any(s.num_spec_tokens for s in eng.step_log)


# ------------------------------------------------------------------ config
def test_bad_configs_raise(tiny):
    for kw, name in [(dict(num_speculative_tokens=0), "num_speculative_tokens"),
                     (dict(num_speculative_tokens=True), "num_speculative_tokens"),
                     (dict(method="eagle"), "method"),
                     (dict(ngram_min=3, ngram_max=2), "ngram_max"),
                     (dict(ngram_min=0), "ngram_min"),
                     (dict(method="draft"), "draft_model"),
                     (dict(method="ngram", draft_model="tiny"), "draft_model"),
                     (dict(max_verify_tokens=1), "max_verify_tokens")]:
        with pytest.raises(ValueError, match=name):
            SpeculativeConfig(**kw)
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig(speculative="ngram")
    assert EngineConfig(speculative=dict(num_speculative_tokens=2)).speculative == \
        SpeculativeConfig(num_speculative_tokens=2)
    other = load_model(dataclasses.replace(PRESETS["tiny"], vocab_size=300))
    with pytest.raises(ValueError, match="vocab_size"):
        LLM(tiny, speculative=spec("draft", 2, other))
    short = load_model(dataclasses.replace(PRESETS["tiny"], max_position_embeddings=64))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(tiny, max_model_len=128, speculative=spec("draft", 2, short))


# ------------------------------------------------------------------ property-based
class SpecCheckingModel(CheckingModel):
    """test_scheduler's checking model, with logits for ANY row (a verification samples all
    1 + k rows): row i's token is rule(history up to and including i). With `wrong`, it is
    a draft that is wrong at every position divisible by `wrong` (so drafts are rejected)."""

    def __init__(self, wrong=0):
        super().__init__()
        self.wrong = wrong

    def forward(self, input_ids, positions, attn, kv_caches, logits_indices):
        k, v = kv_caches[0]
        real = attn.slot_mapping >= 0
        k.view(-1)[attn.slot_mapping[real]] = input_ids[real].double()
        v.view(-1)[attn.slot_mapping[real]] = positions[real].double()
        cu, lens = attn.cu_seqlens_q.tolist(), attn.seq_lens.tolist()
        assert cu[-1] == input_ids.shape[0] and attn.max_seqlen_q == max(
            b - a for a, b in zip(cu, cu[1:]))
        bs = k.shape[1]
        logits = torch.zeros(logits_indices.shape[0], V)
        for row, idx in enumerate(logits_indices.tolist()):
            b = bisect.bisect_right(cu, idx) - 1
            if not real[idx]:
                continue                          # a padded graph row
            L = int(positions[idx]) + 1           # history through this row's token
            assert L <= lens[b]
            blocks = attn.block_table[b, :math.ceil(L / bs)].long()
            assert v[blocks].reshape(-1)[:L].tolist() == list(range(L)), "KV history mis-paged"
            toks = [int(t) for t in k[blocks].reshape(-1)[:L].tolist()]
            t = rule(toks)
            if self.wrong and L % self.wrong == 0:
                t = (t + 1) % V
            logits[row, t] = 1.0
        return logits


@settings(max_examples=100, deadline=None)
@given(data=st.data(), method=st.sampled_from(["ngram", "draft"]), k=st.integers(1, 8),
       block_size=st.sampled_from([1, 2, 4]), budget=st.integers(1, 24),
       max_seqs=st.integers(1, 6), caching=st.booleans(), graphs=st.booleans(),
       overlap=st.booleans(), wrong=st.sampled_from([0, 2, 3]),
       verify_cap=st.sampled_from([None, 4, 12]),
       policy=st.sampled_from(["continuous", "continuous", "prefill_first", "static"]))
def test_random_workloads_with_speculation(data, method, k, block_size, budget, max_seqs,
                                           caching, graphs, overlap, wrong, verify_cap, policy):
    """Random arrivals, lengths, stops and aborts over a KV cache small enough to preempt,
    with speculation: every request that was not aborted gets exactly the rule's tokens, and
    no block of the target's or the draft's cache leaks or is double-freed."""
    max_seqs = min(max_seqs, budget)             # one decode per running sequence fits a step
    num_blocks = data.draw(st.integers(max(2, 8 // block_size), 24 // block_size + 2), "num_blocks")
    max_len = num_blocks * block_size
    draft = SpecCheckingModel(wrong) if method == "draft" else None
    sp = spec(method, k, draft, max_verify_tokens=verify_cap)
    eng = Engine(SpecCheckingModel(), EngineConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_seqs, num_blocks=num_blocks,
        block_size=block_size, enable_prefix_caching=caching, max_model_len=max_len,
        cuda_graphs=graphs, async_scheduling=overlap, speculative=sp, policy=policy))
    n_req = data.draw(st.integers(1, 6), "n_req")
    reqs = {}
    for i in range(n_req):
        plen = data.draw(st.integers(1, min(16, max_len - 1)), "plen")
        prompt = [1 + (j * (i % 2 + 1)) % 5 for j in range(plen)]       # shared prefixes
        reqs[str(i)] = (prompt, data.draw(st.integers(1, min(12, max_len - plen)), "max_tokens"),
                        data.draw(st.integers(0, 3), "arrival_step"),
                        tuple(data.draw(st.sets(st.integers(0, V - 1), max_size=3), "stop")))
    aborts = data.draw(st.dictionaries(st.sampled_from(sorted(reqs)), st.integers(0, 10),
                                       max_size=2), "aborts")
    outs, step = {}, 0
    while step < 4 or eng.has_unfinished_requests():
        for rid, (prompt, mt, at, stop) in reqs.items():
            if at == step:
                eng.add_request(rid, prompt, SamplingParams(
                    max_tokens=mt, stop_token_ids=stop, temperature=0.0, ignore_eos=True))
        for rid, at in aborts.items():
            if at == step:
                eng.abort(rid)
        if eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = o
        eng.block_manager.check()
        # Rollback: between steps a sequence holds exactly the blocks of its computed tokens
        # (rejected drafts' blocks went back at once), in the draft's cache too.
        for s in eng.scheduler.running:
            assert len(s.block_table) == -(-s.num_computed_tokens // block_size), s
        if method == "draft":
            for d in eng.spec.proposer.states.values():
                assert len(d.block_table) == -(-d.num_computed_tokens // block_size)
        step += 1
        assert step < 2000, "no progress"
    for s in eng.step_log:
        assert s.num_prefill_tokens + s.num_decode_tokens <= budget
        assert s.num_seqs <= max_seqs
        assert not (s.num_spec_tokens and s.graph_batch)
    event(f"accepted: {eng.stats.num_accepted_tokens > 0}")
    event(f"rejected: {eng.stats.num_accepted_tokens < eng.stats.num_draft_tokens}")
    event(f"preempted: {eng.stats.num_preemptions > 0}")
    event(f"verify mixed with prefill: {any(s.num_spec_tokens and s.num_prefill_tokens for s in eng.step_log)}")
    assert eng.block_manager.num_free_blocks == num_blocks
    if method == "draft":
        dbm = eng.spec.proposer.bm
        assert dbm.num_free_blocks == dbm.num_blocks and not eng.spec.proposer.states
        dbm.check()
    for rid, (prompt, mt, at, stop) in reqs.items():
        if rid in outs:
            want = expected(prompt, mt, max_len, stop)
            assert outs[rid].token_ids == want, rid
            assert outs[rid].finish_reason == ("stop" if want[-1] in stop else "length")
        else:
            assert rid in aborts and aborts[rid] >= at, rid


def test_batch_builder_verification_rows():
    """A verifying sequence's query is its last token + its drafts, every row sampled."""
    bb = BatchBuilder(4, "cpu")
    tables = np.zeros((4, 3), dtype=np.int32)
    a = Sequence("a", list(range(10)), SamplingParams(), 0, 0.0, 0)
    a.num_computed_tokens, a.table_row, tables[2] = 4, 2, [7, 3, 5]   # mid-prompt chunk
    b = Sequence("b", list(range(20, 26)), SamplingParams(), 0, 0.0, 1)
    b.num_computed_tokens, b.table_row, tables[0, :3] = 5, 0, [2, 9, 6]
    b.spec_tokens = [40, 41, 42]
    c = Sequence("c", [1, 2], SamplingParams(), 0, 0.0, 2)
    c.num_computed_tokens, c.table_row, tables[1, :1] = 1, 1, [4]      # plain decode
    batch = bb.build([(b, 4), (c, 1), (a, 5)], tables)
    assert batch.input_ids.tolist() == [25, 40, 41, 42, 2, 4, 5, 6, 7, 8]
    assert batch.positions.tolist() == [5, 6, 7, 8, 1, 4, 5, 6, 7, 8]
    assert batch.seq_lens.tolist() == [9, 2, 9]
    assert batch.logits_indices.tolist() == [0, 1, 2, 3, 4]
    assert batch.slot_mapping.tolist()[:4] == [9 * 4 + 1, 9 * 4 + 2, 9 * 4 + 3, 6 * 4 + 0]
    assert batch.sampled_rows.tolist() == [True, True, False]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_gpu_speculation_with_graphs_and_async(model_dirs, backend, method):
    """On CUDA with the defaults (CUDA graphs captured, async scheduling on) and a profiled
    KV cache: greedy fp32 tokens with speculation equal those without it; verification steps
    ran eagerly, plain decode steps still replayed graphs once the large-batch rule (capped
    low here) turned speculation off; nothing leaks."""
    path = model_dirs["qwen3"]
    kw = dict(device="cuda", dtype=torch.float32, backend=backend, gpu_memory_utilization=0.3,
              max_num_batched_tokens=64, max_num_seqs=8)
    ps = spanned_prompts(seed=8, lens=(13, 40, 1, 27, 58, 5, 33, 21))
    params = dataclasses.replace(GREEDY, max_tokens=32)
    _, want = gen(path, ps, params, **kw)
    # 12 tokens: 8 or more decodes -> off (graphs, overlap), 5 -> k = 1, 2 -> k = 4
    sp = spec(method, 4, path, max_verify_tokens=12)
    llm, got = gen(path, ps, params, speculative=sp, **kw)
    eng = llm.engine
    assert eng.graphs is not None and eng.async_scheduling
    log = eng.step_log
    print(method, backend, "verify steps", sum(1 for s in log if s.num_spec_tokens),
          "graph steps", sum(1 for s in log if s.graph_batch), "accepted",
          eng.stats.num_accepted_tokens, "of", eng.stats.num_draft_tokens)
    assert got == want
    assert any(s.num_spec_tokens for s in log)
    assert all(s.graph_batch == 0 for s in log if s.num_spec_tokens)
    assert any(s.graph_batch for s in log)
    assert_all_free(llm)


# ------------------------------------------------------------------ benchmarks' plumbing
def test_bench_speculation_plumbing():
    """bench.e2e's flags become SpeculativeConfig fields (and name the JSON), the step log's
    counters become the JSON summary, and repeated_span prompts repeat their spans."""
    from bench import e2e, metrics, workloads
    a = e2e.parse_args(["--quick", "--speculative", "ngram", "--num-speculative-tokens", "3",
                        "--max-verify-tokens", "0"])
    assert e2e.speculative_args(a) == dict(method="ngram", num_speculative_tokens=3,
                                           draft_model=None, max_verify_tokens=None)
    SpeculativeConfig(**e2e.speculative_args(a))
    assert e2e.speculative_args(e2e.parse_args(["--quick"])) is None
    log = [dict(num_spec_tokens=8, num_spec_seqs=2, num_accepted_tokens=6, num_output_tokens=8),
           dict(num_spec_tokens=0, num_spec_seqs=0, num_accepted_tokens=0, num_output_tokens=2),
           dict(num_spec_tokens=0, num_spec_seqs=0, num_accepted_tokens=0, num_output_tokens=0)]
    s = metrics.speculation_summary(log)
    assert s["acceptance_rate"] == 0.75 and s["mean_accepted_per_verification"] == 3.0
    assert s["output_tokens_per_step"] == 5.0 and s["verify_steps"] == 1
    reqs = workloads.make("repeated_span", 3, vocab_size=1000, prompt_len=100, span_len=10,
                          edit_rate=0.0, seed=1)
    p = reqs[0].prompt_token_ids
    assert len(p) == 100 and p[:10] == p[40:50] != p[10:20]
    assert reqs == workloads.make("repeated_span", 3, vocab_size=1000, prompt_len=100,
                                  span_len=10, edit_rate=0.0, seed=1)
    with pytest.raises(ValueError, match="edit_rate"):
        workloads.repeated_span(2, vocab_size=10, edit_rate=2.0)
