"""NumPy float64 references for RWKV's WKV-4, WKV-6 and WKV-7, each with a hand-written VJP.

Semantics follow the upstream code that scanopt replaces:

- WKV-4: transformers' ``rwkv_linear_attention_cpu`` (``models/rwkv/modeling_rwkv.py``): the
  max-trick recurrence over ``(num, den, max)`` with ``w = -exp(time_decay)``, ``u = time_first``.
- WKV-6: flash-linear-attention's ``chunk_rwkv6`` / ``naive_recurrent_rwkv6``: ``w`` is the log
  decay, ``o_t = scale * r_t^T (S_{t-1} + diag(u) k_t v_t^T)``, ``S_t = diag(e^{w_t}) S_{t-1} +
  k_t v_t^T``.
- WKV-7: flash-linear-attention's ``chunk_rwkv7`` (DPLR delta rule, ``dplr_recurrence``):
  ``S_t = diag(e^{w_t}) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T`` ("first matmul, then decay":
  ``a`` reads the old, undecayed state) and ``o_t = scale * r_t^T S_t`` (after the update).

Everything is computed in float64; loops run over T only, batch and heads are vectorized.
Backward functions differentiate exactly the recurrence the forward runs and return a dict keyed
by the forward's argument names; an optional state that was ``None`` gets a ``None`` gradient.
"""

from __future__ import annotations

import numpy as np

# transformers' running max for an empty WKV-4 state (num = den = 0)
WKV4_EMPTY_MAX = -1e38

_WKV4_PARTS = ("num", "den", "max")


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _shaped(name: str, x, shape: tuple[int, ...]) -> np.ndarray:
    x = _f64(x)
    if x.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {x.shape}")
    return x


def _ndim(name: str, x, ndim: int, layout: str) -> np.ndarray:
    x = _f64(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {x.shape}")
    return x


def _wkv4_triple(name: str, triple, b: int, c: int):
    if triple is None:
        return None
    if not isinstance(triple, (tuple, list)) or len(triple) != 3:
        raise ValueError(f"{name} must be a tuple (num, den, max) of three (B, C) arrays")
    return tuple(
        _shaped(f"{name}[{i}] ({part})", x, (b, c))
        for i, (part, x) in enumerate(zip(_WKV4_PARTS, triple, strict=True))
    )


def _wkv4_inputs(time_decay, time_first, key, value, state):
    key = _ndim("key", key, 3, "(B, T, C)")
    b, _, c = key.shape
    value = _shaped("value", value, key.shape)
    time_decay = _shaped("time_decay", time_decay, (c,))
    time_first = _shaped("time_first", time_first, (c,))
    state = _wkv4_triple("state", state, b, c)
    return time_decay, time_first, key, value, state


def _wkv4_scan(w, u, key, value, state):
    """Run the max-trick recurrence; returns out and the T + 1 states (num, den, max)."""
    b, t_len, c = key.shape
    if state is None:
        num, den, mx = np.zeros((b, c)), np.zeros((b, c)), np.full((b, c), WKV4_EMPTY_MAX)
    else:
        num, den, mx = (s.copy() for s in state)
    out = np.empty((b, t_len, c))
    states = np.empty((3, t_len + 1, b, c))  # [num/den/max, T + 1, B, C]
    states[:, 0] = num, den, mx
    for t in range(t_len):
        kt, vt = key[:, t], value[:, t]
        # output: the current token enters with the bonus u
        m = np.maximum(mx, u + kt)
        e1, e2 = np.exp(mx - m), np.exp(u + kt - m)
        out[:, t] = (e1 * num + e2 * vt) / (e1 * den + e2)
        # state: decay by e^w, add the current token, rescale to the new running max
        q = np.maximum(mx + w, kt)
        f1, f2 = np.exp(mx + w - q), np.exp(kt - q)
        num, den, mx = f1 * num + f2 * vt, f1 * den + f2, q
        states[:, t + 1] = num, den, mx
    return out, states


def wkv4_fwd(
    time_decay: np.ndarray,
    time_first: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    state: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """RWKV-4 WKV forward, as transformers' ``rwkv_linear_attention_cpu``.

    Args:
        time_decay: ``(C,)``; the per-step log decay is ``w = -exp(time_decay)``.
        time_first: ``(C,)``; the bonus ``u`` of the current token.
        key, value: ``(B, T, C)``.
        state: ``None`` (num = den = 0, max = -1e38) or ``(num, den, max)``, each ``(B, C)``;
            num and den are stored divided by ``exp(max)``.

    Returns:
        ``out`` ``(B, T, C)`` and the final state ``(num, den, max)``, each ``(B, C)``.
    """
    time_decay, time_first, key, value, state = _wkv4_inputs(
        time_decay, time_first, key, value, state
    )
    out, states = _wkv4_scan(-np.exp(time_decay), time_first, key, value, state)
    return out, (states[0, -1], states[1, -1], states[2, -1])


def wkv4_bwd(
    dout: np.ndarray,
    time_decay: np.ndarray,
    time_first: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    state: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    dstate: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict:
    """VJP of :func:`wkv4_fwd` through the literal max-trick recurrence.

    Each ``maximum`` passes its gradient to one branch: the first argument (the running max)
    on ties. Away from ties this is the exact derivative.

    Args:
        dout: ``(B, T, C)`` cotangent of ``out``.
        time_decay, time_first, key, value, state: as in :func:`wkv4_fwd`.
        dstate: ``None`` or ``(dnum, dden, dmax)``, each ``(B, C)`` or ``None``: cotangent of
            the returned final state.

    Returns:
        dict with ``time_decay`` ``(C,)``, ``time_first`` ``(C,)``, ``key`` and ``value``
        ``(B, T, C)``, and ``state``: ``(dnum, dden, dmax)`` each ``(B, C)``, or ``None`` when
        ``state`` was ``None``.
    """
    time_decay, time_first, key, value, state = _wkv4_inputs(
        time_decay, time_first, key, value, state
    )
    b, t_len, c = key.shape
    dout = _shaped("dout", dout, key.shape)
    if dstate is not None and (not isinstance(dstate, (tuple, list)) or len(dstate) != 3):
        raise ValueError("dstate must be a tuple (dnum, dden, dmax) of three (B, C) arrays")
    dstate = [np.zeros((b, c)) for _ in range(3)] if dstate is None else list(dstate)
    dstate = _wkv4_triple("dstate", [np.zeros((b, c)) if g is None else g for g in dstate], b, c)

    w, u = -np.exp(time_decay), time_first
    _, states = _wkv4_scan(w, u, key, value, state)
    g_num, g_den, g_mx = (g.copy() for g in dstate)  # cotangents of the state after step t
    dw, du = np.zeros(c), np.zeros(c)
    dkey, dvalue = np.empty_like(key), np.empty_like(value)
    for t in reversed(range(t_len)):
        num, den, mx = states[0, t], states[1, t], states[2, t]
        kt, vt = key[:, t], value[:, t]

        # state update: num' = f1 num + f2 v, den' = f1 den + f2, max' = q
        mw = mx + w
        q = np.maximum(mw, kt)
        f1, f2 = np.exp(mw - q), np.exp(kt - q)
        gf1 = g_num * num + g_den * den
        gf2 = g_num * vt + g_den
        n_num, n_den, gv = g_num * f1, g_den * f1, g_num * f2
        g_mw, gk = gf1 * f1, gf2 * f2
        g_q = g_mx - g_mw - gk
        take_mw = mw >= q
        g_mw = g_mw + np.where(take_mw, g_q, 0.0)
        gk = gk + np.where(take_mw, 0.0, g_q)

        # output: y = (e1 num + e2 v) / (e1 den + e2), m = max(max, u + k)
        p = u + kt
        m = np.maximum(mx, p)
        e1, e2 = np.exp(mx - m), np.exp(p - m)
        den_o = e1 * den + e2
        y = (e1 * num + e2 * vt) / den_o
        g_a = dout[:, t] / den_o  # d numerator
        g_b = -g_a * y  # d denominator
        ge1, ge2 = g_a * num + g_b * den, g_a * vt + g_b
        n_num += g_a * e1
        n_den += g_b * e1
        gv += g_a * e2
        n_mx, g_p = ge1 * e1, ge2 * e2
        g_m = -(n_mx + g_p)
        take_mx = mx >= p
        n_mx = n_mx + np.where(take_mx, g_m, 0.0)
        g_p = g_p + np.where(take_mx, 0.0, g_m)

        n_mx += g_mw
        dw += g_mw.sum(0)
        du += g_p.sum(0)
        dkey[:, t] = gk + g_p
        dvalue[:, t] = gv
        g_num, g_den, g_mx = n_num, n_den, n_mx

    return {
        "time_decay": dw * w,  # dw/dtime_decay = -exp(time_decay) = w
        "time_first": du,
        "key": dkey,
        "value": dvalue,
        "state": None if state is None else (g_num, g_den, g_mx),
    }


def _wkv6_inputs(r, k, v, w, u, initial_state):
    r = _ndim("r", r, 4, "[B, T, H, K]")
    b, t_len, h, dk = r.shape
    k = _shaped("k", k, r.shape)
    w = _shaped("w", w, r.shape)
    v = _ndim("v", v, 4, "[B, T, H, V]")
    if v.shape[:3] != (b, t_len, h):
        raise ValueError(f"v must have shape ({b}, {t_len}, {h}, V) [B, T, H, V], got {v.shape}")
    u = _shaped("u", u, (h, dk))
    shape_s = (b, h, dk, v.shape[3])
    s0 = (
        np.zeros(shape_s)
        if initial_state is None
        else _shaped("initial_state", initial_state, shape_s)
    )
    return r, k, v, w, u, s0


def _wkv6_scan(r, k, v, w, u, scale, s0):
    """Returns o [B, T, H, V] and the T + 1 states [T + 1, B, H, K, V]."""
    b, t_len, h, _ = r.shape
    states = np.empty((t_len + 1, *s0.shape))
    states[0] = s0
    o = np.empty((b, t_len, h, v.shape[3]))
    for t in range(t_len):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", r[:, t], states[t] + u[:, :, None] * kv)
        states[t + 1] = np.exp(w[:, t])[..., None] * states[t] + kv
    return o, states


def wkv6_fwd(
    r: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    w: np.ndarray,
    u: np.ndarray,
    scale: float = 1.0,
    initial_state: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """RWKV-6 WKV forward, as flash-linear-attention's ``chunk_rwkv6``.

    ``o_t = scale * r_t^T (S_{t-1} + diag(u) k_t v_t^T)``, then
    ``S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T``.

    Args:
        r, k: ``[B, T, H, K]``.
        v: ``[B, T, H, V]``.
        w: ``[B, T, H, K]`` log decay (<= 0 in RWKV; not checked here).
        u: ``[H, K]`` bonus of the current token.
        scale: multiplies ``r`` (fla's default is ``K**-0.5``; RWKV uses 1.0).
        initial_state: ``[B, H, K, V]`` or ``None`` (zeros).

    Returns:
        ``o`` ``[B, T, H, V]`` and ``final_state`` ``[B, H, K, V]``.
    """
    r, k, v, w, u, s0 = _wkv6_inputs(r, k, v, w, u, initial_state)
    o, states = _wkv6_scan(r, k, v, w, u, float(scale), s0)
    return o, states[-1]


def wkv6_bwd(
    do: np.ndarray,
    r: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    w: np.ndarray,
    u: np.ndarray,
    scale: float = 1.0,
    initial_state: np.ndarray | None = None,
    dfinal_state: np.ndarray | None = None,
) -> dict:
    """VJP of :func:`wkv6_fwd`.

    Args:
        do: ``[B, T, H, V]`` cotangent of ``o``.
        r, k, v, w, u, scale, initial_state: as in :func:`wkv6_fwd`.
        dfinal_state: ``[B, H, K, V]`` cotangent of ``final_state``, or ``None`` (zeros).

    Returns:
        dict with ``r``, ``k``, ``w`` ``[B, T, H, K]``, ``v`` ``[B, T, H, V]``, ``u`` ``[H, K]``
        and ``initial_state`` ``[B, H, K, V]`` (``None`` when ``initial_state`` was ``None``).
    """
    r, k, v, w, u, s0 = _wkv6_inputs(r, k, v, w, u, initial_state)
    scale = float(scale)
    b, t_len, h, _ = r.shape
    do = _shaped("do", do, (b, t_len, h, v.shape[3]))
    ds = (
        np.zeros(s0.shape)
        if dfinal_state is None
        else _shaped("dfinal_state", dfinal_state, s0.shape)
    )
    ds = ds.copy()  # cotangent of S_t, walking t backwards

    _, states = _wkv6_scan(r, k, v, w, u, scale, s0)
    dr, dk, dw = np.empty_like(r), np.empty_like(k), np.empty_like(w)
    dv, du = np.empty_like(v), np.zeros_like(u)
    for t in reversed(range(t_len)):
        s_prev = states[t]
        kt, vt = k[:, t], v[:, t]
        kv = kt[..., None] * vt[..., None, :]  # [B, H, K, V]
        # o_t = scale * r_t^T X, X = S_{t-1} + diag(u) kv
        dx = scale * r[:, t, :, :, None] * do[:, t, :, None, :]  # [B, H, K, V]
        dr[:, t] = scale * np.einsum("bhv,bhkv->bhk", do[:, t], s_prev + u[:, :, None] * kv)
        du += np.einsum("bhkv,bhkv->hk", dx, kv)
        dkv = u[:, :, None] * dx + ds
        dk[:, t] = np.einsum("bhkv,bhv->bhk", dkv, vt)
        dv[:, t] = np.einsum("bhkv,bhk->bhv", dkv, kt)
        decay = np.exp(w[:, t])  # [B, H, K]
        dw[:, t] = decay * np.einsum("bhkv,bhkv->bhk", ds, s_prev)
        ds = decay[..., None] * ds + dx

    return {
        "r": dr,
        "k": dk,
        "v": dv,
        "w": dw,
        "u": du,
        "initial_state": None if initial_state is None else ds,
    }


def _wkv7_inputs(r, w, k, v, a, b, initial_state):
    r = _ndim("r", r, 4, "[B, T, H, K]")
    bs, t_len, h, dk = r.shape
    w = _shaped("w", w, r.shape)
    k = _shaped("k", k, r.shape)
    a = _shaped("a", a, r.shape)
    b = _shaped("b", b, r.shape)
    v = _ndim("v", v, 4, "[B, T, H, V]")
    if v.shape[:3] != (bs, t_len, h):
        raise ValueError(f"v must have shape ({bs}, {t_len}, {h}, V) [B, T, H, V], got {v.shape}")
    shape_s = (bs, h, dk, v.shape[3])
    s0 = (
        np.zeros(shape_s)
        if initial_state is None
        else _shaped("initial_state", initial_state, shape_s)
    )
    return r, w, k, v, a, b, s0


def _wkv7_scan(r, w, k, v, a, b, scale, s0):
    """Returns o [B, T, H, V] and the T + 1 states [T + 1, B, H, K, V]."""
    bs, t_len, h, _ = r.shape
    states = np.empty((t_len + 1, *s0.shape))
    states[0] = s0
    o = np.empty((bs, t_len, h, v.shape[3]))
    for t in range(t_len):
        s = states[t]
        sa = np.einsum("bhk,bhkv->bhv", a[:, t], s)  # a^T S_{t-1}, on the undecayed state
        s = (
            np.exp(w[:, t])[..., None] * s
            + b[:, t, :, :, None] * sa[:, :, None, :]
            + k[:, t, :, :, None] * v[:, t, :, None, :]
        )
        states[t + 1] = s
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", r[:, t], s)
    return o, states


def wkv7_fwd(
    r: np.ndarray,
    w: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    scale: float = 1.0,
    initial_state: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """RWKV-7 WKV forward, as flash-linear-attention's ``chunk_rwkv7`` (DPLR delta rule).

    ``S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T`` and
    ``o_t = scale * r_t^T S_t`` (the output reads the updated state).

    Args:
        r, k: ``[B, T, H, K]``.
        w: ``[B, T, H, K]`` log decay (any value; RWKV-7 keeps it in [-exp(-0.5), 0)).
        v: ``[B, T, H, V]``.
        a, b: ``[B, T, H, K]``; RWKV-7 passes ``a = -kk`` and ``b = kk * alpha``.
        scale: multiplies ``r``.
        initial_state: ``[B, H, K, V]`` or ``None`` (zeros).

    Returns:
        ``o`` ``[B, T, H, V]`` and ``final_state`` ``[B, H, K, V]``.
    """
    r, w, k, v, a, b, s0 = _wkv7_inputs(r, w, k, v, a, b, initial_state)
    o, states = _wkv7_scan(r, w, k, v, a, b, float(scale), s0)
    return o, states[-1]


def wkv7_bwd(
    do: np.ndarray,
    r: np.ndarray,
    w: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    scale: float = 1.0,
    initial_state: np.ndarray | None = None,
    dfinal_state: np.ndarray | None = None,
) -> dict:
    """VJP of :func:`wkv7_fwd`.

    Args:
        do: ``[B, T, H, V]`` cotangent of ``o``.
        r, w, k, v, a, b, scale, initial_state: as in :func:`wkv7_fwd`.
        dfinal_state: ``[B, H, K, V]`` cotangent of ``final_state``, or ``None`` (zeros).

    Returns:
        dict with ``r``, ``w``, ``k``, ``a``, ``b`` ``[B, T, H, K]``, ``v`` ``[B, T, H, V]``
        and ``initial_state`` ``[B, H, K, V]`` (``None`` when ``initial_state`` was ``None``).
    """
    r, w, k, v, a, b, s0 = _wkv7_inputs(r, w, k, v, a, b, initial_state)
    scale = float(scale)
    bs, t_len, h, _ = r.shape
    do = _shaped("do", do, (bs, t_len, h, v.shape[3]))
    ds = (
        np.zeros(s0.shape)
        if dfinal_state is None
        else _shaped("dfinal_state", dfinal_state, s0.shape)
    )
    ds = ds.copy()  # cotangent of S_t, walking t backwards

    _, states = _wkv7_scan(r, w, k, v, a, b, scale, s0)
    grads = {name: np.empty_like(x) for name, x in (("r", r), ("w", w), ("k", k), ("a", a))}
    grads["b"], grads["v"] = np.empty_like(b), np.empty_like(v)
    for t in reversed(range(t_len)):
        s_prev, s_new = states[t], states[t + 1]
        grads["r"][:, t] = scale * np.einsum("bhv,bhkv->bhk", do[:, t], s_new)
        g = ds + scale * r[:, t, :, :, None] * do[:, t, :, None, :]  # total cotangent of S_t
        grads["k"][:, t] = np.einsum("bhkv,bhv->bhk", g, v[:, t])
        grads["v"][:, t] = np.einsum("bhkv,bhk->bhv", g, k[:, t])
        sa = np.einsum("bhk,bhkv->bhv", a[:, t], s_prev)
        grads["b"][:, t] = np.einsum("bhkv,bhv->bhk", g, sa)
        dsa = np.einsum("bhkv,bhk->bhv", g, b[:, t])
        grads["a"][:, t] = np.einsum("bhkv,bhv->bhk", s_prev, dsa)
        decay = np.exp(w[:, t])  # [B, H, K]
        grads["w"][:, t] = decay * np.einsum("bhkv,bhkv->bhk", g, s_prev)
        ds = decay[..., None] * g + a[:, t, :, :, None] * dsa[:, :, None, :]

    grads["initial_state"] = None if initial_state is None else ds
    return grads
