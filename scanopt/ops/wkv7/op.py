"""RWKV-7 WKV: ``torch.library`` ops, autograd, the public :func:`wkv7`, the RWKV-LM adapter
:func:`wkv7_rwkvlm` and ``self_check``.

Backends (``scanopt._env.backend_for``): the Triton kernels of ``launch.py`` on CUDA tensors (and
on CPU tensors under ``TRITON_INTERPRET=1``), else the PyTorch implementation below (fp32 math,
the same checkpointed recurrence).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scanopt._env import backend_for
from scanopt.ops._eager import apply, eager, make_function
from scanopt.ops._rwkv_common import (
    cast_grad,
    check_inputs,
    check_state,
    default_chunk,
    log_decay,
    num_chunks,
    resolve_scale,
    self_check_reports,
    wants_grad,
)

__all__ = ["wkv7", "wkv7_rwkvlm", "self_check"]

_INPUTS = ("r", "w", "k", "v", "a", "b")

# --------------------------------------------------------------------------------------------
# PyTorch implementation (the torch backend, and the same-dtype baseline of the verify rule)


def _torch_step(h: Tensor, d: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor):
    """One step on fp32 ``[B, H, K, V]``; returns ``(h_t, sa_t)``."""
    sa = torch.einsum("bhk,bhkv->bhv", a, h)
    h = h * d[..., None] + b[..., None] * sa[..., None, :] + k[..., None] * v[..., None, :]
    return h, sa


def _torch_fwd(r, w, k, v, a, b, scale, initial_state, chunk, store_ckpt):
    B, T, H, K = r.shape
    V = v.shape[-1]
    q = r.float() * scale
    d, kf, vf, af, bf = w.float().exp(), k.float(), v.float(), a.float(), b.float()
    if initial_state is not None:
        h = initial_state.float().clone()
    else:
        h = torch.zeros(B, H, K, V, dtype=torch.float32, device=r.device)
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=r.device)
    ckpts = []
    for t in range(T):
        if store_ckpt and t % chunk == 0:
            ckpts.append(h)
        h, _ = _torch_step(h, d[:, t], kf[:, t], vf[:, t], af[:, t], bf[:, t])
        o[:, t] = torch.einsum("bhkv,bhk->bhv", h, q[:, t])
    if store_ckpt:
        ckpt = (
            torch.stack(ckpts, 2)
            if ckpts
            else torch.empty(B, H, 0, K, V, dtype=torch.float32, device=r.device)
        )
    else:
        ckpt = torch.empty(0, dtype=torch.float32, device=r.device)
    return o.to(r.dtype), h, ckpt


def _torch_bwd(do, dht, r, w, k, v, a, b, scale, initial_state, ckpt, chunk):
    B, T, H, K = r.shape
    V = v.shape[-1]
    if ckpt.numel() == 0 and T > 0:
        _, _, ckpt = _torch_fwd(r, w, k, v, a, b, scale, initial_state, chunk, True)
    q = r.float() * scale
    d, kf, vf, af, bf = w.float().exp(), k.float(), v.float(), a.float(), b.float()
    dof = do.float()
    if dht is not None:
        dh = dht.float().clone()
    else:
        dh = torch.zeros(B, H, K, V, dtype=torch.float32, device=r.device)
    dq, dw, dk, da, db = (torch.zeros(B, T, H, K, device=r.device) for _ in range(5))
    dv = torch.zeros(B, T, H, V, device=r.device)
    for c in reversed(range(num_chunks(T, chunk))):
        t0, t1 = c * chunk, min(c * chunk + chunk, T)
        hs = [ckpt[:, :, c].float()]  # h_{t-1} for t in [t0, t1)
        for t in range(t0, t1):
            hs.append(_torch_step(hs[-1], d[:, t], kf[:, t], vf[:, t], af[:, t], bf[:, t])[0])
        for t in reversed(range(t0, t1)):
            hp, hn = hs[t - t0], hs[t - t0 + 1]
            sa = torch.einsum("bhk,bhkv->bhv", af[:, t], hp)
            dq[:, t] = torch.einsum("bhkv,bhv->bhk", hn, dof[:, t])
            g = dh + q[:, t, :, :, None] * dof[:, t, :, None, :]
            dk[:, t] = torch.einsum("bhkv,bhv->bhk", g, vf[:, t])
            dv[:, t] = torch.einsum("bhkv,bhk->bhv", g, kf[:, t])
            dw[:, t] = d[:, t] * (g * hp).sum(-1)
            db[:, t] = torch.einsum("bhkv,bhv->bhk", g, sa)
            dsa = torch.einsum("bhkv,bhk->bhv", g, bf[:, t])
            da[:, t] = torch.einsum("bhkv,bhv->bhk", hp, dsa)
            dh = g * d[:, t, :, :, None] + af[:, t, :, :, None] * dsa[:, :, None, :]
    dh0 = (
        dh.to(initial_state.dtype)
        if initial_state is not None
        else torch.empty(0, dtype=torch.float32, device=r.device)
    )
    grads = (dq * scale, dw, dk, dv, da, db)
    return (*(cast_grad(g, x) for g, x in zip(grads, (r, w, k, v, a, b), strict=True)), dh0)


# --------------------------------------------------------------------------------------------
# torch.library ops


def _wkv7_fwd_impl(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float,
    initial_state: Tensor | None,
    store_ckpt: bool,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(o, final_state fp32, checkpoints fp32 or an empty tensor)``."""
    if backend_for(r.device.type) == "triton":
        from scanopt.ops.wkv7 import launch

        return launch.wkv7_fwd(
            r, w, k, v, a, b, scale, initial_state, store_ckpt, config={"CHUNK": chunk}
        )
    return _torch_fwd(r, w, k, v, a, b, scale, initial_state, chunk, store_ckpt)


_wkv7_fwd_op = torch.library.custom_op("scanopt::wkv7_fwd", mutates_args=())(_wkv7_fwd_impl)


@_wkv7_fwd_op.register_fake
def _(r, w, k, v, a, b, scale, initial_state, store_ckpt, chunk):
    B, T, H, K = r.shape
    V = v.shape[-1]
    o = r.new_empty((B, T, H, V))
    ht = r.new_empty((B, H, K, V), dtype=torch.float32)
    shape = (B, H, (T + chunk - 1) // chunk, K, V) if store_ckpt else (0,)
    return o, ht, r.new_empty(shape, dtype=torch.float32)


def _wkv7_bwd_impl(
    do: Tensor,
    dht: Tensor | None,
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float,
    initial_state: Tensor | None,
    ckpt: Tensor,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dr, dw, dk, dv, da, db, d_initial_state or an empty tensor)``."""
    if backend_for(r.device.type) == "triton":
        from scanopt.ops.wkv7 import launch

        return launch.wkv7_bwd(do, dht, r, w, k, v, a, b, scale, initial_state, ckpt, chunk)
    return _torch_bwd(do, dht, r, w, k, v, a, b, scale, initial_state, ckpt, chunk)


_wkv7_bwd_op = torch.library.custom_op("scanopt::wkv7_bwd", mutates_args=())(_wkv7_bwd_impl)


@_wkv7_bwd_op.register_fake
def _(do, dht, r, w, k, v, a, b, scale, initial_state, ckpt, chunk):
    dh0 = (
        torch.empty_like(initial_state)
        if initial_state is not None
        else r.new_empty((0,), dtype=torch.float32)
    )
    return (*(torch.empty_like(x) for x in (r, w, k, v, a, b)), dh0)


def _setup_context(ctx, inputs, output):
    r, w, k, v, a, b, scale, initial_state, store_ckpt, chunk = inputs
    ctx.save_for_backward(r, w, k, v, a, b, initial_state, output[2])
    ctx.scale, ctx.chunk, ctx.out_dtype = scale, chunk, output[0].dtype
    # unused outputs (the final state, the checkpoints) get None, not zeros: no memsets
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dht, _dckpt):
    return _backward_with(torch.ops.scanopt.wkv7_bwd, ctx, do, dht)


def _backward_eager(ctx, do, dht, _dckpt):
    return _backward_with(_wkv7_bwd_impl, ctx, do, dht)


def _backward_with(bwd, ctx, do, dht):
    r, w, k, v, a, b, initial_state, ckpt = ctx.saved_tensors
    if do is None and dht is None:
        return (None,) * 10
    if do is None:
        do = torch.zeros(v.shape, dtype=ctx.out_dtype, device=v.device)  # o is (B, T, H, V)
    dr, dw, dk, dv, da, db, dh0 = bwd(
        do, dht, r, w, k, v, a, b, ctx.scale, initial_state, ckpt, ctx.chunk
    )
    return dr, dw, dk, dv, da, db, None, (dh0 if initial_state is not None else None), None, None


_wkv7_fwd_op.register_autograd(_backward, setup_context=_setup_context)
#: the same forward/backward without the dispatcher, for eager calls (``scanopt.ops._eager``)
_WKV7Function = make_function("_WKV7Function", _wkv7_fwd_impl, _setup_context, _backward_eager)


# --------------------------------------------------------------------------------------------
# public API


def wkv7(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float | None = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """RWKV-7 WKV (the DPLR delta rule), drop-in for flash-linear-attention's
    ``fla.ops.rwkv7.chunk_rwkv7`` (and ``fused_recurrent_rwkv7``).

    Per (batch, head), with state ``S`` ``[K, V]``::

        S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
        o_t = S_t^T (scale * r_t)

    Args:
        r: ``[B, T, H, K]`` receptance (fla's ``q``).
        w: ``[B, T, H, K]`` **log** decay, ``w <= 0`` (any value: decays down to ``exp(-20)`` and
            below are exact; RWKV-LM's clamp ``-exp(-0.5) * sigmoid(x)`` is not required). May be
            fp32 while the other inputs are bf16/fp16. Not checked (that would need a device sync):
            ``w > 0`` grows the state exponentially.
        k: ``[B, T, H, K]`` key.
        v: ``[B, T, H, V]`` value.
        a: ``[B, T, H, K]`` rank-1 read vector (RWKV-7 passes ``-kk``).
        b: ``[B, T, H, K]`` rank-1 write vector (RWKV-7 passes ``kk * alpha``).
        scale: multiplies ``r``; default 1.0 as RWKV uses. ``None`` means ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` (fp32 recommended) or ``None`` (zeros). Differentiable.
        output_final_state: also return the final state.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in ``r``'s dtype; ``final_state``
        ``[B, H, K, V]`` fp32 when ``output_final_state`` else ``None``. Gradients flow to every
        input, to ``initial_state`` and from ``final_state``.

    Any ``T >= 1``, ``K <= 256`` (any size; powers of two are fastest), any ``V``; bf16, fp16 or
    fp32 inputs (``r, k, v, a, b`` share one dtype), fp32 math. ``fla``'s ``cu_seqlens`` is not
    supported: run the sequences as a batch, or one by one passing the state.
    """
    names = _INPUTS
    B, T, H, K, V = check_inputs(names, (r, w, k, v, a, b))
    initial_state = check_state("initial_state", initial_state, B, H, K, V, r.device)
    if T < 1:
        raise ValueError(f"r: the sequence length T must be >= 1, got shape {tuple(r.shape)}")
    store_ckpt = wants_grad(r, w, k, v, a, b, initial_state)
    args = (
        r,
        w,
        k,
        v,
        a,
        b,
        resolve_scale(scale, K),
        initial_state,
        store_ckpt,
        default_chunk(T, K, V),
    )
    if eager(*args):
        o, ht, _ = apply(_WKV7Function, _wkv7_fwd_impl, *args)
    else:
        o, ht, _ = torch.ops.scanopt.wkv7_fwd(*args)
    return o, (ht if output_final_state else None)


#: RWKV-LM's clampw kernels compute ``decay = exp(-exp(-0.5) * sigmoid(w))``
RWKVLM_W_SCALE = -math.exp(-0.5)


def wkv7_rwkvlm(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    head_size: int = 64,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Drop-in for RWKV-LM's ``RWKV7_CLAMPW_CUDA(r, w, k, v, a, b)``
    (``RWKV-v7/train_temp/src/model.py``, kernel ``cuda/rwkv7_clampw*.cu``).

    Args:
        r, w, k, v, a, b: ``(B, T, C)`` with ``C = H * head_size``; ``w`` is RWKV-LM's raw decay
            logit (``w0 + tanh(x W1) W2``), turned into the log decay ``-exp(-0.5) * sigmoid(w)``
            exactly as the clampw kernel does (in fp32); ``a = -kk``, ``b = kk * a``.
        head_size: ``N`` (RWKV-LM's ``HEAD_SIZE``, 64 in released models).
        initial_state: optional ``(B, H, N, N)`` state in RWKV-LM's ``S[v][k]`` layout.
        output_final_state: also return the final state (same layout).

    Returns:
        ``y`` ``(B, T, C)`` (and the final state when asked). Unlike the CUDA kernel: any ``T``
        (no ``T % 16`` padding), fp16/fp32 as well as bf16, and state in and out with gradients.

    Switch RWKV-LM training code with one import:
    ``from scanopt.ops.wkv7.op import wkv7_rwkvlm as RWKV7_CLAMPW_CUDA``.
    """
    if not isinstance(r, Tensor) or r.dim() != 3:
        raise ValueError(f"r must be (B, T, C), got {getattr(r, 'shape', type(r))}")
    B, T, C = r.shape
    if C % head_size:
        raise ValueError(f"r: C = {C} is not a multiple of head_size = {head_size}")
    H = C // head_size
    for name, x in zip(_INPUTS, (r, w, k, v, a, b), strict=True):
        if not isinstance(x, Tensor) or tuple(x.shape) != (B, T, C):
            raise ValueError(f"{name} must have shape ({B}, {T}, {C}) like r")
    log_w = RWKVLM_W_SCALE * torch.sigmoid(w.float())
    r4, w4, k4, v4, a4, b4 = (x.reshape(B, T, H, head_size) for x in (r, log_w, k, v, a, b))
    s0 = initial_state.transpose(-1, -2) if initial_state is not None else None
    o, ht = wkv7(r4, w4, k4, v4, a4, b4, 1.0, s0, output_final_state)
    y = o.reshape(B, T, C)
    if output_final_state:
        assert ht is not None
        return y, ht.transpose(-1, -2)
    return y


# --------------------------------------------------------------------------------------------
# verification (tests, `scanopt verify`)


def make_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    decay: str = "rwkv7",
    w_dtype: torch.dtype | None = None,
    initial_state: bool = False,
    seed: int = 0,
) -> dict:
    """Random RWKV-7-shaped inputs and cotangents.

    ``a = -kk`` and ``b = kk * alpha`` with ``kk`` unit-norm per head and ``alpha`` in (0, 1), as
    RWKV-7 builds them (so the transition is a contraction); ``w`` from
    :func:`scanopt.ops._rwkv_common.log_decay` of kind ``decay``. Returns a dict with ``r, w, k,
    v, a, b, initial_state`` (``None`` unless asked), ``do`` and ``dht``.
    """
    V = K if V is None else V
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(shape, generator=g) * std

    kk = torch.nn.functional.normalize(randn(B, T, H, K), dim=-1)
    alpha = torch.sigmoid(randn(B, T, H, K))
    x = {
        "r": randn(B, T, H, K, std=0.5),
        "w": log_decay((B, T, H, K), decay, g),
        "k": randn(B, T, H, K, std=0.5),
        "v": randn(B, T, H, V),
        "a": -kk,
        "b": kk * alpha,
    }
    out = {n: t.to(device=device, dtype=dtype) for n, t in x.items()}
    out["w"] = x["w"].to(device=device, dtype=w_dtype or dtype)
    out["initial_state"] = randn(B, H, K, V).to(device) if initial_state else None
    out["do"] = randn(B, T, H, V).to(device=device, dtype=dtype)
    out["dht"] = randn(B, H, K, V).to(device)
    return out


def check_case(inputs: dict, case: str = "", *, scale: float = 1.0) -> object:
    """Run :func:`wkv7` (whatever backend is active) forward and backward on ``inputs`` (from
    :func:`make_inputs`) and compare the output, the final state and every gradient with the
    float64 reference, using the torch path in the same dtypes as the baseline.
    Returns a :class:`scanopt.verify.Report`."""
    from scanopt.reference import wkv7_bwd as ref_bwd
    from scanopt.reference import wkv7_fwd as ref_fwd
    from scanopt.verify import Report, to_numpy

    h0 = inputs["initial_state"]
    args = [inputs[n].detach().clone().requires_grad_() for n in _INPUTS]
    s0 = h0.detach().clone().requires_grad_() if h0 is not None else None
    o, ht = wkv7(*args, scale=scale, initial_state=s0, output_final_state=True)
    leaves = args + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad([o, ht], leaves, [inputs["do"], inputs["dht"]])

    raw = [inputs[n].detach() for n in _INPUTS]
    chunk = default_chunk(o.shape[1], raw[0].shape[-1], raw[3].shape[-1])
    b_o, b_ht, b_ckpt = _torch_fwd(*raw, scale, h0, chunk, True)
    b_grads = _torch_bwd(inputs["do"], inputs["dht"], *raw, scale, h0, b_ckpt, chunk)

    np_in = [to_numpy(x) for x in raw]
    np_h0 = to_numpy(h0) if h0 is not None else None
    ref_o, ref_ht = ref_fwd(*np_in, scale=scale, initial_state=np_h0)
    ref_g = ref_bwd(
        to_numpy(inputs["do"]),
        *np_in,
        scale=scale,
        initial_state=np_h0,
        dfinal_state=to_numpy(inputs["dht"]),
    )

    report = Report("wkv7", case)
    report.check("o", o, ref_o, baseline=b_o)
    report.check("final_state", ht, ref_ht, baseline=b_ht)
    for name, g, bg in zip(_INPUTS, grads, b_grads, strict=False):
        report.check(f"d{name}", g, ref_g[name], baseline=bg)
    if s0 is not None:
        report.check("dinitial_state", grads[-1], ref_g["initial_state"], baseline=b_grads[-1])
    return report


def self_check(device: str, quick: bool) -> list:
    """Verify :func:`wkv7` on ``device`` against the float64 reference (``scanopt verify``)."""
    return self_check_reports("wkv7", make_inputs, check_case, device, quick)
