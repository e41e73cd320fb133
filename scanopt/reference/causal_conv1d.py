"""NumPy float64 reference of the causal depthwise conv1d (causal-conv1d's ``causal_conv1d_fn``).

Layout: x ``(batch, dim, L)``, weight ``(dim, width)``, bias ``(dim,)``, initial/final states
``(batch, dim, width - 1)``. With ``xp = concat(initial_states or 0, x)`` along time::

    y[b, d, t] = bias[d] + sum_j weight[d, j] * xp[b, d, t + j]      (j = 0 .. width-1)
    out = silu(y) if activation else y,   final_states = xp[..., -(width - 1):]
"""

from __future__ import annotations

import numpy as np

__all__ = ["causal_conv1d_fwd", "causal_conv1d_bwd"]


def _pad(x: np.ndarray, width: int, initial_states: np.ndarray | None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if initial_states is None:
        init = np.zeros(x.shape[:2] + (width - 1,))
    else:
        init = np.asarray(initial_states, dtype=np.float64)
    return np.concatenate([init, x], axis=-1)


def _pre(xp: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, L: int) -> np.ndarray:
    width = weight.shape[1]
    y = np.zeros(xp.shape[:2] + (L,))
    for j in range(width):
        y += weight[None, :, j, None] * xp[..., j : j + L]
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64)[None, :, None]
    return y


def causal_conv1d_fwd(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    initial_states: np.ndarray | None = None,
    activation: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(out (batch, dim, L), final_states (batch, dim, width - 1))`` in float64."""
    weight = np.asarray(weight, dtype=np.float64)
    width = weight.shape[1]
    L = np.shape(x)[-1]
    xp = _pad(x, width, initial_states)
    y = _pre(xp, weight, bias, L)
    out = y / (1.0 + np.exp(-y)) if activation else y
    return out, xp[..., xp.shape[-1] - (width - 1) :].copy()


def causal_conv1d_bwd(
    dout: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    initial_states: np.ndarray | None = None,
    activation: bool = False,
    dfinal_states: np.ndarray | None = None,
) -> dict[str, np.ndarray | None]:
    """Hand-written VJP of :func:`causal_conv1d_fwd`: gradients of x, weight, bias and
    initial_states (``None`` where that input was ``None``)."""
    weight = np.asarray(weight, dtype=np.float64)
    width = weight.shape[1]
    L = np.shape(x)[-1]
    xp = _pad(x, width, initial_states)
    g = np.asarray(dout, dtype=np.float64)
    if activation:
        y = _pre(xp, weight, bias, L)
        s = 1.0 / (1.0 + np.exp(-y))
        g = g * s * (1.0 + y * (1.0 - s))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(weight)
    for j in range(width):
        dxp[..., j : j + L] += weight[None, :, j, None] * g
        dw[:, j] = np.sum(g * xp[..., j : j + L], axis=(0, 2))
    if dfinal_states is not None:
        dxp[..., dxp.shape[-1] - (width - 1) :] += np.asarray(dfinal_states, dtype=np.float64)
    return {
        "x": dxp[..., width - 1 :],
        "weight": dw,
        "bias": None if bias is None else g.sum(axis=(0, 2)),
        "initial_states": None if initial_states is None else dxp[..., : width - 1],
    }
