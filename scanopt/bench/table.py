"""Terminal tables of result rows (tabulate), and CSV / JSON output.

One table per (op, dtype, direction). Rows are (shape, provider); columns: median ms, the p20-p80
spread, TFLOP/s or GB/s, % of this GPU's measured ceiling, the verified relative error, the
verdict, then one ``vs <provider>`` column per other provider holding that provider's time divided
by this row's time (> 1: this row is faster). A row that failed verification shows ``FAILED`` in
place of its time and takes part in no speedup, in either direction; so does a row that was not
verified (``skipped``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict

from scanopt.bench.results import COLUMNS, FAILED, Row, parse_shape

FORMATS = ("github", "plain", "csv", "json")

LEGEND = (
    "vs X = time of X / time of this row (>1: this row is faster); only verified rows are "
    "compared. self = checked only against a float32 run of the same provider (no independent "
    "reference could run at that shape)."
)


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def speedup(row: Row, other: Row | None) -> float | None:
    """``other``'s median time over ``row``'s, or None unless both passed verification."""
    if other is None or other is row or not (row.comparable and other.comparable):
        return None
    if not row.ms_p50 or not other.ms_p50:
        return None
    return other.ms_p50 / row.ms_p50


def _groups(rows: Iterable[Row]) -> dict[tuple[str, str, str], list[Row]]:
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.op, r.dtype, r.direction), []).append(r)
    return groups


def _split_shapes(rows: Sequence[Row]) -> tuple[str, list[str]]:
    """(dims shared by every row, per-row varying dims) of the group's shape strings."""
    parsed = [parse_shape(r.shape) for r in rows]
    keys = list(dict.fromkeys(k for p in parsed for k in p))
    common = [k for k in keys if len({p.get(k) for p in parsed}) == 1]
    fixed = " ".join(f"{k}={parsed[0][k]}" for k in common)
    varying = [" ".join(f"{k}={p[k]}" for k in keys if k not in common and k in p) for p in parsed]
    return fixed, varying


def table(rows: Sequence[Row], tablefmt: str = "github") -> str:
    """One tabulate table for rows of a single (op, dtype, direction)."""
    from tabulate import tabulate

    providers = list(dict.fromkeys(r.provider for r in rows))
    _, varying = _split_shapes(rows)
    by_shape: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_shape.setdefault(r.shape, {})[r.provider] = r
    metric = "TFLOP/s" if any(r.tflops is not None for r in rows) else "GB/s"
    headers = ["shape", "provider", "ms", "p20-p80", metric, "% ceil", "rel err", "verified"]
    headers += [f"vs {p}" for p in providers]
    body = []
    for r, shape_label in zip(rows, varying, strict=True):
        failed = r.verified == FAILED
        ms = FAILED if failed else _fmt(r.ms_p50, ".3f")
        spread = "" if failed or r.ms_p20 is None else f"{r.ms_p20:.3f}-{r.ms_p80:.3f}"
        value = r.tflops if metric == "TFLOP/s" else r.gbps
        line = [
            shape_label or r.shape,
            r.provider,
            ms,
            spread,
            "" if failed else _fmt(value, ".1f"),
            "" if failed else _fmt(r.pct_of_ceiling, ".0f"),
            _fmt(r.rel_err, ".1e"),
            r.verified,
        ]
        peers = by_shape[r.shape]
        for p in providers:
            s = speedup(r, peers.get(p))
            line.append("" if p == r.provider else ("-" if s is None else f"{s:.2f}x"))
        body.append(line)
    return tabulate(
        body, headers=headers, tablefmt=tablefmt, stralign="right", disable_numparse=True
    )


def render(rows: Sequence[Row], fmt: str = "github", notes: Sequence[str] = ()) -> str:
    """All rows in the requested format; ``notes`` (skipped providers, failures) follow the
    tables in the two table formats."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r.to_csv())
        return buf.getvalue()
    if fmt == "json":
        return json.dumps([asdict(r) for r in rows], indent=2)
    parts = []
    for (op, dtype, direction), group in _groups(rows).items():
        fixed, _ = _split_shapes(group)
        title = f"{op} | {dtype} | {direction} | {fixed}"
        parts.append(("### " if fmt == "github" else "") + title)
        parts.append(table(group, tablefmt=fmt))
    if rows:
        parts.append(LEGEND)
    if notes:
        bullet = "- " if fmt == "github" else "  "
        parts.append("notes:\n" + "\n".join(bullet + n for n in notes))
    return "\n\n".join(parts) + "\n"
