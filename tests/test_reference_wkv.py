"""Tests for the NumPy float64 WKV references (RWKV-4, RWKV-6, RWKV-7).

Backwards are checked against central finite differences; forwards against closed forms that
never run the reference's recurrence (ratio-of-sums for WKV-4, decay-weighted attention for
WKV-6, a sum of products of transition matrices for WKV-7).
"""

import re

import numpy as np
import pytest

from scanopt.reference.wkv import (
    WKV4_EMPTY_MAX,
    wkv4_bwd,
    wkv4_fwd,
    wkv6_bwd,
    wkv6_fwd,
    wkv7_bwd,
    wkv7_fwd,
)

B, T, C = 2, 5, 3
H, K, V = 2, 3, 4
FD_TOL = 1e-6


# helpers


def _rel(x, ref):
    return np.linalg.norm(np.asarray(x) - ref) / max(np.linalg.norm(ref), 1e-300)


def _fd_grad(loss, x, h=1e-6):
    """Central differences of loss() w.r.t. every element of x (modified in place, restored)."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        orig = x[idx]
        x[idx] = orig + h
        lp = loss()
        x[idx] = orig - h
        lm = loss()
        x[idx] = orig
        g[idx] = (lp - lm) / (2 * h)
    return g


def _assert_fd(loss, inputs, grads):
    for name, x in inputs.items():
        fd = _fd_grad(loss, x)
        diff = np.linalg.norm(grads[name] - fd)
        assert diff <= FD_TOL * max(np.linalg.norm(fd), 1e-6), (
            f"{name}: |analytic - fd| / |fd| = {diff / max(np.linalg.norm(fd), 1e-300):.3e}"
        )


def _logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def _wkv4_data(rng, t=T, with_state=False, key_scale=1.0):
    time_decay = rng.normal(size=C) * 0.5 - 0.5  # w = -exp(time_decay) in about (-1.6, -0.2)
    time_first = rng.normal(size=C) * 0.5
    key = rng.normal(size=(B, t, C)) * key_scale
    value = rng.normal(size=(B, t, C))
    state = None
    if with_state:
        state = (rng.normal(size=(B, C)), np.exp(rng.normal(size=(B, C))), rng.normal(size=(B, C)))
    return time_decay, time_first, key, value, state


def _wkv6_data(rng, t=T, with_state=False, w_min=None):
    r = rng.normal(size=(B, t, H, K))
    k = rng.normal(size=(B, t, H, K))
    v = rng.normal(size=(B, t, H, V))
    if w_min is None:
        w = _logsigmoid(rng.normal(size=(B, t, H, K)) + 1.0)
    else:
        w = w_min * rng.random(size=(B, t, H, K))
        w.flat[::7] = w_min  # hit the bound exactly
    u = rng.normal(size=(H, K))
    s0 = rng.normal(size=(B, H, K, V)) if with_state else None
    return r, k, v, w, u, s0


def _wkv7_data(rng, t=T, with_state=False, w_min=None, rwkv_ab=True):
    r = rng.normal(size=(B, t, H, K))
    k = rng.normal(size=(B, t, H, K))
    v = rng.normal(size=(B, t, H, V))
    if w_min is None:  # RWKV-7's clamped decay: w = -exp(-0.5) * sigmoid(x)
        w = -np.exp(-0.5) / (1.0 + np.exp(-rng.normal(size=(B, t, H, K))))
    else:
        w = w_min * rng.random(size=(B, t, H, K))
        w.flat[::7] = w_min
    if rwkv_ab:  # a = -kk, b = kk * alpha with kk unit-norm per head
        kk = rng.normal(size=(B, t, H, K))
        kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
        a, b = -kk, kk * rng.random(size=(B, t, H, K))
    else:
        a, b = 0.5 * rng.normal(size=(B, t, H, K)), 0.5 * rng.normal(size=(B, t, H, K))
    s0 = rng.normal(size=(B, H, K, V)) if with_state else None
    return r, w, k, v, a, b, s0


# closed forms (no recurrence)


def _wkv4_closed(time_decay, time_first, key, value, state=None):
    """Ratio of sums without the max trick; returns out and the true final num, den."""
    w, u = -np.exp(time_decay), time_first
    t_len = key.shape[1]
    t = np.arange(t_len)[:, None, None]
    s = np.arange(t_len)[None, :, None]
    # log weight of token s at output t: (t - 1 - s) w + k_s for s < t, u + k_t for s = t
    logw = np.where(s < t, (t - 1 - s) * w, np.where(s == t, u, -np.inf))  # [T, T, C]
    weight = np.exp(logw[None] + key[:, None])  # [B, T_out, T_src, C]
    num = np.einsum("btsc,bsc->btc", weight, value)
    den = weight.sum(2)
    fin_w = np.exp((t_len - 1 - np.arange(t_len))[:, None] * w + key)  # [B, T, C]
    num_t, den_t = (fin_w * value).sum(1), fin_w.sum(1)
    if state is not None:
        n0, d0, m0 = state
        dec = np.exp(m0[:, None] + np.arange(t_len)[None, :, None] * w)  # [B, T, C]
        num, den = num + dec * n0[:, None], den + dec * d0[:, None]
        num_t, den_t = num_t + np.exp(m0 + t_len * w) * n0, den_t + np.exp(m0 + t_len * w) * d0
    return num / den, num_t, den_t


def _wkv4_closed_lse(time_decay, time_first, key, value, state=None):
    """The same ratio of sums through log-sum-exp; returns out, log(final den), final num/den."""
    w, u = -np.exp(time_decay), time_first
    t_len = key.shape[1]
    t = np.arange(t_len)[:, None, None]
    s = np.arange(t_len)[None, :, None]
    logw = np.where(s < t, (t - 1 - s) * w, np.where(s == t, u, -np.inf))[None] + key[:, None]
    vals = np.broadcast_to(value[:, None], logw.shape)
    fin_logw = (t_len - 1 - np.arange(t_len))[:, None] * w + key  # [B, T, C]
    fin_vals = value
    if state is not None:
        # the initial state is one more source: log weight max + t w + log den, value num / den
        n0, d0, m0 = state
        init_logw = m0[:, None] + np.arange(t_len)[None, :, None] * w + np.log(d0)[:, None]
        logw = np.concatenate([logw, init_logw[:, :, None]], axis=2)
        vals = np.concatenate(
            [vals, np.broadcast_to((n0 / d0)[:, None, None], init_logw[:, :, None].shape)], 2
        )
        fin_logw = np.concatenate([fin_logw, (m0 + t_len * w + np.log(d0))[:, None]], axis=1)
        fin_vals = np.concatenate([fin_vals, (n0 / d0)[:, None]], axis=1)
    e = np.exp(logw - logw.max(axis=2, keepdims=True))
    out = (e * vals).sum(2) / e.sum(2)
    top = fin_logw.max(axis=1)
    fe = np.exp(fin_logw - top[:, None])
    return out, top + np.log(fe.sum(1)), (fe * fin_vals).sum(1) / fe.sum(1)


def _wkv6_closed(r, k, v, w, u, scale, s0=None):
    """Decay-weighted attention: o_t = scale (sum_{s<t} r_t^T diag(e^{G_{t-1}-G_s}) k_s v_s
    + (r_t u k_t) v_t + r_t^T diag(e^{G_{t-1}}) S_0), G the inclusive cumsum of w."""
    t_len = r.shape[1]
    g = np.cumsum(w, axis=1)  # inclusive
    ge = g - w  # exclusive: G_{t-1}
    past = (np.arange(t_len)[None, :] < np.arange(t_len)[:, None])[None, :, :, None, None]
    logd = np.where(past, ge[:, :, None] - g[:, None], -np.inf)  # [B, T_out, T_src, H, K]
    att = np.einsum("bthk,bshk,btshk->bhts", r, k, np.exp(logd))
    bonus = np.einsum("bthk,hk,bthk->bht", r, u, k)
    o = np.einsum("bhts,bshv->bthv", att, v) + bonus.transpose(0, 2, 1)[..., None] * v
    fin = np.einsum("bshk,bshv->bhkv", np.exp(g[:, -1:] - g) * k, v)
    if s0 is not None:
        o += np.einsum("bthk,bhkv->bthv", r * np.exp(ge), s0)
        fin += np.exp(g[:, -1])[..., None] * s0
    return scale * o, fin


def _wkv7_closed(r, w, k, v, a, b, scale, s0=None):
    """S_t = sum_{s<=t} M_t ... M_{s+1} k_s v_s^T + M_t ... M_1 S_0 with the transition
    M_t = diag(e^{w_t}) + b_t a_t^T, summed as the Neumann series of the nilpotent block shift."""
    bs, t_len, h, dk = r.shape
    m = np.exp(w)[..., None] * np.eye(dk) + b[..., :, None] * a[..., None, :]  # [B, T, H, K, K]
    shift = np.zeros((bs, h, t_len, dk, t_len, dk))
    for t in range(1, t_len):
        shift[:, :, t, :, t - 1, :] = m[:, t]
    shift = shift.reshape(bs, h, t_len * dk, t_len * dk)
    rhs = np.einsum("bthk,bthv->bhtkv", k, v)
    if s0 is not None:
        rhs[:, :, 0] += np.einsum("bhij,bhjv->bhiv", m[:, 0], s0)
    rhs = rhs.reshape(bs, h, t_len * dk, -1)
    # (I - L)^{-1} = sum_{n < T} L^n: block (t, s) of L^{t-s} is M_t M_{t-1} ... M_{s+1}
    states = sum(np.linalg.matrix_power(shift, n) @ rhs for n in range(t_len))
    states = states.reshape(bs, h, t_len, dk, -1)
    return scale * np.einsum("bthk,bhtkv->bthv", r, states), states[:, :, -1]


# WKV-4


def _wkv4_min_margin(time_decay, time_first, key, state):
    """Smallest gap between the two arguments of each maximum the recurrence evaluates."""
    w = -np.exp(time_decay)
    gaps = []
    for t in range(key.shape[1]):
        _, (_, _, mx) = wkv4_fwd(time_decay, time_first, key[:, :t], key[:, :t], state)
        gaps += [np.abs(mx - time_first - key[:, t]).min(), np.abs(mx + w - key[:, t]).min()]
    return min(gaps)


@pytest.mark.parametrize("t_len", [T, 1])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_dstate", [False, True])
def test_wkv4_bwd_matches_finite_differences(t_len, with_state, with_dstate):
    rng = np.random.default_rng(100 + 4 * t_len + 2 * with_state + with_dstate)
    time_decay, time_first, key, value, state = _wkv4_data(rng, t_len, with_state)
    assert _wkv4_min_margin(time_decay, time_first, key, state) > 1e-3  # away from max-ties
    dout = rng.normal(size=key.shape)
    dstate = tuple(rng.normal(size=(B, C)) for _ in range(3)) if with_dstate else None

    def loss():
        out, fin = wkv4_fwd(time_decay, time_first, key, value, state)
        total = np.sum(dout * out)
        if dstate is not None:
            total += sum(np.sum(d * f) for d, f in zip(dstate, fin, strict=True))
        return total

    g = wkv4_bwd(dout, time_decay, time_first, key, value, state, dstate)
    inputs = {"time_decay": time_decay, "time_first": time_first, "key": key, "value": value}
    grads = {name: g[name] for name in inputs}
    if with_state:
        for i, part in enumerate(("num", "den", "max")):
            inputs[f"state.{part}"] = state[i]
            grads[f"state.{part}"] = g["state"][i]
    else:
        assert g["state"] is None
    _assert_fd(loss, inputs, grads)


@pytest.mark.parametrize("with_state", [False, True])
def test_wkv4_fwd_matches_ratio_of_sums(with_state):
    rng = np.random.default_rng(4)
    time_decay, time_first, key, value, state = _wkv4_data(rng, 9, with_state, key_scale=3.0)
    out, (num, den, mx) = wkv4_fwd(time_decay, time_first, key, value, state)
    ref, num_t, den_t = _wkv4_closed(time_decay, time_first, key, value, state)
    assert out.dtype == np.float64
    assert _rel(out, ref) < 1e-12
    assert _rel(num * np.exp(mx), num_t) < 1e-12
    assert _rel(den * np.exp(mx), den_t) < 1e-12


@pytest.mark.parametrize("magnitude", [60.0, 1000.0])
@pytest.mark.parametrize("with_state", [False, True])
def test_wkv4_large_keys_stay_finite(magnitude, with_state):
    rng = np.random.default_rng(int(magnitude) + with_state)
    time_decay, time_first, _, value, state = _wkv4_data(rng, 12, with_state)
    key = magnitude * rng.choice([-1.0, 1.0], size=value.shape) + rng.normal(size=value.shape)
    if with_state:
        state = (state[0], state[1], magnitude * rng.choice([-1.0, 1.0], size=(B, C)))
    with np.errstate(over="raise", invalid="raise"):
        out, (num, den, mx) = wkv4_fwd(time_decay, time_first, key, value, state)
        g = wkv4_bwd(np.ones_like(out), time_decay, time_first, key, value, state)
    for x in (out, num, den, mx, *(g[n] for n in ("time_decay", "time_first", "key", "value"))):
        assert np.all(np.isfinite(x))
    ref, log_den_t, ratio_t = _wkv4_closed_lse(time_decay, time_first, key, value, state)
    assert _rel(out, ref) < 1e-10
    assert _rel(np.log(den) + mx, log_den_t) < 1e-12
    assert _rel(num / den, ratio_t) < 1e-10


def test_wkv4_lse_closed_form_agrees_with_plain_closed_form():
    rng = np.random.default_rng(7)
    time_decay, time_first, key, value, state = _wkv4_data(rng, 6, True)
    ref, num_t, den_t = _wkv4_closed(time_decay, time_first, key, value, state)
    out, log_den_t, ratio_t = _wkv4_closed_lse(time_decay, time_first, key, value, state)
    assert _rel(out, ref) < 1e-12
    assert _rel(log_den_t, np.log(den_t)) < 1e-12
    assert _rel(ratio_t, num_t / den_t) < 1e-12


def test_wkv4_none_state_is_the_empty_state():
    rng = np.random.default_rng(8)
    time_decay, time_first, key, value, _ = _wkv4_data(rng)
    empty = (np.zeros((B, C)), np.zeros((B, C)), np.full((B, C), WKV4_EMPTY_MAX))
    out0, fin0 = wkv4_fwd(time_decay, time_first, key, value)
    out1, fin1 = wkv4_fwd(time_decay, time_first, key, value, empty)
    np.testing.assert_array_equal(out0, out1)
    for x, y in zip(fin0, fin1, strict=True):
        np.testing.assert_array_equal(x, y)


def test_wkv4_single_step():
    rng = np.random.default_rng(9)
    time_decay, time_first, key, value, _ = _wkv4_data(rng, 1)
    out, (num, den, mx) = wkv4_fwd(time_decay, time_first, key, value)
    np.testing.assert_allclose(out, value, rtol=1e-15, atol=0)
    np.testing.assert_allclose(num, value[:, 0], rtol=1e-15, atol=0)
    np.testing.assert_array_equal(den, np.ones((B, C)))
    np.testing.assert_array_equal(mx, key[:, 0])
    n0, d0, m0 = rng.normal(size=(B, C)), np.exp(rng.normal(size=(B, C))), rng.normal(size=(B, C))
    out, _ = wkv4_fwd(time_decay, time_first, key, value, (n0, d0, m0))
    e_cur = np.exp(time_first + key[:, 0])
    ref = (np.exp(m0) * n0 + e_cur * value[:, 0]) / (np.exp(m0) * d0 + e_cur)
    np.testing.assert_allclose(out[:, 0], ref, rtol=1e-13)


# WKV-6


@pytest.mark.parametrize("t_len", [T, 1])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_dstate", [False, True])
def test_wkv6_bwd_matches_finite_differences(t_len, with_state, with_dstate):
    rng = np.random.default_rng(600 + 4 * t_len + 2 * with_state + with_dstate)
    r, k, v, w, u, s0 = _wkv6_data(rng, t_len, with_state)
    scale = 0.7
    do = rng.normal(size=(B, t_len, H, V))
    dfin = rng.normal(size=(B, H, K, V)) if with_dstate else None

    def loss():
        o, fin = wkv6_fwd(r, k, v, w, u, scale, s0)
        return np.sum(do * o) + (0.0 if dfin is None else np.sum(dfin * fin))

    g = wkv6_bwd(do, r, k, v, w, u, scale, s0, dfin)
    assert set(g) == {"r", "k", "v", "w", "u", "initial_state"}
    inputs = {"r": r, "k": k, "v": v, "w": w, "u": u}
    if with_state:
        inputs["initial_state"] = s0
    else:
        assert g["initial_state"] is None
    _assert_fd(loss, inputs, g)


@pytest.mark.parametrize("w_min", [None, -20.0])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("scale", [1.0, K**-0.5])
def test_wkv6_fwd_matches_closed_form(w_min, with_state, scale):
    rng = np.random.default_rng(61)
    r, k, v, w, u, s0 = _wkv6_data(rng, 9, with_state, w_min)
    o, fin = wkv6_fwd(r, k, v, w, u, scale, s0)
    ref_o, ref_fin = _wkv6_closed(r, k, v, w, u, scale, s0)
    assert np.all(np.isfinite(o))
    assert np.all(np.isfinite(fin))
    assert _rel(o, ref_o) < 1e-12
    assert _rel(fin, ref_fin) < 1e-12


def test_wkv6_single_step():
    rng = np.random.default_rng(62)
    r, k, v, w, u, s0 = _wkv6_data(rng, 1, True)
    o, fin = wkv6_fwd(r, k, v, w, u, 0.5, s0)
    kv = k[:, 0, :, :, None] * v[:, 0, :, None, :]
    ref = 0.5 * np.einsum("bhk,bhkv->bhv", r[:, 0], s0 + u[:, :, None] * kv)
    np.testing.assert_allclose(o[:, 0], ref, rtol=1e-13)
    np.testing.assert_allclose(fin, np.exp(w[:, 0])[..., None] * s0 + kv, rtol=1e-13)


# WKV-7


@pytest.mark.parametrize("t_len", [T, 1])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_dstate", [False, True])
def test_wkv7_bwd_matches_finite_differences(t_len, with_state, with_dstate):
    rng = np.random.default_rng(700 + 4 * t_len + 2 * with_state + with_dstate)
    r, w, k, v, a, b, s0 = _wkv7_data(rng, t_len, with_state, rwkv_ab=False)
    scale = 0.7
    do = rng.normal(size=(B, t_len, H, V))
    dfin = rng.normal(size=(B, H, K, V)) if with_dstate else None

    def loss():
        o, fin = wkv7_fwd(r, w, k, v, a, b, scale, s0)
        return np.sum(do * o) + (0.0 if dfin is None else np.sum(dfin * fin))

    g = wkv7_bwd(do, r, w, k, v, a, b, scale, s0, dfin)
    assert set(g) == {"r", "w", "k", "v", "a", "b", "initial_state"}
    inputs = {"r": r, "w": w, "k": k, "v": v, "a": a, "b": b}
    if with_state:
        inputs["initial_state"] = s0
    else:
        assert g["initial_state"] is None
    _assert_fd(loss, inputs, g)


@pytest.mark.parametrize("w_min", [None, -20.0])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("rwkv_ab", [True, False])
def test_wkv7_fwd_matches_closed_form(w_min, with_state, rwkv_ab):
    rng = np.random.default_rng(71)
    r, w, k, v, a, b, s0 = _wkv7_data(rng, 9, with_state, w_min, rwkv_ab)
    o, fin = wkv7_fwd(r, w, k, v, a, b, 0.8, s0)
    ref_o, ref_fin = _wkv7_closed(r, w, k, v, a, b, 0.8, s0)
    assert np.all(np.isfinite(o))
    assert np.all(np.isfinite(fin))
    assert _rel(o, ref_o) < 1e-12
    assert _rel(fin, ref_fin) < 1e-12


def test_wkv7_reads_the_undecayed_state():
    # with a zero decay (w = -inf) only b (a^T S_{t-1}) + k v^T survives: a sees S before decay
    rng = np.random.default_rng(72)
    r, _, k, v, a, b, s0 = _wkv7_data(rng, 1, True)
    w = np.full_like(r, -np.inf)
    o, fin = wkv7_fwd(r, w, k, v, a, b, 1.0, s0)
    sa = np.einsum("bhk,bhkv->bhv", a[:, 0], s0)
    ref = b[:, 0, :, :, None] * sa[:, :, None, :] + k[:, 0, :, :, None] * v[:, 0, :, None, :]
    np.testing.assert_allclose(fin, ref, rtol=1e-13)
    np.testing.assert_allclose(o[:, 0], np.einsum("bhk,bhkv->bhv", r[:, 0], ref), rtol=1e-13)


def test_wkv7_single_step():
    rng = np.random.default_rng(73)
    r, w, k, v, a, b, s0 = _wkv7_data(rng, 1, True)
    o, fin = wkv7_fwd(r, w, k, v, a, b, 0.5, s0)
    sa = np.einsum("bhk,bhkv->bhv", a[:, 0], s0)
    s1 = (
        np.exp(w[:, 0])[..., None] * s0
        + b[:, 0, :, :, None] * sa[:, :, None, :]
        + k[:, 0, :, :, None] * v[:, 0, :, None, :]
    )
    np.testing.assert_allclose(fin, s1, rtol=1e-13)
    np.testing.assert_allclose(o[:, 0], 0.5 * np.einsum("bhk,bhkv->bhv", r[:, 0], s1), rtol=1e-13)


# continuation: [0:T1] then [T1:T] from the returned state equals one run, forward and backward


def _cat_check(whole, first, second, split_names, summed_names):
    for name in split_names:
        np.testing.assert_allclose(
            np.concatenate([first[name], second[name]], axis=1), whole[name], rtol=1e-11, atol=1e-13
        )
    for name in summed_names:
        np.testing.assert_allclose(first[name] + second[name], whole[name], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("with_state", [False, True])
def test_wkv4_continuation(with_state):
    rng = np.random.default_rng(40 + with_state)
    td, tf, key, value, state = _wkv4_data(rng, 8, with_state)
    t1 = 3
    dout = rng.normal(size=key.shape)
    dfin = tuple(rng.normal(size=(B, C)) for _ in range(3))
    out, fin = wkv4_fwd(td, tf, key, value, state)
    out1, mid = wkv4_fwd(td, tf, key[:, :t1], value[:, :t1], state)
    out2, fin2 = wkv4_fwd(td, tf, key[:, t1:], value[:, t1:], mid)
    np.testing.assert_allclose(np.concatenate([out1, out2], 1), out, rtol=1e-12)
    for x, y in zip(fin2, fin, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12)

    whole = wkv4_bwd(dout, td, tf, key, value, state, dfin)
    second = wkv4_bwd(dout[:, t1:], td, tf, key[:, t1:], value[:, t1:], mid, dfin)
    first = wkv4_bwd(dout[:, :t1], td, tf, key[:, :t1], value[:, :t1], state, second["state"])
    _cat_check(whole, first, second, ("key", "value"), ("time_decay", "time_first"))
    if with_state:
        for x, y in zip(first["state"], whole["state"], strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("with_state", [False, True])
def test_wkv6_continuation(with_state):
    rng = np.random.default_rng(66 + with_state)
    r, k, v, w, u, s0 = _wkv6_data(rng, 8, with_state)
    t1 = 3
    do, dfin = rng.normal(size=(B, 8, H, V)), rng.normal(size=(B, H, K, V))
    parts = [(x[:, :t1], x[:, t1:]) for x in (r, k, v, w)]
    o, fin = wkv6_fwd(r, k, v, w, u, 0.9, s0)
    o1, mid = wkv6_fwd(*(p[0] for p in parts), u, 0.9, s0)
    o2, fin2 = wkv6_fwd(*(p[1] for p in parts), u, 0.9, mid)
    np.testing.assert_allclose(np.concatenate([o1, o2], 1), o, rtol=1e-12)
    np.testing.assert_allclose(fin2, fin, rtol=1e-12)

    whole = wkv6_bwd(do, r, k, v, w, u, 0.9, s0, dfin)
    second = wkv6_bwd(do[:, t1:], *(p[1] for p in parts), u, 0.9, mid, dfin)
    first = wkv6_bwd(do[:, :t1], *(p[0] for p in parts), u, 0.9, s0, second["initial_state"])
    _cat_check(whole, first, second, ("r", "k", "v", "w"), ("u",))
    if with_state:
        np.testing.assert_allclose(first["initial_state"], whole["initial_state"], rtol=1e-11)


@pytest.mark.parametrize("with_state", [False, True])
def test_wkv7_continuation(with_state):
    rng = np.random.default_rng(77 + with_state)
    r, w, k, v, a, b, s0 = _wkv7_data(rng, 8, with_state)
    t1 = 3
    do, dfin = rng.normal(size=(B, 8, H, V)), rng.normal(size=(B, H, K, V))
    parts = [(x[:, :t1], x[:, t1:]) for x in (r, w, k, v, a, b)]
    o, fin = wkv7_fwd(r, w, k, v, a, b, 0.9, s0)
    o1, mid = wkv7_fwd(*(p[0] for p in parts), 0.9, s0)
    o2, fin2 = wkv7_fwd(*(p[1] for p in parts), 0.9, mid)
    np.testing.assert_allclose(np.concatenate([o1, o2], 1), o, rtol=1e-12)
    np.testing.assert_allclose(fin2, fin, rtol=1e-12)

    whole = wkv7_bwd(do, r, w, k, v, a, b, 0.9, s0, dfin)
    second = wkv7_bwd(do[:, t1:], *(p[1] for p in parts), 0.9, mid, dfin)
    first = wkv7_bwd(do[:, :t1], *(p[0] for p in parts), 0.9, s0, second["initial_state"])
    _cat_check(whole, first, second, ("r", "w", "k", "v", "a", "b"), ())
    if with_state:
        np.testing.assert_allclose(first["initial_state"], whole["initial_state"], rtol=1e-11)


# dtypes and argument checking


def test_float32_inputs_compute_in_float64():
    rng = np.random.default_rng(5)
    td, tf, key, value, _ = _wkv4_data(rng)
    f32 = [x.astype(np.float32) for x in (td, tf, key, value)]
    out, fin = wkv4_fwd(*f32)
    ref, _ = wkv4_fwd(*(x.astype(np.float64) for x in f32))
    assert out.dtype == np.float64
    assert all(x.dtype == np.float64 for x in fin)
    np.testing.assert_array_equal(out, ref)
    o, fin = wkv6_fwd(*(x.astype(np.float32) for x in _wkv6_data(rng)[:5]))
    assert o.dtype == np.float64
    assert fin.dtype == np.float64
    o, fin = wkv7_fwd(*(x.astype(np.float32) for x in _wkv7_data(rng)[:6]))
    assert o.dtype == np.float64
    assert fin.dtype == np.float64


def _wkv4_args():
    rng = np.random.default_rng(0)
    td, tf, key, value, state = _wkv4_data(rng, with_state=True)
    return {"time_decay": td, "time_first": tf, "key": key, "value": value, "state": state}


def _wkv6_args():
    r, k, v, w, u, s0 = _wkv6_data(np.random.default_rng(0), with_state=True)
    return {"r": r, "k": k, "v": v, "w": w, "u": u, "initial_state": s0}


def _wkv7_args():
    r, w, k, v, a, b, s0 = _wkv7_data(np.random.default_rng(0), with_state=True)
    return {"r": r, "w": w, "k": k, "v": v, "a": a, "b": b, "initial_state": s0}


_BAD_STATE = (np.zeros((B, C)), np.zeros((B, C + 1)), np.zeros((B, C)))
_SHAPE_CASES = [
    (wkv4_fwd, _wkv4_args, {"key": np.zeros((B, T))}, "key"),
    (wkv4_fwd, _wkv4_args, {"value": np.zeros((B, T + 1, C))}, "value"),
    (wkv4_fwd, _wkv4_args, {"time_decay": np.zeros(C + 1)}, "time_decay"),
    (wkv4_fwd, _wkv4_args, {"time_first": np.zeros((1, C))}, "time_first"),
    (wkv4_fwd, _wkv4_args, {"state": (np.zeros((B, C)),) * 2}, "state"),
    (wkv4_fwd, _wkv4_args, {"state": _BAD_STATE}, "state[1] (den)"),
    (wkv4_bwd, _wkv4_args, {"dout": np.zeros((B, T, C + 1))}, "dout"),
    (wkv4_bwd, _wkv4_args, {"dstate": _BAD_STATE}, "dstate[1] (den)"),
    (wkv6_fwd, _wkv6_args, {"r": np.zeros((B, T, H * K))}, "r"),
    (wkv6_fwd, _wkv6_args, {"k": np.zeros((B, T, H, K + 1))}, "k"),
    (wkv6_fwd, _wkv6_args, {"v": np.zeros((B, T + 1, H, V))}, "v"),
    (wkv6_fwd, _wkv6_args, {"w": np.zeros((B, T, H, K, 1))}, "w"),
    (wkv6_fwd, _wkv6_args, {"u": np.zeros((H, K + 1))}, "u"),
    (wkv6_fwd, _wkv6_args, {"initial_state": np.zeros((B, H, V, K))}, "initial_state"),
    (wkv6_bwd, _wkv6_args, {"do": np.zeros((B, T, H, K))}, "do"),
    (wkv6_bwd, _wkv6_args, {"dfinal_state": np.zeros((B, H, V, K))}, "dfinal_state"),
    (wkv7_fwd, _wkv7_args, {"r": np.zeros((B, T, H))}, "r"),
    (wkv7_fwd, _wkv7_args, {"w": np.zeros((B, T, H, K + 1))}, "w"),
    (wkv7_fwd, _wkv7_args, {"k": np.zeros((B, T, H + 1, K))}, "k"),
    (wkv7_fwd, _wkv7_args, {"v": np.zeros((B, T, H + 1, V))}, "v"),
    (wkv7_fwd, _wkv7_args, {"a": np.zeros((B, T, H, K + 1))}, "a"),
    (wkv7_fwd, _wkv7_args, {"b": np.zeros((B + 1, T, H, K))}, "b"),
    (wkv7_fwd, _wkv7_args, {"initial_state": np.zeros((B, H, K))}, "initial_state"),
    (wkv7_bwd, _wkv7_args, {"do": np.zeros((B, T, H, V + 1))}, "do"),
    (wkv7_bwd, _wkv7_args, {"dfinal_state": np.zeros((B, H, K, V + 1))}, "dfinal_state"),
]


@pytest.mark.parametrize(
    ("fn", "make_args", "bad", "name"),
    _SHAPE_CASES,
    ids=[f"{case[0].__name__}-{case[3]}" for case in _SHAPE_CASES],
)
def test_shape_errors_name_the_argument(fn, make_args, bad, name):
    args = make_args()
    if fn.__name__.endswith("_bwd"):
        out_shape = (B, T, C) if fn is wkv4_bwd else (B, T, H, V)
        args = {("dout" if fn is wkv4_bwd else "do"): np.zeros(out_shape), **args}
    args.update(bad)
    with pytest.raises(ValueError, match="^" + re.escape(name) + " "):
        fn(**args)
