"""The single comparison rule every kernel must clear (tests, ``scanopt verify`` and ``bench``).

Rule, per output tensor:

1. ``err = ||out - ref|| / ||ref||`` (relative L2 over the finite entries of the float64
   reference ``ref``). Entries where ``ref`` is not finite (``-inf`` log-sum-exp of a fully masked
   row) must be identical in ``out``. Any NaN or Inf elsewhere in ``out`` fails.
2. ``err <= BUDGETS[dtype]`` — a hard per-dtype ceiling.
3. When a ``baseline`` (a plain PyTorch implementation run in the same dtype) is given, as in
   flash-attn's tests: ``err <= FACTOR * max(baseline_err, FLOORS[dtype])``. The floor keeps a
   near-exact baseline (which can happen in fp32) from demanding bit-identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: hard ceiling on the relative L2 error, by the dtype the op was run in.
BUDGETS: dict[str, float] = {
    "float64": 1e-10,
    "float32": 1e-4,
    "float16": 4e-3,
    "bfloat16": 2.5e-2,
}
#: smallest baseline error the 2x rule is measured against (about a few units of roundoff).
FLOORS: dict[str, float] = {
    "float64": 1e-13,
    "float32": 2e-6,
    "float16": 2e-4,
    "bfloat16": 2e-3,
}
FACTOR = 2.0


def _dtype_name(x: Any) -> str:
    dt = getattr(x, "dtype", None)
    return str(dt).replace("torch.", "") if dt is not None else "float64"


def to_numpy(x: Any) -> np.ndarray:
    """A float64 NumPy copy of a torch tensor, NumPy array or number (no torch import needed)."""
    if hasattr(x, "detach"):  # torch.Tensor; bf16 has no NumPy dtype, so widen on the torch side
        x = x.detach().to("cpu")
        x = x.double() if x.is_floating_point() else x
        return x.numpy()
    return np.asarray(x, dtype=np.float64)


def rel_l2(out: Any, ref: Any) -> float:
    """Relative L2 error of ``out`` against ``ref``; ``inf`` for any NaN/Inf or shape mismatch."""
    o, r = to_numpy(out), to_numpy(ref)
    if o.shape != r.shape:
        return math.inf
    finite = np.isfinite(r)
    if not np.array_equal(o[~finite], r[~finite], equal_nan=False):
        return math.inf
    o, r = o[finite], r[finite]
    if not np.all(np.isfinite(o)):
        return math.inf
    ref_norm = float(np.linalg.norm(r))
    diff = float(np.linalg.norm(o - r))
    return diff / ref_norm if ref_norm > 0 else diff


@dataclass(frozen=True)
class Check:
    """One compared tensor: its error, the limit it had to meet and the verdict."""

    name: str
    dtype: str
    err: float
    limit: float
    baseline_err: float | None
    passed: bool

    def __str__(self) -> str:
        base = "" if self.baseline_err is None else f", torch {self.baseline_err:.1e}"
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.name}: {self.err:.2e} <= {self.limit:.1e} ({self.dtype}{base}) {verdict}"


def compare(
    name: str,
    out: Any,
    ref: Any,
    *,
    dtype: str | None = None,
    baseline: Any | None = None,
    budget: float | None = None,
    factor: float = FACTOR,
) -> Check:
    """Apply the rule to one output. ``dtype`` defaults to ``out``'s dtype; ``baseline`` is the
    same-dtype PyTorch result; ``budget`` overrides the per-dtype ceiling (say why where used)."""
    dtype = dtype or _dtype_name(out)
    if dtype not in BUDGETS:
        raise ValueError(f"dtype must be one of {sorted(BUDGETS)}, got {dtype!r}")
    limit = BUDGETS[dtype] if budget is None else budget
    baseline_err = None
    if baseline is not None:
        baseline_err = rel_l2(baseline, ref)
        limit = min(limit, factor * max(baseline_err, FLOORS[dtype]))
    err = rel_l2(out, ref)
    passed = math.isfinite(err) and err <= limit
    return Check(name, dtype, err, limit, baseline_err, passed)


@dataclass
class Report:
    """Checks of one op on one case (shape, dtype, options); shared by tests, CLI and bench."""

    op: str
    case: str = ""
    checks: list[Check] = field(default_factory=list)

    def check(self, name: str, out: Any, ref: Any, **kwargs: Any) -> Check:
        """``compare`` one output and record it."""
        result = compare(name, out, ref, **kwargs)
        self.checks.append(result)
        return result

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def max_err(self) -> float:
        return max((c.err for c in self.checks), default=math.nan)

    def summary(self) -> str:
        """One line: op, case, verdict and the worst error against its limit."""
        worst = max(self.checks, key=lambda c: c.err / c.limit, default=None)
        verdict = "ok" if self.passed else "FAILED"
        detail = f"worst {worst}" if worst else "no checks"
        return f"{self.op} [{self.case}] {verdict}: {detail}"

    def __str__(self) -> str:
        lines = [f"{self.op} [{self.case}] {'ok' if self.passed else 'FAILED'}"]
        lines += [f"  {c}" for c in self.checks]
        return "\n".join(lines)

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` listing every check when any failed (or none was made)."""
        if not self.passed:
            raise AssertionError(str(self))
