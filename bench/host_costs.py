"""Unit costs of the host path on this machine's CPU (GPU required): what one CUDA allocation,
one Triton launch (few / many arguments, plain or with a host TensorDescriptor), one PyTorch
elementwise op and one ``torch.autograd.Function`` round trip cost the host, so a public op's
host time (``bench/kernel_times.py``) can be split into its parts. Not part of the package.

    PYTHONPATH=$PWD python bench/host_costs.py

Each line: median microseconds per call over 2000 calls issued back to back (no sync inside the
loop; the GPU work of each is tiny, so the host is what is timed).
"""

from __future__ import annotations

import statistics
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _nop_few(x_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _nop_many(x_ptr, p1, p2, p3, p4, p5, p6, p7, n, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10,
              s11, s12, s13, s14, s15, s16, s17, s18, s19, s20, s21, s22, s23, s24, s25,
              BLOCK: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _nop_desc(x_ptr, desc, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)
    if pid == 0:
        t = desc.load([0, 0])
        desc.store([0, 0], t)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _median_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(ts) * 1e6


def main() -> None:
    x = torch.zeros(1024, device="cuda")
    ptrs = [torch.zeros(16, device="cuda") for _ in range(7)]
    tile = torch.zeros(64, 64, device="cuda", dtype=torch.bfloat16)
    leaf = torch.zeros(1024, device="cuda", requires_grad=True)
    g = torch.ones(1024, device="cuda")
    ints = list(range(1, 26))

    def launch_many():
        _nop_many[(1,)](x, *ptrs, 1024, *ints, BLOCK=1024, F1=True, F2=False)

    def launch_desc():
        from triton.tools.tensor_descriptor import TensorDescriptor

        d = TensorDescriptor(tile, list(tile.shape), list(tile.stride()), [16, 64])
        _nop_desc[(1,)](x, d, 1024, BLOCK=1024)

    # the launch without JITFunction.run's Python (binder, cache key, knobs, grid, hooks): what a
    # launcher caching the CompiledKernel per its own key could save (wkv4.md, fourteenth session)
    many_args = (x, *ptrs, 1024, *ints, 1024, True, False)
    compiled = _nop_many[(1,)](*many_args[:-3], BLOCK=1024, F1=True, F2=False)
    raw_stream = torch._C._cuda_getCurrentRawStream
    dev = torch.cuda.current_device()

    def launch_direct():
        compiled.run(1, 1, 1, raw_stream(dev), compiled.function, compiled.packed_metadata, None,
                     None, None, *many_args)  # fmt: skip

    binder = _nop_many.device_caches[dev][4]

    def binder_only():
        binder(*many_args[:-3], BLOCK=1024, F1=True, F2=False)

    def autograd_round_trip():
        y = _Identity.apply(leaf)
        y.backward(g)

    cases = {
        "torch.empty (1 MiB, CUDA)": lambda: torch.empty(1 << 18, device="cuda"),
        "torch.empty_like + view": lambda: torch.empty_like(x).view(32, 32),
        "x.add_(1) (one ATen launch)": lambda: x.add_(1),
        "triton launch, 2 runtime args": lambda: _nop_few[(1,)](x, 1024, BLOCK=1024),
        "triton launch, 33 runtime args": launch_many,
        "triton launch, 33 runtime args, CompiledKernel.run direct": launch_direct,
        "triton binder alone, 33 runtime args": binder_only,
        "triton launch, 1 host TensorDescriptor": launch_desc,
        "autograd.Function fwd+bwd (identity)": autograd_round_trip,
        "torch.cuda.current_stream()": torch.cuda.current_stream,
    }
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    )
    for name, fn in cases.items():
        try:
            print(f"{_median_us(fn):8.2f} us  {name}")
        except Exception as e:  # noqa: BLE001 - report and go on (e.g. no TMA on this GPU)
            print(f"   error  {name}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
