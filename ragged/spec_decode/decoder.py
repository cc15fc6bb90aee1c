"""SpecDecoder: the engine's one handle on speculation (propose before scheduling, verify
after the forward, metrics). Engine-side it is three calls: propose() before the scheduler
runs, verify() on the step's logits, accepted() when a verification's tokens are applied.

Interplay, by construction:
* The scheduler sees a sequence with proposals as a 1 + k token query under the same token
  budget (it may shorten the proposal to fit, and drops it rather than preempt anyone).
* Verification steps run synchronously: propose() needs every decoding sequence's tokens on
  the host, so under async scheduling a step that speculates first reads back the step in
  flight (that is the "a sequence with proposals in flight is not proposed for again" rule:
  nothing is in flight when proposals are made). Steps where the large-batch rule turns
  speculation off (k = 0) overlap as usual.
* CUDA graphs: verification steps run eagerly (q_len > 1); plain decode steps still replay.
"""
from __future__ import annotations

from .config import SpeculativeConfig
from .ngram import NgramProposer
from .rejection import verify


class SpecDecoder:
    def __init__(self, cfg: SpeculativeConfig, model, engine_config, sampler):
        self.cfg = cfg
        self.sampler = sampler
        self.max_model_len = engine_config.max_model_len
        if cfg.method == "ngram":
            self.proposer = NgramProposer(cfg.ngram_min, cfg.ngram_max)
            self.warmup_launches = 0
        else:
            from .draft import DraftProposer
            self.proposer = DraftProposer(cfg.draft_model, model,
                                          num_blocks=engine_config.num_blocks,
                                          block_size=engine_config.block_size,
                                          max_model_len=self.max_model_len, sampler=sampler,
                                          max_query_len=1 + cfg.num_speculative_tokens)
            self.warmup_launches = self.proposer.warmup_launches      # the draft's

    def num_tokens(self, running) -> int:
        """k for this step (the large-batch rule over the running decodes; 0 = none)."""
        decodes = sum(1 for s in running if not s.is_prefill)
        return self.cfg.num_tokens_for(decodes) if decodes else 0

    def propose(self, running, k: int) -> int:
        """Set spec_tokens (and spec_q) on the decoding sequences of `running` (none may have
        a token in flight). Proposals never run past max_tokens or max_model_len. Returns the
        number of proposed tokens."""
        seqs, ks = [], []
        for s in running:
            if s.is_prefill or s.num_remaining != 1:
                continue
            assert s.pending is None, "proposals need the sequence's last token on the host"
            # L + a + 1 <= max_model_len and output + a + 1 <= max_tokens for every a <= k.
            room = min(k, self.max_model_len - s.num_tokens - 1,
                       s.params.max_tokens - s.num_output_tokens - 1)
            if room > 0:
                seqs.append(s)
                ks.append(room)
        total = 0
        for s, k_s, (drafts, q) in zip(seqs, ks, self.proposer.propose(seqs, ks)):
            s.spec_tokens, s.spec_q = drafts[:k_s], q
            total += len(s.spec_tokens)
        return total

    def after_schedule(self, running, sched) -> None:
        """Proposals of sequences the scheduler left out are dropped."""
        chosen = {s for s, _ in sched.scheduled}
        for s in running:
            if s.spec_tokens and s not in chosen:
                s.spec_tokens, s.spec_q = [], None

    def verify(self, logits, rows) -> list[list[int]]:
        """The step's sampled rows (1 + len(spec_tokens) logits rows each) -> new tokens each."""
        return verify(self.sampler, logits, [s.spec_tokens for s in rows],
                      [s.spec_q for s in rows], [s.params for s in rows],
                      [s.num_output_tokens for s in rows])

    @staticmethod
    def record(stats, seq, num_drafts: int, num_accepted: int) -> None:
        """Count one verification in the request's metrics and the engine's totals."""
        if num_drafts == 0:
            return
        for m in (seq.metrics, stats):
            m.num_spec_verifications += 1
            m.num_draft_tokens += num_drafts
            m.num_accepted_tokens += num_accepted

    def end_step(self) -> None:
        self.proposer.end_step()
