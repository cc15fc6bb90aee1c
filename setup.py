"""ragged-kernels: Triton + CUDA C++ kernels and a continuous-batching runtime.

The CUDA extension (kernels._C, from csrc/) is built when a CUDA toolkit and a CUDA build of
torch are present; otherwise pure Python is installed with a one-line notice. Install with
``pip install -e . --no-build-isolation`` (the build needs the installed torch).

Environment switches:
  RAGGED_SKIP_CUDA_BUILD=1   install pure Python even where CUDA could build
  TORCH_CUDA_ARCH_LIST       target archs (default "8.0;9.0a": A100 and H100/H200)
  MAX_JOBS                   parallel nvcc/g++ jobs (ninja)
"""
import os
import sys

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["kernels", "kernels.*", "ragged", "ragged.*", "model",
                                  "model.*", "bench", "bench.*"])
# Kernels stay torch-free in .cu files (fast nvcc); torch glue lives in one host-compiled file.
CUDA_SOURCES = [
    "csrc/bindings.cpp",          # g++: TORCH_LIBRARY(ragged) schemas + CUDA impls
    "csrc/paged_attention.cu",    # nvcc, torch-free
    "csrc/write_kv.cu",
    "csrc/rms_norm.cu",
    "csrc/rotary.cu",
    "csrc/silu_mul.cu",
]


def notice(msg):
    print(f"ragged-kernels: {msg}; installing pure Python (Triton and torch backends only).",
          file=sys.stderr)


def cuda_extension():
    if os.environ.get("RAGGED_SKIP_CUDA_BUILD") == "1":
        return notice("RAGGED_SKIP_CUDA_BUILD=1")
    if not CUDA_SOURCES:
        return notice("no csrc/ sources yet")
    # torch derives CUDA_HOME from the nvcc on PATH; where that is a /usr/local/bin shim its
    # guess (/usr/local) has no CUDA headers, so prefer the toolkit's own directory.
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return notice("torch is not installed")
    if torch.version.cuda is None or CUDA_HOME is None:
        return notice("no CUDA toolkit or CPU-only torch")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    # torch's CUDA headers may include cusparse.h & co., shipped in the nvidia wheel rather
    # than the toolkit: searched after every other directory so the toolkit's headers win.
    cxx = ["-O3", "-std=c++17"]
    try:
        import nvidia
        for root in nvidia.__path__:
            inc = os.path.join(root, "cu" + torch.version.cuda.split(".")[0], "include")
            if os.path.isdir(inc):
                cxx += ["-idirafter", inc]
    except ImportError:
        pass
    # No --use_fast_math: the kernels call expf/tanhf/rsqrtf where accuracy matters.
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    ext = CUDAExtension("kernels._C", CUDA_SOURCES, include_dirs=[os.path.abspath("csrc")],
                        extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


built = cuda_extension()
setup(
    name="ragged-kernels",
    version="0.1.0",
    description="Triton and CUDA kernels for ragged paged attention, and a continuous-batching runtime",
    packages=PACKAGES,
    # the offline-tuned Triton tiles, if any; the presets' tokenizer's training text
    package_data={"kernels": ["tuned_attention.json"], "model": ["tokenizer_corpus.txt"]},
    python_requires=">=3.10",
    ext_modules=built[0] if built else [],
    cmdclass=built[1] if built else {},
)
