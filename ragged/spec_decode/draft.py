"""Draft-model proposer: a smaller model of the same vocabulary, run by the engine's own
machinery (model.load_model, BlockManager, BatchBuilder) on its own paged KV cache.

Per step it catches every decoding sequence up (one forward over each sequence's tokens the
draft has not computed yet: the whole prompt the first time, then the tokens accepted since),
then proposes autoregressively, one forward per draft token, each forward batched across the
sequences still drafting. The draft's KV for the rejected tail is rolled back the next time:
its computed length drops to the common prefix of what it fed and what the target accepted,
and blocks past that are released (BlockManager.truncate).

Greedy requests draft greedily (their q is a point mass: rejection.py only compares tokens);
sampling requests draft from the draft's own distribution under the request's temperature /
top-k / top-p, and keep it (q) for the probability rule.
"""
from __future__ import annotations

import torch

from ..batch import BatchBuilder
from ..block_manager import BlockManager
from .rejection import noise, target_probs


class _DraftSeq:
    """The draft's view of one sequence: what BlockManager and BatchBuilder read."""

    __slots__ = ("request_id", "token_ids", "num_computed_tokens", "block_table", "table_row",
                 "block_hashes", "spec_tokens", "base")

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.token_ids: list[int] = []       # target tokens as of `base`, then its own drafts
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.table_row = -1
        self.block_hashes: list[int] = []
        self.spec_tokens: list[int] = []     # always empty: the draft verifies nothing
        self.base = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def load_draft(draft, target):
    """The draft model (a loaded model, a preset name or a HF directory), on the target's
    device in its dtype and backend."""
    if hasattr(draft, "allocate_kv_cache"):
        return draft
    from model import load_model       # the runtime depends on model/, never the reverse
    return load_model(draft, dtype=target.dtype, device=target.device,
                      backend=getattr(target, "backend", None))


class DraftProposer:
    def __init__(self, draft, target, *, num_blocks: int, block_size: int, max_model_len: int,
                 sampler, max_query_len: int = 1):
        self.model = m = load_draft(draft, target)
        tv, dv = target.config.vocab_size, m.config.vocab_size
        if dv != tv:
            raise ValueError(f"speculative.draft_model: vocab_size {dv} differs from the "
                             f"target's {tv} (a draft must share the target's vocabulary)")
        if m.config.max_position_embeddings < max_model_len:
            raise ValueError(f"speculative.draft_model: max_position_embeddings "
                             f"{m.config.max_position_embeddings} < max_model_len {max_model_len}")
        # Same token capacity as the target's cache (the draft's blocks are smaller: fewer
        # layers / heads), so the draft never runs out before the target does.
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False,
                               max_blocks_per_seq=-(-max_model_len // block_size))
        self.builder = BatchBuilder(block_size, m.device)
        self.kv = m.allocate_kv_cache(num_blocks, block_size)
        # The draft's forwards run inside served steps too: its attention variants (its own
        # heads; queries of a prompt, or of the 1..k+1 tokens accepted since) compile here,
        # like the target's at engine start-up (a no-op unless Triton on a GPU).
        self.warmup_launches = (m.warmup_kernels(block_size, max_query_len)
                                if hasattr(m, "warmup_kernels") else 0)
        self.sampler = sampler
        self.states: dict = {}            # target Sequence -> _DraftSeq

    def _sync(self, seq) -> _DraftSeq:
        """The draft state of seq, rolled back to the common prefix with seq.token_ids."""
        st = self.states.get(seq)
        if st is None:
            st = self.states[seq] = _DraftSeq(seq.request_id)
        common, n = st.base, min(len(st.token_ids), len(seq.token_ids))
        while common < n and st.token_ids[common] == seq.token_ids[common]:
            common += 1
        # At least the last token is fed again: its logits give the first draft token (the
        # draft may have computed all of seq's tokens when the scheduler cut its proposal).
        st.num_computed_tokens = min(st.num_computed_tokens, common, len(seq.token_ids) - 1)
        self.bm.truncate(st)
        st.token_ids = list(seq.token_ids)
        st.base = len(st.token_ids)
        return st

    @torch.inference_mode()
    def propose(self, seqs, ks: list[int]):
        """seqs: decoding sequences; ks: tokens wanted each -> [(drafts, q [k_i, V] or None)]."""
        live = [(i, self._sync(s), s.params) for i, (s, k) in enumerate(zip(seqs, ks)) if k > 0]
        drafts = [[] for _ in seqs]
        qs = [[] for _ in seqs]
        for j in range(max(ks, default=0)):
            live = [(i, st, p) for i, st, p in live if len(drafts[i]) < ks[i]]
            batch = []
            for i, st, p in list(live):
                n = st.num_tokens - st.num_computed_tokens
                if self.bm.ensure_slots(st, n):
                    batch.append((st, n))
                else:                     # out of draft blocks: this sequence stops drafting
                    live.remove((i, st, p))
            if not batch:
                break
            b = self.builder.build(batch, self.bm.table)
            logits = self.model.forward(b.input_ids, b.positions, b.attn, self.kv,
                                        b.logits_indices)
            tok = logits.argmax(dim=-1)
            samp = [r for r, (i, st, p) in enumerate(live) if not p.greedy]
            if samp:
                sp = [live[r][2] for r in samp]
                idx = torch.tensor(samp, device=logits.device)
                q = target_probs(logits.index_select(0, idx), sp)
                index = [seqs[live[r][0]].num_output_tokens + j for r in samp]
                _, E = noise(self.sampler, len(samp), q.shape[1], sp, index, salt=2)
                tok = tok.index_copy(0, idx, (q / E).argmax(dim=-1))
                for r, row in zip(samp, q):
                    qs[live[r][0]].append(row)
            for (i, st, _), (_, n), t in zip(live, batch, tok.tolist()):
                st.num_computed_tokens += n
                st.token_ids.append(t)
                drafts[i].append(t)
        return [(d, torch.stack(q) if q else None) for d, q in zip(drafts, qs)]

    def end_step(self) -> None:
        """Release the draft KV of sequences that finished, were aborted or were preempted."""
        from ..sequence import Status
        for seq in [s for s in self.states if s.status != Status.RUNNING]:
            self.bm.free(self.states.pop(seq))
