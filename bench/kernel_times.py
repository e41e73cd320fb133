"""Per-kernel GPU time of one public forward+backward, to split an op's time between its kernels
(the bench times whole ops). Not part of the package (bench/ holds data and scripts only).

    PYTHONPATH=$PWD python bench/kernel_times.py --op wkv7 --L 4096 --mode tc
    PYTHONPATH=$PWD python bench/kernel_times.py --op selective_scan --L 4096

Anchor shapes (ANCHORS.md), bf16: WKV-6/7 B 4, H 32, K = V = 64 (``--mode`` forces a kernel
family: recurrent, chunked or tc); selective scan batch 4, dim 2048, N 16, variable B/C, z, D,
delta_bias, softplus. One untimed warm-up call (compiles), then ``--reps`` profiled calls under
``torch.profiler``; prints each CUDA kernel's mean time per call and share of the total, and the
CUDA events' wall time of one call for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import defaultdict

import torch


def _wkv_call(op_name: str, L: int, mode: str | None):
    from scanopt.ops._rwkv_common import forced_mode

    mod = __import__(f"scanopt.ops.{op_name}.op", fromlist=["make_inputs"])
    x = mod.make_inputs(4, L, 32, 64, dtype=torch.bfloat16, w_dtype=torch.bfloat16, device="cuda")
    names = ("r", "w", "k", "v", "a", "b") if op_name == "wkv7" else ("r", "k", "v", "w", "u")
    fn = getattr(mod, op_name)
    ctx = forced_mode(op_name, mode) if mode else contextlib.nullcontext()

    def call():
        leaves = [x[n].detach().requires_grad_(True) for n in names]
        with ctx:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", required=True, choices=("wkv6", "wkv7", "selective_scan"))
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--mode", choices=("recurrent", "chunked", "tc"), help="WKV-6/7 only")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    if a.mode and a.op == "selective_scan":
        ap.error("--mode applies to wkv6/wkv7 only")
    call = _scan_call(a.L) if a.op == "selective_scan" else _wkv_call(a.op, a.L, a.mode)
    call()  # compile
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
    print(f"# {torch.cuda.get_device_name()} {a.op} L={a.L} mode={a.mode or 'default'}: "
          f"kernels {total:.3f} ms per fwd+bwd, CUDA-event wall {wall:.3f} ms")  # fmt: skip
    for name, (t, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        print(f"{t:9.3f} ms {100 * t / total:5.1f}%  x{n // a.reps:<3d} {name[:90]}")


if __name__ == "__main__":
    main()
