"""Selective-scan probe for one GPU: correctness at the anchor shape, a small launch-config sweep,
and fwd / fwd+bwd timings against mamba_ssm's CUDA kernel, all in one process.

    PYTHONPATH=$PWD python bench/scan_probe.py            # full probe (~3-6 min on an H200)
    PYTHONPATH=$PWD python bench/scan_probe.py --quick    # L=2048,4096 only, smaller sweep
    PYTHONPATH=$PWD python bench/scan_probe.py --quick --L 2048,16384   # smaller sweep, these lengths

Anchor shape (ANCHORS.md): bf16, batch 4, dim 2048, N 16, variable B/C (batch, N, L), with z, D,
delta_bias, delta_softplus. Times are medians of ``triton.testing.do_bench``; ratio = CUDA / scanopt
(> 1: scanopt faster). mamba_ssm is imported lazily and skipped when ``selective_scan_cuda`` is
missing. Not part of the package (bench/ holds data and scripts only).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import triton

from scanopt.ops.selective_scan import launch
from scanopt.ops.selective_scan.op import _backend, make_inputs, selective_scan_fn
from scanopt.verify import rel_l2

BATCH, DIM, N = 4, 2048, 16
DEV = "cuda"
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
BUDGET = 2.5e-2  # bf16 relative-L2 budget of the verify rule

# forward-only configs (no checkpoints): (BLOCK_D, BLOCK_G, BLOCK_R, num_warps[, COLS[, PREFETCH]])
FWD_SWEEP = [
    (4, 8, 16, 1, 2, 1), (8, 1, 8, 1, 1, 1, 1, 0, 4), (16, 1, 8, 1, 1, 1, 1, 0, 4),
    (32, 1, 8, 1, 1, 1, 1, 0, 4), (8, 1, 8, 1, 1, 1, 1, 0, 8), (16, 1, 8, 1, 1, 1, 1, 512, 4),
    (8, 1, 8, 1, 1, 0, 1, 0, 4), (8, 1, 8, 1, 1, 0, 1, 0, 1), (8, 1, 8, 1, 1, 1, 1, 512, 4),
    (8, 1, 8, 1, 1, 0, 1, 0, 2), (16, 1, 8, 2, 1, 0, 1, 0, 4),
    (1, 32, 16, 1, 1, 1), (1, 32, 8, 1, 2, 1), (1, 32, 4, 1, 2, 1),
    (1, 32, 16, 1), (4, 8, 16, 1), (2, 16, 16, 1), (2, 16, 16, 1, 1, 1), (1, 32, 8, 1, 1, 1),
    (2, 32, 16, 2, 1, 1), (1, 32, 32, 1, 1, 1),
]  # fmt: skip  # the first six are the --quick sweep
# serial rows: BLOCK_D above 32 * num_warps / NSPLIT puts several channels in each thread
# (CPL = BLOCK_D * NSPLIT / (32 * num_warps) sub-blocks, up to 4)
# training pairs timed in --quick too: (forward config, backward sweep tuple)
PAIR_SWEEP = [
    ({"SERIAL": 1, "BLOCK_D": 8, "num_warps": 1, "NSPLIT": 4}, (4, 8, 16, 1, 0, 1, 1)),
    # two channels per thread in the forward (CPL 2)
    ({"SERIAL": 1, "BLOCK_D": 16, "num_warps": 1, "NSPLIT": 4}, (4, 8, 16, 1, 0, 1, 1)),
    # the serial backward (8 channels x 4 state lanes per warp, 128-step checkpoint chunks)
    ({"SERIAL": 1, "BLOCK_D": 8, "num_warps": 1, "NSPLIT": 4}, (8, 8, 16, 1, 0, 1, 1, 1)),
    ({"SERIAL": 1, "BLOCK_D": 8, "num_warps": 1, "NSPLIT": 4}, (32, 8, 16, 4)),
    ({"SERIAL": 1, "BLOCK_D": 8, "num_warps": 1, "NSPLIT": 4}, (1, 32, 4, 1, 0, 1, 1)),
]
# training pairs: backward config (its chunk BLOCK_G*BLOCK_R is the checkpoint interval); the
# forward with checkpoints uses launch's default/tuned config fitted to that chunk
BWD_SWEEP = [
    (32, 8, 16, 4), (4, 8, 16, 1, 0, 8), (4, 8, 16, 1, 0, 1, 1), (2, 16, 8, 1, 0, 1, 1),
    (1, 32, 4, 1, 0, 1, 1), (4, 8, 16, 1, 0, 1, 2), (4, 8, 16, 1, 0, 4), (8, 8, 16, 2, 0, 4),
    (32, 8, 16, 4, 0, 1, 1), (8, 8, 16, 2, 0, 1, 1), (32, 8, 16, 8), (32, 8, 16, 4, 1),
    (4, 8, 16, 1), (4, 8, 16, 1, 1), (8, 8, 16, 2), (8, 8, 16, 2, 1), (16, 8, 16, 4),
    (16, 8, 16, 4, 1), (32, 8, 8, 8), (16, 8, 8, 4), (8, 32, 16, 8),
]  # fmt: skip  # (BLOCK_D, BLOCK_G, BLOCK_R, num_warps[, PREFETCH[, SEGMENTS[, ATOMIC_BC]]])


def cfg_of(t):
    """A forward sweep tuple (BD, G, R, warps[, COLS[, PREFETCH[, SERIAL, SEG, NSPLIT]]]) as a
    launch config (SERIAL 1: the serial family, a channel's states on NSPLIT lanes; G and R
    unused; SEG 0: automatic segments)."""
    cfg = {"BLOCK_D": t[0], "BLOCK_G": t[1], "BLOCK_R": t[2], "num_warps": t[3], "num_stages": 1}
    cfg["COLS"] = t[4] if len(t) > 4 else 1  # explicit: the launcher's default has COLS 2
    cfg["PREFETCH"] = t[5] if len(t) > 5 else 0
    if len(t) > 6:
        cfg["SERIAL"], cfg["SEG"], cfg["NSPLIT"] = t[6], t[7], t[8]
    return cfg


def bwd_cfg_of(t):
    """A backward sweep tuple (BD, G, R, warps[, PREFETCH[, SEGMENTS[, ATOMIC_BC[, SERIAL]]]])
    as a launch config (ATOMIC_BC > 0 or SERIAL 1: the non-deterministic backward; SERIAL 1:
    the serial family, NSPLIT 4, its chunk G * R)."""
    cfg = {"BLOCK_D": t[0], "BLOCK_G": t[1], "BLOCK_R": t[2], "num_warps": t[3], "num_stages": 1}
    cfg["PREFETCH"] = t[4] if len(t) > 4 else 0
    cfg["SEGMENTS"] = t[5] if len(t) > 5 else 1
    cfg["ATOMIC_BC"] = t[6] if len(t) > 6 else 0
    if len(t) > 7:
        cfg["SERIAL"], cfg["NSPLIT"] = t[7], 4
    return cfg


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def inputs(L, seed=0):
    x = make_inputs(BATCH, DIM, L, N, dtype=torch.bfloat16, device=DEV, seed=seed)
    return x


def fwd_launch(x, cfg, store_ckpt=False, chunk=None):
    args = [x[n] for n in NAMES]
    chunk = chunk or (128 if cfg.get("SERIAL") else cfg["BLOCK_G"] * cfg["BLOCK_R"])
    return launch.selective_scan_fwd(*args, None, True, chunk, store_ckpt, cfg)


def train_launch(x, bcfg, fcfg=None):
    """Forward with checkpoints (``fcfg``, else the default/tuned fwd config fitted to the
    chunk) + backward."""
    args = [x[n] for n in NAMES]
    chunk = bcfg["BLOCK_G"] * bcfg["BLOCK_R"]
    out, last, ck = launch.selective_scan_fwd(*args, None, True, chunk, True, fcfg)
    g = launch.selective_scan_bwd(x["dout"], None, *args, None, ck, True, chunk, bcfg,
                                  deterministic=not (bcfg.get("ATOMIC_BC") or bcfg.get("SERIAL")))
    return out, g


def public_fwd(x):
    return selective_scan_fn(*[x[n] for n in NAMES], delta_softplus=True)


def leaves(x, dtype=None):
    out = {}
    for n in NAMES:
        t = x[n].detach()
        if dtype is not None and t.dtype != torch.float32:
            t = t.to(dtype)
        out[n] = t.clone().requires_grad_()
    return out


def public_fwd_bwd(lv, dout):
    out = selective_scan_fn(*[lv[n] for n in NAMES], delta_softplus=True)
    out.backward(dout)
    return out


def mamba():
    try:
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
    except Exception as e:  # noqa: BLE001
        print(f"# mamba_ssm CUDA kernel not available ({type(e).__name__}: {e})")
        return None
    return fn


def check(x, mfn):
    """bf16 scanopt (public path, default/tuned configs) vs the fp32 torch path on the same
    inputs, output and every gradient; mamba_ssm's bf16 error alongside."""
    lv32 = leaves(x, torch.float32)
    with _backend("torch"):
        ref = public_fwd_bwd(lv32, x["dout"].float())
    ref_g = {n: lv32[n].grad for n in NAMES}
    lv = leaves(x)
    with _backend("triton"):
        out = public_fwd_bwd(lv, x["dout"])
    rows, ok = [], True
    m_err = {}
    if mfn is not None:
        lm = leaves(x)
        mo = mfn(*[lm[n] for n in NAMES], delta_softplus=True)
        mo.backward(x["dout"])
        m_err = {"out": rel_l2(mo.float(), ref)}
        m_err.update({f"d{n}": rel_l2(lm[n].grad.float(), ref_g[n]) for n in NAMES})
    errs = {"out": rel_l2(out.float(), ref)}
    errs.update({f"d{n}": rel_l2(lv[n].grad.float(), ref_g[n]) for n in NAMES})
    for k, e in errs.items():
        bad = not (e == e) or e > BUDGET
        ok &= not bad
        rows.append(f"  {k:12s} scanopt {e:.2e}  mamba_ssm {m_err.get(k, float('nan')):.2e}"
                    + ("  FAIL" if bad else ""))  # fmt: skip
    return ok, rows


def sweep(x, ref_out, ref_g):
    print("\n## forward config sweep (no checkpoints), L =", x["u"].shape[-1])
    best = None
    for t in FWD_SWEEP:
        cfg = cfg_of(t)
        try:
            out = fwd_launch(x, cfg)[0]
            e = rel_l2(out.float(), ref_out)
            ms = bench(lambda cfg=cfg: fwd_launch(x, cfg))
        except Exception as err:  # noqa: BLE001
            print(f"  {t}: failed ({type(err).__name__}: {str(err)[:80]})")
            continue
        flag = "" if e < BUDGET else "  WRONG"
        print(f"  BD,G,R,nw={t}: {ms:.3f} ms  err {e:.1e}{flag}")
        if not flag and (best is None or ms < best[1]):
            best = (t, ms)
    print("\n## training sweep: fwd with checkpoints (fitted default) + bwd config")
    bbest = None
    for t in BWD_SWEEP:
        cfg = bwd_cfg_of(t)
        try:
            out, g = train_launch(x, cfg)
            e = max(rel_l2(g[n].float(), ref_g[n]) for n in NAMES)
            e = max(e, rel_l2(out.float(), ref_out))
            ms = bench(lambda cfg=cfg: train_launch(x, cfg))
        except Exception as err:  # noqa: BLE001
            print(f"  {t}: failed ({type(err).__name__}: {str(err)[:80]})")
            continue
        flag = "" if e < BUDGET else "  WRONG"
        print(f"  BD,G,R,nw={t}: {ms:.3f} ms  max err {e:.1e}{flag}")
        if not flag and (bbest is None or ms < bbest[1]):
            bbest = (t, ms)
    print("\n## training pairs: fwd config (with checkpoints) + bwd config")
    for fc, t in PAIR_SWEEP:
        cfg = bwd_cfg_of(t)
        try:
            out, g = train_launch(x, cfg, fc)
            e = max(rel_l2(g[n].float(), ref_g[n]) for n in NAMES)
            e = max(e, rel_l2(out.float(), ref_out))
            ms = bench(lambda cfg=cfg, fc=fc: train_launch(x, cfg, fc))
        except Exception as err:  # noqa: BLE001
            print(f"  {fc} + {t}: failed ({type(err).__name__}: {str(err)[:80]})")
            continue
        flag = "" if e < BUDGET else "  WRONG"
        print(f"  {fc} + {t}: {ms:.3f} ms  max err {e:.1e}{flag}")
    return best, bbest


def row(L, mfn, best, bbest):
    x = inputs(L)
    f = bench(lambda: public_fwd(x))
    lv = leaves(x)
    fb = bench(lambda: public_fwd_bwd(lv, x["dout"]))
    cf = cfb = float("nan")
    if mfn is not None:
        cf = bench(lambda: mfn(*[x[n] for n in NAMES], delta_softplus=True))
        lm = leaves(x)

        def m_fb():
            mfn(*[lm[n] for n in NAMES], delta_softplus=True).backward(x["dout"])

        cfb = bench(m_fb)
    bf = bench(lambda: fwd_launch(x, cfg_of(best[0]))) if best else float("nan")
    bfb = bench(lambda: train_launch(x, bwd_cfg_of(bbest[0]))) if bbest else float("nan")
    vals = (f, fb, cf, cfb, cf / f, cfb / fb, bf, bfb, f"{cf / bf:.2f}/{cfb / bfb:.2f}")
    print(" | ".join([f"{L:>9d}"] + [v if isinstance(v, str) else f"{v:9.3f}" for v in vals]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument(
        "--L", help="comma-separated lengths of the timing table (default: 2k-16k, --quick 2k,4k)"
    )
    a = ap.parse_args()
    Ls = [2048, 4096] if a.quick else [2048, 4096, 8192, 16384]
    if a.L:
        Ls = [int(v) for v in a.L.split(",")]
    t0 = time.time()
    name = torch.cuda.get_device_name() if DEV == "cuda" else DEV
    print(f"# {name}, torch {torch.__version__}, triton {triton.__version__}")
    mfn = mamba()

    # correctness at the anchor shape, L = 2048, against the fp32 torch path
    x = inputs(2048)
    ok, rows = check(x, mfn)
    print("## correctness, L=2048 (rel L2 vs fp32 torch path):", "PASS" if ok else "FAIL")
    print("\n".join(rows))
    if not ok:
        sys.exit(1)

    best = bbest = None
    if not a.no_sweep:
        xs = inputs(4096, seed=1)
        lv32 = leaves(xs, torch.float32)
        with _backend("torch"):
            ref = public_fwd_bwd(lv32, xs["dout"].float())
        ref_g = {n: lv32[n].grad for n in NAMES}
        if a.quick:
            del FWD_SWEEP[6:], BWD_SWEEP[6:], PAIR_SWEEP[3:]
        best, bbest = sweep(xs, ref.detach(), ref_g)
        del xs, lv32, ref, ref_g
        print(f"\n# best fwd {best}, best training bwd {bbest}  ({time.time() - t0:.0f} s)")

    print("\n## timings, ms (median); ratio = mamba_ssm CUDA / scanopt")
    hdr = ("L", "fwd", "fwd+bwd", "cuda fwd", "cuda f+b", "fwd x", "f+b x", "best fwd",
           "best f+b*", "best x")  # fmt: skip
    print(" | ".join(f"{h:>9s}" for h in hdr))
    for L in Ls:
        row(L, mfn, best, bbest)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    print("# *best f+b: launch-level fwd-with-ckpt + bwd (no autograd overhead, no casts)")
    print(f"# done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
