"""One decode step of the whole model against its byte bound, eager vs CUDA-graph replay.

    python -m bench.decode_step [--model llama3-8b] [--batch 1,8,32,64,128,256] [--context 1024]
                                [--backends triton,cuda] [--device cuda] [--out DIR]

A decode step must read every weight once (lm_head included; the embedding only for the B
rows) and every sequence's K/V: bytes = weights + B * context * layers * 2 * Hkv * D * elem.
Its bound is bytes / (the device's copy bandwidth, measured in the same run). Reported per
(backend, batch): median ms of the model forward (eager, and replayed as the CUDA graph the
engine would use), GB/s, % of copy bandwidth, and time / bound (the model issue's target:
<= 1.2 at batch 256). Random weights of the preset's shapes (speed does not depend on them).
"""
from __future__ import annotations

import argparse

import torch

from bench.common import copy_bandwidth, run_info, time_median, write_json
from kernels import AttentionMetadata
from model import load_model
from ragged.graphs import DecodeGraphs


def decode_bytes(model, B: int, context: int) -> int:
    c, elem = model.config, model.dtype.itemsize
    weights = sum(p.numel() for p in model.parameters()) * elem
    if not c.tie_word_embeddings:        # the embedding table is gathered, not streamed
        weights -= c.vocab_size * c.hidden_size * elem - B * c.hidden_size * elem
    kv = B * context * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * elem
    return weights + kv


def fill(views, B: int, context: int, bs: int, device):
    """A decode batch: B sequences of `context` cached tokens + 1 new, contiguous blocks."""
    ids, pos, slots, logits_idx, cu, lens, table = views
    W = table.shape[1]
    ar = torch.arange(B, device=device)
    ids.copy_(ar % 1000)
    pos.fill_(context)
    table.copy_((ar[:, None] * W + torch.arange(W, device=device)[None]).to(torch.int32))
    slots.copy_(table[:, context // bs].long() * bs + context % bs)
    logits_idx.copy_(ar)
    cu.copy_(torch.arange(B + 1, device=device, dtype=torch.int32))
    lens.fill_(context + 1)


def run(model, backend: str, B: int, context: int, device, bw: float, use_graph: bool) -> dict:
    bs = 16
    W = -(-(context + 1) // bs)
    model.backend = backend
    kv = model.allocate_kv_cache(B * W, bs)
    g = DecodeGraphs(model, kv, max_num_seqs=B, width=W, max_model_len=context + 1,
                     capture=device.type == "cuda", buckets=[B])
    row = {"backend": backend, "batch": B, "context": context}
    nbytes = decode_bytes(model, B, context)
    with torch.inference_mode():
        g.capture()
        views = g.views(B)
        fill(views, B, context, bs, device)
        ids, pos, slots, logits_idx, cu, lens, table = views
        attn = AttentionMetadata(cu, lens, table, slots, 1, context + 1)
        t_eager = time_median(lambda: model.forward(ids, pos, attn, kv, logits_idx), device)
        row.update(eager_ms=1e3 * t_eager, eager_gbs=nbytes / t_eager / 1e9)
        if use_graph:
            t_graph = time_median(lambda: g.run(B), device)
            row.update(graph_ms=1e3 * t_graph, graph_gbs=nbytes / t_graph / 1e9)
    best = min(row.get("graph_ms", float("inf")), row["eager_ms"]) / 1e3
    bound = nbytes / bw
    row.update(bytes=nbytes, bound_ms=1e3 * bound, pct_copy_bw=100 * bound / best,
               time_over_bound=best / bound)
    kv = g = None              # free the cache and the graph before the next batch size
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="preset (default llama3-8b on GPU, tiny on CPU)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--batch", default=None, help="comma list (default 1,8,32,64,128,256)")
    ap.add_argument("--context", type=int, default=None, help="cached tokens per sequence (default 1024)")
    ap.add_argument("--backends", default=None, help="default triton,cuda on GPU, torch on CPU")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    name = a.model or ("llama3-8b" if gpu else "tiny")
    dtype = getattr(torch, a.dtype or ("bfloat16" if gpu else "float32"))
    batches = [int(x) for x in (a.batch or ("1,8,32,64,128,256" if gpu else "1,4")).split(",")]
    context = a.context or (1024 if gpu else 64)
    backends = (a.backends or ("triton,cuda" if gpu else "torch")).split(",")
    model = load_model(name, dtype=dtype, device=device, seed=0)
    bw = copy_bandwidth(device)
    rows = []
    for backend in backends:
        for B in batches:
            r = run(model, backend, B, context, device, bw, use_graph=gpu)
            rows.append(r)
            graph = f"graph {r['graph_ms']:8.3f} ms {r['graph_gbs']:7.1f} GB/s" if gpu else "graph -"
            print(f"{backend:6} B={B:4} ctx={context}: eager {r['eager_ms']:8.3f} ms "
                  f"{r['eager_gbs']:7.1f} GB/s | {graph} | bound {r['bound_ms']:.3f} ms "
                  f"({r['pct_copy_bw']:.0f}% of copy BW, {r['time_over_bound']:.2f}x bound)")
    payload = {"info": run_info(device), "model": name, "dtype": str(dtype),
               "copy_bandwidth_gbs": bw / 1e9, "rows": rows,
               "notes": "bytes = weights (embedding: B rows) + KV read; bound = bytes / copy BW "
                        "measured in this run; time_over_bound uses the faster of eager/graph"}
    path = write_json(f"decode_step_{name}_{device.type}", payload, a.out)
    print("wrote", path)
    return payload


if __name__ == "__main__":
    main()
