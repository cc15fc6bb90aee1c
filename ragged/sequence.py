"""Sequence: one request's tokens, progress, KV blocks and timings.

Progress is one counter, ``num_computed_tokens``: the tokens whose KV is in the cache. What a
step must compute is ``token_ids[num_computed_tokens:]``: the whole prompt (in chunks) at
first, then one token per decode (the last sampled one). A preempted sequence simply resets
the counter to 0 and recomputes prompt + generated tokens; when the last chunk reaches the end
of ``token_ids`` its logits give the next token. So prefill, decode and recompute are one code
path (vLLM v1's unified view).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Timestamps from time.perf_counter() (seconds)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None
    # Speculative decoding (ragged/spec_decode): verifications with at least one draft token,
    # draft tokens verified, and how many of them were accepted.
    num_spec_verifications: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_tokens(self) -> float | None:
        """Accepted draft tokens per verification (each verification also yields 1 more)."""
        n = self.num_spec_verifications
        return self.num_accepted_tokens / n if n else None


class RequestOutput:
    """request_id; prompt_token_ids; token_ids: all output tokens so far (cumulative); text:
    the decoded output when a tokenizer exists and the request finished, else ""; finished;
    finish_reason: "stop" (EOS / stop token), "length", "abort" or None; metrics.

    token_ids is materialised on first access: the engine emits an output for every token
    of every running request, and copying each cumulative list there was the largest host
    cost of a step (O(output length) per token: ~1 ms per step at 256 sequences x 300
    tokens). It is a view of the sequence's token list up to this output's length; that
    list only ever grows past it, so the view never changes."""

    __slots__ = ("request_id", "prompt_token_ids", "_all", "_lo", "_hi", "_ids", "text",
                 "finished", "finish_reason", "metrics")

    def __init__(self, request_id: str, prompt_token_ids: list[int], all_token_ids: list[int],
                 num_output_tokens: int, text: str, finished: bool, finish_reason: str | None,
                 metrics: RequestMetrics):
        self.request_id, self.prompt_token_ids = request_id, prompt_token_ids
        self._all, self._hi = all_token_ids, len(prompt_token_ids) + num_output_tokens
        self._lo, self._ids = len(prompt_token_ids), None
        self.text, self.finished, self.finish_reason = text, finished, finish_reason
        self.metrics = metrics

    @property
    def token_ids(self) -> list[int]:
        if self._ids is None:
            self._ids = self._all[self._lo:self._hi]
        return self._ids

    def __repr__(self):
        return (f"RequestOutput({self.request_id!r}, {len(self.token_ids)} tokens, "
                f"finished={self.finished}, finish_reason={self.finish_reason!r})")


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 priority: int, arrival_time: float, arrival_index: int):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)   # never mutated: shared by outputs
        self.token_ids = list(prompt_token_ids)          # prompt + output
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params
        self.priority = priority
        self.arrival_index = arrival_index               # FCFS tie-break, kept across preemption
        self.admit_index = -1                            # set each time it enters `running`
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        # Tokens to compute before sampling turns into decoding: the prompt, or after a
        # preemption prompt + generated tokens (only used to label prefill vs decode).
        self.prefill_len = self.num_prompt_tokens
        self.block_table: list[int] = []                 # physical KV blocks, logical order
        self.table_row = -1                              # its row in BlockManager.table
        self.block_hashes: list[int] = []                # chained hashes of its full, cached blocks
        self.finish_reason: str | None = None
        # (launched step, row) while its newest token is a placeholder for that step's sampled
        # id, not yet read back (Engine._commit sets it, Engine._process fills the token).
        self.pending = None
        # Speculation: proposed tokens to verify in the next step (not in token_ids) and their
        # proposal distribution (draft model, sampling requests) or None (a point mass).
        self.spec_tokens: list[int] = []
        self.spec_q = None
        self.num_preemptions = 0
        self.metrics = RequestMetrics(arrival_time)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_remaining(self) -> int:
        """Tokens still to compute before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_computed_tokens < self.prefill_len

    def reset_for_recompute(self):
        """Preempted: its blocks were freed; everything is recomputed on readmission."""
        self.num_computed_tokens = 0
        self.prefill_len = len(self.token_ids)
        self.spec_tokens, self.spec_q = [], None
        self.status = Status.WAITING
        self.num_preemptions += 1

    def __repr__(self):
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
