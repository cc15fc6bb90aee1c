"""The csrc/ kernels run on CPU tensors through the emulation in emu.h (for CPU tests).

build() compiles the kernels' own source with g++ into a ctypes library; the functions below
call it on contiguous-or-strided CPU tensors like the CUDA ops do (outputs start as NaN, so
an element the kernel forgets shows). `vectorized` picks the 16-byte path the bindings pick
for aligned tensors, or the scalar one.

The .cu sources are rewritten textually: `extern __shared__ T name[];` becomes a pointer to the
emulated dynamic shared memory, and `kernel<<<grid, block, smem, stream>>>(p)` a call of
emu_launch (every kernel takes its one params struct). Cached by source hash under build/.
"""
from __future__ import annotations

import functools

import ctypes
import hashlib
import os
import pathlib
import re
import shutil
import subprocess

CSRC = pathlib.Path(__file__).resolve().parent.parent
UNITS = ("paged_attention", "write_kv", "rms_norm", "rotary", "silu_mul")


def _rewrite(text: str) -> str:
    text = re.sub(r"extern __shared__ (\w+) (\w+)\[\];",
                  r"\1* \2 = reinterpret_cast<\1*>(emu_dyn_smem);", text)
    return re.sub(r"(\w+(?:<[^<>]*>)?)<<<(.*?)>>>\((\w*)\)", r"emu_launch(\1, \2, \3)", text,
                  flags=re.S)


def cuda_include() -> str | None:
    """A directory with cuda_fp16.h/cuda_bf16.h (host-usable): the toolkit's or the wheel's."""
    dirs = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")]
    try:
        import nvidia
        dirs += [os.path.join(p, "cu13", "include") for p in nvidia.__path__]
    except ImportError:
        pass
    return next((d for d in dirs if os.path.exists(os.path.join(d, "cuda_fp16.h"))), None)


def available() -> bool:
    return shutil.which("g++") is not None and cuda_include() is not None


@functools.lru_cache(maxsize=None)
def build(arch: int = 80) -> ctypes.CDLL:
    if arch not in (80, 90):
        raise ValueError(f"arch must be 80 or 90, got {arch}")
    files = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h"))
    files += [CSRC / "emu" / "emu.h", CSRC / "emu" / "shim.cpp", pathlib.Path(__file__)]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    tag = "emu" if arch == 80 else "emu90"
    out = CSRC.parent / "build" / f"{tag}-{digest}"
    lib = out / "libragged_emu.so"
    if not lib.exists():
        for stale in out.parent.glob(f"{tag}-*"):     # builds of older sources
            shutil.rmtree(stale, ignore_errors=True)
        src = out / "src"
        src.mkdir(parents=True, exist_ok=True)
        for f in files[:-3]:
            (src / f.name).write_text(_rewrite(f.read_text()))
        tus = []
        for unit in UNITS:
            tu = out / f"tu_{unit}.cpp"
            tu.write_text(f'#include "emu.h"\n#include "src/{unit}.cu"\n')
            tus.append(str(tu))
        shutil.copy(CSRC / "emu" / "emu.h", out / "emu.h")
        shutil.copy(CSRC / "emu" / "shim.cpp", out / "shim.cpp")
        tmp = out / "lib.tmp.so"
        defs = ["-DRAGGED_EMU_SM90=1"] if arch == 90 else []
        subprocess.run(["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", *defs,
                        f"-I{cuda_include()}", f"-I{out}", *tus, str(out / "shim.cpp"), "-o",
                        str(tmp)], check=True, capture_output=True, text=True)
        tmp.rename(lib)
    return ctypes.CDLL(str(lib))


_DT = {"torch.float16": 0, "torch.bfloat16": 1, "torch.float32": 2}
_P, _I, _i, _f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGS = {"emu_paged_attention": [_i, _P, _I, _I, _P, _I, _I, _P, _P, _P, _I, _P, _P, _P, _P]
         + [_i] * 9 + [_f, _f],
         "emu_paged_attention_fp8": [_i, _P, _I, _I, _P, _I, _I, _P, _P, _P, _I, _P, _P, _P, _P]
         + [_i] * 9 + [_f, _f, _i, _P, _P, _f, _f],
         "emu_write_kv": [_i, _P, _I, _I, _P, _I, _I, _P, _P, _P, _I, _I, _i, _i, _i, _i],
         "emu_write_kv_fp8": [_i, _P, _I, _I, _P, _I, _I, _P, _P, _P, _I, _I, _i, _i, _i,
                              _P, _P, _f, _f],
         "emu_rms_norm": [_i, _i, _P, _P, _P, _I, _P, _I, _P, _I, _i, _f, _i],
         "emu_rotary": [_i, _P, _P, _I, _I, _P, _I, _I, _P, _P, _P, _I] + [_i] * 7,
         "emu_silu": [_i, _P, _P, _I, _I, _i, _i],
         "emu_mma_test": [_i, _i, _P, _P, _P, _P],
         "emu_wgmma_test": [_i, _i, _i, _P, _P, _P, _P],
         "emu_shfl_test": [_i, _P],
         "emu_cp_async_test": [_P, _P]}


def _call(name, *args, arch=80):
    fn = getattr(build(arch), name)
    fn.argtypes = _SIGS[name]
    rc = fn(*args)
    if rc != 0:
        msg = build(arch).emu_last_message
        msg.restype = ctypes.c_char_p
        raise RuntimeError(f"{name}: cudaError {rc} {msg().decode()}")


def _nan(shape, dtype):
    import torch
    return torch.full(shape, float("nan"), dtype=dtype)


def paged_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *, scale,
                    max_seqlen_q, num_kv_splits=1, sliding_window=None, softcap=None, out=None,
                    k_scale=None, v_scale=None, arch=80):
    """fp8 (float8_e4m3fn) caches take k_scale/v_scale: float32 [num_blocks, block_size,
    Hkv] tensors (per slot) or floats (per tensor). arch 90: the sm_90a build (wgmma tile)."""
    import torch
    T, Hq, D = q.shape
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    per_slot = isinstance(k_scale, torch.Tensor)
    out = _nan(q.shape, q.dtype) if out is None else out
    S = num_kv_splits
    po, pl = _nan((S, T, Hq, D), torch.float32), _nan((S, T, Hq), torch.float32)
    _call("emu_paged_attention_fp8", _DT[str(q.dtype)], out.data_ptr(), out.stride(0),
          out.stride(1), q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(),
          v_cache.data_ptr(), block_table.data_ptr(), block_table.stride(0),
          cu_seqlens_q.data_ptr(), seq_lens.data_ptr(), po.data_ptr(), pl.data_ptr(),
          seq_lens.shape[0], T, Hq, k_cache.shape[2], D, k_cache.shape[1], max_seqlen_q, S,
          sliding_window or 0, scale, softcap or 0.0, int(fp8),
          k_scale.data_ptr() if fp8 and per_slot else None,
          v_scale.data_ptr() if fp8 and per_slot else None,
          float(k_scale) if fp8 and not per_slot else 1.0,
          float(v_scale) if fp8 and not per_slot else 1.0, arch=arch)
    return out


def mma_test(a, b, c, mode):
    """D = A B + C through the emulated ldmatrix + mma.sync (csrc/emu/shim.cpp, one warp):
    mode 0: a = A [16, 16], b = B [16, 8]; 1: b = B^T [8, 16]; 2: a = A^T [16, 16]."""
    import torch
    d = _nan((16, 8), torch.float32)
    a, b, c = a.contiguous(), b.contiguous(), c.contiguous()  # kept alive over the call
    _call("emu_mma_test", _DT[str(a.dtype)], mode, a.data_ptr(), b.data_ptr(), c.data_ptr(),
          d.data_ptr())
    return d


def wgmma_test(a, b, c, n, mode, mutate=0):
    """D = A B + C through one emulated wgmma.mma_async.m64nNk16 (shim.cpp, one warpgroup):
    a = A [64, 16], b = B [16, n] (n 32/64/128), c = C [64, n] fp32; operands copied into
    128B-swizzled shared memory by the test kernel. mode 0: A and B from shared memory, B
    K-major; 1: A from registers, B N-major (transpose bit); 2: A from shared memory, B
    N-major. mutate 1: no wgmma.fence; 2: read D before wait_group (returns the NaN it sees);
    3: overwrite B's shared memory before the wait; 4: one thread skips fence.proxy.async
    after its shared-memory stores; 5 (RS): one thread writes an A register before the wait;
    6: one thread writes an accumulator before the wait."""
    import torch
    d = _nan((64, n), torch.float32)
    a, b, c = a.contiguous(), b.contiguous(), c.contiguous()
    _call("emu_wgmma_test", _DT[str(a.dtype)], n, mode | mutate << 4, a.data_ptr(), b.data_ptr(),
          c.data_ptr(), d.data_ptr(), arch=90)
    return d


def wgmma_ops(arch=90) -> int:
    """warpgroup wgmma.mma_async operations the emulator has run since it loaded."""
    fn = build(arch).emu_wgmma_ops
    fn.restype = ctypes.c_ulonglong
    return int(fn())


def last_dyn_smem(arch=80) -> int:
    """Dynamic shared memory bytes of the last kernel launch (the host launcher's sizing)."""
    fn = build(arch).emu_last_smem
    fn.restype = ctypes.c_ulonglong
    return int(fn())


def mma_ops(arch=80) -> int:
    """mma.sync calls (one per thread of a warp) the emulator has run since it loaded."""
    fn = build(arch).emu_mma_ops
    fn.restype = ctypes.c_ulonglong
    return int(fn())


def shfl_test(mode):
    """One warp shuffles (shim.cpp): 0 full warp, 1 a lane exited, 2 half warp with its mask,
    3 a source lane outside the mask. Returns the 32 results (NaN where none written)."""
    import torch
    out = _nan((32,), torch.float32)
    _call("emu_shfl_test", mode, out.data_ptr())
    return out


def cp_async_test():
    """Three committed cp.async groups + one uncommitted copy (copy i holds i + 1), read after
    wait_group 2, 1, 0 (shim.cpp): [3, 4] of what each copy's destination then held."""
    import torch
    src = torch.arange(1, 5, dtype=torch.float32).repeat_interleave(4)
    out = _nan((12,), torch.float32)
    _call("emu_cp_async_test", src.data_ptr(), out.data_ptr())
    return out.view(3, 4)


def write_kv(key, value, k_cache, v_cache, slot_mapping, vectorized):
    _call("emu_write_kv", _DT[str(key.dtype)], key.data_ptr(), key.stride(0), key.stride(1),
          value.data_ptr(), value.stride(0), value.stride(1), k_cache.data_ptr(),
          v_cache.data_ptr(), slot_mapping.data_ptr(), slot_mapping.stride(0),
          k_cache.shape[0] * k_cache.shape[1], key.shape[0], key.shape[1], key.shape[2],
          int(vectorized))


def write_kv_fp8(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    """fp8 caches (float8_e4m3fn); k_scale/v_scale: float32 [num_blocks, block_size, Hkv]
    tensors (per slot) or floats (per tensor)."""
    import torch
    per_slot = isinstance(k_scale, torch.Tensor)
    _call("emu_write_kv_fp8", _DT[str(key.dtype)], key.data_ptr(), key.stride(0),
          key.stride(1), value.data_ptr(), value.stride(0), value.stride(1),
          k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
          slot_mapping.stride(0), k_cache.shape[0] * k_cache.shape[1], key.shape[0],
          key.shape[1], key.shape[2], k_scale.data_ptr() if per_slot else None,
          v_scale.data_ptr() if per_slot else None, 1.0 if per_slot else float(k_scale),
          1.0 if per_slot else float(v_scale))


def rms_norm(x, weight, eps, residual, vectorized):
    """x, residual: [rows, H] with contiguous rows (any row stride)."""
    rows, H = x.shape
    out, res_out = _nan(x.shape, x.dtype), _nan(x.shape, x.dtype)
    _call("emu_rms_norm", _DT[str(x.dtype)], int(weight.dtype != x.dtype), out.data_ptr(),
          res_out.data_ptr() if residual is not None else None, x.data_ptr(), x.stride(0),
          residual.data_ptr() if residual is not None else None,
          residual.stride(0) if residual is not None else 0, weight.data_ptr(), rows, H, eps,
          int(vectorized))
    return out if residual is None else (out, res_out)


def rotary_embedding(positions, q, k, cos_sin_cache, is_neox, vectorized):
    qo, ko = _nan(q.shape, q.dtype), _nan(k.shape, k.dtype)
    T, Hq, D = q.shape
    _call("emu_rotary", _DT[str(q.dtype)], positions.data_ptr(), q.data_ptr(), q.stride(0),
          q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), qo.data_ptr(), ko.data_ptr(),
          cos_sin_cache.data_ptr(), cos_sin_cache.shape[0], T, Hq, k.shape[1], D,
          cos_sin_cache.shape[1], int(is_neox), int(vectorized))
    return qo, ko


def silu_and_mul(x, vectorized):
    """x: [rows, 2I] with contiguous rows."""
    out = _nan((x.shape[0], x.shape[1] // 2), x.dtype)
    _call("emu_silu", _DT[str(x.dtype)], out.data_ptr(), x.data_ptr(), x.stride(0), x.shape[0],
          x.shape[1] // 2, int(vectorized))
    return out
