"""WKV-6/7 tensor-core ("tc") probe for one GPU: each launch config's forward and backward time
next to the tc default and the op's default family, results checked against the tc default's.

    PYTHONPATH=$PWD python bench/wkv_tc_probe.py --op wkv6 --L 4096
    PYTHONPATH=$PWD python bench/wkv_tc_probe.py --op wkv7 --L 1024,4096 --sweep serial

Anchor shape (ANCHORS.md): bf16, B 4, H 32, K = V = 64. The launchers are called directly
(``launch.wkvN_fwd`` with checkpoints, ``launch.wkvN_bwd`` from them), so each direction's time
is its kernels' alone; times are medians of ``triton.testing.do_bench``. Sweeps:
``serial`` = the serial passes' V-block and warps (``BW``, ``SW``); ``block`` = the parallel
kernels' warps and the chunk length (``num_warps``, ``BT``); ``quick`` = four of those; ``chunk``
= the chunk length with 4 and 8 warps; ``bwd`` = WKV-6's backward switches (``CARRY``: a
program per chunk; ``DPASS``: decays from a decay pass) at 4 and 8 warps, and the serial passes
at 8 warps; ``dpass`` = the backward's decay pass (WKV-6's default, WKV-7's opt-in) on and off,
and at 8 warps; ``warps`` = the block kernels at 2 warps and BV 32; ``bt16`` = WKV-7's backward:
``DPASS`` 2 (every kernel reads the decay pass's rows), the serial cotangent pass over every
16-step block (BT 16, NB 1: no chunk adjoints, no fill), both, BT 32, and 8 warps; ``ks`` = WKV-7's split-K
recurrent forward (``KS``, ``BV``; with the default backward); ``recfwd`` = the recurrent
family's V-block and prefetch depth (for its forward time: the tc backward reads its
checkpoints). A config whose outputs or gradients
differ from the tc default's beyond bf16 rounding is reported ``DIFF`` and not timed. Not part of
the package (bench/ holds data and scripts only).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import time

import torch
import triton

from scanopt.ops import _rwkv_common

B, H, K = 4, 32, 64
NAMES = {"wkv6": ("r", "k", "v", "w", "u"), "wkv7": ("r", "w", "k", "v", "a", "b")}
SWEEPS = {
    "serial": [{"BW": bw, "SW": sw} for bw, sw in itertools.product((16, 32, 64), (2, 4, 8))],
    "block": [{"BT": 16}, {"BT": 32}, {"BT": 128}, {"num_warps": 4}],
    "quick": [{"BT": 16}, {"BW": 16, "SW": 4}, {"BW": 64, "SW": 8}, {"BW": 32, "SW": 4}],
    "chunk": [{"BT": 32}, {"BT": 128}, {"num_warps": 8}, {"BT": 128, "num_warps": 8}],
    "dpass": [{"DPASS": 1}, {"DPASS": 1, "num_warps": 8}, {"DPASS": 0}],
    "recfwd": [
        {"MODE": "recurrent"},
        {"MODE": "recurrent", "BV": 4},
        {"MODE": "recurrent", "BV": 16},
        {"MODE": "recurrent", "PF": 8},
    ],
    "bt16": [
        {"DPASS": 2},
        {"BT": 16},
        {"DPASS": 2, "BT": 16},
        {"BT": 32},
        {"num_warps": 8},
    ],
    "warps": [{"num_warps": 2}, {"num_warps": 2, "BV": 32}, {"BV": 32}],
    # WKV-7's split-K recurrent forward (KS values of K per thread; both directions take
    # MODE, so read the fwd column: the backward is the recurrent one)
    "ks": [
        {"MODE": "recurrent", "KS": 8, "BV": 8, "FWD_ONLY": 1},
        {"MODE": "recurrent", "KS": 8, "BV": 16, "FWD_ONLY": 1},
        {"MODE": "recurrent", "KS": 8, "BV": 4, "FWD_ONLY": 1},
    ],
    "bwd": [
        {"CARRY": 1},
        {"DPASS": 1},
        {"CARRY": 1, "DPASS": 1},
        {"DPASS": 1, "num_warps": 8},
        {"CARRY": 1, "num_warps": 8},
        {"num_warps": 8},
        {"SW": 8},
    ],
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def probe(op: str, L: int, configs: list[dict]) -> None:
    launch = importlib.import_module(f"scanopt.ops.{op}.launch")
    mod = importlib.import_module(f"scanopt.ops.{op}.op")
    fwd, bwd = getattr(launch, f"{op}_fwd"), getattr(launch, f"{op}_bwd")
    x = mod.make_inputs(B, L, H, K, dtype=torch.bfloat16, w_dtype=torch.bfloat16, device="cuda")
    args = [x[n] for n in NAMES[op]]

    def split(cfg: dict | None) -> tuple[dict | None, dict | None]:
        # each direction takes its own keys (CARRY is the backward's alone)
        if cfg is None:
            return None, None
        # FWD_ONLY: the row's keys are the forward's; the backward is the default one
        bwd_cfg = None if cfg.get("FWD_ONLY") else _rwkv_common.direction_config(cfg, "bwd")
        return _rwkv_common.direction_config(cfg, "fwd"), bwd_cfg

    def run(cfg: dict | None):
        cf, cb = split(cfg)
        o, ht, ck = fwd(*args, 1.0, None, True, cf)
        grads = bwd(x["do"], None, *args, 1.0, None, ck, 16, cb)
        return (o, ht, *grads[: len(args)]), ck

    def times(cfg: dict | None, ck) -> tuple[float, float]:
        cf, cb = split(cfg)
        t_f = triton.testing.do_bench(lambda: fwd(*args, 1.0, None, True, cf))
        t_b = triton.testing.do_bench(lambda: bwd(x["do"], None, *args, 1.0, None, ck, 16, cb))
        return t_f, t_b

    base_cfg = {"MODE": "tc"}
    ref, ck_ref = run(base_cfg)
    rows = [("tc default", base_cfg), ("default family", None)]
    rows += [(", ".join(f"{k}={v}" for k, v in c.items()), {**base_cfg, **c}) for c in configs]
    t_base = None
    for label, cfg in rows:
        t0 = time.time()
        try:
            got, ck = run(cfg)
        except Exception as e:  # noqa: BLE001 (a probe: report and go on)
            print(f"{op} L={L:>6} {label:<22} ERROR {type(e).__name__}: {str(e)[:120]}")
            continue
        err = max(_rel(g, r) for g, r in zip(got, ref, strict=True))
        # bf16 outputs / gradients: tc configs differ from each other only by fp32 summation order
        if cfg is not None and err > 2e-2:
            print(f"{op} L={L:>6} {label:<22} DIFF max rel-L2 {err:.2e} (not timed)")
            continue
        t_f, t_b = times(cfg, ck)
        if cfg is base_cfg:
            t_base = t_f + t_b
        ratio = f"{t_base / (t_f + t_b):5.2f}x tc-default" if t_base else ""
        print(
            f"{op} L={L:>6} {label:<22} fwd {t_f:8.3f} bwd {t_b:8.3f} f+b {t_f + t_b:8.3f} ms "
            f"{ratio}  err {err:.1e}  ({time.time() - t0:.0f}s)",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=("wkv6", "wkv7"), required=True)
    ap.add_argument("--L", default="4096", help="comma-separated lengths")
    ap.add_argument("--sweep", default="serial,block", help="comma-separated: " + ", ".join(SWEEPS))
    a = ap.parse_args()
    configs = [c for name in a.sweep.split(",") if name for c in SWEEPS[name]]
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    )
    for L in (int(v) for v in a.L.split(",")):
        probe(a.op, L, configs)


if __name__ == "__main__":
    main()
