"""Compile every shipped Triton config for sm_90 / sm_80 without a GPU; report registers,
spills and shared memory; exit 1 on a spill or shared memory over the device limit.

    python -m bench.triton_compile_check [--arch 90,80] [--quick] [--jobs 2]

How: each kernel file's launcher (`_launch`) is called with small CPU tensors of the real
head counts / head dims / strides while the module's `@triton.jit` kernel is replaced by a
recorder, so the arguments, constexprs, num_warps and num_stages are exactly those a GPU
launch would use. The recorded arguments are specialised the way Triton's launcher does it
(ints == 1 become constants, ints and pointers divisible by 16 get tt.divisibility, except
`do_not_specialize` parameters), compiled with triton.compile(ASTSource(...), GPUTarget),
and the cubin's resource usage is read with cuobjdump (Triton's bundled one).
TRITON_INTERPRET must be unset (the script removes it before importing triton).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

# Max dynamic shared memory per block (opt-in): H100 227 KB, A100 163 KB.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (64, 80, 96, 128, 256)


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kw)` records instead of launching."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((self.fn, args, kw))
        return launch


def _record(module, names, call):
    calls = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, _Recorder(saved[n], calls))
        call()
    finally:
        for n, f in saved.items():
            setattr(module, n, f)
    return calls


def _job(label, fn, args, kw):
    """(label, kernel name, signature, constexprs, attrs, options) for one recorded launch."""
    params = fn.params
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    values = list(args) + [kw[p.name] for p in params[len(args):]]
    sig, const, attrs = {}, {}, {}
    for i, (p, v) in enumerate(zip(params, values)):
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", v
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        if ty == "constexpr":             # an int equal to 1
            sig[p.name], const[p.name] = "constexpr", spec
        else:
            sig[p.name] = ty
            if spec and "D" in spec:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return label, (fn.__module__, fn.__name__), sig, const, attrs, opts


def _compile(job, arch):
    label, (mod, name), sig, const, attrs, opts = job
    fn = getattr(importlib.import_module(mod), name)   # jobs cross processes by name
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                       options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                 "cuobjdump")
        res = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    ptx = k.asm["ptx"]
    return dict(label=label, arch=arch, regs=int(usage.get("REG", -1)),
                stack=int(usage.get("STACK", 0)), local=int(usage.get("LOCAL", 0)),
                smem=k.metadata.shared + int(usage.get("SHARED", 0)),
                warps=opts.get("num_warps"), stages=opts.get("num_stages"),
                wgmma="wgmma" in ptx, mma="mma.sync" in ptx)


# --------------------------------------------------------------------------- configs
def attention_jobs(quick: bool, arch: int = 90):
    from kernels import triton_attention as ta
    jobs = []
    saved_arch = ta._arch
    ta._arch = lambda device: arch          # the configs the launcher picks on that device
    try:
        _attention_jobs(ta, jobs, quick)
    finally:
        ta._arch = saved_arch
    seen, uniq = set(), []                 # merge kernels repeat across classes
    for j in jobs:
        if j[0] not in seen:
            seen.add(j[0])
            uniq.append(j)
    return uniq


def _attention_jobs(ta, jobs, quick):
    dims = (128, 256) if quick else HEAD_DIMS
    dtypes = ("bf16", "fp32") if quick else ("fp16", "bf16", "fp32")
    # (class, group, max_seqlen_q, T): decode-only launches (max q_len <= 16: one tile class)
    # q=1 at G=4 (16-row tile), spec decode q=16 at G=4 (64 rows, the largest decode tile),
    # G=1; mixed launches (max q_len > 16: prefill tile + decode tile in one kernel; fp32 has
    # one 16-row class).
    classes = [("decode-q1-G4", 4, 1, 3), ("decode-q16-G4", 4, 16, 20),
               ("decode-q1-G1", 1, 1, 3), ("mixed-G4", 4, 2048, 40)]
    if not quick:
        classes += [("mixed-G1", 1, 2048, 40), ("mixed-G8", 8, 2048, 40),
                    ("mixed-G16", 16, 2048, 40), ("decode-q1-G16", 16, 1, 3)]
    for d in dims:
        for dn in dtypes:
            dtype = DTYPES[dn]
            for cls, group, mq, T in classes:
                for splits in (1, 4, 64):
                    variants = [(None, None)]
                    if d in (128, 256) and dn == "bf16" and splits == 1:
                        variants += [(1024, None), (None, 30.0)]      # window, softcap
                    for window, softcap in variants:
                        hkv = 2
                        q = torch.empty(T, hkv * group, d, dtype=dtype)
                        kc = torch.empty(8, 16, hkv, d, dtype=dtype)
                        bt = torch.zeros(3, 5, dtype=torch.int32)
                        q_lens = [T - 2, 1, 1]
                        cu = torch.tensor([0, q_lens[0], q_lens[0] + 1, T], dtype=torch.int32)
                        sl = torch.tensor([4096, 2000, 300], dtype=torch.int32)
                        out = torch.empty_like(q)
                        calls = _record(ta, ("_paged_attn_kernel", "_merge_kernel"), lambda: ta._launch(
                            q, kc, kc, bt, cu, sl, out, d ** -0.5, mq, 4096, window, softcap,
                            splits))
                        tag = f"attn D={d} {dn} {cls} splits={splits}"
                        tag += f" window={window}" if window else ""
                        tag += f" softcap={softcap}" if softcap else ""
                        for fn, args, kw in calls:
                            name = "merge" if fn.__name__ == "_merge_kernel" else "attn"
                            if (name == "attn" and splits == 64) or (
                                    name == "merge" and (window or softcap)):
                                continue     # splits=64: only for the widest merge
                            label = tag if name == "attn" else f"merge D={d} {dn} splits={splits}"
                            jobs.append(_job(label, fn, args, dict(kw)))


def op_jobs(quick: bool):
    from kernels import triton_rms_norm as R, triton_rotary as RO, triton_silu_mul as S
    from kernels import triton_write_kv as W
    jobs = []
    for dn in (("bf16",) if quick else ("fp16", "bf16", "fp32")):
        dt = DTYPES[dn]
        for hkv, d in ((8, 128), (2, 80), (1, 256)):
            kv = torch.empty(3, 3 * hkv, d, dtype=dt)[:, :hkv]
            kc = torch.empty(4, 16, hkv, d, dtype=dt)
            for fn, a, kw in _record(W, ("_write_kv_kernel",), lambda: W._launch(
                    kv, kv, kc, kc, torch.zeros(3, dtype=torch.int64))):
                jobs.append(_job(f"write_kv Hkv={hkv} D={d} {dn}", fn, a, dict(kw)))
            k8 = torch.empty(4, 16, hkv, d, dtype=torch.float8_e4m3fn)
            for mode, sc in (("per_slot", torch.empty(4, 16, hkv)), ("per_tensor", 0.5)):
                for fn, a, kw in _record(W, ("_write_kv_fp8_kernel",), lambda: W._launch_fp8(
                        kv, kv, k8, k8, torch.zeros(3, dtype=torch.int64), sc, sc)):
                    jobs.append(_job(f"write_kv fp8 {mode} Hkv={hkv} D={d} {dn}", fn, a,
                                     dict(kw)))
        for n, res in ((4096, True), (4096, False), (896, True), (16384, True)):
            x = torch.empty(3, n, dtype=dt)
            for fn, a, kw in _record(R, ("_rms_norm_kernel",), lambda: R._launch(
                    x, torch.empty(n, dtype=dt), 1e-6, x if res else None)):
                jobs.append(_job(f"rms_norm N={n} residual={res} {dn}", fn, a, dict(kw)))
        for inter in (14336, 1000):
            x = torch.empty(3, 2 * inter, dtype=dt)
            for fn, a, kw in _record(S, ("_silu_and_mul_kernel",), lambda: S._launch(x)):
                jobs.append(_job(f"silu_and_mul I={inter} {dn}", fn, a, dict(kw)))
        for hq, hk, d, rot in ((32, 8, 128, 128), (32, 32, 80, 40), (5, 1, 256, 128)):
            qkv = torch.empty(3, hq + 2 * hk, d, dtype=dt)
            cache = torch.empty(64, rot, dtype=torch.float32)
            for neox in (True, False):
                for fn, a, kw in _record(RO, ("_rotary_kernel",), lambda: RO._launch(
                        torch.zeros(3, dtype=torch.int64), qkv[:, :hq], qkv[:, hq:hq + hk],
                        cache, neox)):
                    jobs.append(_job(f"rotary {hq}/{hk}x{d} rot={rot} neox={neox} {dn}",
                                     fn, a, dict(kw)))
                kc = torch.empty(4, 16, hk, d, dtype=dt)
                for fn, a, kw in _record(RO, ("_rotary_kv_kernel",), lambda: RO._launch_kv(
                        torch.zeros(3, dtype=torch.int64), qkv[:, :hq], qkv[:, hq:hq + hk],
                        qkv[:, hq + hk:], cache, kc, kc, torch.zeros(3, dtype=torch.int64), neox)):
                    jobs.append(_job(f"rotary_write_kv {hq}/{hk}x{d} rot={rot} neox={neox} {dn}",
                                     fn, a, dict(kw)))
                k8 = torch.empty(4, 16, hk, d, dtype=torch.float8_e4m3fn)
                s8 = torch.empty(4, 16, hk)
                for fn, a, kw in _record(RO, ("_rotary_kv_kernel",), lambda: RO._launch_kv(
                        torch.zeros(3, dtype=torch.int64), qkv[:, :hq], qkv[:, hq:hq + hk],
                        qkv[:, hq + hk:], cache, k8, k8, torch.zeros(3, dtype=torch.int64), neox,
                        s8, s8)):
                    jobs.append(_job(f"rotary_write_kv fp8 {hq}/{hk}x{d} rot={rot} neox={neox} "
                                     f"{dn}", fn, a, dict(kw)))
    return jobs


def _run(args):
    job, arch = args
    try:
        return _compile(job, arch)
    except Exception as e:                       # a config that does not compile is a failure
        return dict(label=job[0], arch=arch, error=f"{type(e).__name__}: {str(e)[:300]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90,80")
    ap.add_argument("--quick", action="store_true", help="D 128/256, bf16+fp32 only")
    ap.add_argument("--only", default="", help="substring filter on the config label")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    ops = op_jobs(a.quick)
    work = [(j, arch) for arch in map(int, a.arch.split(","))
            for j in attention_jobs(a.quick, arch) + ops if a.only in j[0]]
    bad = 0
    print(f"{'config':<58} {'sm':>3} {'warps':>5} {'stg':>3} {'regs':>4} {'local':>5} "
          f"{'smem KB':>7}  mma")
    with ProcessPoolExecutor(a.jobs) as ex:
        for r in ex.map(_run, work):
            if "error" in r:
                bad += 1
                print(f"{r['label']:<58} {r['arch']:>3} FAILED {r['error']}")
                continue
            over = r["smem"] > SMEM_LIMIT[r["arch"]]
            spill = r["local"] > 0 or r["stack"] > 0
            bad += over or spill
            flag = (" SPILL" if spill else "") + (" SMEM>LIMIT" if over else "")
            kind = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "-")
            print(f"{r['label']:<58} {r['arch']:>3} {r['warps']:>5} {str(r['stages']):>3} "
                  f"{r['regs']:>4} {r['local']:>5} {r['smem'] / 1024:>7.1f}  {kind}{flag}",
                  flush=True)
    print(f"{len(work)} compiles, {bad} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
