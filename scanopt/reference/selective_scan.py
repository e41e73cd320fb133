"""NumPy float64 reference for Mamba-1's selective scan and its decode step, with hand-written VJPs.

Semantics follow mamba_ssm (real ``A`` only):

- ``selective_scan_fwd`` / ``selective_scan_bwd``: ``selective_scan_ref`` from
  ``mamba_ssm/ops/selective_scan_interface.py``, extended with an ``initial_state`` and a gradient
  that flows through the returned last state.
- ``selective_state_update_fwd`` / ``selective_state_update_bwd``: one decode step, the contract of
  ``selective_state_update`` in ``mamba_ssm/ops/triton/selective_state_update.py`` (with or
  without heads), except that the state is returned instead of updated in place.

Everything is computed in float64 whatever the input dtype, and returned as float64.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "selective_scan_bwd",
    "selective_scan_fwd",
    "selective_state_update_bwd",
    "selective_state_update_fwd",
]

# mamba_ssm's softplus switches to the identity above this input (CUDA, Triton and F.softplus).
SOFTPLUS_THRESHOLD = 20.0


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _f64(name: str, a) -> np.ndarray:
    """``a`` as a float64 array (a copy when the dtype changes); complex values are rejected."""
    if a is None:
        raise ValueError(f"{name} is required, got None")
    arr = np.asarray(a)
    if np.iscomplexobj(arr):
        raise ValueError(f"{name}: complex values are not supported (real A only)")
    return arr.astype(np.float64, copy=False)


def _opt_f64(name: str, a) -> np.ndarray | None:
    return None if a is None else _f64(name, a)


def _check_shape(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> None:
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")


def _softplus(x: np.ndarray) -> np.ndarray:
    """mamba_ssm's softplus: ``x`` above the threshold, ``log1p(exp(x))`` otherwise."""
    safe = np.minimum(x, SOFTPLUS_THRESHOLD)  # avoids overflow in the branch that is discarded
    return np.where(x > SOFTPLUS_THRESHOLD, x, np.log1p(np.exp(safe)))


def _softplus_grad(x: np.ndarray) -> np.ndarray:
    """d softplus / dx with the same threshold: ``sigmoid(x)`` below it, 1 above it."""
    return np.where(x > SOFTPLUS_THRESHOLD, 1.0, _sigmoid(x))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # stable for large |x|: exp of a non-positive number only
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _silu(z: np.ndarray) -> np.ndarray:
    return z * _sigmoid(z)


def _silu_grad(z: np.ndarray) -> np.ndarray:
    s = _sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


# ----------------------------------------------------------------------------------------------
# selective scan: B/C layouts
# ----------------------------------------------------------------------------------------------


def _bc_kind(name: str, M: np.ndarray, batch: int, dim: int, dstate: int, seqlen: int) -> str:
    """Validate B or C and return its layout: ``"fixed"``, ``"variable"`` or ``"grouped"``."""
    if M.ndim == 2:
        _check_shape(name, M, (dim, dstate))
        return "fixed"
    if M.ndim == 3:
        _check_shape(name, M, (batch, dstate, seqlen))
        return "variable"
    if M.ndim == 4:
        groups = M.shape[1]
        if groups < 1 or dim % groups != 0:
            raise ValueError(
                f"{name}: the group count G={groups} (shape {M.shape}) must divide dim={dim}"
            )
        _check_shape(name, M, (batch, groups, dstate, seqlen))
        return "grouped"
    raise ValueError(
        f"{name} must be (dim, N) fixed, (batch, N, L) variable or (batch, G, N, L) grouped; "
        f"got shape {M.shape}"
    )


def _bc_expand(M: np.ndarray, kind: str, batch: int, dim: int, seqlen: int) -> np.ndarray:
    """B or C as a per-channel array ``(batch, dim, N, L)`` (a broadcast view where possible)."""
    if kind == "fixed":  # (dim, N)
        return np.broadcast_to(M[None, :, :, None], (batch, dim, M.shape[1], seqlen))
    if kind == "variable":  # (batch, N, L): every channel sees the same B/C
        return np.broadcast_to(M[:, None], (batch, dim) + M.shape[1:])
    groups = M.shape[1]  # (batch, G, N, L): channel d uses group d // (dim // G)
    return np.repeat(M, dim // groups, axis=1)


def _bc_reduce(g: np.ndarray, kind: str, groups: int) -> np.ndarray:
    """Sum a per-channel gradient ``(batch, dim, N, L)`` back to B's or C's own shape."""
    if kind == "fixed":
        return g.sum(axis=(0, 3))
    if kind == "variable":
        return g.sum(axis=1)
    batch, dim, dstate, seqlen = g.shape
    return g.reshape(batch, groups, dim // groups, dstate, seqlen).sum(axis=2)


def _scan_prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """Convert and validate the selective-scan inputs; compute delta' and the expanded B/C."""
    u = _f64("u", u)
    delta = _f64("delta", delta)
    A = _f64("A", A)
    B = _f64("B", B)
    C = _f64("C", C)
    D = _opt_f64("D", D)
    z = _opt_f64("z", z)
    delta_bias = _opt_f64("delta_bias", delta_bias)
    initial_state = _opt_f64("initial_state", initial_state)

    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, dim, L), got {u.shape}")
    batch, dim, seqlen = u.shape
    if seqlen < 1:
        raise ValueError(f"u: sequence length L must be >= 1, got shape {u.shape}")
    _check_shape("delta", delta, (batch, dim, seqlen))
    if A.ndim != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim={dim}, N), got {A.shape}")
    dstate = A.shape[1]
    if dstate < 1:
        raise ValueError(f"A: state size N must be >= 1, got shape {A.shape}")
    kind_b = _bc_kind("B", B, batch, dim, dstate, seqlen)
    kind_c = _bc_kind("C", C, batch, dim, dstate, seqlen)
    if D is not None:
        _check_shape("D", D, (dim,))
    if z is not None:
        _check_shape("z", z, (batch, dim, seqlen))
    if delta_bias is not None:
        _check_shape("delta_bias", delta_bias, (dim,))
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (batch, dim, dstate))

    pre = delta if delta_bias is None else delta + delta_bias[:, None]  # (batch, dim, L)
    dt = _softplus(pre) if delta_softplus else pre
    return dict(
        u=u, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
        batch=batch, dim=dim, seqlen=seqlen, dstate=dstate, pre=pre, dt=dt,
        kind_b=kind_b, kind_c=kind_c,
        Bx=_bc_expand(B, kind_b, batch, dim, seqlen),  # (batch, dim, N, L)
        Cx=_bc_expand(C, kind_c, batch, dim, seqlen),  # (batch, dim, N, L)
    )  # fmt: skip


def _scan_states(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Run the recurrence; return ``(states (batch, dim, N, L), y (batch, dim, L))``."""
    batch, dim, dstate, seqlen = p["batch"], p["dim"], p["dstate"], p["seqlen"]
    u, A, dt, Bx, Cx = p["u"], p["A"], p["dt"], p["Bx"], p["Cx"]
    x = np.zeros((batch, dim, dstate)) if p["initial_state"] is None else p["initial_state"]
    states = np.empty((batch, dim, dstate, seqlen))
    for t in range(seqlen):
        dA = np.exp(dt[:, :, t, None] * A)  # (batch, dim, N)
        x = dA * x + (dt[:, :, t] * u[:, :, t])[:, :, None] * Bx[..., t]
        states[..., t] = x
    y = np.einsum("bdnl,bdnl->bdl", states, Cx)
    return states, y


# ----------------------------------------------------------------------------------------------
# selective scan: public functions
# ----------------------------------------------------------------------------------------------


def selective_scan_fwd(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus: bool = False,
    initial_state=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mamba-1 selective scan forward (mamba_ssm ``selective_scan_ref``, real A), in float64.

    Args:
        u: ``(batch, dim, L)`` input, ``L >= 1``.
        delta: ``(batch, dim, L)`` step sizes before bias / softplus.
        A: ``(dim, N)`` real state matrix (diagonal per channel).
        B: ``(dim, N)`` fixed, ``(batch, N, L)`` variable or ``(batch, G, N, L)`` grouped, where
            channel ``d`` uses group ``d // (dim // G)``; ``G`` must divide ``dim``.
        C: same layouts as ``B``, chosen independently of it.
        D: optional ``(dim,)`` skip connection, ``out += D * u``.
        z: optional ``(batch, dim, L)`` gate, ``out *= silu(z)``.
        delta_bias: optional ``(dim,)``, added to ``delta`` before the softplus.
        delta_softplus: apply ``softplus`` (identity above 20) to ``delta + delta_bias``.
        initial_state: optional ``(batch, dim, N)`` state before step 0 (``None`` means zeros).

    Returns:
        ``(out, last_state)``: ``out`` ``(batch, dim, L)`` and the state after the last step
        ``(batch, dim, N)``, both float64.

    Recurrence, with ``dt = softplus?(delta + delta_bias)``::

        x_l = exp(dt_l * A) * x_{l-1} + dt_l * B_l * u_l,   x_{-1} = initial_state
        y_l = sum_n x_l[n] * C_l[n];   out = (y + D * u) * silu(z)
    """
    p = _scan_prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    states, y = _scan_states(p)
    out = y if p["D"] is None else y + p["D"][:, None] * p["u"]
    if p["z"] is not None:
        out = out * _silu(p["z"])
    return out, states[..., -1].copy()


def selective_scan_bwd(
    dout,
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus: bool = False,
    initial_state=None,
    dlast_state=None,
) -> dict[str, np.ndarray | None]:
    """Vector-Jacobian product of :func:`selective_scan_fwd`, in float64.

    Args:
        dout: ``(batch, dim, L)`` gradient of the loss w.r.t. ``out``.
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state: as in
            :func:`selective_scan_fwd`.
        dlast_state: optional ``(batch, dim, N)`` gradient w.r.t. the returned last state
            (``None`` means zeros).

    Returns:
        Gradients keyed ``u``, ``delta``, ``A``, ``B``, ``C``, ``D``, ``z``, ``delta_bias``,
        ``initial_state``; each has its input's shape (B/C their own layout) and is ``None``
        where the input was ``None``. ``initial_state`` gets a gradient whenever it was given.
    """
    p = _scan_prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    batch, dim, dstate, seqlen = p["batch"], p["dim"], p["dstate"], p["seqlen"]
    u, A, D, z, dt, Bx, Cx = p["u"], p["A"], p["D"], p["z"], p["dt"], p["Bx"], p["Cx"]
    dout = _f64("dout", dout)
    _check_shape("dout", dout, (batch, dim, seqlen))
    if dlast_state is not None:
        dlast_state = _f64("dlast_state", dlast_state)
        _check_shape("dlast_state", dlast_state, (batch, dim, dstate))

    states, y = _scan_states(p)
    x0 = np.zeros((batch, dim, dstate)) if p["initial_state"] is None else p["initial_state"]

    # gate and skip: out = (y + D u) * silu(z)
    dz = None
    if z is not None:
        pre_gate = y if D is None else y + D[:, None] * u
        dz = dout * pre_gate * _silu_grad(z)
        dy = dout * _silu(z)
    else:
        dy = dout
    du = np.zeros_like(u) if D is None else dy * D[:, None]
    dD = None if D is None else np.einsum("bdl,bdl->d", dy, u)

    # y_l = <x_l, C_l>
    dCx = dy[:, :, None, :] * states  # (batch, dim, N, L)

    # reverse-time adjoint: h_l = dLoss/dx_l (total), h_l = dy_l C_l + exp(dt_{l+1} A) h_{l+1}
    dBx = np.empty((batch, dim, dstate, seqlen))
    ddt = np.empty((batch, dim, seqlen))
    dA = np.zeros_like(A)
    h = np.zeros((batch, dim, dstate)) if dlast_state is None else dlast_state.copy()
    for t in range(seqlen - 1, -1, -1):
        h = h + dy[:, :, t, None] * Cx[..., t]
        x_prev = states[..., t - 1] if t > 0 else x0
        decay = np.exp(dt[:, :, t, None] * A)  # (batch, dim, N)
        g_decay = h * x_prev * decay  # dLoss/d(dt_t * A), elementwise
        dA += np.einsum("bdn,bd->dn", g_decay, dt[:, :, t])
        hb = np.einsum("bdn,bdn->bd", h, Bx[..., t])
        ddt[:, :, t] = np.einsum("bdn,dn->bd", g_decay, A) + hb * u[:, :, t]
        du[:, :, t] += hb * dt[:, :, t]
        dBx[..., t] = h * (dt[:, :, t] * u[:, :, t])[:, :, None]
        h = h * decay  # now dLoss/dx_{t-1}

    ddelta = ddt * _softplus_grad(p["pre"]) if delta_softplus else ddt
    return {
        "u": du,
        "delta": ddelta,
        "A": dA,
        "B": _bc_reduce(dBx, p["kind_b"], p["B"].shape[1] if p["kind_b"] == "grouped" else 1),
        "C": _bc_reduce(dCx, p["kind_c"], p["C"].shape[1] if p["kind_c"] == "grouped" else 1),
        "D": dD,
        "z": dz,
        "delta_bias": None if p["delta_bias"] is None else ddelta.sum(axis=(0, 2)),
        "initial_state": None if p["initial_state"] is None else h,
    }


# ----------------------------------------------------------------------------------------------
# selective_state_update (decode step)
# ----------------------------------------------------------------------------------------------


def _ssu_prepare(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """Convert/validate the decode-step inputs into the with-heads layout, as upstream does.

    Like mamba_ssm, each argument without a head axis gets one of size 1 (so a 2-D B/C with a
    4-D state means ``ngroups == 1``). Returns the prepared dict; ``orig`` keeps input shapes.
    """
    required = {"state": state, "x": x, "dt": dt, "A": A, "B": B, "C": C}
    optional = {"D": D, "z": z, "dt_bias": dt_bias}
    arrs = {n: _f64(n, v) for n, v in required.items()}
    arrs.update({n: _opt_f64(n, v) for n, v in optional.items()})
    orig = {n: None if a is None else a.shape for n, a in arrs.items()}
    # rank without heads -> axis where upstream inserts the head axis
    no_head = {"state": (3, 1), "x": (2, 1), "dt": (2, 1), "A": (2, 0), "B": (2, 1), "C": (2, 1),
               "D": (1, 0), "z": (2, 1), "dt_bias": (1, 0)}  # fmt: skip
    for n, (rank, axis) in no_head.items():
        a = arrs[n]
        if a is None:
            continue
        if a.ndim == rank:
            a = np.expand_dims(a, axis)
        elif a.ndim != rank + 1:
            raise ValueError(f"{n} must be {rank}-D (no heads) or {rank + 1}-D, got {a.shape}")
        arrs[n] = a

    s = arrs["state"]
    batch, nheads, dim, dstate = s.shape
    _check_shape("x", arrs["x"], (batch, nheads, dim))
    _check_shape("dt", arrs["dt"], (batch, nheads, dim))
    _check_shape("A", arrs["A"], (nheads, dim, dstate))
    ngroups = arrs["B"].shape[1]
    if ngroups < 1 or nheads % ngroups != 0:
        raise ValueError(f"B: nheads={nheads} must be divisible by ngroups={ngroups}")
    _check_shape("B", arrs["B"], (batch, ngroups, dstate))
    _check_shape("C", arrs["C"], (batch, ngroups, dstate))
    for n in ("D", "dt_bias"):
        if arrs[n] is not None:
            _check_shape(n, arrs[n], (nheads, dim))
    if arrs["z"] is not None:
        _check_shape("z", arrs["z"], (batch, nheads, dim))

    pre = arrs["dt"] if arrs["dt_bias"] is None else arrs["dt"] + arrs["dt_bias"]
    dtp = _softplus(pre) if dt_softplus else pre  # (batch, nheads, dim)
    rep = nheads // ngroups  # head h uses group h // rep
    arrs.update(
        pre=pre, dtp=dtp, rep=rep, ngroups=ngroups, orig=orig,
        Bh=np.repeat(arrs["B"], rep, axis=1),  # (batch, nheads, N)
        Ch=np.repeat(arrs["C"], rep, axis=1),  # (batch, nheads, N)
        decay=np.exp(dtp[..., None] * arrs["A"]),  # (batch, nheads, dim, N)
    )  # fmt: skip
    return arrs


def _ssu_step(p: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step in the heads layout; returns ``(out, pre_gate, new_state)``."""
    x = p["x"]
    new_state = p["state"] * p["decay"] + (p["dtp"] * x)[..., None] * p["Bh"][:, :, None, :]
    pre_gate = np.einsum("bhdn,bhn->bhd", new_state, p["Ch"])
    if p["D"] is not None:
        pre_gate = pre_gate + p["D"] * x
    out = pre_gate if p["z"] is None else pre_gate * _silu(p["z"])
    return out, pre_gate, new_state


def selective_state_update_fwd(
    state,
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One decode step (mamba_ssm's Triton ``selective_state_update``), in float64.

    Without heads (Mamba-1): state ``(batch, dim, N)``; x, dt, z ``(batch, dim)``; A ``(dim, N)``;
    B, C ``(batch, N)``; D, dt_bias ``(dim,)``.
    With heads (Mamba-2): state ``(batch, nheads, dim, N)``; x, dt, z ``(batch, nheads, dim)``;
    A ``(nheads, dim, N)``; B, C ``(batch, ngroups, N)`` with head ``h`` using group
    ``h // (nheads // ngroups)``; D, dt_bias ``(nheads, dim)``. As upstream, any argument may
    omit its head axis (it is then taken as size 1), e.g. B/C ``(batch, N)`` means one group.

    ``dt' = softplus?(dt + dt_bias)`` (softplus is the identity above 20);
    ``new_state = state * exp(dt' A) + (dt' x)[..., None] * B[..., None, :]``;
    ``out = (sum_n new_state * C + D * x) * silu(z)``.

    Returns:
        ``(out, new_state)``: out shaped like ``x``, new_state shaped like ``state``. Unlike the
        Triton kernel, ``state`` is not modified in place; no input is mutated.
    """
    p = _ssu_prepare(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    out, _, new_state = _ssu_step(p)
    return out.reshape(p["orig"]["x"]), new_state.reshape(p["orig"]["state"])


def selective_state_update_bwd(
    dout,
    state,
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
    dnew_state=None,
) -> dict[str, np.ndarray | None]:
    """Vector-Jacobian product of :func:`selective_state_update_fwd`, in float64.

    Args:
        dout: gradient w.r.t. ``out``, shaped like ``x``.
        state, x, dt, A, B, C, D, z, dt_bias, dt_softplus: as in
            :func:`selective_state_update_fwd` (with or without heads).
        dnew_state: optional gradient w.r.t. ``new_state``, shaped like ``state`` (``None`` means
            zeros).

    Returns:
        Gradients keyed ``state``, ``x``, ``dt``, ``A``, ``B``, ``C``, ``D``, ``z``, ``dt_bias``,
        each shaped like its input, ``None`` where the input was ``None``.
    """
    p = _ssu_prepare(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    orig = p["orig"]
    batch, nheads, dim, dstate = p["state"].shape
    dout = _f64("dout", dout)
    _check_shape("dout", dout, orig["x"])
    dout = dout.reshape(batch, nheads, dim)
    if dnew_state is None:
        g_state = np.zeros((batch, nheads, dim, dstate))
    else:
        dnew_state = _f64("dnew_state", dnew_state)
        _check_shape("dnew_state", dnew_state, orig["state"])
        g_state = dnew_state.reshape(batch, nheads, dim, dstate)

    _, pre_gate, new_state = _ssu_step(p)
    xh, zh, Dh, dtp, decay = p["x"], p["z"], p["D"], p["dtp"], p["decay"]

    dz = None
    if zh is not None:
        dz = dout * pre_gate * _silu_grad(zh)
        dy = dout * _silu(zh)
    else:
        dy = dout
    dx = np.zeros_like(xh) if Dh is None else dy * Dh
    dD = None if Dh is None else np.einsum("bhd,bhd->hd", dy, xh)

    dCh = np.einsum("bhd,bhdn->bhn", dy, new_state)
    g = g_state + dy[..., None] * p["Ch"][:, :, None, :]  # total dLoss/d new_state
    d_state = g * decay
    g_decay = g * p["state"] * decay  # dLoss/d(dt' A), elementwise
    dA = np.einsum("bhdn,bhd->hdn", g_decay, dtp)
    gb = np.einsum("bhdn,bhn->bhd", g, p["Bh"])
    ddtp = np.einsum("bhdn,hdn->bhd", g_decay, p["A"]) + gb * xh
    dx = dx + gb * dtp
    dBh = np.einsum("bhdn,bhd->bhn", g, dtp * xh)
    ddt = ddtp * _softplus_grad(p["pre"]) if dt_softplus else ddtp

    def groups(a: np.ndarray) -> np.ndarray:  # (batch, nheads, N) -> (batch, ngroups, N)
        return a.reshape(batch, p["ngroups"], p["rep"], dstate).sum(axis=2)

    def shaped(name: str, a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a.reshape(orig[name])

    return {
        "state": shaped("state", d_state),
        "x": shaped("x", dx),
        "dt": shaped("dt", ddt),
        "A": shaped("A", dA),
        "B": shaped("B", groups(dBh)),
        "C": shaped("C", groups(dCh)),
        "D": shaped("D", dD),
        "z": shaped("z", dz),
        "dt_bias": None if p["dt_bias"] is None else shaped("dt_bias", ddt.sum(axis=0)),
    }
