"""SamplingParams and the batched sampler.

One call samples every row of the step's logits on the device, each row with its own
temperature / top-k / top-p (tensors, no per-row Python on the math). Sampling is the
exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) draws i with probability p_i. Its noise
is the only randomness, so a request with a seed draws its noise from a generator seeded by
(seed, index of the token being sampled): the same tokens whatever else is in the batch, and
after a preemption too. Rows without a seed share one engine generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens: output tokens at most; temperature 0 = greedy; top_k 0 = off; top_p 1 = off;
    seed: per-request reproducible sampling; stop_token_ids: finish (reason "stop") after
    sampling one of them (it is kept in the output, as EOS is); ignore_eos: keep going past EOS."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"{name}: {want}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an int >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            bad("temperature", "must be a finite number >= 0")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an int >= 0 (0 disables it)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            bad("top_p", "must be a number in (0, 1]")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            bad("seed", "must be None or an int >= 0")
        try:
            stops = tuple(self.stop_token_ids)
        except TypeError:
            bad("stop_token_ids", "must be a sequence of ints")
        if not all(is_int(s) and s >= 0 for s in stops):
            bad("stop_token_ids", "must hold ints >= 0")
        object.__setattr__(self, "stop_token_ids", stops)
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) the logits outside each row's top-k and top-p (nucleus) sets.

    top_k int64 [S] (0 = off), top_p float32 [S] (1 = off). One sort serves both filters.
    """
    V = logits.shape[-1]
    vals, idx = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    vals = vals.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    probs = vals.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Keep the smallest prefix whose mass reaches p (the first token always survives); rows
    # with p == 1 are left alone so rounding in the cumsum cannot drop their tail.
    drop = (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]
    vals = vals.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, vals)


class Sampler:
    def __init__(self, device, seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self._seeded = torch.Generator(self.device)   # re-seeded per seeded row

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 token_index: list[int]) -> torch.Tensor:
        """logits float32 [S, V]; params and token_index (how many tokens the request has
        already generated) per row -> sampled token ids int64 [S] on the device."""
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy
        dev = logits.device
        # Pinned host tensors: a non_blocking copy from pageable memory makes CUDA wait for
        # the stream first, which would stall the host behind the step it should overlap.
        pin = dev.type == "cuda"
        temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, pin_memory=pin)
        temp = temp.to(dev, non_blocking=True)
        x = logits / torch.where(temp > 0, temp, 1.0)[:, None]
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            top_k = torch.tensor([p.top_k for p in params], pin_memory=pin).to(dev, non_blocking=True)
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32,
                                 pin_memory=pin).to(dev, non_blocking=True)
            x = apply_top_k_top_p(x, top_k, top_p)
        probs = x.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, p in enumerate(params):
            if p.seed is not None and not p.greedy:
                # Stateless per (seed, token index): batch- and preemption-independent.
                self._seeded.manual_seed(hash((p.seed, token_index[i])) & (2**63 - 1))
                noise[i].exponential_(generator=self._seeded)
        # Exp(1) can round to 0; a 0/0 would be NaN, which argmax treats as the maximum.
        sampled = (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
        return torch.where(temp == 0, greedy, sampled)
