"""Causal depthwise conv1d: ``torch.library`` ops, autograd and the public drop-ins
:func:`causal_conv1d_fn` / :func:`causal_conv1d_update` (the ``causal_conv1d`` package's API).

Backends (``scanopt._env.backend_for``): the Triton kernels of ``launch.py`` on CUDA tensors (and
on CPU tensors under ``TRITON_INTERPRET=1``), else :func:`causal_conv1d_torch` (``F.conv1d``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scanopt._env import backend_for
from scanopt._tensor import check_tensor

__all__ = ["causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_torch"]


def causal_conv1d_torch(x, weight, bias=None, initial_states=None, silu=False):
    """PyTorch implementation (fp32 math, output in ``x``'s dtype): ``(out, final_states)``."""
    B, D, L = x.shape
    width = weight.shape[1]
    if initial_states is None:
        init = x.new_zeros((B, D, width - 1), dtype=torch.float32)
    else:
        init = initial_states.float()
    xp = torch.cat([init, x.float()], dim=-1)
    b = bias.float() if bias is not None else None
    y = F.conv1d(xp, weight.float().unsqueeze(1), b, groups=D)
    if silu:
        y = F.silu(y)
    final = xp[..., xp.shape[-1] - (width - 1) :]
    st_dtype = initial_states.dtype if initial_states is not None else x.dtype
    return y.to(x.dtype), final.to(st_dtype).contiguous()


def _torch_bwd(dout, dfinal, x, weight, bias, init, silu):
    """Hand-written VJP of :func:`causal_conv1d_torch` (fp32 math)."""
    B, D, L = x.shape
    width = weight.shape[1]
    zeros = x.new_zeros((B, D, width - 1), dtype=torch.float32)
    xp = torch.cat([init.float() if init is not None else zeros, x.float()], dim=-1)
    w = weight.float()
    g = dout.float()
    if silu:
        y = F.conv1d(xp, w.unsqueeze(1), bias.float() if bias is not None else None, groups=D)
        s = torch.sigmoid(y)
        g = g * s * (1.0 + y * (1.0 - s))
    dxp = torch.zeros_like(xp)
    dw = torch.empty_like(w)
    for j in range(width):
        dxp[..., j : j + L] += w[None, :, j, None] * g
        dw[:, j] = (g * xp[..., j : j + L]).sum(dim=(0, 2))
    if dfinal is not None:
        dxp[..., L:] += dfinal.float()
    return (
        dxp[..., width - 1 :].to(x.dtype, copy=True),
        dw.to(weight.dtype),
        g.sum(dim=(0, 2)).to(bias.dtype) if bias is not None else None,
        dxp[..., : width - 1].to(init.dtype, copy=True) if init is not None else None,
    )


@torch.library.custom_op("scanopt::causal_conv1d_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, init: Tensor | None, silu: bool, triton: bool
) -> tuple[Tensor, Tensor]:
    if triton:
        from scanopt.ops.causal_conv1d import launch

        return launch.causal_conv1d_fwd(x, weight, bias, init, silu)
    with torch.no_grad():
        return causal_conv1d_torch(x, weight, bias, init, silu)


@_fwd_op.register_fake
def _(x, weight, bias, init, silu, triton):
    B, D, L = x.shape
    st_dtype = init.dtype if init is not None else x.dtype
    return x.new_empty((B, D, L)), x.new_empty((B, D, weight.shape[1] - 1), dtype=st_dtype)


@torch.library.custom_op("scanopt::causal_conv1d_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor,
    dfinal: Tensor | None,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    init: Tensor | None,
    silu: bool,
    triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``(x, weight, bias, init)``; the last two are empty when absent."""
    if triton:
        from scanopt.ops.causal_conv1d import launch

        dx, dw, db, di = launch.causal_conv1d_bwd(dout, dfinal, x, weight, bias, init, silu)
    else:
        dx, dw, db, di = _torch_bwd(dout, dfinal, x, weight, bias, init, silu)
    empty = x.new_empty((0,))
    return dx, dw, db if db is not None else empty, di if di is not None else empty


@_bwd_op.register_fake
def _(dout, dfinal, x, weight, bias, init, silu, triton):
    empty = x.new_empty((0,))
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        torch.empty_like(bias) if bias is not None else empty,
        torch.empty_like(init) if init is not None else empty,
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, init, silu, triton = inputs
    ctx.save_for_backward(x, weight, bias, init)
    ctx.silu, ctx.triton = silu, triton


def _backward(ctx, dout, dfinal):
    x, weight, bias, init = ctx.saved_tensors
    dx, dw, db, di = torch.ops.scanopt.causal_conv1d_bwd(
        dout, dfinal, x, weight, bias, init, ctx.silu, ctx.triton
    )
    return dx, dw, db if bias is not None else None, di if init is not None else None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_activation(activation: object) -> bool:
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def causal_conv1d_fn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: Tensor | None = None,
    activation: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal depthwise conv1d, drop-in for ``causal_conv1d.causal_conv1d_fn``.

    ``out[b, d, t] = act(bias[d] + sum_j weight[d, j] * xp[b, d, t + j])`` with
    ``xp = concat(initial_states or 0, x)`` along time, so output ``t`` sees inputs
    ``t - width + 1 .. t``.

    Args:
        x: ``(batch, dim, L)``, any strides.
        weight: ``(dim, width)``, width 2..8 (any, in fact; each is a compiled variant).
        bias: ``(dim,)`` or ``None``.
        seq_idx: not supported (packed sequences); must be ``None``.
        initial_states: ``(batch, dim, width - 1)`` or ``None``; differentiable.
        return_final_states: also return the last ``width - 1`` inputs (the next call's state).
        final_states_out: optional ``(batch, dim, width - 1)`` buffer the final states are
            copied into.
        activation: ``None``, ``"silu"`` or ``"swish"``.

    Returns:
        ``out`` ``(batch, dim, L)`` in ``x``'s dtype, or ``(out, final_states)``. Gradients flow
        to x, weight, bias and initial_states (deterministic reductions).
    """
    check_tensor("x", x, ndim=3)
    B, D, L = x.shape
    check_tensor("weight", weight, ndim=2, device=x.device)
    if weight.shape[0] != D:
        raise ValueError(f"weight must have shape ({D}, width), got {tuple(weight.shape)}")
    width = weight.shape[1]
    if width < 2:
        raise ValueError(f"weight's width (dim 1) must be at least 2, got {width}")
    if bias is not None:
        check_tensor("bias", bias, shape=(D,), device=x.device)
    if seq_idx is not None:
        raise ValueError("seq_idx is not supported by scanopt's causal_conv1d_fn; pass None")
    if initial_states is not None:
        check_tensor("initial_states", initial_states, shape=(B, D, width - 1), device=x.device)
    silu = _check_activation(activation)
    triton = backend_for(x.device.type) == "triton"
    out, final = torch.ops.scanopt.causal_conv1d_fwd(x, weight, bias, initial_states, silu, triton)
    if final_states_out is not None:
        check_tensor("final_states_out", final_states_out, shape=(B, D, width - 1))
        final_states_out.copy_(final)
        final = final_states_out
    return (out, final) if return_final_states else out


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    cache_seqlens: Tensor | None = None,
) -> Tensor:
    """Decode step, drop-in for ``causal_conv1d.causal_conv1d_update``; updates ``conv_state``
    in place (shifted left by ``seqlen``, new inputs at the end).

    Args:
        x: ``(batch, dim)`` or ``(batch, dim, seqlen)``.
        conv_state: ``(batch, dim, state_len)`` with ``state_len >= width - 1``.
        weight: ``(dim, width)``; bias ``(dim,)`` or ``None``.
        activation: ``None``, ``"silu"`` or ``"swish"``.
        cache_seqlens: circular-buffer mode; not supported (must be ``None``).

    Returns:
        ``out`` shaped like ``x``.
    """
    check_tensor("x", x, ndim=(2, 3))
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(-1) if squeeze else x
    B, D, S = x3.shape
    check_tensor("weight", weight, ndim=2, device=x.device)
    if weight.shape[0] != D:
        raise ValueError(f"weight must have shape ({D}, width), got {tuple(weight.shape)}")
    width = weight.shape[1]
    check_tensor("conv_state", conv_state, ndim=3, device=x.device)
    if conv_state.shape[:2] != (B, D) or conv_state.shape[2] < width - 1:
        raise ValueError(
            f"conv_state must have shape ({B}, {D}, state_len >= {width - 1}), "
            f"got {tuple(conv_state.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, shape=(D,), device=x.device)
    if cache_seqlens is not None:
        raise ValueError("cache_seqlens (circular conv_state) is not supported; pass None")
    silu = _check_activation(activation)
    state_len = conv_state.shape[2]
    init = conv_state[..., state_len - (width - 1) :]
    triton = backend_for(x.device.type) == "triton"
    out, _ = torch.ops.scanopt.causal_conv1d_fwd(x3, weight, bias, init, silu, triton)
    new_state = torch.cat([conv_state, x3.to(conv_state.dtype)], dim=-1)[..., S:]
    conv_state.copy_(new_state)
    return out.squeeze(-1) if squeeze else out
