"""Plain PyTorch formulas of every benchmarked op (autograd gives their backward).

They serve ``scanopt bench`` twice:

- as the ``torch`` provider when scanopt's own PyTorch path for an op is not importable (they
  compute in ``compute_dtype``, float32 by default, as mamba_ssm's and transformers' reference
  paths do, and return the input dtype);
- in float64 on the GPU as the verification reference where the NumPy reference would be too
  slow: :func:`attention_fp64` (blockwise, hand-written backward, no L x L matrix per head in
  memory) and :func:`ssd` (Mamba-2's chunked "minimal SSD", exact in float64).

The recurrent ones (:func:`selective_scan`, :func:`wkv4`, :func:`wkv6`, :func:`wkv7`) are
Python loops over time: correct and independent of scanopt's kernels, but slow, so the bench
only runs them on short sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# attention, (B, H, L, D)
# ---------------------------------------------------------------------------------------------


def _causal_mask(lq: int, lk: int, device: torch.device, row0: int = 0, rows: int | None = None):
    """True where query row ``i`` may attend key ``j``: ``j <= i + lk - lq`` (bottom-right; the
    same as top-left when ``lq == lk``)."""
    rows = lq - row0 if rows is None else rows
    i = torch.arange(row0, row0 + rows, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None):
    """``softmax(q k^T * scale) v`` in the input dtype (scores and softmax in float32).

    q ``(B, H, Lq, D)``, k/v ``(B, H, Lk, D)``; returns ``(B, H, Lq, D)`` in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if causal:
        s = s.masked_fill(~_causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p.to(v.dtype), v)


def attention_fp64(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    max_elements: int = 1 << 26,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Exact attention forward and backward in float64 on q's device, a block of query rows at a
    time (each block's score matrix has at most ``max_elements`` entries).

    Returns ``(out, grads)`` with grads ``{"q", "k", "v"}`` (empty when ``dout`` is None). Query
    and key head counts must be equal (the bench sweeps have no GQA).
    """
    q, k, v = q.double(), k.double(), v.double()
    b, h, lq, d = q.shape
    lk = k.shape[-2]
    if k.shape[1] != h:
        raise ValueError("attention_fp64 needs as many key heads as query heads")
    scale = d**-0.5 if scale is None else scale
    out = torch.empty(b, h, lq, v.shape[-1], dtype=torch.float64, device=q.device)
    grads: dict[str, Tensor] = {}
    if dout is not None:
        dout = dout.double()
        grads = {"q": torch.empty_like(q), "k": torch.zeros_like(k), "v": torch.zeros_like(v)}
    rows = max(1, max_elements // (b * h * lk))
    kt = k.transpose(-1, -2)
    for r0 in range(0, lq, rows):
        r1 = min(lq, r0 + rows)
        qs = q[:, :, r0:r1]
        s = torch.matmul(qs, kt) * scale
        if causal:
            s.masked_fill_(~_causal_mask(lq, lk, q.device, r0, r1 - r0), float("-inf"))
        p = torch.softmax(s, dim=-1)
        del s
        o = torch.matmul(p, v)
        out[:, :, r0:r1] = o
        if dout is None:
            continue
        do = dout[:, :, r0:r1]
        grads["v"] += torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, v.transpose(-1, -2))
        ds = p * (dp - (do * o).sum(-1, keepdim=True))
        del dp, p
        grads["q"][:, :, r0:r1] = torch.matmul(ds, k) * scale
        grads["k"] += torch.matmul(ds.transpose(-1, -2), qs) * scale
    return out, grads


# ---------------------------------------------------------------------------------------------
# Mamba-1 selective scan, u/delta/z (batch, dim, L)
# ---------------------------------------------------------------------------------------------


def _expand_bc(M: Tensor, dim: int) -> Tensor:
    """B or C as ``(batch, dim, N, L)``: variable ``(batch, N, L)`` or grouped ``(batch, G, N, L)``."""
    if M.dim() == 3:
        M = M.unsqueeze(1)
    return M.repeat_interleave(dim // M.shape[1], dim=1)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """mamba_ssm's ``selective_scan_ref`` (real A, variable or grouped B/C), a loop over L.

    ``x_l = exp(dt_l A) x_{l-1} + dt_l B_l u_l``; ``y_l = C_l . x_l``; ``out = (y + D u) silu(z)``
    with ``dt = softplus?(delta + delta_bias)``. Returns u's dtype (or ``compute_dtype`` when
    that is float64).
    """
    cd = compute_dtype
    out_dtype = cd if cd == torch.float64 else u.dtype
    batch, dim, L = u.shape
    u, delta, A = u.to(cd), delta.to(cd), A.to(cd)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bx, Cx = _expand_bc(B.to(cd), dim), _expand_bc(C.to(cd), dim)
    dA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (batch, dim, L, N)
    dBu = (delta * u).unsqueeze(-1) * Bx.transpose(-1, -2)  # (batch, dim, L, N)
    x = torch.zeros(batch, dim, A.shape[1], dtype=cd, device=u.device)
    ys = []
    for i in range(L):
        x = dA[:, :, i] * x + dBu[:, :, i]
        ys.append((x * Cx[..., i]).sum(-1))
    y = torch.stack(ys, dim=-1)
    out = y if D is None else y + u * D.to(cd)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cd))
    return out.to(out_dtype)


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
) -> Tensor:
    """mamba_ssm's ``selective_state_update_ref`` without heads (Mamba-1 decode step), in float32;
    updates ``state`` (batch, dim, N) in place and returns ``out`` (batch, dim) in x's dtype."""
    cd = torch.float32
    dt = dt.to(cd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt.unsqueeze(-1) * A.to(cd))  # (batch, dim, N)
    dBx = (dt * x.to(cd)).unsqueeze(-1) * B.to(cd).unsqueeze(1)  # (batch, dim, N)
    new_state = state.to(cd) * dA + dBx
    state.copy_(new_state.to(state.dtype))
    out = (new_state * C.to(cd).unsqueeze(1)).sum(-1)
    if D is not None:
        out = out + x.to(cd) * D.to(cd)
    if z is not None:
        out = out * F.silu(z.to(cd))
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Mamba-2 SSD, x (batch, L, H, P)
# ---------------------------------------------------------------------------------------------


def _segsum(x: Tensor) -> Tensor:
    """``out[..., i, j] = x[..., j+1] + ... + x[..., i]`` for ``i >= j``, ``-inf`` above the
    diagonal (the stable segment sum of mamba_ssm's ``ssd_minimal.py``)."""
    T = x.shape[-1]
    x = x[..., None].expand(*x.shape, T)
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), -1)
    x = x.masked_fill(~strict, 0)
    seg = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), 0)
    return seg.masked_fill(~lower, float("-inf"))


def _ssd_minimal(X: Tensor, A: Tensor, B: Tensor, C: Tensor, block_len: int) -> Tensor:
    """Listing 1 of the Mamba-2 paper (``ssd_minimal_discrete``) without einops.

    X ``(b, L, h, p)``, A ``(b, L, h)``, B/C ``(b, L, h, n)``, ``L % block_len == 0``.
    """
    b, L, h, p = X.shape
    c, l = L // block_len, block_len
    X = X.reshape(b, c, l, h, p)
    B = B.reshape(b, c, l, h, -1)
    C = C.reshape(b, c, l, h, -1)
    A = A.reshape(b, c, l, h).permute(0, 3, 1, 2)  # (b, h, c, l)
    A_cumsum = torch.cumsum(A, dim=-1)
    Lmat = torch.exp(_segsum(A))  # (b, h, c, l, l)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, Lmat, X)
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    decay_chunk = torch.exp(_segsum(F.pad(A_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)[:, :-1]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cumsum))
    return (y_diag + y_off).reshape(b, L, h, p)


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    block_len: int = 64,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Mamba-2 SSD as mamba_ssm's ``mamba_chunk_scan_combined`` (no z, no initial state).

    x ``(batch, L, H, P)``, dt ``(batch, L, H)``, A ``(H,)``, B/C ``(batch, L, G, N)``, D ``(H,)``,
    dt_bias ``(H,)``; ``dt' = softplus?(dt + dt_bias)``, ``h_t = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T``,
    ``y_t = h_t C_t + D x_t``. Computed in chunks of ``block_len`` (exact; the chunk size only
    changes the cost). Returns x's dtype (or float64 when ``compute_dtype`` is float64).
    """
    cd = compute_dtype
    out_dtype = cd if cd == torch.float64 else x.dtype
    batch, L, H, P = x.shape
    x, dt, A = x.to(cd), dt.to(cd), A.to(cd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = B.to(cd).repeat_interleave(H // B.shape[2], dim=2)
    Ch = C.to(cd).repeat_interleave(H // C.shape[2], dim=2)
    pad = (-L) % block_len
    X, Adt = x * dt.unsqueeze(-1), A * dt
    if pad:
        X = F.pad(X, (0, 0, 0, 0, 0, pad))
        Adt = F.pad(Adt, (0, 0, 0, pad))
        Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))
        Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
    y = _ssd_minimal(X, Adt, Bh, Ch, block_len)[:, :L]
    if D is not None:
        y = y + x * (D.to(cd)[:, None] if D.dim() == 1 else D.to(cd))
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# WKV
# ---------------------------------------------------------------------------------------------


def wkv4(
    time_decay: Tensor,
    time_first: Tensor,
    key: Tensor,
    value: Tensor,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """transformers' ``rwkv_linear_attention_cpu`` (zero initial state), a loop over T.

    key/value ``(B, T, C)``, time_decay/time_first ``(C,)``; decay ``exp(-exp(time_decay))``,
    max-trick for stability. Returns key's dtype (float64 when ``compute_dtype`` is float64).
    """
    cd = compute_dtype
    out_dtype = cd if cd == torch.float64 else key.dtype
    k, v = key.to(cd), value.to(cd)
    w = -torch.exp(time_decay.to(cd))
    u = time_first.to(cd)
    num = torch.zeros_like(k[:, 0])
    den = torch.zeros_like(k[:, 0])
    mx = torch.full_like(k[:, 0], -1e38)
    outs = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        m_out = torch.maximum(mx, kt + u)
        e1, e2 = torch.exp(mx - m_out), torch.exp(kt + u - m_out)
        outs.append((e1 * num + e2 * vt) / (e1 * den + e2))
        m_state = torch.maximum(mx + w, kt)
        e1, e2 = torch.exp(mx + w - m_state), torch.exp(kt - m_state)
        num, den, mx = e1 * num + e2 * vt, e1 * den + e2, m_state
    return torch.stack(outs, dim=1).to(out_dtype)


def wkv6(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    scale: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """RWKV-6 recurrence in fla's layout (fla ``rwkv6/recurrent_naive.py``), zero initial state.

    r/k/w ``[B, T, H, K]``, v ``[B, T, H, V]``, u ``[H, K]``, w the log decay; state ``[K, V]``:
    ``o_t = (r_t scale) (S + u k_t v_t^T)``, ``S <- diag(exp(w_t)) S + k_t v_t^T``.
    """
    cd = compute_dtype
    out_dtype = cd if cd == torch.float64 else v.dtype
    r, k, v, w, u = (t.to(cd) for t in (r, k, v, w, u))
    b, T, h, K = r.shape
    S = torch.zeros(b, h, K, v.shape[-1], dtype=cd, device=r.device)
    outs = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(((r[:, t, :, :, None] * scale) * (S + u[None, :, :, None] * kv)).sum(-2))
        S = S * torch.exp(w[:, t, :, :, None]) + kv
    return torch.stack(outs, dim=1).to(out_dtype)


def wkv7(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """RWKV-7 (generalized delta rule) in fla's layout, zero initial state.

    All ``[B, T, H, K]`` (v ``[B, T, H, V]``), w the log decay; state ``S [K, V]``:
    ``S <- diag(exp(w_t)) S + b_t (a_t^T S) + k_t v_t^T``, ``o_t = S^T (r_t scale)``.
    """
    cd = compute_dtype
    out_dtype = cd if cd == torch.float64 else v.dtype
    r, w, k, v, a, b = (t.to(cd) for t in (r, w, k, v, a, b))
    B_, T, h, K = r.shape
    S = torch.zeros(B_, h, K, v.shape[-1], dtype=cd, device=r.device)
    outs = []
    for t in range(T):
        sa = (a[:, t, :, :, None] * S).sum(-2, keepdim=True)  # a^T S, [B, H, 1, V]
        S = (
            S * torch.exp(w[:, t, :, :, None])
            + b[:, t, :, :, None] * sa
            + k[:, t, :, :, None] * v[:, t, :, None, :]
        )
        outs.append(((r[:, t, :, :, None] * scale) * S).sum(-2))
    return torch.stack(outs, dim=1).to(out_dtype)


def softplus_inverse(x: Tensor) -> Tensor:
    """``y`` with ``softplus(y) = x`` (x > 0): how Mamba initialises ``dt_bias``."""
    return x + torch.log(-torch.expm1(-x))


def logit(x: Tensor) -> Tensor:
    """Inverse of the sigmoid."""
    return torch.log(x) - torch.log1p(-x)


__all__ = [
    "attention",
    "attention_fp64",
    "selective_scan",
    "selective_state_update",
    "ssd",
    "wkv4",
    "wkv6",
    "wkv7",
    "softplus_inverse",
    "logit",
]
