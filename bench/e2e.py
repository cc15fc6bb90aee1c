"""End-to-end serving benchmark: our engine under each scheduling policy vs Hugging Face.

    python -m bench.e2e                          # the main job: a default sized for this machine
    python -m bench.e2e --workload anyscale --cap 1536
    python -m bench.e2e --workload poisson --rate 8 --policies continuous,prefill_first
    python -m bench.e2e --workload stall --systems ragged      # chunked prefill vs stalls
    python -m bench.e2e --workload shared_prefix [--no-prefix-caching]

One workload (bench/workloads.py, seeded) runs through every system on the same weights:
ragged.Engine under each policy (requests added at their arrival times, step() in a loop),
transformers static batching with generate(), and transformers' continuous batching where
the installed version has it. Per system: throughput, TTFT/TPOT/ITL/E2E distributions
(bench/metrics.py), the ratio to HF static, and for our engine the per-step picture from
engine.step_log. Writes <out>/<stem>.json (with bench.common.run_info) and PNG plots.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
from tqdm import tqdm

from . import hf_baseline, metrics, plots, workloads
from .common import load_average, run_info, write_json

POLICIES = ("continuous", "prefill_first", "static")
SYSTEMS = ("ragged", "hf_static", "hf_continuous")
CDF_POINTS = np.linspace(0, 100, 401)

# Sizes per scale. "gpu": the published workload shapes with llama3-8b. "cpu" (the main job on
# this project's 2-core CI machines): the 3.4M-parameter `small` model, 128 requests with the
# Anyscale output distribution (exponential, here mean 32 capped at 128: the cap/mean ratio of
# the study's 512/128), short prompts so decode work dominates, and a concurrency limit of 64
# (below the request count, as on any real server, so static batching forms 2 batches while
# continuous batching refills its 64 slots; at 32, 2x more steps of half the rows measured
# 1.4x HF static instead of 2.1x, at load ~10); all 5 systems x 3 repeats near two minutes
# of CPU time.
# HF static sweeps 16-128 (size 8 measured 207 tok/s against 477 at 32: never the best here).
# "quick": a smoke test.
SCALES = {
    "gpu": dict(model="llama3-8b", dtype="bfloat16", num_requests=256, cap=512, rate=4.0,
                hf_batch_sizes=(8, 16, 32, 64), hf_max_requests=64, mean_output=128.0,
                prompt_len=512, max_num_seqs=None, repeats=3,
                prompt_range=(128, 384), long_range=(4096, 8000), decode_prompt_len=128,
                decode_tokens=256, interval=1.0, prefix_len=2048, suffix_range=(16, 64)),
    "cpu": dict(model="small", dtype="float32", num_requests=128, cap=128, rate=8.0,
                hf_batch_sizes=(16, 32, 64, 128), hf_max_requests=None, mean_output=32.0,
                prompt_len=32, max_num_seqs=64, repeats=3,
                prompt_range=(16, 48), long_range=(384, 768), decode_prompt_len=32,
                decode_tokens=64, interval=0.5, prefix_len=256, suffix_range=(8, 32)),
    "quick": dict(model="tiny", dtype="float32", num_requests=4, cap=8, rate=50.0,
                  hf_batch_sizes=(2, 4), hf_max_requests=None, mean_output=4.0, prompt_len=16,
                  max_num_seqs=None, repeats=1,
                  prompt_range=(8, 24), long_range=(64, 96), decode_prompt_len=8,
                  decode_tokens=8, interval=0.05, prefix_len=32, suffix_range=(4, 8)),
}


def workload_kwargs(name: str, s: dict) -> dict:
    """The generator arguments of workload `name` at the sizes in s."""
    out = dict(cap=s["cap"], mean_output=s["mean_output"])
    if name == "anyscale":
        return out | dict(prompt_len=s["prompt_len"])
    if name == "poisson":
        return out | dict(rate=s["rate"], prompt_range=s["prompt_range"])
    if name == "shared_prefix":
        return out | dict(prefix_len=s["prefix_len"], suffix_range=s["suffix_range"])
    if name == "repeated_span":
        return out | dict(prompt_len=s["prompt_len"])
    if name == "stall":
        return dict(long_range=s["long_range"], decode_prompt_len=s["decode_prompt_len"],
                    decode_tokens=s["decode_tokens"], interval=s["interval"])
    raise ValueError(f"workload must be one of {sorted(workloads.WORKLOADS)}, got {name!r}")


def _free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- our engine
def drive(engine, requests, *, t0=None, progress=None, timeout_s=None) -> list[metrics.RequestTrace]:
    """Feed requests to engine at their arrival times and step until all are done."""
    from ragged import SamplingParams
    pending = sorted(requests, key=lambda r: r.arrival_time)
    by_id = {r.id: r for r in requests}
    t0 = time.perf_counter() if t0 is None else t0
    traces, i = [], 0
    while i < len(pending) or engine.has_unfinished_requests():
        now = time.perf_counter()
        if timeout_s is not None and now - t0 > timeout_s:
            raise RuntimeError(f"{len(traces)}/{len(requests)} requests done after {timeout_s} s")
        while i < len(pending) and t0 + pending[i].arrival_time <= now:
            r = pending[i]
            i += 1
            # Greedy, exact length: the same work HF does. The arrival stamp is the scheduled
            # time, so time the loop spent in step() before noticing counts as queueing.
            params = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
            engine.add_request(r.id, list(r.prompt_token_ids), params, priority=r.priority,
                               arrival_time=t0 + r.arrival_time)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, t0 + pending[i].arrival_time - time.perf_counter()))
            continue
        for out in engine.step():
            if not out.finished:
                continue
            r, m = by_id[out.request_id], out.metrics
            if len(out.token_ids) != r.max_tokens:
                raise RuntimeError(f"request {r.id}: {len(out.token_ids)} tokens, "
                                   f"asked for {r.max_tokens}")
            traces.append(metrics.RequestTrace(
                r.id, r.prompt_len, t0 + r.arrival_time, m.first_token_time, m.finish_time,
                list(m.token_times), list(out.token_ids)))
            if progress is not None:
                progress.update(1)
    return traces


def run_engine(model, policy, requests, warmup, a) -> tuple[list, dict]:
    """One policy on an already loaded model (loaded once for all policies: 16 GB for
    llama3-8b); each policy gets a fresh engine and KV cache."""
    from ragged import LLM
    extra = {k: v for k, v in dict(block_size=a.block_size, num_blocks=a.num_blocks,
                                   max_num_batched_tokens=a.max_num_batched_tokens,
                                   max_num_seqs=a.max_num_seqs).items() if v is not None}
    if a.speculative:
        extra["speculative"] = speculative_args(a)
    if a.no_prefix_caching:
        extra["enable_prefix_caching"] = False
    if a.no_cuda_graphs:
        extra["cuda_graphs"] = False
    if a.no_async_scheduling:
        extra["async_scheduling"] = False
    if a.tensor_parallel_size > 1:      # model is then the directory: each rank loads its shard
        extra.update(tensor_parallel_size=a.tensor_parallel_size, dtype=a.dtype, device=a.device)
    if a.kv_cache_dtype != "auto":
        extra["kv_cache_dtype"] = a.kv_cache_dtype
    llm = LLM(model, policy=policy, seed=a.seed, **extra)
    engine = llm.engine
    try:
        drive(engine, warmup)  # JIT compilation and allocator warm-up stay out of the timing
        first_step = len(engine.step_log)
        with tqdm(total=len(requests), desc=f"ragged:{policy}", unit="req", leave=False) as bar:
            traces = drive(engine, requests, progress=bar, timeout_s=a.system_timeout)
        engine.device_times(wait=True)
        steps = list(engine.step_log[first_step:])
        info = {"num_blocks": engine.block_manager.num_blocks, "engine_args": extra,
                "cuda_graphs": engine.graphs is not None,
                "graph_capture_error": engine.graph_capture_error,
                "async_scheduling": engine.async_scheduling,
                "steps": metrics.step_summary(steps, num_blocks=engine.block_manager.num_blocks,
                                              prompt_tokens=sum(r.prompt_len for r in requests)),
                "step_log": metrics.step_records(steps)}
        if a.speculative:
            info["speculation"] = metrics.speculation_summary(steps)
        return traces, info
    finally:
        llm.close()                     # tensor parallelism: ends the workers (else a no-op)
        del engine, llm
        _free(a.device)


# ---------------------------------------------------------------------------- the run
def _per_request(traces) -> list[dict]:
    return [{"id": t.id, "prompt_len": t.prompt_len, "output_len": t.output_len,
             "ttft_s": metrics.ttft(t), "tpot_s": metrics.tpot(t), "e2e_s": metrics.e2e(t)}
            for t in sorted(traces, key=lambda t: t.id)]


def _agreement(traces, ref) -> dict | None:
    """How often greedy outputs match HF static's (same weights): informational, since
    kernels reorder float sums and random-weight logits are close to ties."""
    ref = {t.id: t.token_ids for t in ref if t.token_ids}
    pairs = [(t.token_ids, ref[t.id]) for t in traces if t.token_ids and t.id in ref]
    if not pairs:
        return None
    first = sum(a[0] == b[0] for a, b in pairs) / len(pairs)
    same = sum(a == b for a, b in pairs) / len(pairs)
    return {"first_token_match": first, "all_tokens_match": same, "n": len(pairs)}


def warmup_requests(name, vocab_size, kwargs, seed) -> list:
    """A few requests shaped like the workload's shortest and longest prompts (other seed, so
    no prefix-cache hits on the real ones), all at t=0, at most 4 output tokens: kernels get
    compiled/tuned for the run's shapes before the clock starts."""
    reqs = sorted(workloads.make(name, 8, vocab_size=vocab_size, seed=seed + 1000, **kwargs),
                  key=lambda r: r.prompt_len)
    return [workloads.Request(f"warmup-{i}", r.prompt_token_ids, min(r.max_tokens, 4), 0.0)
            for i, r in enumerate(reqs[:2] + reqs[-2:])]


class Unavailable(RuntimeError):
    """The installed transformers cannot run this system here (reported, not a failure)."""


def _result(traces, extra=None) -> dict:
    itl = [x for t in traces for x in metrics.itls(t)]
    return {"status": "ok", "summary": metrics.summarize(traces), "requests": _per_request(traces),
            # the ITL CDF at every 0.25 percent (for plots): all samples would be ~65k floats
            "itl_cdf_s": (np.percentile(itl, CDF_POINTS, method=metrics.PERCENTILE_METHOD).tolist()
                          if itl else []),
            **(extra or {})}


def _attempt(name, a, fn) -> tuple[dict, list | None]:
    """Run one system once -> (record, traces or None). A failure is recorded with its error
    (the other systems and repeats still run); "unavailable" says this install lacks it."""
    load, t = load_average(), time.perf_counter()
    try:
        traces, extra = fn()
    except Unavailable as e:
        rec, traces = {"status": "unavailable", "error": str(e)}, None
    except Exception as e:  # noqa: BLE001 - one broken system must not lose the others
        rec, traces = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()[-3000:]}, None
        print(f"\n{name} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        _free(a.device)
    else:
        rec = _result(traces, extra)
    rec["wall_s"] = time.perf_counter() - t
    rec["load_before"], rec["load_after"] = load, load_average()
    return rec, traces


# Scalars reported as median [min, max] over repeats: (label, summary key, distribution key).
SPREAD = (("total_tokens_per_s", "total_tokens_per_s", None),
          ("output_tokens_per_s", "output_tokens_per_s", None),
          ("requests_per_s", "requests_per_s", None),
          ("ttft_p50_s", "ttft_s", "p50"), ("tpot_p50_s", "tpot_s", "p50"),
          ("itl_p50_s", "itl_s", "p50"), ("itl_p99_s", "itl_s", "p99"),
          ("e2e_p50_s", "e2e_s", "p50"), ("e2e_p99_s", "e2e_s", "p99"))
# Per-repeat fields kept for every repeat; the per-request rows, CDF and step log only for the
# median repeat (the one the plots draw), so the JSON stays small.
_BULKY = ("requests", "itl_cdf_s", "step_log", "traceback")


def _spread(values) -> dict | None:
    v = [x for x in values if x is not None]
    return ({"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}
            if v else None)


def aggregate(records: list[dict]) -> dict:
    """One system's repeats -> its entry: the median repeat's summary and distributions (by
    total tokens/s; the lower middle one for an even count), every repeat's summary, and
    median/min/max of the headline scalars. Status "ok" only if every repeat was."""
    ok = [r for r in records if r["status"] == "ok"]
    bad = [(i, r) for i, r in enumerate(records) if r["status"] != "ok"]
    if not ok:
        out = {k: records[0][k] for k in ("status", "error") if k in records[0]}
        return out | {"repeats": records}
    ranked = sorted(ok, key=lambda r: r["summary"]["total_tokens_per_s"])
    med = ranked[(len(ranked) - 1) // 2]
    out = dict(med)
    out["median_repeat"] = records.index(med)
    out["repeats"] = [{k: v for k, v in r.items() if k not in _BULKY} for r in records]
    out["spread"] = {label: _spread(r["summary"][key] if sub is None else r["summary"][key][sub]
                                    for r in ok) for label, key, sub in SPREAD}
    if bad:
        i, r = bad[0]
        out["status"], out["error"] = "failed", f"repeat {i}: {r.get('error', r['status'])}"
    return out


def _hf_subset(requests, a):
    return requests[:a.hf_max_requests] if a.hf_max_requests else requests


def run_hf_static(hf_model, requests, warmup, a, batch_size):
    """HF static batching at batch_size, optionally on the first hf_max_requests requests
    only: its throughput is a per-batch rate (batches of i.i.d. requests), so a few batches
    measure it while the whole set would take 10+ minutes on an 8B model; the JSON says so."""
    subset = _hf_subset(requests, a)
    hf_baseline.run_static(hf_model, warmup, batch_size=2, device=a.device)
    with tqdm(total=len(subset), desc=f"hf_static:{batch_size}", unit="req", leave=False) as bar:
        tr = hf_baseline.run_static(hf_model, subset, batch_size=batch_size,
                                    device=a.device, progress=bar, timeout_s=a.system_timeout)
    extra = {"batch_size": batch_size}
    if len(subset) < len(requests):
        extra["subset"] = (f"first {len(subset)} of {len(requests)} requests (throughput is a "
                           "rate; its latencies lack the queueing of the later batches)")
    return tr, extra


def hf_static_sweep(hf_model, requests, warmup, a) -> dict:
    """One pass of HF static at each batch size in a.hf_batch_sizes (sizes above the request
    count collapse to one batch of all): the baseline runs at its best one, as the Anyscale
    study tuned its static baselines. A single pass per size, before the repeats: the choice
    can be off by a near-tie when the machine is noisy, never by a handicap (the repeats then
    measure the chosen size next to the other systems)."""
    pool = _hf_subset(requests, a)
    sizes = sorted({min(b, len(pool)) for b in a.hf_batch_sizes})
    if len(sizes) == 1:   # one size asked for (--hf-batch-size): nothing to choose
        return {"batch_sizes": sizes, "best_batch_size": sizes[0], "runs": []}
    rows = []
    for bs in sizes:
        load = load_average()
        # Two batches measure the rate of i.i.d. batches: the first max(2 bs, 64) requests
        # (halves the sweep's time at the small sizes: 42 s of the CPU job's 128 s at size 8)
        part = pool[:max(2 * bs, 64)]
        try:
            traces, _ = run_hf_static(hf_model, part, warmup, a, bs)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at the largest size
            rows.append({"batch_size": bs, "error": f"{type(e).__name__}: {e}", "load_before": load})
            _free(a.device)
            continue
        m = metrics.summarize(traces)
        rows.append({"batch_size": bs, "num_requests": len(part),
                     "total_tokens_per_s": m["total_tokens_per_s"],
                     "output_tokens_per_s": m["output_tokens_per_s"],
                     "duration_s": m["duration_s"], "load_before": load})
    ok = [r for r in rows if "error" not in r]
    if not ok:
        raise RuntimeError(f"HF static failed at every batch size: {rows}")
    best = max(ok, key=lambda r: r["total_tokens_per_s"])["batch_size"]
    return {"batch_sizes": sizes, "best_batch_size": best, "runs": rows}


def run_hf_continuous(hf_model, requests, warmup, a):
    """transformers' continuous batching: its defaults first (it switches to flash attention
    when installed), then without that switch (flash kernels it cannot load offline). If
    both fail it is reported "unavailable" with both errors, never hidden."""
    errors = []
    for options in ({}, {"auto_switch_to_flash": False}):
        try:
            hf_baseline.run_continuous(hf_model, warmup, device=a.device, options=options)
            with tqdm(total=len(requests), desc="hf_continuous", unit="req", leave=False) as bar:
                tr = hf_baseline.run_continuous(hf_model, requests, device=a.device, progress=bar,
                                                options=options, timeout_s=a.system_timeout)
        except Exception as e:  # noqa: BLE001 - any failure means "not available here"
            errors.append(f"options {options}: {type(e).__name__}: {e}")
            _free(a.device)
            continue
        if hasattr(hf_model, "destroy_cached_continuous_batching_manager"):
            hf_model.destroy_cached_continuous_batching_manager()  # its cache, before the next system
        return tr, {"options": options, "errors_before": errors,
                    "attn_implementation": getattr(hf_model.config, "_attn_implementation", None)}
    raise Unavailable(" | ".join(errors))


def _compare(payload, records, traces_by):
    """Ratios to the HF baselines, paired by repeat (A B C A B C: repeat i of a system ran
    next to repeat i of the baseline, under the same load), as median [min, max]; and
    greedy-output agreement with HF static."""
    systems = payload["systems"]
    for base_name in ("hf_static", "hf_continuous"):
        base = records.get(base_name, [])
        for name, recs in records.items():
            if systems[name].get("summary") is None:
                continue
            pairs = [(r["summary"], b["summary"]) for r, b in zip(recs, base)
                     if r["status"] == "ok" and b["status"] == "ok"]
            if not pairs:
                continue
            sp = {k: _spread(x[k] / y[k] for x, y in pairs)
                  for k in ("total_tokens_per_s", "output_tokens_per_s", "requests_per_s")}
            systems[name][f"ratio_to_{base_name}"] = {k: v["median"] for k, v in sp.items()}
            systems[name][f"ratio_to_{base_name}_spread"] = sp
    own = payload.get("config", {}).get("hf_own_weights")
    ref = None if own else traces_by.get("hf_static")
    for name, s in systems.items():
        if ref is not None and name in traces_by:
            s["agreement_with_hf_static"] = _agreement(traces_by[name], ref)


def speculative_args(a) -> dict | None:
    """--speculative & co. as SpeculativeConfig fields (None: no speculation)."""
    if not a.speculative:
        return None
    d = dict(method=a.speculative, num_speculative_tokens=a.num_speculative_tokens,
             draft_model=a.draft_model if a.speculative == "draft" else None)
    if a.max_verify_tokens is not None:
        d["max_verify_tokens"] = a.max_verify_tokens or None      # 0: the rule off
    return d


def _load_check(payload):
    """A warning for every recorded load average above the core count: numbers from such a
    run measure the neighbours too (the JSON keeps them all)."""
    cores = payload["load"]["cores"]
    seen = [payload["load"]["before"], payload["load"]["after"]]
    for s in payload["systems"].values():
        for r in s.get("repeats", []):
            seen += [r.get("load_before"), r.get("load_after")]
    worst = max((x[0] for x in seen if x), default=None)
    payload["load"]["max_1min"] = worst
    payload["warnings"] = ([f"1-minute load average reached {worst:.1f} on {cores} cores: other "
                            "work shared the machine; compare systems by their paired ratios"]
                           if worst is not None and worst > cores else [])


def run(a, checkpoint=None) -> dict:
    """Run every system a.repeats times, interleaved (A B C A B C), after HF static's batch
    size sweep; checkpoint(payload) is called after each run, so a run killed by a time limit
    still leaves what it finished on disk."""
    scale = dict(SCALES[a.scale])
    for k in ("num_requests", "cap", "rate", "mean_output", "prompt_len", "hf_batch_sizes",
              "hf_max_requests", "max_num_seqs", "repeats"):
        if getattr(a, k, None) is not None:
            scale[k] = getattr(a, k)
    a.hf_batch_sizes, a.hf_max_requests = scale["hf_batch_sizes"], scale["hf_max_requests"]
    a.max_num_seqs, a.repeats = scale["max_num_seqs"], scale["repeats"]
    from model import ModelConfig
    cfg = (ModelConfig.from_hf_config(a.model) if os.path.isdir(a.model)
           else ModelConfig.preset(a.model))
    kwargs = workload_kwargs(a.workload, scale)
    requests = workloads.make(a.workload, scale["num_requests"], vocab_size=cfg.vocab_size,
                              seed=a.seed, **kwargs)
    warmup = warmup_requests(a.workload, cfg.vocab_size, kwargs, a.seed)
    dtype = getattr(torch, a.dtype)
    outs = [r.max_tokens for r in requests]
    payload = {
        "run_info": run_info(a.device),
        "complete": False,
        "config": {"workload": a.workload, "model": a.model, "dtype": a.dtype, "device": a.device,
                   "scale": a.scale, "seed": a.seed, "workload_kwargs": kwargs,
                   "repeats": a.repeats, "hf_batch_sizes": a.hf_batch_sizes,
                   "hf_max_requests": a.hf_max_requests, "max_num_seqs": a.max_num_seqs,
                   "torch_threads": torch.get_num_threads(),
                   "policies": a.policies, "systems": a.systems,
                   "speculative": speculative_args(a),
                   "hf_own_weights": bool(a.hf_own_weights),
                   "sampling": "greedy, ignore_eos, exact max_tokens per request"},
        "workload": {"num_requests": len(requests),
                     "prompt_tokens": sum(r.prompt_len for r in requests),
                     "output_tokens": sum(outs), "output_len_mean": sum(outs) / len(outs),
                     "output_len_max": max(outs),
                     "last_arrival_s": max(r.arrival_time for r in requests)},
        "load": {"cores": os.cpu_count(), "before": load_average(), "after": None},
        "systems": {},
        "notes": {"hf_static": "token times from a per-step callback (what streaming would show); "
                               "finish = when generate() returns the batch; run at the best batch "
                               "size of hf_static_sweep",
                  "repeats": "every system runs `repeats` times, interleaved (A B C A B C); "
                             "summary/requests/CDFs are the median repeat's (by total tok/s), "
                             "spread has median/min/max over repeats, ratios are paired by repeat",
                  "percentiles": f"numpy.percentile(method={metrics.PERCENTILE_METHOD!r}), "
                                 "Hyndman-Fan type 7",
                  "throughput": "requested tokens only (prompt + max_tokens) over first "
                                "arrival -> last finish; padding and overshoot are waste"},
    }
    systems, records, traces_by = payload["systems"], {}, {}

    def attempt(name, fn):
        rec, traces = _attempt(name, a, fn)
        records.setdefault(name, []).append(rec)
        systems[name] = aggregate(records[name])
        if traces is not None and systems[name].get("median_repeat") == len(records[name]) - 1:
            traces_by[name] = traces
        _compare(payload, records, traces_by)
        payload["load"]["after"] = load_average()
        _load_check(payload)
        if checkpoint is not None:
            checkpoint(payload)

    with tempfile.TemporaryDirectory(prefix="ragged-e2e-") as tmp:
        own = a.hf_own_weights and not os.path.isdir(a.model)
        if any(s.startswith("hf_") for s in a.systems):
            hf_model, model_dir = hf_baseline.build_hf_model(a.model, dtype=dtype,
                                                             device=a.device, seed=a.seed,
                                                             save_dir=tmp, own_weights=own)
        else:       # no HF system: nothing to share, our engine loads the model itself
            hf_model, model_dir = None, a.model
        if own:     # no save/reload (16 GB for llama3-8b): each system draws its own weights
            model_dir = a.model
            payload["notes"]["hf_own_weights"] = (
                "HF and our engine hold different random weights (--hf-own-weights): HF static "
                "is a throughput baseline only; token agreement is not computed")
        ours = None
        if "ragged" in a.systems:
            # Both models stay loaded so the systems can alternate; on a GPU the engine's KV
            # cache is sized from what is free, with HF's weights counted as used.
            from model import load_model
            ours = (model_dir if a.tensor_parallel_size > 1 else     # each rank loads its shard
                    load_model(model_dir, dtype=dtype, device=a.device, seed=a.seed))
        runners = []
        if "hf_static" in a.systems:
            payload["hf_static_sweep"] = sweep = hf_static_sweep(hf_model, requests, warmup, a)
            runners.append(("hf_static", lambda: run_hf_static(hf_model, requests, warmup, a,
                                                               sweep["best_batch_size"])))
        if "hf_continuous" in a.systems:
            runners.append(("hf_continuous", lambda: run_hf_continuous(hf_model, requests, warmup, a)))
        for policy in a.policies if "ragged" in a.systems else ():
            runners.append((f"ragged:{policy}",
                            lambda p=policy: run_engine(ours, p, requests, warmup, a)))
        if torch.device(a.device).type == "cuda":
            payload["cuda_gib_allocated_before_engine"] = torch.cuda.memory_allocated() / 2**30
        for _ in range(a.repeats):
            for name, fn in runners:
                attempt(name, fn)
        del hf_model, ours
        _free(a.device)
    payload["complete"] = True
    return payload


def _ms(v):
    return f"{v * 1e3:.1f}" if v is not None else "-"


def _range(sp, fmt, scale=1.0) -> str:
    """median [min-max] of a spread entry ('-' when missing; the median alone for 1 repeat)."""
    if not sp:
        return "-"
    med = fmt.format(sp["median"] * scale)
    if len(sp["values"]) < 2:
        return med
    return f"{med} [{fmt.format(sp['min'] * scale)}-{fmt.format(sp['max'] * scale)}]"


def table(payload) -> str:
    """Median over repeats [min-max] for throughput and the ratio to HF static (paired by
    repeat); latencies are medians over repeats of each repeat's percentile, in ms."""
    cols = ("tok/s", "out tok/s", "x HF static", "TTFT p50", "TPOT p50", "ITL p50", "ITL p99",
            "E2E p50", "E2E p99")
    rows = [("system",) + cols, ("",) * 4 + ("(ms)",) * 6]
    notes = []
    for name, s in payload["systems"].items():
        sp = s.get("spread")
        if s["status"] != "ok" and not sp:
            notes.append(f"{name}: {s['status']}: {s.get('error', '')[:150]}")
            continue
        if s["status"] != "ok":
            notes.append(f"{name}: {s['status']} ({s.get('error', '')[:150]}); row = ok repeats")
        ratio = s.get("ratio_to_hf_static_spread", {}).get("total_tokens_per_s")
        label = name + (f" (batch {s['batch_size']})" if "batch_size" in s else "")
        rows.append((label, _range(sp["total_tokens_per_s"], "{:.0f}"),
                     _range(sp["output_tokens_per_s"], "{:.0f}"), _range(ratio, "{:.2f}x"))
                    + tuple(_ms(sp[k]["median"] if sp[k] else None)
                            for k in ("ttft_p50_s", "tpot_p50_s", "itl_p50_s", "itl_p99_s",
                                      "e2e_p50_s", "e2e_p99_s")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    for name, s in payload["systems"].items():
        st = s.get("steps") if s["status"] == "ok" else None
        if st and st.get("num_steps"):
            span = st.get("device_span_fraction")
            lines.append(f"  {name}: {st['num_steps']} steps, {st['mixed_steps']} mixed, "
                         f"{st['graph_steps']} CUDA-graph decode steps"
                         + (f", device span {100 * span:.1f}% of step time" if span is not None else "")
                         + (f"; CUDA GRAPH CAPTURE FAILED: {s['graph_capture_error'][:200]}"
                            if s.get("graph_capture_error") else ""))
    for name, s in payload["systems"].items():
        sp = s.get("speculation") if s["status"] == "ok" else None
        if sp:
            lines.append(f"  {name}: speculation: acceptance {sp['acceptance_rate']}, "
                         f"{sp['mean_accepted_per_verification']} accepted per verification, "
                         f"{sp['output_tokens_per_step']} output tokens per step")
    sweep = payload.get("hf_static_sweep")
    if sweep and not sweep["runs"]:
        lines.append(f"  hf_static: batch size {sweep['best_batch_size']} given, no sweep")
    elif sweep:
        lines.append("  hf_static batch-size sweep (total tok/s, one pass each): " + ", ".join(
            f"{r['batch_size']}: " + (f"{r['total_tokens_per_s']:.0f}" if "error" not in r else "failed")
            for r in sweep["runs"]) + f" -> {sweep['best_batch_size']}")
    load = payload.get("load")
    if load:
        lines.append(f"  load average (1/5/15 min) before {load['before']}, after {load['after']}, "
                     f"max 1-min {load.get('max_1min')} on {load['cores']} cores")
    lines += [f"  {n}" for n in notes]
    lines += [f"  WARNING: {w}" for w in payload.get("warnings", [])]
    return "\n".join(lines)


def stem(payload) -> str:
    c = payload["config"]
    model = c["model"].rstrip("/").split("/")[-1]
    tag = {"anyscale": f"_cap{c['workload_kwargs'].get('cap')}",
           "poisson": f"_rate{c['workload_kwargs'].get('rate')}"}.get(c["workload"], "")
    sp = c.get("speculative")
    tag += f"_spec-{sp['method']}{sp['num_speculative_tokens']}" if sp else ""
    return f"e2e_{c['workload']}{tag}_{model}_{torch.device(c['device']).type}{'_quick' if c['scale'] == 'quick' else ''}"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected ints >= 1, got {text!r}")
    return vals


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="anyscale", choices=sorted(workloads.WORKLOADS))
    p.add_argument("--model", help="preset name or HF directory (default: tiny on CPU, llama3-8b on GPU)")
    p.add_argument("--num-requests", type=int)
    p.add_argument("--cap", type=int, help="output length cap (anyscale sweep: 32, 128, 512, 1536)")
    p.add_argument("--rate", type=float, help="poisson arrival rate, requests/s")
    p.add_argument("--mean-output", type=float, help="mean of the exponential output length")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--out", help="output directory (default runs/, ignored by git; commit a "
                                 "result from --out bench/results/<device>)")
    p.add_argument("--quick", action="store_true", help="a few tiny requests (smoke test)")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads for every system (default on CPU: 1. Two "
                        "threads on a 2-core machine shared with other work spin against each "
                        "other: an HF decode step of the small model at batch 8 took 255 ms "
                        "with 2 threads and 20 ms with 1 at load average 11)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-len", type=int, help="anyscale prompt length")
    p.add_argument("--repeats", type=int, help="runs of every system, interleaved (default 3; quick 1)")
    p.add_argument("--hf-batch-sizes", type=_int_list,
                   help="HF static batch sizes to sweep; the best one is the baseline "
                        "(default 8,16,32,64 on GPU, 16,32,64,128 on CPU)")
    p.add_argument("--hf-batch-size", type=_int_list, dest="hf_batch_sizes",
                   help="one HF static batch size (no sweep)")
    p.add_argument("--hf-own-weights", action="store_true",
                   help="preset models: HF builds its own random weights, nothing is saved or "
                        "reloaded (GPU first light: saves 16 GB of I/O; no token agreement)")
    p.add_argument("--hf-max-requests", type=int,
                   help="run HF static on the first N requests only (0: all; GPU default 64)")
    p.add_argument("--block-size", type=int)
    p.add_argument("--num-blocks", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--speculative", choices=("ngram", "draft"),
                   help="speculative decoding for our engine (docs/speculative.md)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--draft-model", default="tiny", help="--speculative draft: preset or HF dir")
    p.add_argument("--max-verify-tokens", type=int,
                   help="large-batch rule: decodes x (1 + k) cap (default 256, 0 = off)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8_e4m3"),
                   help="engine KV cache format (fp8_e4m3: e4m3 pages + per-slot scales)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run decode steps eagerly (A/B against the default CUDA-graph replay)")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="read each step's tokens before launching the next (A/B against overlap)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard our engine over N processes/GPUs (docs/tensor_parallel.md)")
    p.add_argument("--system-timeout", type=float, default=900.0,
                   help="seconds one system may run before it is recorded as failed")
    a = p.parse_args(argv)
    if a.repeats is not None and a.repeats < 1:
        p.error(f"--repeats: must be >= 1, got {a.repeats}")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads: must be >= 1, got {a.threads}")
    a.scale = "quick" if a.quick else ("gpu" if torch.device(a.device).type == "cuda" else "cpu")
    a.model = a.model or SCALES[a.scale]["model"]
    a.dtype = a.dtype or SCALES[a.scale]["dtype"]
    a.policies = [x for x in a.policies.split(",") if x]
    a.systems = [x for x in a.systems.split(",") if x]
    for x in a.policies:
        if x not in POLICIES:
            p.error(f"--policies: {x!r} is not one of {POLICIES}")
    for x in a.systems:
        if x not in SYSTEMS:
            p.error(f"--systems: {x!r} is not one of {SYSTEMS}")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    threads = a.threads or (1 if torch.device(a.device).type == "cpu" else None)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _main(a)
    finally:
        torch.set_num_threads(before)


def _main(a) -> dict:
    t = time.perf_counter()

    def checkpoint(p):
        p["wall_s"] = time.perf_counter() - t
        return write_json(stem(p), p, a.out)

    payload = run(a, checkpoint)
    path, name = checkpoint(payload), stem(payload)
    files = [] if a.no_plots else plots.write_all(payload, path.parent, name)
    print(f"\n{a.workload} on {payload['run_info']['device']}, model {a.model} ({a.dtype}), "
          f"{payload['workload']['num_requests']} requests, median of {a.repeats} interleaved "
          f"repeats [min-max], {payload['wall_s']:.0f} s")
    print(table(payload))
    for name, s in payload["systems"].items():
        if "subset" in s:
            print(f"  note: {name} ran on the {s['subset']}")
    print("wrote", path, *files, sep="\n  ")
    return payload


if __name__ == "__main__":
    result = main(sys.argv[1:])
    # "unavailable" (HF continuous batching missing here) is an honest answer, not an error
    sys.exit(int(any(s["status"] == "failed" for s in result["systems"].values())))
