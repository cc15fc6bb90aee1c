"""Offline tuning of the Triton attention tiles: measure candidate configs on this GPU and store
the winners in kernels/tuned_attention.json (read by kernels.triton_attention._config; the
serving path never tunes, which would sync and break CUDA-graph capture).

    python -m bench.tune_triton [--head-dims 128] [--groups 2,4] [--dtypes bfloat16]
                                [--classes decode,prefill] [--write] [--out DIR]

Per key (class, head dim, group, dtype), the workload is the class's regime:
  decode   128 sequences x 2048 cached keys, q_len 1, Hkv 8: memory bound -> GB/s
  prefill  one fresh 4096-token causal prompt, Hq 32: compute bound -> TFLOP/s
Every candidate's output must match the heuristic config's (within 4 ulps of bf16/fp16 at the
output's scale: only the summation order differs), else it is rejected and reported. A
candidate replaces the heuristic only if it is >= 3% faster (medians of 20 after warm-up;
below that it is noise). --write merges the winners into the table under this device's name.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

import kernels.triton_attention as ta
from bench.common import run_info, time_median, write_json
from bench.kernels import attention_case, attention_cost
from kernels.triton_attention import _Config

MIN_GAIN = 1.03


def workload(cls, D, G, dtype, device, quick):
    """(call(out), out, bytes, flops) for one key's regime (bench.kernels' paged batch and
    roofline cost)."""
    if cls == "decode":
        Hkv, B, ctx = (2, 3, 40) if quick else (8, 128, 2048)
        q_lens, kv_lens = [1] * B, [ctx + 1] * B
    else:
        Hkv, L = (2, 40) if quick else (32 // G, 4096)
        q_lens, kv_lens = [L], [L]
    torch.manual_seed(0)
    c = attention_case(q_lens, kv_lens, Hkv * G, Hkv, D, 16, dtype, device)
    args = [c[k] for k in ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens")]

    def call(out):
        ta.paged_attention(*args, scale=D ** -0.5, max_seqlen_q=max(q_lens),
                           max_seqlen_k=max(kv_lens), out=out)
    nbytes, flops = attention_cost(c, c["q"].element_size())
    return call, torch.empty_like(c["q"]), nbytes, flops


def candidates(cls, D, G, quick, base: _Config):
    # Stages 4-6: with block ids prefetched in registers the K/V copies pipeline, and
    # num_stages - 1 copy groups stay in flight (TTGIR async_wait num = 2 at 3 stages), so
    # deeper pipelines can pay off where shared memory allows; 16x32 decode tiles hold 3+
    # CTAs per SM in registers and shared memory (bench/NOTES.md, "Triton attention, issue 12").
    if cls == "decode":         # the row count follows the group (base's), the rest is tuned
        grid = itertools.product([base.block_m], [32, 64] if quick else [32, 64, 128],
                                 [4] if quick else [2, 4, 8],
                                 [2] if quick else [2, 3, 4, 5, 6])
    else:
        tiles = [(64, 64), (128, 64)] if quick else [(64, 64), (128, 64), (128, 128), (64, 128), (128, 32)]
        grid = ((m, n, w, s) for (m, n) in tiles for w in ([4] if quick else [4, 8])
                for s in ([2] if quick else [2, 3, 4, 5, 6]))
    out = []
    for m, n, w, s in grid:
        if D > 128 and m * n > 64 * 64:
            continue                                 # D=256 large tiles exceed registers
        if m >= max(16, G):
            out.append(_Config(m, n, w, s))
    return out


def tune_key(cls, D, G, dtype, device, quick, iters):
    call, out, nbytes, flops = workload(cls, D, G, dtype, device, quick)
    orig = ta._config

    def forced(cfg):
        def f(head_dim, dt, group, max_seqlen_q, arch=90, device_name="", kv_fp8=False):
            mine = max_seqlen_q == 1 if cls == "decode" else max_seqlen_q > ta._DECODE_MAX_Q
            return cfg if mine else orig(head_dim, dt, group, max_seqlen_q, arch, "", kv_fp8)
        return f

    def timed():
        return time_median(lambda: call(out), device, warmup=3, iters=iters)

    # The baseline is the heuristic (device_name "": no stored entry), not the current table.
    base_cfg = orig(D, dtype, G, 1 if cls == "decode" else 4096, ta._arch(device), "")
    rows = []
    try:
        ta._config = forced(base_cfg)
        ref_out = torch.empty_like(out)
        call(ref_out)
        base_t = timed()
        tol = 4 * torch.finfo(dtype).eps * ref_out.float().abs().max().item()
        for cfg in candidates(cls, D, G, quick, base_cfg):
            ta._config = forced(cfg)
            row = {"config": [cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages]}
            try:
                out.fill_(float("nan"))
                call(out)
                err = (out.float() - ref_out.float()).abs().max().item()
                row["max_diff"] = err
                if not err <= tol:
                    row["rejected"] = f"output differs from the heuristic config's by {err:.3e} > {tol:.3e}"
                else:
                    row["us"] = 1e6 * timed()
            except Exception as e:  # noqa: BLE001 - out of resources etc.: report, go on
                row["rejected"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
    finally:
        ta._config = orig
    ok = [r for r in rows if "us" in r]
    best = min(ok, key=lambda r: r["us"]) if ok else None
    res = {"heuristic": [base_cfg.block_m, base_cfg.block_n, base_cfg.num_warps, base_cfg.num_stages],
           "heuristic_us": 1e6 * base_t, "candidates": rows, "bytes": nbytes, "flops": flops}
    if best and base_t * 1e6 / best["us"] >= MIN_GAIN:
        res["winner"] = {"config": best["config"], "us": best["us"],
                         "speedup": base_t * 1e6 / best["us"]}
    t = (best["us"] / 1e6) if best and "winner" in res else base_t
    res["gbs" if cls == "decode" else "tflops"] = (nbytes / t / 1e9 if cls == "decode"
                                                   else flops / t / 1e12)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--head-dims", default="128")
    ap.add_argument("--groups", default="2,4")
    ap.add_argument("--dtypes", default="bfloat16")
    ap.add_argument("--classes", default="decode,prefill")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 candidates (CPU smoke)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--write", action="store_true", help="merge the winners into the table")
    ap.add_argument("--table", default=str(ta.TUNED_FILE), help="table to merge into")
    ap.add_argument("--out", default=None, help="directory for the measurement JSON")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    name = ta.device_name(device)
    results = {}
    for cls, D, G, dt in itertools.product(a.classes.split(","), map(int, a.head_dims.split(",")),
                                           map(int, a.groups.split(",")), a.dtypes.split(",")):
        dtype = getattr(torch, dt)
        key = ta.tuned_key(cls, D, G, dtype)
        r = tune_key(cls, D, G, dtype, device, a.quick, 3 if a.quick else a.iters)
        results[key] = r
        w = r.get("winner")
        print(f"{key}: heuristic {r['heuristic']} {r['heuristic_us']:.1f} us -> "
              + (f"{w['config']} {w['us']:.1f} us ({w['speedup']:.2f}x)" if w else "kept")
              + f"; {sum('rejected' in c for c in r['candidates'])} rejected")
    payload = {"info": run_info(device), "device_name": name, "results": results}
    path = write_json(f"tune_triton_{device.type}", payload, a.out)
    print("wrote", path)
    if a.write:
        try:
            with open(a.table) as f:
                table = json.load(f)
        except FileNotFoundError:
            table = {"devices": {}}
        entries = table.setdefault("devices", {}).setdefault(name, {})
        for key, r in results.items():
            if "winner" in r:
                entries[key] = {"config": r["winner"]["config"], "us": round(r["winner"]["us"], 2),
                                "heuristic_us": round(r["heuristic_us"], 2),
                                "commit": payload["info"]["commit"]}
        with open(a.table, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
            f.write("\n")
        ta._tuned.cache_clear()
        ta._config.cache_clear()
        print("merged", sum("winner" in r for r in results.values()), "winners into", a.table)
    return payload


if __name__ == "__main__":
    main()
