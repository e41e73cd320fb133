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


@pytest.fixture
def force_rwkv_mode(monkeypatch):
    """``force_rwkv_mode(mode, **overrides)``: the WKV-6/7 default launch config uses kernel
    family ``mode`` in both directions (``overrides`` on top), for the rest of the test.
    ``"tc"`` takes bf16/fp16 inputs only, so fp32 inputs keep the recurrent kernels there."""
    from scanopt.ops import _rwkv_common

    original = _rwkv_common.default_config

    def force(mode, **overrides):
        def forced(direction, **kwargs):
            want = kwargs.get("mode") or mode
            if not _rwkv_common.mode_applies(want, kwargs["dtype"]):
                want = "recurrent"
            cfg = original(direction, **{**kwargs, "mode": want})
            if cfg["MODE"] == mode:
                cfg.update(overrides)
            return cfg

        monkeypatch.setattr(_rwkv_common, "default_config", forced)

    return force
