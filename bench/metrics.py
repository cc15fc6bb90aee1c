"""Serving metrics from per-request timestamps and per-step logs. Pure functions, no torch.

Definitions (all times in seconds on one clock, time.perf_counter()):
- TTFT  = first_token - arrival (queueing + prefill, what a streaming user waits for).
- TPOT  = (last token time - first token time) / (n_out - 1), per request with n_out >= 2
          (the mean decode pace a user sees after the first token; vLLM's definition).
- ITL   = every gap between consecutive tokens of a request, pooled over all requests
          (the stalls a user sees; p99 ITL is where prefill-first scheduling shows).
- E2E   = finish - arrival.
- Throughput over the run's span: from `start` (default: the first arrival) to the last
  finish. total tokens/s counts prompt + output tokens, output tokens/s the output only;
  only tokens a request asked for are counted (static padding and the extra tokens of a
  batch's shorter members are waste, not work).
Percentiles: numpy.percentile(method="linear"), i.e. Hyndman-Fan type 7, numpy's default
(interpolates between the two nearest order statistics: p50 of [1, 2, 3, 4] is 2.5).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILE_METHOD = "linear"
QUANTILES = (50, 90, 99)


@dataclass
class RequestTrace:
    id: str
    prompt_len: int
    arrival: float
    first_token: float
    finish: float
    token_times: list[float] = field(default_factory=list)  # one per output token, in order
    token_ids: list[int] | None = None                      # for agreement checks only

    @property
    def output_len(self) -> int:
        return len(self.token_times)

    def __post_init__(self):
        if not self.token_times:
            raise ValueError(f"token_times of request {self.id!r} is empty")
        if any(b < a for a, b in zip(self.token_times, self.token_times[1:])):
            raise ValueError(f"token_times of request {self.id!r} are not sorted")
        if self.first_token < self.arrival or self.finish < self.first_token:
            raise ValueError(f"request {self.id!r}: need arrival <= first_token <= finish, got "
                             f"{self.arrival}, {self.first_token}, {self.finish}")


def distribution(values) -> dict:
    """mean and p50/p90/p99 (type-7 linear percentiles) of values; Nones when empty."""
    v = np.asarray(list(values), dtype=np.float64)
    keys = ["mean"] + [f"p{q}" for q in QUANTILES] + ["max"]
    if v.size == 0:
        return {k: None for k in keys} | {"n": 0}
    pct = np.percentile(v, QUANTILES, method=PERCENTILE_METHOD)
    return ({"mean": float(v.mean())} | {f"p{q}": float(p) for q, p in zip(QUANTILES, pct)}
            | {"max": float(v.max()), "n": int(v.size)})


def ttft(t: RequestTrace) -> float:
    return t.first_token - t.arrival


def tpot(t: RequestTrace) -> float | None:
    if t.output_len < 2:
        return None
    return (t.token_times[-1] - t.token_times[0]) / (t.output_len - 1)


def itls(t: RequestTrace) -> list[float]:
    return list(np.diff(np.asarray(t.token_times, dtype=np.float64)))


def e2e(t: RequestTrace) -> float:
    return t.finish - t.arrival


def summarize(traces: list[RequestTrace], start: float | None = None) -> dict:
    """Throughput and latency distributions of one run."""
    if not traces:
        raise ValueError("traces must not be empty")
    start = min(t.arrival for t in traces) if start is None else start
    end = max(t.finish for t in traces)
    span = end - start
    if span <= 0:
        raise ValueError(f"run span must be > 0 s, got {span}")
    prompt = sum(t.prompt_len for t in traces)
    output = sum(t.output_len for t in traces)
    tpots = [x for x in map(tpot, traces) if x is not None]
    return {
        "num_requests": len(traces),
        "prompt_tokens": prompt,
        "output_tokens": output,
        "duration_s": span,
        "total_tokens_per_s": (prompt + output) / span,
        "output_tokens_per_s": output / span,
        "requests_per_s": len(traces) / span,
        "ttft_s": distribution(map(ttft, traces)),
        "tpot_s": distribution(tpots),
        "itl_s": distribution(x for t in traces for x in itls(t)),
        "e2e_s": distribution(map(e2e, traces)),
        "percentile_method": f"numpy.percentile(method={PERCENTILE_METHOD!r}) (Hyndman-Fan type 7)",
    }


def _get(rec, name, default=0):
    return rec.get(name, default) if isinstance(rec, dict) else getattr(rec, name, default)


def step_records(step_log) -> list[dict]:
    """engine.step_log (StepStats objects or dicts) as plain dicts for JSON and plots."""
    names = ("step", "num_prefill_tokens", "num_decode_tokens", "num_seqs", "step_time_s",
             "schedule_time_s", "kv_blocks_used", "num_preempted", "prefix_hit_tokens")
    # Newer fields, absent from older logs: graph_batch (decode step replayed as a CUDA graph
    # of that bucket, 0 = eager) and device_time_s (CUDA events' span of the step, or None).
    # comm_bytes / comm_time_s: tensor parallelism's collectives on rank 0 (0 at one rank).
    optional = (("graph_batch", 0), ("device_time_s", None), ("comm_bytes", 0),
                ("comm_time_s", 0.0))
    return [{**{n: _get(r, n) for n in names},
             **{n: _get(r, n, d) for n, d in optional}}
            for r in step_log]


def step_summary(step_log, *, num_blocks: int | None, prompt_tokens: int) -> dict:
    """The per-step picture: tokens per step by phase, step time, KV use, preemptions and the
    prefix-cache hit rate (prompt tokens served from cache / all prompt tokens)."""
    recs = step_records(step_log)
    if not recs:
        return {"num_steps": 0}
    col = {k: np.asarray([r[k] for r in recs], dtype=np.float64) for k in recs[0]}
    tokens = col["num_prefill_tokens"] + col["num_decode_tokens"]
    out = {
        "num_steps": len(recs),
        "tokens_per_step": distribution(tokens),
        "prefill_tokens_per_step": distribution(col["num_prefill_tokens"]),
        "decode_tokens_per_step": distribution(col["num_decode_tokens"]),
        "seqs_per_step": distribution(col["num_seqs"]),
        "step_time_s": distribution(col["step_time_s"]),
        "schedule_time_s": distribution(col["schedule_time_s"]),
        "mixed_steps": int(np.sum((col["num_prefill_tokens"] > 0) & (col["num_decode_tokens"] > 0))),
        "preemptions": int(col["num_preempted"].sum()),
        "prefix_hit_tokens": int(col["prefix_hit_tokens"].sum()),
        "prefix_hit_rate": float(col["prefix_hit_tokens"].sum() / prompt_tokens) if prompt_tokens else None,
        "kv_blocks_used_max": int(col["kv_blocks_used"].max()),
    }
    out["graph_steps"] = int(np.sum(col["graph_batch"] > 0))
    if col["comm_bytes"].any():         # tensor parallelism: communication beside the step
        out["comm_bytes_per_step"] = distribution(col["comm_bytes"])
        out["comm_time_s"] = distribution(col["comm_time_s"])
    dev = [r["device_time_s"] for r in recs if r["num_seqs"]]   # (an async engine's last
    if dev and all(d is not None for d in dev):                  # step only drains: no span)
        # Device span over engine wall time: how much of the time the GPU had a step in
        # flight (an upper bound of busy: gaps inside a step count as busy). 1 - this is the
        # share the device waited for the host between steps.
        out["device_span_fraction"] = float(sum(dev) / col["step_time_s"].sum())
    if num_blocks:
        out["kv_usage_max"] = float(col["kv_blocks_used"].max() / num_blocks)
        out["kv_usage_mean"] = float(col["kv_blocks_used"].mean() / num_blocks)
    return out


def speculation_summary(step_log) -> dict:
    """Speculative decoding over a run's steps: acceptance rate (accepted / proposed tokens),
    accepted tokens per verification, output tokens per step that produced any, and how many
    steps verified (those run eagerly and synchronously)."""
    names = ("num_spec_tokens", "num_spec_seqs", "num_accepted_tokens", "num_output_tokens")
    recs = [{n: _get(r, n) for n in names} for r in step_log]
    drafts = sum(r["num_spec_tokens"] for r in recs)
    acc = sum(r["num_accepted_tokens"] for r in recs)
    ver = sum(r["num_spec_seqs"] for r in recs)
    out_steps = [r["num_output_tokens"] for r in recs if r["num_output_tokens"]]
    return {"verify_steps": sum(1 for r in recs if r["num_spec_tokens"]),
            "verifications": ver, "draft_tokens": drafts, "accepted_tokens": acc,
            "acceptance_rate": round(acc / drafts, 4) if drafts else None,
            "mean_accepted_per_verification": round(acc / ver, 3) if ver else None,
            "output_tokens_per_step": (round(sum(out_steps) / len(out_steps), 3)
                                       if out_steps else None)}
