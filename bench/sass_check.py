"""Offline sm_90a compile of every Triton kernel a WKV-6/7 or selective-scan launch issues, on a
machine without a GPU: registers, spill stores and SASS size per kernel, with the JIT's real
specialisations.

    PYTHONPATH=$PWD python bench/sass_check.py --op wkv6 --cfg '{"MODE": "tc", "CARRY": 1}'
    PYTHONPATH=$PWD python bench/sass_check.py --op wkv7 --cfg '{"MODE": "tc", "num_warps": 8}'
    PYTHONPATH=$PWD python bench/sass_check.py --op selective_scan \
        --cfg '{"fwd": {"BLOCK_D": 4, "BLOCK_G": 8, "BLOCK_R": 16, "num_warps": 1},
                "bwd": {"BLOCK_D": 4, "BLOCK_G": 8, "BLOCK_R": 16, "num_warps": 1}}'

``SASS_CHECK_HIST=1`` adds the largest loop's opcode mix (``HIST``); ``SASS_CHECK_DUMP=dir``
writes each kernel's TTGIR there and appends the SASS to ``dir/last.sass``.

A stub driver reports an sm_90 target, and ``JITFunction.run`` compiles (``warmup``) instead of
launching, so the launchers run unchanged on CPU tensors (bf16, B 1, T 256, H 2, K = V = 64 by
default); each distinct compiled kernel goes through the Triton wheel's ``ptxas -v`` and
``cuobjdump -sass``. Outputs are garbage (nothing runs); only the compiled code is looked at.
Uses Triton internals (3.6): a tool for the notes, not part of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
NAMES = {"wkv6": ("r", "k", "v", "w", "u"), "wkv7": ("r", "w", "k", "v", "a", "b"),
         "selective_scan": ()}


class _StubDriver:
    """Just enough of a driver for ``JITFunction.run(warmup=True)``: the target and a device."""

    def __init__(self, capability: int) -> None:
        self.capability = capability

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.capability, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _inspect(kernel, arch: str) -> tuple[str, str, int]:
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(kernel.asm["ptx"])
        cubin = os.path.join(d, "k.cubin")
        out = subprocess.run(
            [os.path.join(BIN, "ptxas"), f"-arch={arch}", "-v", os.path.join(d, "k.ptx"), "-o", cubin],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        sass = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True
        ).stdout
    if os.environ.get("SASS_CHECK_DUMP"):
        with open(os.path.join(os.environ["SASS_CHECK_DUMP"], "last.sass"), "a") as f:
            f.write(sass)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    ops = re.findall(r"/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    mix = {op: sum(o == op for o in ops) for op in ("BAR", "STS", "STSM", "LDS", "SHFL", "LDG", "MUFU", "REDG", "ATOMG")}
    # the largest loop: a branch back to an earlier address, (branch - target) / 16 instructions
    loops = [(int(a, 16), int(t, 16))
             for a, t in re.findall(r"/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+0x([0-9a-f]+)", sass)
             if int(t, 16) < int(a, 16) - 16]  # fmt: skip
    big = max(loops, key=lambda at: at[0] - at[1], default=None)
    mix["LOOP"] = (big[0] - big[1]) // 16 if big else 0
    if big and os.environ.get("SASS_CHECK_HIST"):
        # the largest loop's opcode mix (base opcodes, most frequent first): where its
        # instructions go
        body = [op.split(".")[0] for addr, op in re.findall(
            r"/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
            if big[1] <= int(addr, 16) <= big[0]]  # fmt: skip
        counts = sorted({op: body.count(op) for op in set(body)}.items(), key=lambda kv: -kv[1])
        mix["HIST"] = " ".join(f"{op}:{n}" for op, n in counts[:24])
    return (
        regs.group(1) if regs else "?",
        spills.group(1) if spills else "?",
        len(re.findall(r"/\*[0-9a-f]{4,6}\*/ ", sass)),
        mix,
    )


def install(arch: str = "sm_90a") -> None:
    """Replace launches by offline compiles that print one line per distinct kernel."""
    driver.set_active(_StubDriver(int(re.sub(r"\D", "", arch))))
    import scanopt._launch

    scanopt._launch.DIRECT = False  # every launch through JITFunction.run (compiled, not run)
    seen: set = set()
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        shown = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, str))}
        key = (self.fn.__name__, tuple(sorted(shown.items())))
        if key not in seen:
            seen.add(key)
            regs, spills, n, mix = _inspect(kernel, arch)
            if os.environ.get("SASS_CHECK_DUMP"):  # a folder: each kernel's TTGIR goes there
                name = f"{self.fn.__name__}_{len(seen)}.ttgir"
                with open(os.path.join(os.environ["SASS_CHECK_DUMP"], name), "w") as f:
                    f.write(kernel.asm["ttgir"])
            warps = shown.pop("num_warps", 4)
            shown.pop("num_stages", None)
            print(f"{self.fn.__name__:30s} warps {warps} regs {regs:>3} spill stores {spills:>5} B"
                  f"  SASS {n:>6}  {shown}")  # fmt: skip
            print(" " * 31 + " ".join(f"{k} {v}" for k, v in mix.items()))
        return kernel

    JITFunction.run = compile_only


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=sorted(NAMES), required=True)
    ap.add_argument("--cfg", default='{"MODE": "tc"}', help="launch config (JSON), both directions")
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--w-dtype", default=None, help="w's dtype (default: --dtype)")
    ap.add_argument("--arch", default="sm_90a")
    a = ap.parse_args()
    install(a.arch)
    import importlib

    if a.op == "selective_scan":
        _selective_scan(json.loads(a.cfg), a.T, getattr(torch, a.dtype))
        return

    from scanopt.ops._rwkv_common import direction_config

    launch = importlib.import_module(f"scanopt.ops.{a.op}.launch")
    mod = importlib.import_module(f"scanopt.ops.{a.op}.op")
    dtype = getattr(torch, a.dtype)
    x = mod.make_inputs(1, a.T, 2, a.K, dtype=dtype, device="cpu", seed=0,
                        w_dtype=getattr(torch, a.w_dtype) if a.w_dtype else dtype)  # fmt: skip
    args = [x[n] for n in NAMES[a.op]]
    cfg = json.loads(a.cfg)
    cf, cb = direction_config(cfg, "fwd"), direction_config(cfg, "bwd")
    fwd, bwd = getattr(launch, f"{a.op}_fwd"), getattr(launch, f"{a.op}_bwd")
    _, _, ckpt = fwd(*args, 1.0, None, True, cf)
    bwd(x["do"], None, *args, 1.0, None, ckpt, 16, cb)


def _selective_scan(cfg: dict, L: int, dtype: torch.dtype) -> None:
    """The anchor shape's specialisations (variable B/C, z, D, delta_bias, softplus), small:
    batch 1, dim 64, N 16; ``cfg`` ``{"fwd": {...}, "bwd": {...}}`` launch configs."""
    from scanopt.ops.selective_scan import launch, op

    x = op.make_inputs(1, 64, L, 16, dtype=dtype, device="cpu", seed=0)
    args = [x[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    cb = cfg.get("bwd")
    chunk = cb["BLOCK_G"] * cb["BLOCK_R"] if cb else 128
    _, _, ckpt = launch.selective_scan_fwd(*args, None, True, chunk, cb is not None,
                                           cfg.get("fwd"))  # fmt: skip
    if cb:
        # the atomic and serial backwards run in non-deterministic mode only
        launch.selective_scan_bwd(x["dout"], None, *args, None, ckpt, True, chunk, cb,
                                  deterministic=not (cb.get("SERIAL") or cb.get("ATOMIC_BC")))


if __name__ == "__main__":
    main()
