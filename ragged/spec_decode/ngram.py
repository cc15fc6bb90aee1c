"""N-gram (prompt lookup) proposer: no model, the sequence's own history is the draft.

For n from ngram_max down to ngram_min, find the LATEST earlier occurrence of the sequence's
last n tokens and propose the (up to) k tokens that followed it. Repeated spans (code edits,
quotes in a summary, retrieval contexts) make these right often; elsewhere it finds nothing
or is rejected after one forward of 1 + k rows. Proposal q is a point mass on each proposed
token (rejection.py uses that).

Host cost per sequence and step: one vectorised compare over its history (candidates: the
earlier positions of its last token), then n_max - 1 compares over those candidates only;
the history lives in a numpy buffer per sequence that grows by the new tokens only (a fresh
np.asarray of an 8k-token list each step cost ~0.3 ms per sequence).
"""
from __future__ import annotations

import numpy as np


def ngram_propose(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """tokens int64 [L] -> up to k proposed next tokens ([] when no n-gram recurs)."""
    L = tokens.shape[0]
    if L < 2:
        return []
    ends = np.flatnonzero(tokens[:L - 1] == tokens[L - 1])     # earlier occurrences' ends
    if not ends.size:
        return []
    length = np.ones(ends.size, dtype=np.int64)                # matched suffix length
    alive = np.ones(ends.size, dtype=bool)
    for t in range(1, min(n_max, L - 1)):
        alive &= ends >= t
        alive[alive] = tokens[ends[alive] - t] == tokens[L - 1 - t]
        if not alive.any():
            break
        length += alive
    n = min(int(length.max()), n_max)
    if n < n_min:
        return []
    # The latest occurrence of the longest n-gram; copy what followed it, past the end as an
    # overlapping copy (LZ77 style): a match d tokens back continues with period d. Without
    # it a run like "7 7 7" (latest match 1 back) proposed 1 token at k = 8; with it, 8.
    src = int(ends[length >= n][-1]) + 1
    out = tokens[src:src + k].tolist()
    d = L - src                                  # out[j] is position L + j, i.e. src + j - d
    while len(out) < k:
        out.append(out[len(out) - d])
    return out


class NgramProposer:
    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.history: dict = {}            # Sequence -> [int64 buffer, tokens in it]

    def _tokens(self, seq) -> np.ndarray:
        h = self.history.get(seq)
        L = len(seq.token_ids)
        if h is None:
            h = self.history[seq] = [np.empty(max(2 * L, 64), dtype=np.int64), 0]
        buf, n = h
        if L > buf.shape[0]:
            buf = h[0] = np.concatenate([buf[:n], np.empty(L, dtype=np.int64)])
        buf[n:L] = seq.token_ids[n:L]
        h[1] = L
        return buf[:L]

    def propose(self, seqs, ks: list[int]) -> list[tuple[list[int], None]]:
        """seqs: decoding sequences; ks: tokens wanted per sequence -> (proposal, q=None)."""
        return [(ngram_propose(self._tokens(s), k, self.n_min, self.n_max), None)
                for s, k in zip(seqs, ks)]

    def end_step(self) -> None:
        """Forget the histories of sequences that are no longer running."""
        from ..sequence import Status
        for seq in [s for s in self.history if s.status != Status.RUNNING]:
            del self.history[seq]
