"""N-gram (prompt lookup) proposer: no model, the sequence's own history is the draft.

For n from ngram_max down to ngram_min, find the LATEST earlier occurrence of the sequence's
last n tokens and propose the (up to) k tokens that followed it. Repeated spans (code edits,
quotes in a summary, retrieval contexts) make these right often; elsewhere it finds nothing
or is rejected after one forward of 1 + k rows. Proposal q is a point mass on each proposed
token (rejection.py uses that).
"""
from __future__ import annotations

import numpy as np


def ngram_propose(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """tokens int64 [L] -> up to k proposed next tokens ([] when no n-gram recurs)."""
    L = tokens.shape[0]
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        pattern = tokens[L - n:]
        # Windows starting at 0 .. L-n-1: every earlier occurrence, never the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:L - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            # Copy what followed, past the end as an overlapping copy (LZ77 style): a match
            # d tokens back continues with period d. Without it a run like "7 7 7" (latest
            # match 1 back) proposed 1 token at k = 8; with it, 8.
            src = int(hits[-1]) + n
            out = tokens[src:src + k].tolist()
            d = L - src                  # out[j] is position L + j, i.e. src + j - d
            while len(out) < k:
                out.append(out[len(out) - d])
            return out
    return []


class NgramProposer:
    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max

    def propose(self, seqs, ks: list[int]) -> list[tuple[list[int], None]]:
        """seqs: decoding sequences; ks: tokens wanted per sequence -> (proposal, q=None)."""
        return [(ngram_propose(np.asarray(s.token_ids, dtype=np.int64), k, self.n_min,
                               self.n_max), None) for s, k in zip(seqs, ks)]

    def end_step(self) -> None:        # nothing held between steps
        pass
