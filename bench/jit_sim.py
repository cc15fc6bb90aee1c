"""How many Triton JIT compiles a run of the e2e workload triggers, and how many of them its
warm-up leaves to the timed run (bench/kernel_report.py's "jit" section, invariant jit_warm).

The scheduler's steps are simulated on CPU with ragged's own Scheduler, BlockManager and
BatchBuilder; each eager step's Triton launches are recorded (no kernel runs) and specialised
the way Triton's launcher would, so two launches that would compile twice count twice.
"""
from __future__ import annotations

import collections

from bench.kernel_report import DEVICES, key_diff, record_triton, spec_key, triton_job


JIT_NUM_BLOCKS = 20000        # ~H100-80GB after Llama-3-8B's 16 GB of weights at 2 MB a block


def _step_keys(batch, spec: dict, T: int, dev: dict) -> set[str]:
    """Triton specialisations one model forward over `batch` launches (model/layers.py's
    ops, one layer: every layer has the same shapes)."""
    import torch
    hq, hkv, d, H, I = spec["hq"], spec["hkv"], spec["d"], spec["hidden"], spec["inter"]
    dt = torch.bfloat16
    x = torch.empty(T, H, dtype=dt)
    w = torch.empty(H, dtype=dt)
    qkv = torch.empty(T, (hq + 2 * hkv) * d, dtype=dt)
    q, k, v = (qkv[:, :hq * d].view(T, hq, d), qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d),
               qkv[:, (hq + hkv) * d:].view(T, hkv, d))
    kc = torch.empty(4, spec["bs"], hkv, d, dtype=dt)
    cs = torch.empty(spec["max_len"], d, dtype=torch.float32)
    calls = [("rms_norm", lambda f: f(x, w, 1e-5, None)), ("rms_norm", lambda f: f(x, w, 1e-5, x)),
             ("rotary_write_kv", lambda f: f(batch.positions, q, k, v, cs, kc, kc,
                                             batch.slot_mapping, True)),
             ("paged_attention", lambda f: f(
                 torch.empty(T, hq, d, dtype=dt), kc, kc, batch.block_table, batch.cu_seqlens_q,
                 batch.seq_lens, scale=d ** -0.5, max_seqlen_q=batch.max_seqlen_q,
                 max_seqlen_k=batch.max_seqlen_k)),
             ("silu_and_mul", lambda f: f(torch.empty(T, 2 * I, dtype=dt)))]
    keys = set()
    for op, call in calls:
        for c in record_triton(op, call, dev):
            keys.add(spec_key(triton_job(*c)))
    return keys


def jit_compiles(quick: bool = False) -> dict:
    """Distinct Triton specialisations of the e2e anyscale run (bench/e2e.py's GPU scale:
    Llama-3-8B bf16, 256 requests of 512 prompt tokens, outputs capped at 512; quick: 32
    requests, cap 128), and how many of them its warm-up (the engine's start-up
    model.warmup_kernels, CUDA-graph capture of every decode bucket, bench.e2e.warmup_requests)
    leaves to the timed run. Simulated: ragged's
    Scheduler + BlockManager + BatchBuilder run the steps on CPU (tokens are placeholders;
    prefix caching on, no preemption at JIT_NUM_BLOCKS), every eager step's launches are
    recorded (decode-only steps replay graphs)."""
    from bench import e2e, workloads
    from ragged.batch import BatchBuilder
    from ragged.block_manager import BlockManager
    from ragged.config import EngineConfig
    from ragged.graphs import graph_buckets
    from ragged.sampling import SamplingParams
    from ragged.scheduler import Scheduler
    from ragged.sequence import Sequence
    s = dict(e2e.SCALES["gpu"])
    if quick:
        s.update(num_requests=32, cap=128)
    mcfg = __import__("model.presets", fromlist=["PRESETS"]).PRESETS[s["model"]]
    spec = dict(hq=mcfg.num_attention_heads, hkv=mcfg.num_key_value_heads, d=mcfg.head_dim,
                hidden=mcfg.hidden_size, inter=mcfg.intermediate_size, bs=16,
                max_len=mcfg.max_position_embeddings)
    dev = DEVICES["H100"]
    cfg = EngineConfig(block_size=16).resolve("cuda", mcfg.max_position_embeddings,
                                              JIT_NUM_BLOCKS)
    kw = e2e.workload_kwargs("anyscale", s)
    reqs = workloads.make("anyscale", s["num_requests"], vocab_size=mcfg.vocab_size, seed=0, **kw)
    warm = e2e.warmup_requests("anyscale", mcfg.vocab_size, kw, 0)
    bm = BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching,
                      max_blocks_per_seq=-(-cfg.max_model_len // cfg.block_size))
    sched, builder = Scheduler(cfg, bm), BatchBuilder(cfg.block_size, "cpu")
    buckets = graph_buckets(cfg.max_num_seqs)
    capture = set()
    for P in buckets:                 # DecodeGraphs.capture: padded batches, max_seqlen_k = max
        seq = Sequence("capture", [0], SamplingParams(max_tokens=1), 0, 0.0, -1)
        seq.table_row = 0
        b = builder.build([(seq, 1)], bm.table, pad_to=P)
        b.max_seqlen_k = cfg.max_model_len
        capture |= _step_keys(b, spec, P, dev)

    def run(requests):
        keys, steps, eager, idx = collections.Counter(), 0, 0, 0
        for r in requests:
            sched.add(Sequence(r.id, list(r.prompt_token_ids),
                               SamplingParams(max_tokens=r.max_tokens, ignore_eos=True),
                               0, 0.0, idx))
            idx += 1
        while sched.has_unfinished():
            out = sched.schedule()
            steps += 1
            B = len(out.scheduled)
            if out.num_prefill_tokens or B > buckets[-1]:
                eager += 1
                b = builder.build(out.scheduled, bm.table)
                keys.update(_step_keys(b, spec, out.num_tokens, dev))
            done = sched.update(out)
            for seq in done:
                seq.token_ids.append(0)
                if (seq.num_output_tokens >= seq.params.max_tokens
                        or seq.num_tokens >= cfg.max_model_len):
                    sched.remove(seq)
        return keys, steps, eager
    # The engine's start-up warm-up (model.warmup_kernels -> kernels.triton_attention.warmup)
    import torch
    from kernels import triton_attention as ta
    engine_warm = {spec_key(triton_job(*c)) for c in record_triton(
        "paged_attention", lambda f: ta.warmup(spec["hq"], spec["hkv"], spec["d"], torch.bfloat16,
                                               spec["bs"], "cpu"), dev)}
    wkeys, wsteps, _ = run(warm)
    tkeys, tsteps, teager = run(reqs)
    covered = capture | set(wkeys) | engine_warm
    missing = sorted(set(tkeys) - covered)
    kernel_of = lambda k: k.split(" | ")[0].split(".")[-1]  # noqa: E731
    return dict(workload=f"anyscale {s['num_requests']} requests, prompt {s['prompt_len']}, "
                         f"cap {s['cap']}, {s['model']} bf16, H100 plan",
                timed_steps=tsteps, eager_steps=teager, warmup_steps=wsteps,
                graph_buckets=len(buckets), distinct_timed=len(tkeys),
                distinct_warmup=len(covered), compiles_in_timed_run=len(missing),
                missing_by_kernel=dict(collections.Counter(kernel_of(k) for k in missing)),
                missing=[key_diff(k, covered) for k in missing][:20])


