"""Tensor parallelism's runtime: N processes, rank 0 drives, every other rank mirrors it.

The model itself is sharded in its layers (model/parallel.py); this module only starts the
processes and sends each step's batch. Rank 0 is the user's process: it runs the scheduler,
the batch builder and the sampler exactly as at one rank, and the engine talks to a TPModel,
which has the model's interface (config, device, allocate_kv_cache, forward, ...). Each call
the engine makes on it is announced to the other ranks over a gloo "control" group, one
int64 header [HEADER] per call, and then run on rank 0's shard while the workers run the same
call on theirs; the collectives inside the layers (all-reduce, all-gather) pair up because all
ranks run the same kernels in the same order. The whole protocol (docs/tensor_parallel.md):

    header (ctrl, int64 [HEADER])      op, then its arguments
    FORWARD  T S B W max_q max_k       + payload (data group): ONE int64 tensor, the batch's
                                         input_ids, positions, slot_mapping [T], logits_indices
                                         [S], cu_seqlens_q [B+1], seq_lens [B], block_table [B*W]
    ALLOC_KV num_blocks block_size     each rank allocates its own heads' cache (replaces it)
    WARMUP   block_size max_q fmt       every rank compiles the attention variants of its shard's
                                         heads (Triton on a GPU; a no-op elsewhere), then all
                                         ranks compare their launch counts (one all-reduce)
    CAPTURE  max_num_seqs width max_len  GPU: every rank captures the same decode graphs
    REPLAY   P                         GPU: every rank replays its graph of bucket P
    STOP                               workers leave their loop, destroy the group, exit

Processes: torch.multiprocessing spawn on one node (a free port per engine, tcp:// rendezvous),
or all ranks started by torchrun (env:// rendezvous, several nodes; ranks > 0 serve inside
LLM() and exit when rank 0 closes). Faults: data collectives time out after timeout_s; a
worker that raises sends its traceback and exits, which breaks rank 0's next collective at
once (gloo: connection closed); rank 0 also checks its spawned workers are alive before each
call; any of these raises TPWorkerError on rank 0, and every worker exits when rank 0's
connection closes. The control group's timeout is long on purpose: an idle engine is no fault.
"""
from __future__ import annotations

import os
import struct
import socket
import time
import traceback
import weakref
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from kernels import AttentionMetadata
from model.loader import load_model, resolve_config
from model.parallel import TPGroup, check_tensor_parallel

from .graphs import DecodeGraphs

HEADER = 8
FORWARD, ALLOC_KV, CAPTURE, REPLAY, STOP, WARMUP = 1, 2, 3, 4, 5, 6
IDLE_TIMEOUT = timedelta(days=7)       # control group: workers wait for rank 0's next call
# Start-up (spawn, imports, rendezvous): on a loaded 2-core machine a worker takes ~5-15 s to
# import torch and build its shard; a large model's shard takes minutes to read.
START_TIMEOUT_S = 600.0


class TPWorkerError(RuntimeError):
    """A tensor-parallel rank died, raised, or timed out."""


@dataclass
class TPSpec:
    """What every rank needs to build its shard (picklable: sent to spawned workers)."""
    model: object                   # HF directory, preset name or ModelConfig
    size: int
    dtype: object = None
    device_type: str = "cpu"
    backend: str | None = None
    seed: int = 0
    timeout_s: float = 60.0
    init_method: str = "env://"
    threads: int = 0                # CPU: torch threads per worker (0: leave torch's default)

    def device(self, local_rank: int) -> torch.device:
        return torch.device("cuda", local_rank) if self.device_type == "cuda" else torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(spec: TPSpec, rank: int, local_rank: int):
    """Join the group; -> (data TPGroup, control group, device). The default group only
    rendezvouses (start-up timeout); the data group's collectives time out after timeout_s."""
    device = spec.device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=spec.init_method, rank=rank,
                            world_size=spec.size, timeout=timedelta(seconds=START_TIMEOUT_S))
    data = dist.new_group(backend=backend, timeout=timedelta(seconds=spec.timeout_s))
    ctrl = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return TPGroup(rank, spec.size, data), ctrl, device


def _recv_batch(hdr, device, tp: TPGroup):
    """Worker: receive FORWARD's payload -> the forward's arguments (views of one tensor)."""
    T, S, B, W, mq, mk = (int(v) for v in hdr[1:7])
    buf = torch.empty(3 * T + S + 2 * B + 1 + B * W, dtype=torch.int64, device=device)
    dist.broadcast(buf, 0, group=tp.group)
    o = 3 * T + S
    cu, lens = buf[o:o + B + 1].int(), buf[o + B + 1:o + 2 * B + 1].int()
    table = buf[o + 2 * B + 1:].int().view(B, W)
    attn = AttentionMetadata(cu, lens, table, buf[2 * T:3 * T], mq, mk)
    return buf[:T], buf[T:2 * T], attn, buf[3 * T:o]


def _pack_kv_format(kv_cache_dtype: str, kv_scales) -> tuple[int, int, int]:
    """ALLOC_KV header ints for the cache format: dtype index, then the per-tensor scales'
    float64 bits (-1: per-slot scales)."""
    from .config import KV_CACHE_DTYPES
    bits = [-1, -1] if kv_scales is None else [
        struct.unpack("<q", struct.pack("<d", float(s)))[0] for s in kv_scales]
    return KV_CACHE_DTYPES.index(kv_cache_dtype), *bits


def _unpack_kv_format(ints) -> tuple:
    from .config import KV_CACHE_DTYPES
    idx, kb, vb = (int(v) for v in ints)
    scales = None if kb == -1 else tuple(struct.unpack("<d", struct.pack("<q", b))[0]
                                         for b in (kb, vb))
    return KV_CACHE_DTYPES[idx], scales


def _kv_format_kwargs(kv_cache_dtype: str, kv_scales) -> dict:
    # "auto" calls the model exactly as before fp8 existed
    return {} if kv_cache_dtype == "auto" else dict(kv_cache_dtype=kv_cache_dtype,
                                                    kv_scales=kv_scales)


def _agree_warmup(tp: TPGroup, device, launches: int) -> tuple[int, int]:
    """Every rank's warm-up launch count -> (min, max) over the ranks (one all-reduce on the
    data group, so a silent worker times out instead of hanging)."""
    t = torch.tensor([launches, -launches], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=tp.group)
    return -int(t[1]), int(t[0])


def run_worker(spec: TPSpec, rank: int, local_rank: int) -> None:
    """Rank > 0: build the shard, then mirror rank 0's calls until STOP."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    tp, ctrl, device = _init(spec, rank, local_rank)
    try:
        m = load_model(spec.model, dtype=spec.dtype, device=device, backend=spec.backend,
                       seed=spec.seed, tp=tp)
        kv, graphs = None, None
        hdr = torch.zeros(HEADER, dtype=torch.int64)
        with torch.inference_mode():
            while True:
                dist.broadcast(hdr, 0, group=ctrl)
                op = int(hdr[0])
                if op == FORWARD:
                    ids, pos, attn, logits_idx = _recv_batch(hdr, device, tp)
                    m.forward(ids, pos, attn, kv, logits_idx)
                elif op == ALLOC_KV:
                    kv = graphs = None
                    kv = m.allocate_kv_cache(int(hdr[1]), int(hdr[2]),
                                             **_kv_format_kwargs(*_unpack_kv_format(hdr[3:6])))
                elif op == WARMUP:
                    _agree_warmup(tp, device, m.warmup_kernels(
                        int(hdr[1]), int(hdr[2]),
                        **_kv_format_kwargs(*_unpack_kv_format(hdr[3:6]))))
                elif op == CAPTURE:
                    graphs = TPDecodeGraphs(None, m, kv, max_num_seqs=int(hdr[1]),
                                            width=int(hdr[2]), max_model_len=int(hdr[3]),
                                            capture=device.type == "cuda")
                    graphs.capture()
                elif op == REPLAY:
                    graphs.run(int(hdr[1]))
                elif op == STOP:
                    break
                else:
                    raise TPWorkerError(f"rank {rank}: unknown op {op} in header {hdr.tolist()}")
    finally:
        dist.destroy_process_group()


def _worker_main(spec: TPSpec, rank: int, errors) -> None:
    """Spawned process entry: run_worker, reporting an exception to rank 0 before exiting."""
    errors.put((rank, None))      # started: imports and unpickling went through
    try:
        run_worker(spec, rank, rank)
    except BaseException:  # noqa: BLE001 - anything a worker raises is rank 0's error message
        errors.put((rank, traceback.format_exc()))
        os._exit(1)        # closing our sockets breaks rank 0's pending collective at once


@dataclass
class _Workers:
    """What the finalizer needs (never the TPModel itself, so it can be collected)."""
    procs: list = field(default_factory=list)
    errors: object = None
    ctrl: object = None
    tp: object = None               # rank 0's TPGroup (its layers share it)
    closed: bool = False
    failed: str | None = None


def _shutdown(w: _Workers) -> None:
    if w.closed:
        return
    w.closed = True
    if w.failed is None and w.ctrl is not None:
        try:
            hdr = torch.zeros(HEADER, dtype=torch.int64)
            hdr[0] = STOP
            dist.broadcast(hdr, 0, group=w.ctrl)
        except Exception:  # noqa: BLE001 - a broken group: the workers are leaving anyway
            pass
    for p in w.procs:
        p.join(timeout=10 if w.failed is None else 1)   # a failed group gets no STOP
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    w.ctrl = None                       # the last references to the groups (and the TCPStore)
    if w.tp is not None:
        w.tp.group = None
    if dist.is_initialized():
        dist.destroy_process_group()    # closes rank 0's store: its port is free again


def _torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def launch(model, *, tensor_parallel_size: int, dtype=None, device="cpu", backend=None,
           seed: int = 0, timeout_s: float = 60.0) -> "TPModel":
    """Rank 0's TPModel. Under torchrun, ranks > 0 do not return: they check the config, serve
    rank 0 until it closes, and exit the process (every rank runs the user's script)."""
    if _torchrun() and int(os.environ["RANK"]) > 0:
        cfg, _ = resolve_config(model)
        check_tensor_parallel(cfg, tensor_parallel_size)
        spec = TPSpec(model, tensor_parallel_size, dtype, torch.device(device).type, backend,
                      seed, timeout_s)
        run_worker(spec, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)))
        raise SystemExit(0)
    return TPModel(model, tensor_parallel_size=tensor_parallel_size, dtype=dtype, device=device,
                   backend=backend, seed=seed, timeout_s=timeout_s)


class TPModel:
    """Rank 0's view of a model sharded over tensor_parallel_size ranks: the engine's model.

    Validates the config (heads, vocab, devices: ValueError) before any worker starts, then
    spawns ranks 1..N-1 (or joins torchrun's group), loads rank 0's shard, and mirrors every
    call the engine makes (module docstring). close() ends every worker and frees the port."""

    def __init__(self, model, *, tensor_parallel_size: int, dtype=None, device="cpu",
                 backend=None, seed: int = 0, timeout_s: float = 60.0):
        N = tensor_parallel_size
        if isinstance(model, torch.nn.Module) or hasattr(model, "allocate_kv_cache"):
            raise ValueError("model: tensor_parallel_size > 1 needs a HF directory, preset name "
                             "or ModelConfig (each rank loads its own shard), not a loaded model")
        cfg, _ = resolve_config(model)
        check_tensor_parallel(cfg, N)
        dev = torch.device(device)
        torchrun = _torchrun()
        if dev.type == "cuda":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", N)) if torchrun else N
            if local > torch.cuda.device_count():
                raise ValueError(f"tensor_parallel_size: {local} ranks on this node but "
                                 f"{torch.cuda.device_count()} CUDA devices")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
        if dist.is_initialized():
            raise RuntimeError("tensor_parallel_size > 1: this process already belongs to a "
                               "torch.distributed group (one tensor-parallel engine per process)")
        self.config = cfg
        spec = TPSpec(model, N, dtype, dev.type, backend, seed, timeout_s)
        self._w = _Workers()
        self._finalizer = weakref.finalize(self, _shutdown, self._w)
        if torchrun:
            if int(os.environ["WORLD_SIZE"]) != N or int(os.environ["RANK"]) != 0:
                raise ValueError(f"tensor_parallel_size: {N} != torchrun's WORLD_SIZE "
                                 f"{os.environ['WORLD_SIZE']} (or not rank 0)")
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        else:
            import torch.multiprocessing as mp
            spec.init_method = f"tcp://127.0.0.1:{free_port()}"
            if dev.type == "cpu":
                spec.threads = max(1, (os.cpu_count() or 1) // N)
            ctx = mp.get_context("spawn")
            self._w.errors = ctx.SimpleQueue()
            for rank in range(1, N):
                p = ctx.Process(target=_worker_main, args=(spec, rank, self._w.errors),
                                name=f"ragged-tp-{rank}", daemon=True)
                p.start()
                self._w.procs.append(p)
            local_rank = 0
            self._wait_started(START_TIMEOUT_S)
        self.init_method = spec.init_method
        try:
            self.tp, self._w.ctrl, self.device = _init(spec, 0, local_rank)
            self._w.tp = self.tp
            self.local = load_model(model, dtype=dtype, device=self.device, backend=backend,
                                    seed=seed, tp=self.tp)
        except Exception as e:
            self._fail(e)
        self.backend, self.dtype = backend, self.local.dtype
        self._hdr = torch.zeros(HEADER, dtype=torch.int64)
        self._timeout = timedelta(seconds=timeout_s)

    # ------------------------------------------------------------------ faults, shutdown
    def _wait_started(self, timeout_s: float) -> None:
        """Each spawned worker reports once it runs; one that dies first (a bad import, a
        script without an `if __name__ == "__main__":` guard) fails here, not after the
        rendezvous timeout."""
        up, deadline = set(), time.monotonic() + timeout_s
        while len(up) < len(self._w.procs):
            while not self._w.errors.empty():
                rank, tb = self._w.errors.get()
                if tb is not None:
                    self._w.errors.put((rank, tb))
                    self._fail()
                up.add(rank)
            if any(not p.is_alive() for p in self._w.procs) or time.monotonic() > deadline:
                self._fail()
            time.sleep(0.02)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._w.procs]

    def _fail(self, cause: BaseException | None = None):
        """Raise TPWorkerError naming the failed ranks (their tracebacks if they sent one)."""
        if self._w.failed is None:
            for p in self._w.procs:        # a worker that raised exits right after reporting
                p.join(timeout=2)
            msgs = []
            while self._w.errors is not None and not self._w.errors.empty():
                rank, tb = self._w.errors.get()
                if tb is not None:
                    msgs.append(f"rank {rank} raised:\n{tb}")
            for i, p in enumerate(self._w.procs, 1):
                if not p.is_alive() and not any(m.startswith(f"rank {i} ") for m in msgs):
                    msgs.append(f"rank {i} exited with code {p.exitcode}")
            if cause is not None:
                msgs.append(f"rank 0: {type(cause).__name__}: {cause}")
            self._w.failed = "; ".join(msgs) or "unknown failure"
            self.close()
        raise TPWorkerError(f"tensor-parallel worker failure: {self._w.failed}") from cause

    def _send(self, op: int, *args: int) -> None:
        """Announce one call to every worker (after checking the spawned ones are alive)."""
        if self._w.closed and self._w.failed is None:
            raise TPWorkerError("tensor-parallel engine is closed")
        if self._w.failed is not None:
            self._fail()
        if any(not p.is_alive() for p in self._w.procs):
            self._fail()
        t0 = time.perf_counter()
        self._hdr.zero_()
        self._hdr[0] = op
        self._hdr[1:1 + len(args)] = torch.tensor(args, dtype=torch.int64)
        try:
            # Rank 0's send has the data timeout (gloo's send waits for the receiver: a hung
            # worker would otherwise hold it for the control group's 7 days); the workers'
            # receive keeps the long one.
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.timeout = 0, self._timeout
            self._w.ctrl.broadcast([self._hdr], opts).wait()
        except RuntimeError as e:
            self._fail(e)
        self.tp._count(HEADER * 8 * (self.tp.size - 1), t0)

    def close(self) -> None:
        """Stop every worker and leave the group (idempotent; also run at interpreter exit)."""
        self._finalizer()

    # ------------------------------------------------------------------ the model interface
    def kv_cache_bytes_per_block(self, block_size: int, **kv_fmt) -> int:
        return self.local.kv_cache_bytes_per_block(block_size, **kv_fmt)   # per rank: its heads

    def allocate_kv_cache(self, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto",
                          kv_scales=None):
        self._send(ALLOC_KV, num_blocks, block_size, *_pack_kv_format(kv_cache_dtype, kv_scales))
        kv = self.local.allocate_kv_cache(num_blocks, block_size,
                                          **_kv_format_kwargs(kv_cache_dtype, kv_scales))
        self.tp.take_comm()        # engine start-up (profiling) is not the first step's traffic
        return kv

    def warmup_kernels(self, block_size: int, max_query_len: int = 1,
                       kv_cache_dtype: str = "auto", kv_scales=None) -> int:
        """The model's warm-up on every rank (each compiles the variants of its own heads:
        under TP a rank's launch has num_heads / N query heads, a different specialisation
        from rank 0's only if the shards differ, which they do not). Ranks that warmed up a
        different number of launches would JIT-compile inside served steps: TPWorkerError."""
        self._send(WARMUP, block_size, max_query_len, *_pack_kv_format(kv_cache_dtype, kv_scales))
        try:
            n = self.local.warmup_kernels(block_size, max_query_len,
                                          **_kv_format_kwargs(kv_cache_dtype, kv_scales))
            lo, hi = _agree_warmup(self.tp, self.local.device, n)
        except Exception as e:  # noqa: BLE001 - as in forward: the group cannot go on
            self._fail(e)
        if lo != hi:
            self._fail(RuntimeError(f"warm-up launches differ between ranks: {lo} to {hi} "
                                    f"(rank 0: {n})"))
        return n

    def forward(self, input_ids, positions, attn, kv_caches, logits_indices):
        T, S, B = input_ids.shape[0], logits_indices.shape[0], attn.seq_lens.shape[0]
        W = attn.block_table.shape[1]
        self._send(FORWARD, T, S, B, W, attn.max_seqlen_q, attn.max_seqlen_k)
        t0 = time.perf_counter()
        try:
            # GPU: the fields are device tensors (the async placeholder fix already applied),
            # so the payload goes device to device over NCCL with no host sync.
            payload = torch.cat([input_ids, positions, attn.slot_mapping, logits_indices,
                                 attn.cu_seqlens_q.long(), attn.seq_lens.long(),
                                 attn.block_table.reshape(-1).long()])
            dist.broadcast(payload, 0, group=self.tp.group)
            self.tp._count(payload.numel() * 8 * (self.tp.size - 1), t0)
            return self.local.forward(input_ids, positions, attn, kv_caches, logits_indices)
        except Exception as e:  # noqa: BLE001 - a collective's timeout or a dead peer is a
            # plain RuntimeError from gloo; and whatever rank 0 raised mid-forward, the workers
            # are now inside a forward rank 0 left: the group cannot go on either way.
            self._fail(e)

    __call__ = forward                 # callable like the nn.Module it stands for

    def decode_graphs(self, model, kv_caches, **kw):
        """The engine's DecodeGraphs under TP: captured and replayed in step on every rank
        (GPU); on CPU the same protocol runs the padded path eagerly (so CPU tests cover it)."""
        return TPDecodeGraphs(self, self.local, kv_caches, **kw)


class TPDecodeGraphs(DecodeGraphs):
    """DecodeGraphs on every rank: rank 0 announces CAPTURE and each REPLAY; every captured
    forward starts with an NCCL broadcast of rank 0's static batch buffer into each rank's own
    (so a replay reads the batch rank 0 copied in), then the sharded forward with its NCCL
    all-reduces, captured after DecodeGraphs' warm-up run as torch.cuda.graphs requires."""

    def __init__(self, driver: TPModel | None, model, kv_caches, **kw):
        super().__init__(model, kv_caches, **kw)
        self.driver, self.tp = driver, model.tp
        self.bytes_per_replay: dict[int, int] = {}

    def _forward(self, P: int):
        from .batch import batch_layout
        before, t0 = self.tp.comm_bytes, time.perf_counter()
        nbytes = batch_layout(P, P, P, self.width)[0]
        dist.broadcast(self.buffer[:nbytes], 0, group=self.tp.group)
        self.tp._count(nbytes * (self.tp.size - 1), t0)
        out = super()._forward(P)
        self.bytes_per_replay[P] = self.tp.comm_bytes - before
        return out

    def capture(self) -> None:
        if self.driver is not None:
            self.driver._send(CAPTURE, max(self.buckets), self.width, self.max_model_len)
        super().capture()
        self.tp.take_comm()        # capture's traffic is start-up, not the first step's

    def run(self, P: int):
        if self.driver is not None:
            self.driver._send(REPLAY, P)
            if self.capture_enabled:       # a replay's collectives run without Python
                self.tp.comm_bytes += self.bytes_per_replay.get(P, 0)
        return super().run(P)
