"""Host overhead of the runtime per step: scheduling + ragged-batch building, at N running
sequences in steady decode (default 256), with a no-op model so only host work is timed.

    python -m bench.host_overhead [--num-seqs 256] [--steps 200] [--device cpu|cuda]

Reports the median ms per step of (a) schedule + batch build (target < 1 ms: at ~10-30 ms per
decode step of an 8B model, 1 ms is the budget a Python runtime can afford) and (b) the whole
Engine.step (also sampling a [N, vocab] row per sequence and the bookkeeping). JSON goes to
runs/host_overhead.json via bench.common (--out-dir bench/results/<device> to commit one).
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from bench.common import load_average, run_info, write_json
from ragged import Engine, EngineConfig, SamplingParams


class NoOpModel:
    """The model interface with no compute: logits are zeros (greedy picks token 0)."""

    def __init__(self, device, vocab_size: int):
        self.device = torch.device(device)
        self.config = SimpleNamespace(vocab_size=vocab_size, eos_token_id=[],
                                      max_position_embeddings=1 << 20)

    def allocate_kv_cache(self, num_blocks, block_size):
        return []

    def forward(self, input_ids, positions, attn, kv_caches, logits_indices):
        return torch.zeros(logits_indices.shape[0], self.config.vocab_size, device=self.device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=500, help="tokens per prompt (awkward on purpose)")
    ap.add_argument("--steps", type=int, default=200, help="timed decode steps")
    # Small on purpose: on CPU the no-op model's [N, vocab] logits and their argmax are host
    # memory traffic (32 MB at 32k vocab) that on a GPU stays on the device; it would evict
    # the runtime's data from the caches and charge that to (a).
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--graphs", action="store_true",
                    help="decode steps take the CUDA-graph path: the batch is padded to its bucket "
                         "with a full-width block table (on CPU the no-op forward runs eagerly)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="sets the block-table width the graph path copies (default: just enough)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads while timing (default 1: with 2 on a 2-core machine the "
                         "intra-op worker spins against the main thread, and 0.45 ms of "
                         "scheduling read as 0.65 ms)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args):
    n, device = args.num_seqs, torch.device(args.device)
    warm = 3
    budget = max(2 * n, 2048)
    # Sequences that finish their prompt early decode (taking up to n tokens of every step's
    # budget) while the others prefill; then each timed iteration decodes twice. Nobody may
    # finish before the end.
    prefill_steps = -(-n * args.prompt_len // (budget - n)) + 1
    max_tokens = prefill_steps + 2 * args.steps + warm + 2
    max_len = args.prompt_len + max_tokens + 1
    blocks_per_seq = -(-max_len // 16)
    model_len = max(max_len, args.max_model_len or 0)
    cfg = EngineConfig(block_size=16, num_blocks=max(n * blocks_per_seq + 1, -(-model_len // 16)),
                       max_num_seqs=n, max_num_batched_tokens=budget, max_model_len=model_len,
                       cuda_graphs=args.graphs,
                       # (a) below drives schedule/build/update by hand between engine steps,
                       # which needs no step left in flight
                       async_scheduling=False)
    eng = Engine(NoOpModel(device, args.vocab_size), cfg)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(n):   # distinct prompts: no prefix sharing, full block tables
        eng.add_request(str(i), [(i * 7 + j) % 1000 for j in range(args.prompt_len)], params)
    while any(s.is_prefill or s.status.value == "waiting" for s in eng.requests.values()):
        eng.step()       # prefill everyone
    for _ in range(warm):
        eng.step()
    sched_build, sched_build_cpu, build, steps = [], [], [], []
    sched, builder = eng.scheduler, eng.batch_builder
    for _ in range(args.steps):
        # (a) schedule + build alone, then finish the step by hand (no forward, no sampling).
        t0, c0 = time.perf_counter(), time.thread_time()
        out = sched.schedule()
        t1 = time.perf_counter()
        if args.graphs:
            builder.build(out.scheduled, eng.block_manager.table, out=eng.graphs.buffer,
                          pad_to=eng.graphs.bucket_for(len(out.scheduled)))
        else:
            builder.build(out.scheduled, eng.block_manager.table)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        sched_build.append(t2 - t0)
        build.append(t2 - t1)
        sched_build_cpu.append(time.thread_time() - c0)
        assert len(out.scheduled) == n and out.num_decode_tokens == n, (len(out.scheduled), out.num_decode_tokens, out.num_prefill_tokens, len(sched.running), len(sched.waiting), len(eng.step_log))
        for seq in sched.update(out):
            seq.token_ids.append(0)
        # (b) a whole engine step.
        t0 = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - t0)
    res = {
        "info": run_info(device),
        "num_seqs": n, "prompt_len": args.prompt_len, "steps": args.steps,
        "vocab_size": args.vocab_size, "graphs": args.graphs, "max_model_len": model_len,
        "torch_threads": torch.get_num_threads(), "load_average": load_average(),
        "block_table_width": int(eng.block_manager.table.shape[1]),
        "schedule_build_ms_median": 1e3 * statistics.median(sched_build),
        # CPU time of this thread: the same work without the wait for a core on a busy host.
        "schedule_build_cpu_ms_median": 1e3 * statistics.median(sched_build_cpu),
        "engine_step_ms_median": 1e3 * statistics.median(steps),
        "schedule_ms_median": 1e3 * statistics.median(s.schedule_time_s for s in eng.step_log[-args.steps:]),
        "build_ms_median": 1e3 * statistics.median(build),
        "target_ms": 1.0,
    }
    res["meets_target"] = res["schedule_build_ms_median"] < res["target_ms"]
    path = write_json("host_overhead_graphs" if args.graphs else "host_overhead", res, args.out_dir)
    print(f"{n} running seqs: schedule+build {res['schedule_build_ms_median']:.3f} ms/step "
          f"({res['schedule_build_cpu_ms_median']:.3f} ms CPU) "
          f"(schedule {res['schedule_ms_median']:.3f}, build {res['build_ms_median']:.3f}), engine step {res['engine_step_ms_median']:.3f} "
          f"ms/step (target < 1 ms for schedule+build) -> {path}")
    return res


if __name__ == "__main__":
    main()
