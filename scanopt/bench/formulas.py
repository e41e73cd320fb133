"""FLOP and byte formulas behind the TFLOP/s and GB/s columns of ``scanopt bench``.

Attention is compute-bound, so its rows report TFLOP/s from the FLOP count; the scans (selective
scan, SSD, the decode step, WKV) are memory-bound, so their rows report GB/s from the bytes every
implementation must move at least once: the inputs read plus the outputs written, each at its own
dtype. Intermediate traffic (saved states, recomputation) is deliberately not counted: a kernel
that moves more than the floor shows up as a lower GB/s, which is the point of the column.

Directions:

- ``fwd``: the forward (inputs read, outputs written).
- ``bwd``: the backward alone: inputs re-read, output gradients read, one gradient written per
  differentiable input (at that input's dtype).
- ``fwd+bwd``: the sum of the two.

These functions import nothing heavy; dtypes are given by name (``"bfloat16"``) or item size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")

#: bytes per element of the dtypes the benchmarks use, by ``str(torch_dtype)`` without "torch."
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8}


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype name of one tensor an op reads or writes."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")


def attention_flops(
    batch: int, heads: int, lq: int, lk: int, head_dim: int, causal: bool, direction: str
) -> float:
    """FLOPs of softmax attention, the convention of flash-attn's and tritonbench's benchmarks.

    Forward: two matrix products of ``lq x lk x head_dim`` per head, 2 FLOPs per multiply-add:
    ``4 * batch * heads * lq * lk * head_dim``, halved when causal (the masked half is skipped).
    Backward: 2.5x the forward (five products instead of two). ``fwd+bwd``: 3.5x the forward.
    """
    _check_direction(direction)
    fwd = 4.0 * batch * heads * lq * lk * head_dim * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[direction]


def io_bytes(
    inputs: Mapping[str, TensorSpec],
    outputs: Mapping[str, TensorSpec],
    grad_inputs: Iterable[str],
    direction: str,
) -> int:
    """Bytes an op must move at least once (see the module docstring).

    Args:
        inputs: every tensor argument the op reads (an in-place state counts here too).
        outputs: every tensor the op writes (an in-place state counts here too).
        grad_inputs: names of the inputs that receive a gradient in the backward.
        direction: ``fwd``, ``bwd`` or ``fwd+bwd``.
    """
    _check_direction(direction)
    read = sum(s.nbytes for s in inputs.values())
    written = sum(s.nbytes for s in outputs.values())
    fwd = read + written
    bwd = read + written + sum(inputs[name].nbytes for name in grad_inputs)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def tflops(flops: float, ms: float) -> float:
    """TFLOP/s of ``flops`` done in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    """GB/s (10^9 bytes per second) of ``nbytes`` moved in ``ms`` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9
