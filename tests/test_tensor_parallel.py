"""Tensor parallelism (model/parallel.py, ragged/distributed.py) on CPU with gloo, 2 ranks.

Greedy outputs at tensor_parallel_size 2 equal 1 and Hugging Face's for every family, and the
sharded logits are within test_model's HF bound, with prompts chunked into steps shared with
decodes, preemption and prefix-cache hits in the same runs; the variants cover KV-head
replication (1 KV head over 2 ranks), tied embeddings, a sharded checkpoint and the padded
graph path with async scheduling; 4 ranks as threads check replication of 2 KV heads over 4.
The loader reads only each rank's slices; bad configs fail before any process starts; a worker
that raises, is killed or hangs is a TPWorkerError on rank 0; close() and interpreter exit end
every worker and free the port. Spawning a rank costs ~5 s on a loaded 2-core machine, so each
test starts one engine at most.
"""
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from model import ModelConfig, load_model
from model.loader import hf_weight_map, load_safetensors
from model.parallel import TPGroup, take_shard
from ragged import LLM, Engine, EngineConfig, SamplingParams
from ragged.distributed import TPWorkerError
from tests.hf_models import make_hf_model
from tests.test_engine import hf_greedy, prompts
from tests.test_model import SEQS, compare, hf_logits, load_hf, random_tokens, run_two_steps
from tests.tolerance import assert_close

VOCAB = 260                      # 259 (the byte tokenizer) is not divisible by 2 ranks
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
# 4-token blocks, 24 of them (96 tokens) for ~150 tokens of demand: preemption; a 16-token
# budget: the 45-token prompt is chunked and chunks share steps with decodes.
CONFIG = dict(block_size=4, num_blocks=24, max_num_batched_tokens=16, max_num_seqs=4)
# family -> (HF config overrides, make_hf_model options, extra LLM options)
CASES = {
    "llama": (dict(num_key_value_heads=1), {}, {}),               # KV head replicated
    "llama3": ({}, {}, dict(cuda_graphs=True, async_scheduling=True)),   # padded path, async
    "mistral": ({}, {}, {}),
    "qwen2": ({}, dict(max_shard_size="20KB"), {}),               # sharded safetensors
    "qwen3": (dict(tie_word_embeddings=True), {}, {}),            # tied embeddings
}
TINY = replace(ModelConfig.preset("tiny"), vocab_size=256)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)         # tiny models: threads only spin on 2 shared cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tp")
    return {f: make_hf_model(f, root / f, seed=3, vocab_size=VOCAB, **opts, **over)
            for f, (over, opts, _) in CASES.items()}


def port_of(llm) -> int:
    return int(llm.engine.model.init_method.rsplit(":", 1)[1])      # tcp://127.0.0.1:PORT


def generate_twice(llm, ps):
    """ps[0] alone first (it fills the prefix cache), then all of ps."""
    first = llm.generate(ps[:1], GREEDY, use_tqdm=False)
    return [o.token_ids for o in first + llm.generate(ps[1:], GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("family", list(CASES))
def test_tp2_equals_tp1_and_hf(model_dirs, family):
    path, extra = model_dirs[family], CASES[family][2]
    shared = prompts(seed=4, lens=(24,))[0]          # 6 full blocks shared by two prompts
    ps = [shared + [5, 6, 7]] + [shared + [9]] + prompts(seed=1)
    want = [hf_greedy(path, p) for p in ps]
    one = LLM(path, **CONFIG, **extra)
    assert generate_twice(one, ps) == want
    with LLM(path, tensor_parallel_size=2, **CONFIG, **extra) as llm:
        got = generate_twice(llm, ps)
        eng = llm.engine
        procs, port = eng.model._w.procs, port_of(llm)
        log = eng.step_log
        print(family, "steps", len(log), "preempted", eng.stats.num_preemptions, "prefix hits",
              eng.stats.prefix_hit_tokens, "comm bytes", sum(s.comm_bytes for s in log))
        assert got == want
        assert eng.stats.num_preemptions > 0 and eng.stats.prefix_hit_tokens >= 16
        assert max(s.num_prefill_tokens for s in log) == 16          # chunked prefill
        assert any(s.num_prefill_tokens and s.num_decode_tokens for s in log)
        assert all(s.comm_bytes > 0 and s.comm_time_s > 0 for s in log if s.num_seqs)
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        if extra.get("cuda_graphs"):
            assert eng.graphs.num_replays > 0 and any(s.graph_batch for s in log)
        kv = eng.kv_caches[0][0]
        assert kv.shape[2] == max(1, eng.model.config.num_key_value_heads // 2)   # its heads
        # The sharded model's logits (two ragged steps over a fresh KV cache on every rank)
        # vs HF fp64, within test_model's bound (2 x HF fp32's own error + 4 ulps).
        compare(f"{family} tp=2", path, eng.model)
    for p in procs:                                   # close(): every worker gone, port free
        assert p.exitcode == 0
    with socket.socket() as s:            # SO_REUSEADDR: TIME_WAIT is fine, a listener is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    assert not torch.distributed.is_initialized()


class _Recorder:
    """safetensors.safe_open that records every slice read and forbids whole-tensor reads."""

    def __init__(self, real, reads):
        self.real, self.reads = real, reads

    def __call__(self, *a, **kw):
        rec = self

        class Handle:
            def __init__(self):
                self.h = rec.real(*a, **kw)

            def __enter__(self):
                self.h.__enter__()
                return self

            def __exit__(self, *e):
                return self.h.__exit__(*e)

            def keys(self):
                return self.h.keys()

            def get_tensor(self, name):
                raise AssertionError(f"{name}: the whole tensor was read")

            def get_slice(self, name):
                sl = self.h.get_slice(name)

                class Slice:
                    def get_shape(self):
                        return sl.get_shape()

                    def __getitem__(self, idx):
                        t = sl[idx]
                        rec.reads.append((name, tuple(sl.get_shape()), tuple(t.shape)))
                        return t
                return Slice()
        return Handle()


def test_sharded_checkpoint_each_rank_reads_only_its_slices(model_dirs, monkeypatch):
    import safetensors
    path = model_dirs["qwen2"]                         # sharded, qkv bias
    full = load_model(path)
    reads = []
    monkeypatch.setattr(safetensors, "safe_open", _Recorder(safetensors.safe_open, reads))
    shards = [load_model(path, tp=TPGroup(r, 2)) for r in range(2)]
    params = dict(full.named_parameters())
    for r, m in enumerate(shards):
        for name, p in m.named_parameters():
            assert torch.equal(p, take_shard(p, params[name])), (r, name)
    # Every split tensor (all but the norms) is read in pieces at most half its size.
    split = {hf for hf, (pname, _, _) in hf_weight_map(full.config).items()
             if "norm" not in pname}
    assert {n for n, _, _ in reads} >= split
    for name, shape, got in reads:
        if name in split:
            assert torch.Size(got).numel() * 2 <= torch.Size(shape).numel(), (name, shape, got)
    # And the loader's own account of the slices it read agrees.
    reads.clear()
    got = load_safetensors(shards[1], path)
    assert sorted(got) == sorted((n, g) for n, _, g in reads)


class _ThreadGroup(TPGroup):
    """N ranks as threads of this process: the collectives meet at a barrier (sum / concat in
    rank order), so the sharding math is checked at N = 4 without spawning anything."""

    def __init__(self, rank, size, board):
        super().__init__(rank, size)
        self.board = board

    def _meet(self, x, combine):
        slots, barrier = self.board
        slots[self.rank] = x.clone()
        barrier.wait()
        out = combine(list(slots))
        barrier.wait()                    # everyone has read before the next collective
        return out

    def all_reduce(self, x):
        return x.copy_(self._meet(x, lambda xs: sum(xs[1:], xs[0].clone())))

    def all_gather(self, x):
        return self._meet(x, lambda xs: torch.cat(xs, dim=-1))


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_four_ranks_replicating_kv_heads_match_hf(model_dirs, family):
    """4 ranks over 4 query heads: mistral's 2 KV heads are each replicated on 2 ranks,
    llama's 1 on all 4; every rank's logits are within test_model's HF bound."""
    import threading
    path, N = model_dirs[family], 4
    board = ([None] * N, threading.Barrier(N, timeout=60))
    shards = [load_model(path, tp=_ThreadGroup(r, N, board)) for r in range(N)]
    assert [m.num_kv_heads for m in shards] == [1] * N
    tokens = random_tokens(SEQS, VOCAB)
    outs, errors = [None] * N, []

    def run(r):
        try:
            outs[r] = run_two_steps(shards[r], tokens, SEQS)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            board[1].abort()
    threads = [threading.Thread(target=run, args=(r,)) for r in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    keys = list(outs[0])
    ref = hf_logits(load_hf(path, torch.float64), tokens, keys)
    low = hf_logits(load_hf(path, torch.float32), tokens, keys).float()
    for r in range(N):
        assert_close(torch.stack([outs[r][k] for k in keys]), ref, low, name=f"{family} rank {r}/4")


@pytest.mark.parametrize("change,size,field", [
    (dict(num_attention_heads=6, num_key_value_heads=2), 4, "num_attention_heads"),
    (dict(num_attention_heads=6, num_key_value_heads=3), 2, "num_key_value_heads"),
    (dict(num_attention_heads=6, num_key_value_heads=2), 3, "num_key_value_heads"),
    (dict(vocab_size=259), 2, "vocab_size"),
    (dict(intermediate_size=97), 2, "intermediate_size"),
])
def test_bad_configs_raise_before_any_worker_starts(change, size, field):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=field):
        LLM(replace(TINY, **change), tensor_parallel_size=size, device="cpu")
    assert multiprocessing.active_children() == [] and time.perf_counter() - t0 < 5


def test_bad_setups_raise_before_any_worker_starts():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(TINY, tensor_parallel_size=0, device="cpu")
    with pytest.raises(ValueError, match="tensor_parallel_size"):      # more ranks than GPUs
        LLM(TINY, tensor_parallel_size=max(2, torch.cuda.device_count() + 1), device="cuda")
    with pytest.raises(ValueError, match="model"):                      # a loaded model
        LLM(load_model(TINY), tensor_parallel_size=2, device="cpu")
    with pytest.raises(ValueError, match="tensor_parallel_size"):       # engine vs model
        Engine(load_model(TINY), EngineConfig(tensor_parallel_size=2))
    assert multiprocessing.active_children() == []


def test_worker_that_raises_or_dies_is_an_error_on_rank_0():
    llm = LLM(TINY, tensor_parallel_size=2, device="cpu", num_blocks=32)
    eng = llm.engine
    eng.add_request("a", list(range(1, 20)), SamplingParams(max_tokens=50))
    eng.step()
    eng.model._send(99)                   # a protocol error: the worker raises and exits
    t0 = time.perf_counter()
    with pytest.raises(TPWorkerError, match=r"rank 1 raised:(.|\n)*unknown op 99"):
        for _ in range(100):
            eng.step()
    assert time.perf_counter() - t0 < 30
    llm.close()
    assert not torch.distributed.is_initialized()

    # Killed mid-run (a new engine: the group above is gone, its port free).
    llm = LLM(TINY, tensor_parallel_size=2, device="cpu", num_blocks=32)
    eng = llm.engine
    eng.add_request("b", list(range(1, 20)), SamplingParams(max_tokens=50))
    eng.step()
    os.kill(eng.model.pids[0], signal.SIGKILL)
    t0 = time.perf_counter()
    with pytest.raises(TPWorkerError, match="rank 1 exited with code -9"):
        for _ in range(100):
            eng.step()
    assert time.perf_counter() - t0 < 30
    llm.close()
    llm.close()                           # idempotent
    assert multiprocessing.active_children() == []


def test_warmup_runs_on_every_rank_and_the_counts_must_agree():
    """WARMUP reaches the worker (a worker without it never joins the count's all-reduce:
    rank 0 would time out) and a rank that compiled a different number of variants than
    the others is an error at start-up, not JIT compiles inside served steps."""
    from ragged.distributed import launch
    m = launch(TINY, tensor_parallel_size=2, device="cpu", timeout_s=20)
    try:
        m.allocate_kv_cache(8, 16, kv_cache_dtype="fp8_e4m3")
        assert m.warmup_kernels(16, 3, kv_cache_dtype="fp8_e4m3") == 0   # CPU: no Triton
        m.local.warmup_kernels = lambda *a, **k: 4   # rank 0 "compiled" what rank 1 did not
        with pytest.raises(TPWorkerError, match="warm-up launches differ between ranks: 0 to 4"):
            m.warmup_kernels(16, 1)
    finally:
        m.close()


def test_hung_worker_times_out_instead_of_hanging():
    """A worker that stops responding (SIGSTOP: alive, silent) fails rank 0's next collective
    after the data group's timeout_s, and close() still ends it."""
    from ragged.distributed import launch
    model = launch(TINY, tensor_parallel_size=2, device="cpu", timeout_s=3)
    eng = Engine(model, EngineConfig(num_blocks=32, tensor_parallel_size=2))
    eng.add_request("c", list(range(1, 20)), SamplingParams(max_tokens=50))
    eng.step()
    pid = model.pids[0]
    os.kill(pid, signal.SIGSTOP)
    t0 = time.perf_counter()
    try:
        with pytest.raises(TPWorkerError, match="rank 0: .*"):
            for _ in range(100):
                eng.step()
        waited = time.perf_counter() - t0
        print("hung worker detected after", round(waited, 1), "s")
        assert 2.5 < waited < 30
    finally:
        model.close()                      # (the failure already killed the stopped worker)
        assert not any(p.is_alive() for p in model._w.procs)
    assert multiprocessing.active_children() == [] and not torch.distributed.is_initialized()


_EXIT_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from dataclasses import replace
from model import ModelConfig
from ragged import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(replace(ModelConfig.preset("tiny"), vocab_size=256), tensor_parallel_size=2,
              device="cpu", num_blocks=16)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    print(llm.engine.model.pids[0], flush=True)
"""                                       # exits without close(): the finalizer must stop rank 1


def test_interpreter_exit_ends_workers(tmp_path):
    script = tmp_path / "exit_without_close.py"
    script.write_text(_EXIT_SCRIPT.format(root=os.getcwd()))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[-1])
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# ----------------------------------------------------------------------- GPU (NCCL)
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                  reason="tensor parallelism over NCCL needs >= 2 CUDA GPUs")


@pytest.mark.gpu
@needs_2_gpus
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gpu_nccl_tp2_graphs_and_async_equal_tp1(model_dirs, family):
    """NCCL all-reduces inside the captured decode graphs, async scheduling on (the defaults
    on CUDA): greedy fp32 tokens equal one GPU's and HF's."""
    path = model_dirs[family]
    ps = prompts(seed=1)
    one = LLM(path, device="cuda", dtype="float32", max_num_seqs=8)
    want = [o.token_ids for o in one.generate(ps, GREEDY, use_tqdm=False)]
    del one
    torch.cuda.empty_cache()
    with LLM(path, device="cuda", dtype="float32", max_num_seqs=8, tensor_parallel_size=2) as llm:
        got = [o.token_ids for o in llm.generate(ps, GREEDY, use_tqdm=False)]
        eng = llm.engine
        assert eng.graphs is not None and eng.graph_capture_error is None
        assert eng.async_scheduling and any(s.graph_batch for s in eng.step_log)
        assert all(s.comm_bytes > 0 for s in eng.step_log if s.num_seqs)
    assert got == want == [hf_greedy(path, p) for p in ps]


@pytest.mark.gpu
@needs_2_gpus
def test_gpu_kv_cache_profiled_per_rank(model_dirs):
    """Each rank's KV cache holds its heads only: the profiled block count at 2 ranks is about
    twice one rank's for the same memory budget (weights are small)."""
    path = model_dirs["mistral"]
    one = LLM(path, device="cuda", dtype="float32", gpu_memory_utilization=0.3)
    n1 = one.engine.block_manager.num_blocks
    del one
    torch.cuda.empty_cache()
    with LLM(path, device="cuda", dtype="float32", gpu_memory_utilization=0.3,
             tensor_parallel_size=2) as llm:
        n2 = llm.engine.block_manager.num_blocks
        assert llm.engine.kv_caches[0][0].shape[2] == 1
    print("blocks", n1, n2)
    assert 1.8 * n1 <= n2 <= 2.2 * n1


def test_kv_format_header_round_trip():
    from ragged.distributed import _pack_kv_format, _unpack_kv_format
    for fmt in (("auto", None), ("fp8_e4m3", None), ("fp8_e4m3", (0.0123, 3.5))):
        ints = _pack_kv_format(*fmt)
        assert all(isinstance(i, int) for i in ints)
        assert _unpack_kv_format(torch.tensor(ints)) == fmt


@pytest.mark.parametrize("kv_scales", [None, (0.05, 0.04)])
def test_tp2_fp8_kv_cache_equals_tp1(model_dirs, kv_scales):
    """Every rank allocates the same fp8 format (per-slot, or the per-tensor scales sent in
    the ALLOC_KV header) and the sharded run gives the single-process fp8 tokens."""
    path = model_dirs["mistral"]
    ps = prompts(seed=1)
    fp8 = dict(kv_cache_dtype="fp8_e4m3", kv_scales=kv_scales)
    want = [o.token_ids for o in LLM(path, **CONFIG, **fp8).generate(ps, GREEDY, use_tqdm=False)]
    with LLM(path, tensor_parallel_size=2, **CONFIG, **fp8) as llm:
        got = [o.token_ids for o in llm.generate(ps, GREEDY, use_tqdm=False)]
        cache = llm.engine.kv_caches[0]
        assert cache[0].dtype == torch.float8_e4m3fn
        if kv_scales is None:         # per-slot scales of this rank's KV heads only
            assert cache.k_scale.shape == cache[0].shape[:3]
        else:
            assert (cache.k_scale, cache.v_scale) == kv_scales
    assert got == want
