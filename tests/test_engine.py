"""End to end through LLM/Engine with tiny random Hugging Face models (CPU, fp32): greedy
outputs equal transformers' generate for every family, with prompts chunked into steps shared
with decodes, under preemption, under every policy and with prefix-cache hits; seeded sampling;
stop conditions; metrics; bad input that must not disturb the requests being served."""
import numpy as np
import pytest
import torch

from model import load_model
from ragged import LLM, EngineConfig, SamplingParams
from tests.hf_models import EOS_ID, FAMILIES, make_hf_model

MAX_NEW = 8
PROMPT_LENS = (1, 17, 30, 45, 9)      # awkward on purpose; 45 > 2 budgets of 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine their
    spin-waits cost 20x (5.4 s -> 0.23 s for one test's generate calls)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: make_hf_model(f, root / f, seed=3) for f in FAMILIES}


def prompts(seed=0, lens=PROMPT_LENS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in lens]


_HF_CACHE = {}


def hf_greedy(path, prompt, n=MAX_NEW):
    """transformers' greedy continuation, cut after the first EOS (as the engine stops there)."""
    key = (path, tuple(prompt), n)
    if key not in _HF_CACHE:
        from transformers import AutoModelForCausalLM
        if path not in _HF_CACHE:
            _HF_CACHE[path] = AutoModelForCausalLM.from_pretrained(
                path, attn_implementation="eager", dtype=torch.float32).eval()
        hf = _HF_CACHE[path]
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        if EOS_ID in out:
            out = out[:out.index(EOS_ID) + 1]
        _HF_CACHE[key] = out
    return _HF_CACHE[key]


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


def mixed_steps(llm):
    return sum(1 for s in llm.engine.step_log if s.num_prefill_tokens and s.num_decode_tokens)


def assert_all_free(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_hf_with_chunks_fused_with_decodes(model_dirs, family):
    path = model_dirs[family]
    llm = LLM(path, max_num_batched_tokens=16, max_num_seqs=16, device="cpu")
    ps = prompts()
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(path, p), (family, len(p))
        assert o.prompt_token_ids == p and o.finished
    log = llm.engine.step_log
    print(family, "steps", len(log), "mixed", mixed_steps(llm))
    assert mixed_steps(llm) > 0
    assert all(s.num_prefill_tokens + s.num_decode_tokens <= 16 for s in log)
    assert max(s.num_prefill_tokens for s in log) == 16        # the 45-token prompt is chunked
    assert_all_free(llm)


@pytest.mark.interpreter
def test_triton_backend_through_the_engine(model_dirs):
    """The Triton kernels (interpreted on CPU) read the runtime's metadata differently from
    the reference (host bounds max_seqlen_q/k size the grid; stale block-table entries are
    loaded): the engine's batches must give HF's tokens there too. ~10 s in the interpreter."""
    path = model_dirs["qwen3"]
    llm = LLM(path, max_num_batched_tokens=16, max_num_seqs=16, backend="triton",
              device="cpu")
    ps = prompts(seed=13, lens=(1, 17, 30))
    outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(path, p, 4)
    assert mixed_steps(llm) > 0


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_padded_graph_decode_path_equals_hf(model_dirs, backend):
    """cuda_graphs=True on CPU runs decode-only steps through the static buffer the graphs
    replay on a GPU, padded to buckets of max_num_seqs=6 (5 decodes -> 6, 3 -> 4): real
    kernels over dummy rows (seq_len 1, slot -1) must leave the real rows' tokens HF's."""
    path = model_dirs["qwen3"]
    llm = LLM(path, max_num_batched_tokens=64, max_num_seqs=6, backend=backend,
              cuda_graphs=True, device="cpu")
    lens = (1, 17, 30, 9, 5) if backend == "torch" else (1, 17, 9)
    ps = prompts(seed=21, lens=lens)
    n = MAX_NEW if backend == "torch" else 4
    outs = llm.generate(ps, [SamplingParams(temperature=0.0, max_tokens=n - i % 3)
                             for i in range(len(ps))], use_tqdm=False)
    for i, (p, o) in enumerate(zip(ps, outs)):
        assert o.token_ids == hf_greedy(path, p, n)[:n - i % 3], (backend, len(p))
    log = llm.engine.step_log
    padded = [(s.num_seqs, s.graph_batch) for s in log if s.graph_batch > s.num_seqs]
    print(backend, "graph steps", sum(1 for s in log if s.graph_batch), "padded", padded)
    assert padded, "no decode step was padded"
    assert all(s.graph_batch == 0 for s in log if s.num_prefill_tokens)
    assert_all_free(llm)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_async_scheduling_same_tokens(model_dirs, family):
    """async_scheduling=True (step n launched before step n-1's tokens are read; decode
    inputs filled from the previous step's sampled-id tensor) over chunked prompts, padded
    graph-path decodes and preemption: greedy tokens are HF's; a stop token that ends one
    request mid-batch (its in-flight row is dropped) gives the same cut as the synchronous
    engine; seeded sampling draws the same tokens; nothing leaks."""
    path = model_dirs[family]
    ps = prompts(seed=5)
    kw = dict(block_size=4, num_blocks=24, max_num_batched_tokens=16, max_num_seqs=6,
              cuda_graphs=True)
    sync = LLM(path, async_scheduling=False, device="cpu", **kw)
    asy = LLM(path, async_scheduling=True, device="cpu", **kw)
    assert asy.engine.async_scheduling and not sync.engine.async_scheduling
    outs = asy.generate(ps, GREEDY, use_tqdm=False)
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(path, p), len(p)
    log = asy.engine.step_log
    print(family, "preemptions", asy.engine.stats.num_preemptions, "graph steps",
          sum(1 for s in log if s.graph_batch), "mixed", mixed_steps(asy))
    assert asy.engine.stats.num_preemptions > 0 and mixed_steps(asy) > 0
    assert any(s.graph_batch for s in log)
    assert_all_free(asy)
    # A stop token two tokens into request 1 while the others keep decoding.
    free = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    full = sync.generate(ps, free, use_tqdm=False)
    stop = full[1].token_ids[2]
    params = [free] * len(ps)
    params[1] = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                               stop_token_ids=[stop])
    a = sync.generate(ps, params, use_tqdm=False)
    b = asy.generate(ps, params, use_tqdm=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert b[1].finish_reason == "stop" and b[1].token_ids[-1] == stop
    assert len(b[1].token_ids) <= 3 and all(o.finish_reason == "length" for o in b[2:])
    sp = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=6, ignore_eos=True)
    assert ([o.token_ids for o in sync.generate(ps[:3], sp, use_tqdm=False)]
            == [o.token_ids for o in asy.generate(ps[:3], sp, use_tqdm=False)])
    assert_all_free(asy)
    assert not asy.engine.has_unfinished_requests()


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_greedy_equals_hf_under_preemption(model_dirs, family):
    path = model_dirs[family]
    # 16 blocks of 4 tokens (64 tokens) for ~150 tokens of demand: sequences get evicted and
    # recomputed (prompt + generated) and must still produce exactly HF's tokens.
    llm = LLM(path, block_size=4, num_blocks=16, max_num_batched_tokens=32, max_num_seqs=32,
              device="cpu")
    ps = prompts(seed=1)
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    stats = llm.engine.stats
    print(family, "preemptions", stats.num_preemptions)
    assert stats.num_preemptions > 0
    assert sum(s.num_preempted for s in llm.engine.step_log) == stats.num_preemptions
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(path, p)
    assert_all_free(llm)


@pytest.mark.parametrize("policy", ["prefill_first", "static"])
def test_other_policies_same_tokens(model_dirs, policy):
    path = model_dirs["qwen2"]
    llm = LLM(path, max_num_batched_tokens=16, max_num_seqs=3, policy=policy, device="cpu")
    ps = prompts(seed=2)
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(path, p)
    assert mixed_steps(llm) == 0          # neither policy fuses prefill with decode
    assert_all_free(llm)


def test_prefix_cache_hits_give_identical_outputs(model_dirs):
    path = model_dirs["llama"]
    shared = prompts(seed=4, lens=(40,))[0]
    tails = prompts(seed=5, lens=(3, 1, 7))
    # shared[:32] is exactly 2 full blocks: its hit is capped at 1 block so that its last
    # token is computed and gives the first output token.
    ps = [shared + t for t in tails] + [shared, shared[:32]]
    # Two engines at once: each gets an explicit num_blocks (64 x 16 tokens), never a profiled
    # share of what the other left (on a GPU the profiler would count the first one's cache).
    cold = LLM(path, max_num_batched_tokens=16, max_num_seqs=16, enable_prefix_caching=False,
               num_blocks=64, device="cpu")
    want = [o.token_ids for o in cold.generate(ps, GREEDY, use_tqdm=False)]
    assert cold.engine.stats.prefix_hit_tokens == 0
    warm = LLM(path, max_num_batched_tokens=16, max_num_seqs=16, num_blocks=64, device="cpu")
    first = warm.generate(ps[:1], GREEDY, use_tqdm=False)          # fills the cache
    assert first[0].token_ids == want[0]
    again = warm.generate(ps, GREEDY, use_tqdm=False)
    hits = warm.engine.stats.prefix_hit_tokens
    print("prefix hit tokens", hits)
    assert hits >= 2 * 32                       # 2 full blocks of 16 per later request
    assert sum(s.prefix_hit_tokens for s in warm.engine.step_log) == hits
    assert [o.token_ids for o in again] == want
    for p, w in zip(ps, want):
        assert w == hf_greedy(path, p)
    assert_all_free(warm)


def test_seeded_sampling_reproducible_and_batch_independent(model_dirs):
    path = model_dirs["qwen3"]
    p = prompts(seed=6, lens=(11,))[0]
    sp = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = LLM(path, seed=0, num_blocks=64, device="cpu").generate([p], sp, use_tqdm=False)[0].token_ids
    others = prompts(seed=7, lens=(5, 23, 2))
    crowd = LLM(path, seed=99, max_num_batched_tokens=16, max_num_seqs=16, num_blocks=64,
                device="cpu")
    mix = crowd.generate(others[:2] + [p] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=12)] * 2 + [sp]
                         + [SamplingParams(temperature=1.0, max_tokens=12)], use_tqdm=False)
    tight = LLM(path, block_size=4, num_blocks=12, max_num_batched_tokens=8, max_num_seqs=8,
                device="cpu")
    pre = tight.generate(others + [p], [SamplingParams(temperature=1.0, max_tokens=12)] * 3 + [sp],
                         use_tqdm=False)
    print("seeded", alone, "preemptions", tight.engine.stats.num_preemptions)
    assert tight.engine.stats.num_preemptions > 0     # else `pre` checks nothing over `mix`
    assert mix[2].token_ids == alone and pre[3].token_ids == alone
    other_seed = LLM(path, num_blocks=64, device="cpu").generate(
        [p], SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=1235, max_tokens=10,
                            ignore_eos=True), use_tqdm=False)
    assert other_seed[0].token_ids != alone


def test_stop_conditions_and_max_model_len(model_dirs):
    path = model_dirs["mistral"]
    p = prompts(seed=8, lens=(6,))[0]
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = LLM(path, num_blocks=64, device="cpu")
    full = llm.generate([p], free, use_tqdm=False)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop = full.token_ids[4]
    cut = full.token_ids[:full.token_ids.index(stop) + 1]
    o = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop]),
                     use_tqdm=False)[0]
    assert o.token_ids == cut and o.finish_reason == "stop"
    # EOS from the model config stops (unless ignore_eos).
    m = load_model(path)
    m.config.eos_token_id = [stop]
    eos_llm = LLM(m, num_blocks=64)                  # m is on the CPU (load_model's default)
    assert eos_llm.generate([p], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0].token_ids == cut
    assert eos_llm.generate([p], free, use_tqdm=False)[0].token_ids == full.token_ids
    # prompt + max_tokens must fit in max_model_len: refused (with the numbers), never cut
    # short silently; the largest max_tokens that fits runs to its end.
    short = LLM(path, max_model_len=10, num_blocks=64, device="cpu")
    with pytest.raises(ValueError, match=r"max_tokens: 6 prompt tokens \+ max_tokens=12 exceed "
                                         r"max_model_len=10 \(at most 4"):
        short.generate([p], free, use_tqdm=False)
    assert not short.engine.has_unfinished_requests()
    o = short.generate([p], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0]
    assert o.token_ids == full.token_ids[:4] and o.finish_reason == "length"


def test_metrics_and_step_stats(model_dirs):
    llm = LLM(model_dirs["llama"], max_num_batched_tokens=16, max_num_seqs=16, device="cpu")
    outs = llm.generate(prompts(seed=9), SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                        use_tqdm=False)
    for o in outs:
        m = o.metrics
        assert len(m.token_times) == len(o.token_ids) == 5
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time == m.token_times[0]
        assert m.token_times == sorted(m.token_times) and m.token_times[-1] == m.finish_time
    log = llm.engine.step_log
    assert [s.step for s in log] == list(range(len(log)))
    assert sum(s.num_prefill_tokens for s in log) == sum(PROMPT_LENS)
    assert sum(s.num_decode_tokens for s in log) == 4 * len(outs)   # the first token comes from prefill
    assert all(0 < s.schedule_time_s <= s.step_time_s and s.kv_blocks_used > 0 for s in log)


def test_text_prompts_with_tokenizer(model_dirs):
    path = model_dirs["qwen2"]
    llm = LLM(path, device="cpu")
    o = llm.generate("Hello, ragged!", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                     use_tqdm=False)[0]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    assert o.prompt_token_ids == tok.encode("Hello, ragged!")
    assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
    # HF stops at EOS (hf_greedy cuts there); with ignore_eos the engine goes on, so HF's
    # tokens, EOS included, must be a prefix of ours (not an escape hatch when EOS shows up).
    want = hf_greedy(path, o.prompt_token_ids, 6)
    assert len(o.token_ids) == 6 and o.token_ids[:len(want)] == want


def test_generate_prompt_forms(model_dirs):
    llm = LLM(model_dirs["llama"], device="cpu")
    p = prompts(seed=12, lens=(5,))[0]
    one = llm.generate(p, GREEDY, use_tqdm=False)                   # a single list of ids
    arr = llm.generate([np.array(p), tuple(p)], GREEDY, use_tqdm=False)
    assert len(one) == 1 and [o.token_ids for o in arr] == [one[0].token_ids] * 2
    assert llm.generate([], GREEDY, use_tqdm=False) == []
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([p, p], [GREEDY], use_tqdm=False)


def test_bad_input_rejected_while_serving(model_dirs):
    path = model_dirs["llama"]
    llm = LLM(load_model(path), max_model_len=64, max_num_batched_tokens=16,   # no tokenizer
              max_num_seqs=16, device="cpu")
    eng = llm.engine
    good = prompts(seed=10, lens=(20, 7))
    long = SamplingParams(temperature=0.0, max_tokens=30)        # still running at the end
    outs = {}

    def step():
        outs.update({o.request_id: o for o in eng.step() if o.finished})

    eng.add_request("a", good[0], long)
    step()
    eng.add_request("b", good[1], GREEDY)
    step()
    bad = [
        (dict(request_id="c", prompt=list(range(3, 67)), params=GREEDY), "max_model_len"),
        (dict(request_id="c", prompt=[], params=GREEDY), "empty"),
        (dict(request_id="c", prompt=[5, 259], params=GREEDY), "vocabulary"),
        (dict(request_id="c", prompt=[5, -1], params=GREEDY), "vocabulary"),
        (dict(request_id="c", prompt=[5, 2.0], params=GREEDY), "prompt"),
        (dict(request_id="c", prompt="text", params=GREEDY), "tokenizer"),
        (dict(request_id="c", prompt=[5], params={"max_tokens": 3}), "params"),
        (dict(request_id="a", prompt=[5], params=GREEDY), "already in use"),
        (dict(request_id="c", prompt=[5], params=GREEDY, priority="high"), "priority"),
    ]
    for kw, msg in bad:
        free_before = eng.block_manager.num_free_blocks
        with pytest.raises(ValueError, match=msg):
            eng.add_request(**kw)
        assert "c" not in eng.requests and eng.block_manager.num_free_blocks == free_before
        step()
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"stop_token_ids: \[259\] outside the vocabulary"):
        eng.add_request("c", [5], SamplingParams(stop_token_ids=[7, 259]))
    assert "c" not in eng.requests
    # generate() is all or nothing: a bad prompt in the middle leaves nothing queued, and the
    # error names the prompt's index.
    n_before = len(eng.requests)
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt: is empty"):
        llm.generate([[5, 6], [], [7]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompts\[2\]: max_tokens"):
        llm.generate([[5, 6], [7], list(range(3, 60))], GREEDY, use_tqdm=False)
    assert len(eng.requests) == n_before
    while eng.has_unfinished_requests():
        step()
    assert outs["a"].token_ids == hf_greedy(path, good[0], 30)
    assert outs["b"].token_ids == hf_greedy(path, good[1])
    assert_all_free(llm)


def test_abort_frees_blocks_at_once(model_dirs):
    path = model_dirs["qwen3"]
    llm = LLM(path, max_num_batched_tokens=16, max_num_seqs=16, device="cpu")
    eng = llm.engine
    a, b = prompts(seed=11, lens=(40, 10))
    eng.add_request("a", a, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    eng.add_request("b", b, GREEDY)
    for _ in range(3):
        eng.step()
    held = len(eng.requests["a"].block_table)
    free = eng.block_manager.num_free_blocks
    assert held >= 2
    assert eng.abort("a") and not eng.abort("a") and not eng.abort("nope")
    assert eng.block_manager.num_free_blocks == free + held
    outs = {}
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in eng.step() if o.finished})
    assert list(outs) == ["b"] and outs["b"].token_ids == hf_greedy(path, b)
    # Aborting a waiting request works too, and its id can be reused afterwards.
    eng.add_request("w", b, GREEDY)
    assert eng.abort("w")
    eng.add_request("w", b, GREEDY)
    while eng.has_unfinished_requests():
        eng.step()
    assert_all_free(llm)


def test_config_validation():
    for kw, name in ((dict(block_size=0), "block_size"), (dict(policy="fifo"), "policy"),
                     (dict(max_num_seqs=0), "max_num_seqs"), (dict(gpu_memory_utilization=1.5),
                                                              "gpu_memory_utilization"),
                     (dict(queue_order="lifo"), "queue_order"), (dict(num_blocks=-1), "num_blocks"),
                     (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
                     (dict(max_num_batched_tokens=8, max_num_seqs=9), "max_num_batched_tokens: 8 "
                                                                      "is less than max_num_seqs=9")):
        with pytest.raises(ValueError, match=name):
            EngineConfig(**kw)
    EngineConfig(max_num_batched_tokens=8, max_num_seqs=8)       # equal is fine
    # no budget given: the default grows to max_num_seqs rather than starving decodes
    assert EngineConfig(max_num_seqs=300).resolve("cpu", 512, 64).max_num_batched_tokens == 300
    assert EngineConfig(max_num_seqs=8).resolve("cpu", 512, 64).max_num_batched_tokens == 256


def test_kv_cache_too_small_for_max_model_len(model_dirs):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model_dirs["llama"], block_size=16, num_blocks=2, max_model_len=64, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_profiled_kv_cache_and_hf_equivalence(model_dirs, backend):
    """On CUDA: the KV cache is sized by the profiling pass (no num_blocks given), the batch
    goes through the pinned buffer, and greedy fp32 outputs still equal HF's (CPU) ones."""
    path = model_dirs["qwen3"]
    llm = LLM(path, device="cuda", dtype=torch.float32, backend=backend,
              gpu_memory_utilization=0.3, max_num_batched_tokens=16, max_num_seqs=16)
    eng = llm.engine
    kv_bytes = eng.block_manager.num_blocks * eng.model.kv_cache_bytes_per_block(16)
    total = torch.cuda.get_device_properties(0).total_memory
    print("profiled blocks", eng.block_manager.num_blocks, "KV GiB", kv_bytes / 2**30)
    assert 0.1 * total < kv_bytes < 0.3 * total
    ps = prompts()
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(path, p), len(p)
    assert mixed_steps(llm) > 0
    sp = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=6, ignore_eos=True)
    a = llm.generate([ps[1]], sp, use_tqdm=False)[0].token_ids
    b = llm.generate(ps[:3], [GREEDY, sp, GREEDY], use_tqdm=False)[1].token_ids
    assert a == b
    assert_all_free(llm)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_cuda_graph_decode(model_dirs, backend):
    """On CUDA, decode steps replay captured graphs (one per bucket of max_num_seqs=8): the
    greedy fp32 tokens equal HF's and the eager engine's (synchronous, and with async
    scheduling: filled inputs from the device), padded buckets were replayed, and
    for one decode batch the replayed logits equal the eager forward's (same weights, same
    KV; fp32 GEMMs of 3 vs 4 rows differ by summation order only, ~1e-6 relative, while a
    padding or layout bug would be O(1)); a second replay is bitwise identical."""
    from ragged.graphs import graph_buckets
    path = model_dirs["qwen3"]
    # num_blocks given: three engines live at once, and a profiled one sizes its cache from
    # what the others left free (the profiled path is test_gpu_profiled_kv_cache_...)
    kw = dict(device="cuda", dtype=torch.float32, backend=backend, num_blocks=256,
              max_num_batched_tokens=64, max_num_seqs=8)
    llm = LLM(path, async_scheduling=False, **kw)
    eng = llm.engine
    assert eng.graph_capture_error is None, eng.graph_capture_error
    assert sorted(eng.graphs.graphs) == graph_buckets(8)
    ps = prompts(seed=4, lens=(1, 17, 30, 9, 5))
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    # the defaults on CUDA: async scheduling, with and without graphs
    both = LLM(path, **kw)
    assert both.engine.async_scheduling and both.engine.graphs is not None
    overlapped = both.generate(ps, GREEDY, use_tqdm=False)
    eager = LLM(path, cuda_graphs=False, **kw).generate(ps, GREEDY, use_tqdm=False)
    for p, o, a, e in zip(ps, outs, overlapped, eager):
        assert o.token_ids == a.token_ids == e.token_ids == hf_greedy(path, p), len(p)
    assert any(s.graph_batch > s.num_seqs for s in eng.step_log)
    assert any(s.graph_batch > s.num_seqs for s in both.engine.step_log)
    both.engine.device_times(wait=True)
    spans = [s.device_time_s for s in both.engine.step_log if s.num_seqs]
    assert all(t is not None and t > 0 for t in spans), spans
    assert_all_free(llm)
    assert_all_free(both)

    # One decode batch of 3 sequences, two ways (bucket 4: one padding row).
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, p in enumerate(ps[:3]):
        eng.add_request(f"x{i}", p, params)
    while any(s.is_prefill for s in eng.requests.values()):
        eng.step()
    sched = eng.scheduler.schedule()
    assert sched.num_prefill_tokens == 0 and len(sched.scheduled) == 3
    table = eng.block_manager.table
    with torch.inference_mode():
        b = eng.batch_builder.build(sched.scheduled, table)
        ref = eng.model.forward(b.input_ids, b.positions, b.attn, eng.kv_caches, b.logits_indices)
        eng.batch_builder.build(sched.scheduled, table, pad_to=4, out=eng.graphs.buffer)
        got = eng.graphs.run(4)[:3].clone()
        again = eng.graphs.run(4)[:3].clone()
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(backend, "graph vs eager max err", err, "scale", scale)
    assert err <= 1e-4 * scale
    assert torch.equal(got, again)


@pytest.mark.parametrize("overlap", [False, True])
def test_streamed_outputs_are_stable_prefixes(model_dirs, overlap):
    """Every RequestOutput a step returns keeps the tokens it had then (token_ids is a lazy
    view of the sequence's growing list): each is the previous one plus one token, also
    after preemption, and under async scheduling where placeholders are appended past it."""
    eng = LLM(model_dirs["llama"], block_size=4, num_blocks=16, max_num_batched_tokens=16,
              max_num_seqs=16,
              async_scheduling=overlap, device="cpu").engine
    ps = prompts(seed=9)
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
    seen = {str(i): [] for i in range(len(ps))}
    while eng.has_unfinished_requests():
        for o in eng.step():
            seen[o.request_id].append(o)
    assert eng.stats.num_preemptions > 0
    for rid, outs in seen.items():
        final = outs[-1].token_ids
        assert [len(o.token_ids) for o in outs] == list(range(1, MAX_NEW + 1)), rid
        assert all(o.token_ids == final[:len(o.token_ids)] for o in outs), rid
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        hf = hf_greedy(model_dirs["llama"], ps[int(rid)])      # cut after an EOS, if any
        assert final[:len(hf)] == hf, rid


def test_engine_warms_up_every_attention_variant_before_serving(monkeypatch):
    """The engine asks the model to compile its attention variants once, after the KV cache
    exists, for queries up to 1 + k speculative tokens and in the cache's format."""
    from model import load_model
    from ragged.engine import Engine
    from ragged import EngineConfig, SpeculativeConfig
    m = load_model("tiny", seed=0)
    calls = []
    monkeypatch.setattr(m, "warmup_kernels", lambda *a, **kw: calls.append((a, kw)) or 7,
                        raising=False)
    cfg = EngineConfig(num_blocks=32, max_num_seqs=4, kv_cache_dtype="fp8_e4m3",
                       speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=3))
    eng = Engine(m, cfg)
    assert calls == [((16, 4), dict(kv_cache_dtype="fp8_e4m3", kv_scales=None))]
    assert eng.warmup_launches == 7
    # on CPU (or any backend but Triton on CUDA) the model's warm-up is a no-op
    assert load_model("tiny", seed=0).warmup_kernels(16, 4) == 0


@pytest.mark.gpu
def test_gpu_no_triton_compile_after_engine_start():
    """Every attention-kernel variant a run launches was compiled by the engine's warm-up."""
    from kernels import triton_attention as ta
    from ragged import LLM, SamplingParams

    def compiled():
        return sum(len(c[0]) for k in (ta._paged_attn_kernel, ta._merge_kernel)
                   for c in k.device_caches.values())
    llm = LLM("tiny", device="cuda", dtype="float16", backend="triton", num_blocks=256,
              max_num_seqs=8)
    before = compiled()
    assert before > 0 and llm.engine.warmup_launches > 0
    ps = [[1 + i % 50] * n for i, n in enumerate((1, 17, 200, 5, 64, 300, 2, 33))]
    llm.generate(ps, SamplingParams(max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert compiled() == before
