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
CUDA_SOURCES = []  # filled by csrc/ (issue: CUDA C++ kernels)


def notice(msg):
    print(f"ragged-kernels: {msg}; installing pure Python (Triton and torch backends only).",
          file=sys.stderr)


def cuda_extension():
    if os.environ.get("RAGGED_SKIP_CUDA_BUILD") == "1":
        return notice("RAGGED_SKIP_CUDA_BUILD=1")
    if not CUDA_SOURCES:
        return notice("no csrc/ sources yet")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return notice("torch is not installed")
    if torch.version.cuda is None or CUDA_HOME is None:
        return notice("no CUDA toolkit or CPU-only torch")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    ext = CUDAExtension("kernels._C", CUDA_SOURCES)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


built = cuda_extension()
setup(
    name="ragged-kernels",
    version="0.1.0",
    description="Triton and CUDA kernels for ragged paged attention, and a continuous-batching runtime",
    packages=PACKAGES,
    python_requires=">=3.10",
    ext_modules=built[0] if built else [],
    cmdclass=built[1] if built else {},
)
