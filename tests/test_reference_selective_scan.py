"""Tests of the NumPy float64 selective-scan reference: forward, hand-written backward, decode.

Backwards are checked against central finite differences of the scalar
``loss = sum(dout * out) + sum(dlast * last_state)``; the forward against an unrolled closed form.
"""

from __future__ import annotations

import numpy as np
import pytest

from scanopt.reference.selective_scan import (
    selective_scan_bwd,
    selective_scan_fwd,
    selective_state_update_bwd,
    selective_state_update_fwd,
)

BATCH, DIM, N, L = 2, 4, 3, 5
FD_EPS = 1e-6
FD_RTOL = 1e-6

SCAN_GRAD_KEYS = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"}
SSU_GRAD_KEYS = {"state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias"}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _bc(rng, kind, batch, dim, n, seqlen):
    """A random B or C in layout ``kind``: "fixed", "var" or "grpK" (K groups)."""
    if kind == "fixed":
        return rng.standard_normal((dim, n))
    if kind == "var":
        return rng.standard_normal((batch, n, seqlen))
    return rng.standard_normal((batch, int(kind[3:]), n, seqlen))


def scan_inputs(
    rng,
    b_kind="var",
    c_kind="var",
    *,
    batch=BATCH,
    dim=DIM,
    n=N,
    seqlen=L,
    D=False,
    z=False,
    bias=False,
    softplus=False,
    init=False,
):
    """Random selective-scan inputs (kwargs for selective_scan_fwd)."""
    kw = {
        "u": rng.standard_normal((batch, dim, seqlen)),
        # positive step sizes when used raw; any sign when they go through softplus
        "delta": rng.standard_normal((batch, dim, seqlen))
        if softplus
        else rng.uniform(0.1, 0.8, (batch, dim, seqlen)),
        "A": -rng.uniform(0.2, 1.5, (dim, n)),
        "B": _bc(rng, b_kind, batch, dim, n, seqlen),
        "C": _bc(rng, c_kind, batch, dim, n, seqlen),
        "delta_softplus": softplus,
    }
    if D:
        kw["D"] = rng.standard_normal(dim)
    if z:
        kw["z"] = rng.standard_normal((batch, dim, seqlen))
    if bias:
        kw["delta_bias"] = rng.uniform(0.0, 0.5, dim)
    if init:
        kw["initial_state"] = rng.standard_normal((batch, dim, n))
    return kw


def fd_grad(loss, inputs: dict, name: str, eps: float = FD_EPS) -> np.ndarray:
    """Central finite difference of ``loss(inputs)`` w.r.t. ``inputs[name]`` (float64)."""
    base = np.array(inputs[name], dtype=np.float64)
    grad = np.empty_like(base)
    for idx in np.ndindex(base.shape):
        vals = []
        for sign in (1.0, -1.0):
            pert = base.copy()
            pert[idx] += sign * eps
            vals.append(loss({**inputs, name: pert}))
        grad[idx] = (vals[0] - vals[1]) / (2 * eps)
    return grad


def assert_grad_close(analytic, fd, name):
    assert analytic is not None, f"missing gradient for {name}"
    assert analytic.shape == fd.shape, f"{name}: shape {analytic.shape} != {fd.shape}"
    assert analytic.dtype == np.float64, name
    fd_norm = np.linalg.norm(fd)
    assert fd_norm > 1e-8, f"{name}: finite-difference gradient is ~0, the check is vacuous"
    rel = np.linalg.norm(analytic - fd) / fd_norm
    assert rel < FD_RTOL, f"{name}: relative error {rel:.3e} vs finite differences"


def check_scan_grads(kw, rng, with_dlast):
    out, last = selective_scan_fwd(**kw)
    dout = rng.standard_normal(out.shape)
    dlast = rng.standard_normal(last.shape) if with_dlast else None

    def loss(inp):
        o, s = selective_scan_fwd(**inp)
        val = np.sum(dout * o)
        return val + (np.sum(dlast * s) if dlast is not None else 0.0)

    grads = selective_scan_bwd(dout, **kw, dlast_state=dlast)
    assert set(grads) == SCAN_GRAD_KEYS
    for name in sorted(SCAN_GRAD_KEYS):
        if kw.get(name) is None:
            assert grads[name] is None, f"{name} was None but got a gradient"
            continue
        assert_grad_close(grads[name], fd_grad(loss, kw, name), name)


def softplus_ref(x):
    return np.where(x > 20.0, x, np.log(1.0 + np.exp(np.minimum(x, 20.0))))


def scan_closed_form(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                     initial_state=None):  # fmt: skip
    """Unrolled O(L^2) sum, no recurrence: y_l = sum_s C_l (prod_{r=s+1..l} e^{dt_r A}) dt_s B_s u_s
    + C_l (prod_{r=0..l} e^{dt_r A}) x_{-1}."""
    batch, dim, seqlen = u.shape
    n = A.shape[1]
    dt = delta + (0.0 if delta_bias is None else delta_bias[:, None])
    if delta_softplus:
        dt = softplus_ref(dt)

    def coef(M, b, d, s):  # (n,) vector for channel d at time s
        if M.ndim == 2:
            return M[d]
        if M.ndim == 3:
            return M[b, :, s]
        return M[b, d // (dim // M.shape[1]), :, s]

    x0 = np.zeros((batch, dim, n)) if initial_state is None else initial_state
    out = np.zeros((batch, dim, seqlen))
    for b in range(batch):
        for d in range(dim):
            for t in range(seqlen):
                c = coef(C, b, d, t)
                acc = 0.0
                for s in range(t + 1):
                    decay = np.ones(n)
                    for r in range(s + 1, t + 1):
                        decay = decay * np.exp(dt[b, d, r] * A[d])
                    acc += np.sum(c * decay * dt[b, d, s] * coef(B, b, d, s) * u[b, d, s])
                full = np.ones(n)
                for r in range(t + 1):
                    full = full * np.exp(dt[b, d, r] * A[d])
                acc += np.sum(c * full * x0[b, d])
                if D is not None:
                    acc += D[d] * u[b, d, t]
                if z is not None:
                    acc *= z[b, d, t] / (1.0 + np.exp(-z[b, d, t]))
                out[b, d, t] = acc
    return out


def seq_slice(kw, lo, hi):
    """Inputs restricted to time steps [lo, hi)."""
    res = dict(kw)
    for name in ("u", "delta", "z"):
        if kw.get(name) is not None:
            res[name] = kw[name][..., lo:hi]
    for name in ("B", "C"):
        if kw[name].ndim >= 3:
            res[name] = kw[name][..., lo:hi]
    return res


BC_LAYOUTS = [
    ("fixed", "fixed"),
    ("var", "var"),
    ("grp2", "grp2"),
    ("fixed", "var"),
    ("var", "grp2"),
    ("grp4", "fixed"),
]
OPTION_SETS = {
    "plain": {},
    "all": dict(D=True, z=True, bias=True, softplus=True, init=True),
    "D": dict(D=True),
    "z": dict(z=True),
    "bias": dict(bias=True),
    "softplus": dict(softplus=True),
    "bias_softplus": dict(bias=True, softplus=True),
    "init": dict(init=True),
}


# ----------------------------------------------------------------------------------------------
# selective scan: backward vs finite differences
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", list(OPTION_SETS), ids=list(OPTION_SETS))
@pytest.mark.parametrize("layout", BC_LAYOUTS, ids=["-".join(x) for x in BC_LAYOUTS])
def test_scan_bwd_matches_fd(layout, opts):
    rng = np.random.default_rng([11, BC_LAYOUTS.index(layout), list(OPTION_SETS).index(opts)])
    kw = scan_inputs(rng, *layout, **OPTION_SETS[opts])
    check_scan_grads(kw, rng, with_dlast=True)


@pytest.mark.parametrize("with_init", [False, True])
def test_scan_bwd_without_dlast(with_init):
    rng = np.random.default_rng([12, with_init])
    kw = scan_inputs(rng, "grp2", "var", D=True, z=True, init=with_init)
    check_scan_grads(kw, rng, with_dlast=False)


def test_scan_bwd_softplus_above_threshold():
    # delta' > 20 takes the identity branch of softplus (derivative 1)
    rng = np.random.default_rng(13)
    kw = scan_inputs(rng, "var", "fixed", bias=True, softplus=True, init=True)
    kw["delta"] = kw["delta"] + np.where(rng.random(kw["delta"].shape) < 0.5, 23.0, 0.0)
    kw["A"] = kw["A"] * 0.05  # keep exp(delta' A) away from 0 so every gradient is visible
    check_scan_grads(kw, rng, with_dlast=True)


@pytest.mark.parametrize("shape", [(1, 4, 3, 1), (2, 4, 1, 5), (2, 2, 1, 1), (1, 3, 2, 6)], ids=str)
def test_scan_bwd_edge_shapes(shape):
    batch, dim, n, seqlen = shape
    rng = np.random.default_rng([14, *shape])
    b_kind = "grp2" if dim % 2 == 0 else "var"
    kw = scan_inputs(rng, b_kind, "fixed", batch=batch, dim=dim, n=n, seqlen=seqlen,
                     **OPTION_SETS["all"])  # fmt: skip
    check_scan_grads(kw, rng, with_dlast=True)


def test_scan_bwd_only_dlast():
    # zero dout: every gradient comes through the last state alone
    rng = np.random.default_rng(15)
    kw = scan_inputs(rng, "var", "var", init=True, bias=True)
    dlast = rng.standard_normal((BATCH, DIM, N))
    grads = selective_scan_bwd(np.zeros((BATCH, DIM, L)), **kw, dlast_state=dlast)

    def loss(inp):
        return np.sum(dlast * selective_scan_fwd(**inp)[1])

    for name in ("u", "delta", "A", "B", "initial_state", "delta_bias"):
        assert_grad_close(grads[name], fd_grad(loss, kw, name), name)
    np.testing.assert_array_equal(grads["C"], 0.0)


# ----------------------------------------------------------------------------------------------
# selective scan: forward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", ["plain", "all", "bias_softplus", "init"])
@pytest.mark.parametrize("layout", BC_LAYOUTS, ids=["-".join(x) for x in BC_LAYOUTS])
def test_scan_fwd_matches_closed_form(layout, opts):
    rng = np.random.default_rng([21, BC_LAYOUTS.index(layout), list(OPTION_SETS).index(opts)])
    kw = scan_inputs(rng, *layout, seqlen=6, **OPTION_SETS[opts])
    out, last = selective_scan_fwd(**kw)
    assert out.shape == (BATCH, DIM, 6) and out.dtype == np.float64
    assert last.shape == (BATCH, DIM, N) and last.dtype == np.float64
    np.testing.assert_allclose(out, scan_closed_form(**kw), rtol=1e-12, atol=1e-12)


def test_scan_fwd_last_state_closed_form():
    # last_state = sum_s (prod_{r>s} e^{dt_r A}) dt_s B_s u_s + (prod_r e^{dt_r A}) x_{-1}
    rng = np.random.default_rng(22)
    kw = scan_inputs(rng, "grp2", "fixed", init=True, bias=True, softplus=True)
    _, last = selective_scan_fwd(**kw)
    dt = softplus_ref(kw["delta"] + kw["delta_bias"][:, None])
    A, B, u = kw["A"], kw["B"], kw["u"]
    expect = np.zeros((BATCH, DIM, N))
    for b in range(BATCH):
        for d in range(DIM):
            g = d // (DIM // B.shape[1])
            expect[b, d] = np.exp(dt[b, d].sum() * A[d]) * kw["initial_state"][b, d]
            for s in range(L):
                decay = np.exp(dt[b, d, s + 1 :].sum() * A[d])
                expect[b, d] += decay * dt[b, d, s] * B[b, g, :, s] * u[b, d, s]
    np.testing.assert_allclose(last, expect, rtol=1e-12, atol=1e-12)


def test_scan_fwd_initial_state_none_is_zeros():
    rng = np.random.default_rng(23)
    kw = scan_inputs(rng, "var", "grp2", D=True, z=True)
    out0, last0 = selective_scan_fwd(**kw)
    out1, last1 = selective_scan_fwd(**kw, initial_state=np.zeros((BATCH, DIM, N)))
    np.testing.assert_array_equal(out0, out1)
    np.testing.assert_array_equal(last0, last1)
    grads = selective_scan_bwd(rng.standard_normal(out0.shape), **kw)
    assert grads["initial_state"] is None and grads["delta_bias"] is None


def test_scan_fwd_softplus_threshold():
    rng = np.random.default_rng(24)
    kw = scan_inputs(rng, "var", "var")
    kw["delta"] = kw["delta"] + 25.0  # all above the threshold: softplus is the identity
    kw["A"] = kw["A"] * 0.02
    out_sp, _ = selective_scan_fwd(**{**kw, "delta_softplus": True})
    out_id, _ = selective_scan_fwd(**{**kw, "delta_softplus": False})
    np.testing.assert_array_equal(out_sp, out_id)
    kw["delta"] = np.full_like(kw["delta"], 20.0)  # at the threshold: log1p(exp(20))
    out_sp, _ = selective_scan_fwd(**{**kw, "delta_softplus": True})
    out_ref, _ = selective_scan_fwd(
        **{**kw, "delta": np.full_like(kw["delta"], np.log1p(np.exp(20.0)))}
    )
    np.testing.assert_allclose(out_sp, out_ref, rtol=1e-15)
    assert not np.array_equal(out_sp, selective_scan_fwd(**kw)[0])


def test_scan_fwd_variable_equals_one_group_and_fixed_broadcast():
    # G=1 grouped == variable; a variable B constant over batch/time == the fixed B
    rng = np.random.default_rng(25)
    kw = scan_inputs(rng, "var", "var", D=True)
    out_v, last_v = selective_scan_fwd(**kw)
    out_g, last_g = selective_scan_fwd(**{**kw, "B": kw["B"][:, None], "C": kw["C"][:, None]})
    np.testing.assert_allclose(out_v, out_g, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(last_v, last_g, rtol=1e-14, atol=1e-14)
    # grouped with G == dim: one channel per group == fixed B when B is constant over (batch, L)
    B_fixed = rng.standard_normal((DIM, N))
    B_grp = np.broadcast_to(B_fixed[None, :, :, None], (BATCH, DIM, N, L))
    out_f, _ = selective_scan_fwd(**{**kw, "B": B_fixed})
    out_gd, _ = selective_scan_fwd(**{**kw, "B": B_grp})
    np.testing.assert_allclose(out_f, out_gd, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("layout", [("fixed", "var"), ("grp2", "grp2"), ("var", "fixed")], ids=str)
@pytest.mark.parametrize("split", [1, 3, 6])
def test_scan_continuation(layout, split):
    rng = np.random.default_rng([26, split, *map(len, layout)])
    seqlen = 7
    kw = scan_inputs(rng, *layout, seqlen=seqlen, **OPTION_SETS["all"])
    out, last = selective_scan_fwd(**kw)
    first = seq_slice(kw, 0, split)
    out1, mid = selective_scan_fwd(**first)
    second = {**seq_slice(kw, split, seqlen), "initial_state": mid}
    out2, last2 = selective_scan_fwd(**second)
    np.testing.assert_allclose(np.concatenate([out1, out2], axis=-1), out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(last2, last, rtol=1e-12, atol=1e-13)

    # backward chains the same way: d initial_state of part 2 is the dlast_state of part 1
    dout = rng.standard_normal(out.shape)
    dlast = rng.standard_normal(last.shape)
    g = selective_scan_bwd(dout, **kw, dlast_state=dlast)
    g2 = selective_scan_bwd(dout[..., split:], **second, dlast_state=dlast)
    g1 = selective_scan_bwd(dout[..., :split], **first, dlast_state=g2["initial_state"])
    for name in ("u", "delta", "z"):
        np.testing.assert_allclose(
            np.concatenate([g1[name], g2[name]], axis=-1), g[name], rtol=1e-11, atol=1e-12
        )
    for name in ("A", "D", "delta_bias"):
        np.testing.assert_allclose(g1[name] + g2[name], g[name], rtol=1e-11, atol=1e-12)
    for name in ("B", "C"):
        if kw[name].ndim == 2:
            joined = g1[name] + g2[name]
        else:
            joined = np.concatenate([g1[name], g2[name]], axis=-1)
        np.testing.assert_allclose(joined, g[name], rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(g1["initial_state"], g["initial_state"], rtol=1e-11, atol=1e-12)


def test_scan_dtype_and_no_mutation():
    rng = np.random.default_rng(27)
    kw = scan_inputs(rng, "grp2", "var", **OPTION_SETS["all"])
    kw32 = {k: v.astype(np.float32) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    snapshot = {k: v.copy() for k, v in kw32.items() if isinstance(v, np.ndarray)}
    out, last = selective_scan_fwd(**kw32)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dlast = rng.standard_normal(last.shape).astype(np.float32)
    dlast_copy = dlast.copy()
    grads = selective_scan_bwd(dout, **kw32, dlast_state=dlast)
    assert out.dtype == last.dtype == np.float64
    assert all(g.dtype == np.float64 for g in grads.values())
    for k, v in snapshot.items():
        np.testing.assert_array_equal(kw32[k], v, err_msg=f"{k} was mutated")
    np.testing.assert_array_equal(dlast, dlast_copy)
    # float32 inputs are computed exactly as their float64 values
    kw64 = {k: v.astype(np.float64) if isinstance(v, np.ndarray) else v for k, v in kw32.items()}
    np.testing.assert_array_equal(out, selective_scan_fwd(**kw64)[0])
    # float64 inputs are not mutated either (no copy is made for them)
    snap64 = {k: v.copy() for k, v in kw.items() if isinstance(v, np.ndarray)}
    dl64 = rng.standard_normal(last.shape)
    dl64_copy = dl64.copy()
    selective_scan_bwd(rng.standard_normal(out.shape), **kw, dlast_state=dl64)
    for k, v in snap64.items():
        np.testing.assert_array_equal(kw[k], v, err_msg=f"{k} was mutated")
    np.testing.assert_array_equal(dl64, dl64_copy)


# ----------------------------------------------------------------------------------------------
# selective scan: validation
# ----------------------------------------------------------------------------------------------


def test_scan_group_count_must_divide_dim():
    rng = np.random.default_rng(31)
    kw = scan_inputs(rng, "grp3", "var")  # dim 4, G 3
    with pytest.raises(ValueError, match=r"^B: .*G=3.*dim=4"):
        selective_scan_fwd(**kw)
    kw = scan_inputs(rng, "var", "grp3")
    with pytest.raises(ValueError, match=r"^C: .*G=3"):
        selective_scan_bwd(np.zeros((BATCH, DIM, L)), **kw)


@pytest.mark.parametrize(
    "name, bad",
    [
        ("u", np.zeros((BATCH, DIM))),
        ("delta", np.zeros((BATCH, DIM, L + 1))),
        ("A", np.zeros((DIM + 1, N))),
        ("B", np.zeros((BATCH, N + 1, L))),
        ("B", np.zeros((DIM, N + 1))),
        ("C", np.zeros((BATCH, 2, N, L - 1))),
        ("C", np.zeros((1, 1, BATCH, 2, N, L))),
        ("D", np.zeros(DIM + 1)),
        ("z", np.zeros((BATCH, DIM, L - 1))),
        ("delta_bias", np.zeros((DIM, 1))),
        ("initial_state", np.zeros((BATCH, DIM, N + 1))),
        ("A", np.zeros((DIM, N), dtype=np.complex64)),
    ],
)
def test_scan_shape_errors_name_the_argument(name, bad):
    rng = np.random.default_rng(32)
    kw = {**scan_inputs(rng), name: bad}
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        selective_scan_fwd(**kw)


def test_scan_bwd_grad_shape_errors():
    rng = np.random.default_rng(33)
    kw = scan_inputs(rng)
    with pytest.raises(ValueError, match="^dout"):
        selective_scan_bwd(np.zeros((BATCH, DIM, L + 1)), **kw)
    with pytest.raises(ValueError, match="^dlast_state"):
        selective_scan_bwd(np.zeros((BATCH, DIM, L)), **kw, dlast_state=np.zeros((BATCH, DIM)))


def test_scan_empty_sequence_raises():
    rng = np.random.default_rng(34)
    kw = scan_inputs(rng, "fixed", "fixed")
    kw = {**kw, "u": kw["u"][..., :0], "delta": kw["delta"][..., :0]}
    with pytest.raises(ValueError, match="^u: sequence length"):
        selective_scan_fwd(**kw)


# ----------------------------------------------------------------------------------------------
# selective_state_update (decode step)
# ----------------------------------------------------------------------------------------------


def ssu_inputs(rng, *, heads=None, ngroups=1, batch=BATCH, dim=DIM, n=N, D=False, z=False,
               bias=False, softplus=False):  # fmt: skip
    """Random decode-step inputs; ``heads=None`` is the Mamba-1 layout without a head axis."""
    lead = () if heads is None else (heads,)
    kw = {
        "state": rng.standard_normal((batch, *lead, dim, n)),
        "x": rng.standard_normal((batch, *lead, dim)),
        "dt": rng.standard_normal((batch, *lead, dim))
        if softplus
        else rng.uniform(0.1, 0.8, (batch, *lead, dim)),
        "A": -rng.uniform(0.2, 1.5, (*lead, dim, n)),
        "B": rng.standard_normal((batch, n) if heads is None else (batch, ngroups, n)),
        "C": rng.standard_normal((batch, n) if heads is None else (batch, ngroups, n)),
        "dt_softplus": softplus,
    }
    if D:
        kw["D"] = rng.standard_normal((*lead, dim))
    if z:
        kw["z"] = rng.standard_normal((batch, *lead, dim))
    if bias:
        kw["dt_bias"] = rng.uniform(0.0, 0.5, (*lead, dim))
    return kw


SSU_OPTS = {
    "plain": {},
    "all": dict(D=True, z=True, bias=True, softplus=True),
    "D_z": dict(D=True, z=True),
    "bias_softplus": dict(bias=True, softplus=True),
}


def as_scan_step(kw):
    """Map no-heads decode-step inputs onto selective_scan_fwd inputs with L=1."""
    scan = {
        "u": kw["x"][..., None],
        "delta": kw["dt"][..., None],
        "A": kw["A"],
        "B": kw["B"][..., None],
        "C": kw["C"][..., None],
        "D": kw.get("D"),
        "delta_bias": kw.get("dt_bias"),
        "delta_softplus": kw["dt_softplus"],
        "initial_state": kw["state"],
    }
    if kw.get("z") is not None:
        scan["z"] = kw["z"][..., None]
    return scan


@pytest.mark.parametrize("opts", list(SSU_OPTS))
def test_ssu_fwd_equals_scan_step(opts):
    rng = np.random.default_rng([41, list(SSU_OPTS).index(opts)])
    kw = ssu_inputs(rng, **SSU_OPTS[opts])
    out, new_state = selective_state_update_fwd(**kw)
    ref_out, ref_state = selective_scan_fwd(**as_scan_step(kw))
    assert out.shape == (BATCH, DIM) and new_state.shape == (BATCH, DIM, N)
    np.testing.assert_allclose(out, ref_out[..., 0], rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(new_state, ref_state, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("ngroups", [1, 2, 4])
def test_ssu_heads_fwd_equals_per_head_scan_step(ngroups):
    rng = np.random.default_rng([42, ngroups])
    nheads = 4
    kw = ssu_inputs(rng, heads=nheads, ngroups=ngroups, **SSU_OPTS["all"])
    out, new_state = selective_state_update_fwd(**kw)
    assert out.shape == (BATCH, nheads, DIM) and new_state.shape == (BATCH, nheads, DIM, N)
    for h in range(nheads):
        g = h // (nheads // ngroups)
        head = {
            "state": kw["state"][:, h], "x": kw["x"][:, h], "dt": kw["dt"][:, h],
            "A": kw["A"][h], "B": kw["B"][:, g], "C": kw["C"][:, g], "D": kw["D"][h],
            "z": kw["z"][:, h], "dt_bias": kw["dt_bias"][h], "dt_softplus": True,
        }  # fmt: skip
        ref_out, ref_state = selective_scan_fwd(**as_scan_step(head))
        np.testing.assert_allclose(out[:, h], ref_out[..., 0], rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(new_state[:, h], ref_state, rtol=1e-13, atol=1e-14)


def check_ssu_grads(kw, rng, with_dnew):
    out, new_state = selective_state_update_fwd(**kw)
    dout = rng.standard_normal(out.shape)
    dnew = rng.standard_normal(new_state.shape) if with_dnew else None

    def loss(inp):
        o, s = selective_state_update_fwd(**inp)
        return np.sum(dout * o) + (np.sum(dnew * s) if dnew is not None else 0.0)

    grads = selective_state_update_bwd(dout, **kw, dnew_state=dnew)
    assert set(grads) == SSU_GRAD_KEYS
    for name in sorted(SSU_GRAD_KEYS):
        if kw.get(name) is None:
            assert grads[name] is None, f"{name} was None but got a gradient"
            continue
        assert_grad_close(grads[name], fd_grad(loss, kw, name), name)


@pytest.mark.parametrize("with_dnew", [True, False])
@pytest.mark.parametrize("opts", list(SSU_OPTS))
def test_ssu_bwd_no_heads_matches_fd(opts, with_dnew):
    rng = np.random.default_rng([43, list(SSU_OPTS).index(opts), with_dnew])
    check_ssu_grads(ssu_inputs(rng, **SSU_OPTS[opts]), rng, with_dnew)


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("opts", list(SSU_OPTS))
def test_ssu_bwd_heads_matches_fd(opts, ngroups):
    rng = np.random.default_rng([44, list(SSU_OPTS).index(opts), ngroups])
    kw = ssu_inputs(rng, heads=4, ngroups=ngroups, dim=3, **SSU_OPTS[opts])
    check_ssu_grads(kw, rng, with_dnew=True)


def test_ssu_heads_with_2d_bc_means_one_group():
    # upstream unsqueezes a (batch, N) B/C to (batch, 1, N) even when the state has heads
    rng = np.random.default_rng(45)
    kw = ssu_inputs(rng, heads=2, ngroups=1, D=True, z=True, bias=True)
    kw2 = {**kw, "B": kw["B"][:, 0], "C": kw["C"][:, 0]}
    out, st = selective_state_update_fwd(**kw)
    out2, st2 = selective_state_update_fwd(**kw2)
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(st, st2)
    check_ssu_grads(kw2, rng, with_dnew=True)


def test_ssu_tied_head_dim_broadcast():
    # Mamba-2 passes A, dt, dt_bias as stride-0 expands (one scalar per head); the math is the
    # same, and the full-shape gradients summed over the broadcast axes give the scalars' ones
    rng = np.random.default_rng(46)
    nheads, dim, n = 2, 3, N
    kw = ssu_inputs(rng, heads=nheads, ngroups=1, dim=dim, D=True, bias=True, softplus=True)
    a = -rng.uniform(0.2, 1.0, nheads)
    dt = rng.standard_normal((BATCH, nheads))
    bias = rng.uniform(0.0, 0.5, nheads)

    def expand(a_, dt_, bias_):
        return {
            **kw,
            "A": np.broadcast_to(a_[:, None, None], (nheads, dim, n)),
            "dt": np.broadcast_to(dt_[..., None], (BATCH, nheads, dim)),
            "dt_bias": np.broadcast_to(bias_[:, None], (nheads, dim)),
        }

    full = expand(a, dt, bias)
    out, new_state = selective_state_update_fwd(**full)
    dout = rng.standard_normal(out.shape)
    dnew = rng.standard_normal(new_state.shape)
    grads = selective_state_update_bwd(dout, **full, dnew_state=dnew)
    scalars = {"a": a, "dt": dt, "bias": bias}

    def loss(inp):
        o, s = selective_state_update_fwd(**expand(inp["a"], inp["dt"], inp["bias"]))
        return np.sum(dout * o) + np.sum(dnew * s)

    assert_grad_close(grads["A"].sum(axis=(1, 2)), fd_grad(loss, scalars, "a"), "A")
    assert_grad_close(grads["dt"].sum(axis=2), fd_grad(loss, scalars, "dt"), "dt")
    assert_grad_close(grads["dt_bias"].sum(axis=1), fd_grad(loss, scalars, "bias"), "dt_bias")


def test_ssu_no_mutation_and_dtype():
    rng = np.random.default_rng(47)
    for kw in (ssu_inputs(rng, **SSU_OPTS["all"]), ssu_inputs(rng, heads=2, **SSU_OPTS["all"])):
        kw32 = {k: v.astype(np.float32) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
        for inp in (kw, kw32):
            snap = {k: v.copy() for k, v in inp.items() if isinstance(v, np.ndarray)}
            out, new_state = selective_state_update_fwd(**inp)
            dnew = rng.standard_normal(new_state.shape)
            dnew_copy = dnew.copy()
            grads = selective_state_update_bwd(np.ones_like(out), **inp, dnew_state=dnew)
            assert out.dtype == new_state.dtype == np.float64
            assert all(g.dtype == np.float64 for g in grads.values())
            assert not np.allclose(new_state, inp["state"])
            for k, v in snap.items():
                np.testing.assert_array_equal(inp[k], v, err_msg=f"{k} was mutated")
            np.testing.assert_array_equal(dnew, dnew_copy)


@pytest.mark.parametrize(
    "heads, name, bad",
    [
        (None, "x", np.zeros((BATCH, DIM + 1))),
        (None, "dt", np.zeros((BATCH, DIM, 1))),
        (None, "A", np.zeros((DIM, N + 1))),
        (None, "B", np.zeros((BATCH, N + 1))),
        (None, "C", np.zeros((BATCH + 1, N))),
        (None, "D", np.zeros(DIM + 1)),
        (None, "z", np.zeros((BATCH, DIM - 1))),
        (None, "dt_bias", np.zeros((2, DIM))),
        (4, "B", np.zeros((BATCH, 3, N))),  # 4 heads, 3 groups
        (4, "C", np.zeros((BATCH, 1, N))),  # B has 2 groups, C 1
        (4, "A", np.zeros((DIM, N))),  # a 2-D A means one head
        (4, "dt_bias", np.zeros(DIM)),
        (4, "state", np.zeros((BATCH, 4, DIM, N, 1))),
    ],
)
def test_ssu_shape_errors_name_the_argument(heads, name, bad):
    rng = np.random.default_rng(48)
    kw = ssu_inputs(rng, heads=heads, ngroups=2 if heads else 1, D=True, z=True, bias=True)
    kw[name] = bad
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        selective_state_update_fwd(**kw)
