"""Allocation, grid, config and launch of the causal conv1d kernels (no autograd here)."""

from __future__ import annotations

import torch

from scanopt._launch import launch
from scanopt._tensor import empty
from scanopt._triton_compat import ensure_interpreter_compat
from scanopt.ops._rwkv_common import cdiv, next_pow2
from scanopt.ops.causal_conv1d.kernels import (
    causal_conv1d_bwd_dx_kernel,
    causal_conv1d_bwd_g_kernel,
    causal_conv1d_fwd_kernel,
)

__all__ = ["default_config", "causal_conv1d_fwd", "causal_conv1d_bwd"]


def default_config(D: int, L: int) -> dict:
    """Heuristic tile: up to 16 channels x 128 steps, 4 warps."""
    return {
        "block_d": min(16, next_pow2(D)),
        "block_l": max(16, min(128, next_pow2(L))),
        "num_warps": 4,
    }


def _final_states(x: torch.Tensor, init: torch.Tensor | None, width: int) -> torch.Tensor:
    # the last width - 1 entries of concat(init or 0, x), fp32 like the states passed in
    B, D, L = x.shape
    if init is None:
        init = x.new_zeros((B, D, width - 1))
    xp = torch.cat([init.to(x.dtype), x], dim=-1) if L < width - 1 else x
    return xp[..., xp.shape[-1] - (width - 1) :].to(init.dtype, copy=True).contiguous()


def causal_conv1d_fwd(x, weight, bias, init, silu: bool, config: dict | None = None):
    """Returns ``(out (B, D, L) in x's dtype, final_states (B, D, width - 1))``."""
    ensure_interpreter_compat()
    B, D, L = x.shape
    width = weight.shape[1]
    cfg = {**default_config(D, L), **(config or {})}
    weight = weight.contiguous()
    init_c = init.contiguous() if init is not None else None
    out = empty((B, D, L), x.dtype, x.device)
    if B * D * L:
        grid = (B, cdiv(D, cfg["block_d"]), cdiv(L, cfg["block_l"]))
        launch(causal_conv1d_fwd_kernel, grid,
            x, init_c if init_c is not None else x, weight, bias if bias is not None else weight,
            out, D, L, *x.stride(),
            WIDTH=width, HAS_INIT=init_c is not None, HAS_BIAS=bias is not None, SILU=silu,
            BLOCK_D=cfg["block_d"], BLOCK_L=cfg["block_l"], num_warps=cfg["num_warps"],
        )  # fmt: skip
    return out, _final_states(x, init, width)


def causal_conv1d_bwd(dout, dfinal, x, weight, bias, init, silu: bool, config: dict | None = None):
    """Returns gradients ``(dx, dweight, dbias or None, dinit or None)``; the weight and bias
    reductions are per-tile partial sums added in a fixed order (deterministic)."""
    ensure_interpreter_compat()
    B, D, L = x.shape
    width = weight.shape[1]
    cfg = {**default_config(D, L), **(config or {})}
    weight_c = weight.contiguous()
    init_c = init.contiguous() if init is not None else None
    bd, bl = cfg["block_d"], cfg["block_l"]
    NL = cdiv(L, bl)
    f32 = torch.float32
    g = empty((B, D, L), f32, x.device)
    dw_part = torch.zeros((B, NL, D, width), dtype=f32, device=x.device)
    db_part = torch.zeros((B, NL, D), dtype=f32, device=x.device)
    dxp = empty((B, D, L + width - 1), f32, x.device)
    if B * D * L:
        launch(causal_conv1d_bwd_g_kernel, (B, cdiv(D, bd), NL),
            dout, x, init_c if init_c is not None else x, weight_c,
            bias if bias is not None else weight_c, g, dw_part, db_part,
            D, L, NL, *x.stride(), *dout.stride(),
            WIDTH=width, HAS_INIT=init_c is not None, HAS_BIAS=bias is not None, SILU=silu,
            BLOCK_D=bd, BLOCK_L=bl, num_warps=cfg["num_warps"],
        )  # fmt: skip
        launch(causal_conv1d_bwd_dx_kernel, (B, cdiv(D, bd), cdiv(L + width - 1, bl)),
            g, weight_c, dxp, D, L, WIDTH=width, BLOCK_D=bd, BLOCK_L=bl,
            num_warps=cfg["num_warps"],
        )  # fmt: skip
    else:
        dxp.zero_()
    if dfinal is not None:
        dxp[..., L:] += dfinal.float()
    dx = dxp[..., width - 1 :].to(x.dtype, copy=True)
    dinit = dxp[..., : width - 1].to(init.dtype, copy=True) if init is not None else None
    dw = dw_part.sum(dim=(0, 1)).to(weight.dtype)
    db = db_part.sum(dim=(0, 1)).to(bias.dtype) if bias is not None else None
    return dx, dw, db, dinit
