"""bench/ e2e harness: seeded workloads, metrics on a hand-made trace, and a CPU smoke run."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from bench import metrics, workloads
from bench.metrics import RequestTrace

V = 259  # the tiny preset's vocab


# ---------------------------------------------------------------------------- workloads
def _all(seed):
    return {
        "anyscale": workloads.anyscale(20, vocab_size=V, cap=64, prompt_len=33, seed=seed),
        "poisson": workloads.poisson(20, vocab_size=V, rate=5.0, seed=seed),
        "stall": workloads.stall(8, vocab_size=V, long_range=(100, 200), seed=seed),
        "shared_prefix": workloads.shared_prefix(10, vocab_size=V, prefix_len=48, seed=seed),
    }


def test_workloads_reproducible_and_seeded():
    a, b, c = _all(0), _all(0), _all(1)
    for name in a:
        assert a[name] == b[name], name
        assert a[name] != c[name], name
        for r in a[name]:
            assert all(0 <= t < V for t in r.prompt_token_ids), name
            assert r.max_tokens >= 1 and r.arrival_time >= 0
        times = [r.arrival_time for r in a[name]]
        assert times == sorted(times), name
        assert len({r.id for r in a[name]}) == len(a[name]), name
    assert workloads.make("anyscale", 20, vocab_size=V, cap=64, prompt_len=33) == a["anyscale"]


def test_anyscale_output_distribution():
    reqs = workloads.anyscale(4000, vocab_size=V, cap=512, prompt_len=512, seed=3)
    outs = np.array([r.max_tokens for r in reqs])
    # E[min(ceil(X), 512)] for X ~ Exp(128): about 128 * (1 - e^-4) + 0.5 = 126; std err 2.
    print("mean output", outs.mean(), "max", outs.max())
    assert outs.min() >= 1 and outs.max() <= 512
    assert 119 < outs.mean() < 133
    assert all(r.prompt_len == 512 and r.arrival_time == 0.0 for r in reqs)
    # cap 32: P(ceil(X) >= 32) = P(X > 31) = exp(-31/128) = 0.785 of requests sit at the cap.
    capped = np.array([r.max_tokens for r in workloads.anyscale(4000, vocab_size=V, cap=32)])
    print("fraction at cap 32", (capped == 32).mean())
    assert capped.max() == 32 and 0.76 < (capped == 32).mean() < 0.81


def test_poisson_arrivals_and_prompts():
    reqs = workloads.poisson(4000, vocab_size=V, rate=10.0, cap=128, seed=5)
    gaps = np.diff([r.arrival_time for r in reqs])
    lens = np.array([r.prompt_len for r in reqs])
    print("mean gap", gaps.mean(), "mean prompt", lens.mean())
    assert reqs[0].arrival_time == 0.0 and (gaps >= 0).all()
    assert 0.095 < gaps.mean() < 0.105          # 1/rate; std err 0.0016
    assert lens.min() >= 128 and lens.max() <= 384 and 250 < lens.mean() < 262
    assert max(r.max_tokens for r in reqs) <= 128


def test_stall_and_shared_prefix_shapes():
    reqs = workloads.stall(12, vocab_size=V, long_range=(300, 400), interval=0.5, seed=2)
    long = [r for r in reqs if r.id.startswith("stall-long")]
    short = [r for r in reqs if r.id.startswith("stall-decode")]
    assert len(long) == 3 and len(short) == 9
    assert all(300 <= r.prompt_len <= 400 for r in long)
    assert [r.arrival_time for r in long] == [0.5, 1.0, 1.5]
    assert all(r.arrival_time == 0.0 for r in short)
    sp = workloads.shared_prefix(16, vocab_size=V, prefix_len=64, suffix_range=(4, 9), seed=2)
    prefix = sp[0].prompt_token_ids[:64]
    assert all(r.prompt_token_ids[:64] == prefix and 68 <= r.prompt_len <= 73 for r in sp)
    assert len({r.prompt_token_ids for r in sp}) == 16  # suffixes make every prompt unique


@pytest.mark.parametrize("call", [
    lambda: workloads.poisson(4, vocab_size=V, rate=0.0),
    lambda: workloads.anyscale(4, vocab_size=V, cap=0),
    lambda: workloads.anyscale(0, vocab_size=V),
    lambda: workloads.stall(4, vocab_size=V, num_long=4),
    lambda: workloads.make("bursty", 4, vocab_size=V),
])
def test_workload_bad_arguments(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------------------- metrics
def _trace():
    return [
        # A: TTFT 1.0, TPOT (2.5 - 1.0) / 2 = 0.75, ITL 0.5 and 1.0, E2E 2.5
        RequestTrace("A", 10, arrival=0.0, first_token=1.0, finish=2.5, token_times=[1.0, 1.5, 2.5]),
        # B: TTFT 1.0, TPOT (4.0 - 2.0) / 4 = 0.5, ITL 0.2 0.2 0.2 1.4, E2E 3.0
        RequestTrace("B", 20, arrival=1.0, first_token=2.0, finish=4.0,
                     token_times=[2.0, 2.2, 2.4, 2.6, 4.0]),
        # C: one token: TTFT 2.5, no TPOT, no ITL, E2E 2.5
        RequestTrace("C", 5, arrival=0.5, first_token=3.0, finish=3.0, token_times=[3.0]),
    ]


def test_metrics_hand_made_trace():
    s = metrics.summarize(_trace())
    print(json.dumps(s, indent=1))
    approx = lambda x: pytest.approx(x, rel=1e-12, abs=1e-12)  # noqa: E731
    # span 0.0 -> 4.0 s; 35 prompt + 9 output tokens, 3 requests
    assert s["duration_s"] == approx(4.0)
    assert s["prompt_tokens"] == 35 and s["output_tokens"] == 9
    assert s["total_tokens_per_s"] == approx(11.0)
    assert s["output_tokens_per_s"] == approx(2.25)
    assert s["requests_per_s"] == approx(0.75)
    # TTFT [1.0, 1.0, 2.5]; type-7 p90: rank 0.9 * 2 = 1.8 -> 1.0 + 0.8 * 1.5 = 2.2
    assert s["ttft_s"]["mean"] == approx(1.5) and s["ttft_s"]["p50"] == approx(1.0)
    assert s["ttft_s"]["p90"] == approx(2.2) and s["ttft_s"]["p99"] == approx(2.47)
    # TPOT [0.75, 0.5] (C has one token and no TPOT)
    assert s["tpot_s"]["n"] == 2 and s["tpot_s"]["p50"] == approx(0.625)
    # ITL sorted [0.2, 0.2, 0.2, 0.5, 1.0, 1.4]: p50 rank 2.5 -> 0.35; p99 rank 4.95 -> 1.38
    assert s["itl_s"]["n"] == 6 and s["itl_s"]["mean"] == approx(3.5 / 6)
    assert s["itl_s"]["p50"] == approx(0.35) and s["itl_s"]["p99"] == approx(1.38)
    assert s["itl_s"]["max"] == approx(1.4)
    # E2E [2.5, 3.0, 2.5]
    assert s["e2e_s"]["p50"] == approx(2.5) and s["e2e_s"]["mean"] == approx(8 / 3)
    # an explicit start (the benchmark clock's zero) lengthens the span
    assert metrics.summarize(_trace(), start=-1.0)["total_tokens_per_s"] == approx(44 / 5)


def test_metrics_rejects_bad_traces():
    with pytest.raises(ValueError, match="not sorted"):
        RequestTrace("x", 1, 0.0, 1.0, 2.0, [1.0, 0.5])
    with pytest.raises(ValueError, match="arrival"):
        RequestTrace("x", 1, 2.0, 1.0, 2.0, [1.0])
    with pytest.raises(ValueError):
        metrics.summarize([])
    assert metrics.distribution([])["p50"] is None


def test_step_summary_hand_made_log():
    rows = [(10, 0, 2, 0, 4), (5, 2, 3, 1, 0), (0, 3, 3, 0, 0)]
    log = [SimpleNamespace(step=i, num_prefill_tokens=p, num_decode_tokens=d, num_seqs=2,
                           step_time_s=0.1 * (i + 1), schedule_time_s=0.001, kv_blocks_used=k,
                           num_preempted=pre, prefix_hit_tokens=hit, graph_batch=2 * (p == 0),
                           device_time_s=0.05 * (i + 1))
           for i, (p, d, k, pre, hit) in enumerate(rows)]
    s = metrics.step_summary(log, num_blocks=10, prompt_tokens=20)
    print(s)
    assert s["num_steps"] == 3 and s["mixed_steps"] == 1 and s["preemptions"] == 1
    assert s["prefix_hit_rate"] == pytest.approx(0.2)
    assert s["kv_usage_max"] == pytest.approx(0.3) and s["kv_usage_mean"] == pytest.approx(8 / 30)
    assert s["tokens_per_step"]["mean"] == pytest.approx(20 / 3)
    assert s["step_time_s"]["p50"] == pytest.approx(0.2)
    assert s["graph_steps"] == 1 and s["device_span_fraction"] == pytest.approx(0.5)
    log.append(SimpleNamespace(**{**vars(log[0]), "step": 3, "num_seqs": 0, "num_prefill_tokens": 0,
                                  "device_time_s": None, "step_time_s": 0.4}))   # async drain step
    s = metrics.step_summary(log, num_blocks=10, prompt_tokens=20)
    assert s["device_span_fraction"] == pytest.approx(0.3 / 1.0)
    log[1].device_time_s = None        # a CPU engine (or unresolved events): no fraction
    assert "device_span_fraction" not in metrics.step_summary(log, num_blocks=10, prompt_tokens=20)
    assert metrics.step_records([dict(num_decode_tokens=1)])[0]["num_prefill_tokens"] == 0


# ---------------------------------------------------------------------------- harness
def test_failed_system_is_recorded_and_others_run():
    from bench import e2e
    a = SimpleNamespace(device="cpu")

    def broken():
        raise RuntimeError("out of KV blocks")

    def unavailable():
        raise e2e.Unavailable("no generate_batch in this transformers")

    rec, traces = e2e._attempt("ragged:static", a, broken)
    assert traces is None and rec["status"] == "failed" and "out of KV blocks" in rec["error"]
    rec_u, _ = e2e._attempt("hf_continuous", a, unavailable)
    assert rec_u["status"] == "unavailable"
    assert rec_u["error"] == "no generate_batch in this transformers"
    ok, traces = e2e._attempt("ragged:continuous", a, lambda: (_trace(), {}))
    assert ok["status"] == "ok" and ok["summary"]["output_tokens"] == 9 and len(traces) == 3
    assert len(ok["itl_cdf_s"]) == 401 and ok["itl_cdf_s"][0] == pytest.approx(0.2)
    assert ok["itl_cdf_s"][-1] == pytest.approx(1.4)
    assert ok["wall_s"] >= 0 and "load_before" in ok and "load_after" in ok
    systems = {"ragged:static": e2e.aggregate([rec]), "hf_continuous": e2e.aggregate([rec_u]),
               "ragged:continuous": e2e.aggregate([ok])}
    # a system whose second repeat failed: its ok repeat is kept, the status says failed
    half = e2e.aggregate([ok, rec])
    assert half["status"] == "failed" and half["error"].startswith("repeat 1: RuntimeError")
    assert len(half["repeats"]) == 2 and half["spread"]["total_tokens_per_s"]["values"] == [11.0]
    text = e2e.table({"systems": systems | {"ragged:prefill_first": half}})
    print(text)
    assert "failed: RuntimeError: out of KV blocks" in text and "unavailable" in text
    assert "ragged:prefill_first: failed (repeat 1: RuntimeError" in text


def _rec(tok_s, ttft=1.0):
    """A per-repeat record whose summary has the fields aggregate() and table() read."""
    d = {"mean": ttft, "p50": ttft, "p90": ttft, "p99": ttft, "max": ttft, "n": 1}
    return {"status": "ok", "requests": [{"id": "x"}], "itl_cdf_s": [0.1], "wall_s": 1.0,
            "summary": {"total_tokens_per_s": tok_s, "output_tokens_per_s": tok_s / 2,
                        "requests_per_s": tok_s / 100, "ttft_s": d, "tpot_s": d, "itl_s": d,
                        "e2e_s": d}}


def test_repeats_median_spread_and_paired_ratios():
    from bench import e2e
    hf = [_rec(100.0), _rec(50.0), _rec(80.0)]          # repeat 1 ran on a loaded machine
    ours = [_rec(300.0, 2.0), _rec(90.0, 3.0), _rec(200.0, 4.0)]
    payload = {"systems": {"hf_static": e2e.aggregate(hf), "ragged:continuous": e2e.aggregate(ours)}}
    s = payload["systems"]["ragged:continuous"]
    # the median repeat (200 tok/s, repeat 2) is the one whose distributions are kept
    assert s["median_repeat"] == 2 and s["summary"]["total_tokens_per_s"] == 200.0
    assert s["spread"]["total_tokens_per_s"] == {"median": 200.0, "min": 90.0, "max": 300.0,
                                                 "values": [300.0, 90.0, 200.0]}
    assert s["spread"]["ttft_p50_s"]["median"] == 3.0
    # every repeat's summary is kept, the bulky per-request rows only for the median one
    assert len(s["repeats"]) == 3 and all("requests" not in r for r in s["repeats"])
    assert s["requests"] == [{"id": "x"}]
    e2e._compare(payload, {"hf_static": hf, "ragged:continuous": ours}, {})
    sp = s["ratio_to_hf_static_spread"]["total_tokens_per_s"]
    # paired by repeat: 3.0, 1.8, 2.5 (not the ratio of medians 200/80 = 2.5 by luck: the
    # min/max are per pair)
    assert sp["values"] == pytest.approx([3.0, 1.8, 2.5]) and sp["median"] == pytest.approx(2.5)
    assert s["ratio_to_hf_static"]["total_tokens_per_s"] == pytest.approx(2.5)
    payload["load"] = {"cores": 2, "before": [5.0, 1, 1], "after": [1.0, 1, 1]}
    e2e._load_check(payload)
    assert payload["load"]["max_1min"] == 5.0 and "5.0 on 2 cores" in payload["warnings"][0]
    text = e2e.table(payload)
    print(text)
    assert "200 [90-300]" in text and "2.50x [1.80x-3.00x]" in text and "WARNING" in text


def test_run_interleaves_repeats(monkeypatch, tmp_path):
    """run() alternates the systems (A B C A B C) and picks HF static's batch size by its sweep."""
    import model
    from bench import e2e, hf_baseline
    order = []

    def fake(name):
        def fn(*args, **kw):
            order.append(name if name != "hf_static" else f"hf_static:{args[-1]}")
            return _trace(), ({"batch_size": args[-1]} if name == "hf_static" else {})
        return fn

    monkeypatch.setattr(hf_baseline, "build_hf_model", lambda *a, **k: (None, str(tmp_path)))
    monkeypatch.setattr(model, "load_model", lambda *a, **k: None)
    monkeypatch.setattr(e2e, "run_hf_static", fake("hf_static"))
    monkeypatch.setattr(e2e, "run_hf_continuous", fake("hf_continuous"))
    monkeypatch.setattr(e2e, "run_engine", lambda m, policy, *a: fake(policy)())
    monkeypatch.setattr(e2e, "hf_static_sweep", lambda *a: {"best_batch_size": 16, "runs": []})
    a = e2e.parse_args(["--quick", "--device", "cpu", "--repeats", "3",
                        "--policies", "continuous,static"])
    payload = e2e.run(a)
    assert order == ["hf_static:16", "hf_continuous", "continuous", "static"] * 3
    assert all(len(s["repeats"]) == 3 for s in payload["systems"].values())
    assert payload["config"]["repeats"] == 3 and payload["complete"]
    assert payload["load"]["before"] is None or len(payload["load"]["before"]) == 3


def test_recorded_command_reruns_as_a_module(monkeypatch):
    import sys

    from bench import common
    spec = SimpleNamespace(name="bench.e2e")
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", spec, raising=False)
    monkeypatch.setattr(sys, "argv", ["/x/bench/e2e.py", "--out", "a b"])
    assert common.command_line() == "python -m bench.e2e --out 'a b'"


# ---------------------------------------------------------------------------- smoke run
def test_e2e_quick_smoke(tmp_path, capfd):
    from bench import e2e
    payload = e2e.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    # psutil (requirements.txt) lets transformers size its CPU cache without logging an ERROR
    assert "Cannot get memory breakdown" not in capfd.readouterr().err
    files = {p.name for p in tmp_path.iterdir()}
    print(sorted(files))
    stem = e2e.stem(payload)
    assert {f"{stem}.json", f"{stem}_throughput.png", f"{stem}_latency_cdf.png",
            f"{stem}_timeline.png"} <= files
    assert all((tmp_path / f).stat().st_size > 1000 for f in files)
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    systems = saved["systems"]
    assert set(systems) == {"hf_static", "hf_continuous", "ragged:continuous",
                            "ragged:prefill_first", "ragged:static"}
    want_out = saved["workload"]["output_tokens"]
    for name, s in systems.items():
        if name == "hf_continuous" and s["status"] != "ok":
            assert s["status"] == "unavailable" and s["error"]  # said honestly, with the reason
            continue
        assert s["status"] == "ok", name
        # every system did exactly the requested work, and its latencies are causal
        assert s["summary"]["output_tokens"] == want_out, name
        assert all(r["ttft_s"] >= 0 and r["e2e_s"] >= r["ttft_s"] for r in s["requests"]), name
        assert s["ratio_to_hf_static"]["total_tokens_per_s"] > 0
        if name != "hf_static":
            # same weights as HF: random-weight greedy outputs agree (different weights would
            # match a first token 1 time in 259). CPU fp32 with the torch backend: every first
            # token must match, as test_engine.py demands of whole outputs (0.75 let one of
            # the 4 requests disagree)
            print(name, s["agreement_with_hf_static"])
            assert s["agreement_with_hf_static"]["first_token_match"] == 1.0, name
        if name.startswith("ragged:"):
            steps = s["step_log"]
            assert steps and s["steps"]["num_steps"] == len(steps)
            assert sum(r["num_decode_tokens"] for r in steps) + len(s["requests"]) >= want_out
    assert saved["run_info"]["device"].startswith("cpu")
    assert saved["run_info"]["command"].startswith("python -m ")
    sweep = saved["hf_static_sweep"]
    assert [r["batch_size"] for r in sweep["runs"]] == [2, 4]
    best = max(sweep["runs"], key=lambda r: r["total_tokens_per_s"])["batch_size"]
    assert sweep["best_batch_size"] == best == systems["hf_static"]["batch_size"]
    assert saved["load"]["cores"] >= 1 and "warnings" in saved


def test_e2e_poisson_arrivals_respected(tmp_path):
    from bench import e2e
    payload = e2e.main(["--quick", "--device", "cpu", "--workload", "poisson", "--rate", "20",
                        "--systems", "ragged", "--policies", "continuous", "--no-plots",
                        "--repeats", "2", "--out", str(tmp_path)])
    s = payload["systems"]["ragged:continuous"]
    assert s["status"] == "ok" and set(payload["systems"]) == {"ragged:continuous"}
    assert len(s["repeats"]) == 2 and len(s["spread"]["total_tokens_per_s"]["values"]) == 2
    # arrivals spread over time: the run lasts at least until the last request arrived
    assert s["summary"]["duration_s"] >= payload["workload"]["last_arrival_s"]
    assert payload["workload"]["last_arrival_s"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_e2e_quick_smoke_cuda(tmp_path, dtype):
    """The same smoke run on the GPU: every CUDA path of the harness (HF model built on the
    device, CUDA-synced step clock, HF continuous batching with its own memory sizing, the
    engine's profiled KV cache)."""
    from bench import e2e
    payload = e2e.main(["--quick", "--device", "cuda", "--dtype", dtype, "--out", str(tmp_path)])
    systems = payload["systems"]
    print({k: (v["status"], v.get("error", "")[:200]) for k, v in systems.items()})
    assert payload["run_info"]["device"] != "" and "sm_count" in payload["run_info"]
    for name in ("hf_static", "ragged:continuous", "ragged:prefill_first", "ragged:static"):
        assert systems[name]["status"] == "ok", name
        assert systems[name]["summary"]["output_tokens"] == payload["workload"]["output_tokens"]
    assert systems["hf_continuous"]["status"] in ("ok", "unavailable")
    for name in ("ragged:continuous", "ragged:prefill_first", "ragged:static"):
        assert systems[name]["cuda_graphs"] and systems[name]["graph_capture_error"] is None
        assert systems[name]["async_scheduling"]
    span = systems["ragged:continuous"]["steps"]["device_span_fraction"]
    print("device span fraction", span)
    assert 0 < span < 1.5
    if dtype == "float32":
        agree = systems["ragged:continuous"]["agreement_with_hf_static"]["first_token_match"]
        assert agree >= 0.75


def test_decode_step_bench_cpu(tmp_path):
    """bench.decode_step on CPU (eager only): rows for every batch, and its byte count is the
    weights (embedding: B rows only when untied) plus the KV that B sequences read."""
    from bench import decode_step
    payload = decode_step.main(["--device", "cpu", "--batch", "1,3", "--context", "40",
                                "--out", str(tmp_path)])
    assert [r["batch"] for r in payload["rows"]] == [1, 3]
    c = json.loads((tmp_path / "decode_step_tiny_cpu.json").read_text())
    assert c["info"]["commit"] and c["copy_bandwidth_gbs"] > 0
    from model import load_model
    m = load_model("tiny")
    cfg, e = m.config, 4
    params = sum(p.numel() for p in m.parameters())
    emb = 0 if cfg.tie_word_embeddings else (cfg.vocab_size - 3) * cfg.hidden_size
    kv = 3 * 40 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
    assert payload["rows"][1]["bytes"] == (params - emb + kv) * e
    for r in payload["rows"]:
        assert r["eager_ms"] > 0 and r["time_over_bound"] > 0 and "graph_ms" not in r


@pytest.mark.gpu
def test_decode_step_bench_cuda(tmp_path):
    """bench.decode_step on the GPU with the tiny model: eager and CUDA-graph timings for
    both backends (the graph replays the same padded-layout batch the engine uses)."""
    from bench import decode_step
    payload = decode_step.main(["--device", "cuda", "--model", "tiny", "--dtype", "float16",
                                "--batch", "1,3", "--context", "40", "--backends", "triton,cuda",
                                "--out", str(tmp_path)])
    assert [(r["backend"], r["batch"]) for r in payload["rows"]] == [
        ("triton", 1), ("triton", 3), ("cuda", 1), ("cuda", 3)]
    for r in payload["rows"]:
        assert r["eager_ms"] > 0 and r["graph_ms"] > 0 and r["graph_gbs"] > 0


@pytest.mark.gpu
def test_tune_triton_cuda_smoke(tmp_path):
    """bench.tune_triton on the GPU, one small key: every candidate either matches the
    heuristic config's output and is timed, or is rejected with a reason; the table it
    writes loads through the launcher's validation."""
    import torch

    from bench import tune_triton
    from kernels import triton_attention as ta
    table = tmp_path / "t.json"
    payload = tune_triton.main(["--device", "cuda", "--quick", "--head-dims", "64", "--groups", "4",
                                "--write", "--table", str(table), "--out", str(tmp_path)])
    for key, r in payload["results"].items():
        assert r["heuristic_us"] > 0
        assert all(("us" in c) != ("rejected" in c) for c in r["candidates"]), key
        assert any("us" in c for c in r["candidates"]), key
    ta._tuned.cache_clear()
    ta._tuned(ta.device_name(torch.device("cuda")), str(table))   # validates every entry


def test_cpu_main_job_is_sized_for_compute():
    """The no-argument CPU run: a model of a few million parameters (compute, not Python,
    sets its step time), >= 128 Anyscale requests, >= 3 repeats, a concurrency limit below
    the request count (else static and continuous batching do the same work)."""
    import torch

    from bench import e2e
    from model import LlamaForCausalLM, ModelConfig
    s = e2e.SCALES["cpu"]
    m = LlamaForCausalLM(ModelConfig.preset(s["model"]), dtype=torch.float32, device="meta")
    n = sum(p.numel() for p in m.parameters())
    print(s["model"], n, "parameters")
    assert 2e6 <= n <= 10e6
    assert s["num_requests"] >= 128 and s["repeats"] >= 3 and s["max_num_seqs"] < s["num_requests"]
    a = e2e.parse_args(["--device", "cpu"])
    assert a.scale == "cpu" and a.model == s["model"] and a.out is None
