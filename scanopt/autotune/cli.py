"""``scanopt tune`` and ``scanopt configs``: ``register(subparsers)`` adds both to the ``scanopt``
command line (``scanopt/cli.py`` calls it). Heavy imports happen inside the commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

DTYPES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")


def register(subparsers: Any) -> None:
    """Add the ``tune`` and ``configs`` sub-commands to an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "tune",
        help="tune kernel launch configs for this GPU (Optuna; correctness-gated)",
        description="Run one Optuna study per (op, direction, dtype, shape bucket) on this GPU. "
        "Every config is verified against the NumPy float64 reference before it is timed; "
        "compile errors, out-of-resources and wrong results are pruned. Small valid spaces "
        "(<= 300 points) are enumerated, larger ones sampled with multivariate TPE seeded by "
        "the heuristic default. The winner goes to the user config store, where the op picks "
        "it up at run time. Without a GPU the kernels run in Triton's interpreter (for testing "
        "the tuner only: CPU timings say nothing about a GPU).",
    )
    p.add_argument("--op", help="op to tune (see --list), or package.module:ATTR of a Tunable")
    p.add_argument("--direction", choices=("fwd", "bwd", "all"), default="all", help="default: all")
    p.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        help="repeatable; default bfloat16 on a GPU, float32 on the CPU",
    )
    p.add_argument(
        "--shape",
        action="append",
        metavar="SPEC",
        help="repeatable: name=value pairs ('T=4096,H=32'; the rest from the op's example "
        "shape) or every size ('4x4096x32x64x64'); see --list for the dims",
    )
    p.add_argument(
        "--bench-shapes",
        action="store_true",
        help="the op's benchmark shapes (ANCHORS.md width: batch 4, d_model 2048, L 1k-16k)",
    )
    p.add_argument(
        "--trials", type=int, default=100, help="distinct configs to compile and run per study"
    )
    p.add_argument("--timeout", type=float, help="seconds per study (stops asking new trials)")
    p.add_argument(
        "--sampler",
        choices=("auto", "tpe", "cmaes", "gp", "random", "grid"),
        default="auto",
        help="auto: enumerate valid spaces of <= 300 points, else multivariate TPE",
    )
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage shared by every worker: sqlite:///f.db, postgresql://..., "
        "mysql://..., journal:PATH (default: SQLite in the user cache dir)",
    )
    p.add_argument("--study", metavar="NAME", help="study name (default: derived from the key)")
    p.add_argument(
        "--jobs", type=int, default=1, help="worker processes (one per visible GPU; default 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampler seed (a study is repeatable)")
    p.add_argument(
        "--trial-timeout",
        type=float,
        default=900.0,
        help="seconds one trial may take before its worker is killed (default 900)",
    )
    p.add_argument(
        "--rebench",
        type=int,
        default=3,
        help="re-time the best K configs and the default interleaved at the end (0: off)",
    )
    p.add_argument(
        "--reps", type=int, default=3, help="timed runs per config without CUDA (wall clock)"
    )
    p.add_argument("--no-save", action="store_true", help="do not write the user config store")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the tunable kernels and exit")
    p.set_defaults(func=cmd_tune)

    c = subparsers.add_parser(
        "configs",
        help="list, show, export, import or clear tuned configs",
        description="The config store: the user store ($SCANOPT_CACHE_DIR/configs, written "
        "by `scanopt tune`) and the configs shipped in the package (scanopt/configs/<GPU>/). "
        "Run-time lookup order: user, shipped, nearest shape bucket, heuristic default.",
    )
    csub = c.add_subparsers(dest="configs_command", metavar="ACTION")
    c.set_defaults(func=lambda args: (c.print_help(), 0)[1])

    c_list = csub.add_parser("list", help="table of stored configs (this GPU; --all: every GPU)")
    c_list.add_argument("--op")
    c_list.add_argument("--all", action="store_true", help="every GPU, not only this one")
    c_list.set_defaults(func=cmd_configs_list)

    c_show = csub.add_parser(
        "show", help="the config an op would use here (with --shape) or its stored entries"
    )
    c_show.add_argument("op")
    c_show.add_argument("--direction", choices=("fwd", "bwd", "all"), default="all")
    c_show.add_argument("--dtype", choices=DTYPES)
    c_show.add_argument("--shape", action="append", metavar="SPEC")
    c_show.set_defaults(func=cmd_configs_show)

    c_exp = csub.add_parser(
        "export",
        help="write user-store configs to the package's shipped store or a file/folder",
    )
    where = c_exp.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--shipped",
        action="store_true",
        help="into scanopt/configs/<GPU>/<op>.json of this source tree (merged)",
    )
    where.add_argument(
        "--to", metavar="PATH", help="a .json bundle file, or a folder laid out like a store"
    )
    c_exp.add_argument("--op")
    c_exp.add_argument("--all-gpus", action="store_true", help="not only this GPU's configs")
    c_exp.set_defaults(func=cmd_configs_export)

    c_imp = csub.add_parser("import", help="merge config files or folders into the user store")
    c_imp.add_argument("paths", nargs="+", metavar="PATH")
    c_imp.set_defaults(func=cmd_configs_import)

    c_clr = csub.add_parser("clear", help="delete user-store configs (shipped ones stay)")
    c_clr.add_argument("--op")
    c_clr.add_argument("--yes", action="store_true", help="really delete")
    c_clr.set_defaults(func=cmd_configs_clear)


# --------------------------------------------------------------------------------------------
# tune


def _prepare_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    # Triton decides at decoration time: before any kernel module is imported
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu"


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    try:
        from tabulate import tabulate

        return tabulate(rows, headers=headers)
    except ImportError:
        lines = ["  ".join(headers)]
        lines += ["  ".join(str(c) for c in r) for r in rows]
        return "\n".join(lines)


def cmd_tune(args: argparse.Namespace) -> int:
    """``scanopt tune``."""
    device = _prepare_device()
    from scanopt.autotune import spaces, tuner
    from scanopt.autotune.api import bucket_str
    from scanopt.autotune.store import dtype_name

    if args.list:
        rows = []
        for t in spaces.tunables():
            rows.append(
                [
                    t.op,
                    t.direction,
                    "x".join(t.dims),
                    bucket_str(t.example_shape),
                    ", ".join(t.exact) or "-",
                ]
            )
        print(_table(rows, ["op", "direction", "dims", "example shape", "exact dims"]))
        missing = [o for o in spaces.known_ops() if o not in {r[0] for r in rows}]
        if missing:
            print(f"not available here: {', '.join(missing)}")
        return 0
    if not args.op:
        print("scanopt tune: error: --op is required (or --list)", file=sys.stderr)
        return 2
    try:
        dirs = spaces.directions(args.op) if args.direction == "all" else [args.direction]
    except (ValueError, ImportError, AttributeError) as exc:
        print(f"scanopt tune: error: {exc}", file=sys.stderr)
        return 2
    if not dirs:
        print(f"scanopt tune: error: op {args.op!r} is not available here", file=sys.stderr)
        return 2
    dtypes = [dtype_name(d) for d in (args.dtype or [])] or [
        "bfloat16" if device == "cuda" else "float32"
    ]
    if device == "cpu" and "bfloat16" in dtypes:
        print(
            "scanopt tune: warning: bf16 arithmetic is wrong under Triton's interpreter; "
            "every config will be rejected",
            file=sys.stderr,
        )
    results = []
    for direction in dirs:
        try:
            tunable = spaces.get_tunable(args.op, direction)
            shapes = [tunable.parse_shape(s) for s in args.shape or []]
        except ValueError as exc:
            print(f"scanopt tune: error: {exc}", file=sys.stderr)
            return 2
        if args.bench_shapes:
            shapes += [tunable.full_shape(s) for s in tunable.bench_shapes]
        if not shapes:
            shapes = [tunable.full_shape()]
        n_studies = len(shapes) * len(dtypes)
        for dtype in dtypes:
            for shape in shapes:
                name = args.study
                if name and (n_studies > 1 or len(dirs) > 1):
                    name = f"{name}.{tunable.direction}.{dtype}.{bucket_str(shape)}"
                result = tuner.tune(
                    args.op,
                    direction,
                    dtype,
                    shape,
                    trials=args.trials,
                    timeout=args.timeout,
                    sampler=args.sampler,
                    storage=args.storage,
                    study_name=name,
                    jobs=args.jobs,
                    seed=args.seed,
                    reps=args.reps,
                    trial_timeout=args.trial_timeout,
                    rebench=args.rebench,
                    save=not args.no_save,
                    progress=not args.quiet,
                )
                results.append(result)
                if not args.quiet:
                    print(_result_line(result), flush=True)
    rows = []
    for r in results:
        pruned = sum(v for k, v in r.statuses.items() if k not in ("ok", "duplicate"))
        rows.append(
            [
                f"{r.op}.{r.direction}",
                r.dtype,
                bucket_str(r.shape),
                r.sampler,
                f"{r.evaluated}/{r.trials}",
                pruned,
                _fmt_ms(r.default_ms),
                _fmt_ms(r.best_ms),
                "-" if r.speedup is None else f"{r.speedup:.2f}x",
                json.dumps(r.best_config) if r.best_config else "none valid",
            ]
        )
    print(
        _table(
            rows,
            [
                "kernel",
                "dtype",
                "shape",
                "sampler",
                "run/trials",
                "pruned",
                "default ms",
                "best ms",
                "speedup",
                "config",
            ],
        )  # fmt: skip
    )
    if results and not args.no_save:
        saved = sorted({r.saved_to for r in results if r.saved_to})
        if saved:
            print("saved to " + ", ".join(saved))
    return 0 if all(r.best_config is not None for r in results) else 1


def _result_line(r: Any) -> str:
    speed = "" if r.speedup is None else f", {r.speedup:.2f}x over the default"
    return (
        f"{r.op}.{r.direction} {r.dtype} {r.shape}: best {_fmt_ms(r.best_ms)} ms{speed} "
        f"({r.evaluated} configs run, {r.trials} trials; study {r.study!r} in {r.storage})"
    )


# --------------------------------------------------------------------------------------------
# configs


def _here():
    import torch  # noqa: F401  (device_props)

    from scanopt.autotune.device import device_props

    return device_props(None)


def _all_entries() -> list[tuple[str, str, dict[str, Any]]]:
    """(source, file, entry) for every stored entry, user store first."""
    from scanopt.autotune import store

    out = []
    for path, entries in store.iter_store(store.user_root()):
        out += [("user", str(path), e) for e in entries]
    for name, entries in store.iter_shipped():
        out += [("shipped", name, e) for e in entries]
    return out


def _select(entries, op: str | None, gpu: dict | None):
    for src, f, e in entries:
        if op and e.get("op") != op:
            continue
        if gpu is not None and e.get("gpu") != gpu:
            continue
        yield src, f, e


def cmd_configs_list(args: argparse.Namespace) -> int:
    from scanopt.autotune.api import bucket_str
    from scanopt.autotune.store import triton_version

    gpu = None if args.all else _here().key()
    rows = []
    for src, _, e in _select(_all_entries(), args.op, gpu):
        meta = e.get("meta", {})
        stale = "" if e.get("triton") == triton_version() else " (other Triton: ignored)"
        rows.append(
            [
                src,
                e["gpu"]["name"] + ("" if gpu else f" sm{e['gpu'].get('sm_count')}"),
                str(e.get("triton")) + stale,
                f"{e.get('op')}.{e.get('direction')}",
                e.get("dtype"),
                bucket_str(e.get("bucket", {})),
                json.dumps(e.get("config")),
                _fmt_ms(meta.get("ms")),
                "-" if not meta.get("speedup") else f"{meta['speedup']:.2f}x",
            ]
        )
    if not rows:
        where = "any GPU" if args.all else f"this device ({_here().name})"
        print(f"no stored configs for {where}")
        return 0
    print(
        _table(
            rows,
            ["source", "gpu", "triton", "kernel", "dtype", "bucket", "config", "ms", "speedup"],
        )
    )
    return 0


def cmd_configs_show(args: argparse.Namespace) -> int:
    device = _prepare_device()
    from scanopt.autotune import spaces, store

    props = _here()
    if not args.shape:
        found = [e for _, _, e in _select(_all_entries(), args.op, props.key())]
        print(json.dumps(found, indent=1))
        return 0
    dtype = store.dtype_name(args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    try:
        dirs = spaces.directions(args.op) if args.direction == "all" else [args.direction]
        for direction in dirs:
            t = spaces.get_tunable(args.op, direction)
            for spec in args.shape:
                shape = t.parse_shape(spec)
                default = t.default(shape, dtype, props)
                source, _ = store.lookup(t.op, direction, dtype, shape, device)
                cfg = store.resolve_config(t.op, direction, dtype, shape, default, device=device)
                print(f"{t.name} {dtype} {shape}: {json.dumps(cfg)}  [{source}]")
    except (ValueError, ImportError) as exc:
        print(f"scanopt configs show: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_configs_export(args: argparse.Namespace) -> int:
    from scanopt.autotune import store
    from scanopt.autotune.device import gpu_slug

    gpu = None if args.all_gpus else _here().key()
    chosen = [e for src, _, e in _select(_all_entries(), args.op, gpu) if src == "user"]
    if not chosen:
        print("nothing to export: the user store has no matching configs")
        return 1
    if args.shipped or not args.to.endswith(".json"):
        root = store.shipped_dir() if args.shipped else Path(args.to)
        groups: dict[Path, list[dict[str, Any]]] = {}
        for e in chosen:
            groups.setdefault(root / gpu_slug(e["gpu"]["name"]) / f"{e['op']}.json", []).append(e)
        for path, entries in sorted(groups.items()):
            store.merge_into(path, entries)
            print(f"wrote {len(entries)} configs to {path}")
    else:
        path = Path(args.to)
        store.merge_into(path, chosen)
        print(f"wrote {len(chosen)} configs to {path}")
    return 0


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted([*path.glob("*.json"), *path.glob("*/*.json")])
    return [path]


def cmd_configs_import(args: argparse.Namespace) -> int:
    from scanopt.autotune import store

    n = 0
    for arg in args.paths:
        path = Path(arg)
        if not path.exists():
            print(f"scanopt configs import: error: {path} does not exist", file=sys.stderr)
            return 2
        for f in _files_of(path):
            entries = store.read_file(f)
            for e in entries:
                store.record(e)
            n += len(entries)
            print(f"imported {len(entries)} configs from {f}")
    print(f"{n} configs in the user store at {store.user_root()}")
    return 0


def cmd_configs_clear(args: argparse.Namespace) -> int:
    from scanopt.autotune import store

    root = store.user_root()
    files = sorted(root.glob(f"*/{args.op}.json" if args.op else "*/*.json"))
    if not files:
        print(f"nothing to clear in {root}")
        return 0
    if not args.yes:
        for f in files:
            print(f"would delete {f}")
        print("add --yes to delete")
        return 1
    for f in files:
        f.unlink()
        print(f"deleted {f}")
    store.clear_cache()
    return 0
