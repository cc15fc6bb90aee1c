"""Scheduler policies, preemption, and the ragged batch, driven through the real Engine with a
private checking model (no weights): the model stores each token id and position in its
"KV cache" at slot_mapping, then reads a sequence's whole history back through block_table and
seq_lens, asserts the positions are 0..L-1, and emits the token given by a fixed rule of that
history. So any wrong slot, block table, chunk boundary, prefix-cache hit or preemption
recompute changes the generated tokens, which are compared with the rule applied in Python.
(The HF-equivalence tests with real models are in test_engine.py.)"""
import bisect
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ragged import Engine, EngineConfig, SamplingParams
from ragged.batch import BatchBuilder, batch_layout
from ragged.graphs import graph_buckets
from ragged.sequence import Sequence

V = 50


def rule(tokens):
    """The checking model's next token: depends on every token and its position."""
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 31 + len(tokens)) % V


def expected(prompt, max_tokens, max_model_len=10**9, stop=()):
    toks = list(prompt)
    while len(toks) - len(prompt) < max_tokens and len(toks) < max_model_len:
        toks.append(rule(toks))
        if toks[-1] in stop:
            break
    return toks[len(prompt):]


class CheckingModel:
    def __init__(self):
        self.config = SimpleNamespace(vocab_size=V, eos_token_id=[], max_position_embeddings=4096)
        self.device = torch.device("cpu")
        self.calls = 0
        self.graph_max_len = 0      # set by engine() when decode steps take the graph path

    def allocate_kv_cache(self, num_blocks, block_size):
        shape = (num_blocks, block_size, 1, 1)
        return [(torch.full(shape, -1.0, dtype=torch.float64), torch.full(shape, -1.0, dtype=torch.float64))]

    def forward(self, input_ids, positions, attn, kv_caches, logits_indices):
        self.calls += 1
        k, v = kv_caches[0]
        T = input_ids.shape[0]
        assert T > 0 and attn.slot_mapping.shape == (T,) and positions.shape == (T,)
        assert attn.cu_seqlens_q.dtype == attn.seq_lens.dtype == attn.block_table.dtype == torch.int32
        assert input_ids.dtype == positions.dtype == attn.slot_mapping.dtype == torch.int64
        # slot -1: a padding row of a CUDA-graph decode batch (a one-token dummy sequence of
        # seq_len 1 at position 0 over block 0); nothing is written for it, and its logits
        # are computed but never sampled, so it is checked for its shape only.
        pad = (attn.slot_mapping < 0).tolist()
        real = attn.slot_mapping >= 0
        k.view(-1)[attn.slot_mapping[real]] = input_ids[real].double()
        v.view(-1)[attn.slot_mapping[real]] = positions[real].double()
        cu, lens = attn.cu_seqlens_q.tolist(), attn.seq_lens.tolist()
        assert cu[0] == 0 and cu[-1] == T
        assert attn.max_seqlen_q == max(b - a for a, b in zip(cu, cu[1:]))
        if self.graph_max_len and attn.max_seqlen_q == 1 and attn.max_seqlen_k == self.graph_max_len:
            # graph batch (decode-only steps when graphs are on): the host bound is
            # max_model_len, fixed at capture; padding comes after the real decodes
            assert self.graph_max_len >= max(lens) and pad == sorted(pad)
        else:
            assert attn.max_seqlen_k == max(lens) and not any(pad)
        bs = k.shape[1]
        for b, L in enumerate(lens):                       # positions are ctx .. L-1
            q = cu[b + 1] - cu[b]
            assert positions[cu[b]:cu[b + 1]].tolist() == list(range(L - q, L))
        logits = torch.zeros(logits_indices.shape[0], V)
        for row, idx in enumerate(logits_indices.tolist()):
            b = bisect.bisect_right(cu, idx) - 1
            assert idx == cu[b + 1] - 1, "a sampled row must be the last token of its sequence"
            L = lens[b]
            if pad[idx]:
                assert L == 1 and positions[idx] == 0 and input_ids[idx] == 0
                continue
            blocks = attn.block_table[b, :math.ceil(L / bs)].long()
            toks = k[blocks].reshape(-1)[:L]
            assert v[blocks].reshape(-1)[:L].tolist() == list(range(L)), "KV history mis-paged"
            logits[row, rule([int(t) for t in toks.tolist()])] = 1.0
        return logits


GREEDY = dict(temperature=0.0, ignore_eos=True)


def engine(**kw):
    # The default max_num_seqs (256) exceeds these tests' small budgets (refused: a budget
    # must cover one decode per running sequence): seat at most one sequence per budget token.
    if kw.get("max_num_batched_tokens") is not None:
        kw.setdefault("max_num_seqs", min(256, kw["max_num_batched_tokens"]))
    eng = Engine(CheckingModel(), EngineConfig(**kw))
    if eng.graphs is not None:
        eng.model.graph_max_len = eng.config.max_model_len
    return eng


def run(eng, max_steps=10_000):
    outs = {}
    for _ in range(max_steps):
        if not eng.has_unfinished_requests():
            return outs
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    raise AssertionError("requests did not finish")


def check_step_limits(eng):
    cfg = eng.config
    for s in eng.step_log:
        assert s.num_prefill_tokens + s.num_decode_tokens <= cfg.max_num_batched_tokens
        assert s.num_seqs <= cfg.max_num_seqs


# ------------------------------------------------------------------ batch builder
def test_batch_builder_fields():
    bb = BatchBuilder(4, "cpu")
    tables = np.zeros((4, 3), dtype=np.int32)
    a = Sequence("a", list(range(10)), SamplingParams(), 0, 0.0, 0)
    a.num_computed_tokens, a.table_row, tables[2] = 4, 2, [7, 3, 5]   # chunk of 5 of 10 (mid-prompt)
    b = Sequence("b", list(range(20, 26)), SamplingParams(), 0, 0.0, 1)
    b.num_computed_tokens, b.table_row, tables[0, :2] = 5, 0, [2, 9]  # decode of its 6th token
    batch = bb.build([(b, 1), (a, 5)], tables)
    assert batch.input_ids.tolist() == [25, 4, 5, 6, 7, 8]
    assert batch.positions.tolist() == [5, 4, 5, 6, 7, 8]
    assert batch.cu_seqlens_q.tolist() == [0, 1, 6]
    assert batch.seq_lens.tolist() == [6, 9]
    assert batch.block_table.tolist() == [[2, 9, 0], [7, 3, 5]]
    assert batch.slot_mapping.tolist() == [9 * 4 + 1, 3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 5 * 4 + 0]
    assert batch.logits_indices.tolist() == [0]               # a's chunk is mid-prompt
    assert batch.sampled_rows.tolist() == [True, False]
    assert (batch.max_seqlen_q, batch.max_seqlen_k) == (5, 9)
    attn = batch.attn
    assert attn.num_seqs == 2 and attn.num_tokens == 6
    # The next build reuses the host buffer; the previous batch must not change.
    before = batch.input_ids.clone()
    bb.build([(a, 6)], tables)
    assert torch.equal(batch.input_ids, before)


def test_batch_builder_pads_for_graphs():
    """pad_to: the real rows are exactly the unpadded batch's; the dummy rows are one-token
    sequences (token 0, position 0, seq_len 1, block 0, slot -1) that are sampled; the table
    has the full width; the bytes land at the start of `out` in batch_layout's layout."""
    bb = BatchBuilder(4, "cpu")
    tables = np.zeros((4, 5), dtype=np.int32)
    a = Sequence("a", list(range(10)), SamplingParams(), 0, 0.0, 0)
    a.num_computed_tokens, a.table_row, tables[2, :3] = 9, 2, [7, 3, 5]
    b = Sequence("b", list(range(20, 26)), SamplingParams(), 0, 0.0, 1)
    b.num_computed_tokens, b.table_row, tables[0, :2] = 5, 0, [2, 9]
    plain = bb.build([(b, 1), (a, 1)], tables)
    out = torch.full((4096,), 0xAB, dtype=torch.uint8)
    padded = bb.build([(b, 1), (a, 1)], tables, pad_to=5, out=out)
    assert padded.input_ids.data_ptr() == out.data_ptr()
    views = batch_layout(5, 5, 5, 5)[1](out, torch)
    for name, v in zip(("input_ids", "positions", "slot_mapping", "logits_indices",
                        "cu_seqlens_q", "seq_lens", "block_table"), views):
        assert torch.equal(getattr(padded, name), v), name
    assert padded.input_ids.tolist() == plain.input_ids.tolist() + [0, 0, 0]
    assert padded.positions.tolist() == plain.positions.tolist() + [0, 0, 0]
    assert padded.slot_mapping.tolist() == plain.slot_mapping.tolist() + [-1, -1, -1]
    assert padded.logits_indices.tolist() == [0, 1, 2, 3, 4]
    assert padded.cu_seqlens_q.tolist() == [0, 1, 2, 3, 4, 5]
    assert padded.seq_lens.tolist() == [6, 10, 1, 1, 1]
    assert padded.block_table.tolist() == [[2, 9, 0, 0, 0], [7, 3, 5, 0, 0]] + [[0] * 5] * 3
    assert padded.sampled_rows.tolist() == [True, True]


def test_graph_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(6) == [1, 2, 4, 6]
    assert graph_buckets(256)[:6] == [1, 2, 4, 8, 16, 24] and graph_buckets(256)[-1] == 256
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20]


def test_decode_steps_take_the_padded_graph_path():
    """cuda_graphs=True on CPU: decode-only steps run the same padded static-buffer forward a
    GPU replays as a graph (5 and 3 running decodes pad to buckets 6 and 4 of max_num_seqs 6);
    mixed steps stay eager; every token is still the rule's."""
    eng = engine(max_num_batched_tokens=64, max_num_seqs=6, num_blocks=64, block_size=4,
                 cuda_graphs=True)
    lens_tokens = [(3, 2), (5, 4), (2, 6), (7, 6), (4, 9)]
    for i, (n, mt) in enumerate(lens_tokens):
        eng.add_request(str(i), [i + 1] * n, SamplingParams(max_tokens=mt, **GREEDY))
    outs = run(eng)
    for i, (n, mt) in enumerate(lens_tokens):
        assert outs[str(i)].token_ids == expected([i + 1] * n, mt)
    seen = {(s.num_seqs, s.graph_batch) for s in eng.step_log if s.graph_batch}
    print(sorted(seen))
    assert {(5, 6), (3, 4), (1, 1)} <= seen
    assert all(s.graph_batch == 0 for s in eng.step_log if s.num_prefill_tokens)
    assert eng.graphs.num_replays == sum(1 for s in eng.step_log if s.graph_batch)
    assert eng.block_manager.num_free_blocks == 64


# ------------------------------------------------------------------ policies
def test_continuous_fuses_decodes_and_chunks():
    eng = engine(max_num_batched_tokens=8, num_blocks=64, block_size=4)
    for i in range(3):
        eng.add_request(f"short{i}", [1 + i, 2], SamplingParams(max_tokens=12, **GREEDY))
    eng.step()                                   # 3 prompts of 2 tokens -> 6 tokens
    eng.add_request("long", list(range(1, 31)), SamplingParams(max_tokens=3, **GREEDY))
    eng.step()
    s = eng.step_log[-1]
    assert (s.num_decode_tokens, s.num_prefill_tokens, s.num_seqs) == (3, 5, 4)
    eng.step()
    s = eng.step_log[-1]
    assert (s.num_decode_tokens, s.num_prefill_tokens) == (3, 5)   # decodes never stall
    outs = run(eng)
    assert outs["long"].token_ids == expected(range(1, 31), 3)
    for i in range(3):
        assert outs[f"short{i}"].token_ids == expected([1 + i, 2], 12)
    check_step_limits(eng)


def test_prefill_first_separates_and_chunks_long_prompts():
    eng = engine(max_num_batched_tokens=8, num_blocks=64, block_size=4, policy="prefill_first")
    for i in range(3):
        eng.add_request(f"short{i}", [1 + i, 2, 3], SamplingParams(max_tokens=6, **GREEDY))
    eng.step()
    assert eng.step_log[-1].num_prefill_tokens == 6           # whole prompts only (3rd waits)
    eng.step()
    eng.add_request("long", list(range(1, 21)), SamplingParams(max_tokens=2, **GREEDY))
    outs = run(eng)
    log = eng.step_log
    assert not any(s.num_prefill_tokens and s.num_decode_tokens for s in log)
    # The 20-token prompt goes through 3 consecutive prefill-only steps (8 + 8 + 4).
    chunks = [s.num_prefill_tokens for s in log[2:5]]
    assert chunks == [8, 8, 4], [(s.num_prefill_tokens, s.num_decode_tokens) for s in log]
    assert outs["long"].token_ids == expected(range(1, 21), 2)
    check_step_limits(eng)


def test_static_batch_admits_nobody_until_done():
    eng = engine(max_num_batched_tokens=64, max_num_seqs=2, num_blocks=64, block_size=4, policy="static")
    eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2, **GREEDY))
    eng.add_request("b", [4, 5], SamplingParams(max_tokens=9, **GREEDY))
    eng.add_request("c", [6], SamplingParams(max_tokens=2, **GREEDY))   # seat limit: next batch
    outs = run(eng)
    m = {r: o.metrics for r, o in outs.items()}
    assert m["c"].first_scheduled_time > m["b"].finish_time > m["a"].finish_time
    for r, p, n in (("a", [1, 2, 3], 2), ("b", [4, 5], 9), ("c", [6], 2)):
        assert outs[r].token_ids == expected(p, n)


@pytest.mark.parametrize("order", ["fcfs", "priority"])
def test_queue_order(order):
    eng = engine(max_num_batched_tokens=4, max_num_seqs=1, num_blocks=64, block_size=4, queue_order=order)
    for rid, prio in (("x", 5), ("y", 0), ("z", 1)):
        eng.add_request(rid, [1, 2, 3], SamplingParams(max_tokens=1, **GREEDY), priority=prio)
    outs = run(eng)
    first = sorted(outs, key=lambda r: outs[r].metrics.first_scheduled_time)
    assert first == (["x", "y", "z"] if order == "fcfs" else ["y", "z", "x"])


def test_preempts_lowest_priority_latest_admitted_and_recomputes():
    # 6 blocks of 2 tokens. Three sequences of 4 prompt tokens each hold 2 full blocks after
    # prefill; the first decode needs a third block, so someone must be evicted.
    eng = engine(max_num_batched_tokens=64, num_blocks=6, block_size=2, queue_order="priority")
    eng.add_request("hi", [1, 2, 3, 4], SamplingParams(max_tokens=6, **GREEDY), priority=0)
    eng.add_request("lo", [4, 5, 6, 7], SamplingParams(max_tokens=6, **GREEDY), priority=9)
    eng.add_request("mid", [7, 8, 9, 1], SamplingParams(max_tokens=6, **GREEDY), priority=5)
    eng.step()
    assert eng.block_manager.num_free_blocks == 0
    eng.step()                                   # the decodes need new blocks
    s = eng.step_log[-1]
    assert s.num_preempted == 1 and s.num_decode_tokens == 2
    victims = list(eng.scheduler.waiting)
    assert [v.request_id for v in victims] == ["lo"] and victims[0].num_preemptions == 1
    outs = run(eng)
    for r, p in (("hi", [1, 2, 3, 4]), ("lo", [4, 5, 6, 7]), ("mid", [7, 8, 9, 1])):
        assert outs[r].token_ids == expected(p, 6)
    assert eng.stats.num_preemptions >= 1
    assert eng.block_manager.num_free_blocks == 6
    eng.block_manager.check()


def test_no_admission_in_a_preempting_step():
    eng = engine(max_num_batched_tokens=64, num_blocks=4, block_size=2)
    eng.add_request("a", [1, 2, 3, 4], SamplingParams(max_tokens=3, **GREEDY))
    eng.add_request("b", [4, 5, 6, 7], SamplingParams(max_tokens=3, **GREEDY))
    eng.step()
    eng.add_request("c", [7], SamplingParams(max_tokens=1, **GREEDY))
    eng.step()          # a's decode evicts b (latest admitted); c could fit but must wait
    s = eng.step_log[-1]
    assert s.num_preempted == 1 and s.num_prefill_tokens == 0 and s.num_seqs == 1
    assert [q.request_id for q in eng.scheduler.waiting] == ["b", "c"]   # b back at the front
    outs = run(eng)
    assert outs["b"].token_ids == expected([4, 5, 6, 7], 3) and outs["c"].token_ids == expected([7], 1)


def test_max_num_seqs_respected():
    eng = engine(max_num_batched_tokens=100, max_num_seqs=3, num_blocks=64, block_size=4)
    for i in range(7):
        eng.add_request(str(i), [i + 1] * 3, SamplingParams(max_tokens=4, **GREEDY))
    outs = run(eng)
    assert max(s.num_seqs for s in eng.step_log) == 3
    assert all(outs[str(i)].token_ids == expected([i + 1] * 3, 4) for i in range(7))


# ------------------------------------------------------------------ property-based
@settings()   # profile (tests/conftest.py): "ci" 80 derandomized examples, "dev" 800
@given(data=st.data(), policy=st.sampled_from(["continuous", "prefill_first", "static"]),
       order=st.sampled_from(["fcfs", "priority"]), block_size=st.sampled_from([1, 2, 4]),
       budget=st.integers(1, 24), max_seqs=st.integers(1, 6), caching=st.booleans(),
       graphs=st.booleans(), overlap=st.booleans())
def test_random_workloads(data, policy, order, block_size, budget, max_seqs, caching, graphs,
                          overlap):
    """Random arrivals, lengths, priorities and aborts over a KV cache small enough to
    preempt: limits hold every step, blocks never leak or double-free, every request that was
    not aborted finishes with exactly the tokens the rule gives (also when decode-only steps
    take the padded CUDA-graph path, run eagerly on CPU, and under async scheduling, where a
    step is launched before the previous one's tokens are read)."""
    max_seqs = min(max_seqs, budget)             # budget >= max_num_seqs (EngineConfig)
    num_blocks = data.draw(st.integers(max(2, 8 // block_size), 24 // block_size + 2), "num_blocks")
    max_len = num_blocks * block_size
    eng = engine(max_num_batched_tokens=budget, max_num_seqs=max_seqs, num_blocks=num_blocks,
                 block_size=block_size, policy=policy, queue_order=order,
                 enable_prefix_caching=caching, max_model_len=max_len, cuda_graphs=graphs,
                 async_scheduling=overlap)
    n_req = data.draw(st.integers(1, 8), "n_req")
    reqs = {}
    for i in range(n_req):
        plen = data.draw(st.integers(1, min(20, max_len - 1)), "plen")
        prompt = [1 + (j * (i % 2 + 1)) % 5 for j in range(plen)]       # shared prefixes
        reqs[str(i)] = (prompt, data.draw(st.integers(1, min(10, max_len - plen)), "max_tokens"),
                        data.draw(st.integers(0, 3), "arrival_step"), data.draw(st.integers(0, 2), "prio"),
                        tuple(data.draw(st.sets(st.integers(0, V - 1), max_size=4), "stop")))
    aborts = data.draw(st.dictionaries(st.sampled_from(sorted(reqs)), st.integers(0, 10), max_size=2), "aborts")
    outs, step = {}, 0
    while step < 4 or eng.has_unfinished_requests():
        for rid, (prompt, mt, at, prio, stop) in reqs.items():
            if at == step:
                eng.add_request(rid, prompt, SamplingParams(max_tokens=mt, stop_token_ids=stop, **GREEDY),
                                priority=prio)
        for rid, at in aborts.items():
            if at == step:
                eng.abort(rid)
        if eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = o
        eng.block_manager.check()
        step += 1
        assert step < 2000, "no progress"
    check_step_limits(eng)
    event(f"preempted: {eng.stats.num_preemptions > 0}")       # --hypothesis-show-statistics
    event(f"prefix hits: {eng.stats.prefix_hit_tokens > 0}")
    event(f"mixed step: {any(s.num_prefill_tokens and s.num_decode_tokens for s in eng.step_log)}")
    event(f"graph step: {any(s.graph_batch for s in eng.step_log)}")
    event(f"stopped by a stop token: {any(o.finish_reason == 'stop' for o in outs.values())}")
    event(f"padded graph step: {any(s.graph_batch > s.num_seqs for s in eng.step_log)}")
    assert graphs or all(s.graph_batch == 0 for s in eng.step_log)
    assert eng.block_manager.num_free_blocks == num_blocks
    for rid, (prompt, mt, at, _, stop) in reqs.items():
        if rid in outs:
            want = expected(prompt, mt, max_len, stop)
            assert outs[rid].token_ids == want, rid
            assert outs[rid].finish_reason == ("stop" if want[-1] in stop else "length")
        else:
            assert rid in aborts and aborts[rid] >= at, rid          # only aborted ones vanish


# ------------------------------------------------------------------ host overhead benchmark
def test_host_overhead_bench_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.host_overhead", "--num-seqs", "32",
                        "--steps", "5", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    import json
    res = json.loads((tmp_path / "host_overhead.json").read_text())
    assert res["num_seqs"] == 32 and res["schedule_build_ms_median"] > 0
    assert np.isfinite(res["engine_step_ms_median"])


def test_graph_capture_failure_raises_when_graphs_were_asked_for(monkeypatch):
    """cuda_graphs=True means graphs or an error (the default, None, serves eagerly with a
    RuntimeWarning on CUDA instead; recorded as Engine.graph_capture_error and in e2e JSON)."""
    from ragged import graphs

    def broken(self):
        raise RuntimeError("capture broke")
    monkeypatch.setattr(graphs.DecodeGraphs, "capture", broken)
    with pytest.raises(RuntimeError, match="capture broke"):
        engine(num_blocks=8, block_size=4, cuda_graphs=True)
    assert engine(num_blocks=8, block_size=4).graph_capture_error is None
