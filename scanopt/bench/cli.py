"""The ``scanopt bench`` command. ``register(subparsers)`` adds it to the main CLI's parser.

scanopt bench [--op OPS] [--L LENS] [--dtype DTYPES] [--quick] [--providers NAMES] [--reference NAME]
              [--directions DIRS] [--format github|plain|csv|json] [--save]
              [--results-dir DIR] [--ceilings] [--cudagraph | --no-cudagraph]
              [--no-verify] [--warmup MS] [--rep MS] [--seed N] [--rwkv-lm ADAPTER] [--list]
scanopt bench report [--results-dir DIR] [--out FILE] [--plots-dir DIR] [--no-plots]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from scanopt.bench.formulas import DIRECTIONS
from scanopt.bench.registry import SUITES, dtype_name

#: where the benchmarks run (tests point it at the CPU)
DEVICE = "cuda"

NO_GPU = (
    "scanopt bench: no CUDA GPU is visible (torch.cuda.is_available() is False); benchmarks "
    "need one (`scanopt bench report` works anywhere)."
)

DESCRIPTION = """\
Time scanopt and every available provider (torch SDPA backends, mamba_ssm, fla, flash_attn,
RWKV-LM, the PyTorch path) on the same inputs, verify each one's outputs and gradients against a
float64 reference, and print tables: ms (median, p20-p80), TFLOP/s or GB/s, % of this GPU's
measured ceiling, the verified error and the speedup against every other provider. Rows that
fail verification are printed as FAILED and never compared.

Ops: attention (causal, 16 heads x 128), attention_nc (non-causal), attention_h32 and
attention_h32_nc (32 heads x 64), selective_scan, ssd, state_update, wkv4, wkv6, wkv7 (default:
all). Default shapes mirror ANCHORS.md: batch 4, d_model 2048, L = 1024..16384 (--quick: 1024
and 4096), bf16. The decode step (state_update) sweeps the batch (1..64) instead of L.
"""


def _split(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command (and its ``report`` sub-command) to ``subparsers``; the
    parser's default ``func(args) -> int`` runs it."""
    p = subparsers.add_parser(
        "bench",
        help="side-by-side microbenchmarks of scanopt and the upstream kernels",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--op", action="append", metavar="OPS", help="ops to run, comma-separated (default: all)"
    )
    p.add_argument(
        "--L",
        action="append",
        metavar="LENS",
        dest="lengths",
        help="sequence lengths, comma-separated (default: each op's sweep)",
    )
    p.add_argument(
        "--dtype",
        action="append",
        metavar="DTYPES",
        help="bf16, fp16, fp32, comma-separated (default: bf16)",
    )
    p.add_argument(
        "--quick", action="store_true", help="short sweep: L=1024,4096 (decode step: batch 4)"
    )
    p.add_argument(
        "--providers",
        action="append",
        metavar="NAMES",
        help="providers to run, comma-separated (default: all; see --list)",
    )
    p.add_argument(
        "--reference",
        metavar="NAME",
        default=None,
        help="the provider whose float32 run is the reference where NumPy cannot run (default: "
        "the suite's order, e.g. fla first for WKV-6/7; scanopt-chunked skips fla's float32 "
        "autotuning)",
    )
    p.add_argument(
        "--directions",
        action="append",
        metavar="DIRS",
        help="fwd, bwd, fwd+bwd, comma-separated (default: all the op has)",
    )
    p.add_argument(
        "--format",
        choices=("github", "plain", "csv", "json"),
        default="github",
        help="output format (default: github)",
    )
    p.add_argument(
        "--save", action="store_true", help="upsert the rows into RESULTS_DIR/<GPU_SLUG>/<op>.csv"
    )
    p.add_argument(
        "--results-dir",
        default="bench/results",
        help="where --save writes (default: bench/results)",
    )
    p.add_argument(
        "--ceilings",
        action="store_true",
        help="(re)measure this GPU's copy bandwidth and bf16 matmul rate, cache them "
        "in the user cache dir and print them; alone, do nothing else",
    )
    p.add_argument(
        "--cudagraph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time forwards with CUDA graphs (default: only the decode step)",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip verification (rows are 'skipped' and get no speedups)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=25,
        metavar="MS",
        help="do_bench warm-up time per timing (default 25 ms)",
    )
    p.add_argument(
        "--rep",
        type=float,
        default=100,
        metavar="MS",
        help="do_bench measuring time per timing (default 100 ms)",
    )
    p.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    p.add_argument(
        "--rwkv-lm",
        metavar="ADAPTER",
        help="adapter module or .py file exposing RWKV-LM's kernels (see scanopt.bench.rwkv_lm)",
    )
    p.add_argument(
        "--list", action="store_true", help="list ops and providers, and which providers load here"
    )
    p.set_defaults(func=run_bench, bench_command=None)

    sub = p.add_subparsers(dest="bench_command", metavar="report")
    r = sub.add_parser(
        "report",
        help="render bench/README.md and bench/plots/*.png from the results CSVs (no GPU needed)",
        description="Render the README tables and PNG plots (crossover plot included) from the "
        "committed CSVs. Plots need matplotlib (pip install 'scanopt[plot]').",
    )
    r.add_argument("--results-dir", default="bench/results", help="default: bench/results")
    r.add_argument("--out", default="bench/README.md", help="default: bench/README.md")
    r.add_argument("--plots-dir", default="bench/plots", help="default: bench/plots")
    r.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    r.set_defaults(func=run_report, bench_command="report")
    return p


def run_report(args: argparse.Namespace) -> int:
    from scanopt.bench.report import write_report

    out = write_report(args.results_dir, args.out, args.plots_dir, plots=args.plots)
    for m in out.messages:
        print(f"scanopt bench report: {m}", file=sys.stderr)
    print(f"wrote {out.readme}" + (f" and {len(out.plots)} plots" if out.plots else ""))
    return 0


def _selected_ops(args: argparse.Namespace) -> list[str]:
    ops = _split(args.op) or list(SUITES)
    unknown = [o for o in ops if o not in SUITES]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; known: {', '.join(SUITES)}")
    return ops


def _list(ops: Sequence[str]) -> int:
    from scanopt.bench.registry import Unavailable, get_suite

    for op in ops:
        suite = get_suite(op)
        print(f"{op}: {suite.title}; sweep {suite.sweep_key} = {list(suite.default_sweep)}")
        for p in suite.providers():
            try:
                impl = p.resolve()
                state = "available" + (f" ({impl.detail})" if impl.detail else "")
            except Unavailable as e:
                state = f"unavailable: {e}"
            print(f"  {p.name:15s} {p.description}: {state}")
    return 0


def _summarise_notes(results: Sequence[Any]) -> list[str]:
    """Notes of one op's cases: a note every case shares is printed once, others per case."""
    counts: dict[str, int] = {}
    for res in results:
        for n in dict.fromkeys(res.notes + [f"reference: {res.reference}"]):
            counts[n] = counts.get(n, 0) + 1
    out, seen = [], set()
    for res in results:
        label = f"{res.case.dtype} {res.case.shape}"
        for n in res.notes + [f"reference: {res.reference}"]:
            text = n if counts[n] == len(results) else f"{label}: {n}"
            if text not in seen:
                seen.add(text)
                out.append(text)
    return out


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from scanopt.bench import results, rwkv_lm, timing
    from scanopt.bench.registry import get_suite
    from scanopt.bench.runner import RunConfig, run_sweep
    from scanopt.bench.table import render

    try:
        ops = _selected_ops(args)
        dtypes = [dtype_name(d) for d in (_split(args.dtype) or [])] or None
        lengths = [int(v) for v in (_split(args.lengths) or [])] or None
        directions = _split(args.directions)
        if directions and any(d not in DIRECTIONS for d in directions):
            raise ValueError(f"--directions takes {', '.join(DIRECTIONS)}")
        providers = _split(args.providers)
        known = {p.name for op in ops for p in get_suite(op).providers()}
        if providers:
            unknown = [p for p in providers if p not in known]
            if unknown:
                raise ValueError(
                    f"unknown provider(s) {', '.join(unknown)}; the selected ops have "
                    f"{', '.join(sorted(known))}"
                )
        if args.reference and args.reference not in known:
            raise ValueError(
                f"unknown --reference {args.reference}; the selected ops have "
                f"{', '.join(sorted(known))}"
            )
    except ValueError as e:
        print(f"scanopt bench: {e}", file=sys.stderr)
        return 2

    rwkv_lm.configure(args.rwkv_lm)
    if args.list:
        return _list(ops)
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 1
    ceilings = timing.get_ceilings(remeasure=args.ceilings)
    if args.ceilings:
        print(
            f"{ceilings['gpu']}: copy {ceilings['copy_gbps']:.0f} GB/s, bf16 matmul "
            f"{ceilings['matmul_tflops']:.0f} TFLOP/s (cached in the user cache dir)"
        )
        if not args.op:
            return 0

    cfg = RunConfig(
        device=DEVICE,
        directions=directions,
        providers=providers,
        reference=args.reference,
        verify=args.verify,
        cudagraph=args.cudagraph,
        seed=args.seed,
    )
    timer = timing.CudaTimer(warmup_ms=args.warmup, rep_ms=args.rep)
    env = results.environment(DEVICE)
    tables = args.format in ("github", "plain")
    all_rows = []
    for op in ops:
        suite = get_suite(op)
        if suite.sweep_key == "L":
            values = lengths or (suite.quick_sweep if args.quick else suite.default_sweep)
        else:
            values = suite.quick_sweep if args.quick else suite.default_sweep
        work = [(suite, c) for c in suite.cases(values, dtypes or suite.default_dtypes)]
        done = run_sweep(work, cfg, timer, env, ceilings)
        rows = [r for res in done for r in res.rows]
        all_rows += rows
        if args.save and rows:
            for path in results.save_rows(args.results_dir, rows):
                print(f"saved {path}", file=sys.stderr)
        notes = _summarise_notes(done)
        if suite.sweep_key != "L" and lengths:
            notes.append(f"--L does not apply to {op}; it sweeps {suite.sweep_key}")
        if tables:
            print(f"## {op}: {suite.title}\n")
            print(render(rows, args.format, notes), flush=True)
        else:  # keep stdout machine-readable
            print("\n".join(f"{op}: {n}" for n in notes), file=sys.stderr)
    if not tables:
        print(render(all_rows, args.format), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m scanopt.bench``); the package CLI calls ``register``."""
    parser = argparse.ArgumentParser(prog="scanopt")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
