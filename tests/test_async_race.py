"""Host/device races of async scheduling: buffers the host reuses while the device lags.

On CUDA the batch builder reuses ONE pinned host buffer, and the engine another (for the
decode-input fix-up indices); a non-blocking copy reads its pinned source only when the
stream reaches it. So the host must wait for a copy's event before overwriting its buffer.
Nothing on CPU can catch a missing wait (each CPU batch is a fresh buffer): the gpu tests
delay the stream with torch.cuda._sleep so that the device is far behind the host, then check
what the device received. The CPU test checks the same helper's expectations (and the CPU
contract that an earlier batch stays valid after the next build).
"""
from __future__ import annotations

import pytest
import torch

from ragged import LLM, SamplingParams
from ragged.batch import BatchBuilder
from ragged.block_manager import BlockManager
from ragged.sequence import Sequence

FIELDS = ("input_ids", "positions", "slot_mapping", "logits_indices", "cu_seqlens_q",
          "seq_lens", "block_table")
SLEEP_CYCLES = 200_000_000      # ~0.1 s of device time at ~2 GHz: far longer than two builds


def _two_steps():
    """Two batches of different sequences (sizes, tokens, block tables) and their table."""
    bm = BlockManager(32, 16, enable_prefix_caching=False, max_blocks_per_seq=4)
    # the second batch is the smaller one: it fits in the buffer the first one used
    first = [Sequence(f"a{i}", [100 + 7 * i + j for j in range(n)], SamplingParams(), 0, 0.0, i)
             for i, n in enumerate((40, 2))]
    second = [Sequence(f"b{i}", [3 + i + j for j in range(n)], SamplingParams(), 0, 0.0, 2 + i)
              for i, n in enumerate((5, 17, 1))]
    for s in first + second:
        assert bm.ensure_slots(s, s.num_tokens)
    return [(s, s.num_tokens) for s in first], [(s, s.num_tokens) for s in second], bm.table


def _host_view(batch):
    return {f: getattr(batch, f).cpu().clone() for f in FIELDS}


def _expected(steps, table):
    """Each step's batch built alone on the CPU (a fresh buffer each: no reuse to race)."""
    return [_host_view(BatchBuilder(16, "cpu").build(s, table)) for s in steps]


def _build_back_to_back(device, delay=None):
    one, two, table = _two_steps()
    builder = BatchBuilder(16, device)
    if delay is not None:
        delay()
    b1 = builder.build(one, table)
    b2 = builder.build(two, table)          # reuses the host buffer b1 was copied from
    if device != "cpu":
        torch.cuda.synchronize()
    return [_host_view(b1), _host_view(b2)], _expected([one, two], table)


def _assert_same(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        for f in FIELDS:
            assert torch.equal(g[f], w[f]), f"batch {i} {f}: {g[f].tolist()} != {w[f].tolist()}"


def test_back_to_back_builds_keep_the_first_batch_cpu():
    got, want = _build_back_to_back("cpu")
    _assert_same(got, want)
    assert want[0]["input_ids"].numel() == 42 and want[1]["input_ids"].numel() == 23


@pytest.mark.gpu
def test_gpu_pinned_buffer_waits_for_the_previous_copy():
    """The stream sleeps ~0.1 s before the first batch's copy: without the event wait in
    BatchBuilder._buffer the second build overwrites the pinned buffer before the device has
    read it, and the first batch arrives holding the second one's bytes."""
    got, want = _build_back_to_back("cuda", delay=lambda: torch.cuda._sleep(SLEEP_CYCLES))
    _assert_same(got, want)


@pytest.mark.gpu
def test_gpu_async_engine_with_a_lagging_device(monkeypatch):
    """Every forward is queued behind a device sleep, so the host runs steps ahead: the async
    engine's tokens (decode inputs filled on the device from the previous step's sampled ids,
    through its own pinned index buffer) equal the synchronous engine's."""
    from ragged.engine import Engine
    forward = Engine._forward

    def lagging(self, sched):
        torch.cuda._sleep(SLEEP_CYCLES // 20)
        return forward(self, sched)
    kw = dict(device="cuda", dtype=torch.float32, num_blocks=64, max_num_batched_tokens=32,
              max_num_seqs=8, cuda_graphs=False)
    prompts = [[3 + (7 * i + j) % 250 for j in range(n)] for i, n in enumerate((1, 17, 30, 9, 5))]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in LLM("tiny", async_scheduling=False, **kw)
            .generate(prompts, params, use_tqdm=False)]
    monkeypatch.setattr(Engine, "_forward", lagging)
    for graphs in (False, True):
        llm = LLM("tiny", async_scheduling=True, **dict(kw, cuda_graphs=graphs))
        got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == want, graphs


@pytest.mark.gpu
def test_gpu_engine_runs_on_one_stream(tmp_path):
    """Async scheduling frees blocks and reuses buffers on the promise that every launch of a
    later step is ordered after this one's: all of a generate's kernels and copies go to one
    stream (read from the profiler's trace), and a step on another stream is refused."""
    import json
    from torch.profiler import ProfilerActivity, profile
    llm = LLM("tiny", device="cuda", dtype=torch.float32, num_blocks=64,
              max_num_batched_tokens=32, max_num_seqs=8)
    assert llm.engine.async_scheduling and llm.engine.graphs is not None
    prompts = [[5] * 9, [7] * 20, [9]]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)                     # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    streams = {e["args"]["stream"] for e in events
               if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "stream" in e.get("args", {})}
    n_kernels = sum(1 for e in events if e.get("cat") == "kernel")
    print("streams", streams, "kernels", n_kernels)
    assert n_kernels > 0 and len(streams) == 1, streams
    eng = llm.engine
    eng.add_request("other-stream", [5, 6, 7], params)
    with torch.cuda.stream(torch.cuda.Stream()):
        with pytest.raises(RuntimeError, match="stream"):
            eng.step()
