"""Kernel report: what the compiled code of both backends predicts on a GPU, without a GPU.

    python -m bench.kernel_report [--arch 90,80] [--json PATH] [--quick] [--jobs N]
                                  [--root TREE] [--measured DIR] [--no-jit]

Facts (read from the compiler's output, nothing run):
* Triton: every launcher (`_launch*` of kernels/triton_*.py) is called with small CPU tensors
  of the real head counts / strides while the module's @triton.jit kernels are replaced by a
  recorder, so arguments, constexprs, num_warps/stages and the grid are exactly a GPU
  launch's. The arguments are specialised as Triton's launcher does (ints == 1 constant, ints
  and pointers divisible by 16 get tt.divisibility, do_not_specialize respected), compiled
  with triton.compile(ASTSource, GPUTarget("cuda", arch, 32)) for sm_90a / sm_80.
* CUDA: every csrc/*.cu is compiled by nvcc to a cubin per arch (setup.py's flags); every
  kernel symbol cuobjdump lists is one instantiation. Which instantiation a launch uses, its
  grid, block and dynamic shared memory come from the real host launcher: csrc/ is built
  for the CPU like csrc/emu (g++), with `<<<>>>` recording instead of running.
* From each cubin: registers, spills (STACK/LOCAL), static + dynamic shared memory
  (cuobjdump --dump-resource-usage, Triton's bundled binaries), MMA kinds in SASS (HGMMA =
  wgmma, HMMA = mma.sync), and the loops: a back-edge branch closes a loop; the K/V loop is an
  outermost loop that both copies from global memory (LDGSTS/LDG >= 8 B a lane, UTMALDG) and
  computes (MMA/FFMA). Instructions per iteration = its own + each inner loop x its trip
  count (an immediate loop bound / step; a runtime bound counts once, so instruction counts
  are lower bounds and the issue ceilings upper bounds). Copy groups in flight = 1 + the
  largest N of `DEPBAR.LE SB0, N` in the loop; Triton's TTGIR async_wait nums are listed too.
  Occupancy: CTAs/SM from registers (x 32 lanes, 256-register warp granules), shared memory
  (+1 KB per CTA reserved), warps (64/SM) and 32 CTAs/SM.

Model (every figure it yields is labelled "predicted"; ceilings, not estimates of losses):
  memory-bound part (decode, spec-verify, ops):  B_launch / min(HBM BW,
      issue = SMs_used x min(4, warps/SM) x clock x (K/V bytes / warp-instruction),
      in-flight = SMs_used x CTAs/SM x copy groups in flight x tile bytes / latency)
  compute-bound part (prefill):  FLOPs / min(peak x SMs_used / SMs (tensor cores if the loop
      has MMA, else FP32 FMA), issue = SMs_used x min(4, warps/SM) x clock x FLOPs/warp-instr,
      smem = SMs_used x 128 B/clk x clock x FLOPs / smem bytes (wgmma SS/RS operands + LDS/
      STS/LDSM/STSM/LDGSTS bytes per tile))
  A launch is its kernel's decode-class loop for the decode rows plus its prefill-class loop
  (most FLOPs per iteration) for the prefill rows; the two times add (no overlap credited).
  Per part the slower of the byte and the FLOP term counts. The split-KV merge launch is not
  in the time (its bytes are < 2% of a decode launch's at the shapes here).
Modules: bench/sass.py (SASS facts), bench/kernel_model.py (devices, occupancy, the model of
one part), bench/jit_sim.py (the JIT-compile simulation), this file (launch set, recording,
compiling, the report). Device figures (kernel_model.DEVICES): H100 SXM 3.35 TB/s, H200
4.8 TB/s, both 989 TFLOP/s dense bf16 (datasheet), 132 SMs, 1.83 GHz (the clock that peak
implies; every per-clock term uses it), 4 warp-instructions/clock/SM, 128 B/clk/SM shared memory, 67 TFLOP/s FP32 FMA; A100-80GB 2.04 TB/s, 312 TFLOP/s, 108 SMs, 1.41 GHz. Loaded DRAM
latency 700 ns (an assumption: public pointer-chase figures are ~500-600 ns idle; it only
enters the in-flight term, the one to calibrate against measurements).
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":     # real compiles: the interpreter cannot compile. Only as a script:
    os.environ.pop("TRITON_INTERPRET", None)   # importing the module (tests) must not change
                                               # the importer's Triton mode

from bench.kernel_model import DEVICES, RESERVED_SMEM, occupancy, predict_part  # noqa: E402
from bench.sass import _clean, cubin_facts, demangle, pick_loop  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("RAGGED_REPORT_CACHE",
                            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                            / "ragged-kernel-report"))
NVCC = os.environ.get("NVCC", "/usr/local/cuda/bin/nvcc")
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]   # setup.py's
# ptxas's per-function resource lines and its (Cxxxx) notes, e.g. C7515 "wgmma.mma_async
# instructions are serialized": an info line, invisible without -v. It does not change the
# cubin, so it stays out of the cache digest; the log is cached next to the cubin.
PTXAS_VERBOSE = ["-Xptxas", "-v"]

ELEM = {"fp16": 2, "bf16": 2, "fp32": 4}
HALF = ("fp16", "bf16")


# =========================================================================== launch set
@dataclass(frozen=True)
class Launch:
    """One attention launch (q_lens/kv_lens per sequence) or one op launch (op != "")."""
    name: str
    model: str
    hq: int
    hkv: int
    d: int
    dtype: str
    bs: int = 16
    q_lens: tuple = ()
    kv_lens: tuple = ()
    window: int = 0
    op: str = ""              # "" attention, else an op name (tokens = q_lens[0])
    op_dims: tuple = ()       # (hidden,) / (intermediate,)
    kv: str = ""              # "" K/V in `dtype`, "fp8": e4m3 cache + per-slot fp32 scales

    @property
    def kind(self) -> str:
        if self.op:
            return "op"
        dec = any(q <= 16 for q in self.q_lens)
        pre = any(q > 16 for q in self.q_lens)
        return "mixed" if dec and pre else "prefill" if pre else "decode"

    @property
    def key(self) -> str:
        kv = f" {self.kv}" if self.kv else ""
        return f"{self.model} {self.name} {self.dtype} bs={self.bs}{kv}"


MODELS = {"llama3-8b": (32, 8, 128, 0), "qwen3-0.6b": (16, 8, 128, 0),
          "mistral-7b": (32, 8, 128, 4096)}      # Mistral-7B-v0.1: 4096-token window
GROUPS = {"G1": (8, 8), "G5": (40, 8), "G8": (64, 8)}   # other GQA groups at D = 128


def _attn(name, model, hq, hkv, d, dt, bs, q, k, window=0, kv=""):
    return Launch(name, model, hq, hkv, d, dt, bs, tuple(q), tuple(k), window, kv=kv)


def _fp8_set():
    """fp8 (e4m3, per-slot scales) caches, bf16 q: issue 14's decode target (B >= 64 x >= 2k
    at <= 0.6x the bf16 time) and spec-verify, at D 128 and at the strided head dims 80 / 96;
    prefill and mixed at D 128 (the tensor-core tile's fp8 path)."""
    out = []
    for model, d in (("llama3-8b", 128), ("hd80", 80), ("hd96", 96)):
        out.append(_attn("decode B=256 ctx=2048 fp8", model, 32, 8, d, "bf16", 16, [1] * 256,
                         [2048] * 256, kv="fp8"))
    out.append(_attn("spec-verify q=4 B=64 ctx=2048 fp8", "llama3-8b", 32, 8, 128, "bf16", 16,
                     [4] * 64, [2048] * 64, kv="fp8"))
    out.append(_attn("prefill 2048 fp8", "llama3-8b", 32, 8, 128, "bf16", 16, [2048], [2048],
                     kv="fp8"))
    out.append(_attn("mixed 2048+256x2048 fp8", "llama3-8b", 32, 8, 128, "bf16", 16,
                     [1] * 256 + [2048], [2048] * 257, kv="fp8"))
    return out


def _attention_set(model, hq, hkv, d, dt, bs, window, quick):
    out = [_attn("decode B=256 ctx=2048", model, hq, hkv, d, dt, bs, [1] * 256, [2048] * 256,
                 window),
           _attn("prefill 2048", model, hq, hkv, d, dt, bs, [2048], [2048], window),
           _attn("mixed 2048+256x2048", model, hq, hkv, d, dt, bs, [1] * 256 + [2048],
                 [2048] * 257, window)]
    if not quick:
        out += [_attn("decode B=32 ctx=8192", model, hq, hkv, d, dt, bs, [1] * 32, [8192] * 32,
                      window),
                _attn("decode B=1 ctx=32768", model, hq, hkv, d, dt, bs, [1], [32768], window),
                _attn("spec-verify q=4 B=64 ctx=2048", model, hq, hkv, d, dt, bs, [4] * 64,
                      [2048] * 64, window),
                _attn("prefill 8192", model, hq, hkv, d, dt, bs, [8192], [8192], window)]
    return out


def _op_set(model, dt, T=8192):
    """The selective-batching ops at bench.kernels' 8192 tokens (Llama-3-8B sizes)."""
    hq, hkv, d = MODELS[model][:3]
    mk = functools.partial(Launch, model=model, hq=hq, hkv=hkv, d=d, dtype=dt, q_lens=(T,))
    return [mk("rotary+write_kv", op="rotary_write_kv"), mk("write_kv", op="write_kv"),
            mk("rms_norm+residual", op="rms_norm", op_dims=(4096,)),
            mk("rotary", op="rotary"), mk("silu_and_mul", op="silu_and_mul", op_dims=(14336,))]


def launch_set(quick: bool) -> list[Launch]:
    if quick:
        hq, hkv, d, _ = MODELS["llama3-8b"]
        return (_attention_set("llama3-8b", hq, hkv, d, "bf16", 16, 0, True)
                + [_attn("spec-verify q=4 B=64 ctx=2048", "llama3-8b", hq, hkv, d, "bf16", 16,
                         [4] * 64, [2048] * 64)]
                + [x for x in _op_set("llama3-8b", "bf16") if x.name in ("rotary+write_kv",
                                                                          "rms_norm+residual")])
    out = []
    for model, (hq, hkv, d, window) in MODELS.items():     # fp16: Llama-3-8B only (the
        for dt in HALF if model == "llama3-8b" else ("bf16",):   # full run stays minutes)
            out += _attention_set(model, hq, hkv, d, dt, 16, window, model != "llama3-8b")
    for bs in (32, 64):
        out += _attention_set("llama3-8b", 32, 8, 128, "bf16", bs, 0, True)[:1]
    for g, (hq, hkv) in GROUPS.items():
        out += _attention_set(f"gqa-{g}", hq, hkv, 128, "bf16", 16, 0, True)
    for d in (64, 80, 96, 256):       # other head dims: the compile / spill coverage of the
        out += [x for x in _attention_set(f"hd{d}", 32, 8, d, "bf16", 16, 0, True)  # old check
                if x.kind != "prefill" or d in (80, 96)]   # 80 / 96: their wgmma tile too
    for d in (80, 96):                # the strided lean tile's spec-verify rows
        out.append(_attn("spec-verify q=4 B=64 ctx=2048", f"hd{d}", 32, 8, d, "bf16", 16,
                         [4] * 64, [2048] * 64))
    out += _fp8_set()
    for dt in HALF:
        out += _op_set("llama3-8b", dt)
    return out


def _prefill_class(x: Launch, q: int, backend: str | None, arch: int | None = None) -> bool:
    """Whether a sequence of q new tokens runs the kernel's prefill-class tile: q_len > 16
    (Triton); CUDA picks by rows q_len x G (paged_attention.cu: tensor cores above kLeanRows =
    4 rows in 16-bit types, above 16 for fp8 caches; fp32 has no tensor-core tile). fp8 caches
    on sm_90a (arch >= 90) at D 64 / 128 with 16-bit q: every row (kFp8WgmmaRows = 0)."""
    if backend != "cuda":
        return q > 16
    if x.kv == "fp8" and arch is not None and arch >= 90 and x.dtype != "fp32" and \
            x.d in (64, 128):
        return q > 0
    return q * (x.hq // x.hkv) > (16 if x.kv == "fp8" or x.dtype == "fp32" else 4)


def launch_cost(x: Launch, backend: str | None = None, arch: int | None = None) -> dict:
    """Bytes that must move and FLOPs, split into the decode-class part (memory bound) and the
    prefill-class part (_prefill_class): bench.kernels' accounting (each input read once, each
    output written once; causal FLOPs 4 D Hq x visible keys)."""
    e = ELEM[x.dtype]
    if x.op:
        T, hq, hkv, d = x.q_lens[0], x.hq, x.hkv, x.d
        n = {"rotary_write_kv": (T * (hq + 2 * hkv) * d + T * hq * d + 2 * T * hkv * d) * e
             + T * (4 * d + 16),
             "write_kv": 4 * T * hkv * d * e + 8 * T,
             "rotary": 2 * T * (hq + hkv) * d * e + T * (4 * d + 8),
             "rms_norm": (4 * T + 1) * x.op_dims[0] * e if x.op_dims else 0,
             "silu_and_mul": 3 * T * x.op_dims[0] * e if x.op_dims else 0}[x.op]
        return dict(decode=(n, 0), prefill=(0, 0))
    parts = {"decode": [0, 0], "prefill": [0, 0]}
    # fp8 caches: 1-byte codes + a float32 K and V scale per (key, KV head), as read
    ekv, esc = (1, 8) if x.kv == "fp8" else (e, 0)
    for q, k in zip(x.q_lens, x.kv_lens):
        p = parts["prefill" if _prefill_class(x, q, backend, arch) else "decode"]
        lo = max(0, k - q - x.window + 1) if x.window else 0
        vis = sum(k - q + i + 1 - (max(0, k - q + i - x.window + 1) if x.window else 0)
                  for i in range(q))
        p[0] += (k - lo) * x.hkv * (2 * x.d * ekv + esc) + 2 * q * x.hq * x.d * e
        p[1] += 4 * x.d * x.hq * vis
    return {k: tuple(v) for k, v in parts.items()}


# =========================================================================== model
def predict(x: Launch, kern: dict, dev: dict) -> dict:
    """Predicted time, GB/s, TFLOP/s and % of the device's peaks for one launch."""
    cost = launch_cost(x, "cuda" if "unit" in kern else "triton", kern.get("arch"))
    out = dict(parts={})
    t = t_slow = 0.0
    for cls in ("decode", "prefill"):
        nbytes, flops = cost[cls]
        if not (nbytes or flops):
            continue
        loop = pick_loop(kern, cls) if not x.op else None
        if not x.op and loop is None:
            return dict(error="no K/V loop found in the SASS")
        p = predict_part(nbytes, flops, loop, kern, dev, whole=bool(x.op))
        if "error" in p:
            return p
        out["parts"][cls] = p
        t += p["time_us"] * 1e-6
        slow = max(p["time_us"] * 1e-6, flops / (p.get("flop_no_overlap_tflops") or math.inf)
                   / 1e12)
        t_slow += slow
    nbytes = sum(v[0] for v in cost.values())
    flops = sum(v[1] for v in cost.values())
    out.update(predicted_us=t * 1e6, predicted_gbs=nbytes / t / 1e9 if t else 0.0,
               predicted_tflops=flops / t / 1e12 if t else 0.0,
               predicted_no_overlap_us=t_slow * 1e6,
               predicted_no_overlap_tflops=flops / t_slow / 1e12 if t_slow else 0.0)
    out["predicted_pct_hbm"] = 100 * out["predicted_gbs"] / dev["hbm_gbs"]
    out["predicted_pct_tc"] = 100 * out["predicted_tflops"] / dev["tc_tflops"]
    return out


# =========================================================================== Triton
class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kw)` records instead of launching."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((self.fn, grid, args, kw))
        return launch


def _patch_device(mod, dev: dict):
    """Make a launcher plan for `dev` on CPU tensors: its arch / SM count / name helpers."""
    saved = {}
    for name, value in (("_arch", lambda device: dev["arch"]),
                        ("_sm_count", lambda device: dev["sms"]),
                        ("_device_name", lambda device: ""),
                        ("device_name", lambda device: "")):
        if hasattr(mod, name):
            saved[name] = getattr(mod, name)
            setattr(mod, name, value)
    return saved


def record_triton(op: str, call, dev: dict) -> list[tuple]:
    """[(fn, grid, args, kw)] of the @triton.jit launches that `call(op function)` makes."""
    from triton.runtime.jit import JITFunction
    kernels = importlib.import_module("kernels")
    mod = importlib.import_module(kernels._MODULES["triton"][op])
    calls = []
    jits = {n: v for n, v in vars(mod).items() if isinstance(v, JITFunction)}
    saved = _patch_device(mod, dev)
    try:
        for n, f in jits.items():
            setattr(mod, n, _Recorder(f, calls))
        call(getattr(mod, op))
    finally:
        for n, f in {**jits, **saved}.items():
            setattr(mod, n, f)
    return calls


def triton_job(fn, grid, args, kw) -> tuple:
    """A picklable compile job: (module, name, signature, constexprs, attrs, options, programs).
    Specialised like Triton's launcher: its cache key is everything but `programs`."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
    kw = dict(kw)
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in kw}
    params = fn.params
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
    g = grid(dict(kw, **opts)) if callable(grid) else grid
    g = (g,) if isinstance(g, int) else tuple(g)
    return (fn.__module__, fn.__name__, sig, const, attrs, opts, math.prod(int(v) for v in g))


def spec_key(job) -> str:
    """Readable and unique per specialisation: kernel, constexprs, options, the parameters
    specialised as divisible by 16, and the pointer element types."""
    mod, name, sig, const, attrs, opts, _ = job
    names = list(sig)
    div = ",".join(names[i[0]] for i in sorted(attrs))
    ptrs = ",".join(sorted({t for t in sig.values() if t.startswith("*")}))
    cst = " ".join(f"{k}={v!r}" for k, v in sorted(const.items()))
    opt = " ".join(f"{k}={v}" for k, v in sorted(opts.items()))
    return f"{mod}.{name} | {cst} | {opt} | div16: {div} | {ptrs}"


def key_diff(key: str, others) -> str:
    """What distinguishes key from the closest of others (same kernel): the missing compile."""
    def parts(k):
        f = k.split(" | ")
        return f[0], set(f[1].split()), set(f[4 - 1].removeprefix("div16: ").split(","))
    kern, cst, div = parts(key)
    best = None
    for o in others:
        ok, oc, od = parts(o)
        if ok != kern:
            continue
        d = (sorted(cst - oc), sorted(div ^ od))
        if best is None or len(d[0]) + len(d[1]) < len(best[0]) + len(best[1]):
            best = d
    if best is None:
        return f"{kern.split('.')[-1]}: no warm-up compile of this kernel"
    return (f"{kern.split('.')[-1]}: constexprs {best[0] or '-'}, divisibility of "
            f"{best[1] or '-'}")


def ttgir_copy_loops(ttgir: str) -> list[list[int]]:
    """async_wait nums per scf.for whose body issues async copies (by indentation)."""
    lines = ttgir.splitlines()
    out = []
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        ind = len(line) - len(line.lstrip())
        copies, waits = 0, []
        for body in lines[i + 1:]:
            bind = len(body) - len(body.lstrip())
            if bind <= ind and body.strip().startswith("}"):
                break
            if "async_copy_global_to_local" in body:
                copies += 1
            if "async_wait" in body:
                m = re.search(r"num = (\d+)", body)
                waits.append(int(m.group(1)) if m else -1)
        if copies:
            out.append(waits)
    return out


def compile_triton(job, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    mod, name, sig, const, attrs, opts, _ = job
    fn = getattr(importlib.import_module(mod), name)
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                       options=opts)
    facts = next(iter(cubin_facts(k.asm["cubin"]).values()))
    facts.update(kernel=name, arch=arch, warps=opts.get("num_warps", 4),
                 stages=opts.get("num_stages"), smem=k.metadata.shared,
                 ttgir_copy_loop_waits=ttgir_copy_loops(k.asm.get("ttgir", "")),
                 ptx_div_s32=k.asm.get("ptx", "").count("div.s32"))
    return facts


# =========================================================================== launch tensors
def _dtype(name):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def attention_inputs(x: Launch):
    """CPU tensors of the launch's shapes / strides (empty: the recorder reads no data)."""
    import torch
    dt = _dtype(x.dtype)
    T, B = sum(x.q_lens), len(x.q_lens)
    width = -(-max(x.kv_lens) // x.bs)
    cu = torch.tensor([0, *itertools_acc(x.q_lens)], dtype=torch.int32)
    kdt = torch.float8_e4m3fn if x.kv == "fp8" else dt
    scales = {}
    if x.kv == "fp8":
        scales = dict(k_scale=torch.empty(4, x.bs, x.hkv), v_scale=torch.empty(4, x.bs, x.hkv))
    return dict(q=torch.empty(T, x.hq, x.d, dtype=dt),
                k_cache=torch.empty(4, x.bs, x.hkv, x.d, dtype=kdt),
                v_cache=torch.empty(4, x.bs, x.hkv, x.d, dtype=kdt),
                block_table=torch.zeros(B, width, dtype=torch.int32), cu_seqlens_q=cu,
                seq_lens=torch.tensor(x.kv_lens, dtype=torch.int32), scales=scales)


def itertools_acc(xs):
    import itertools
    return list(itertools.accumulate(xs))


def op_call(x: Launch):
    """(op name, call(fn)) of an op launch with the model's tensor layout (model/layers.py:
    q/k/v are strided views of the fused qkv projection)."""
    import torch
    dt = _dtype(x.dtype)
    T, hq, hkv, d = x.q_lens[0], x.hq, x.hkv, x.d
    qkv = torch.empty(T, (hq + 2 * hkv) * d, dtype=dt)
    q = qkv[:, :hq * d].view(T, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(T, hkv, d)
    nblk = -(-2 * T // x.bs)
    kc = torch.empty(nblk, x.bs, hkv, d, dtype=dt)
    slots = torch.zeros(T, dtype=torch.int64)
    pos = torch.zeros(T, dtype=torch.int64)
    cs = torch.empty(8192, d, dtype=torch.float32)
    if x.op == "rotary_write_kv":
        return x.op, lambda f: f(pos, q, k, v, cs, kc, kc, slots, True)
    if x.op == "write_kv":
        return x.op, lambda f: f(k, v, kc, kc, slots)
    if x.op == "rotary":
        return "rotary_embedding", lambda f: f(pos, q, k, cs, True)
    if x.op == "rms_norm":
        h = torch.empty(T, x.op_dims[0], dtype=dt)
        return x.op, lambda f: f(h, torch.empty(x.op_dims[0], dtype=dt), 1e-5, h)
    g = torch.empty(T, 2 * x.op_dims[0], dtype=dt)
    return x.op, lambda f: f(g)


def triton_launch_jobs(x: Launch, dev: dict) -> list[tuple]:
    if x.op:
        op, call = op_call(x)
    else:
        t = attention_inputs(x)
        op = "paged_attention"

        def call(f):
            f(t["q"], t["k_cache"], t["v_cache"], t["block_table"], t["cu_seqlens_q"],
              t["seq_lens"], scale=x.d ** -0.5, max_seqlen_q=max(x.q_lens),
              max_seqlen_k=max(x.kv_lens), sliding_window=x.window or None, **t["scales"])
    return [triton_job(*c) for c in record_triton(op, call, dev)]


# =========================================================================== CUDA
def _sources_digest(csrc: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for f in sorted(csrc.glob("*.cu")) + sorted(csrc.glob("*.cuh")) + sorted(csrc.glob("*.h")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def compile_cuda(csrc: str, unit: str, arch: int) -> dict:
    """{clean demangled name: facts} of every kernel in csrc/<unit>.cu built for sm_<arch>
    (sm_90a on Hopper, as setup.py's TORCH_CUDA_ARCH_LIST 9.0a)."""
    csrc = Path(csrc)
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    digest = _sources_digest(csrc, f"{unit} {sm} {NVCC_FLAGS}")
    out = CACHE / f"cubin-{digest}" / f"{unit}.{sm}.cubin"
    log = out.with_suffix(".ptxas.log")
    if not (out.exists() and log.exists()):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        res = subprocess.run([NVCC, "-cubin", f"-arch={sm}", *NVCC_FLAGS, *PTXAS_VERBOSE,
                              f"-I{csrc}", str(csrc / f"{unit}.cu"), "-o", str(tmp)],
                             check=True, capture_output=True, text=True)
        tmp_log = log.with_suffix(f".tmp{os.getpid()}")
        tmp_log.write_text(res.stdout + res.stderr)
        tmp_log.rename(log)
        tmp.rename(out)
    facts = cubin_facts(out.read_bytes())
    ptxas = parse_ptxas(log.read_text())
    names = demangle(list(facts))
    res = {}
    for mangled, f in facts.items():
        f.update(kernel=_clean(names[mangled]), symbol=mangled, arch=arch, unit=unit)
        if mangled in ptxas:     # else no ptxas_notes: the invariant reports "no ptxas log"
            # a note naming no kernel of the unit (a device function, or none) goes to all
            f.update(ptxas_notes=ptxas[mangled]["notes"] + [
                n for k, v in ptxas.items() if k not in facts for n in v["notes"]],
                ptxas_spill_bytes=ptxas[mangled]["spill_bytes"])
        res[f["kernel"]] = f
    return res


_PTXAS_NOTE = re.compile(r"ptxas\s+(info|warning|error)\s*:\s*\((C\d{4})\)\s*(.*)")
_PTXAS_IN_FN = re.compile(r"in (?:the )?function '([^']+)'")


def parse_ptxas(log: str) -> dict[str, dict]:
    """{mangled function: dict(notes=["C7515 info: ...", ...], spill_bytes=stores + loads)}
    from `ptxas -v` output. A (Cxxxx) note belongs to the function it names ("in the
    function '...'"), else to the entry being compiled, else to "" (the whole unit)."""
    out, cur = {}, ""
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([^'\s]+)'?",
                      line)
        if m:
            cur = m.group(1)
            out.setdefault(cur, dict(notes=[], spill_bytes=0))
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            out[cur]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
            continue
        m = _PTXAS_NOTE.search(line)
        if m:
            fn = _PTXAS_IN_FN.search(m.group(3))
            key = fn.group(1) if fn else cur
            out.setdefault(key, dict(notes=[], spill_bytes=0))["notes"].append(
                f"{m.group(2)} {m.group(1)}: {m.group(3)[:300]}")
    return out


_RECORDER = r"""
struct KrRec { const void* fn; unsigned g[3], b[3]; size_t smem; };
inline std::vector<KrRec> kr_recs;
template <typename... P, typename... A>
void emu_launch(void (*k)(P...), dim3 g, dim3 b, size_t smem, cudaStream_t, A...) {
  kr_recs.push_back({reinterpret_cast<const void*>(k), {g.x, g.y, g.z}, {b.x, b.y, b.z}, smem});
}
"""
_RECORDER_TU = r"""
#include "emu.h"
extern "C" int kr_count() { return static_cast<int>(kr_recs.size()); }
extern "C" void kr_clear() { kr_recs.clear(); }
extern "C" void kr_get(int i, long long* o) {
  const KrRec& r = kr_recs[i];
  o[0] = reinterpret_cast<long long>(r.fn);
  for (int j = 0; j < 3; ++j) { o[1 + j] = r.g[j]; o[4 + j] = r.b[j]; }
  o[7] = static_cast<long long>(r.smem);
}
"""


class CudaRecorder:
    """csrc/ built for the CPU as csrc/emu does (its source rewrite and shim), with
    `kernel<<<grid, block, smem>>>` recording (kernel, grid, block, dynamic smem) instead of
    running: the real host launcher picks the instantiation and the launch shape. arch 90:
    the emulator's sm_90a build (RAGGED_EMU_SM90: kernel_arch answers 90, so the launcher
    sizes shared memory for the wgmma tile as it does on an H100/H200); 80: sm_80's."""

    def __init__(self, root: Path, arch: int = 80):
        spec = importlib.util.spec_from_file_location("_kr_emulated",
                                                      root / "csrc" / "emu" / "emulated.py")
        self.emu = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.emu)
        csrc = root / "csrc"
        defs = ["-DRAGGED_EMU_SM90=1"] if arch >= 90 else []
        out = CACHE / f"emu-rec-{_sources_digest(csrc, (csrc / 'emu' / 'emu.h').read_text() + (csrc / 'emu' / 'shim.cpp').read_text() + _RECORDER + _RECORDER_TU + ' '.join(defs))}"
        lib = out / "librec.so"
        if not lib.exists():
            src = out / "src"
            src.mkdir(parents=True, exist_ok=True)
            for f in list(csrc.glob("*.cu")) + list(csrc.glob("*.cuh")) + list(csrc.glob("*.h")):
                (src / f.name).write_text(self.emu._rewrite(f.read_text()))
            emu_h = (csrc / "emu" / "emu.h").read_text().replace("void emu_launch(",
                                                                 "void emu_launch_run(")
            (out / "emu.h").write_text(emu_h + _RECORDER)
            shutil.copy(csrc / "emu" / "shim.cpp", out / "shim.cpp")
            (out / "kr.cpp").write_text(_RECORDER_TU)
            tus = []
            for f in sorted(csrc.glob("*.cu")):
                tu = out / f"tu_{f.stem}.cpp"
                tu.write_text(f'#include "emu.h"\n#include "src/{f.name}"\n')
                tus.append(str(tu))
            tmp = out / f"lib.tmp{os.getpid()}.so"
            subprocess.run(["g++", "-std=c++20", "-O0", "-fPIC", "-shared", "-pthread", "-w", *defs,
                            f"-I{self.emu.cuda_include()}", f"-I{out}", *tus,
                            str(out / "shim.cpp"), str(out / "kr.cpp"), "-o", str(tmp)],
                           check=True, capture_output=True, text=True)
            tmp.rename(lib)
        self.lib = ctypes.CDLL(str(lib))
        self.lib.kr_get.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_longlong)]
        nm = subprocess.run(["nm", "--defined-only", str(lib)], capture_output=True,
                            text=True, check=True).stdout
        syms = {}
        for line in nm.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in "tTwW":
                syms[int(parts[0], 16)] = parts[2]
        self.syms = syms
        self.names = demangle(list(syms.values()))
        info = _DlInfo()
        ctypes.CDLL(None).dladdr(ctypes.cast(self.lib.kr_count, ctypes.c_void_p),
                                 ctypes.byref(info))
        self.base = info.dli_fbase or 0

    def record(self, entry: str, *args) -> list[dict]:
        fn = getattr(self.lib, entry)
        fn.argtypes = self.emu._SIGS[entry]
        self.lib.kr_clear()
        rc = fn(*args)
        if rc != 0:
            raise RuntimeError(f"{entry}: cudaError {rc}")
        out = []
        for i in range(self.lib.kr_count()):
            o = (ctypes.c_longlong * 8)()
            self.lib.kr_get(i, o)
            sym = self.syms.get(o[0] - self.base, "?")
            name = _clean(self.names.get(sym, sym))
            out.append(dict(kernel=name, grid=o[1] * o[2] * o[3], threads=o[4] * o[5] * o[6],
                            dyn_smem=o[7]))
        return out


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


_PTR = 1 << 20                 # a 16-aligned fake device address: nothing is dereferenced
_DT = {"fp16": 0, "bf16": 1, "fp32": 2}


def cuda_launches(rec: CudaRecorder, x: Launch, dev: dict) -> list[dict]:
    """The CUDA launches of x (kernel, grid, threads, dyn_smem): split count from the
    backend's own host heuristic (kernels.cuda_ops) planned for `dev`'s SM count."""
    e, P = _DT[x.dtype], _PTR
    if x.op:
        T, hq, hkv, d = x.q_lens[0], x.hq, x.hkv, x.d
        qkv = (hq + 2 * hkv) * d
        if x.op in ("rotary", "rotary_write_kv"):
            r = rec.record("emu_rotary", e, P, P, qkv, d, P, qkv, d, P, P, P, 8192, T, hq, hkv,
                           d, d, 1, 1)
            if x.op == "rotary":
                return r
            return r + rec.record("emu_write_kv", e, P, hkv * d, d, P, qkv, d, P, P, P, 1,
                                  2 * T, T, hkv, d, 1)
        if x.op == "write_kv":
            return rec.record("emu_write_kv", e, P, qkv, d, P, qkv, d, P, P, P, 1, 2 * T, T,
                              hkv, d, 1)
        if x.op == "rms_norm":
            H = x.op_dims[0]
            return rec.record("emu_rms_norm", e, 0, P, P, P, H, P, H, P, T, H, 1e-5, 1)
        I = x.op_dims[0]
        return rec.record("emu_silu", e, P, P, 2 * I, T, I, 1)
    import torch
    cuda_ops = importlib.import_module("kernels.cuda_ops")
    t = attention_inputs(x)
    saved = cuda_ops._sm_count, cuda_ops._sm_arch
    cuda_ops._sm_count = lambda device: dev["sms"]
    cuda_ops._sm_arch = lambda device: (divmod(dev["arch"], 10), dev["smem_sm"])
    try:
        S = cuda_ops.default_num_kv_splits(t["q"], t["k_cache"], len(x.q_lens), max(x.q_lens),
                                           max(x.kv_lens))
    finally:
        cuda_ops._sm_count, cuda_ops._sm_arch = saved
    T, B = sum(x.q_lens), len(x.q_lens)
    width = t["block_table"].shape[1]
    del torch
    args = (e, P, x.hq * x.d, x.d, P, x.hq * x.d, x.d, P, P, P, width, P, P, P, P, B, T, x.hq,
            x.hkv, x.d, x.bs, max(x.q_lens), S, x.window, x.d ** -0.5, 0.0)
    if x.kv == "fp8":             # per-slot scales (fake addresses: nothing is read)
        return rec.record("emu_paged_attention_fp8", *args, 1, P, P, 1.0, 1.0)
    return rec.record("emu_paged_attention", *args)


# =========================================================================== the report
def _init_worker(root: str):
    os.environ.pop("TRITON_INTERPRET", None)
    if root not in sys.path:
        sys.path.insert(0, root)


def _run(task):
    """Pool task: ("triton", job, arch) | ("cuda", csrc, unit, arch) | ("recorder", root,
    arch)."""
    try:
        if task[0] == "triton":
            return compile_triton(task[1], task[2])
        if task[0] == "cuda":
            return compile_cuda(*task[1:])
        CudaRecorder(Path(task[1]), task[2])
        return {}
    except Exception as e:        # a kernel that does not compile is reported, not fatal
        return dict(error=f"{type(e).__name__}: {str(e)[-400:]}")


def _archs_devices(archs):
    return [(name, d) for name, d in DEVICES.items() if d["arch"] in archs]


def _slim(facts: dict) -> dict:
    """Kernel facts for the JSON: the loops' mma_events (the model's input, ~100 entries per
    wgmma loop) left out; their effect is each row's flop_overlap_credit."""
    if "kv_loops" not in facts:
        return facts
    return dict(facts, kv_loops=[{k: v for k, v in lp.items() if k != "mma_events"}
                                 for lp in facts["kv_loops"]])


def _kern(facts: dict, warps: int, grid: int, smem: int) -> dict:
    per_cta = smem + facts.get("static_smem", 0) + (RESERVED_SMEM if facts["arch"] < 90 else 0)
    return dict(facts, warps=warps, grid=grid, smem=max(0, per_cta - RESERVED_SMEM))


def _predict_kernels(x: Launch, kerns: list[dict], dev: dict) -> dict:
    """Attention: the first launch (the attention kernel; a merge follows). Ops: every
    launch, the bytes shared out by each kernel's static bytes per CTA x grid."""
    if not kerns:
        return dict(error="no launch recorded")
    if not x.op:
        return predict(x, kerns[0], dev)
    nbytes = launch_cost(x)["decode"][0]
    w = [max(1, (k["whole"]["copy_bytes"] + k["whole"]["store_bytes"]) * k["warps"] * k["grid"])
         for k in kerns]
    t, parts = 0.0, {}
    for k, wk in zip(kerns, w):
        p = predict_part(int(nbytes * wk / sum(w)), 0, None, k, dev, whole=True)
        if "error" in p:
            return p
        parts[k["kernel"]] = p
        t += p["time_us"] * 1e-6
    gbs = nbytes / t / 1e9
    return dict(parts=parts, predicted_us=t * 1e6, predicted_gbs=gbs, predicted_tflops=0.0,
                predicted_pct_hbm=100 * gbs / dev["hbm_gbs"], predicted_pct_tc=0.0)


def build_report(archs=(90, 80), quick=False, jobs=2, root=None, jit=True,
                 measured_dir=None, log=print) -> dict:
    root = Path(root or HERE.parent).resolve()
    _init_worker(str(root))
    for m in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")
              or m == "ragged" or m.startswith("ragged.")]:
        if not str(getattr(sys.modules[m], "__file__", "")).startswith(str(root)):
            del sys.modules[m]                    # another tree's modules: import root's
    t0 = time.time()
    launches = launch_set(quick)
    csrc = root / "csrc"
    units = sorted(f.stem for f in csrc.glob("*.cu")) if shutil.which(NVCC) or Path(NVCC).exists() else []
    # Triton: record every launch for each arch; identical specialisations compile once.
    tri_jobs, per_launch = {}, {}
    for arch in archs:
        dev = next(d for _, d in _archs_devices([arch]))
        for x in launches:
            try:
                js = triton_launch_jobs(x, dev)
            except Exception as e:       # noqa: BLE001 - a launcher that refuses is reported
                per_launch[(x.key, arch)] = f"{type(e).__name__}: {e}"
                continue
            per_launch[(x.key, arch)] = [(spec_key(j), j[6], j[5].get("num_warps", 4)) for j in js]
            for j in js:
                tri_jobs.setdefault((spec_key(j), arch), j)
    rec_archs = sorted({90 if a >= 90 else 80 for a in archs})
    tasks = [("recorder", str(root), a) for a in rec_archs] if units else []
    tasks += [("cuda", str(csrc), u, a) for a in archs for u in units]
    tasks += [("triton", j, a) for (_, a), j in tri_jobs.items()]
    log(f"kernel report: {len(launches)} launches, {len(tri_jobs)} Triton compiles, "
        f"{len(units) * len(archs)} nvcc units, {jobs} jobs")
    with ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(str(root),)) as ex:
        results = list(ex.map(_run, tasks))
    res_iter = iter(results)
    rec_errs = [next(res_iter).get("error") for _ in rec_archs] if units else ["no nvcc"]
    rec_err = next((e for e in rec_errs if e), None)
    cuda_facts, cuda_errors = {}, []
    for a in archs:
        for u in units:
            r = next(res_iter)
            if "error" in r:
                cuda_errors.append(f"{u} sm_{a}: {r['error']}")
            else:
                cuda_facts.update({(k, a): v for k, v in r.items()})
    tri_facts = {key: next(res_iter) for key in tri_jobs}
    recs = {}
    if units and not rec_err:
        try:
            recs = {a: CudaRecorder(root, a) for a in rec_archs}
        except Exception as e:           # noqa: BLE001
            rec_err = f"{type(e).__name__}: {e}"
    rows = []
    for x in launches:
        for arch in archs:
            for dname, dev in _archs_devices([arch]):
                row = dict(launch=x.name, model=x.model, kind=x.kind, dtype=x.dtype,
                           kv=x.kv or "auto", bs=x.bs, hq=x.hq, hkv=x.hkv, d=x.d,
                           window=x.window, arch=arch, device=dname,
                           bytes=sum(v[0] for v in launch_cost(x).values()),
                           flops=sum(v[1] for v in launch_cost(x).values()))
                rows.append(dict(row, backend="triton", **_triton_row(x, arch, dev, per_launch,
                                                                       tri_facts)))
                if units:
                    rec = recs.get(90 if arch >= 90 else 80)
                    rows.append(dict(row, backend="cuda", **_cuda_row(x, arch, dev, rec, rec_err,
                                                                      cuda_facts)))
    kernels_out = [dict(backend="triton", key=k[0], **_slim(v)) for k, v in tri_facts.items()]
    kernels_out += [dict(backend="cuda", **_slim(v)) for v in cuda_facts.values()]
    def git(*a):
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True,
                              text=True).stdout.strip()
    # The kernels' own commit (what the figures describe), dirty if kernels/ or csrc/ differ.
    commit = git("log", "-1", "--format=%h", "--", "kernels", "csrc") + (
        "-dirty" if git("status", "--porcelain", "--", "kernels", "csrc") else "")
    report = dict(generated_by="python -m bench.kernel_report", root=str(root), kernels_commit=commit,
                  archs=list(archs), quick=quick, devices=DEVICES, predicted=True,
                  note="every *_us/_gbs/_tflops/_pct figure is PREDICTED from compiled code, "
                       "not measured", rows=rows, kernels=kernels_out,
                  errors=[f"{e}" for e in cuda_errors] + ([f"cuda recorder: {rec_err}"]
                                                          if rec_err and units else [])
                  + [f"triton {k[0][:80]} sm_{k[1]}: {v['error']}"
                     for k, v in tri_facts.items() if "error" in v])
    if jit:
        from bench.jit_sim import jit_compiles
        report["jit"] = jit_compiles(quick=quick)
    report["invariants"] = invariants(report)
    if measured_dir:
        report["measured"] = join_measured(report, measured_dir)
    report["seconds"] = round(time.time() - t0, 1)
    return report


def _triton_row(x, arch, dev, per_launch, tri_facts) -> dict:
    recs = per_launch.get((x.key, arch))
    if isinstance(recs, str) or recs is None:
        return dict(error=recs or "not recorded")
    kerns, names = [], []
    for key, grid, warps in recs:
        f = tri_facts[(key, arch)]
        if "error" in f:
            return dict(error=f["error"])
        kerns.append(_kern(f, warps, grid, f["smem"]))
        names.append(f["kernel"])
    return dict(kernels=names, **_summary(x, kerns, dev))


def _cuda_row(x, arch, dev, rec, rec_err, cuda_facts) -> dict:
    if rec is None:
        return dict(error=f"no launch recorder: {rec_err}")
    try:
        launches = cuda_launches(rec, x, dev)
    except Exception as e:               # noqa: BLE001
        return dict(error=f"{type(e).__name__}: {e}")
    kerns = []
    for ln in launches:
        f = cuda_facts.get((ln["kernel"], arch))
        if f is None:
            return dict(error=f"{ln['kernel']}: not in the sm_{arch} cubins")
        kerns.append(_kern(f, max(1, ln["threads"] // 32), ln["grid"], ln["dyn_smem"]))
    return dict(kernels=[ln["kernel"] for ln in launches], **_summary(x, kerns, dev))


def _summary(x: Launch, kerns: list[dict], dev: dict) -> dict:
    k = kerns[0]
    occ = occupancy(k["regs"], k["smem"], k["warps"], dev)
    out = dict(regs=k["regs"], spill_bytes=k["stack"] + k["local"], smem=k["smem"],
               warps=k["warps"], grid=k["grid"], ctas_per_sm=occ["ctas_per_sm"],
               occupancy_limit=occ["limit"], mma_kinds=k.get("mma_kinds", []),
               all_spill_bytes=sum(q["stack"] + q["local"] for q in kerns))
    notes = sorted({n for q in kerns for n in q.get("ptxas_notes", [])})
    if notes or any("ptxas_notes" in q for q in kerns):
        out["ptxas_notes"] = notes            # (Cxxxx) lines of ptxas -v: CUDA only
    if k.get("ttgir_copy_loop_waits") is not None:
        out["ttgir_async_wait_nums"] = k["ttgir_copy_loop_waits"]
    for cls in ("decode", "prefill"):
        lp = pick_loop(k, cls) if not x.op else None
        if lp and launch_cost(x, "cuda" if "unit" in k else "triton", k.get("arch"))[cls] != (0, 0):
            out[f"{cls}_loop"] = dict(
                instr_per_warp=lp["instr"], cta_instr=lp["instr"] * k["warps"],
                kv_bytes=lp["copy_bytes"] * k["warps"],
                bytes_per_instr=round(lp["copy_bytes"] / max(1, lp["instr"]), 2),
                mma=lp["mma"], flops_per_mma_instr=lp["mma_flops_per_instr"],
                groups_in_flight=lp["groups_in_flight"], depbar_waits=lp["depbar_waits"],
                wgmma_ss=lp.get("wgmma_ss", 0), wgmma_rs=lp.get("wgmma_rs", 0),
                smem_bytes=(lp.get("smem_operand_bytes", 0)
                            + lp.get("smem_copy_bytes", 0)) * k["warps"],
                runtime_trip_loops=lp["runtime_trips"])
    out.update(_predict_kernels(x, kerns, dev))
    return out


# =========================================================================== invariants
# (name, backend) -> check over the report's rows; see tests/test_kernel_report.py
def invariants(rep: dict) -> dict:
    rows = [r for r in rep["rows"] if "error" not in r]
    out = {}

    def add(name, backend, bad, n):
        out[f"{name}[{backend}]"] = dict(ok=not bad and n > 0, checked=n, failing=bad[:12])
    for be in ("triton", "cuda"):
        mine = [r for r in rows if r["backend"] == be]
        ks = [k for k in rep["kernels"] if k["backend"] == be and "error" not in k]
        half = [k for k in ks if _is_half(k)]
        add("no_spills_half", be, [f"{_short(k['kernel'])} sm_{k['arch']}: {k['stack'] + k['local']} B"
                                   for k in half if k["stack"] + k["local"]], len(half))
        pre = [r for r in mine if r["kind"] in ("prefill", "mixed") and r["dtype"] in HALF]
        add("prefill_tensor_cores", be,
            [f"{r['launch']} {r['dtype']} sm_{r['arch']}: {_mma(r)}" for r in pre
             if _mma(r) != ("wgmma" if r["arch"] >= 90 else "mma.sync")], len(pre))
        kv = [r for r in mine if r["kind"] != "op"]
        add("copy_in_flight", be,
            [f"{r['launch']} {r['dtype']} sm_{r['arch']} {c}: {r[c + '_loop']['groups_in_flight'] - 1}"
             for r in kv for c in ("decode", "prefill")
             if c + "_loop" in r and r[c + "_loop"]["groups_in_flight"] < 2], len(kv))
        # ptxas C7515 ("wgmma.mma_async instructions are serialized"), seen in the SASS:
        # every HGMMA its own commit group, each waited for at once; no overlap and the
        # tensor pipe drains. CUDA also: no (C75xx) note in its ptxas -v log (Triton's
        # ptxas log is not kept by triton.compile, so its check is the SASS rule only).
        wg = [(k, lp) for k in half if k["arch"] >= 90 for lp in k.get("kv_loops", [])
              if lp.get("mma", {}).get("wgmma", 0) > 1]
        bad = [f"{_short(k['kernel'])} sm_{k['arch']} loop {lp['start']}: "
               f"{lp['wgmma_groups']} groups for {lp['mma']['wgmma']} HGMMA"
               for k, lp in wg if lp.get("wgmma_groups", 0) >= lp["mma"]["wgmma"]]
        n = len(wg)
        if be == "cuda":
            noted = [k for k in half if k["arch"] >= 90 and "wgmma" in k.get("mma_kinds", [])]
            n += len(noted)
            for k in noted:
                c75 = [x for x in k.get("ptxas_notes", []) if x.startswith("C75")]
                if c75 or "ptxas_notes" not in k:
                    bad.append(f"{_short(k['kernel'])} sm_{k['arch']}: "
                               + ("; ".join(c75) if c75 else "no ptxas log"))
        add("wgmma_not_serialised", be, bad, n)
        dec = [r for r in mine if r["kind"] == "decode" and r["device"] == "H100"
               and max(1, r["bytes"]) and r["launch"].startswith("decode")
               and int(re.search(r"B=(\d+)", r["launch"]).group(1)) >= 64]
        add("decode_85pct_hbm_h100", be,
            [f"{r['launch']} {r['model']} {r['dtype']}: {r['predicted_pct_hbm']:.0f}%"
             for r in dec if r.get("predicted_pct_hbm", 0) < 85], len(dec))
    jit = rep.get("jit")
    if jit:   # <= 32 distinct: at 2-3 s a compile (issue 12) that is ~1.5 min of warm-up
        bad = [] if jit["compiles_in_timed_run"] == 0 and jit["distinct_timed"] <= 32 else [
            f"{jit['compiles_in_timed_run']} compiles in the timed run "
            f"({jit['missing_by_kernel']}), {jit['distinct_timed']} distinct"]
        add("jit_warm", "triton", bad, 1)
    return out


def _short(kernel: str) -> str:
    """paged_attention_kernel<__nv_bfloat16, 128, true> from the demangled signature."""
    return re.sub(r"^void |\w+::|\(anonymous namespace\)::|\(.*\)$", "", kernel)


def _is_half(k: dict) -> bool:
    if k["backend"] == "cuda":
        return "__half" in k["kernel"] or "bfloat16" in k["kernel"]
    return any(t in str(k.get("key", "")).split(" | ")[-1] for t in ("*fp16", "*bf16"))


def _mma(r: dict) -> str:
    lp = r.get("prefill_loop") or {}
    m = lp.get("mma") or {}
    return "wgmma" if "wgmma" in m else "mma.sync" if "mma.sync" in m else "none"


# =========================================================================== measured
def join_measured(rep: dict, measured_dir) -> list[dict]:
    """Predicted vs measured for every bench.kernels row (bench/results/<card>/kernels-*.json)
    of the same launch: name, backend, dtype and heads / head dim / block size agree. The card
    maps to a DEVICES entry by name (H100, H200, A100)."""
    out = []
    for path in sorted(Path(measured_dir).glob("**/kernels-*.json")):
        data = json.loads(path.read_text())
        card = str(data.get("run_info", {}).get("device", path.parent.name)).upper()
        dname = next((d for d in DEVICES if d in card.replace("-", "")), None)
        if dname is None:
            continue
        for m in data.get("results", []):
            if m.get("median_us") is None or m.get("impl") not in ("triton", "cuda"):
                continue
            sh = m.get("shape", {})
            dt = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(m.get("dtype"))
            for r in rep["rows"]:
                if (r["device"] == dname and r["backend"] == m["impl"] and r["dtype"] == dt
                        and r["launch"] == m["name"] and "predicted_us" in r
                        and sh.get("hq", r["hq"]) == r["hq"] and sh.get("hkv", r["hkv"]) == r["hkv"]
                        and sh.get("d", r["d"]) == r["d"] and sh.get("bs", r["bs"]) == r["bs"]
                        and not r["window"]):
                    out.append(dict(launch=r["launch"], model=r["model"], backend=r["backend"],
                                    dtype=dt, device=dname, source=str(path),
                                    predicted_us=r["predicted_us"], measured_us=m["median_us"],
                                    predicted_gbs=r["predicted_gbs"], measured_gbs=m.get("gbs"),
                                    predicted_tflops=r["predicted_tflops"],
                                    measured_tflops=m.get("tflops"),
                                    time_ratio=m["median_us"] / r["predicted_us"]))
                    break
    return out


# =========================================================================== output
def table(rep: dict, model: str = "llama3-8b", devices=("H100", "H200"), ops=True) -> str:
    """Markdown table of the predicted figures (one row per launch x backend)."""
    head = ("| launch | backend | sm | regs | CTAs/SM | MMA (prefill loop) | copies in flight at "
            "the wait | warp-instr per tile (CTA) | K/V B/instr | " + " | ".join(
                f"predicted {d} GB/s (% HBM) | predicted {d} TFLOP/s" for d in devices) + " |")
    lines = [head, "|" + "---|" * (9 + 2 * len(devices))]
    rows = [r for r in rep["rows"] if r["model"] == model and r["dtype"] == "bf16"
            and r["bs"] == 16 and r["device"] in devices and (ops or r["kind"] != "op")]
    seen = {}
    for r in rows:
        seen.setdefault((r["launch"], r["backend"], r["arch"]), {})[r["device"]] = r
    for (launch, be, arch), by in seen.items():
        r = next(iter(by.values()))
        if "error" in r:
            lines.append(f"| {launch} | {be} | {arch} | error: {r['error'][:60]} |")
            continue
        lp = r.get("decode_loop") or r.get("prefill_loop") or {}
        pl = r.get("prefill_loop") or {}
        cells = [launch, be, str(arch), str(r["regs"]), str(r["ctas_per_sm"]),
                 _mma(r) if pl else "-",
                 "/".join(str(r[c + "_loop"]["groups_in_flight"] - 1)
                          for c in ("decode", "prefill") if c + "_loop" in r) or "-",
                 "/".join(str(r[c + "_loop"]["cta_instr"])
                          for c in ("decode", "prefill") if c + "_loop" in r) or "-",
                 f"{lp.get('bytes_per_instr', 0):.1f}" if lp else "-"]
        for d in devices:
            q = by.get(d, {})
            tf = f"{q.get('predicted_tflops', 0):.0f}"
            lo = f"{q.get('predicted_no_overlap_tflops', 0):.0f}"
            if r["kind"] in ("prefill", "mixed") and lo != tf:
                tf = f"{lo}-{tf}"
            cells += [f"{q.get('predicted_gbs', 0):.0f} ({q.get('predicted_pct_hbm', 0):.0f}%)", tf]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90,80")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--quick", action="store_true", help="Llama-3-8B bf16 launches only")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--root", default=None, help="tree whose kernels to report (default: this)")
    ap.add_argument("--measured", default=str(HERE / "results"),
                    help="directory searched for bench.kernels JSON to compare against")
    ap.add_argument("--no-jit", action="store_true", help="skip the JIT-compile simulation")
    a = ap.parse_args(argv)
    if a.jobs < 1:
        raise ValueError(f"--jobs: must be >= 1, got {a.jobs}")
    archs = tuple(int(v) for v in a.arch.split(","))
    for v in archs:
        if v not in {d["arch"] for d in DEVICES.values()}:
            raise ValueError(f"--arch: {v} is not one of 90, 80")
    rep = build_report(archs, a.quick, a.jobs, a.root, not a.no_jit, a.measured)
    print("\nPREDICTED from compiled code (no GPU ran), Llama-3-8B bf16, block 16:")
    print(table(rep))
    if rep.get("jit"):
        j = rep["jit"]
        print(f"\nJIT (simulated {j['workload']}): {j['distinct_timed']} distinct Triton "
              f"specialisations in the timed run, {j['compiles_in_timed_run']} not compiled by "
              f"the warm-up {j['missing_by_kernel']}")
        for m in j["missing"]:
            print(f"  not warmed: {m}")
    print("\ninvariants:")
    for k, v in rep["invariants"].items():
        print(f"  {'ok  ' if v['ok'] else 'FAIL'} {k} ({v['checked']} checked)"
              + ("" if v["ok"] else f": {v['failing'][:3]}"))
    for m in rep.get("measured", []):
        print(f"  measured {m['device']} {m['backend']} {m['launch']}: predicted "
              f"{m['predicted_us']:.1f} us, measured {m['measured_us']:.1f} us, "
              f"ratio {m['time_ratio']:.2f}")
    for e in rep["errors"]:
        print(f"  error: {e}")
    print(f"{len(rep['rows'])} rows in {rep['seconds']} s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rep, indent=1, default=str) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
