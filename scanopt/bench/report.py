"""``scanopt bench report``: render ``bench/README.md`` and the PNG plots from the committed CSVs.

Works on any machine (no GPU, no torch needed): it reads ``bench/results/<GPU_SLUG>/*.csv``,
writes one section per GPU with one table per op and dtype (milliseconds, ``forward /
forward+backward`` as in ANCHORS.md, and scanopt's speedup over the fastest other verified
provider), and draws with matplotlib (the ``plot`` extra):

- ``<GPU_SLUG>_crossover.png``: forward+backward time per layer against sequence length at
  batch 4, d_model 2048 (bf16 when present): attention (scanopt, and the best SDPA backend at each
  length), the Mamba-1 selective scan, Mamba-2 SSD and RWKV-4/6/7 (scanopt solid, the fastest
  other verified provider dashed). Where a linear-time op's line falls below attention's is the
  crossover the project exists to move below 2k tokens.
- ``<GPU_SLUG>_<op>_<dtype>.png``: every verified provider of one op, forward and forward+backward.

Only rows that passed verification are drawn or compared.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scanopt.bench.results import FAILED, SELF, SKIPPED, Row, gpu_slug, parse_shape, read_results

#: display order and titles (the report does not import the suites: they need torch)
OP_TITLES = {
    "attention": "Attention (causal, 16 heads x 128)",
    "attention_nc": "Attention (non-causal, 16 heads x 128)",
    "attention_h32": "Attention (causal, 32 heads x 64)",
    "attention_h32_nc": "Attention (non-causal, 32 heads x 64)",
    "selective_scan": "Mamba-1 selective scan (dim 2048, dstate 16)",
    "ssd": "Mamba-2 SSD (64 heads x 64, dstate 128)",
    "state_update": "Mamba-1 decode step (dim 2048, dstate 16)",
    "wkv4": "RWKV-4 WKV (C 2048)",
    "wkv6": "RWKV-6 WKV (32 heads x 64)",
    "wkv7": "RWKV-7 WKV (32 heads x 64)",
}
SWEEP_KEY = {"state_update": "B"}
#: model width of a row (d_model), for the crossover plot's "same width" filter
WIDTH = {
    "attention": ("H", "D"),
    "selective_scan": ("D",),
    "ssd": ("H", "P"),
    "wkv4": ("C",),
    "wkv6": ("H", "K"),
    "wkv7": ("H", "K"),
}
CROSSOVER_LABELS = {
    "attention": "attention",
    "selective_scan": "Mamba-1 scan",
    "ssd": "Mamba-2 SSD",
    "wkv4": "RWKV-4",
    "wkv6": "RWKV-6",
    "wkv7": "RWKV-7",
}

MATPLOTLIB_HINT = (
    "the plots need matplotlib: pip install 'scanopt[plot]' (or pip install matplotlib)"
)


@dataclass
class ReportOutput:
    readme: Path
    plots: list[Path] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(MATPLOTLIB_HINT) from e
    return Figure


def _sweep_value(r: Row) -> int | None:
    v = parse_shape(r.shape).get(SWEEP_KEY.get(r.op, "L"))
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _width(r: Row) -> int | None:
    dims = parse_shape(r.shape)
    keys = WIDTH.get(r.op)
    if not keys or any(k not in dims for k in keys):
        return None
    w = 1
    for k in keys:
        w *= int(dims[k])
    return w


def _shape_sort_key(shape: str) -> tuple:
    out = []
    for v in parse_shape(shape).values():
        try:
            out.append((0, int(v), ""))
        except ValueError:
            out.append((1, 0, v))
    return tuple(out)


def _ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    known = [v for v in order if v in values]
    return known + sorted(v for v in values if v not in order)


def _ms(x: float) -> str:
    """Milliseconds with 2-3 significant decimals, as ANCHORS.md prints them."""
    if x < 1:
        return f"{x:.3f}"
    return f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _cell(r: Row | None) -> str:
    if r is None or r.ms_p50 is None:
        return ""
    if r.verified == FAILED:
        return "FAILED"
    mark = {SELF: "†", SKIPPED: "?"}.get(r.verified, "")
    return _ms(r.ms_p50) + mark


def _shape_labels(shapes: Sequence[str]) -> tuple[str, dict[str, str]]:
    """(dims shared by all shapes, shape -> its varying dims)."""
    parsed = {s: parse_shape(s) for s in shapes}
    keys = list(dict.fromkeys(k for p in parsed.values() for k in p))
    common = [k for k in keys if len({p.get(k) for p in parsed.values()}) == 1]
    first = next(iter(parsed.values()), {})
    fixed = " ".join(f"{k}={first[k]}" for k in common if k in first)
    labels = {
        s: " ".join(f"{k}={p[k]}" for k in keys if k not in common and k in p) or s
        for s, p in parsed.items()
    }
    return fixed, labels


def _best_other(rows: dict[str, Row], exclude_prefix: str = "scanopt") -> tuple[str, Row] | None:
    cands = [(p, r) for p, r in rows.items() if not p.startswith(exclude_prefix) and r.comparable]
    return min(cands, key=lambda pr: pr[1].ms_p50) if cands else None


def op_table(rows: Sequence[Row]) -> str:
    """Markdown table of one (GPU, op, dtype): rows = shapes, cells = ``fwd / fwd+bwd`` ms,
    preceded by a caption line naming the fixed dims and the directions shown."""
    from tabulate import tabulate

    providers = _ordered(
        list(dict.fromkeys(r.provider for r in rows)),
        ["scanopt", "scanopt-flash", "torch", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient"],
    )
    directions = [d for d in ("fwd", "fwd+bwd") if any(r.direction == d for r in rows)]
    if not directions:
        directions = sorted({r.direction for r in rows})
    grid: dict[str, dict[tuple[str, str], Row]] = {}
    for r in rows:
        grid.setdefault(r.shape, {})[(r.provider, r.direction)] = r
    last = directions[-1]
    fixed, labels = _shape_labels(list(grid))
    headers = ["shape", *providers, f"scanopt speedup ({last})"]
    body = []
    for shape in sorted(grid, key=_shape_sort_key):
        cells = grid[shape]
        line = [labels[shape]]
        for p in providers:
            parts = [_cell(cells.get((p, d))) for d in directions]
            line.append(" / ".join(parts) if any(parts) else "")
        s = ""
        mine = cells.get(("scanopt", last))
        others = {p: r for (p, d), r in cells.items() if d == last}
        best = _best_other(others)
        if mine is not None and mine.comparable and best is not None:
            s = f"{best[1].ms_p50 / mine.ms_p50:.2f}x vs {best[0]}"
        line.append(s)
        body.append(line)
    caption = f"{fixed}; ms (median), `{' / '.join(directions)}`"
    return (
        caption + "\n\n" + tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)
    )


def render_readme(rows: Sequence[Row], plots: dict[str, list[Path]], readme_dir: Path) -> str:
    """The whole README text (``plots``: GPU slug -> plot paths to embed)."""
    lines = [
        "# scanopt benchmarks",
        "",
        "Generated by `scanopt bench report` from `bench/results/<GPU>/<op>.csv`; do not edit by "
        "hand. To refresh: `scanopt bench --save` on a GPU, then `scanopt bench report`.",
        "",
        "Protocol: every provider runs on the same inputs in one process; times are medians of "
        "`triton.testing.do_bench` (L2 flushed, inputs rotated across copies; CUDA graphs for the "
        "decode step) after an untimed warm-up call. Every provider's outputs and gradients are "
        "checked against a float64 reference with `scanopt.verify`'s rule before its time is "
        "used. Cells are milliseconds, `forward / forward+backward`; `FAILED` = wrong results "
        "(never compared), `†` = checked only against a float32 run of the same provider, "
        "`?` = not verified.",
    ]
    by_gpu: dict[str, list[Row]] = {}
    for r in rows:
        by_gpu.setdefault(r.gpu, []).append(r)
    if not by_gpu:
        lines += ["", "No results yet."]
    for gpu in sorted(by_gpu):
        g_rows = by_gpu[gpu]
        slug = gpu_slug(gpu)

        def values(attr: str, rows_: Sequence[Row] = g_rows) -> str:
            return ", ".join(sorted({getattr(r, attr) for r in rows_ if getattr(r, attr)})) or "?"

        dates = sorted({r.date for r in g_rows if r.date})
        when = dates[0] if len(dates) <= 1 else f"{dates[0]} to {dates[-1]}"
        lines += [
            "",
            f"## {gpu}",
            "",
            f"capability {values('capability')} | torch {values('torch')} | triton "
            f"{values('triton')} | scanopt {values('scanopt')} | git {values('git_sha')} | "
            f"measured {when or '?'}",
        ]
        for plot in plots.get(slug, []):
            rel = os.path.relpath(plot, readme_dir).replace(os.sep, "/")
            lines += ["", f"![{plot.stem}]({rel})"]
        ops = _ordered(list(dict.fromkeys(r.op for r in g_rows)), list(OP_TITLES))
        for op in ops:
            o_rows = [r for r in g_rows if r.op == op]
            for dtype in _ordered(
                list(dict.fromkeys(r.dtype for r in o_rows)), ["bfloat16", "float16", "float32"]
            ):
                d_rows = [r for r in o_rows if r.dtype == dtype]
                lines += ["", f"### {OP_TITLES.get(op, op)}, {dtype}", "", op_table(d_rows)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def _series(rows: Sequence[Row], provider_filter, direction: str) -> dict[int, float]:
    """sweep value -> best (lowest) verified time among the matching providers."""
    best: dict[int, float] = {}
    for r in rows:
        if r.direction != direction or not r.comparable or not provider_filter(r.provider):
            continue
        x = _sweep_value(r)
        if x is not None and (x not in best or r.ms_p50 < best[x]):
            best[x] = r.ms_p50
    return dict(sorted(best.items()))


def _int_ticks(ax, xs: Sequence[int]) -> None:
    """Log2 x axis labelled with the swept values themselves (1024, 2048, ...)."""
    ax.set_xscale("log", base=2)
    if xs:
        ax.set_xticks(list(xs))
        ax.set_xticklabels([str(x) for x in xs])
        ax.minorticks_off()


def _pick_dtype(rows: Sequence[Row]) -> str | None:
    dtypes = list(dict.fromkeys(r.dtype for r in rows))
    for d in ("bfloat16", "float16", "float32"):
        if d in dtypes:
            return d
    return dtypes[0] if dtypes else None


def plot_crossover(rows: Sequence[Row], path: Path, batch: int = 4, width: int = 2048) -> bool:
    """The crossover plot of one GPU; False when there is nothing to draw."""
    Figure = _require_matplotlib()
    dtype = _pick_dtype([r for r in rows if r.op in CROSSOVER_LABELS])
    sel = [
        r
        for r in rows
        if r.op in CROSSOVER_LABELS
        and r.dtype == dtype
        and parse_shape(r.shape).get("B") == str(batch)
        and _width(r) == width
    ]
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    palette = ["black", "tab:blue", "tab:cyan", "tab:orange", "tab:green", "tab:red"]
    colors = dict(zip(CROSSOVER_LABELS, palette, strict=True))
    drawn = 0
    for op, label in CROSSOVER_LABELS.items():
        o_rows = [r for r in sel if r.op == op]
        if not o_rows:
            continue
        mine = _series(o_rows, lambda p: p == "scanopt", "fwd+bwd")
        if op == "attention":
            other = _series(o_rows, lambda p: p.startswith("sdpa-"), "fwd+bwd")
            other_label = f"{label}, best SDPA backend"
        else:
            other = _series(o_rows, lambda p: not p.startswith("scanopt"), "fwd+bwd")
            other_label = f"{label}, best other"
        for series, style, text in ((mine, "-", f"{label}, scanopt"), (other, "--", other_label)):
            if series:
                ax.plot(
                    list(series),
                    list(series.values()),
                    style,
                    marker="o",
                    color=colors[op],
                    label=text,
                )
                drawn += 1
    if not drawn:
        return False
    _int_ticks(ax, sorted({_sweep_value(r) for r in sel if _sweep_value(r) is not None}))
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("forward+backward per layer (ms)")
    ax.set_title(f"{rows[0].gpu}: batch {batch}, d_model {width}, {dtype}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def plot_op(rows: Sequence[Row], path: Path) -> bool:
    """Every verified provider of one (GPU, op, dtype): forward and forward+backward."""
    Figure = _require_matplotlib()
    directions = [d for d in ("fwd", "fwd+bwd") if any(r.direction == d for r in rows)]
    providers = list(dict.fromkeys(r.provider for r in rows))
    fig = Figure(figsize=(5.5 * max(1, len(directions)), 4.5), layout="constrained")
    axes = fig.subplots(1, max(1, len(directions)), squeeze=False)[0]
    drawn = 0
    for ax, direction in zip(axes, directions, strict=False):
        for p in providers:
            s = _series(rows, lambda q, p=p: q == p, direction)
            if s:
                style = "-" if p.startswith("scanopt") else "--"
                ax.plot(list(s), list(s.values()), style, marker="o", label=p)
                drawn += 1
        _int_ticks(ax, sorted({_sweep_value(r) for r in rows if _sweep_value(r) is not None}))
        ax.set_yscale("log")
        ax.set_xlabel(SWEEP_KEY.get(rows[0].op, "L"))
        ax.set_ylabel("ms (median)")
        ax.set_title(direction)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    if not drawn:
        return False
    fig.suptitle(f"{rows[0].gpu}: {OP_TITLES.get(rows[0].op, rows[0].op)}, {rows[0].dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def write_report(
    results_dir: str | os.PathLike = "bench/results",
    out: str | os.PathLike = "bench/README.md",
    plots_dir: str | os.PathLike = "bench/plots",
    plots: bool = True,
) -> ReportOutput:
    """Read every results CSV, draw the plots (unless ``plots`` is False or matplotlib is
    missing: then a message says so) and write the README. Returns what was written."""
    rows = read_results(results_dir)
    out = Path(out)
    result = ReportOutput(out)
    embedded: dict[str, list[Path]] = {}
    if plots and rows:
        try:
            _require_matplotlib()
        except ImportError as e:
            result.messages.append(str(e))
            plots = False
    if plots:
        pdir = Path(plots_dir)
        by_gpu: dict[str, list[Row]] = {}
        for r in rows:
            by_gpu.setdefault(r.gpu, []).append(r)
        for gpu, g_rows in sorted(by_gpu.items()):
            slug = gpu_slug(gpu)
            paths = embedded.setdefault(slug, [])
            cross = pdir / f"{slug}_crossover.png"
            if plot_crossover(g_rows, cross):
                paths.append(cross)
            for op in _ordered(list(dict.fromkeys(r.op for r in g_rows)), list(OP_TITLES)):
                for dtype in sorted({r.dtype for r in g_rows if r.op == op}):
                    sel = [r for r in g_rows if r.op == op and r.dtype == dtype]
                    path = pdir / f"{slug}_{op}_{dtype}.png"
                    if plot_op(sel, path):
                        paths.append(path)
        result.plots = [p for ps in embedded.values() for p in ps]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_readme(rows, embedded, out.parent))
    return result
