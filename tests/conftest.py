"""Test session setup: poisoned outputs, Triton's interpreter on machines without a GPU, and the
``gpu`` marker. Both variables are set before any kernel module is imported, because Triton
decides at ``@triton.jit`` time whether a kernel is interpreted."""

import os

import pytest

os.environ.setdefault("SCANOPT_POISON", "1")

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # the reference tests run without torch
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """'cuda' on a GPU machine, else 'cpu' (kernels then run through Triton's interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"
