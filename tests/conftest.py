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
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
