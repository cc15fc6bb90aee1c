"""bench/triton_cache.py without the network: the triton_key substitution, the fake sm_90
driver, and one tiny kernel through the real JIT path (a child process: the real compiler needs
TRITON_INTERPRET unset, which this pytest process has set on CPU machines).

Not here (network + minutes): the cp312 wheel download and the full build, run by hand:
    python -m bench.triton_cache            # bench/NOTES.md, "Carried Triton cache"
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from triton.backends.compiler import GPUTarget

from bench import triton_cache as tc

ROOT = Path(__file__).resolve().parents[1]
LIBTRITON = tc.TRITON_DIR / "_C" / "libtriton.so"


def test_key_with_installed_libtriton_is_upstreams():
    # the reimplemented file list must be upstream's, or a substituted key is wrong everywhere
    from triton.runtime.cache import triton_key
    assert tc.triton_key_with(LIBTRITON) == triton_key()


def test_key_follows_the_libtriton_file(tmp_path):
    other = tmp_path / "libtriton.so"
    other.write_bytes(b"not the installed library")
    a, b = tc.triton_key_with(LIBTRITON), tc.triton_key_with(other)
    pa, pb = a.split("-"), b.split("-")
    assert len(pa) == len(pb) and sum(x != y for x, y in zip(pa, pb)) == 1   # only the lib's hash
    from triton.runtime import cache
    before = cache.triton_key
    with tc.patched_triton_key(other) as key:
        assert key == b and cache.triton_key() == b
    assert cache.triton_key is before


def test_fake_driver_is_sm90_and_refuses_to_launch():
    d = tc.FakeCudaDriver()
    assert d.get_current_target() == GPUTarget("cuda", 90, 32)
    assert d.get_device_capability(0) == (9, 0)
    assert d.get_current_device() == 0 and d.get_current_stream(0) == 0
    with pytest.raises(RuntimeError, match="needs a GPU"):
        d.utils.load_binary
    with pytest.raises(ValueError, match="device"):
        d.set_current_device(1)


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    import triton
    import triton.language as tl
    from bench import triton_cache as tc

    @triton.jit
    def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    def launch():
        x = torch.empty(1000, dtype=torch.bfloat16)
        _copy[(8,)](x, torch.empty_like(x), 1000, BLOCK=128, num_warps=4)

    cache = Path(sys.argv[1])
    for lib in sys.argv[2:]:
        _copy.device_caches.clear()              # forget the in-memory kernel: files only
        print("NEW", tc.warm([("copy", "test", launch)], cache, Path(lib), log=lambda m: None))
""")


def _child(tmp_path, cache, *libs):
    """New cache entries of each warm-up of a tiny kernel, one per libtriton, in one process."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, str(script), str(cache), *map(str, libs)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("NEW")]


def test_jit_warmup_fills_the_cache_and_hits_it_in_a_fresh_process(tmp_path):
    cache = tmp_path / "cache"
    other = tmp_path / "libtriton.so"
    other.write_bytes(b"stands in for the cp312 libtriton")
    # compiled (not launched: the fake driver refuses), then a file-cache hit once the
    # in-memory kernel is forgotten, then another key for another libtriton
    assert _child(tmp_path, cache, other, other, LIBTRITON) == [1, 0, 1]
    entry = next(d for d in cache.iterdir()
                 if json.loads((d / "_copy.json").read_text())["triton_version"])
    names = sorted(p.name for p in entry.iterdir())
    assert names == ["__grp___copy.json", "_copy.cubin", "_copy.json", "_copy.source"]  # no IRs
    meta = json.loads((entry / "_copy.json").read_text())
    assert meta["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}
    assert meta["num_warps"] == 4
    grp = json.loads((entry / "__grp___copy.json").read_text())
    assert all(p.startswith(str(cache)) for p in grp["child_paths"].values())  # absolute paths
    assert _child(tmp_path, cache, other) == [0]                # a fresh process hits too
