"""RWKV-6 WKV: ``torch.library`` ops, autograd, the public :func:`wkv6`, the RWKV-LM adapter
:func:`wkv6_rwkvlm` and ``self_check``.

Backends (``scanopt._env.backend_for``): the Triton kernels of ``launch.py`` on CUDA tensors (and
on CPU tensors under ``TRITON_INTERPRET=1``), else the PyTorch implementation below (fp32 math,
the same checkpointed recurrence).
"""

from __future__ import annotations

import torch
from torch import Tensor

from scanopt._env import backend_for
from scanopt._tensor import FLOAT_DTYPES, check_tensor
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

__all__ = ["wkv6", "wkv6_rwkvlm", "self_check"]

_INPUTS = ("r", "k", "v", "w", "u")

# --------------------------------------------------------------------------------------------
# PyTorch implementation (the torch backend, and the same-dtype baseline of the verify rule)


def _torch_fwd(r, k, v, w, u, scale, initial_state, chunk, store_ckpt):
    B, T, H, K = r.shape
    V = v.shape[-1]
    q = r.float() * scale
    kf, vf, d, uf = k.float(), v.float(), w.float().exp(), u.float()[None, :, :, None]
    if initial_state is not None:
        h = initial_state.float().clone()
    else:
        h = torch.zeros(B, H, K, V, dtype=torch.float32, device=r.device)
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=r.device)
    ckpts = []
    for t in range(T):
        if store_ckpt and t % chunk == 0:
            ckpts.append(h)
        kv = kf[:, t, :, :, None] * vf[:, t, :, None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t], h + uf * kv)
        h = h * d[:, t, :, :, None] + kv
    if store_ckpt:
        ckpt = (
            torch.stack(ckpts, 2)
            if ckpts
            else torch.empty(B, H, 0, K, V, dtype=torch.float32, device=r.device)
        )
    else:
        ckpt = torch.empty(0, dtype=torch.float32, device=r.device)
    return o.to(r.dtype), h, ckpt


def _torch_bwd(do, dht, r, k, v, w, u, scale, initial_state, ckpt, chunk):
    B, T, H, K = r.shape
    V = v.shape[-1]
    if ckpt.numel() == 0 and T > 0:
        _, _, ckpt = _torch_fwd(r, k, v, w, u, scale, initial_state, chunk, True)
    q = r.float() * scale
    kf, vf, d, uf = k.float(), v.float(), w.float().exp(), u.float()[None, :, :, None]
    dof = do.float()
    if dht is not None:
        dh = dht.float().clone()
    else:
        dh = torch.zeros(B, H, K, V, dtype=torch.float32, device=r.device)
    dq, dk, dw = (torch.zeros(B, T, H, K, device=r.device) for _ in range(3))
    dv = torch.zeros(B, T, H, V, device=r.device)
    du = torch.zeros(H, K, device=r.device)
    for c in reversed(range(num_chunks(T, chunk))):
        t0, t1 = c * chunk, min(c * chunk + chunk, T)
        hs = [ckpt[:, :, c].float()]  # h_{t-1} for t in [t0, t1)
        for t in range(t0, t1 - 1):
            hs.append(hs[-1] * d[:, t, :, :, None] + kf[:, t, :, :, None] * vf[:, t, :, None, :])
        for t in reversed(range(t0, t1)):
            hp = hs[t - t0]
            kv = kf[:, t, :, :, None] * vf[:, t, :, None, :]
            dx = q[:, t, :, :, None] * dof[:, t, :, None, :]
            dq[:, t] = torch.einsum("bhkv,bhv->bhk", hp + uf * kv, dof[:, t])
            du += (dx * kv).sum((0, 3))
            dkv = uf * dx + dh
            dk[:, t] = torch.einsum("bhkv,bhv->bhk", dkv, vf[:, t])
            dv[:, t] = torch.einsum("bhkv,bhk->bhv", dkv, kf[:, t])
            dw[:, t] = d[:, t] * (dh * hp).sum(-1)
            dh = dh * d[:, t, :, :, None] + dx
    dh0 = (
        dh.to(initial_state.dtype)
        if initial_state is not None
        else torch.empty(0, dtype=torch.float32, device=r.device)
    )
    grads = (dq * scale, dk, dv, dw, du)
    return (*(cast_grad(g, x) for g, x in zip(grads, (r, k, v, w, u), strict=True)), dh0)


# --------------------------------------------------------------------------------------------
# torch.library ops


def _wkv6_fwd_impl(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    scale: float,
    initial_state: Tensor | None,
    store_ckpt: bool,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(o, final_state fp32, checkpoints fp32 or an empty tensor)``."""
    if backend_for(r.device.type) == "triton":
        from scanopt.ops.wkv6 import launch

        return launch.wkv6_fwd(
            r, k, v, w, u, scale, initial_state, store_ckpt, config={"CHUNK": chunk}
        )
    return _torch_fwd(r, k, v, w, u, scale, initial_state, chunk, store_ckpt)


_wkv6_fwd_op = torch.library.custom_op("scanopt::wkv6_fwd", mutates_args=())(_wkv6_fwd_impl)


@_wkv6_fwd_op.register_fake
def _(r, k, v, w, u, scale, initial_state, store_ckpt, chunk):
    B, T, H, K = r.shape
    V = v.shape[-1]
    o = r.new_empty((B, T, H, V))
    ht = r.new_empty((B, H, K, V), dtype=torch.float32)
    shape = (B, H, (T + chunk - 1) // chunk, K, V) if store_ckpt else (0,)
    return o, ht, r.new_empty(shape, dtype=torch.float32)


def _wkv6_bwd_impl(
    do: Tensor,
    dht: Tensor | None,
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    scale: float,
    initial_state: Tensor | None,
    ckpt: Tensor,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dr, dk, dv, dw, du, d_initial_state or an empty tensor)``."""
    if backend_for(r.device.type) == "triton":
        from scanopt.ops.wkv6 import launch

        return launch.wkv6_bwd(do, dht, r, k, v, w, u, scale, initial_state, ckpt, chunk)
    return _torch_bwd(do, dht, r, k, v, w, u, scale, initial_state, ckpt, chunk)


_wkv6_bwd_op = torch.library.custom_op("scanopt::wkv6_bwd", mutates_args=())(_wkv6_bwd_impl)


@_wkv6_bwd_op.register_fake
def _(do, dht, r, k, v, w, u, scale, initial_state, ckpt, chunk):
    dh0 = (
        torch.empty_like(initial_state)
        if initial_state is not None
        else r.new_empty((0,), dtype=torch.float32)
    )
    return (*(torch.empty_like(x) for x in (r, k, v, w, u)), dh0)


def _setup_context(ctx, inputs, output):
    r, k, v, w, u, scale, initial_state, store_ckpt, chunk = inputs
    ctx.save_for_backward(r, k, v, w, u, initial_state, output[2])
    ctx.scale, ctx.chunk, ctx.out_dtype = scale, chunk, output[0].dtype
    # unused outputs (the final state, the checkpoints) get None, not zeros: no memsets
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dht, _dckpt):
    return _backward_with(torch.ops.scanopt.wkv6_bwd, ctx, do, dht)


def _backward_eager(ctx, do, dht, _dckpt):
    return _backward_with(_wkv6_bwd_impl, ctx, do, dht)


def _backward_with(bwd, ctx, do, dht):
    r, k, v, w, u, initial_state, ckpt = ctx.saved_tensors
    if do is None and dht is None:
        return (None,) * 9
    if do is None:
        do = torch.zeros(v.shape, dtype=ctx.out_dtype, device=v.device)  # o is (B, T, H, V)
    dr, dk, dv, dw, du, dh0 = bwd(do, dht, r, k, v, w, u, ctx.scale, initial_state, ckpt, ctx.chunk)
    return dr, dk, dv, dw, du, None, (dh0 if initial_state is not None else None), None, None


_wkv6_fwd_op.register_autograd(_backward, setup_context=_setup_context)
#: the same forward/backward without the dispatcher, for eager calls (``scanopt.ops._eager``)
_WKV6Function = make_function("_WKV6Function", _wkv6_fwd_impl, _setup_context, _backward_eager)


# --------------------------------------------------------------------------------------------
# public API


def wkv6(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    scale: float | None = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """RWKV-6 WKV, drop-in for flash-linear-attention's ``fla.ops.rwkv6.chunk_rwkv6`` (and
    ``fused_recurrent_rwkv6``).

    Per (batch, head), with state ``S`` ``[K, V]`` and ``q = scale * r``::

        o_t = (S_{t-1} + diag(u) k_t v_t^T)^T q_t
        S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T

    Args:
        r: ``[B, T, H, K]`` receptance (fla's ``q``).
        k: ``[B, T, H, K]`` key.
        v: ``[B, T, H, V]`` value.
        w: ``[B, T, H, K]`` **log** decay, ``w <= 0`` (RWKV-6: ``-exp(w_raw)``); any value is
            exact, decays down to ``exp(-20)`` and below included. May be fp32 while the other
            inputs are bf16/fp16. Not checked (that would need a device sync): ``w > 0`` grows
            the state exponentially.
        u: ``[H, K]`` bonus of the current token (RWKV-LM's ``time_faaaa``).
        scale: multiplies ``r``; default 1.0 as RWKV uses (fla defaults to ``K ** -0.5``: pass
            ``None`` for that).
        initial_state: ``[B, H, K, V]`` (fp32 recommended) or ``None`` (zeros). Differentiable.
        output_final_state: also return the final state.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in ``r``'s dtype; ``final_state``
        ``[B, H, K, V]`` fp32 when ``output_final_state`` else ``None``. Gradients flow to every
        input (``u``'s summed over the batch), to ``initial_state`` and from ``final_state``.

    Any ``T >= 1``, ``K <= 256`` (any size; powers of two are fastest), any ``V``; bf16, fp16 or
    fp32 inputs (``r, k, v`` share one dtype), fp32 math. ``fla``'s ``cu_seqlens`` is not
    supported: run the sequences as a batch, or one by one passing the state.
    """
    B, T, H, K, V = check_inputs(("r", "k", "v", "w"), (r, k, v, w))
    check_tensor("u", u, shape=(H, K), dtypes=FLOAT_DTYPES, device=r.device)
    initial_state = check_state("initial_state", initial_state, B, H, K, V, r.device)
    if T < 1:
        raise ValueError(f"r: the sequence length T must be >= 1, got shape {tuple(r.shape)}")
    store_ckpt = wants_grad(r, k, v, w, u, initial_state)
    args = (
        r,
        k,
        v,
        w,
        u,
        resolve_scale(scale, K),
        initial_state,
        store_ckpt,
        default_chunk(T, K, V),
    )
    if eager(*args):
        o, ht, _ = apply(_WKV6Function, _wkv6_fwd_impl, *args)
    else:
        o, ht, _ = torch.ops.scanopt.wkv6_fwd(*args)
    return o, (ht if output_final_state else None)


def wkv6_rwkvlm(
    B: int,
    T: int,
    C: int,
    H: int,
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Drop-in for RWKV-LM's ``RUN_CUDA_RWKV6(B, T, C, H, r, k, v, w, u)``
    (``RWKV-v5/src/model.py``, kernel ``cuda/wkv6_cuda.cu``).

    Args:
        B, T, C, H: sizes, as RWKV-LM passes them (``C = H * N``).
        r, k, v, w: ``(B, T, C)``; ``w`` is RWKV-LM's raw decay (``time_decay + LoRA``), turned
            into the log decay ``-exp(w)`` in fp32 exactly as ``WKV_6.forward`` does.
        u: ``(H, N)`` bonus (``time_faaaa``).
        initial_state: optional ``(B, H, N, N)`` state in RWKV-LM's ``S[v][k]`` layout
            (``wkv6state``'s ``s``).
        output_final_state: also return the final state (same layout).

    Returns:
        ``y`` ``(B, T, C)`` (and the final state when asked). Unlike the CUDA kernel: no
        ``T <= ctx_len`` limit in the backward, fp16/fp32 as well as bf16, state with gradients.

    Switch RWKV-LM training code with one import:
    ``from scanopt.ops.wkv6.op import wkv6_rwkvlm as RUN_CUDA_RWKV6``.
    """
    if C % H:
        raise ValueError(f"C = {C} is not a multiple of H = {H}")
    N = C // H
    for name, x in zip(("r", "k", "v", "w"), (r, k, v, w), strict=True):
        if not isinstance(x, Tensor) or tuple(x.shape) != (B, T, C):
            raise ValueError(
                f"{name} must have shape ({B}, {T}, {C}), got {getattr(x, 'shape', type(x))}"
            )
    log_w = -torch.exp(w.float())
    r4, k4, v4, w4 = (x.reshape(B, T, H, N) for x in (r, k, v, log_w))
    s0 = initial_state.transpose(-1, -2) if initial_state is not None else None
    o, ht = wkv6(r4, k4, v4, w4, u.reshape(H, N), 1.0, s0, output_final_state)
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
    decay: str = "rwkv6",
    w_dtype: torch.dtype | None = None,
    initial_state: bool = False,
    seed: int = 0,
) -> dict:
    """Random RWKV-6-shaped inputs and cotangents: ``w`` from
    :func:`scanopt.ops._rwkv_common.log_decay` of kind ``decay``. Returns a dict with ``r, k, v,
    w, u, initial_state`` (``None`` unless asked), ``do`` and ``dht``."""
    V = K if V is None else V
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(shape, generator=g) * std

    x = {
        "r": randn(B, T, H, K, std=0.5),
        "k": randn(B, T, H, K, std=0.5),
        "v": randn(B, T, H, V),
        "w": log_decay((B, T, H, K), decay, g),
        "u": randn(H, K, std=0.5),
    }
    out = {n: t.to(device=device, dtype=dtype) for n, t in x.items()}
    out["w"] = x["w"].to(device=device, dtype=w_dtype or dtype)
    out["initial_state"] = randn(B, H, K, V).to(device) if initial_state else None
    out["do"] = randn(B, T, H, V).to(device=device, dtype=dtype)
    out["dht"] = randn(B, H, K, V).to(device)
    return out


def check_case(inputs: dict, case: str = "", *, scale: float = 1.0) -> object:
    """Run :func:`wkv6` (whatever backend is active) forward and backward on ``inputs`` (from
    :func:`make_inputs`) and compare the output, the final state and every gradient with the
    float64 reference, using the torch path in the same dtypes as the baseline.
    Returns a :class:`scanopt.verify.Report`."""
    from scanopt.reference import wkv6_bwd as ref_bwd
    from scanopt.reference import wkv6_fwd as ref_fwd
    from scanopt.verify import Report, to_numpy

    h0 = inputs["initial_state"]
    args = [inputs[n].detach().clone().requires_grad_() for n in _INPUTS]
    s0 = h0.detach().clone().requires_grad_() if h0 is not None else None
    o, ht = wkv6(*args, scale=scale, initial_state=s0, output_final_state=True)
    leaves = args + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad([o, ht], leaves, [inputs["do"], inputs["dht"]])

    raw = [inputs[n].detach() for n in _INPUTS]
    chunk = default_chunk(o.shape[1], raw[0].shape[-1], raw[2].shape[-1])
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

    report = Report("wkv6", case)
    report.check("o", o, ref_o, baseline=b_o)
    report.check("final_state", ht, ref_ht, baseline=b_ht)
    for name, g, bg in zip(_INPUTS, grads, b_grads, strict=False):
        report.check(f"d{name}", g, ref_g[name], baseline=bg)
    if s0 is not None:
        report.check("dinitial_state", grads[-1], ref_g["initial_state"], baseline=b_grads[-1])
    return report


def self_check(device: str, quick: bool) -> list:
    """Verify :func:`wkv6` on ``device`` against the float64 reference (``scanopt verify``)."""
    return self_check_reports("wkv6", make_inputs, check_case, device, quick)
