"""The one rejection sampler: k+1 target logits rows per verifying sequence -> accepted tokens.

Rows of a verification of drafts d_1..d_k (row j holds the target's logits after d_1..d_j):

* q a point mass (ngram drafts; any greedy request): row j's token t_j is what the ordinary
  Sampler draws there (argmax for greedy, the exponential race otherwise, same noise stream:
  seeded by (seed, token index) for seeded requests). Accept d_{j+1} iff t_j == d_{j+1}; the
  first mismatch (or row k) gives the next token. For a point mass this IS the speculative
  rule: P(accept d) = p(d) = min(1, p(d)/1), and a rejected draw is distributed as p without
  d, renormalised = norm(max(0, p - q)). Since the draws are the ones plain decoding would
  make, greedy and seeded requests get token-for-token the tokens of plain decoding.
* q a distribution (draft-model drafts of a sampling request): accept d with probability
  min(1, p(d)/q(d)) (u < p/q, u ~ U[0,1)); on rejection draw from norm(max(0, p - q)); after
  k acceptances draw the bonus token from p (q = 0 there). Each emitted token is distributed
  exactly as p (Leviathan et al. 2023, Chen et al. 2023); the tokens differ from plain
  decoding's even when seeded (the seeded stream here is (seed, token index, "verify")).
"""
from __future__ import annotations

import torch

from ..sampling import Sampler, SamplingParams, apply_top_k_top_p


def target_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution the Sampler draws each row from (temperature, top-k, top-p applied).
    Rows must not be greedy."""
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float32).to(dev)
    x = logits.float() / temp[:, None]
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        top_k = torch.tensor([p.top_k for p in params]).to(dev)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32).to(dev)
        x = apply_top_k_top_p(x, top_k, top_p)
    return x.softmax(dim=-1)


def noise(sampler: Sampler, n: int, V: int, params, token_index, salt: int):
    """u ~ U[0,1) [n] and E ~ Exp(1) [n, V]: seeded rows from (seed, token index, salt), the
    others from the engine's generator (batch-independent for seeded requests)."""
    dev = sampler.device
    u = torch.empty(n, device=dev).uniform_(generator=sampler.generator)
    E = torch.empty(n, V, device=dev).exponential_(generator=sampler.generator)
    for i, p in enumerate(params):
        if p.seed is not None:
            sampler._seeded.manual_seed(hash((p.seed, token_index[i], salt)) & (2**63 - 1))
            u[i:i + 1].uniform_(generator=sampler._seeded)
            E[i].exponential_(generator=sampler._seeded)
    return u, E.clamp_(min=torch.finfo(E.dtype).tiny)


def verify(sampler: Sampler, logits: torch.Tensor, drafts: list[list[int]], qs: list,
           params: list[SamplingParams], first_index: list[int]) -> list[list[int]]:
    """logits float32 [R, V]: 1 + len(drafts[i]) consecutive rows per sequence i (a sequence
    with no drafts is an ordinary sample). qs[i]: the drafts' proposal probabilities [k_i, V]
    or None (point mass). first_index[i]: output tokens the sequence already has (its rows'
    token indices start there). Returns each sequence's new tokens: its accepted drafts plus
    one token from the target (1 .. k_i + 1 tokens)."""
    counts = [1 + len(d) for d in drafts]
    R, V = logits.shape
    assert R == sum(counts), (R, counts)
    row_params = [p for p, c in zip(params, counts) for _ in range(c)]
    row_index = [f + j for f, c in zip(first_index, counts) for j in range(c)]
    row_draft = [t for d in drafts for t in (*d, -1)]            # -1: the bonus row
    dev = logits.device
    tok = sampler(logits, row_params, row_index)
    draft_dev = torch.tensor(row_draft, dtype=torch.int64).to(dev)
    accept = tok == draft_dev
    prob = [i for i, (q, p) in enumerate(zip(qs, params)) if q is not None and not p.greedy]
    if prob:
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        idx = [r for i in prob for r in range(starts[i], starts[i + 1])]
        idx_dev = torch.tensor(idx, dtype=torch.int64).to(dev)
        sub_params = [row_params[r] for r in idx]
        p = target_probs(logits.index_select(0, idx_dev), sub_params)
        zero = torch.zeros(1, V, device=dev, dtype=p.dtype)
        q = torch.cat([t for i in prob for t in (qs[i][:len(drafts[i])].to(p.dtype), zero)])
        x = draft_dev.index_select(0, idx_dev).clamp(min=0)      # bonus rows: any id, q = 0
        bonus = draft_dev.index_select(0, idx_dev) < 0
        u, E = noise(sampler, len(idx), V, sub_params, [row_index[r] for r in idx], salt=1)
        px, qx = p.gather(1, x[:, None])[:, 0], q.gather(1, x[:, None])[:, 0]
        acc = (u * qx < px) & ~bonus
        resid = (p - q).clamp_(min=0)
        # p == q exactly leaves no residual (rejection then has probability 0): draw from p.
        resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p)
        redraw = (resid / E).argmax(dim=-1)
        tok = tok.index_copy(0, idx_dev, torch.where(acc, x, redraw))
        accept = accept.index_copy(0, idx_dev, acc)
    tok_h, acc_h = tok.tolist(), accept.tolist()                 # the step's one sync
    out, r = [], 0
    for c in counts:
        a = 0
        while a < c - 1 and acc_h[r + a]:
            a += 1
        out.append(tok_h[r:r + a + 1])
        r += c
    return out
