"""Direct launches (``scanopt._launch``) against ``kernel[grid]``: the host time of one public
fwd+bwd and its ``do_bench`` median, both ways in one process (GPU required). Not part of the
package.

    PYTHONPATH=$PWD python bench/launch_probe.py [--ops wkv4] [--L 1024]

Each line: the op, the mode, the median host time to issue one fwd+bwd (no sync inside the
timed region; the GPU work is shorter than the host's at these shapes, so the queue never
fills) and ``do_bench``'s median (L2 flushed before each call, as ``scanopt bench`` does), both
in microseconds; the two modes alternate twice so drift shows. The outputs and gradients of the
two modes are compared bit for bit first.
"""

from __future__ import annotations

import argparse

import torch
import triton
from host_costs import _median_us  # bench/ is on sys.path when run as a script

import scanopt
import scanopt._launch as fast


def _case(op: str, L: int, dev: str = "cuda", small: bool = False):
    """The public call at the bench width (``small``: a tiny width for a CPU smoke run)."""
    g = torch.Generator(device=dev).manual_seed(0)
    C, H, D, HR, K, dim = (64, 2, 32, 2, 16, 8) if small else (2048, 16, 128, 32, 64, 2048)

    def r(*s, dt=torch.bfloat16):
        return torch.randn(*s, generator=g, device=dev).to(dt).requires_grad_()

    if op == "wkv4":
        td, tf = r(C, dt=torch.float32), r(C, dt=torch.float32)
        k, v = r(4, L, C), r(4, L, C)
        return (lambda: scanopt.wkv4(td, tf, k, v)[0]), (td, tf, k, v)
    if op == "attention":
        q, k, v = (r(4, L, H, D) for _ in range(3))
        return (lambda: scanopt.flash_attn_func(q, k, v, causal=True)), (q, k, v)
    if op == "wkv7":
        x = [r(4, L, HR, K) for _ in range(6)]
        with torch.no_grad():
            x[1].copy_(-torch.nn.functional.softplus(x[1].float()) - 0.5)  # log decays < 0
            x[4].copy_(torch.nn.functional.normalize(x[4].float(), dim=-1))
            x[5].copy_(-x[4].float() * 0.5)
        return (lambda: scanopt.wkv7(*x)[0]), tuple(x)
    if op == "selective_scan":
        u, dt, z = r(4, dim, L), r(4, dim, L), r(4, dim, L)
        A = (-torch.rand(dim, 16, generator=g, device=dev) - 0.5).requires_grad_()
        B, C_ = r(4, 16, L), r(4, 16, L)
        Dp = r(dim, dt=torch.float32)
        bias = r(dim, dt=torch.float32)
        return (
            lambda: scanopt.selective_scan_fn(u, dt, A, B, C_, D=Dp, z=z, delta_bias=bias,
                                              delta_softplus=True)
        ), (u, dt, A, B, C_, Dp, z, bias)  # fmt: skip
    raise ValueError(op)


_WKV4_DEFAULT = None


def _set_wkv4_fuse(fuse: int) -> None:
    """Make WKV-4's default config take ``fuse`` (its launch-config cache cleared)."""
    global _WKV4_DEFAULT
    from scanopt.ops.wkv4 import launch

    if _WKV4_DEFAULT is None:
        _WKV4_DEFAULT = launch.default_config
    launch.default_config = lambda *a, **kw: {**_WKV4_DEFAULT(*a, **kw), "fuse": fuse}
    launch.clear_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="wkv4")
    p.add_argument("--L", type=int, default=1024)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU, tiny shapes, no timing (TRITON_INTERPRET=1): the script's own check",
    )
    args = p.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    name = "CPU smoke run" if args.smoke else torch.cuda.get_device_name()
    print(f"# {name}, triton {triton.__version__}, L {args.L}")
    for op in args.ops.split(","):
        fwd, leaves = _case(op, args.L, dev, args.smoke)

        def fb(fwd=fwd, leaves=leaves):
            out = fwd()
            out.backward(torch.ones_like(out))
            for t in leaves:
                t.grad = None

        grads = {}
        for direct in (False, True):
            fast.DIRECT = direct
            for _ in range(2):  # the second call of each mode takes the cached path
                for t in leaves:
                    t.grad = None
                out = fwd()
                out.backward(torch.ones_like(out))
            grads[direct] = [out.detach().clone()] + [t.grad.clone() for t in leaves]
        same = all(torch.equal(a, b) for a, b in zip(grads[False], grads[True], strict=True))
        print(f"{op}: direct and kernel[grid] give identical outputs and gradients: {same}")
        modes = [(False, 0), (True, 0), (False, 0), (True, 0)]
        if op == "wkv4":  # and the fused launches (7 -> 4 per fwd+bwd), opt-in config "fuse"
            modes += [(True, 1), (True, 0), (True, 1)]
        for direct, fuse in modes:
            fast.DIRECT = direct
            _set_wkv4_fuse(fuse)
            if args.smoke:
                fb()
                host = bench = float("nan")
            else:
                host = _median_us(fb, 300)
                bench = triton.testing.do_bench(fb, warmup=50, rep=300, return_mode="median")
                bench *= 1e3
            mode = ("direct" if direct else "kernel[grid]") + (" fuse" if fuse else "")
            print(f"{op:8s} {mode:13s} host {host:8.1f} us   do_bench {bench:8.1f} us")
        fast.DIRECT = False
        _set_wkv4_fuse(0)


if __name__ == "__main__":
    main()
