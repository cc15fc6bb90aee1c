"""Build a Triton cache on a CPU machine for the GPU machine's first-light run (issue 18, item 3).

    python -m bench.triton_cache [--out .triton_cache] [--libtriton PATH] [--only SUBSTR]
    # then carry it: run(..., carry=[".triton_cache"]); bench/first_light.sh copies it to
    # /tmp/ragged-triton-cache and, after the Triton stage, prints how many carried kernels
    # were hit and how many kernels were compiled anyway.

A carried entry hits on the GPU only if the GPU run computes the same file-cache key
(triton/runtime/cache.py get_cache_key: triton_key(), the kernel's source/signature/constexprs/
attrs, the backend's ptxas version + arch, the options, cache-invalidating env vars):
* compiles go through Triton's real JIT path (JITFunction.run, forced to warm-up: compile, no
  launch) with a fake active CUDA driver reporting sm_90: a triton.compile(ASTSource) cache
  misses (its attrs differ from the JIT binder's);
* triton_key() hashes the GPU machine's libtriton.so: it runs Python 3.12, whose cp312 wheel's
  libtriton.so differs from this machine's cp311 one (the other files in the key -- Python,
  bundled ptxas, libdevice -- are the same: the build checks that against the wheel);
* TRITON_STORE_BINARY_ONLY=1 (cubin, json, source: no IRs) and the same absolute cache path on both
  machines (CACHE_DIR: the group json files store absolute paths).
* The launches are the project's own launchers called with CPU tensors of the smoke tests'
  shapes (LAUNCHES), with the attention planner told it runs on an H100/H200 (sm_90, 132 SMs):
  so the specialisation (16-divisible pointers and ints, ints == 1, do_not_specialize),
  constexprs and num_warps/stages are those of the GPU launch.
Any edit of a kernel file invalidates the entries (source and line numbers are in the key).
Unverifiable here: whether the GPU run hits; first_light.sh's summary says (carried kernels
hit, kernels compiled anyway). Covered: 18 of the 20 tests of bench/first_light_triton.txt
(16 kernel tests, 2 model tests); not covered: its 2 engine tests (their launch shapes follow
the scheduler, CUDA-graph buckets and the profiled KV cache) and the later bench stages: those
compile on the GPU as without a carry.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

CACHE_DIR = Path("/tmp/ragged-triton-cache")   # the path first_light.sh copies the carry to
TRITON_VERSION = "3.6.0"
GPU_PYTHON = "3.12"
TARGET = GPUTarget("cuda", 90, 32)             # H100 / H200
GPU_SMS = 132                                  # both cards: the split heuristic's input
GPU_NAME = "NVIDIA H100 80GB HBM3"             # only keys the tuned table (absent: unused)
TRITON_DIR = Path(triton.__file__).resolve().parent


# --------------------------------------------------------------------------- triton_key
def triton_key_with(libtriton: Path) -> str:
    """triton.runtime.cache.triton_key() (3.6.0), with the hash of ``libtriton`` in place of
    this interpreter's triton/_C/libtriton.<EXT_SUFFIX>. Same file list and order as upstream;
    tests/test_triton_cache.py checks that the installed libtriton gives upstream's key."""
    from triton.runtime import cache as tc

    contents = [hashlib.sha256(Path(tc.__file__).read_bytes()).hexdigest()]
    for sub, prefix in (("compiler", "triton.compiler."), ("backends", "triton.backends.")):
        for lib in pkgutil.walk_packages([str(TRITON_DIR / sub)], prefix=prefix):
            origin = lib.module_finder.find_spec(lib.name).origin
            contents.append(hashlib.sha256(Path(origin).read_bytes()).hexdigest())
    h = hashlib.sha256()
    with open(libtriton, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    contents.append(h.hexdigest())
    for lib in pkgutil.walk_packages([str(TRITON_DIR / "language")], prefix="triton.language."):
        origin = lib.module_finder.find_spec(lib.name).origin
        contents.append(hashlib.sha256(Path(origin).read_bytes()).hexdigest())
    return f"{triton.__version__}" + "-".join(contents)


@contextlib.contextmanager
def patched_triton_key(libtriton: Path):
    """get_cache_key() calls the module global triton_key: swap it for the file's key."""
    from triton.runtime import cache as tc
    key = triton_key_with(libtriton)
    saved = tc.triton_key
    tc.triton_key = lambda: key
    try:
        yield key
    finally:
        tc.triton_key = saved


def fetch_wheel(dest: Path) -> Path:
    """The cp312 triton wheel (pip's cache makes a second call cheap; ~188 MB)."""
    dest.mkdir(parents=True, exist_ok=True)
    tags = ("manylinux_2_27_x86_64", "manylinux_2_28_x86_64")   # the 3.6.0 wheel carries both
    for tag in tags:
        r = subprocess.run([sys.executable, "-m", "pip", "download", f"triton=={TRITON_VERSION}",
                            "--python-version", GPU_PYTHON, "--platform", tag,
                            "--only-binary=:all:", "--no-deps", "-d", str(dest)],
                           capture_output=True, text=True)
        wheels = sorted(dest.glob(f"triton-{TRITON_VERSION}-cp312-*.whl"))
        if r.returncode == 0 and wheels:
            return wheels[0]
    raise RuntimeError(f"pip download of the cp312 triton {TRITON_VERSION} wheel failed:\n"
                       f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def extract_libtriton(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extract("triton/_C/libtriton.so", dest)
    return dest / "triton" / "_C" / "libtriton.so"


def key_files_differ(wheel: Path) -> list[str]:
    """Files in the key besides libtriton whose wheel copy differs from the installed one
    (must be []): the Python files triton_key hashes, the bundled ptxas (backend hash: its
    --version) and libdevice (options hash: its contents; the path in the json is not hashed)."""
    files = [TRITON_DIR / "runtime" / "cache.py", TRITON_DIR / "backends/nvidia/bin/ptxas",
             TRITON_DIR / "backends/nvidia/lib/libdevice.10.bc"]
    for sub in ("compiler", "backends", "language"):
        files += sorted((TRITON_DIR / sub).rglob("*.py"))
    bad = []
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for p in files:
            rel = "triton/" + str(p.relative_to(TRITON_DIR))
            if rel not in names or z.read(rel) != p.read_bytes():
                bad.append(rel)
    return bad


# --------------------------------------------------------------------------- fake driver
class FakeCudaDriver:
    """Active driver for warm-up compiles: what JITFunction.run/create_binder and compile ask
    (current device, stream, target); anything that would load or launch a binary fails."""

    def __init__(self, target: GPUTarget = TARGET):
        self.target = target

    @staticmethod
    def is_active():
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        if device != 0:
            raise ValueError(f"device: the fake driver has only device 0, not {device}")

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=0):
        return divmod(self.target.arch, 10)

    def get_current_target(self):
        return self.target

    def __getattr__(self, name):      # utils (load_binary), launcher_cls, benchmarker ...
        raise RuntimeError(f"fake CUDA driver: {name!r} needs a GPU (warm-up compiles only)")


@contextlib.contextmanager
def warmup_mode():
    """Every `kernel[grid](...)` compiles through the real JIT path for sm_90 and returns
    without launching; the attention planner plans for the GPU (sm_90, 132 SMs)."""
    from triton.runtime import driver as drv
    from triton.runtime.jit import JITFunction

    import kernels
    from kernels import triton_attention as ta

    compiled = []
    run = JITFunction.run

    def warm(self, *args, grid, warmup, **kw):
        k = run(self, *args, grid=grid, warmup=True, **kw)
        compiled.append((self.fn.__name__, k))
        return k

    saved = dict(run=JITFunction.run, usable=kernels._triton_usable, arch=ta._arch,
                 sms=ta._sm_count, name=ta._device_name)
    drv.set_active(FakeCudaDriver())
    JITFunction.run = warm
    kernels._triton_usable = lambda device: True       # CPU tensors into the Triton backend
    ta._arch = lambda device: TARGET.arch
    ta._sm_count = lambda device: GPU_SMS
    ta._device_name = lambda device: GPU_NAME         # read at entry: --gpu-name
    try:
        yield compiled
    finally:
        JITFunction.run = saved["run"]
        kernels._triton_usable = saved["usable"]
        ta._arch, ta._sm_count, ta._device_name = saved["arch"], saved["sms"], saved["name"]
        drv.reset_active() if drv._default is not None else setattr(drv, "_active", None)


# --------------------------------------------------------------------------- launches
def _attn(q_lens, kv_lens, *, hq, hkv, d, bs=16, dtype=torch.bfloat16, window=None,
          softcap=None, splits=None, batch=None):
    """tests/attention_cases.check_paged_attention's kernel call (float64 batch cast to dtype)."""
    import kernels
    from tests.attention_cases import attn_args, cast, make_batch
    b64 = batch if batch is not None else make_batch(
        q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs,
        dtype=torch.float64)
    bl = cast(b64, dtype)
    kernels.paged_attention(*attn_args(bl), max_seqlen_q=bl["max_seqlen_q"],
                            max_seqlen_k=bl["max_seqlen_k"], num_kv_splits=splits,
                            backend="triton", scale=None, sliding_window=window, softcap=softcap)


L3 = dict(hq=32, hkv=8, d=128)
BF16 = torch.bfloat16


def _mixed_batch():
    for bs in (16, 64, 256):
        _attn([300, 513] + [1] * 12 + [4, 7],
              [1300, 513] + [100 + 397 * i for i in range(12)] + [2000, 777], bs=bs, **L3)


def _window_softcap():
    q, kv = [257, 1, 1, 12], [3000, 4096, 100, 700]
    _attn(q, kv, window=1000, **L3)
    _attn(q, kv, softcap=50.0, hq=16, hkv=8, d=256)
    _attn(q, kv, softcap=30.0, window=33, **L3)


def _split_invariance():
    from tests.attention_cases import make_batch
    for chunk in (0, 40):
        q_lens, kv_lens = [1, 1, 5, 16], [65536 + 13, 30000, 40001, 9000]
        if chunk:
            q_lens, kv_lens = q_lens + [chunk], kv_lens + [20000]
        b = make_batch(q_lens, kv_lens, num_q_heads=32, num_kv_heads=8, head_dim=128,
                       dtype=torch.float64)
        for s in (None, 1, 7, 64):
            _attn(None, None, batch=b, splits=s, **L3)


def _int64_addressing():
    import kernels
    from tests.attention_cases import make_batch
    small = make_batch([3, 1, 40], [700, 1500, 40], num_q_heads=16, num_kv_heads=8,
                       head_dim=128, block_size=16, dtype=torch.float64)
    nb, offset = small["k_cache"].shape[0], 131072 + 7
    big = torch.empty(offset + nb, 16, 8, 128, dtype=torch.float16)   # untouched: no RAM
    kernels.paged_attention(small["q"].to(torch.float16), big, big, small["block_table"] + offset,
                            small["cu_seqlens_q"], small["seq_lens"], max_seqlen_q=40,
                            max_seqlen_k=1500, num_kv_splits=4, backend="triton")


def _graph_replay():
    import kernels
    from tests.attention_cases import make_batch
    kw = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.float64)
    a = make_batch([1, 1, 3, 20], [1500, 250, 1040, 60], **kw)
    c = make_batch([10, 1, 13, 1], [30, 2100, 13, 700], **kw)
    kc = torch.cat([a["k_cache"], c["k_cache"]]).to(BF16)
    width = max(a["block_table"].shape[1], c["block_table"].shape[1])
    table = torch.zeros(a["block_table"].shape[0], width, dtype=torch.int32)
    kernels.paged_attention(a["q"].to(BF16), kc, kc.clone(), table, a["cu_seqlens_q"].clone(),
                            a["seq_lens"].clone(), max_seqlen_q=20, max_seqlen_k=2100,
                            backend="triton")


def _write_kv():
    import kernels
    from tests.op_cases import fused_qkv
    for T, hkv, nb in ((1, 8, -(-2 // 16) + 3), (8192, 8, 133120)):
        _, k, v = fused_qkv(T, 2 * hkv, hkv, 128, BF16, "cpu")
        kc = torch.empty(nb, 16, hkv, 128, dtype=BF16)
        kernels.write_kv(k, v, kc, torch.empty_like(kc), torch.zeros(T, dtype=torch.int64),
                         backend="triton")


def _rotary():
    import kernels
    from kernels import reference as ref
    from tests.op_cases import LLAMA3, fused_qkv
    T = 8192
    q, k, v = fused_qkv(T, 32, 8, 128, BF16, "cpu")
    pos = torch.zeros(T, dtype=torch.int64)
    cache = ref.rope_cos_sin_cache(128, 131072, base=500000.0, scaling=LLAMA3)
    kernels.rotary_embedding(pos, q, k, cache, True, backend="triton")          # check_rotary
    # check_rotary_write_kv: the fused op, then rotary + write_kv of the rotated (contiguous) k
    cache = ref.rope_cos_sin_cache(128, 4096, base=500000.0)
    kc = torch.empty(-(-2 * T // 16) + 2, 16, 8, 128, dtype=BF16)
    kernels.rotary_write_kv(pos, q, k, v, cache, kc, torch.empty_like(kc), pos, True,
                            backend="triton")
    _, sk = kernels.rotary_embedding(pos, q, k, cache, True, backend="triton")
    kernels.write_kv(sk, v, kc, torch.empty_like(kc), pos, backend="triton")


def _rms_norm_silu():
    import kernels
    # check_rms_norm / check_silu_and_mul: strided rows 3 and 8 elements into a wider tensor
    x = torch.empty(8192, 4096 + 24, dtype=BF16)[:, 3:4096 + 3]
    kernels.rms_norm(x, torch.empty(4096, dtype=BF16), 1e-6, torch.empty(8192, 4096, dtype=BF16),
                     backend="triton")
    x = torch.empty(8192, 2 * 14336 + 16, dtype=BF16)[:, 8:2 * 14336 + 8]
    kernels.silu_and_mul(x, backend="triton")


def _opcheck():
    from tests.test_triton_ops import _op_cases
    for op, args in _op_cases("cpu", BF16):
        op(*args)


@contextlib.contextmanager
def _empty_linear():
    """F.linear returns an uninitialised [.., out] tensor: the layout of the real result (the
    kernels see the same shapes and strides), without the CPU GEMMs of full-size layers."""
    import torch.nn.functional as F
    linear = F.linear
    F.linear = lambda x, w, b=None: torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype)
    try:
        yield
    finally:
        F.linear = linear


def _model_hf_llama3():
    # test_bf16_gpu_matches_hf[llama3]: the tiny HF llama3 model, our two ragged steps
    from model.loader import load_model
    from tests.hf_models import make_hf_model
    from tests.test_model import SEQS, random_tokens, run_two_steps
    with tempfile.TemporaryDirectory() as d:
        path = make_hf_model("llama3", Path(d) / "llama3", tokenizer=False,
                             tie_word_embeddings=False)
        m = load_model(path, dtype=BF16, device="cpu", backend="triton")
        run_two_steps(m, random_tokens(SEQS, m.config.vocab_size), SEQS, "cpu")


def _model_llama3_8b_decode():
    # test_preset_decode_step_gpu_no_host_sync[llama3-8b]: the full-size preset with 2 of its
    # 32 layers (every layer launches the same kernels; the second one is the first whose
    # input norm adds a residual), weights left empty, GEMMs skipped (_empty_linear)
    import dataclasses
    from model.config import ModelConfig
    from model.llama import LlamaForCausalLM
    from tests.test_model import BLOCK, block_tables, make_step, random_tokens
    cfg = dataclasses.replace(ModelConfig.preset("llama3-8b"), num_hidden_layers=2)
    m = LlamaForCausalLM(cfg, dtype=BF16, device="cpu", backend="triton").eval()
    seqs = [(100, 101)] * 64 + [(0, 37)]
    tokens = random_tokens(seqs, cfg.vocab_size)
    gen = torch.Generator().manual_seed(0)
    tables, nb = block_tables([n for _, n in seqs], gen)
    kv = m.allocate_kv_cache(nb, BLOCK)
    with torch.no_grad(), _empty_linear():
        for chunks in ([(0, n) for _, n in seqs], seqs):      # fill the contexts, then decode
            step = make_step(tokens, chunks, tables, nb, gen, "cpu")
            m(*step, kv, (step[2].cu_seqlens_q[1:] - 1).long())


# (label, what it mirrors in bench/first_light_triton.txt, the launches)
LAUNCHES = [
    ("attn-mixed-batch", "test_gpu_llama3_8b_mixed_batch[16/64/256-dtype1]", _mixed_batch),
    ("attn-window-softcap", "test_gpu_window_and_softcap[dtype1]", _window_softcap),
    ("attn-split-invariance", "test_gpu_long_context_split_invariance[dtype1-0/40]",
     _split_invariance),
    ("attn-int64", "test_gpu_int64_addressing_high_block_ids[4]", _int64_addressing),
    ("attn-graph-replay", "test_gpu_cuda_graph_replay_with_new_metadata", _graph_replay),
    ("attn-fp32", "test_gpu_fp32_ieee[128]",
     lambda: _attn([40, 1, 5], [700, 1500, 5], hq=8, hkv=2, d=128, dtype=torch.float32)),
    ("write-kv", "test_write_kv_gpu_shapes[1-8-128-16-dtype1], *_int64_addressing", _write_kv),
    ("rotary", "test_rotary_gpu[8192-...-True-dtype1], test_rotary_write_kv_fused_gpu[8192-...]",
     _rotary),
    ("rms-norm-silu", "test_rms_norm_gpu[shape0-True-dtype1], test_silu_and_mul_gpu[shape0-dtype1]",
     _rms_norm_silu),
    ("opcheck", "test_opcheck_gpu[dtype1] (each op once)", _opcheck),
    ("model-hf-llama3", "test_bf16_gpu_matches_hf[llama3]", _model_hf_llama3),
    ("model-llama3-8b", "test_preset_decode_step_gpu_no_host_sync[llama3-8b]",
     _model_llama3_8b_decode),
]


# --------------------------------------------------------------------------- build
def cache_entries(d: Path) -> set[str]:
    """Compiled kernels in a cache dir: one `__grp__*.json` group file each."""
    return {p.parent.name for p in d.glob("*/__grp__*.json")}


def dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def warm(fns, cache_dir: Path, libtriton: Path, log=print) -> int:
    """Run each launch function of ``fns`` [(label, note, fn)] in warm-up mode, compiling into
    ``cache_dir`` with triton_key taken from ``libtriton`` -> new cache entries."""
    from triton import knobs
    from triton._C.libtriton import get_cache_invalidating_env_vars

    if knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET is set: unset it before triton is imported")
    cache_dir.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_STORE_BINARY_ONLY")}
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"
    try:
        if Path(knobs.cache.dir) != cache_dir or not knobs.compilation.store_binary_only:
            raise RuntimeError(f"triton knobs did not take the environment: {knobs.cache.dir}")
        log(f"cache-invalidating env vars set (in the key; the GPU run must match): "
            f"{get_cache_invalidating_env_vars()}")
        before = cache_entries(cache_dir)
        with patched_triton_key(libtriton) as key, warmup_mode() as compiled:
            digest = hashlib.sha256(key.encode()).hexdigest()[:12]
            log(f"triton_key from {libtriton} (sha256 {digest})")
            for label, note, fn in fns:
                t0, n0 = time.time(), len(cache_entries(cache_dir))
                fn()
                log(f"  {label:<22} {len(cache_entries(cache_dir)) - n0:>3} new kernels, "
                    f"{len(compiled):>3} launches so far, {time.time() - t0:6.1f}s  ({note})")
        return len(cache_entries(cache_dir) - before)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def main(argv=None) -> int:
    global GPU_NAME
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".triton_cache", help="copy of the cache to carry")
    ap.add_argument("--libtriton", type=Path, default=None,
                    help="libtriton.so to key with (default: the cp312 wheel's, downloaded)")
    ap.add_argument("--wheel-dir", type=Path,
                    default=Path(tempfile.gettempdir()) / "ragged-triton-wheel")
    ap.add_argument("--only", default="", help="substring filter on the launch group label")
    ap.add_argument("--cache-dir", type=Path, default=CACHE_DIR,
                    help="for checks only: the carried cache must be built at " + str(CACHE_DIR))
    ap.add_argument("--gpu-name", default=GPU_NAME,
                    help="the card's torch name: keys kernels/tuned_attention.json if present")
    ap.add_argument("--keep", action="store_true",
                    help="reuse CACHE_DIR as it is (report new entries = this run's misses)")
    a = ap.parse_args(argv)
    t0 = time.time()
    lib = a.libtriton
    if lib is None:
        wheel = fetch_wheel(a.wheel_dir)
        bad = key_files_differ(wheel)
        if bad:
            raise RuntimeError(f"files in the cache key differ between the cp312 wheel and "
                               f"this install: {bad[:5]}")
        lib = extract_libtriton(wheel, a.wheel_dir)
        print(f"cp312 libtriton from {wheel.name} ({time.time() - t0:.0f}s); the other files "
              f"in the key (Python, ptxas, libdevice) match this install's")
    GPU_NAME = a.gpu_name
    cache = a.cache_dir.resolve()
    if cache.exists() and not a.keep:
        shutil.rmtree(cache)
    new = warm([x for x in LAUNCHES if a.only in x[0]], cache, lib.resolve(),
               log=lambda m: print(m, flush=True))
    total = cache_entries(cache)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(cache, out)
    size = dir_size(out)
    print(f"{new} new kernels compiled, {len(total)} cached, {size / 2**20:.1f} MiB in {out} "
          f"(from {cache}), {time.time() - t0:.0f}s; carry it with carry=[\"{a.out}\"]")
    if size > 48 * 2**20:     # the device tool carries 64 MiB for the whole tree
        print("WARNING: over 48 MiB: the carry limit is 64 MiB for the whole tree")
    return 0


if __name__ == "__main__":
    if "TRITON_INTERPRET" in os.environ:     # only kernels/ modules imported later see it
        sys.exit("bench.triton_cache: unset TRITON_INTERPRET (real compiles)")
    sys.exit(main())
