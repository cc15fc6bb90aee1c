"""Kernel microbenchmarks: paged attention per backend vs PyTorch, and the selective-batching ops.

    python -m bench.kernels [--device cuda|cpu] [--out DIR] [--quick] [--backends triton,cuda,torch]

Attention (Llama-3-8B heads 32/8/128, block 16, bf16 on GPU) through kernels.paged_attention
for every available backend, next to PyTorch on the same data: SDPA (flash backend on GPU)
over each sequence's contiguous K/V (sequences of one shape batched into one call), and
flex_attention (compiled; prefill only). Sweeps: decode batch x context, causal prefill, and a
mixed batch (one 2048-token chunk + 256 decodes) against its two parts launched separately, and
speculative verification (32 queries of 2/4/8 tokens + 32 decodes, ctx 2048) in one launch.
The ops (write_kv, rms_norm, rotary, silu_and_mul) run at 8192 tokens; the "torch" backend is
the eager PyTorch baseline. Units: median us, GB/s of bytes that must move (each input read
once, each output written once; attention: KV + q + out), % of the measured copy bandwidth,
TFLOP/s with causal FLOPs = 4 * D * Hq * sum over query rows of visible keys.
Every implementation is first checked against the first one of its shape (a PyTorch
implementation: the reference where it is affordable, else SDPA): one that disagrees gets no
timing, so a fast wrong kernel cannot report numbers. The check catches wrong kernels, not
rounding (tests/ grade precision): tolerance max(4 ulp, 2e-3) x max(1, |output|).
"""
from __future__ import annotations

import argparse
import re

import torch
import torch.nn.functional as F

import kernels
from bench.common import copy_bandwidth, run_info, sync, time_median, write_json
from kernels import reference

EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}
FULL = dict(hq=32, hkv=8, d=128, bs=16, decode_b=(1, 8, 32, 128, 256),
            decode_ctx=(512, 2048, 8192, 32768), max_kv_tokens=1 << 21,
            prefill=(1024, 2048, 4096, 8192, 16384), mixed=(2048, 256, 2048),
            spec=(64, 2048, (2, 4, 8)),
            op_tokens=8192, hidden=4096, inter=14336, warmup=5, iters=20)
QUICK = dict(hq=4, hkv=2, d=32, bs=16, decode_b=(1, 3), decode_ctx=(40,),
             max_kv_tokens=1 << 21, prefill=(24,), mixed=(16, 2, 40), spec=(2, 40, (3,)),
             op_tokens=8, hidden=96, inter=80, warmup=0, iters=1)     # seconds, interpreted
TORCH_REF_MAX = 1 << 24        # the reference loops in Python: only where q*k*Hq is this small


# --------------------------------------------------------------------------- inputs
def attention_case(q_lens, kv_lens, hq, hkv, d, bs, dtype, device):
    """A paged batch plus the same K/V contiguous per sequence (for the PyTorch baselines).

    k_lin holds each sequence's keys padded to whole blocks, sequence after sequence; the
    cache holds the same blocks under a random permutation, so no extra K/V copy is needed."""
    nblk = [-(-k // bs) for k in kv_lens]
    total = sum(nblk)
    perm = torch.randperm(total, device=device)
    k_lin = torch.randn(total * bs, hkv, d, device=device, dtype=dtype)
    v_lin = torch.randn(total * bs, hkv, d, device=device, dtype=dtype)
    k_cache = torch.empty(total, bs, hkv, d, device=device, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    k_cache[perm] = k_lin.view(total, bs, hkv, d)
    v_cache[perm] = v_lin.view(total, bs, hkv, d)
    table = torch.zeros(len(q_lens), max(nblk), dtype=torch.int32, device=device)
    first = [0]
    for b, n in enumerate(nblk):
        table[b, :n] = perm[first[-1]:first[-1] + n].to(torch.int32)
        first.append(first[-1] + n)
    cu = torch.tensor([0] + q_lens, device=device).cumsum(0).to(torch.int32)
    return dict(q=torch.randn(sum(q_lens), hq, d, device=device, dtype=dtype), k_cache=k_cache,
                v_cache=v_cache, block_table=table, cu_seqlens_q=cu,
                seq_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
                q_lens=list(q_lens), kv_lens=list(kv_lens), first_block=first, k_lin=k_lin,
                v_lin=v_lin, bs=bs)


def fp8_case(c, chunk=1 << 18):
    """The case with an fp8 (e4m3) cache of the same K/V: codes and per-slot float32 scales
    written by the reference rule (kernels/reference.py quantize_fp8, in chunks of ``chunk``
    slots to bound the float32 temporaries), and k_lin/v_lin replaced by the dequantised
    values so the PyTorch baselines compute on what the fp8 cache holds."""
    bs, (total, _, hkv, d) = c["bs"], c["k_cache"].shape
    perm = torch.empty(total, dtype=torch.int64, device=c["k_cache"].device)
    for b, n in enumerate(c["first_block"][1:]):
        lo = c["first_block"][b]
        perm[lo:n] = c["block_table"][b, :n - lo].long()
    out = dict(c)
    for name, lin in (("k", c["k_lin"]), ("v", c["v_lin"])):
        codes = torch.empty(lin.shape, dtype=torch.float8_e4m3fn, device=lin.device)
        scale = torch.empty(lin.shape[:2], dtype=torch.float32, device=lin.device)
        deq = torch.empty_like(lin)
        for i in range(0, lin.shape[0], chunk):
            codes[i:i + chunk], scale[i:i + chunk] = reference.quantize_fp8(lin[i:i + chunk])
            deq[i:i + chunk] = reference.dequantize_fp8(codes[i:i + chunk], scale[i:i + chunk],
                                                        lin.dtype)
        cache = torch.empty(total, bs, hkv, d, dtype=torch.float8_e4m3fn, device=lin.device)
        scales = torch.empty(total, bs, hkv, dtype=torch.float32, device=lin.device)
        cache[perm] = codes.view(total, bs, hkv, d)
        scales[perm] = scale.view(total, bs, hkv)
        out.update({f"{name}_cache": cache, f"{name}_scale": scales, f"{name}_lin": deq})
    return out


def sub_case(c, lo, hi):
    """Sequences lo..hi-1 of a case (views, no copies): a part launched on its own."""
    q0, q1 = sum(c["q_lens"][:lo]), sum(c["q_lens"][:hi])
    cu = c["cu_seqlens_q"][lo:hi + 1] - c["cu_seqlens_q"][lo]
    return dict(c, q=c["q"][q0:q1], block_table=c["block_table"][lo:hi], cu_seqlens_q=cu,
                seq_lens=c["seq_lens"][lo:hi], q_lens=c["q_lens"][lo:hi],
                kv_lens=c["kv_lens"][lo:hi], first_block=c["first_block"][lo:hi + 1])


def attention_cost(c, elem):
    """(bytes that must move, FLOPs): bottom-right causal rows see ctx + i + 1 keys."""
    hq, d = c["q"].shape[1:]
    hkv = c["k_cache"].shape[2]
    visible = sum(ql * (kl - ql) + ql * (ql + 1) // 2 for ql, kl in zip(c["q_lens"], c["kv_lens"]))
    nbytes = (2 * sum(c["kv_lens"]) * hkv * d + 2 * c["q"].numel()) * elem
    if c["k_cache"].dtype == torch.float8_e4m3fn:     # 1-byte codes + a float32 scale per slot
        nbytes = 2 * sum(c["kv_lens"]) * hkv * (d + 4) + 2 * c["q"].numel() * elem
    return nbytes, 4 * d * hq * visible


# --------------------------------------------------------------------------- attention impls
def paged_fn(c, backend, out=None):
    args = [c[k] for k in ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens")]
    mq, mk = max(c["q_lens"]), max(c["kv_lens"])
    fp8 = {k: c[k] for k in ("k_scale", "v_scale") if k in c}     # fp8_case: the scales
    return lambda: kernels.paged_attention(*args, max_seqlen_q=mq, max_seqlen_k=mk, out=out,
                                           backend=backend, **fp8)


def nodefer_fn(c):
    """The Triton prefill with P.V in tile order (kernels.triton_attention.DEFER_PV False):
    the deferred loop's A/B, timed in the same run (its variant compiles in the warm-up)."""
    from kernels import triton_attention as ta
    f = paged_fn(c, "triton")

    def call():
        ta.DEFER_PV = False
        try:
            return f()
        finally:
            ta.DEFER_PV = True
    return call


def split_fn(dec, pre, backend, out):
    """The mixed batch as two launches (decodes, then the chunk) writing one output."""
    n = dec["q"].shape[0]
    f1, f2 = paged_fn(dec, backend, out[:n]), paged_fn(pre, backend, out[n:])
    return lambda: (f1(), f2(), out)[-1]


def _groups(c):
    """Runs of consecutive sequences with the same (q_len, kv_len): one batched call each."""
    runs, lo = [], 0
    for b in range(1, len(c["q_lens"]) + 1):
        if b == len(c["q_lens"]) or (c["q_lens"][b], c["kv_lens"][b]) != (c["q_lens"][lo], c["kv_lens"][lo]):
            runs.append((lo, b))
            lo = b
    return runs


def _contiguous_qkv(c, lo, hi):
    ql, kl = c["q_lens"][lo], c["kv_lens"][lo]
    # causal: True for whole prompts; a short query over a longer context (a speculative
    # verification) gets the bottom-right causal mask explicitly (SDPA's is top-left).
    causal = (torch.ones(ql, kl, dtype=torch.bool, device=c["q"].device).tril(kl - ql)
              if 1 < ql < kl else ql > 1)
    n, bs = hi - lo, c["bs"]
    rows = slice(c["first_block"][lo] * bs, c["first_block"][hi] * bs)
    span = (c["first_block"][lo + 1] - c["first_block"][lo]) * bs
    k = c["k_lin"][rows].view(n, span, *c["k_lin"].shape[1:])[:, :kl].transpose(1, 2)
    v = c["v_lin"][rows].view(n, span, *c["v_lin"].shape[1:])[:, :kl].transpose(1, 2)
    q0 = sum(c["q_lens"][:lo])
    q = c["q"][q0:q0 + n * ql].view(n, ql, *c["q"].shape[1:]).transpose(1, 2)
    return q, k, v, causal


def lazy(make):
    """fn that builds the real callable on first use, inside measure()'s error handling."""
    box = []
    return lambda: (box or box.append(make()) or box)[0]()


def sdpa_fn(c):
    """SDPA over contiguous K/V; on GPU the flash backend alone (falls back, loudly, to
    PyTorch's own choice if flash refuses the shape)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    parts = [_contiguous_qkv(c, lo, hi) for lo, hi in _groups(c)]
    backends = [SDPBackend.FLASH_ATTENTION] if c["q"].is_cuda else None

    def call():
        outs = []
        for q, k, v, causal in parts:
            mask = causal if isinstance(causal, torch.Tensor) else None
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=causal is True, enable_gqa=True)
            outs.append(o.transpose(1, 2).reshape(-1, o.shape[1], o.shape[3]))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def run():
        nonlocal backends
        if backends is None:
            return call()
        try:
            with sdpa_kernel(backends):
                return call()
        except RuntimeError as exc:
            print(f"  (SDPA flash refused: {str(exc).splitlines()[0][:120]}; using default)")
            backends = None
            return call()
    return run


_FLEX = {}


def flex_fn(c):
    """Compiled flex_attention with a causal block mask over one whole prompt."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if len(c["q_lens"]) != 1 or c["q_lens"][0] != c["kv_lens"][0]:
        raise NotImplementedError("flex baseline: one whole prompt only")
    if "fn" not in _FLEX:
        torch._dynamo.config.recompile_limit = 64      # one compile per prompt length
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    q, k, v, _ = _contiguous_qkv(c, 0, 1)
    n = q.shape[2]
    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, n, n, device=q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return lambda: _FLEX["fn"](q, k, v, block_mask=mask, enable_gqa=True)[0].transpose(0, 1)


def attention_impls(c, backends, device, flex):
    ql, kl, hq = c["q_lens"], c["kv_lens"], c["q"].shape[1]
    small = max(kl) * sum(ql) * hq <= TORCH_REF_MAX and len(ql) <= 16
    impls = [("torch", paged_fn(c, "torch"))] if "torch" in backends and small else []
    impls.append(("torch-sdpa", lazy(lambda: sdpa_fn(c))))
    impls += [(b, paged_fn(c, b)) for b in backends if b != "torch"]
    if flex and torch.device(device).type == "cuda" and len(ql) == 1:
        impls.append(("torch-flex", lazy(lambda: flex_fn(c))))
    return impls


# --------------------------------------------------------------------------- ops
def op_cases(p, backends, dtype, device):
    """(name, shape, bytes, {impl: fn}) for the selective-batching ops (and RoPE + KV write
    fused vs separate)."""
    T, hq, hkv, d, hidden, inter = p["op_tokens"], p["hq"], p["hkv"], p["d"], p["hidden"], p["inter"]
    e = torch.tensor([], dtype=dtype).element_size()
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    qkv = rnd(T, (hq + 2 * hkv) * d)                    # fused projection output: strided views
    q = qkv[:, :hq * d].view(T, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(T, hkv, d)
    nblocks = -(-2 * T // p["bs"])
    slots = torch.randperm(nblocks * p["bs"], device=device)[:T]
    caches = {b: (torch.zeros(nblocks, p["bs"], hkv, d, device=device, dtype=dtype),
                  torch.zeros(nblocks, p["bs"], hkv, d, device=device, dtype=dtype)) for b in backends}
    x, res, w = rnd(T, hidden), rnd(T, hidden), rnd(hidden)
    cos_sin = reference.rope_cos_sin_cache(d, 131072, 500000.0).to(device)
    pos = torch.randint(0, 131072, (T,), device=device)
    gate_up = rnd(T, 2 * inter)

    def wkv(b):
        kc, vc = caches[b]
        return lambda: (kernels.write_kv(k, v, kc, vc, slots, backend=b), kc, vc)[1:]

    f8 = dict(dtype=torch.float8_e4m3fn, device=device)
    caches8 = {b: (torch.zeros(nblocks, p["bs"], hkv, d, **f8),
                   torch.zeros(nblocks, p["bs"], hkv, d, **f8),
                   torch.zeros(nblocks, p["bs"], hkv, device=device),
                   torch.zeros(nblocks, p["bs"], hkv, device=device)) for b in backends}

    def wkv8(b):      # compared as dequantised values (codes x scales)
        kc, vc, ks, vs = caches8[b]
        return lambda: (kernels.write_kv(k, v, kc, vc, slots, backend=b, k_scale=ks, v_scale=vs),
                        reference.dequantize_fp8(kc, ks), reference.dequantize_fp8(vc, vs))[1:]

    # RoPE + KV write: fused (one launch on Triton) vs the two ops (the "<b>-separate" rows),
    # each implementation with its own caches so their results can be compared.
    rkv_caches = {}

    def rkv(b, fused):
        kc, vc = rkv_caches.setdefault((b, fused), tuple(torch.zeros_like(c) for c in caches[b]))
        if fused:
            return lambda: (kernels.rotary_write_kv(pos, q, k, v, cos_sin, kc, vc, slots, True,
                                                    backend=b), kc, vc)

        def sep():
            qr, kr = kernels.rotary_embedding(pos, q, k, cos_sin, True, backend=b)
            kernels.write_kv(kr, v, kc, vc, slots, backend=b)
            return qr, kc, vc
        return sep
    rkv_impls = {b: rkv(b, True) for b in backends}
    rkv_impls.update({f"{b}-separate": rkv(b, False) for b in backends if b == "triton"})
    return [
        ("rotary+write_kv", dict(T=T, hq=hq, hkv=hkv, d=d),
         (T * (hq + 2 * hkv) * d + T * hq * d + 2 * T * hkv * d) * e + T * (4 * d + 16), rkv_impls),
        ("write_kv", dict(T=T, hkv=hkv, d=d), 4 * T * hkv * d * e + 8 * T, {b: wkv(b) for b in backends}),
        ("write_kv fp8", dict(T=T, hkv=hkv, d=d), 2 * T * hkv * d * e + 2 * T * hkv * (d + 4) + 8 * T,
         {b: wkv8(b) for b in backends}),
        ("rms_norm+residual", dict(T=T, hidden=hidden), (4 * T + 1) * hidden * e,
         {b: (lambda b=b: kernels.rms_norm(x, w, 1e-5, res, backend=b)) for b in backends}),
        ("rotary", dict(T=T, hq=hq, hkv=hkv, d=d), 2 * T * (hq + hkv) * d * e + T * (4 * d + 8),
         {b: (lambda b=b: kernels.rotary_embedding(pos, q, k, cos_sin, True, backend=b)) for b in backends}),
        ("silu_and_mul", dict(T=T, inter=inter), 3 * T * inter * e,
         {b: (lambda b=b: kernels.silu_and_mul(gate_up, backend=b)) for b in backends}),
    ]


# --------------------------------------------------------------------------- measure
def _flat(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if t is not None]


def measure(rows, kind, name, shape, impls, nbytes, flops, ctx):
    """Check every impl against the first that runs, then time the ones that agree."""
    anchor = None
    for impl, fn in impls:
        row = dict(kind=kind, name=name, impl=impl, shape=shape, dtype=str(ctx["dtype"]),
                   median_us=None, gbs=None, pct_copy_bw=None, tflops=None, max_err=None)
        rows.append(row)
        try:
            out = [t.float() for t in _flat(fn())]
            sync(ctx["device"])
        except Exception as exc:  # noqa: BLE001 - a broken backend must not stop the sweep
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"  {name:28s} {impl:11s} ERROR {row['error']}")
            continue
        if anchor is None:
            anchor, row["max_err"] = (impl, out), 0.0
        elif [a.shape for a in out] != [b.shape for b in anchor[1]]:
            row["error"] = f"mismatch vs {anchor[0]}: shapes {[tuple(a.shape) for a in out]}"
            print(f"  {name:28s} {impl:11s} NOT TIMED: {row['error']}")
            continue
        else:
            row["max_err"] = max([(a - b).abs().max().item() if a.numel() else 0.0
                                  for a, b in zip(out, anchor[1])] + [0.0])
            mag = max(max((b.abs().max().item() if b.numel() else 0.0) for b in anchor[1]), 1.0)
            tol = max(4 * EPS[ctx["dtype"]], 2e-3) * mag
            if row["max_err"] > tol:
                row["error"] = f"mismatch vs {anchor[0]}: max err {row['max_err']:.3e} > {tol:.1e}"
                print(f"  {name:28s} {impl:11s} NOT TIMED: {row['error']}")
                continue
        del out
        t = time_median(fn, ctx["device"], warmup=ctx["warmup"], iters=ctx["iters"])
        row.update(median_us=t * 1e6, gbs=nbytes / t / 1e9, pct_copy_bw=100 * nbytes / t / ctx["bw"],
                   tflops=flops / t / 1e12 if flops else None)
        print(f"  {name:28s} {impl:11s} {row['median_us']:11.1f} {row['gbs']:9.1f} "
              f"{row['pct_copy_bw']:7.1f} {row['tflops'] or 0:8.2f} {row['max_err']:10.2e}")


def attention_sweeps(rows, p, backends, ctx, flex, fp8=True):
    dev, dt = ctx["device"], ctx["dtype"]
    e = torch.tensor([], dtype=dt).element_size()
    h = dict(hq=p["hq"], hkv=p["hkv"], d=p["d"], bs=p["bs"])

    def run(kind, name, c, impls=None):
        nbytes, flops = attention_cost(c, e)    # fp8 cases: codes + scales read
        shape = dict(B=len(c["q_lens"]), tokens=sum(c["q_lens"]), max_kv=max(c["kv_lens"]), **h)
        measure(rows, kind, name, shape, impls or attention_impls(c, backends, dev, flex),
                nbytes, flops, ctx)

    for B in p["decode_b"]:
        for L in p["decode_ctx"]:
            if B * L > p["max_kv_tokens"]:
                print(f"  decode B={B} ctx={L}: skipped (KV above {p['max_kv_tokens']} tokens)")
                continue
            c = attention_case([1] * B, [L] * B, dtype=dt, device=dev, **h)
            run("decode", f"decode B={B} ctx={L}", c)
            if fp8:     # the same K/V in an e4m3 cache with per-slot scales, beside it
                c = fp8_case(c)
                run("decode-fp8", f"decode B={B} ctx={L} fp8", c)
            del c
            _free(dev)
    for n in p["prefill"]:
        c = attention_case([n], [n], dtype=dt, device=dev, **h)
        impls = attention_impls(c, backends, dev, flex)
        if "triton" in backends and torch.device(dev).type == "cuda":
            impls.append(("triton-nodefer", nodefer_fn(c)))
        run("prefill", f"prefill {n}", c, impls)
        del c
        _free(dev)
    chunk, nd, L = p["mixed"]
    c = attention_case([1] * nd + [chunk], [L] * nd + [chunk], dtype=dt, device=dev, **h)
    dec, pre = sub_case(c, 0, nd), sub_case(c, nd, nd + 1)
    run("mixed", f"mixed {chunk}+{nd}x{L}", c)
    split = [(b, split_fn(dec, pre, b, torch.empty_like(c["q"]))) for b in backends if b != "torch"]
    if split:
        run("mixed", "mixed as 2 launches", c, [("torch-sdpa", lazy(lambda: sdpa_fn(c)))] + split)
    run("mixed", "mixed: decode part", dec)
    run("mixed", "mixed: prefill part", pre)
    # Speculative verification (ragged/spec_decode): half the batch verifies 1 + k = q query
    # tokens, the other half decodes, in one launch; q=1 is the same batch all decoding.
    nb, L, qs = p["spec"]
    nv = nb // 2
    for q in (1, *qs):
        c = attention_case([q] * nv + [1] * (nb - nv), [L] * nb, dtype=dt, device=dev, **h)
        run("spec_verify", f"verify q={q} x{nv} + {nb - nv} decodes ctx={L}", c)
        del c
        _free(dev)


def _free(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def slug(device) -> str:
    from bench.common import device_name
    name = "cpu" if torch.device(device).type == "cpu" else device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke runs)")
    ap.add_argument("--backends", default="triton,cuda,torch")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--no-flex", action="store_true", help="skip the flex_attention baseline")
    ap.add_argument("--skip", default="", help="comma list of sections: attention,ops,fp8 "
                    "(fp8: the e4m3-cache decode rows)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    avail = kernels.available_backends(device)
    backends = [b for b in avail if b in a.backends.split(",")]
    p = QUICK if a.quick else FULL
    torch.manual_seed(0)
    bw = copy_bandwidth(device)
    ctx = dict(device=device, dtype=dtype, bw=bw, warmup=p["warmup"], iters=p["iters"])
    print(f"device {device} ({run_info(device)['device']}), {dtype}, backends {backends} "
          f"(available {avail}), copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"  {'case':28s} {'impl':11s} {'median us':>11s} {'GB/s':>9s} {'%copy':>7s} "
          f"{'TFLOP/s':>8s} {'max err':>10s}")
    rows = []
    if "attention" not in a.skip:
        attention_sweeps(rows, p, backends, ctx, flex=not a.no_flex, fp8="fp8" not in a.skip)
    if "ops" not in a.skip:
        for name, shape, nbytes, fns in op_cases(p, ["torch"] + [b for b in backends if b != "torch"],
                                                 dtype, device):
            measure(rows, "op", name, shape, list(fns.items()), nbytes, 0, ctx)
    payload = dict(run_info=run_info(device), dtype=str(dtype), backends=backends,
                   copy_bandwidth_gbs=bw / 1e9, params={k: v for k, v in p.items()}, results=rows)
    path = write_json(f"kernels-{slug(device)}", payload, a.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
