"""One-pass sum of per-block fp32 partial gradients, cast to the gradient's dtype: the WKV-6/7
backward kernels with ``BV < V`` write one ``[B, T, H, K]`` fp32 partial per V-block.

``parts.sum(0).to(dtype)`` is two ATen kernels (sum, then cast) over 2.6x the bytes of the
reduction itself, and ATen's dim-0 sum of ``[NV, N]`` reached ~0.6 TB/s on an H100 (WKV-7
default backward at T = 16k: 4.3 ms of sums and 1.3 ms of casts, 2026-12-07).
Imports Triton (imported by the launch modules only)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scanopt._launch import launch
from scanopt._triton_compat import ensure_interpreter_compat


@triton.jit
def sum_partials_kernel(
    src,  # [NP, N] fp32 partials, contiguous
    dst,  # [N] the sum, in the gradient's dtype
    N,
    NP,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    acc = tl.load(src + offs, mask=m, other=0.0)
    for i in range(1, NP):  # a fixed order: the same bits on every run
        acc += tl.load(src + i * N + offs, mask=m, other=0.0)
    tl.store(dst + offs, acc.to(dst.dtype.element_ty), mask=m)


def sum_partials(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``parts.sum(0).to(dtype)`` for contiguous fp32 ``parts`` ``[NP, *shape]``, in one pass,
    summed in index order. Returns a new ``[*shape]`` tensor of ``dtype``."""
    if parts.dtype != torch.float32 or not parts.is_contiguous():
        raise ValueError(f"parts must be contiguous fp32, got {parts.dtype}, {parts.stride()}")
    out = torch.empty(parts.shape[1:], dtype=dtype, device=parts.device)
    n = out.numel()
    if n:
        ensure_interpreter_compat()
        block = 1024
        launch(
            sum_partials_kernel,
            (triton.cdiv(n, block),),
            parts,
            out,
            n,
            parts.shape[0],
            BLOCK=block,
            num_warps=4,
        )
    return out
