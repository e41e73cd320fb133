"""Flash attention: ``torch.library`` ops, the PyTorch path, the public drop-ins and ``self_check``.

Two public functions share one pair of custom ops (``scanopt::attention_fwd`` /
``scanopt::attention_bwd``):

- :func:`flash_attn_func` — flash-attn 2.x's ``(B, L, H, D)`` contract, causal and windows
  aligned bottom-right.
- :func:`scaled_dot_product_attention` — ``torch.nn.functional.scaled_dot_product_attention``'s
  ``(B, H, L, D)`` contract, causal aligned top-left.

Inside the ops, :func:`scanopt._env.backend_for` picks the Triton kernels (``launch.py``) or the
PyTorch path below (:func:`torch_attention_fwd` / :func:`torch_attention_bwd`), which computes
like a plain PyTorch attention in the input dtype (matmuls in the input dtype, softmax in fp32)
and is the baseline of the verification rule. Features the kernels lack (an arbitrary
``attn_mask``, ``dropout_p > 0``, ``alibi_slopes``, head dims above 256) go to an exact PyTorch
fallback with a one-time warning per feature.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from scanopt._env import backend_for
from scanopt._tensor import check_tensor
from scanopt.ops._eager import apply, eager, make_function
from scanopt.ops.attention import launch

_WARNED: set[str] = set()


def _warn_once(feature: str, message: str) -> None:
    """``warnings.warn`` the first time a fallback for ``feature`` is taken in this process."""
    if feature not in _WARNED:
        _WARNED.add(feature)
        warnings.warn(message, UserWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------
# PyTorch path (logical (B, H, L, D) tensors)


def _allowed(lq: int, lk: int, diag: int, left: int, right: int, device: torch.device) -> Tensor:
    """(Lq, Lk) bool: query i may attend key j iff ``-left <= j - i - diag <= right``."""
    rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None] - diag
    return (rel >= -left) & (rel <= right)


def _torch_scores(
    q: Tensor, k: Tensor, scale: float, softcap: float, diag: int, left: int, right: int
) -> tuple[Tensor, Tensor | None]:
    """Masked fp32 scores (B, Hk, G, Lq, Lk) from a matmul in the input dtype, and tanh (or None)."""
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    qg = q.reshape(b, hk, hq // hk, lq, d)
    s = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)).float() * scale
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    s = s.masked_fill(~_allowed(lq, lk, diag, left, right, q.device), float("-inf"))
    return s, t


def torch_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    diag: int,
    left: int,
    right: int,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """PyTorch forward on logical (B, H, L, D) tensors; mask as in ``launch.mask_params``.

    Returns ``out`` (B, Hq, Lq, Dv) in v's dtype and ``lse`` (B, Hq, Lq) float32.
    """
    b, hq, lq, _ = q.shape
    s, _ = _torch_scores(q, k, scale, softcap, diag, left, right)
    lse = torch.logsumexp(s, dim=-1)  # -inf on rows with no allowed key
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.matmul(p.to(v.dtype), v.unsqueeze(2))  # (B, Hk, G, Lq, Dv)
    return out.reshape(b, hq, lq, v.shape[-1]), lse.reshape(b, hq, lq)


def torch_attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None = None,
    *,
    scale: float,
    diag: int,
    left: int,
    right: int,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch backward matching :func:`torch_attention_fwd`; returns dq, dk, dv."""
    b, hq, lq, d = q.shape
    hk, dv = k.shape[1], v.shape[3]
    g = hq // hk
    s, t = _torch_scores(q, k, scale, softcap, diag, left, right)
    lse_g = lse.reshape(b, hk, g, lq).float()
    finite = torch.isfinite(lse_g)
    p = torch.exp(s - torch.where(finite, lse_g, 0.0)[..., None])
    dog = dout.reshape(b, hk, g, lq, dv)
    dv_ = torch.matmul(p.to(v.dtype).transpose(-1, -2), dog).float().sum(2)
    dp = torch.matmul(dog, v.unsqueeze(2).transpose(-1, -2)).float()
    delta = (dout.float() * out.float()).sum(-1).reshape(b, hk, g, lq)
    if dlse is not None:
        delta = delta - torch.where(finite, dlse.reshape(b, hk, g, lq).float(), 0.0)
    ds = p * (dp - delta[..., None])
    if t is not None:
        ds = ds * (1.0 - t * t)
    ds = (ds * scale).to(q.dtype)
    dq = torch.matmul(ds, k.unsqueeze(2)).reshape(b, hq, lq, d)
    dk = torch.matmul(ds.transpose(-1, -2), q.reshape(b, hk, g, lq, d)).float().sum(2)
    return dq, dk.to(k.dtype), dv_.to(v.dtype)


def _math_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    diag: int,
    left: int,
    right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact differentiable fallback (fp32 math) for what the kernels lack: ALiBi and dropout.

    Returns out (B, Hq, Lq, Dv), lse (B, Hq, Lq) and flash-attn's ``S_dmask`` (probabilities,
    negated where dropout dropped them; empty when ``dropout_p == 0``).
    """
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    g = hq // hk
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        # flash-attn: bias = -slope * |i + Lk - Lq - j| (bottom-right aligned distance)
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        dist = (i + lk - lq - j).abs().float()
        slopes = alibi_slopes.float().reshape(-1, hq)[:, :, None, None]  # (1 or B, Hq, 1, 1)
        s = s - slopes * dist
    s = s.masked_fill(~_allowed(lq, lk, diag, left, right, q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    s_dmask = q.new_empty((0,))
    if dropout_p > 0:
        keep = torch.rand_like(p) >= dropout_p
        s_dmask = torch.where(keep, p, -p).detach().to(q.dtype)
        p = p * keep / (1.0 - dropout_p)
    out = torch.matmul(p, vf).to(q.dtype)
    return out, lse, s_dmask


# ------------------------------------------------------------------------------------------
# torch.library ops (q, k, v in their native layout: (B, L, H, D) when seq_first, else
# (B, H, L, D); outputs contiguous in the same layout)


def _logical(t: Tensor, seq_first: bool) -> Tensor:
    return t.transpose(1, 2) if seq_first else t


def _native_contiguous(t: Tensor, seq_first: bool) -> Tensor:
    return (t.transpose(1, 2) if seq_first else t).contiguous()


def _attention_fwd_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    causal: bool,
    bottom_right: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    seq_first: bool,
) -> tuple[Tensor, Tensor]:
    qh, kh, vh = (_logical(t, seq_first) for t in (q, k, v))
    diag, left, right = launch.mask_params(
        qh.shape[2], kh.shape[2], causal, bottom_right, window_left, window_right
    )
    if backend_for(q.device.type) == "triton":
        out, lse = launch.attention_fwd(
            qh, kh, vh, scale=scale, diag=diag, left=left, right=right, softcap=softcap,
            seq_first=seq_first,
        )  # fmt: skip
    else:
        out, lse = torch_attention_fwd(
            qh, kh, vh, scale=scale, diag=diag, left=left, right=right, softcap=softcap
        )
    return _native_contiguous(out, seq_first), lse.contiguous()


_attention_fwd_op = torch.library.custom_op("scanopt::attention_fwd", mutates_args=())(
    _attention_fwd_impl
)


@_attention_fwd_op.register_fake
def _attention_fwd_fake(q, k, v, scale, causal, bottom_right, window_left, window_right,
                        softcap, seq_first):  # fmt: skip
    b, n1, n2 = q.shape[:3]
    hq, lq = (n2, n1) if seq_first else (n1, n2)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty((b, hq, lq), dtype=torch.float32)
    return out, lse


def _attention_bwd_impl(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    scale: float,
    causal: bool,
    bottom_right: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    seq_first: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    qh, kh, vh, oh, doh = (_logical(t, seq_first) for t in (q, k, v, out, dout))
    diag, left, right = launch.mask_params(
        qh.shape[2], kh.shape[2], causal, bottom_right, window_left, window_right
    )
    params = dict(scale=scale, diag=diag, left=left, right=right, softcap=softcap)
    if backend_for(q.device.type) == "triton":
        grads = launch.attention_bwd(doh, qh, kh, vh, oh, lse, dlse, seq_first=seq_first, **params)
    else:
        grads = torch_attention_bwd(doh, qh, kh, vh, oh, lse, dlse, **params)
    dq, dk, dv = (_native_contiguous(g, seq_first) for g in grads)
    return dq, dk, dv


_attention_bwd_op = torch.library.custom_op("scanopt::attention_bwd", mutates_args=())(
    _attention_bwd_impl
)


@_attention_bwd_op.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, scale, causal, bottom_right, window_left,
                        window_right, softcap, seq_first):  # fmt: skip
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_fwd_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.params = tuple(params)
    # an unused lse gets None, not zeros: no memset, and the preprocess skips its term
    ctx.set_materialize_grads(False)


def _attention_fwd_backward(ctx: Any, dout: Tensor, dlse: Tensor | None) -> tuple:
    return _attention_backward_with(torch.ops.scanopt.attention_bwd, ctx, dout, dlse)


def _attention_backward_eager(ctx: Any, dout: Tensor, dlse: Tensor | None) -> tuple:
    return _attention_backward_with(_attention_bwd_impl, ctx, dout, dlse)


def _attention_backward_with(bwd: Any, ctx: Any, dout: Tensor, dlse: Tensor | None) -> tuple:
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None and dlse is None:
        return (None,) * (3 + len(ctx.params))
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, dlse, *ctx.params)
    return (dq, dk, dv) + (None,) * len(ctx.params)


_attention_fwd_op.register_autograd(_attention_fwd_backward, setup_context=_attention_fwd_setup)
#: the same forward/backward without the dispatcher, for eager calls (``scanopt.ops._eager``)
_AttentionFunction = make_function(
    "_AttentionFunction", _attention_fwd_impl, _attention_fwd_setup, _attention_backward_eager
)


def _attention(*args: Any) -> tuple[Tensor, Tensor]:
    """``scanopt::attention_fwd`` with autograd: the custom op under torch.compile, the same
    implementation through a plain autograd.Function in eager mode."""
    if eager(*args):
        return apply(_AttentionFunction, _attention_fwd_impl, *args)
    return torch.ops.scanopt.attention_fwd(*args)


# ------------------------------------------------------------------------------------------
# public functions


def _check_qkv(
    q: Any, k: Any, v: Any, ndim: int | tuple[int, ...], layout: str, names: str = "q k v"
) -> None:
    """Shape/dtype/device checks with errors that name the argument; ``layout`` 'bshd'/'bhsd'."""
    nq, nk, nv = names.split()
    check_tensor(nq, q, ndim=ndim)
    check_tensor(nk, k, ndim=q.dim(), device=q.device)
    check_tensor(nv, v, ndim=q.dim(), device=q.device)
    for name, t in ((nk, k), (nv, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {nq} has {q.dtype}; they must match")
        if t.shape[0] != q.shape[0]:
            raise ValueError(
                f"batch mismatch: {nq} has batch {q.shape[0]} but {name} has {t.shape[0]}"
            )
    seq_dim, head_dim = (1, 2) if layout == "bshd" else (-2, -3)
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"head dims differ: {nq} has D={q.shape[-1]} but {nk} has D={k.shape[-1]}")
    if v.shape[seq_dim] != k.shape[seq_dim]:
        raise ValueError(
            f"{nv} has {v.shape[seq_dim]} keys but {nk} has {k.shape[seq_dim]}; they must match"
        )
    if q.dim() >= 4 or layout == "bshd":
        hq, hk, hv = q.shape[head_dim], k.shape[head_dim], v.shape[head_dim]
        if hv != hk:
            raise ValueError(f"{nv} has {hv} heads but {nk} has {hk}; they must match")
        if hk == 0 or hq % hk != 0:
            raise ValueError(
                f"{nq} has {hq} heads, not a multiple of the {hk} heads of {nk} and {nv} "
                "(GQA/MQA needs Hq % Hk == 0)"
            )
    if q.shape[-1] == 0:
        raise ValueError(f"{nq} has head dim 0")


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Drop-in for ``flash_attn.flash_attn_func`` (flash-attn 2.x): softmax attention in
    flash-attn's ``(batch, seqlen, nheads, headdim)`` layout, Triton kernels forward and backward.

    Args:
        q: ``(B, Lq, Hq, D)``; bfloat16, float16 or float32 (float32 runs the kernels with
            IEEE fp32 dot products, i.e. exact to fp32 rounding). Only the last dim need be
            contiguous.
        k: ``(B, Lk, Hk, D)`` with ``Hq % Hk == 0`` (GQA/MQA: query head ``h`` reads kv head
            ``h // (Hq // Hk)``). ``Lk`` may differ from ``Lq``.
        v: ``(B, Lk, Hk, Dv)``; ``Dv`` may differ from ``D`` (flash-attn requires equal).
        dropout_p: dropout on the attention probabilities. ``> 0`` runs an exact PyTorch
            fallback (one-time warning); its random pattern cannot match flash-attn's.
        softmax_scale: score scale; default ``1 / sqrt(D)``.
        causal: mask keys after the query's diagonal, aligned bottom-right (query ``i`` sees
            keys ``j <= i + Lk - Lq``), as flash-attn >= 2.1.
        window_size: ``(left, right)`` sliding window: query ``i`` sees keys ``j`` in
            ``[i + Lk - Lq - left, i + Lk - Lq + right]``; ``-1`` is unbounded.
        softcap: if ``> 0``, scores become ``softcap * tanh(scores / softcap)`` (after scaling).
        alibi_slopes: ``(Hq,)`` or ``(B, Hq)`` fp32 ALiBi slopes: bias
            ``-slope * |i + Lk - Lq - j|``. Runs the exact PyTorch fallback (one-time warning).
        deterministic: accepted for compatibility; the backward is always deterministic here
            (no atomics: dQ has its own pass and dK/dV are summed over a GQA group in one
            program).
        return_attn_probs: also return the softmax LSE and flash-attn's ``S_dmask``.

    Returns:
        ``out`` ``(B, Lq, Hq, Dv)`` in q's dtype; with ``return_attn_probs``,
        ``(out, softmax_lse, S_dmask)``: ``softmax_lse`` ``(B, Hq, Lq)`` float32, natural log,
        differentiable (flash-attn ignores its gradient), ``-inf`` on rows that see no key
        (where ``out`` is 0); ``S_dmask`` is an empty tensor when ``dropout_p == 0`` (as
        flash-attn 2.6+), else the ``(B, Hq, Lq, Lk)`` probabilities, negated where dropped.
    """
    _check_qkv(q, k, v, 4, "bshd")
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    wl, wr = int(window_size[0]), int(window_size[1])
    reasons = []
    if dropout_p > 0:
        reasons.append("dropout_p > 0")
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, ndim=(1, 2), device=q.device)
        if alibi_slopes.shape[-1] != q.shape[2] or (
            alibi_slopes.dim() == 2 and alibi_slopes.shape[0] != q.shape[0]
        ):
            raise ValueError(
                f"alibi_slopes must have shape ({q.shape[2]},) or ({q.shape[0]}, {q.shape[2]}), "
                f"got {tuple(alibi_slopes.shape)}"
            )
        reasons.append("alibi_slopes")
    if max(q.shape[-1], v.shape[-1]) > launch.MAX_HEAD_DIM:
        reasons.append(f"head dim > {launch.MAX_HEAD_DIM}")
    if reasons:
        for reason in reasons:
            _warn_once(
                f"flash_attn_func:{reason}",
                f"scanopt.flash_attn_func: {reason} is not in the Triton kernels; using an exact "
                "PyTorch fallback (slower, O(L^2) memory)",
            )
        diag, left, right = launch.mask_params(q.shape[1], k.shape[1], causal, True, wl, wr)
        out, lse, s_dmask = _math_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, diag=diag,
            left=left, right=right, softcap=float(softcap), alibi_slopes=alibi_slopes,
            dropout_p=float(dropout_p),
        )  # fmt: skip
        out = out.transpose(1, 2)
    else:
        out, lse = _attention(q, k, v, scale, bool(causal), True, wl, wr, float(softcap), True)
        s_dmask = q.new_empty((0,))
    if return_attn_probs:
        return out, lse, s_dmask
    return out


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same arguments and
    result), running scanopt's Triton kernels forward and backward.

    Args:
        query: ``(B, Hq, Lq, E)`` (or ``(B, Lq, E)``); bfloat16, float16 or float32 (float32
            runs the kernels with IEEE fp32 dot products). Only the last dim need be contiguous;
            a query whose memory is ``(B, Lq, Hq, E)`` gives an output with that memory too.
        key: ``(B, Hk, Lk, E)``; ``Hk == Hq``, or ``Hq % Hk == 0`` with ``enable_gqa=True``.
        value: ``(B, Hk, Lk, Ev)``.
        attn_mask: bool (True = attend) or additive float mask broadcastable to
            ``(B, Hq, Lq, Lk)``. Not in the kernels: runs ``torch.nn.functional.
            scaled_dot_product_attention`` itself (one-time warning).
        dropout_p: ``> 0`` likewise runs torch's own SDPA (one-time warning).
        is_causal: causal mask aligned top-left (query ``i`` sees keys ``j <= i``), as torch.
        scale: score scale; default ``1 / sqrt(E)``.
        enable_gqa: allow ``Hq`` to be a multiple of ``Hk`` (query head ``h`` reads kv head
            ``h // (Hq // Hk)``, like ``repeat_interleave``).

    Returns:
        ``(B, Hq, Lq, Ev)`` (or ``(B, Lq, Ev)``) in the query's dtype.
    """
    _check_qkv(query, key, value, (3, 4), "bhsd", names="query key value")
    if query.dim() == 4 and query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"query has {query.shape[1]} heads but key has {key.shape[1]}: pass enable_gqa=True "
            "for grouped-query attention"
        )
    reasons = []
    if attn_mask is not None:
        reasons.append("attn_mask")
    if dropout_p > 0:
        reasons.append("dropout_p > 0")
    if max(query.shape[-1], value.shape[-1]) > launch.MAX_HEAD_DIM:
        reasons.append(f"head dim > {launch.MAX_HEAD_DIM}")
    if reasons:
        for reason in reasons:
            _warn_once(
                f"scaled_dot_product_attention:{reason}",
                f"scanopt.scaled_dot_product_attention: {reason} is not in the Triton kernels; "
                "using torch.nn.functional.scaled_dot_product_attention",
            )
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    sm_scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    # keep a (B, L, H, D)-memory query's layout (torch's flash backend does the same)
    seq_first = query.dim() == 4 and query.shape[1] > 1 and query.transpose(1, 2).is_contiguous()
    q, k, v = (_logical(t, seq_first) for t in (query, key, value))
    out, _ = _attention(q, k, v, sm_scale, bool(is_causal), False, -1, -1, 0.0, seq_first)
    out = _logical(out, seq_first)
    return out.squeeze(1) if squeeze else out


# ------------------------------------------------------------------------------------------
# self check (``scanopt verify``)


def _self_check_cases(quick: bool, on_gpu: bool) -> list[dict[str, Any]]:
    cases = [
        dict(b=1, hq=2, hk=1, lq=63, lk=63, d=64, causal=True),
        dict(b=2, hq=4, hk=2, lq=130, lk=63, d=80, causal=False, window=(16, 8)),
        dict(b=1, hq=3, hk=1, lq=40, lk=97, d=40, causal=True, softcap=3.0),
    ]
    if on_gpu and not quick:
        cases += [
            dict(b=2, hq=8, hk=2, lq=1025, lk=1025, d=128, causal=True),
            dict(b=1, hq=4, hk=4, lq=2048, lk=1000, d=96, causal=False),
            dict(b=1, hq=2, hk=1, lq=300, lk=700, d=256, causal=True, window=(64, -1)),
        ]
    return cases


def _self_check_one(case: dict[str, Any], dtype: torch.dtype, device: str, seed: int):
    from scanopt.reference import attention_bwd, attention_fwd
    from scanopt.verify import Report

    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, hq, hk, lq, lk, d = (case[x] for x in ("b", "hq", "hk", "lq", "lk", "d"))
    causal, window = case.get("causal", False), case.get("window", (-1, -1))
    softcap = case.get("softcap", 0.0)

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v, dout = rnd(b, lq, hq, d), rnd(b, lk, hk, d), rnd(b, lk, hk, d), rnd(b, lq, hq, d)
    dlse = torch.randn(b, hq, lq, generator=gen).to(device)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse, _ = flash_attn_func(
        qr, kr, vr, causal=causal, window_size=window, softcap=softcap, return_attn_probs=True
    )
    torch.autograd.backward((out, lse), (dout, dlse))

    scale = d**-0.5
    qh, kh, vh, doh = (t.transpose(1, 2) for t in (q, k, v, dout))
    diag, left, right = launch.mask_params(lq, lk, causal, True, *window)
    params = dict(scale=scale, diag=diag, left=left, right=right, softcap=softcap)
    b_out, b_lse = torch_attention_fwd(qh, kh, vh, **params)
    b_dq, b_dk, b_dv = torch_attention_bwd(doh, qh, kh, vh, b_out, b_lse, dlse, **params)

    n = [np.asarray(t.detach().cpu().double().numpy()) for t in (qh, kh, vh, doh, dlse)]
    kw = dict(scale=scale, causal=causal, causal_align="bottom_right", window=window,
              softcap=softcap)  # fmt: skip
    r_out, r_lse = attention_fwd(n[0], n[1], n[2], **kw)
    r_grads = attention_bwd(n[3], n[0], n[1], n[2], dlse=n[4], **kw)

    name = str(dtype).replace("torch.", "")
    desc = f"{name} b{b} hq{hq} hk{hk} lq{lq} lk{lk} d{d}" + (" causal" if causal else "")
    desc += f" window{window}" if window != (-1, -1) else ""
    desc += f" softcap{softcap}" if softcap else ""
    report = Report("attention", desc)
    report.check("out", out.transpose(1, 2), r_out, baseline=b_out)
    report.check("lse", lse, r_lse, baseline=b_lse, dtype=name)
    report.check("dq", qr.grad.transpose(1, 2), r_grads["q"], baseline=b_dq)
    report.check("dk", kr.grad.transpose(1, 2), r_grads["k"], baseline=b_dk)
    report.check("dv", vr.grad.transpose(1, 2), r_grads["v"], baseline=b_dv)
    return report


def self_check(device: str = "cuda", quick: bool = False) -> list:
    """Run flash_attn_func forward + backward (out, lse, dq, dk, dv) on a few odd shapes
    (GQA, Lq != Lk, windows, softcap, head dims 40/64/80) against the NumPy float64 reference
    with the verification rule; returns one ``scanopt.verify.Report`` per case and dtype."""
    on_gpu = torch.device(device).type == "cuda"
    dtypes = [torch.bfloat16, torch.float16] if on_gpu else [torch.float16, torch.float32]
    reports = []
    for i, case in enumerate(_self_check_cases(quick, on_gpu)):
        for dtype in dtypes:
            reports.append(_self_check_one(case, dtype, device, seed=1000 + i))
    return reports


__all__ = [
    "flash_attn_func",
    "scaled_dot_product_attention",
    "self_check",
    "torch_attention_bwd",
    "torch_attention_fwd",
]
