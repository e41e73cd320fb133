"""``scanopt._launch``: direct launches of cached compiled kernels.

The key must separate every pair of calls Triton specialises apart (else a kernel compiled for
aligned pointers or another dtype would run on the wrong arguments); the GPU tests run a kernel
both ways, hit the cache, and change alignment, dtype and integer arguments between calls.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import scanopt._launch as fast


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr, ADD: tl.constexpr = True):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    res = alpha * x + y if ADD else alpha * x - y
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=mask)


def test_key_separates_what_triton_specialises():
    base = torch.zeros(64)
    aligned, shifted = base[:32], base[1:33]  # data pointers 0 and 4 bytes past a 16-byte line
    k = fast._key
    assert k((aligned,), {}) != k((shifted,), {})
    assert k((aligned,), {}) != k((aligned.half(),), {})
    assert k((16,), {}) != k((17,), {})
    assert k((1,), {}) != k((True,), {})
    assert k((None,), {}) != k((0,), {})
    assert k((1.5,), {}) == k((2.5,), {})  # floats are runtime fp32 arguments
    assert k((aligned,), {"BLOCK": 16}) != k((aligned,), {"BLOCK": 32})
    assert k((aligned,), {"num_warps": 4}) != k((aligned,), {"num_warps": 8})
    from triton.tools.tensor_descriptor import TensorDescriptor

    tile = torch.zeros(64, 64)
    desc = TensorDescriptor.from_tensor(tile, [16, 64])
    assert k((desc,), {}) == k((TensorDescriptor.from_tensor(torch.ones(64, 64), [16, 64]),), {})
    assert k((desc,), {}) != k((TensorDescriptor.from_tensor(tile, [32, 64]),), {})
    assert k((desc,), {}) != k((TensorDescriptor.from_tensor(tile[:48], [16, 64]),), {})
    assert k((desc,), {}) != k((TensorDescriptor.from_tensor(tile.half(), [16, 64]),), {})
    assert k(([1],), {}) is None  # not modelled: kernel[grid] takes it
    assert k((aligned,), {"x": aligned}) is None


def test_trailing_arguments_in_signature_order():
    # a JITFunction even under the interpreter (which wraps kernels in InterpretedFunction)
    kernel = triton.runtime.jit.JITFunction(getattr(_axpy_kernel, "fn", _axpy_kernel))
    # positional x, y, out, n, alpha; then BLOCK by keyword and ADD's default
    assert fast._trailing(kernel, 5, {"BLOCK": 64}) == (64, True)
    assert fast._trailing(kernel, 5, {"BLOCK": 64, "ADD": False}) == (64, False)
    assert fast._trailing(kernel, 4, {"BLOCK": 64}) is None  # alpha has no default


def test_interpreter_and_switch_take_kernel_grid(monkeypatch):
    calls = []

    class Stub:
        device_caches = {}

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((grid, a, kw))

    monkeypatch.setattr(fast, "DIRECT", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fast.launch(Stub(), (2,), 1, BLOCK=4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(fast, "DIRECT", False)
    fast.launch(Stub(), (3,), 2, BLOCK=4)
    assert calls == [((2,), (1,), {"BLOCK": 4}), ((3,), (2,), {"BLOCK": 4})]


@pytest.mark.gpu
def test_gpu_direct_launch_matches_kernel_grid(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    monkeypatch.setattr(fast, "DIRECT", True)
    g = torch.Generator(device="cuda").manual_seed(0)
    buf_x = torch.randn(1000, generator=g, device="cuda")
    buf_y = torch.randn(1000, generator=g, device="cuda")
    cases = [
        (buf_x[:777], buf_y[:777], 2.0, True),  # aligned
        (buf_x[:777], buf_y[:777], -0.5, True),  # the same key, another float: cached launch
        (buf_x[1:778], buf_y[3:780], 1.5, True),  # 4- and 12-byte offsets: unaligned kernel
        (buf_x[:777], buf_y[:777], 2.0, False),  # another constexpr
        (buf_x[:512].half(), buf_y[:512].half(), 3.0, True),  # another dtype and n % 16 == 0
        (buf_x[:1], buf_y[:1], 2.0, True),  # n == 1
    ]
    for _ in range(2):  # the second round takes the cached launches for every case
        for x, y, alpha, add in cases:
            n = x.numel()
            want = torch.empty_like(x)
            got = torch.full_like(x, float("nan"))
            grid = (triton.cdiv(n, 128),)
            _axpy_kernel[grid](x, y, want, n, alpha, BLOCK=128, ADD=add)
            fast.launch(_axpy_kernel, grid, x, y, got, n, alpha, BLOCK=128, ADD=add)
            assert torch.equal(got, want), (n, alpha, add, x.dtype)
    assert sum(k[0] is _axpy_kernel for k in fast._COMPILED) == 5  # one per specialisation


def test_arrival_counters():
    """CPU (interpreter) counters are a fresh zeroed tensor per launch; on a GPU one buffer per
    stream, zero between launches (the kernels reset it: tests/test_wkv4.py)."""
    from scanopt.ops._arrival import counters

    a = counters(5, torch.device("cpu"))
    assert a.dtype == torch.int32 and a.numel() >= 5 and not a.any()
    a += 1
    assert not counters(5, torch.device("cpu")).any()
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        buf = counters(5, dev)
        assert buf.numel() >= 5 and not buf.any()
        assert counters(3, dev) is buf  # the same stream: the same buffer
        assert counters(buf.numel() + 1, dev).numel() > buf.numel()  # grown when too small
