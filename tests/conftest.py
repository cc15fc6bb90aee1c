"""Test setup: Triton's CPU interpreter on machines without CUDA, and the `gpu` marker.

TRITON_INTERPRET must be set before triton is first imported; nothing in kernels/ imports
triton at import time, so setting it here (conftest runs before test modules) is enough.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") == "1":
            return
        # The interpreter is chosen when triton is imported, for the whole process: with a GPU
        # and no TRITON_INTERPRET, Triton cannot run the CPU-tensor tests. Run them on a CPU
        # machine, or here with TRITON_INTERPRET=1 -m "not gpu".
        skip = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
        for item in items:
            if "gpu" not in item.keywords and "triton" in item.nodeid.lower():
                item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
