"""Seeded request sets for the end-to-end benchmarks.

Every generator returns a list of `Request`, sorted by arrival, with token ids drawn
uniformly from [0, vocab_size) (random prompts: no accidental prefix-cache hits, and the
model never has to mean anything because every run ignores EOS). The same arguments and seed
always give the same requests (numpy PCG64), so two systems are compared on identical work.

Sizes are arguments, not constants: bench/e2e.py picks small ones for the CPU (tiny model,
the Triton interpreter or the torch reference) and the published ones on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The Anyscale continuous-batching study: 512-token prompts, output lengths exponential with
# mean 128, capped. Its caps are the ones the GPU runs sweep.
ANYSCALE_CAPS = (32, 128, 512, 1536)


@dataclass(frozen=True)
class Request:
    id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int          # exact output length: every run sets ignore_eos
    arrival_time: float      # seconds after the start of the run
    priority: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def _check(name: str, value, lo=1):
    if value is None or value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")


def _prompt(rng: np.random.Generator, n: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(int(t) for t in rng.integers(0, vocab_size, size=n))


def output_lengths(rng: np.random.Generator, n: int, mean: float, cap: int) -> np.ndarray:
    """n lengths ~ ceil(Exponential(mean)), clipped to [1, cap]. ceil so no request asks
    for zero tokens; the cap makes the mean a little lower than `mean` (about
    mean * (1 - exp(-cap/mean)), 126 for mean 128 and cap 512)."""
    _check("cap", cap)
    if mean <= 0:
        raise ValueError(f"mean_output must be > 0, got {mean!r}")
    return np.clip(np.ceil(rng.exponential(mean, size=n)), 1, cap).astype(np.int64)


def anyscale(num_requests: int, *, vocab_size: int, cap: int = 128, prompt_len: int = 512,
             mean_output: float = 128.0, seed: int = 0) -> list[Request]:
    """All requests at t=0, fixed prompt length, exponential output lengths (throughput test)."""
    _check("num_requests", num_requests)
    _check("vocab_size", vocab_size, 2)
    _check("prompt_len", prompt_len)
    rng = np.random.default_rng(seed)
    outs = output_lengths(rng, num_requests, mean_output, cap)
    return [Request(f"anyscale-{i}", _prompt(rng, prompt_len, vocab_size), int(outs[i]), 0.0)
            for i in range(num_requests)]


def poisson(num_requests: int, *, vocab_size: int, rate: float, cap: int = 128,
            prompt_range: tuple[int, int] = (128, 384), mean_output: float = 128.0,
            seed: int = 0) -> list[Request]:
    """Poisson arrivals at `rate` req/s (exponential gaps, the first request at t=0),
    prompt lengths uniform on prompt_range inclusive (latency-under-load test)."""
    _check("num_requests", num_requests)
    _check("vocab_size", vocab_size, 2)
    if rate is None or rate <= 0:
        raise ValueError(f"rate must be > 0 req/s, got {rate!r}")
    lo, hi = prompt_range
    if not 1 <= lo <= hi:
        raise ValueError(f"prompt_range must be 1 <= lo <= hi, got {prompt_range!r}")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=num_requests)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    lens = rng.integers(lo, hi + 1, size=num_requests)
    outs = output_lengths(rng, num_requests, mean_output, cap)
    return [Request(f"poisson-{i}", _prompt(rng, int(lens[i]), vocab_size), int(outs[i]),
                    float(arrivals[i])) for i in range(num_requests)]


def stall(num_requests: int, *, vocab_size: int, long_range: tuple[int, int] = (4096, 8192),
          num_long: int | None = None, decode_prompt_len: int = 128, decode_tokens: int = 256,
          long_output: int = 16, interval: float = 1.0, seed: int = 0) -> list[Request]:
    """Generation stalls: (num_requests - num_long) short-prompt requests with long outputs
    arrive at t=0 and decode steadily; then num_long long prompts (uniform on long_range)
    arrive every `interval` s. A prefill-first scheduler pauses every decode for each long
    prompt; a chunked-prefill one keeps the inter-token latency flat."""
    _check("num_requests", num_requests, 2)
    _check("vocab_size", vocab_size, 2)
    num_long = max(1, num_requests // 4) if num_long is None else num_long
    _check("num_long", num_long)
    if num_long >= num_requests:
        raise ValueError(f"num_long must be < num_requests, got {num_long} >= {num_requests}")
    lo, hi = long_range
    if not 1 <= lo <= hi:
        raise ValueError(f"long_range must be 1 <= lo <= hi, got {long_range!r}")
    if interval < 0:
        raise ValueError(f"interval must be >= 0 s, got {interval!r}")
    rng = np.random.default_rng(seed)
    reqs = [Request(f"stall-decode-{i}", _prompt(rng, decode_prompt_len, vocab_size),
                    decode_tokens, 0.0) for i in range(num_requests - num_long)]
    lens = rng.integers(lo, hi + 1, size=num_long)
    # The first long prompt comes one interval in, once the decodes are under way.
    reqs += [Request(f"stall-long-{j}", _prompt(rng, int(lens[j]), vocab_size), long_output,
                     interval * (j + 1)) for j in range(num_long)]
    return sorted(reqs, key=lambda r: r.arrival_time)


def shared_prefix(num_requests: int, *, vocab_size: int, prefix_len: int = 2048,
                  suffix_range: tuple[int, int] = (16, 64), cap: int = 128,
                  mean_output: float = 128.0, seed: int = 0) -> list[Request]:
    """One long common system prompt + a short unique suffix each, all at t=0: with prefix
    caching only the first request pays for the prefix."""
    _check("num_requests", num_requests)
    _check("vocab_size", vocab_size, 2)
    _check("prefix_len", prefix_len)
    lo, hi = suffix_range
    if not 1 <= lo <= hi:
        raise ValueError(f"suffix_range must be 1 <= lo <= hi, got {suffix_range!r}")
    rng = np.random.default_rng(seed)
    prefix = _prompt(rng, prefix_len, vocab_size)
    lens = rng.integers(lo, hi + 1, size=num_requests)
    outs = output_lengths(rng, num_requests, mean_output, cap)
    return [Request(f"shared-{i}", prefix + _prompt(rng, int(lens[i]), vocab_size),
                    int(outs[i]), 0.0) for i in range(num_requests)]


WORKLOADS = {"anyscale": anyscale, "poisson": poisson, "stall": stall,
             "shared_prefix": shared_prefix}


def make(name: str, num_requests: int, *, vocab_size: int, seed: int = 0, **kwargs) -> list[Request]:
    """Dispatch by name; kwargs go to the generator (unknown ones raise TypeError)."""
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {name!r}")
    return WORKLOADS[name](num_requests, vocab_size=vocab_size, seed=seed, **kwargs)


def repeated_span(num_requests: int, *, vocab_size: int, prompt_len: int = 512,
                  span_len: int = 32, edit_rate: float = 0.05, cap: int = 128,
                  mean_output: float = 128.0, seed: int = 0) -> list[Request]:
    """Prompts that repeat spans, all at t=0 (code editing, summaries quoting their source):
    each prompt cycles through 4 random spans of span_len tokens until prompt_len, and every
    copy has edit_rate of its tokens replaced (the edits ngram speculation must survive).
    With random weights the model does not copy the prompt, so the acceptance rate is the
    model's own repetition (the e2e JSON records it next to the speed)."""
    _check("num_requests", num_requests)
    _check("vocab_size", vocab_size, 2)
    _check("prompt_len", prompt_len)
    _check("span_len", span_len)
    if not 0 <= edit_rate <= 1:
        raise ValueError(f"edit_rate must be in [0, 1], got {edit_rate!r}")
    rng = np.random.default_rng(seed)
    outs = output_lengths(rng, num_requests, mean_output, cap)
    reqs = []
    for i in range(num_requests):
        spans = [np.asarray(_prompt(rng, span_len, vocab_size)) for _ in range(4)]
        ids = np.concatenate([spans[j % 4] for j in range(-(-prompt_len // span_len))])[:prompt_len]
        edits = rng.random(prompt_len) < edit_rate
        ids[edits] = rng.integers(0, vocab_size, size=int(edits.sum()))
        reqs.append(Request(f"span-{i}", tuple(int(t) for t in ids), int(outs[i]), 0.0))
    return reqs


WORKLOADS["repeated_span"] = repeated_span
