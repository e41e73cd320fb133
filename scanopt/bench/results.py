"""Result rows and the committed CSV files ``bench/results/<GPU_SLUG>/<op>.csv``.

One tidy row per (op, direction, provider, dtype, shape, gpu), as Liger's benchmark CSV: long
format, the GPU and every version on each row, upserted on that key so re-running a sweep
replaces its old numbers and keeps the others. This module imports no torch.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

#: the CSV header, in order
COLUMNS = (
    "op",
    "direction",
    "provider",
    "dtype",
    "shape",
    "ms_p50",
    "ms_p20",
    "ms_p80",
    "tflops",
    "gbps",
    "pct_of_ceiling",
    "rel_err",
    "verified",
    "gpu",
    "capability",
    "torch",
    "triton",
    "scanopt",
    "git_sha",
    "date",
)
#: the upsert key
KEY = ("op", "direction", "provider", "dtype", "shape", "gpu")

_FLOAT_FIELDS = {"ms_p50", "ms_p20", "ms_p80", "tflops", "gbps", "pct_of_ceiling", "rel_err"}

#: values of the ``verified`` column
OK, SELF, FAILED, SKIPPED = "ok", "self", "FAILED", "skipped"
#: rows whose numbers may be compared (speedups); ``self`` = checked only against an fp32 run of
#: the same provider, because no independent reference could run at that shape
COMPARABLE = (OK, SELF)


@dataclass
class Row:
    """One measured (op, direction, provider, dtype, shape) on one GPU."""

    op: str
    direction: str
    provider: str
    dtype: str
    shape: str
    ms_p50: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    pct_of_ceiling: float | None = None
    rel_err: float | None = None
    verified: str = SKIPPED
    gpu: str = ""
    capability: str = ""
    torch: str = ""
    triton: str = ""
    scanopt: str = ""
    git_sha: str = ""
    date: str = ""

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(str(getattr(self, k)) for k in KEY)

    @property
    def comparable(self) -> bool:
        """True when this row's time may be compared with another's (it passed verification)."""
        return self.verified in COMPARABLE and self.ms_p50 is not None

    def to_csv(self) -> dict[str, str]:
        out = {}
        for k, v in asdict(self).items():
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                out[k] = "" if v is None else str(v)
            elif isinstance(v, float):
                out[k] = f"{v:.6g}"
            else:
                out[k] = str(v)
        return out

    @classmethod
    def from_csv(cls, d: dict[str, str]) -> Row:
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            raw = d.get(f.name, "")
            raw = "" if raw is None else raw
            if f.name in _FLOAT_FIELDS:
                kwargs[f.name] = float(raw) if raw != "" else None
            else:
                kwargs[f.name] = raw
        return cls(**kwargs)


def gpu_slug(name: str) -> str:
    """Folder name of a GPU: ``"NVIDIA H200"`` -> ``"NVIDIA_H200"`` (same rule as the config
    store's ``scanopt.autotune.device.gpu_slug``)."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "unknown"


def git_sha(cwd: str | os.PathLike | None = None) -> str:
    """``SCANOPT_GIT_SHA`` when set (a copy of a tree on a remote GPU, whose ``.git``, if any,
    may not be the tree's), else the short sha of the checkout in ``cwd`` (``+dirty`` with
    local changes outside ``bench/results/``: the rows a bench run writes do not make the code
    it measures dirty), else ``""``."""
    fallback = os.environ.get("SCANOPT_GIT_SHA", "")
    if fallback:
        return fallback
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if sha.returncode != 0:
            return fallback
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":(top)",
                ":(top,exclude)bench/results",
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def environment(device: Any = None) -> dict[str, str]:
    """The per-row environment columns for ``device`` (GPU name, capability, versions, sha, date)."""
    from datetime import datetime, timezone

    import torch

    import scanopt

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        major, minor = torch.cuda.get_device_capability(dev)
        capability = f"{major}.{minor}"
    else:
        name, capability = "CPU", ""
    return {
        "gpu": name,
        "capability": capability,
        "torch": torch.__version__,
        "triton": triton_version,
        "scanopt": scanopt.__version__,
        "git_sha": git_sha(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def results_path(results_dir: str | os.PathLike, gpu: str, op: str) -> Path:
    """``<results_dir>/<GPU_SLUG>/<op>.csv``."""
    return Path(results_dir) / gpu_slug(gpu) / f"{op}.csv"


def read_csv(path: str | os.PathLike) -> list[Row]:
    """Rows of one results CSV (missing file: no rows)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [Row.from_csv(d) for d in csv.DictReader(f)]


def write_csv(path: str | os.PathLike, rows: Iterable[Row]) -> None:
    """Write rows with the fixed header, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r.to_csv())
    tmp.replace(path)


def upsert_rows(existing: Sequence[Row], new: Iterable[Row]) -> list[Row]:
    """``existing`` with every row of ``new`` replacing the row of the same key (in place), or
    appended when its key is new."""
    out = list(existing)
    index = {r.key: i for i, r in enumerate(out)}
    for r in new:
        if r.key in index:
            out[index[r.key]] = r
        else:
            index[r.key] = len(out)
            out.append(r)
    return out


def save_rows(results_dir: str | os.PathLike, rows: Iterable[Row]) -> list[Path]:
    """Upsert ``rows`` into ``<results_dir>/<GPU_SLUG>/<op>.csv`` (one file per GPU and op)."""
    groups: dict[Path, list[Row]] = {}
    for r in rows:
        groups.setdefault(results_path(results_dir, r.gpu, r.op), []).append(r)
    for path, new in groups.items():
        write_csv(path, upsert_rows(read_csv(path), new))
    return sorted(groups)


def read_results(results_dir: str | os.PathLike) -> list[Row]:
    """Every row of every ``<results_dir>/*/*.csv``."""
    rows: list[Row] = []
    for path in sorted(Path(results_dir).glob("*/*.csv")):
        rows.extend(read_csv(path))
    return rows


def parse_shape(shape: str) -> dict[str, str]:
    """``"B=4 H=16 L=1024 D=128 causal=1"`` -> ``{"B": "4", ...}``."""
    out = {}
    for part in shape.split():
        k, _, v = part.partition("=")
        out[k] = v
    return out
