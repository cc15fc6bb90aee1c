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


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]          # all output tokens so far (cumulative)
    text: str                     # decoded output when a tokenizer exists and finished, else ""
    finished: bool
    finish_reason: str | None     # "stop" (EOS / stop token), "length", "abort", or None
    metrics: RequestMetrics


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
        self.status = Status.WAITING
        self.num_preemptions += 1

    def __repr__(self):
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
