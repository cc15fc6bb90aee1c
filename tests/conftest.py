"""Test setup: Triton's CPU interpreter, the `gpu` and `interpreter` markers, hypothesis profiles.

TRITON_INTERPRET must be set before triton is first imported; nothing in kernels/ imports
triton at import time, so setting it here (conftest runs before test modules) is enough.

The interpreter is chosen when triton is imported, for the whole process. So on a machine
with a GPU (where TRITON_INTERPRET stays unset and the `gpu` tests run compiled Triton),
the `interpreter`-marked tests (Triton kernels on CPU tensors) are taken out of this process
and run as one item in a child pytest with TRITON_INTERPRET=1: plain `python -m pytest -q`
runs every test there too. RAGGED_INTERPRETER_SUBPROCESS=1 forces that split on a CPU
machine (to test the mechanism), =0 keeps everything in-process.

Hypothesis: profile "ci" (the default, also when CI is set) draws the same examples on every
run (derandomize=True, no example database); HYPOTHESIS_PROFILE=dev draws fresh random
examples, 10x as many, for a longer local search.
"""
import os
import subprocess
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

CI_EXAMPLES = 80
settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, database=None,
                          deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=10 * CI_EXAMPLES, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _split_interpreter_tests() -> bool:
    forced = os.environ.get("RAGGED_INTERPRETER_SUBPROCESS")
    if forced is not None:
        return forced == "1"
    return HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1"


class InterpreterRun(pytest.Item):
    """The interpreter tests of this session, run by a child pytest with TRITON_INTERPRET=1."""

    def __init__(self, *, nodeids, **kw):
        super().__init__(**kw)
        self.nodeids = nodeids

    def runtest(self):
        env = dict(os.environ, TRITON_INTERPRET="1", RAGGED_INTERPRETER_SUBPROCESS="0")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *self.nodeids]
        r = subprocess.run(cmd, cwd=self.config.rootpath, env=env, capture_output=True,
                           text=True)
        lines = r.stdout.strip().splitlines()
        self.config._ragged_interpreter_summary = lines[-1] if lines else "(no output)"
        if r.returncode != 0:
            raise InterpreterFailure(f"TRITON_INTERPRET=1 child pytest of {len(self.nodeids)} "
                                     f"tests failed (rc {r.returncode}):\n"
                                     f"{r.stdout[-20000:]}\n{r.stderr[-5000:]}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, InterpreterFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{len(self.nodeids)} interpreter tests (TRITON_INTERPRET=1 child)"


class InterpreterFailure(Exception):
    pass


@pytest.hookimpl(trylast=True)       # after -k / -m deselection: the child gets what is left
def pytest_collection_modifyitems(config, items):
    if not HAS_CUDA:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if not _split_interpreter_tests():
        return
    moved = [i for i in items if "interpreter" in i.keywords and "gpu" not in i.keywords]
    if not moved:
        return
    config.hook.pytest_deselected(items=moved)
    keep = [i for i in items if not ("interpreter" in i.keywords and "gpu" not in i.keywords)]
    keep.append(InterpreterRun.from_parent(moved[0].session, name="triton_interpreter_tests",
                                           nodeids=[i.nodeid for i in moved]))
    items[:] = keep


def pytest_terminal_summary(terminalreporter, config):
    summary = getattr(config, "_ragged_interpreter_summary", None)
    if summary:
        terminalreporter.write_line(f"interpreter tests (TRITON_INTERPRET=1 child pytest): {summary}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
