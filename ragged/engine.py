"""Engine: requests in, one fused step at a time, RequestOutputs out.

A step: schedule (host) -> build the ragged batch (host, one copy to the device) -> model
forward over all new tokens of all scheduled sequences -> sample the rows that end a prompt or
decode (launch) -> advance the scheduled sequences, a placeholder token for each sampled row
(commit) -> read the sampled ids back, fill the placeholders, finish what is done (process).
One device sync per step (the sampled ids). Per-request timings and per-step StepStats are
recorded for benchmarks.

Async scheduling (EngineConfig.async_scheduling; on by default on CUDA): step n is launched
before step n-1's tokens are read, so the host schedules and builds step n while the device
still runs step n-1 and the device never waits for the host between steps. The placeholder of
a decode whose previous token is still in flight is filled ON THE DEVICE, from that step's
sampled-id tensor, before the forward; the host learns the token one step later. A sequence
that then turns out finished (EOS / stop token) has one wasted row in step n, dropped; one
that finishes by length is known at commit and never scheduled again. Its blocks are freed
while step n may still touch them, which is safe: every later use is a later launch on the
same stream. Prefix-cache hashes are taken at commit, after the placeholders they cover are
filled, so they never hash a placeholder.
"""
from __future__ import annotations

import numbers
import time
import warnings
from dataclasses import dataclass

import torch

from .batch import BatchBuilder
from .block_manager import BlockManager
from .config import DEFAULT_BATCHED_TOKENS, EngineConfig
from .graphs import DecodeGraphs
from .profiling import profile_num_blocks
from .sampling import Sampler, SamplingParams
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence, Status
from .spec_decode.decoder import SpecDecoder


@dataclass
class StepStats:
    step: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    step_time_s: float          # whole step: schedule + batch + forward + sample + bookkeeping
    schedule_time_s: float      # scheduler only
    kv_blocks_used: int         # after scheduling (the step's peak)
    num_preempted: int
    prefix_hit_tokens: int
    graph_batch: int = 0        # decode step replayed as the CUDA graph of this bucket (0: eager)
    num_spec_tokens: int = 0    # speculation: proposed tokens verified in this step (eager step)
    num_spec_seqs: int = 0      # ... by this many sequences
    num_accepted_tokens: int = 0   # ... and how many of them were accepted
    num_output_tokens: int = 0  # tokens that became known in this step (any request)
    # CUDA: the device's span for this step, from its first event (before the batch copy) or
    # the previous step's end, whichever is later, to its last (after sampling); gaps inside
    # it, if launches lag, count. Filled in once the events complete (Engine.device_times);
    # None on CPU.
    device_time_s: float | None = None
    # Tensor parallelism: rank 0's collective bytes sent this step (control header, batch
    # payload, all-reduces, logits all-gather) and the host time spent in them (CPU/gloo: the
    # whole wall time, collectives are synchronous; GPU: launch time only). 0 at one rank.
    comm_bytes: int = 0
    comm_time_s: float = 0.0


@dataclass
class EngineStats:
    num_steps: int = 0
    num_preemptions: int = 0
    prefix_hit_tokens: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_spec_verifications: int = 0   # speculation (ragged/spec_decode): as in RequestMetrics
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass
class _Flight:
    """One launched step: its schedule, the sequences of its sampled rows, and their token ids
    (on the device, and being copied to the host)."""
    sched: object
    rows: list
    tokens_dev: torch.Tensor | None
    tokens_host: torch.Tensor | None
    copied: object            # CUDA event after the device-to-host copy (None on CPU)
    graph_batch: int          # CUDA-graph bucket replayed, 0 = eager
    events: tuple | None      # CUDA: (start, end, previous step's end) for its device span
    runs: list | None = None  # speculation: each row's verified new tokens (host; sync step)
    num_accepted: int = 0     # accepted proposed tokens among them

    def tokens(self) -> list[int]:
        if self.tokens_host is None:
            return []
        if self.copied is not None:
            self.copied.synchronize()
        return self.tokens_host.tolist()


PLACEHOLDER = 0               # a valid token id: a stray read is harmless, never out of range


class Engine:
    def __init__(self, model, config: EngineConfig | None = None, tokenizer=None):
        """model: a loaded model (model.load_model's result, or any object with its interface)."""
        self.config = config = config or EngineConfig()
        self.model = model
        self.device = torch.device(model.device)
        mcfg = model.config
        self.vocab_size = mcfg.vocab_size
        eos = mcfg.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or ()))
        self.sampler = Sampler(self.device, config.seed)
        tp = getattr(model, "tp", None)            # ragged.distributed.TPModel at size > 1
        if config.tensor_parallel_size != (tp.size if tp is not None else 1):
            raise ValueError(f"tensor_parallel_size: {config.tensor_parallel_size} but the model is "
                             f"sharded over {tp.size if tp is not None else 1} ranks (use LLM(..., "
                             f"tensor_parallel_size=N) or ragged.distributed.launch)")
        self._tp = tp if tp is not None and tp.size > 1 else None
        if config.max_model_len is not None and config.max_model_len > mcfg.max_position_embeddings:
            raise ValueError(f"max_model_len: {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({mcfg.max_position_embeddings})")
        if config.num_blocks is not None:
            num_blocks = config.num_blocks
        elif self.device.type == "cuda":
            budget = config.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS["cuda"]
            num_blocks = profile_num_blocks(model, config, budget)
        else:
            num_blocks = config.default_cpu_blocks(mcfg.max_position_embeddings)
        self.config = config = config.resolve(self.device.type, mcfg.max_position_embeddings,
                                               num_blocks)
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          config.enable_prefix_caching,
                                          max_blocks_per_seq=-(-config.max_model_len // config.block_size))
        self.scheduler = Scheduler(config, self.block_manager)
        self.spec = (None if config.speculative is None else     # docs/speculative.md
                     SpecDecoder(config.speculative, model, config, self.sampler))
        self.batch_builder = BatchBuilder(config.block_size, self.device)
        self.kv_caches = model.allocate_kv_cache(num_blocks, config.block_size,
                                                 **config.kv_cache_kwargs())
        # Every Triton attention variant a step can launch is compiled here, not in a served
        # (or timed) step: 2-3 s per JIT compile on a GPU; a no-op elsewhere.
        self.warmup_launches = 0
        if hasattr(model, "warmup_kernels"):
            k = config.speculative.num_speculative_tokens if config.speculative else 0
            self.warmup_launches = model.warmup_kernels(config.block_size, 1 + k,
                                                        **config.kv_cache_kwargs())
        if self.spec is not None:
            self.warmup_launches += self.spec.warmup_launches        # a draft model's
        # Decode-only steps replay CUDA graphs (captured here, after the KV cache exists);
        # cuda_graphs=True on CPU runs the same padded path eagerly (for tests).
        use_graphs = (self.device.type == "cuda" if config.cuda_graphs is None
                      else config.cuda_graphs)
        self.graphs = None
        self.graph_capture_error = None
        if use_graphs:
            make_graphs = getattr(model, "decode_graphs", DecodeGraphs)    # TP: on every rank
            graphs = make_graphs(model, self.kv_caches, max_num_seqs=config.max_num_seqs,
                                  width=self.block_manager.table.shape[1],
                                  max_model_len=config.max_model_len,
                                  capture=self.device.type == "cuda")
            try:
                graphs.capture()
                self.graphs = graphs
            except Exception as e:  # noqa: BLE001 - serve eagerly, loudly, rather than not at all
                if config.cuda_graphs:            # explicitly asked for: fail
                    raise
                self.graph_capture_error = f"{type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph capture failed, decode steps run eagerly: "
                              f"{self.graph_capture_error}", RuntimeWarning)
                del graphs
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
        self.tokenizer = tokenizer
        self.requests: dict[str, Sequence] = {}       # unfinished requests
        self.step_log: list[StepStats] = []
        self.stats = EngineStats()
        self._arrivals = 0
        self._pending_events: list[tuple] = []      # (StepStats, start, end, previous end)
        self._last_end_event = None
        self.async_scheduling = (self.device.type == "cuda" if config.async_scheduling is None
                                 else config.async_scheduling)
        self._inflight: _Flight | None = None       # async: the launched, unprocessed step
        self._fix_host = None                       # [pinned int64 buffer, its last copy's event]
        # Freed blocks, reused pinned buffers and async scheduling are safe because every
        # later launch is ordered after this step's on ONE stream: the one steps run on.
        self._stream = (torch.cuda.current_stream(self.device) if self.device.type == "cuda"
                        else None)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None):
        """Queue a request. Bad input raises ValueError and changes nothing."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use by an unfinished request")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority: must be an int, got {priority!r}")
        ids = self._prompt_ids(prompt)
        max_len = self.config.max_model_len
        if len(ids) >= max_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room for output within "
                             f"max_model_len={max_len}")
        if len(ids) + params.max_tokens > max_len:      # refused, never cut short silently
            raise ValueError(f"max_tokens: {len(ids)} prompt tokens + max_tokens="
                             f"{params.max_tokens} exceed max_model_len={max_len} (at most "
                             f"{max_len - len(ids)} output tokens fit)")
        bad_stop = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise ValueError(f"stop_token_ids: {bad_stop} outside the vocabulary "
                             f"[0, {self.vocab_size})")
        seq = Sequence(request_id, ids, params, priority,
                       time.perf_counter() if arrival_time is None else float(arrival_time),
                       self._arrivals)
        self._arrivals += 1
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        self.stats.num_prompt_tokens += len(ids)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text needs a tokenizer (the model directory has none); "
                                 "pass token ids")
            prompt = self.tokenizer.encode(prompt)
        try:
            items = list(prompt)
        except TypeError:
            items = None
        # Fast path: plain ints (type() is int also rules out bools); else any integer type.
        if items is None or not (all(type(t) is int for t in items) or all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in items)):
            raise ValueError(f"prompt: expected a str or a sequence of int token ids, got {prompt!r:.80}")
        ids = [int(t) for t in items]
        if not ids:
            raise ValueError("prompt: is empty (at least one token is needed)")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks now. False if it is unknown or already finished."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        if self.spec is not None:
            self.spec.end_step()              # its draft KV too
        seq.finish_reason = "abort"
        seq.metrics.finish_time = time.perf_counter()
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one step; returns outputs for the tokens that became known in it (async: the
        previous step's)."""
        if self._stream is not None and torch.cuda.current_stream(self.device) != self._stream:
            raise RuntimeError("Engine.step: must run on the CUDA stream the engine was created "
                               "on (its async ordering relies on one stream)")
        t0 = time.perf_counter()
        gen0 = self.stats.num_generated_tokens
        outputs = self._propose() if self.spec is not None else []
        sched = self.scheduler.schedule()
        if self.spec is not None:
            self.spec.after_schedule(self.scheduler.running, sched)
        t1 = time.perf_counter()
        kv_used = self.block_manager.num_used_blocks
        flight = None
        if sched.scheduled:
            flight = self._launch(sched)
        elif self.scheduler.has_unfinished():
            raise RuntimeError("scheduler produced an empty step with requests pending (a bug)")
        if self.async_scheduling and (flight is None or flight.runs is None):
            if self._inflight is not None:
                outputs += self._process(self._inflight)
            if flight is not None:
                self._commit(flight)
            self._inflight = flight
        elif flight is not None:              # sync, or a verification step (always sync)
            assert self._inflight is None, "a verification step with a step in flight"
            self._commit(flight)
            outputs += self._process(flight)
        t2 = time.perf_counter()
        self.stats.num_steps += 1
        self.stats.num_preemptions += len(sched.preempted)
        self.stats.prefix_hit_tokens += sched.prefix_hit_tokens
        stats = StepStats(
            step=len(self.step_log), num_prefill_tokens=sched.num_prefill_tokens,
            num_decode_tokens=sched.num_decode_tokens, num_seqs=len(sched.scheduled),
            step_time_s=t2 - t0, schedule_time_s=t1 - t0, kv_blocks_used=kv_used,
            num_preempted=len(sched.preempted), prefix_hit_tokens=sched.prefix_hit_tokens,
            graph_batch=flight.graph_batch if flight is not None else 0)
        if self._tp is not None:
            stats.comm_bytes, stats.comm_time_s = self._tp.take_comm()
        self.step_log.append(stats)
        stats.num_output_tokens = self.stats.num_generated_tokens - gen0
        if flight is not None and flight.runs is not None:
            stats.num_spec_tokens, stats.num_spec_seqs = sched.num_spec_tokens, sched.num_spec_seqs
            stats.num_accepted_tokens = flight.num_accepted
        if flight is not None and flight.events is not None:
            self._pending_events.append((stats, *flight.events))
            self.device_times()
        if self.spec is not None:
            self.spec.end_step()              # draft KV of finished / preempted sequences
        return outputs

    def _launch(self, sched) -> _Flight:
        """Build, copy, forward and sample the step without waiting for the device."""
        start = end = None
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        logits, rows_taken, P = self._forward(sched)
        rows = [s for (s, _), take in zip(sched.scheduled, rows_taken) if take]
        tokens_dev = tokens_host = copied = None
        runs = None
        if rows and sched.num_spec_tokens:   # verification: the rejection sampler reads back
            runs = self.spec.verify(logits, rows)
        elif rows:
            tokens_dev = self.sampler(logits, [s.params for s in rows],
                                      [s.num_output_tokens for s in rows])
            if self.device.type == "cuda":
                tokens_host = torch.empty(len(rows), dtype=torch.int64, pin_memory=True)
                tokens_host.copy_(tokens_dev, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
            else:
                tokens_host = tokens_dev
        events = None
        if start is not None:                # resolved later by device_times(): no sync
            end.record()
            events = (start, end, self._last_end_event)
            self._last_end_event = end
        flight = _Flight(sched, rows, tokens_dev, tokens_host, copied, P, events, runs)
        if runs is not None:
            flight.num_accepted = sum(len(r) - 1 for r in runs)
        return flight

    def _commit(self, flight: _Flight) -> None:
        """The step's KV is (being) computed: advance its sequences; each sampled row gets a
        placeholder token that _process fills. A row whose sequence finished meanwhile (async:
        EOS seen in the previous step, or an abort) is skipped; a sequence that reaches its
        length limit with this token leaves the scheduler now (it finishes when the token is
        read), so no later step schedules it."""
        done = self.scheduler.update(flight.sched)
        alive = [s for s in flight.rows if s.status != Status.FINISHED]
        assert done == alive, "scheduler and batch disagree on which rows are sampled"
        if flight.runs is not None:
            return                           # verification: _process applies the tokens
        max_len = self.config.max_model_len
        for i, seq in enumerate(flight.rows):
            if seq.status == Status.FINISHED:
                continue
            seq.token_ids.append(PLACEHOLDER)
            seq.pending = (flight, i)
            if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= max_len:
                self.scheduler.remove(seq)

    def _process(self, flight: _Flight) -> list[RequestOutput]:
        """Read the step's sampled ids (the sync), fill the placeholders, finish sequences."""
        now = time.perf_counter()
        if flight.runs is not None:
            return [self._accept(seq, run, now) for seq, run in zip(flight.rows, flight.runs)
                    if seq.finish_reason is None]
        tokens = flight.tokens()
        outputs = []
        for i, (seq, tok) in enumerate(zip(flight.rows, tokens)):
            if seq.pending is None or seq.pending[0] is not flight:
                continue                     # finished before this step's commit: dropped
            seq.pending = None
            if seq.finish_reason is not None:
                continue                     # aborted while the token was in flight
            seq.token_ids[-1] = tok
            outputs.append(self._append(seq, tok, now))
        return outputs

    def _fix_inputs(self, input_ids: torch.Tensor, sched) -> None:
        """Async: decodes whose input token is the in-flight step's sampled id get it copied
        on the device (index pairs through a pinned buffer: a pageable copy would wait for
        the stream)."""
        prev = self._inflight
        if prev is None or prev.tokens_dev is None:
            return
        dst, src, row = [], [], 0
        for seq, n in sched.scheduled:
            if seq.pending is not None:
                assert seq.pending[0] is prev and n == 1, "only the last step's token is pending"
                dst.append(row)
                src.append(seq.pending[1])
            row += n
        if not dst:
            return
        k = len(dst)
        if self.device.type == "cuda":
            if self._fix_host is None or self._fix_host[0].numel() < 2 * k:
                size = 2 * max(k, self.config.max_num_seqs)
                self._fix_host = [torch.empty(size, dtype=torch.int64, pin_memory=True), None]
            host, ev = self._fix_host
            if ev is not None:
                ev.synchronize()                 # its last copy has left the buffer
            host[:2 * k] = torch.tensor(dst + src)           # one contiguous pinned slice
            idx = host[:2 * k].to(self.device, non_blocking=True).view(2, k)
            self._fix_host[1] = torch.cuda.Event()
            self._fix_host[1].record()
        else:
            idx = torch.tensor([dst, src], dtype=torch.int64)
        input_ids.index_copy_(0, idx[0], prev.tokens_dev.index_select(0, idx[1]))

    def device_times(self, wait: bool = False) -> None:
        """Fill StepStats.device_time_s of the steps whose events have completed (all of
        them with wait=True). Steps that sample already synced; others are read later, so
        measuring adds no sync."""
        keep = []
        for stats, start, end, prev_end in self._pending_events:
            if wait:
                end.synchronize()
            if end.query():
                # The step occupies the stream from its start or the previous step's end,
                # whichever is later (async: it is queued behind the previous one).
                span = start.elapsed_time(end)
                if prev_end is not None:
                    span = min(span, prev_end.elapsed_time(end))
                stats.device_time_s = span / 1e3
            else:
                keep.append((stats, start, end, prev_end))
        self._pending_events = keep

    def _forward(self, sched):
        """The model over the step's batch -> (logits of the sampled rows, which scheduled
        sequences those rows are, the graph bucket replayed or 0 for eager)."""
        B = len(sched.scheduled)
        table = self.block_manager.table
        P = 0
        if self.graphs is not None and sched.num_prefill_tokens == 0 and not sched.num_spec_tokens:
            P = self.graphs.bucket_for(B) or 0      # verification steps (q_len 1 + k): eager
        if P:
            assert sched.num_decode_tokens == B, "a decode-only step has one token per sequence"
            batch = self.batch_builder.build(sched.scheduled, table, pad_to=P,
                                             out=self.graphs.buffer)
            self._fix_inputs(batch.input_ids, sched)
            return self.graphs.run(P)[:B], [True] * B, P
        batch = self.batch_builder.build(sched.scheduled, table)
        self._fix_inputs(batch.input_ids, sched)
        logits = self.model.forward(batch.input_ids, batch.positions, batch.attn, self.kv_caches,
                                    batch.logits_indices)
        return logits, batch.sampled_rows, 0

    def _propose(self) -> list[RequestOutput]:
        """Speculation before scheduling: if the large-batch rule allows k >= 1 this step,
        read back the step in flight (async: proposals need the tokens on the host), then let
        the proposer set each decoding sequence's spec_tokens."""
        k = self.spec.num_tokens(self.scheduler.running)
        if k == 0:
            return []
        outputs = []
        if self._inflight is not None:
            outputs = self._process(self._inflight)
            self._inflight = None
        self.spec.propose(self.scheduler.running, k)
        return outputs

    def _accept(self, seq: Sequence, run: list[int], now: float) -> RequestOutput:
        """A verification's tokens (accepted drafts + one target token): append them up to a
        stop / length finish, keep the accepted drafts' KV, release the rejected slots."""
        num_drafts, a = len(seq.spec_tokens), len(run) - 1
        seq.spec_tokens, seq.spec_q = [], None
        self.spec.record(self.stats, seq, num_drafts, a)
        seq.num_computed_tokens += a          # their KV was written by this step's forward
        for tok in run:
            seq.token_ids.append(tok)
            out = self._append(seq, tok, now)
            if out.finished:                  # stop token / length inside the run: cut there
                return out
        self.block_manager.commit(seq)        # names full blocks of accepted tokens only
        self.block_manager.truncate(seq)
        return out

    def _append(self, seq: Sequence, token: int, now: float) -> RequestOutput:
        """seq's newest token (already in token_ids) is known: time it, finish if done."""
        m, p = seq.metrics, seq.params
        if m.first_token_time is None:
            m.first_token_time = now
        m.token_times.append(now)
        self.stats.num_generated_tokens += 1
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            m.finish_time = now
            self.scheduler.remove(seq)      # a no-op if _commit already took it out
            del self.requests[seq.request_id]
        return self.output(seq)

    def output(self, seq: Sequence) -> RequestOutput:
        finished = seq.finish_reason is not None
        text = ""
        if finished and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        return RequestOutput(seq.request_id, seq.prompt_token_ids, seq.token_ids,
                             seq.num_output_tokens, text, finished, seq.finish_reason, seq.metrics)
