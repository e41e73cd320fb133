"""Per-kernel GPU time of one public forward+backward, to split an op's time between its kernels
(the bench times whole ops). Not part of the package (bench/ holds data and scripts only).

    PYTHONPATH=$PWD python bench/kernel_times.py --op wkv7 --L 4096 --mode tc
    PYTHONPATH=$PWD python bench/kernel_times.py --op selective_scan --L 4096
    PYTHONPATH=$PWD python bench/kernel_times.py --op wkv4 --L 1024 --cprofile 25

Anchor shapes (ANCHORS.md), bf16: WKV-6/7 B 4, H 32, K = V = 64 (``--mode`` forces a kernel
family: recurrent, chunked or tc); selective scan batch 4, dim 2048, N 16, variable B/C, z, D,
delta_bias, softplus; WKV-4 B 4, C 2048; attention B 4, H 16, D 128, causal (``flash_attn_func``).
One untimed warm-up call (compiles), then ``--reps`` profiled calls under ``torch.profiler``;
prints each CUDA kernel's mean time per call and share of the total, the CUDA events' wall time
of one call, and the host time per call: 20 calls issued back to back without a sync, timed on
the CPU. Host time above the kernels' time means the op is host-bound at that shape;
``--cprofile N`` then lists the N Python functions with the most own time over those calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import defaultdict

import torch


def _fla_fn(op_name: str):
    """flash-linear-attention's chunked kernel with scanopt's argument order and scale 1."""
    if op_name == "wkv6":
        from fla.ops.rwkv6 import chunk_rwkv6

        return lambda r, k, v, w, u: chunk_rwkv6(r, k, v, w, u, scale=1.0)
    from fla.ops.rwkv7 import chunk_rwkv7

    return lambda r, w, k, v, a, b: chunk_rwkv7(r, w, k, v, a, b, scale=1.0)


def _wkv_call(op_name: str, L: int, mode: str | None, impl: str = "scanopt", cfg=None):
    from scanopt.ops._rwkv_common import forced_mode

    mod = __import__(f"scanopt.ops.{op_name}.op", fromlist=["make_inputs"])
    x = mod.make_inputs(4, L, 32, 64, dtype=torch.bfloat16, w_dtype=torch.bfloat16, device="cuda")
    names = ("r", "w", "k", "v", "a", "b") if op_name == "wkv7" else ("r", "k", "v", "w", "u")
    fn = getattr(mod, op_name) if impl == "scanopt" else _fla_fn(op_name)

    def call():
        leaves = [x[n].detach().requires_grad_(True) for n in names]
        # a fresh context per call: forced_mode is a generator context manager (single use)
        with forced_mode(op_name, mode, **(cfg or {})) if mode else contextlib.nullcontext():
            o, _ = fn(*leaves)
            o.backward(x["do"])

    return call


def _scan_call(L: int):
    from scanopt.ops.selective_scan.op import make_inputs, selective_scan_fn

    x = make_inputs(4, 2048, L, 16, dtype=torch.bfloat16, device="cuda")
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def call():
        lv = {n: x[n].detach().requires_grad_(True) for n in names}
        out = selective_scan_fn(*(lv[n] for n in names), delta_softplus=True)
        out.backward(x["dout"])

    return call


def _wkv4_call(L: int):
    from scanopt.ops.wkv4.op import make_inputs, wkv4

    x = make_inputs(4, L, 2048, dtype=torch.bfloat16, device="cuda")
    names = ("time_decay", "time_first", "key", "value")

    def call():
        lv = [x[n].detach().requires_grad_(True) for n in names]
        out, _ = wkv4(*lv)
        out.backward(x["grad_out"])

    return call


def _attention_call(L: int):
    from scanopt import flash_attn_func

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (
        torch.randn(4, L, 16, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(4)
    )

    def call():
        lv = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = flash_attn_func(*lv, causal=True)
        out.backward(do)

    return call


def _host_time(call, n: int = 20) -> float:
    """Mean CPU time (ms) to issue one call when the GPU never makes the host wait."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--op", required=True, choices=("wkv4", "wkv6", "wkv7", "selective_scan", "attention")
    )
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--mode", choices=("recurrent", "chunked", "tc"), help="WKV-6/7 only")
    ap.add_argument(
        "--impl",
        choices=("scanopt", "fla"),
        default="scanopt",
        help="WKV-6/7: time flash-linear-attention's chunk_rwkv6/7 instead (per-kernel budgets "
        "for scanopt's kernels; its first call autotunes, which is not timed)",
    )
    ap.add_argument(
        "--cfg",
        type=json.loads,
        default=None,
        help='WKV-6/7 with --mode: config keys on top of that family\'s default, both '
        'directions, as JSON (e.g. \'{"BW": 32, "SW": 4}\')',
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cprofile", type=int, default=0, metavar="N", help="top-N host functions")
    a = ap.parse_args()
    if (a.mode or a.impl != "scanopt") and a.op not in ("wkv6", "wkv7"):
        ap.error("--mode and --impl apply to wkv6/wkv7 only")
    if a.mode and a.impl != "scanopt":
        ap.error("--mode is a scanopt option")
    if a.cfg and not a.mode:
        ap.error("--cfg needs --mode")
    makers = {"selective_scan": _scan_call, "wkv4": _wkv4_call, "attention": _attention_call}
    call = makers[a.op](a.L) if a.op in makers else _wkv_call(a.op, a.L, a.mode, a.impl, a.cfg)
    call()  # compile
    call()
    host = _host_time(call)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end)

    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.reps):
            call()
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name][0] += ev.device_time / 1e3 / a.reps  # us -> ms per call
            per[ev.name][1] += 1
    total = sum(t for t, _ in per.values())
    print(f"# {torch.cuda.get_device_name()} {a.op} L={a.L} impl={a.impl} "
          f"mode={a.mode or 'default'}: "
          f"kernels {total:.3f} ms per fwd+bwd, CUDA-event wall {wall:.3f} ms, "
          f"host {host:.3f} ms per call")  # fmt: skip
    for name, (t, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        print(f"{t:9.3f} ms {100 * t / total:5.1f}%  x{n // a.reps:<3d} {name[:90]}")
    if a.cprofile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            call()
        pr.disable()
        torch.cuda.synchronize()
        print("# host functions, own time over 20 calls")
        pstats.Stats(pr).sort_stats("tottime").print_stats(a.cprofile)
        print("# host functions, cumulative time over 20 calls")
        pstats.Stats(pr).sort_stats("cumulative").print_stats(a.cprofile)


if __name__ == "__main__":
    main()
