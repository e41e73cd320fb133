"""Allocation and argument checking shared by every op's launcher and public function."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scanopt._env import poison_outputs

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty``, filled with NaN when ``SCANOPT_POISON=1`` so unwritten elements show."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if poison_outputs():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def poisoned(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor full of NaN (tests use it for buffers a kernel must overwrite entirely)."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def _fmt_dtypes(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
    last_stride_one: bool = False,
) -> torch.Tensor:
    """Check one argument and raise a clear error naming it.

    ``shape`` entries of ``None`` match any size. ``device`` demands the same device as another
    argument. Returns the tensor so calls can be chained.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(
            s is None or s == n for s, n in zip(shape, t.shape, strict=True)
        )
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be {_fmt_dtypes(dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if last_stride_one and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension, got strides {t.stride()}"
        )
    return t
