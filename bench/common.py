"""Shared benchmark plumbing: run metadata (device, versions, commit, command line), timing
(median after warm-up), the device's measured copy bandwidth, and JSON output."""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"   # committed runs: results/<device>/
# Where a run writes by default: ignored by git (.gitignore), so a run leaves `git status`
# clean; a result worth keeping is rerun with --out bench/results/<device> and committed.
RUNS = Path(__file__).resolve().parent.parent / "runs"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def command_line() -> str:
    """The command that reproduces this run: `python -m bench.e2e ...` when run as a module
    (sys.argv[0] is then the file's path, which fails as a script with a relative-import
    error), the script otherwise."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
    return shlex.join(head + sys.argv[1:])


def load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def run_info(device) -> dict:
    """Everything a reader needs to reproduce a result."""
    info = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "command": command_line(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["sm_count"] = p.multi_processor_count
        info["memory_gib"] = round(p.total_memory / 2**30, 1)
        info["driver_cuda"] = torch.version.cuda
    return info


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_median(fn, device, warmup: int = 5, iters: int = 20) -> float:
    """Median wall time of fn() in seconds, after warm-up. On CUDA, timed with events per
    iteration (each call is complete before its end event is read)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if torch.device(device).type == "cuda":
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + bytes written):
    the roofline every memory-bound kernel is compared with."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 27)
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_median(lambda: dst.copy_(src), device, warmup=3, iters=10 if device.type == "cuda" else 3)
    return 2 * src.numel() * src.element_size() / t


def write_json(name: str, payload: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """Write payload to <out_dir or runs/>/<name>.json and return the path."""
    out = Path(out_dir) if out_dir else RUNS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
