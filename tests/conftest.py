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
        # resolved configs are cached per shape: an earlier test's must not answer for this one
        _rwkv_common._RESOLVED.clear()

    yield force
    _rwkv_common._RESOLVED.clear()


@pytest.fixture
def unused_outputs_get_no_cotangent():
    """``check(outputs_fn, used, leaves, name)``: an op's outputs ``outputs_fn()`` (a list), a
    loss through the outputs flagged in ``used`` only. Unused outputs reach the op's backward as
    ``None`` (no materialized zeros); the gradients must equal those of the same backward given
    explicit zero cotangents for them (the materialized path, covered by every other test)."""

    def check(outputs_fn, used, leaves, name):
        outs = outputs_fn()
        g = torch.Generator().manual_seed(0)
        cots = [torch.randn(o.shape, generator=g).to(o) for o in outs]
        for t in leaves:
            t.grad = None
        loss = sum((o * c).sum() for o, c, u in zip(outs, cots, used, strict=True) if u)
        loss.backward()
        got = [t.grad for t in leaves]
        for t in leaves:
            t.grad = None
        outs = outputs_fn()
        explicit = [c if u else torch.zeros_like(c) for c, u in zip(cots, used, strict=True)]
        torch.autograd.backward(outs, explicit)
        want = [t.grad for t in leaves]
        # some leaves do not reach some outputs (r never reaches the final state), but the
        # check must not be vacuous
        assert any(b is not None and b.abs().max() > 0 for b in want), f"{name}: all zero"
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert a is not None and b is not None, f"{name}: leaf {i} got no gradient"
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}: leaf {i}")

    return check


@pytest.fixture
def blockwise_decay():
    """``blockwise_decay(x, strong_block=1)``: WKV-6/7 inputs ``x`` with one 16-step block
    strongly decaying (log decay -18) in one key channel, so that block's total decay is past
    the tc kernels' ``FACTOR_LIMIT`` (their exact pairwise path) and the other blocks stay
    factored. Changes ``x["w"]`` in place (same dtype) and returns ``x``."""

    def apply(x, strong_block=1):
        w = x["w"].float().clone()
        w[:, 16 * strong_block : 16 * (strong_block + 1), :, 0] = -18.0
        x["w"] = w.to(x["w"].dtype)
        return x

    return apply
