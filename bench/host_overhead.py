"""Host-overhead microbenchmark: per-call Python cost of each public op, kernels stubbed out.

Runs on CPU with ``TRITON_INTERPRET=1`` and ``SCANOPT_BACKEND=triton`` so the public functions
take the same path as on a GPU (checks, custom ops, autograd, config resolution, allocation,
grids), but every ``kernel[grid](...)`` launch in ``scanopt.ops.*.launch`` is replaced by a
no-op, so only the host path is timed. Outputs are therefore garbage; nothing is verified.

    PYTHONPATH=$PWD python bench/host_overhead.py [--ops attention,wkv4] [--reps 300]

Prints, per op, the median of ``--reps`` calls (after warmup) of the forward and of
forward+backward in microseconds, and the number of Triton launches each issues (not timed).
Tiny shapes keep CPU tensor work (allocation, the few torch ops the launchers do) negligible;
on a GPU the same path also pays CUDA allocator/launch costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"
os.environ["SCANOPT_BACKEND"] = "triton"
os.environ.setdefault("SCANOPT_POISON", "0")

import importlib  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

#: launches issued through the stubs (counted, not run)
LAUNCHES = [0]


class _NoLaunch:
    """Stands in for a Triton kernel: ``stub[grid](*args, **kw)`` does nothing (but counts)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, grid):
        return _noop


def _noop(*args, **kwargs) -> None:
    LAUNCHES[0] += 1
    return None


def _launches(fn) -> int:
    """Triton launches one call of ``fn`` issues."""
    before = LAUNCHES[0]
    fn()
    return LAUNCHES[0] - before


def stub_kernels() -> int:
    """Replace every Triton kernel object reachable from the launch/kernels modules."""
    n = 0
    kinds = (triton.runtime.jit.KernelInterface,)
    for op in ("attention", "wkv4", "wkv6", "wkv7", "selective_scan"):
        for sub in ("kernels", "launch"):
            try:
                mod = importlib.import_module(f"scanopt.ops.{op}.{sub}")
            except ImportError:
                continue
            for name, val in list(vars(mod).items()):
                if isinstance(val, kinds):
                    setattr(mod, name, _NoLaunch(name))
                    n += 1
    return n


def _inputs(op: str, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)

    def r(*s, dt=dtype, neg=False):
        x = torch.randn(*s, generator=g).to(dt)
        return (-x.abs() if neg else x).requires_grad_()

    if op == "attention":
        q, k, v = (r(1, 128, 2, 64) for _ in range(3))
        return lambda: scanopt.flash_attn_func(q, k, v, causal=True), (q, k, v)
    if op == "sdpa":
        q, k, v = (r(1, 2, 128, 64) for _ in range(3))
        return lambda: scanopt.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v)
    if op == "wkv4":
        td, tf = r(64, dt=torch.float32), r(64, dt=torch.float32)
        k, v = r(1, 128, 64), r(1, 128, 64)
        return lambda: scanopt.wkv4(td, tf, k, v)[0], (td, tf, k, v)
    if op == "wkv6":
        rr, k, v = (r(1, 64, 2, 16) for _ in range(3))
        w, u = r(1, 64, 2, 16, neg=True), r(2, 16)
        return lambda: scanopt.wkv6(rr, k, v, w, u)[0], (rr, k, v, w, u)
    if op == "wkv7":
        rr, k, v, a, b = (r(1, 64, 2, 16) for _ in range(5))
        w = r(1, 64, 2, 16, neg=True)
        return lambda: scanopt.wkv7(rr, w, k, v, a, b)[0], (rr, w, k, v, a, b)
    if op == "selective_scan":
        u, dt = r(1, 16, 64), r(1, 16, 64)
        A = r(16, 16, dt=torch.float32, neg=True)
        B, C = r(1, 16, 64), r(1, 16, 64)
        D = r(16, dt=torch.float32)
        return (
            lambda: scanopt.selective_scan_fn(u, dt, A, B, C, D=D, delta_softplus=True),
            (u, dt, A, B, C, D),
        )
    raise ValueError(op)


def _time(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def measure(op: str, reps: int, warmup: int) -> tuple[float, float]:
    fwd, leaves = _inputs(op)

    def fwd_only():
        with torch.no_grad():
            fwd()

    def fwd_bwd():
        out = fwd()
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None

    times = _time(fwd_only, reps, warmup), _time(fwd_bwd, reps, warmup)
    return (*times, _launches(fwd_only), _launches(fwd_bwd))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="attention,sdpa,wkv4,wkv6,wkv7,selective_scan")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(1)
    n = stub_kernels()
    print(f"stubbed {n} kernel objects; torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'op':16s} {'fwd us':>9s} {'fwd+bwd us':>11s} {'launches fwd / fwd+bwd':>24s}")
    for op in a.ops.split(","):
        f, fb, nf, nfb = measure(op, a.reps, a.warmup)
        print(f"{op:16s} {f:9.1f} {fb:11.1f} {nf:>13d} / {nfb}")
    print("(each launch adds Triton's run() and the driver call, which the stubs skip: ~4-8 us of")
    print(" run() per launch on the dev box's CPU before the driver, bench/notes/wkv4.md)")


import scanopt  # noqa: E402

if __name__ == "__main__":
    main()
