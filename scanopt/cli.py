"""The ``scanopt`` command line: ``info``, ``verify``, ``bench``, ``tune`` and ``configs``.

Heavy imports (torch, triton, the kernels) happen inside the sub-commands, after the command
line is parsed, so ``--help`` is instant and ``verify`` can switch on Triton's interpreter
before any kernel is decorated.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from collections.abc import Sequence


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (plus the hint), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _gpu_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def cmd_info(args: argparse.Namespace) -> int:
    """Print the machine, versions, backend and config store paths."""
    import scanopt
    from scanopt import _env
    from scanopt.ops import available_ops

    rows: list[tuple[str, str]] = [
        ("scanopt", scanopt.__version__),
        ("python", platform.python_version()),
    ]
    try:
        import torch

        rows.append(("torch", torch.__version__))
        has_cuda = torch.cuda.is_available()
    except ImportError:
        rows.append(("torch", "not installed"))
        has_cuda = False
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    if has_cuda:
        props = torch.cuda.get_device_properties(0)
        rows += [
            ("device", f"{props.name} (cuda:0 of {torch.cuda.device_count()})"),
            ("capability", f"{props.major}.{props.minor}"),
            ("SMs", str(props.multi_processor_count)),
            ("memory", f"{props.total_memory / 2**30:.0f} GiB"),
        ]
        slug = _gpu_slug(props.name)
    else:
        rows.append(("device", f"CPU ({platform.processor() or platform.machine()}), no CUDA GPU"))
        slug = "CPU"
    setting = _env.backend_setting()
    effective = _env.backend_for("cuda" if has_cuda else "cpu")
    rows += [
        ("SCANOPT_BACKEND", f"{setting} -> {effective} on this device"),
        (
            "TRITON_INTERPRET",
            "1 (kernels run in Triton's interpreter)" if _env.interpreting() else "0",
        ),
        ("cache dir", str(_env.cache_dir())),
        ("user configs", str(_env.cache_dir() / "configs")),
        ("shipped configs", f"scanopt/configs/{slug}/ (package data)"),
        ("ops", ", ".join(available_ops()) or "none built yet"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every op (or the chosen ones) against its NumPy float64 reference."""
    import torch  # noqa: F401  (imported before the kernels; does not decorate any)

    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        # Triton decides at decoration time, so this must precede importing any kernel module.
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("SCANOPT_POISON", "1")
    from scanopt.ops import OPS, available_ops, load

    device = "cuda" if has_cuda else "cpu"
    quick = args.quick or not has_cuda
    wanted = args.op or list(OPS)
    present = set(available_ops())
    where = "GPU" if has_cuda else "CPU through Triton's interpreter"
    print(f"scanopt verify on {where}: {', '.join(wanted)}{' (quick)' if quick else ''}")
    failed = 0
    checked = 0
    for i, name in enumerate(wanted, 1):
        prefix = f"[{i}/{len(wanted)}] {name:<15}"
        if name not in present:
            print(f"{prefix} skipped: not built in this version")
            continue
        start = time.perf_counter()
        try:
            reports = load(name).self_check(device=device, quick=quick)
        except Exception as exc:  # a crash is a failure of this op, not of the command
            failed += 1
            print(f"{prefix} FAILED: {type(exc).__name__}: {exc}")
            continue
        seconds = time.perf_counter() - start
        bad = [r for r in reports if not r.passed]
        checked += 1
        if bad or not reports:
            failed += 1
            print(f"{prefix} FAILED ({len(bad)} of {len(reports)} cases, {seconds:.1f} s)")
            for report in bad:
                print(str(report))
        else:
            worst = max(reports, key=lambda r: r.max_err)
            print(f"{prefix} ok ({len(reports)} cases, {seconds:.1f} s; worst {worst.summary()})")
    print(f"{checked} ops checked, {failed} failed")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (sub-commands register themselves here)."""
    from scanopt import __version__
    from scanopt.ops import OPS

    parser = _Parser(
        prog="scanopt",
        description="Verified, tuned Triton kernels for selective scan, WKV and flash attention.",
    )
    parser.add_argument("--version", action="version", version=f"scanopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p_info = sub.add_parser("info", help="device, versions, backend and config store paths")
    p_info.set_defaults(func=cmd_info)

    p_verify = sub.add_parser(
        "verify",
        help="check every op against its NumPy float64 reference",
        description="Run each op's kernels (forward and backward) on fresh random inputs and "
        "compare them with the NumPy float64 reference under scanopt.verify's rule. Without a "
        "GPU the Triton kernels run through Triton's interpreter on small shapes. Exits 1 if any "
        "op fails.",
    )
    p_verify.add_argument(
        "--op", action="append", choices=list(OPS), help="op to check (repeatable)"
    )
    p_verify.add_argument("--quick", action="store_true", help="small shapes only (always on CPU)")
    p_verify.set_defaults(func=cmd_verify)

    for module in ("scanopt.bench.cli", "scanopt.autotune.cli"):
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scanopt`` console script and ``python -m scanopt``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
