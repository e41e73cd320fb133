"""The timing core: ``triton.testing.do_bench`` medians with p20/p80, CUDA-graph timing for tiny
launches, rotation over several input copies, and this GPU's measured ceilings.

Protocol (research/autotune.md §5.5, the Triton and tritonbench conventions):

- Each timed callable is warmed up (``do_bench``'s time-based warm-up, after the untimed
  verification call that already compiled and autotuned everything).
- ``do_bench`` clears the L2 cache before every timed call; on top of that every callable cycles
  through several copies of its inputs (enough copies to span twice the L2 cache, at most
  ``MAX_COPIES``), so repeated runs never find their inputs in L2. This matters most for CUDA-graph
  timing, where no flush happens between the replayed calls.
- The result is the median and the 20th/80th percentiles of the per-call times, in milliseconds.
- ``do_bench_cudagraph`` (one graph of many unrolled calls, replayed) removes the launch overhead
  of microsecond-scale kernels such as the decode step; it is used for forward timing only.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

QUANTILES = [0.5, 0.2, 0.8]
#: most input copies a timed callable rotates through
MAX_COPIES = 8


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles."""

    p50: float
    p20: float
    p80: float


def n_copies(bytes_per_copy: int, l2_bytes: int, max_copies: int = MAX_COPIES) -> int:
    """How many input copies to rotate through so that one round spans twice the L2 cache."""
    if bytes_per_copy <= 0:
        return 1
    return max(1, min(max_copies, math.ceil(2 * l2_bytes / bytes_per_copy)))


class Rotation:
    """Calls ``fn(item)`` with the next of ``items`` on every call (round robin)."""

    def __init__(self, fn: Callable[[Any], Any], items: Sequence[Any]):
        if not items:
            raise ValueError("Rotation needs at least one item")
        self.fn, self.items, self.i = fn, list(items), 0

    def __call__(self) -> Any:
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return self.fn(item)


class CudaTimer:
    """Times a callable on the current CUDA device with Triton's ``do_bench`` (or, with
    ``cudagraph=True``, ``do_bench_cudagraph``). ``warmup_ms`` and ``rep_ms`` are do_bench's."""

    def __init__(self, warmup_ms: float = 25, rep_ms: float = 100):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def __call__(
        self, fn: Callable[[], Any], grad_to_none: Sequence[Any] = (), cudagraph: bool = False
    ) -> Timing:
        import triton.testing

        if cudagraph:
            q = triton.testing.do_bench_cudagraph(
                fn, rep=self.rep_ms, grad_to_none=list(grad_to_none) or None, quantiles=QUANTILES
            )
        else:
            q = triton.testing.do_bench(
                fn,
                warmup=self.warmup_ms,
                rep=self.rep_ms,
                grad_to_none=list(grad_to_none) or None,
                quantiles=QUANTILES,
            )
        return Timing(*(float(x) for x in q))


class WallTimer:
    """Wall-clock timing for CPU tensors (tests and development; no GPU numbers come from it)."""

    def __init__(self, warmup: int = 1, reps: int = 5):
        self.warmup, self.reps = warmup, reps

    def __call__(
        self, fn: Callable[[], Any], grad_to_none: Sequence[Any] = (), cudagraph: bool = False
    ) -> Timing:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            for t in grad_to_none:
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()

        def q(p: float) -> float:
            return times[min(len(times) - 1, int(round(p * (len(times) - 1))))]

        return Timing(q(0.5), q(0.2), q(0.8))


# ---------------------------------------------------------------------------------------------
# Ceilings of this GPU
# ---------------------------------------------------------------------------------------------


def ceilings_path() -> Path:
    """Where measured ceilings are cached: ``<cache dir>/bench/ceilings.json`` (one entry per GPU)."""
    from scanopt._env import cache_dir

    return cache_dir() / "bench" / "ceilings.json"


def measure_ceilings(
    device: Any = None, copy_bytes: int = 1 << 30, matmul_n: int = 8192
) -> dict[str, Any]:
    """Measure this GPU's device-to-device copy bandwidth and bf16 matmul rate.

    - ``copy_gbps``: ``dst.copy_(src)`` of ``copy_bytes`` (bytes read + written per second, 1e9).
    - ``matmul_tflops``: ``a @ b`` of two ``matmul_n``-square bf16 matrices, ``2 n^3`` FLOPs.

    Both are ``do_bench`` medians; ANCHORS.md quotes 4.25 TB/s and 687 TFLOP/s for the H200.
    """
    import torch

    from scanopt.bench.results import gpu_slug

    timer = CudaTimer(warmup_ms=100, rep_ms=500)
    dev = torch.device("cuda") if device is None else torch.device(device)
    copy_ms = _time_copy(timer, copy_bytes, dev)
    mm_ms = _time_matmul(timer, matmul_n, dev)
    torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(dev)
    return {
        "gpu": name,
        "slug": gpu_slug(name),
        "copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        "matmul_tflops": 2 * matmul_n**3 / (mm_ms * 1e-3) / 1e12,
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _time_copy(timer: CudaTimer, nbytes: int, dev: Any) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src)).p50


def _time_matmul(timer: CudaTimer, n: int, dev: Any) -> float:
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    return timer(lambda: a @ b).p50


def load_ceilings(gpu_name: str, path: Path | None = None) -> dict[str, Any] | None:
    """The cached ceilings of ``gpu_name``, or ``None`` when never measured."""
    from scanopt.bench.results import gpu_slug

    path = path or ceilings_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    entry = data.get(gpu_slug(gpu_name))
    return entry if isinstance(entry, dict) else None


def save_ceilings(entry: dict[str, Any], path: Path | None = None) -> Path:
    """Store one GPU's ceilings in the cache file (other GPUs' entries are kept)."""
    path = path or ceilings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[entry["slug"]] = entry
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def get_ceilings(remeasure: bool = False) -> dict[str, Any]:
    """This GPU's ceilings: from the cache, or measured once (and cached) when absent."""
    import torch

    name = torch.cuda.get_device_name()
    entry = None if remeasure else load_ceilings(name)
    if entry is None:
        entry = measure_ceilings()
        save_ceilings(entry)
    return entry
