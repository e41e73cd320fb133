"""``mamba_inner_fn`` composed from scanopt pieces (drop-in for mamba_ssm's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mamba_inner_fn"]


def _rms(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    if weight is None:
        return x
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def mamba_inner_fn(
    xz: Tensor,
    conv1d_weight: Tensor,
    conv1d_bias: Tensor | None,
    x_proj_weight: Tensor,
    delta_proj_weight: Tensor,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    A: Tensor,
    B: Tensor | None = None,
    C: Tensor | None = None,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    B_proj_bias: Tensor | None = None,
    C_proj_bias: Tensor | None = None,
    delta_softplus: bool = True,
    checkpoint_lvl: int = 1,
    b_rms_weight: Tensor | None = None,
    c_rms_weight: Tensor | None = None,
    dt_rms_weight: Tensor | None = None,
    b_c_dt_rms_eps: float = 1e-6,
) -> Tensor:
    """The Mamba-1 block after ``in_proj``, drop-in for
    ``mamba_ssm.ops.selective_scan_interface.mamba_inner_fn``: causal conv1d + SiLU ->
    ``x_proj`` -> ``dt_proj`` -> selective scan (gated by ``z``) -> ``out_proj``.

    Args:
        xz: ``(batch, 2 * dim, L)``, ``x`` and the gate ``z`` stacked on dim 1.
        conv1d_weight: ``(dim, 1, width)`` (or ``(dim, width)``); conv1d_bias ``(dim,)``.
        x_proj_weight: ``(dt_rank + 2 * N, dim)``; delta_proj_weight ``(dim, dt_rank)``.
        out_proj_weight: ``(d_model, dim)``; out_proj_bias ``(d_model,)`` or ``None``.
        A: ``(dim, N)`` real; B / C ``None`` (taken from ``x_proj``, input-dependent) or fixed.
        D, delta_bias: ``(dim,)``; B_proj_bias / C_proj_bias ``(N,)``.
        checkpoint_lvl: accepted for compatibility (scanopt's ops save what they need).
        b/c/dt_rms_weight: optional RMS norms of B, C and delta (as upstream).

    Returns:
        ``(batch, L, d_model)``. Differentiable in every tensor argument.
    """
    if A.is_complex():
        raise NotImplementedError("mamba_inner_fn: complex A is not supported by scanopt")
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"checkpoint_lvl must be 0 or 1, got {checkpoint_lvl}")
    from scanopt.ops.causal_conv1d.op import causal_conv1d_fn
    from scanopt.ops.selective_scan.op import selective_scan_fn

    dim = xz.shape[1] // 2
    delta_rank = delta_proj_weight.shape[1]
    d_state = A.shape[-1]
    x, z = xz.chunk(2, dim=1)
    conv_out = causal_conv1d_fn(
        x, conv1d_weight.reshape(dim, -1), conv1d_bias, activation="silu"
    )  # (batch, dim, L)
    x_dbl = F.linear(conv_out.transpose(1, 2), x_proj_weight)  # (batch, L, r + 2N)
    dt = _rms(x_dbl[..., :delta_rank], None, b_c_dt_rms_eps)
    delta = F.linear(dt, delta_proj_weight)  # (batch, L, dim)
    delta = _rms(delta, dt_rms_weight, b_c_dt_rms_eps).transpose(1, 2)
    if B is None:
        B = x_dbl[..., delta_rank : delta_rank + d_state]
        if B_proj_bias is not None:
            B = B + B_proj_bias.to(B.dtype)
        B = _rms(B, b_rms_weight, b_c_dt_rms_eps).transpose(1, 2).contiguous()  # (batch, N, L)
    if C is None:
        C = x_dbl[..., x_dbl.shape[-1] - d_state :]
        if C_proj_bias is not None:
            C = C + C_proj_bias.to(C.dtype)
        C = _rms(C, c_rms_weight, b_c_dt_rms_eps).transpose(1, 2).contiguous()
    out = selective_scan_fn(conv_out, delta, A, B, C, D, z, delta_bias, delta_softplus)
    bias = out_proj_bias.to(out_proj_weight.dtype) if out_proj_bias is not None else None
    return F.linear(out.transpose(1, 2), out_proj_weight, bias)
