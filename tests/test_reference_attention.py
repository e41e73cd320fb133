"""Tests for the NumPy float64 attention reference (scanopt/reference/attention.py).

- backward vs central finite differences (masks, windows, softcap, GQA/MQA, dlse cotangent);
- forward vs a per-row Python closed form and vs torch SDPA in float64 (when torch is importable);
- invariants (convex combinations of v rows, logsumexp, flash-attn's documented causal masks);
- shape/option validation errors that name the argument.
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

try:
    from scanopt.reference.attention import attention_bwd, attention_fwd
except ImportError:  # a sibling reference module is missing: load this one on its own
    _path = Path(__file__).resolve().parents[1] / "scanopt" / "reference" / "attention.py"
    _spec = importlib.util.spec_from_file_location("_scanopt_reference_attention", _path)
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    attention_fwd, attention_bwd = _mod.attention_fwd, _mod.attention_bwd

B, HQ, HK, LQ, LK, D, DV = 2, 4, 2, 5, 7, 3, 4

# (id, Lq, Lk, Hk, kwargs); Hq is always 4
CASES = [
    ("full", LQ, LK, HK, {}),
    ("causal_br_q<k", LQ, LK, HK, {"causal": True}),
    ("causal_br_q>k_empty_rows", LK, LQ, HK, {"causal": True}),
    ("causal_tl_q<k", LQ, LK, HK, {"causal": True, "causal_align": "top_left"}),
    ("causal_tl_q>k", LK, LQ, HK, {"causal": True, "causal_align": "top_left"}),
    ("window_2_1", LQ, LK, HK, {"window": (2, 1)}),
    ("window_0_0_q>k_empty_rows", LK, LQ, HK, {"window": (0, 0)}),
    ("window_left_only_causal", LQ, LK, HK, {"window": (1, -1), "causal": True}),
    ("window_right_only_tl", LK, LQ, HK, {"window": (-1, 1), "causal_align": "top_left"}),
    ("softcap", LQ, LK, HK, {"softcap": 0.7, "scale": 1.3}),
    ("softcap_causal_window", LK, LQ, HK, {"softcap": 1.5, "causal": True, "window": (2, -1)}),
    ("mqa", LQ, LK, 1, {}),
    ("mqa_causal", LK, LQ, 1, {"causal": True}),
    ("mha_window", LQ, LK, HQ, {"window": (1, 2)}),
]
CASE_IDS = [c[0] for c in CASES]


def _inputs(lq, lk, hk, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, HQ, lq, D))
    k = rng.standard_normal((B, hk, lk, D))
    v = rng.standard_normal((B, hk, lk, DV))
    dout = rng.standard_normal((B, HQ, lq, DV))
    dlse = rng.standard_normal((B, HQ, lq))
    return q, k, v, dout, dlse


def _allowed_keys(i, lq, lk, causal=False, causal_align="bottom_right", window=(-1, -1)):
    """Keys query i may attend, from flash-attn's docstring: the inclusive range
    [i + Lk - Lq - left, i + Lk - Lq + right] (offset 0 for top-left); causal sets right = 0."""
    left, right = window
    if causal:
        right = 0
    diag = i + (lk - lq if causal_align == "bottom_right" else 0)
    lo = diag - left if left >= 0 else 0
    hi = diag + right if right >= 0 else lk - 1
    return [j for j in range(lk) if lo <= j <= hi]


def _bool_mask(lq, lk, **mask_kw):
    m = np.zeros((lq, lk), dtype=bool)
    for i in range(lq):
        m[i, _allowed_keys(i, lq, lk, **mask_kw)] = True
    return m


def _closed_form(q, k, v, scale=None, softcap=0.0, **mask_kw):
    """Per-row Python loop: list the allowed keys, softmax over them directly."""
    b_, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = np.zeros((b_, hq, lq, v.shape[3]))
    lse = np.full((b_, hq, lq), -np.inf)
    for b in range(b_):
        for h in range(hq):
            kh = h // (hq // hk)
            for i in range(lq):
                keys = _allowed_keys(i, lq, lk, **mask_kw)
                if not keys:
                    continue
                scores = []
                for j in keys:
                    s = scale * sum(q[b, h, i, c] * k[b, kh, j, c] for c in range(d))
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    scores.append(s)
                z = math.fsum(math.exp(s) for s in scores)
                lse[b, h, i] = math.log(z)
                for j, s in zip(keys, scores, strict=True):
                    out[b, h, i] += math.exp(s) / z * v[b, kh, j]
    return out, lse


def _split(kw):
    mask_kw = {n: kw[n] for n in ("causal", "causal_align", "window") if n in kw}
    return mask_kw, kw.get("scale"), kw.get("softcap", 0.0)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------- backward vs finite differences


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bwd_matches_central_finite_differences(case):
    _, lq, lk, hk, kw = case
    q, k, v, dout, dlse = _inputs(lq, lk, hk)
    _, lse0 = attention_fwd(q, k, v, **kw)
    finite = np.isfinite(lse0)

    def loss(qq, kk, vv):
        out, lse = attention_fwd(qq, kk, vv, **kw)
        return np.sum(dout * out) + np.sum(np.where(finite, dlse * lse, 0.0))

    grads = attention_bwd(dout, q, k, v, dlse=dlse, **kw)
    eps = 1e-5
    args = {"q": q, "k": k, "v": v}
    for name, x in args.items():
        fd = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            orig = x[idx]
            x[idx] = orig + eps
            lp = loss(args["q"], args["k"], args["v"])
            x[idx] = orig - eps
            lm = loss(args["q"], args["k"], args["v"])
            x[idx] = orig
            fd[idx] = (lp - lm) / (2 * eps)
        assert grads[name].shape == x.shape
        assert np.linalg.norm(fd) > 0
        assert _rel(grads[name], fd) < 1e-6, name
    if not finite.all():  # rows with no allowed key take no gradient
        assert np.all(grads["q"][~finite] == 0)


def test_bwd_dlse_none_equals_zero_and_ignores_empty_rows():
    q, k, v, dout, dlse = _inputs(LK, LQ, HK)
    kw = {"causal": True}  # bottom-right with Lq > Lk: rows 0 and 1 attend nothing
    g0 = attention_bwd(dout, q, k, v, **kw)
    gz = attention_bwd(dout, q, k, v, dlse=np.zeros_like(dlse), **kw)
    bad = dlse.copy()
    bad[:, :, :2] = np.nan  # cotangents on empty rows must not leak in
    gb = attention_bwd(dout, q, k, v, dlse=bad, **kw)
    gd = attention_bwd(dout, q, k, v, dlse=dlse, **kw)
    for n in "qkv":
        np.testing.assert_array_equal(g0[n], gz[n])
        assert np.all(np.isfinite(gb[n]))
    assert not np.allclose(gd["q"], g0["q"])


# ---------------------------------------------------------------- forward vs closed form / SDPA


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fwd_matches_closed_form(case):
    _, lq, lk, hk, kw = case
    q, k, v, _, _ = _inputs(lq, lk, hk, seed=1)
    mask_kw, scale, softcap = _split(kw)
    out, lse = attention_fwd(q, k, v, **kw)
    out_ref, lse_ref = _closed_form(q, k, v, scale=scale, softcap=softcap, **mask_kw)
    assert out.shape == (B, HQ, lq, DV) and lse.shape == (B, HQ, lq)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_ref))
    np.testing.assert_allclose(out, out_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-12, atol=1e-13)
    empty = ~np.isfinite(lse_ref)
    assert np.all(out[empty] == 0) and np.all(lse[empty] == -np.inf)


SDPA_CASES = [c for c in CASES if "softcap" not in c[4]]


@pytest.mark.parametrize("case", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_fwd_bwd_match_torch_sdpa(case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    _, lq, lk, hk, kw = case
    q, k, v, dout, _ = _inputs(lq, lk, hk, seed=2)
    mask_kw, scale, _ = _split(kw)
    mask = _bool_mask(lq, lk, **mask_kw)
    rows = mask.any(-1)  # compare rows that attend something (SDPA's empty-row output varies)
    dout[:, :, ~rows] = 0.0

    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    sdpa_kw = {"scale": scale, "enable_gqa": hk != HQ}
    if kw.get("causal") and kw.get("causal_align") == "top_left" and "window" not in kw:
        t_out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, **sdpa_kw)
    elif mask.all():
        t_out = F.scaled_dot_product_attention(tq, tk, tv, **sdpa_kw)
    else:
        t_out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.tensor(mask), **sdpa_kw)
    t_out.backward(torch.tensor(dout))

    out, _ = attention_fwd(q, k, v, **kw)
    np.testing.assert_allclose(
        out[:, :, rows], t_out.detach().numpy()[:, :, rows], rtol=1e-12, atol=1e-13
    )
    grads = attention_bwd(dout, q, k, v, **kw)
    for name, t in (("q", tq), ("k", tk), ("v", tv)):
        np.testing.assert_allclose(grads[name], t.grad.numpy(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_out_rows_are_convex_combinations_of_v_rows(case):
    _, lq, lk, hk, kw = case
    q, k, v, _, _ = _inputs(lq, lk, hk, seed=3)
    mask_kw, _, _ = _split(kw)
    eye = np.broadcast_to(np.eye(lk), (B, hk, lk, lk))
    p, lse = attention_fwd(q, k, eye, **kw)  # with v = I, out is the probability matrix
    out, _ = attention_fwd(q, k, v, **kw)
    mask = _bool_mask(lq, lk, **mask_kw)
    assert np.all(p >= 0)
    assert np.all(p[..., ~mask] == 0)
    row_sum = p.sum(-1)
    np.testing.assert_allclose(row_sum[..., mask.any(-1)], 1.0, rtol=0, atol=1e-14)
    assert np.all(row_sum[..., ~mask.any(-1)] == 0)
    ve = np.repeat(v, HQ // hk, axis=1)
    np.testing.assert_allclose(out, p @ ve, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_lse_matches_direct_logsumexp(case):
    _, lq, lk, hk, kw = case
    q, k, v, _, _ = _inputs(lq, lk, hk, seed=4)
    mask_kw, scale, softcap = _split(kw)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ke = np.repeat(k, HQ // hk, axis=1)
    s = scale * q @ np.swapaxes(ke, -1, -2)
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    mask = _bool_mask(lq, lk, **mask_kw)
    with np.errstate(divide="ignore"):
        direct = np.log(np.sum(np.exp(s) * mask, axis=-1))  # no max trick at this scale
    _, lse = attention_fwd(q, k, v, **kw)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(direct))
    np.testing.assert_allclose(lse, direct, rtol=1e-13, atol=1e-14)


def test_large_scores_stay_finite():
    q, k, v, _, _ = _inputs(LQ, LK, HK, seed=5)
    out, lse = attention_fwd(q * 1e4, k, v, causal=True)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
    ke = np.repeat(k, HQ // HK, axis=1)
    s = (q * 1e4) @ np.swapaxes(ke, -1, -2) / math.sqrt(D)
    s = np.where(_bool_mask(LQ, LK, causal=True), s, -np.inf)
    np.testing.assert_allclose(lse, s.max(-1), rtol=1e-12)  # one key dominates each row


def test_causal_masks_match_flash_attn_docstring_examples():
    """flash_attn_func docstring: Lq=2, Lk=5 and Lq=5, Lk=2, bottom-right aligned."""
    rng = np.random.default_rng(6)
    for lq, lk, expected in (
        (2, 5, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        (5, 2, [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]),
    ):
        q = rng.standard_normal((1, 1, lq, D))
        k = rng.standard_normal((1, 1, lk, D))
        p, _ = attention_fwd(q, k, np.eye(lk)[None, None], causal=True)
        np.testing.assert_array_equal(p[0, 0] > 0, np.array(expected, dtype=bool))
        p_tl, _ = attention_fwd(q, k, np.eye(lk)[None, None], causal=True, causal_align="top_left")
        np.testing.assert_array_equal(p_tl[0, 0] > 0, np.tril(np.ones((lq, lk), dtype=bool)))


def test_option_equivalences():
    q, k, v, _, _ = _inputs(LQ, LQ, HK, seed=7)
    br = attention_fwd(q, k, v, causal=True)
    tl = attention_fwd(q, k, v, causal=True, causal_align="top_left")
    np.testing.assert_array_equal(br[0], tl[0])  # Lq == Lk: both alignments coincide
    a = attention_fwd(q, k, v, causal=True, window=(2, 3))
    b = attention_fwd(q, k, v, window=(2, 0))
    np.testing.assert_array_equal(a[0], b[0])  # causal forces right = 0, keeps left
    big = attention_fwd(q, k, v, softcap=1e9)
    plain = attention_fwd(q, k, v)
    np.testing.assert_allclose(big[0], plain[0], rtol=1e-9)
    np.testing.assert_allclose(
        attention_fwd(q, k, v, scale=0.3)[1],
        attention_fwd(q * 0.3 * math.sqrt(D), k, v)[1],
        rtol=1e-12,
    )
    o32, l32 = attention_fwd(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    assert o32.dtype == np.float64 and l32.dtype == np.float64


def test_no_keys_gives_zero_out_and_minus_inf_lse():
    q = np.ones((1, 2, 3, D))
    out, lse = attention_fwd(q, np.ones((1, 1, 0, D)), np.ones((1, 1, 0, DV)))
    assert out.shape == (1, 2, 3, DV) and np.all(out == 0) and np.all(lse == -np.inf)


# ---------------------------------------------------------------- validation


def _good():
    q, k, v, dout, dlse = _inputs(LQ, LK, HK)
    return {"q": q, "k": k, "v": v}, dout, dlse


@pytest.mark.parametrize(
    "change, match",
    [
        ({"q": np.zeros((B, HQ, LQ))}, r"^q must be 4-D"),
        ({"k": np.zeros((B, HK, LK, D + 1))}, r"head dims differ: q .* k"),
        ({"k": np.zeros((B + 1, HK, LK, D)), "v": np.zeros((B + 1, HK, LK, DV))}, r"batch.*q.*k"),
        ({"k": np.zeros((B, 3, LK, D)), "v": np.zeros((B, 3, LK, DV))}, r"Hq=4.*Hk=3"),
        ({"v": np.zeros((B, 1, LK, DV))}, r"^v has 1 heads"),
        ({"v": np.zeros((B, HK, LK + 1, DV))}, r"^v has Lk=8"),
        ({"causal_align": "bottom-right"}, r"causal_align"),
        ({"window": (1, 2, 3)}, r"window"),
        ({"softcap": -1.0}, r"softcap"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(change, match):
    args, dout, _ = _good()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        attention_fwd(**args)
    with pytest.raises(ValueError, match=match):
        attention_bwd(dout, **args)


def test_bad_cotangents_raise_naming_the_argument():
    args, dout, dlse = _good()
    with pytest.raises(ValueError, match=r"^dout must have shape"):
        attention_bwd(dout[..., :-1], **args)
    with pytest.raises(ValueError, match=r"^dlse must have shape"):
        attention_bwd(dout, dlse=dlse[..., :-1], **args)
