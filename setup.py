"""ragged-kernels: Triton + CUDA C++ kernels and a continuous-batching runtime.

The CUDA extension (kernels._C, from csrc/) is built when a CUDA toolkit and a CUDA build of
torch are present; otherwise pure Python is installed with a one-line notice. Install with
``pip install -e . --no-build-isolation`` (the build needs the installed torch).

Object files persist in build/ninja/ between installs (ninja recompiles only what changed), and
the build prints one line: archs, time, objects compiled and reused.

Environment switches:
  RAGGED_SKIP_CUDA_BUILD=1   install pure Python even where CUDA could build
  TORCH_CUDA_ARCH_LIST       target archs (default "8.0;9.0a": A100 and H100/H200)
  MAX_JOBS                   parallel nvcc/g++ jobs (ninja)
"""
import os
import sys
import time

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Object files live here between installs: setuptools' editable installs build in a fresh
# temporary directory each time, which made every `pip install -e .` recompile all of csrc/
# (~1 minute on 2 cores) even when nothing changed; here ninja reuses what is up to date.
BUILD_TEMP = os.path.join(ROOT, "build", "ninja")

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


def arch_names(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0a", "8.0 9.0+PTX") -> "sm_80, sm_90a"."""
    names = []
    for a in arch_list.replace(";", " ").split():
        a = a.replace("+PTX", "")
        names.append("sm_" + a.replace(".", ""))
    return ", ".join(names)


def summary_line(arch_list: str, seconds: float, compiled: int, total: int) -> str:
    reused = total - compiled
    return (f"ragged-kernels: built kernels._C for {arch_names(arch_list)} in {seconds:.1f} s "
            f"({compiled} of {total} objects compiled, {reused} reused by ninja from "
            f"{os.path.relpath(BUILD_TEMP, ROOT)}/)")


def announce(line: str) -> None:
    """pip captures a build's output and shows it only with -v: print the line there (and to
    the terminal when there is one, so a plain `pip install -e .` shows it too)."""
    print(line, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line + "\n")
    except OSError:
        pass


def objects(root: str) -> dict[str, float]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".o"):
                out[os.path.join(d, f)] = os.path.getmtime(os.path.join(d, f))
    return out


def build_command(base):
    """BuildExtension with ninja, a persistent build directory and a one-line summary."""
    class BuildKernels(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = BUILD_TEMP

        def build_extensions(self):
            before = objects(self.build_temp)
            t0 = time.time()
            super().build_extensions()
            after = objects(self.build_temp)
            compiled = sum(1 for f, m in after.items() if before.get(f) != m)
            announce(summary_line(os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
                                  time.time() - t0, compiled, len(after)))
    return BuildKernels


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
    return [ext], {"build_ext": build_command(BuildExtension.with_options(use_ninja=True))}


if __name__ == "__main__":          # (setuptools runs setup.py as __main__; tests import it)
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
