"""``scanopt.verify``'s rule, evaluated with torch where the tensors live.

At benchmark shapes (hundreds of millions of elements) copying every output to the host and
comparing in NumPy would cost more device time than the timing itself, so the bench computes the
same relative L2 error with torch in float64 on the reference's device and applies the same
budgets (``scanopt.verify.BUDGETS``, ``FLOORS``, ``FACTOR``), returning a ``scanopt.verify.Check``.
``tests/test_bench.py`` checks that both give the same verdicts, NaN/Inf cases included.
"""

from __future__ import annotations

import math
from typing import Any

from scanopt.verify import BUDGETS, FACTOR, FLOORS, Check


def rel_l2(out: Any, ref: Any) -> float:
    """``scanopt.verify.rel_l2`` for torch tensors: ``||out - ref|| / ||ref||`` over the finite
    entries of ``ref`` (non-finite reference entries must be identical in ``out``); ``inf`` for
    any NaN/Inf elsewhere in ``out``, a shape mismatch or a missing output."""
    import torch

    if out is None or not torch.is_tensor(out) or tuple(out.shape) != tuple(ref.shape):
        return math.inf
    r = ref if ref.dtype == torch.float64 else ref.double()
    o = out.detach().to(device=r.device, dtype=torch.float64)
    finite = torch.isfinite(r)
    if not bool(finite.all()):
        if not torch.equal(o[~finite], r[~finite]):
            return math.inf
        o, r = o[finite], r[finite]
    if not bool(torch.isfinite(o).all()):
        return math.inf
    ref_norm = float(torch.linalg.vector_norm(r))
    diff = float(torch.linalg.vector_norm(o - r))
    return diff / ref_norm if ref_norm > 0 else diff


def check(
    name: str, out: Any, ref: Any, dtype: str, baseline: Any | None = None, factor: float = FACTOR
) -> Check:
    """``scanopt.verify.compare`` on torch tensors: the per-dtype ceiling and, with a same-dtype
    PyTorch ``baseline``, at most ``factor`` x its error (floored)."""
    if dtype not in BUDGETS:
        raise ValueError(f"dtype must be one of {sorted(BUDGETS)}, got {dtype!r}")
    limit = BUDGETS[dtype]
    baseline_err = None
    if baseline is not None:
        baseline_err = rel_l2(baseline, ref)
        limit = min(limit, factor * max(baseline_err, FLOORS[dtype]))
    err = rel_l2(out, ref)
    return Check(name, dtype, err, limit, baseline_err, math.isfinite(err) and err <= limit)
