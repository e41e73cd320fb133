"""Mamba-1 selective scan: the PyTorch implementation, ``torch.library`` ops, autograd, the public
:func:`selective_scan_fn` / :func:`selective_state_update` and ``self_check``.

Backends (``scanopt._env.backend_for``): the Triton kernels of ``launch.py`` on CUDA tensors (and
on CPU tensors under ``TRITON_INTERPRET=1``), else the PyTorch implementation below (fp32 math,
the same checkpointed recurrence). Both run inside the same custom ops, so ``torch.compile``,
fake tensors and autograd see one op whatever the backend.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from scanopt._env import backend_for
from scanopt._tensor import check_tensor
from scanopt.ops._eager import apply, eager, make_function, needs_grad
from scanopt.ops.selective_scan.launch import MAX_DSTATE, cdiv, checkpoint_chunk

__all__ = ["selective_scan_fn", "selective_state_update", "self_check"]

# --------------------------------------------------------------------------------------------
# PyTorch implementation (the torch backend, and the same-dtype baseline of the verify rule)


def _dt(delta: Tensor, delta_bias: Tensor | None, softplus: bool) -> tuple[Tensor, Tensor]:
    """(pre-softplus delta, dt) in fp32; mamba_ssm's softplus threshold is 20."""
    pre = delta.float()
    if delta_bias is not None:
        pre = pre + delta_bias.float()[:, None]
    dt = F.softplus(pre, beta=1.0, threshold=20.0) if softplus else pre
    return pre, dt


def _bc_chunk(M: Tensor, s: int, e: int, dim: int) -> Tensor:
    """B or C of steps [s, e) as fp32, broadcastable to (batch, dim, T, N)."""
    if M.dim() == 2:  # (dim, N)
        return M.float()[None, :, None, :]
    if M.dim() == 3:  # (batch, N, L)
        return M[:, :, s:e].float().transpose(1, 2)[:, None]
    G = M.shape[1]  # (batch, G, N, L)
    return M[..., s:e].float().repeat_interleave(dim // G, dim=1).transpose(2, 3)


def _bc_grad(g: Tensor, M: Tensor) -> Tensor:
    """Sum a per-channel gradient (batch, dim, T, N) to B's or C's layout (fixed: (dim, N),
    else (batch, [G,] N, T))."""
    if M.dim() == 2:
        return g.sum((0, 2))
    if M.dim() == 3:
        return g.sum(1).transpose(1, 2)
    batch, dim, T, N = g.shape
    G = M.shape[1]
    return g.view(batch, G, dim // G, T, N).sum(2).transpose(2, 3)


def _torch_scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0, softplus, chunk, store_ckpt):
    batch, dim, L = u.shape
    N = A.shape[1]
    _, dt = _dt(delta, delta_bias, softplus)
    uf, Af = u.float(), A.float()
    if h0 is not None:
        x = h0.float().clone()
    else:
        x = torch.zeros(batch, dim, N, dtype=torch.float32, device=u.device)
    out = torch.empty(batch, dim, L, dtype=torch.float32, device=u.device)
    ckpts = []
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        dts = dt[:, :, s:e]
        decay = torch.exp(dts[..., None] * Af[:, None, :])  # (batch, dim, T, N)
        inp = (dts * uf[:, :, s:e])[..., None] * _bc_chunk(B, s, e, dim)
        states = torch.empty(batch, dim, e - s, N, dtype=torch.float32, device=u.device)
        for t in range(e - s):
            x = decay[:, :, t] * x + inp[:, :, t]
            states[:, :, t] = x
        out[:, :, s:e] = (states * _bc_chunk(C, s, e, dim)).sum(-1)
        if store_ckpt:
            ckpts.append(x)
    if D is not None:
        out = out + D.float()[:, None] * uf
    if z is not None:
        out = out * F.silu(z.float())
    if store_ckpt:
        ckpt = torch.stack(ckpts, 1).transpose(2, 3).contiguous()  # (batch, n_ck, N, dim)
    else:
        ckpt = torch.empty(batch, 0, N, dim, dtype=torch.float32, device=u.device)
    return out.to(u.dtype).contiguous(), x, ckpt


def _torch_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, h0, ckpt, softplus, chunk):
    batch, dim, L = u.shape
    N = A.shape[1]
    dev, f32 = u.device, torch.float32
    pre, dt = _dt(delta, delta_bias, softplus)
    uf, Af, dof = u.float(), A.float(), dout.float()
    if z is not None:
        zf = z.float()
        sig = torch.sigmoid(zf)
        dy = dof * zf * sig
    else:
        dy = dof
    h = dlast.float().clone() if dlast is not None else torch.zeros(batch, dim, N, device=dev)
    du = torch.empty(batch, dim, L, dtype=f32, device=dev)
    ddt = torch.empty(batch, dim, L, dtype=f32, device=dev)
    y = torch.empty(batch, dim, L, dtype=f32, device=dev)
    dA = torch.zeros(dim, N, dtype=f32, device=dev)
    dB = torch.zeros(B.shape, dtype=f32, device=dev)
    dC = torch.zeros(C.shape, dtype=f32, device=dev)
    for c in reversed(range(cdiv(L, chunk))):
        s, e = c * chunk, min(c * chunk + chunk, L)
        if c > 0:
            x = ckpt[:, c - 1].transpose(1, 2)
        elif h0 is not None:
            x = h0.float()
        else:
            x = torch.zeros(batch, dim, N, dtype=f32, device=dev)
        dts = dt[:, :, s:e]
        decay = torch.exp(dts[..., None] * Af[:, None, :])  # (batch, dim, T, N)
        Bc, Cc = _bc_chunk(B, s, e, dim), _bc_chunk(C, s, e, dim)
        dtu = dts * uf[:, :, s:e]
        inp = dtu[..., None] * Bc
        states = torch.empty(batch, dim, e - s + 1, N, dtype=f32, device=dev)
        states[:, :, 0] = x
        for t in range(e - s):
            x = decay[:, :, t] * x + inp[:, :, t]
            states[:, :, t + 1] = x
        xs, x_prev = states[:, :, 1:], states[:, :, :-1]
        y[:, :, s:e] = (xs * Cc).sum(-1)
        dyC = dy[:, :, s:e, None] * Cc
        gs = torch.empty_like(xs)
        for t in reversed(range(e - s)):
            h = h + dyC[:, :, t]
            gs[:, :, t] = h
            h = h * decay[:, :, t]
        gx = gs * x_prev * decay
        dA += (gx * dts[..., None]).sum((0, 2))
        gB = (gs * Bc).sum(-1)
        ddt[:, :, s:e] = (gx * Af[:, None, :]).sum(-1) + gB * uf[:, :, s:e]
        du[:, :, s:e] = gB * dts
        gB_full = _bc_grad(gs * dtu[..., None], B)
        gC_full = _bc_grad(dy[:, :, s:e, None] * xs, C)
        if B.dim() == 2:
            dB += gB_full
        else:
            dB[..., s:e] = gB_full
        if C.dim() == 2:
            dC += gC_full
        else:
            dC[..., s:e] = gC_full

    def empty():  # one per absent input: custom-op outputs may not alias each other
        return torch.empty(0, dtype=f32, device=dev)

    dD = empty()
    if D is not None:
        du = du + D.float()[:, None] * dy
        dD = (dy * uf).sum((0, 2)).to(D.dtype)
    dz = empty()
    if z is not None:
        pre_gate = y if D is None else y + D.float()[:, None] * uf
        dz = (dof * pre_gate * sig * (1 + zf * (1 - sig))).to(z.dtype)
    if softplus:
        ddt = ddt * torch.where(pre > 20.0, torch.ones_like(pre), torch.sigmoid(pre))
    dbias = ddt.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else empty()
    dh0 = h.to(h0.dtype) if h0 is not None else empty()
    grads = (du.to(u.dtype), ddt.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype),
             dC.to(C.dtype), dD, dz, dbias, dh0)  # fmt: skip
    return tuple(g.contiguous() for g in grads)


# --------------------------------------------------------------------------------------------
# torch.library ops


def _scan_fwd_impl(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    delta_softplus: bool,
    chunk: int,
    store_ckpt: bool,
    deterministic: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(out, last_state fp32, checkpoints fp32 (batch, n_ck or 0, N, dim))``.
    ``deterministic`` is the backward's (kept by autograd); the forward always is."""
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk, store_ckpt)
    if backend_for(u.device.type) == "triton":
        from scanopt.ops.selective_scan import launch

        return launch.selective_scan_fwd(*args)
    return _torch_scan_fwd(*args)


_scan_fwd_op = torch.library.custom_op("scanopt::selective_scan_fwd", mutates_args=())(
    _scan_fwd_impl
)


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk, store_ckpt,
      deterministic=True):  # fmt: skip
    batch, dim, L = u.shape
    N = A.shape[1]
    n_ck = (L + chunk - 1) // chunk if store_ckpt else 0
    return (
        u.new_empty((batch, dim, L)),
        u.new_empty((batch, dim, N), dtype=torch.float32),
        u.new_empty((batch, n_ck, N, dim), dtype=torch.float32),
    )


_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _scan_bwd_impl(
    dout: Tensor,
    dlast: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    ckpt: Tensor,
    delta_softplus: bool,
    chunk: int,
    deterministic: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns the gradients of u, delta, A, B, C, D, z, delta_bias, initial_state in their
    inputs' dtypes (an empty fp32 tensor for an absent optional input)."""
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt, delta_softplus, chunk)
    if backend_for(u.device.type) != "triton":
        return _torch_scan_bwd(dout, dlast, *args)
    from scanopt.ops.selective_scan import launch

    grads = launch.selective_scan_bwd(dout, dlast, *args, deterministic=deterministic)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return tuple(
        grads[n].to(x.dtype) if x is not None else torch.empty(0, device=u.device)
        for n, x in zip(_GRADS, inputs)
    )


_scan_bwd_op = torch.library.custom_op("scanopt::selective_scan_bwd", mutates_args=())(
    _scan_bwd_impl
)


@_scan_bwd_op.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt, softplus, chunk,
      deterministic=True):  # fmt: skip
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return tuple(
        torch.empty_like(x, memory_format=torch.contiguous_format)
        if x is not None
        else u.new_empty((0,), dtype=torch.float32)
        for x in inputs
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, h0, softplus, chunk, store_ckpt, *rest = inputs
    ckpt = output[2]
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, ckpt)
    ctx.softplus, ctx.chunk = softplus, chunk
    ctx.deterministic = rest[0] if rest else True
    ctx.mark_non_differentiable(ckpt)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlast, _dckpt):
    ops = torch.ops.scanopt
    return _backward_with(ops.selective_scan_fwd, ops.selective_scan_bwd, ctx, dout, dlast)


def _backward_eager(ctx, dout, dlast, _dckpt):
    return _backward_with(_scan_fwd_impl, _scan_bwd_impl, ctx, dout, dlast)


def _backward_with(fwd, bwd, ctx, dout, dlast):
    u, delta, A, B, C, D, z, delta_bias, h0, ckpt = ctx.saved_tensors
    n_args = len(ctx.needs_input_grad)  # 12, or 13 with ``deterministic`` passed
    if dout is None and dlast is None:
        return (None,) * n_args
    if dout is None:
        dout = torch.zeros_like(u)
    if ckpt.shape[1] == 0:  # the forward ran without checkpoints: recompute them
        ckpt = fwd(u, delta, A, B, C, D, z, delta_bias, h0, ctx.softplus, ctx.chunk, True)[2]
    grads = bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, h0, ckpt, ctx.softplus, ctx.chunk,
                ctx.deterministic)  # fmt: skip
    inputs = (u, delta, A, B, C, D, z, delta_bias, h0)
    out = tuple(
        g if x is not None and need else None
        for g, x, need in zip(grads, inputs, ctx.needs_input_grad)
    )
    return (*out, *(None,) * (n_args - len(out)))


_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)
#: the same forward/backward without the dispatcher, for eager calls (``scanopt.ops._eager``)
_ScanFunction = make_function("_ScanFunction", _scan_fwd_impl, _setup_context, _backward_eager)


def _torch_state_update(state, x, dt, A, B, C, D, z, dt_bias, softplus, idx):
    """In-place decode step on head-layout tensors (see ``launch.selective_state_update``)."""
    batch, nheads, dim = x.shape
    st = state if idx is None else state[idx.clamp(min=0).long()]
    pre = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    dtp = F.softplus(pre, beta=1.0, threshold=20.0) if softplus else pre
    rep = nheads // B.shape[1]
    Bh = B.float().repeat_interleave(rep, dim=1)[:, :, None, :]  # (batch, H, 1, N)
    Ch = C.float().repeat_interleave(rep, dim=1)[:, :, None, :]
    new = st.float() * torch.exp(dtp[..., None] * A.float()) + (dtp * x.float())[..., None] * Bh
    out = (new * Ch).sum(-1)
    if D is not None:
        out = out + D.float() * x.float()
    if z is not None:
        out = out * F.silu(z.float())
    if idx is None:
        state.copy_(new.to(state.dtype))
    else:
        valid = idx >= 0
        state[idx[valid].long()] = new[valid].to(state.dtype)
        out = torch.where(valid[:, None, None], out, torch.zeros_like(out))
    return out.to(x.dtype).contiguous()


def _state_update_impl(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    state_batch_indices: Tensor | None,
) -> Tensor:
    """Head-layout decode step; updates ``state`` in place and returns out (batch, H, dim)."""
    args = (state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    if backend_for(x.device.type) == "triton":
        from scanopt.ops.selective_scan import launch

        return launch.selective_state_update(*args)
    return _torch_state_update(*args)


_state_update_op = torch.library.custom_op(
    "scanopt::selective_state_update", mutates_args=("state",)
)(_state_update_impl)


@_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------
# public API


def _check_bc(name: str, M: object, batch: int, dim: int, N: int, L: int, device) -> None:
    check_tensor(name, M, ndim=(2, 3, 4), device=device)
    if M.dim() == 2:
        check_tensor(name, M, shape=(dim, N))
    elif M.dim() == 3:
        check_tensor(name, M, shape=(batch, N, L))
    else:
        check_tensor(name, M, shape=(batch, None, N, L))
        G = M.shape[1]
        if G < 1 or dim % G:
            raise ValueError(
                f"{name}: the group count G={G} (shape {tuple(M.shape)}) must divide dim={dim}"
            )


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    check_tensor("u", u, ndim=3)
    batch, dim, L = u.shape
    dev = u.device
    if L < 1:
        raise ValueError(f"u: the sequence length L must be >= 1, got shape {tuple(u.shape)}")
    check_tensor("delta", delta, shape=(batch, dim, L), device=dev)
    check_tensor("A", A, ndim=2, dtypes=(torch.float32,), device=dev)
    check_tensor("A", A, shape=(dim, None))
    N = A.shape[1]
    if not 1 <= N <= MAX_DSTATE:
        raise ValueError(f"A: the state size N={N} must be between 1 and {MAX_DSTATE}")
    _check_bc("B", B, batch, dim, N, L, dev)
    _check_bc("C", C, batch, dim, N, L, dev)
    if D is not None:
        check_tensor("D", D, shape=(dim,), device=dev)
    if z is not None:
        check_tensor("z", z, shape=(batch, dim, L), device=dev)
    if delta_bias is not None:
        check_tensor("delta_bias", delta_bias, shape=(dim,), device=dev)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(batch, dim, N), device=dev)


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    deterministic: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan; a drop-in for
    ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (real ``A``).

    With ``dt = softplus?(delta + delta_bias)``, for every channel ``d`` and state ``n``::

        x_t = exp(dt_t A[d, n]) x_{t-1} + dt_t B_t[n] u_t,     x_{-1} = initial_state (or 0)
        out_t = (sum_n x_t[n] C_t[n] + D u_t) * silu(z_t)

    Args:
        u: ``(batch, dim, L)`` input, bf16 / fp16 / fp32, any ``L >= 1``.
        delta: ``(batch, dim, L)`` step sizes (before ``delta_bias`` and softplus).
        A: ``(dim, N)`` fp32 state matrix (diagonal per channel), ``N <= 256``.
        B: ``(dim, N)`` fixed, ``(batch, N, L)`` variable or ``(batch, G, N, L)`` grouped
            (channel ``d`` uses group ``d // (dim // G)``; ``G`` must divide ``dim``).
        C: same layouts as ``B``, chosen independently of it.
        D: optional ``(dim,)`` skip connection, ``out += D * u``.
        z: optional ``(batch, dim, L)`` gate, ``out *= silu(z)``.
        delta_bias: optional ``(dim,)``, added to ``delta`` before the softplus.
        delta_softplus: apply softplus (identity above 20, as upstream) to ``delta + bias``.
        return_last_state: also return the state after the last step.
        initial_state: optional ``(batch, dim, N)`` state before the first step (scanopt
            extension; upstream starts from zeros). It receives a gradient.
        deterministic: ``True``: the backward gives the same bits on every run (no atomics;
            per-block partial sums reduced in a fixed order). ``False``: variable or grouped
            B/C gradients are summed over the channels by float atomics, as mamba_ssm's CUDA
            backward does (run-to-run differences at rounding level; the other gradients stay
            deterministic); 1.7x faster fwd+bwd at the anchor shape (H100, 4k). ``None``
            (default): ``torch.are_deterministic_algorithms_enabled()``, so ``False`` unless
            ``torch.use_deterministic_algorithms(True)``. Scanopt extension.

    Only the last dimension of the inputs needs to be contiguous (in fact any strides work).
    Every input gets a gradient, and the returned last state is differentiable too (upstream
    ignores its gradient). Accumulation is fp32; ``out`` has u's dtype, ``last_state`` is fp32.

    Returns:
        ``out`` ``(batch, dim, L)``, or ``(out, last_state)`` with ``last_state`` ``(batch, dim,
        N)`` fp32 when ``return_last_state``.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, L = u.shape
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None]
    store_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    chunk = checkpoint_chunk(
        batch=batch, dim=dim, N=A.shape[1], L=L, dtype=u.dtype, device=u.device,
        deterministic=bool(deterministic),
    )  # fmt: skip
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), chunk,
            store_ckpt, bool(deterministic))  # fmt: skip
    if eager(*args):
        out, last, _ = apply(_ScanFunction, _scan_fwd_impl, *args)
    else:
        out, last, _ = torch.ops.scanopt.selective_scan_fwd(*args)
    return (out, last) if return_last_state else out


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: Tensor | None = None,
) -> Tensor:
    """One decode step of the selective scan, updating ``state`` in place; a drop-in for
    ``mamba_ssm.ops.triton.selective_state_update.selective_state_update``.

    Without heads (Mamba-1) / with heads (Mamba-2):

    - state: ``(batch, dim, N)`` / ``(batch, nheads, dim, N)``, any float dtype (updated in it)
    - x, dt, z: ``(batch, dim)`` / ``(batch, nheads, dim)``
    - A: ``(dim, N)`` / ``(nheads, dim, N)``
    - B, C: ``(batch, N)`` / ``(batch, ngroups, N)`` (head ``h`` uses group
      ``h // (nheads // ngroups)``)
    - D, dt_bias: ``(dim,)`` / ``(nheads, dim)``

    As upstream, each argument may omit its head axis independently (it is then size 1), and
    stride-0 expanded A / dt / dt_bias (Mamba-2's one value per head) are fine.
    ``dt' = softplus?(dt + dt_bias)``; ``state = state * exp(dt' A) + dt' x B``;
    ``out = (sum_n state C + D x) * silu(z)`` computed from the fp32 state.
    ``state_batch_indices`` (optional, ``(batch,)`` int): row ``i`` reads and writes state row
    ``state_batch_indices[i]``; a negative index skips the row and returns zeros for it.

    Returns:
        out, shaped like ``x``, in x's dtype. Not differentiable (the state is mutated).
    """
    # one pass per argument for type, dtype, rank and device (heads() below), then the shapes
    # with the dtype check off: the decode step is called once per layer and token
    check_tensor("state", state, ndim=(3, 4))
    has_heads = state.dim() == 4
    dev = state.device
    state4 = state if has_heads else state.unsqueeze(1)

    def heads(name, t, rank, axis):
        if t is None:
            return None
        check_tensor(name, t, ndim=(rank, rank + 1), device=dev)
        return t.unsqueeze(axis) if t.dim() == rank else t

    x3, dt3, z3 = heads("x", x, 2, 1), heads("dt", dt, 2, 1), heads("z", z, 2, 1)
    A3, B3, C3 = heads("A", A, 2, 0), heads("B", B, 2, 1), heads("C", C, 2, 1)
    D2, bias2 = heads("D", D, 1, 0), heads("dt_bias", dt_bias, 1, 0)
    batch, nheads, dim = x3.shape
    N = state4.shape[-1]
    if N > MAX_DSTATE:
        raise ValueError(f"state: the state size N={N} must be at most {MAX_DSTATE}")
    check_tensor("x", x3, shape=(batch, state4.shape[1], state4.shape[2]), dtypes=None)
    if state_batch_indices is None:
        check_tensor("state", state4, shape=(batch, nheads, dim, N), dtypes=None)
    check_tensor("dt", dt3, shape=(batch, nheads, dim), dtypes=None)
    check_tensor("A", A3, shape=(nheads, dim, N), dtypes=None)
    check_tensor("B", B3, shape=(batch, None, N), dtypes=None)
    G = B3.shape[1]
    if G < 1 or nheads % G:
        raise ValueError(f"B: nheads={nheads} must be divisible by ngroups={G}")
    check_tensor("C", C3, shape=(batch, G, N), dtypes=None)
    if D2 is not None:
        check_tensor("D", D2, shape=(nheads, dim), dtypes=None)
    if z3 is not None:
        check_tensor("z", z3, shape=(batch, nheads, dim), dtypes=None)
    if bias2 is not None:
        check_tensor("dt_bias", bias2, shape=(nheads, dim), dtypes=None)
    if state_batch_indices is not None:
        check_tensor(
            "state_batch_indices",
            state_batch_indices,
            shape=(batch,),
            dtypes=(torch.int32, torch.int64),
            device=dev,
        )
    args = (state4, x3, dt3, A3, B3, C3, D2, z3, bias2, bool(dt_softplus), state_batch_indices)
    if eager(*args) and not needs_grad(*args):
        # eager decode: the implementation without the dispatcher (~25 us of host per call on
        # the dev box, more than the kernel at small batch); the version bump is what the
        # custom op's ADInplaceOrView step does for the mutated state
        out = _state_update_impl(*args)
        torch.autograd.graph.increment_version(state4)
    else:
        out = torch.ops.scanopt.selective_state_update(*args)
    return out if has_heads or x.dim() == 3 else out.squeeze(1)


# --------------------------------------------------------------------------------------------
# verification helpers (tests and ``scanopt verify``)


@contextlib.contextmanager
def _backend(name: str):
    old = os.environ.get("SCANOPT_BACKEND")
    os.environ["SCANOPT_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["SCANOPT_BACKEND"]
        else:
            os.environ["SCANOPT_BACKEND"] = old


def make_inputs(
    batch: int,
    dim: int,
    L: int,
    N: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    B_kind: str = "variable",
    C_kind: str = "variable",
    groups: int = 1,
    D: bool = True,
    z: bool = True,
    delta_bias: bool = True,
    delta_softplus: bool = True,
    initial_state: bool = False,
    seed: int = 0,
) -> dict:
    """Random selective-scan inputs as mamba_ssm's tests draw them (``A = -0.5 rand``,
    ``delta = 0.5 rand``, ``delta_bias = 0.5 rand``, the rest standard normal), plus cotangents
    ``dout`` and ``dlast``. ``B_kind`` / ``C_kind``: ``fixed`` (fp32), ``variable`` or
    ``grouped`` (``groups`` groups), in ``dtype``. A, D and delta_bias are fp32."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g)

    def bc(kind):
        if kind == "fixed":
            return randn(dim, N).to(device)
        shape = (batch, N, L) if kind == "variable" else (batch, groups, N, L)
        return randn(*shape).to(device=device, dtype=dtype)

    return {
        "u": randn(batch, dim, L).to(device=device, dtype=dtype),
        "delta": (0.5 * torch.rand(batch, dim, L, generator=g)).to(device=device, dtype=dtype),
        "A": (-0.5 * torch.rand(dim, N, generator=g)).to(device),
        "B": bc(B_kind),
        "C": bc(C_kind),
        "D": randn(dim).to(device) if D else None,
        "z": randn(batch, dim, L).to(device=device, dtype=dtype) if z else None,
        "delta_bias": (0.5 * torch.rand(dim, generator=g)).to(device) if delta_bias else None,
        "delta_softplus": delta_softplus,
        "initial_state": randn(batch, dim, N).to(device) if initial_state else None,
        "dout": randn(batch, dim, L).to(device=device, dtype=dtype),
        "dlast": randn(batch, dim, N).to(device),
    }


_TENSORS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def run_case(inputs: dict) -> tuple[Tensor, Tensor, dict]:
    """``selective_scan_fn`` forward and backward (whatever backend is active) on ``inputs``
    from :func:`make_inputs` (plus an optional ``deterministic``); returns ``(out, last_state,
    grads)``."""
    leaves = {
        n: inputs[n].detach().clone().requires_grad_() for n in _TENSORS if inputs[n] is not None
    }
    kw = {n: leaves.get(n) for n in _TENSORS}
    out, last = selective_scan_fn(
        delta_softplus=inputs["delta_softplus"], return_last_state=True,
        deterministic=inputs.get("deterministic"), **kw,
    )  # fmt: skip
    names = list(leaves)
    grads = torch.autograd.grad([out, last], [leaves[n] for n in names],
                                [inputs["dout"], inputs["dlast"]])  # fmt: skip
    return out.detach(), last.detach(), dict(zip(names, grads))


def check_case(inputs: dict, case: str = "") -> object:
    """Compare :func:`selective_scan_fn`'s output, last state and every gradient with the float64
    reference, using the torch backend in the same dtypes as the baseline. Returns a
    :class:`scanopt.verify.Report`."""
    from scanopt.reference import selective_scan_bwd as ref_bwd
    from scanopt.reference import selective_scan_fwd as ref_fwd
    from scanopt.verify import Report, to_numpy

    out, last, grads = run_case(inputs)
    with _backend("torch"):
        b_out, b_last, b_grads = run_case(inputs)
    np_in = {n: (to_numpy(inputs[n]) if inputs[n] is not None else None) for n in _TENSORS}
    sp = inputs["delta_softplus"]
    ref_out, ref_last = ref_fwd(delta_softplus=sp, **np_in)
    ref_g = ref_bwd(to_numpy(inputs["dout"]), delta_softplus=sp,
                    dlast_state=to_numpy(inputs["dlast"]), **np_in)  # fmt: skip
    report = Report("selective_scan", case)
    report.check("out", out, ref_out, baseline=b_out)
    report.check("last_state", last, ref_last, baseline=b_last)
    for n in grads:
        report.check(f"d{n}", grads[n], ref_g[n], baseline=b_grads[n])
    return report


def make_update_inputs(
    batch: int,
    nheads: int | None,
    dim: int,
    N: int,
    *,
    ngroups: int = 1,
    dtype: torch.dtype = torch.float32,
    state_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict:
    """Random decode-step inputs, without heads when ``nheads`` is None (Mamba-1 layout)."""
    g = torch.Generator().manual_seed(seed)
    H = () if nheads is None else (nheads,)
    G = () if nheads is None else (ngroups,)

    def randn(*shape, dt=dtype):
        return torch.randn(shape, generator=g).to(device=device, dtype=dt)

    return {
        "state": randn(batch, *H, dim, N, dt=state_dtype or dtype),
        "x": randn(batch, *H, dim),
        "dt": randn(batch, *H, dim),
        "A": (-torch.rand(*H, dim, N, generator=g)).to(device),
        "B": randn(batch, *G, N),
        "C": randn(batch, *G, N),
        "D": randn(*H, dim, dt=torch.float32),
        "z": randn(batch, *H, dim),
        "dt_bias": randn(*H, dim, dt=torch.float32),
    }


def check_update_case(inputs: dict, case: str = "", dt_softplus: bool = True) -> object:
    """Compare :func:`selective_state_update` (out and the updated state) with the reference,
    the torch backend in the same dtypes being the baseline."""
    from scanopt.reference import selective_state_update_fwd as ref_fwd
    from scanopt.verify import Report, to_numpy

    def run():
        kw = dict(inputs, state=inputs["state"].clone())
        out = selective_state_update(dt_softplus=dt_softplus, **kw)
        return out, kw["state"]

    out, state = run()
    with _backend("torch"):
        b_out, b_state = run()
    ref_out, ref_state = ref_fwd(
        dt_softplus=dt_softplus, **{n: to_numpy(t) for n, t in inputs.items()}
    )
    report = Report("selective_state_update", case)
    report.check("out", out, ref_out, baseline=b_out)
    report.check("state", state, ref_state, baseline=b_state)
    return report


def self_check(device: str, quick: bool) -> list:
    """Verify the scan (forward and every gradient) and the decode step on ``device`` against the
    float64 references (``scanopt verify``)."""
    on_gpu = device.startswith("cuda")
    if quick:
        cases = [
            (1, 5, 33, 4, torch.float32, "variable", "variable", 1, True),
            (2, 6, 20, 3, torch.float16, "fixed", "grouped", 2, False),
        ]
    else:
        cases = [
            (2, 5, 63, 16, torch.float32, "variable", "fixed", 1, True),
            (2, 6, 130, 16, torch.float16, "grouped", "variable", 3, False),
        ]
        if on_gpu:
            cases += [
                (2, 256, 4096, 16, torch.bfloat16, "variable", "variable", 1, True),
                (1, 128, 2048, 16, torch.bfloat16, "grouped", "grouped", 2, True),
            ]
    reports = []
    for batch, dim, L, N, dtype, bk, ck, G, h0 in cases:
        inputs = make_inputs(batch, dim, L, N, dtype=dtype, device=device, B_kind=bk, C_kind=ck,
                             groups=G, initial_state=h0, seed=L)  # fmt: skip
        name = str(dtype).replace("torch.", "")
        case = f"b{batch}-d{dim}-L{L}-N{N}-B={bk}-C={ck}-G{G}-h0={h0}-{name}"
        reports.append(check_case(inputs, case))
    for nheads, dtype in ((None, torch.float32), (4, torch.float16 if quick else torch.bfloat16)):
        dtype = dtype if on_gpu or dtype != torch.bfloat16 else torch.float32
        inputs = make_update_inputs(2, nheads, 40, 16, ngroups=2 if nheads else 1, dtype=dtype,
                                    device=device)  # fmt: skip
        case = f"heads={nheads}-{str(dtype).replace('torch.', '')}"
        reports.append(check_update_case(inputs, case))
    return reports
