"""The scheduler: which sequences run this step, and how many new tokens each.

Every step spends at most ``max_num_batched_tokens`` tokens over at most ``max_num_seqs``
sequences. Policies:

- "continuous" (default; Sarathi-Serve stall-free batching, vLLM v1's unified budget):
  running decodes first (1 token each), then running prompts' next chunks, then waiting
  requests, the last one chunked to fill the budget. Long prompts never stall decodes.
- "prefill_first" (Orca / early vLLM): prompts (whole, one after another while they fit) get
  steps of their own and decodes wait; a prompt longer than the budget is chunked across
  consecutive prefill-only steps. Decodes run only in steps with no prefill work.
- "static" (the baseline): a batch of up to max_num_seqs is formed when nothing runs, prefilled,
  then decoded until its longest member ends; nobody joins meanwhile.

Queue order: "fcfs", or "priority" (lower value first, ties by arrival, like vLLM).
Out of KV blocks: preempt by recompute the least important (highest priority value, only in
"priority" order), latest-admitted running sequence: its blocks are freed at once and it goes
back to the front of the waiting queue (in "priority" order: ahead of every later arrival of
its priority) to recompute prompt + generated tokens. Nothing new is admitted in a step that
preempted.
"""
from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence, Status


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, new tokens), batch order
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    prefix_hit_tokens: int = 0
    num_spec_tokens: int = 0          # proposed tokens to verify (counted in num_decode_tokens)
    num_spec_seqs: int = 0            # sequences verifying proposals

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.cfg = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # kept sorted by _run_key: the tail is the victim
        self._admit_counter = 0
        # Per-step state (valid during schedule()).
        self._plan: dict[Sequence, int] = {}
        self._budget = 0
        self._out = SchedulerOutput()

    # ------------------------------------------------------------------ queues
    def _key(self, seq: Sequence) -> tuple:
        prio = seq.priority if self.cfg.queue_order == "priority" else 0
        return (prio, seq.arrival_index)

    def _run_key(self, seq: Sequence) -> tuple:
        prio = seq.priority if self.cfg.queue_order == "priority" else 0
        return (prio, seq.admit_index)

    def add(self, seq: Sequence, front: bool = False):
        seq.status = Status.WAITING
        if self.cfg.queue_order == "priority":
            keys = [self._key(s) for s in self.waiting]   # O(n), only when a request arrives
            self.waiting.insert(bisect.bisect_right(keys, self._key(seq)), seq)
        elif front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def remove(self, seq: Sequence):
        """Take seq out of the queues and free its blocks (finish or abort); idempotent."""
        if seq.status == Status.FINISHED:
            return
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status = Status.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        self._plan, self._budget, self._out = {}, self.cfg.max_num_batched_tokens, SchedulerOutput()
        policy = self.cfg.policy
        if policy == "static" and not self.running:
            self._form_static_batch()
        prefills, decodes = [], []
        for s in self.running:
            (prefills if s.num_computed_tokens < s.prefill_len else decodes).append(s)
        if policy == "continuous":
            self._schedule_running(decodes + prefills)
            self._admit(whole_prompts=False)
        elif policy == "prefill_first":
            self._schedule_running(prefills)
            self._admit(whole_prompts=True)
            if not self._plan:
                self._schedule_running(decodes)
        else:  # static: the batch's prompts, then its decodes
            self._schedule_running(prefills)
            if not self._plan:
                self._schedule_running(decodes)
        out = self._out
        # Batch order: decodes first, then prefill chunks (any order is valid for the model).
        items = list(self._plan.items())
        is_pre = [s.is_prefill for s, _ in items]
        out.scheduled = ([it for it, p in zip(items, is_pre) if not p]
                         + [it for it, p in zip(items, is_pre) if p])
        out.num_prefill_tokens = sum(n for (_, n), p in zip(items, is_pre) if p)
        out.num_decode_tokens = sum(n for _, n in items) - out.num_prefill_tokens
        out.num_spec_tokens = sum(len(s.spec_tokens) for s, _ in items)
        out.num_spec_seqs = sum(1 for s, _ in items if s.spec_tokens)
        now = time.perf_counter()
        for seq, _ in out.scheduled:
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
        return out

    def _schedule_running(self, seqs: list[Sequence]):
        for seq in seqs:
            if self._budget == 0 or len(self._plan) >= self.cfg.max_num_seqs:
                return
            if seq.status != Status.RUNNING:               # preempted earlier in this step
                continue
            n = min(seq.num_remaining, self._budget)
            if seq.spec_tokens:
                # A proposal is 1 + k query tokens under the same budget, shortened to fit
                # it and dropped rather than preempt anyone for its blocks.
                m = min(n + len(seq.spec_tokens), self._budget)
                if m > n and self.bm.ensure_slots(seq, m):
                    n = m
                del seq.spec_tokens[n - seq.num_remaining:]
            while not self.bm.ensure_slots(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self._plan[seq] = n
                self._budget -= n

    def _preempt(self, seq: Sequence):
        if seq in self._plan:                              # un-schedule it, refund its tokens
            self._budget += self._plan.pop(seq)
        self.running.remove(seq)
        self.bm.free(seq)
        seq.reset_for_recompute()
        self.add(seq, front=True)
        self._out.preempted.append(seq)

    def _admit(self, whole_prompts: bool):
        """Move waiting requests into running while budget, seats and blocks last."""
        if self._out.preempted:
            return
        while (self.waiting and self._budget > 0 and len(self.running) < self.cfg.max_num_seqs
               and len(self._plan) < self.cfg.max_num_seqs):
            seq = self.waiting[0]
            hit = self.bm.allocate_prefix(seq)
            n = min(seq.num_remaining, self._budget)
            too_long = whole_prompts and n < seq.num_remaining and self._plan
            if too_long or not self.bm.ensure_slots(seq, n):
                self.bm.free(seq)                          # undo the prefix hit
                self.bm.num_hit_tokens -= hit
                seq.num_computed_tokens = 0
                return
            self.waiting.popleft()
            self._start(seq)
            self._plan[seq] = n
            self._budget -= n
            self._out.prefix_hit_tokens += hit

    def _start(self, seq: Sequence):
        seq.status = Status.RUNNING
        seq.admit_index = self._admit_counter
        self._admit_counter += 1
        if self.cfg.queue_order == "priority":
            keys = [self._run_key(s) for s in self.running]
            self.running.insert(bisect.bisect_right(keys, self._run_key(seq)), seq)
        else:                                  # admission order is the key order
            self.running.append(seq)

    def _form_static_batch(self):
        """Static batching: the next batch is whoever waits (up to max_num_seqs). Blocks come
        per chunk as they prefill; members that run out are preempted like any other."""
        while self.waiting and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting.popleft()
            self._out.prefix_hit_tokens += self.bm.allocate_prefix(seq)
            self._start(seq)

    # ------------------------------------------------------------------ after the forward
    def update(self, out: SchedulerOutput):
        """The step's tokens are computed: advance each sequence and name its full blocks.
        Returns the sequences whose last chunk reached the end (they get a sampled token).
        Sequences finished since the step was scheduled (async engine) are skipped."""
        sampled = []
        for seq, n in out.scheduled:
            if seq.status == Status.FINISHED:
                continue
            seq.num_computed_tokens += n - len(seq.spec_tokens)   # drafts: once accepted
            self.bm.commit(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                sampled.append(seq)
        return sampled
