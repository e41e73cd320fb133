"""Flash attention (scanopt.ops.attention): kernels vs the NumPy float64 reference.

CPU: the real Triton kernels under the interpreter (fp32, fp16; small odd shapes), forward, LSE
and every gradient, with the verification rule against the op's own PyTorch path as baseline.
Also the PyTorch backend, the fallbacks, bad inputs, torch.library registration and
torch.compile. GPU (``-m gpu``): bf16/fp16 up to L=16k, TMA path, determinism.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from scanopt.ops.attention import launch, op
from scanopt.ops.attention.op import flash_attn_func, scaled_dot_product_attention
from scanopt.reference import attention_bwd, attention_fwd
from scanopt.verify import Report, rel_l2

# (id, B, Hq, Hk, Lq, Lk, D, Dv, options)
FA_CASES = [
    ("L1", 1, 2, 1, 1, 1, 32, 32, {}),
    ("L1_q_vs_63k_causal", 1, 2, 2, 1, 63, 40, 40, {"causal": True}),
    ("63_causal_d64", 2, 2, 2, 63, 63, 64, 64, {"causal": True}),
    ("130q_63k_causal_d40_gqa", 1, 4, 2, 130, 63, 40, 40, {"causal": True}),
    ("63q_130k_causal_d80_mqa", 1, 3, 1, 63, 130, 80, 80, {"causal": True}),
    ("130_full_d80_gqa", 1, 4, 2, 130, 130, 80, 80, {}),
    ("window_16_8", 1, 2, 1, 70, 97, 32, 32, {"window": (16, 8)}),
    ("window_left_causal", 1, 2, 2, 97, 70, 40, 40, {"window": (10, -1), "causal": True}),
    ("window_right_only_q_gt_k", 1, 2, 1, 130, 63, 32, 32, {"window": (-1, 5)}),
    ("softcap_causal", 1, 2, 1, 63, 90, 64, 64, {"softcap": 2.5, "causal": True}),
    ("dv_ne_d_scale", 1, 2, 1, 50, 70, 32, 48, {"softmax_scale": 0.3}),
    # a negative scale: the forward keeps the scaled scores (SCALE_IN_EXP is off: its row max
    # of the raw scores needs a positive scale)
    ("negative_scale_causal", 1, 2, 1, 63, 70, 32, 32, {"softmax_scale": -0.4, "causal": True}),
]

# (id, B, Hq, Hk, Lq, Lk, D, options) for the SDPA contract (causal aligned top-left)
SDPA_CASES = [
    ("causal_q_gt_k", 1, 2, 2, 130, 63, 40, {"is_causal": True}),
    ("causal_q_lt_k_gqa", 1, 4, 2, 63, 130, 64, {"is_causal": True, "enable_gqa": True}),
    ("full_scale", 2, 2, 2, 63, 63, 80, {"scale": 0.2}),
]

DTYPES = [torch.float32, torch.float16]


def _randn(gen, *shape, dtype, device):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _np(t):
    return t.detach().cpu().double().numpy()


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _check_fa(b, hq, hk, lq, lk, d, dv, opts, dtype, device, seed=0, case=""):
    """flash_attn_func forward + backward (with an lse cotangent) against the reference."""
    gen = torch.Generator().manual_seed(seed)
    q = _randn(gen, b, lq, hq, d, dtype=dtype, device=device)
    k = _randn(gen, b, lk, hk, d, dtype=dtype, device=device)
    v = _randn(gen, b, lk, hk, dv, dtype=dtype, device=device)
    dout = _randn(gen, b, lq, hq, dv, dtype=dtype, device=device)
    dlse = _randn(gen, b, hq, lq, dtype=torch.float32, device=device)
    causal, window = opts.get("causal", False), opts.get("window", (-1, -1))
    softcap = opts.get("softcap", 0.0)
    scale = opts.get("softmax_scale", d**-0.5)

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse, s_dmask = flash_attn_func(
        qr, kr, vr, softmax_scale=opts.get("softmax_scale"), causal=causal, window_size=window,
        softcap=softcap, return_attn_probs=True,
    )  # fmt: skip
    assert out.shape == (b, lq, hq, dv) and lse.shape == (b, hq, lq) and s_dmask.numel() == 0
    torch.autograd.backward((out, lse), (dout, dlse))

    qh, kh, vh, doh = (t.transpose(1, 2) for t in (q, k, v, dout))
    diag, left, right = launch.mask_params(lq, lk, causal, True, *window)
    params = dict(scale=scale, diag=diag, left=left, right=right, softcap=softcap)
    b_out, b_lse = op.torch_attention_fwd(qh, kh, vh, **params)
    b_dq, b_dk, b_dv = op.torch_attention_bwd(doh, qh, kh, vh, b_out, b_lse, dlse, **params)

    kw = dict(scale=scale, causal=causal, window=window, softcap=softcap)
    r_out, r_lse = attention_fwd(_np(qh), _np(kh), _np(vh), **kw)
    g = attention_bwd(_np(doh), _np(qh), _np(kh), _np(vh), dlse=_np(dlse), **kw)

    report = Report("attention", f"flash_attn_func {case} {_name(dtype)}")
    report.check("out", out.transpose(1, 2), r_out, baseline=b_out)
    report.check("lse", lse, r_lse, baseline=b_lse, dtype=_name(dtype))
    report.check("dq", qr.grad.transpose(1, 2), g["q"], baseline=b_dq)
    report.check("dk", kr.grad.transpose(1, 2), g["k"], baseline=b_dk)
    report.check("dv", vr.grad.transpose(1, 2), g["v"], baseline=b_dv)
    report.assert_ok()
    return qr.grad, kr.grad, vr.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("case", FA_CASES, ids=[c[0] for c in FA_CASES])
def test_flash_attn_func_matches_reference(case, dtype, device):
    cid, b, hq, hk, lq, lk, d, dv, opts = case
    _check_fa(b, hq, hk, lq, lk, d, dv, opts, dtype, device, seed=len(cid), case=cid)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("case", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_matches_reference(case, dtype, device):
    cid, b, hq, hk, lq, lk, d, opts = case
    gen = torch.Generator().manual_seed(7)
    q = _randn(gen, b, hq, lq, d, dtype=dtype, device=device)
    k = _randn(gen, b, hk, lk, d, dtype=dtype, device=device)
    v = _randn(gen, b, hk, lk, d, dtype=dtype, device=device)
    dout = _randn(gen, b, hq, lq, d, dtype=dtype, device=device)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out = scaled_dot_product_attention(qr, kr, vr, **opts)
    out.backward(dout)

    causal = opts.get("is_causal", False)
    scale = opts.get("scale", d**-0.5)
    diag, left, right = launch.mask_params(lq, lk, causal, False, -1, -1)
    params = dict(scale=scale, diag=diag, left=left, right=right)
    b_out, b_lse = op.torch_attention_fwd(q, k, v, **params)
    b_dq, b_dk, b_dv = op.torch_attention_bwd(dout, q, k, v, b_out, b_lse, **params)
    kw = dict(scale=scale, causal=causal, causal_align="top_left")
    r_out, _ = attention_fwd(_np(q), _np(k), _np(v), **kw)
    g = attention_bwd(_np(dout), _np(q), _np(k), _np(v), **kw)

    report = Report("attention", f"sdpa {cid} {_name(dtype)}")
    report.check("out", out, r_out, baseline=b_out)
    report.check("dq", qr.grad, g["q"], baseline=b_dq)
    report.check("dk", kr.grad, g["k"], baseline=b_dk)
    report.check("dv", vr.grad, g["v"], baseline=b_dv)
    report.assert_ok()


def test_sdpa_layouts_3d_and_seq_first_memory(device):
    """A (B, L, H, D)-memory query keeps that memory in the output; 3-D inputs work."""
    gen = torch.Generator().manual_seed(3)
    b, h, lq, lk, d = 2, 3, 37, 45, 32
    qm = _randn(gen, b, lq, h, d, dtype=torch.float32, device=device)
    km = _randn(gen, b, lk, h, d, dtype=torch.float32, device=device)
    vm = _randn(gen, b, lk, h, d, dtype=torch.float32, device=device)
    q, k, v = (t.transpose(1, 2) for t in (qm, km, vm))
    out = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.transpose(1, 2).is_contiguous()
    r_out, _ = attention_fwd(_np(q), _np(k), _np(v), causal=True, causal_align="top_left")
    assert rel_l2(out, r_out) < 1e-5

    out3 = scaled_dot_product_attention(q[:, 0].contiguous(), k[:, 0], v[:, 0], is_causal=True)
    assert out3.shape == (b, lq, d)
    assert rel_l2(out3, r_out[:, 0]) < 1e-5


def test_non_contiguous_packed_qkv(device):
    """q/k/v as views into a packed (B, L, 3, H, D) tensor (only the last dim contiguous)."""
    gen = torch.Generator().manual_seed(5)
    qkv = _randn(gen, 2, 50, 3, 2, 40, dtype=torch.float16, device=device).requires_grad_()
    q, k, v = qkv.unbind(2)
    out = flash_attn_func(q, k, v, causal=True)
    dout = _randn(gen, *out.shape, dtype=torch.float16, device=device)
    out.backward(dout)
    qh, kh, vh, doh = (_np(t.transpose(1, 2)) for t in (q, k, v, dout))
    r_out, _ = attention_fwd(qh, kh, vh, causal=True)
    g = attention_bwd(doh, qh, kh, vh, causal=True)
    assert rel_l2(out.transpose(1, 2), r_out) < 1e-3
    for i, name in enumerate("qkv"):
        assert rel_l2(qkv.grad[:, :, i].transpose(1, 2), g[name]) < 1.5e-3, name


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_tma_descriptor_path(dtype, device, monkeypatch):
    """The tensor-descriptor (TMA) variant of every kernel, forced through the launchers."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm90+")
    gen = torch.Generator().manual_seed(11)
    b, hq, hk, lq, lk, d = 1, 4, 2, 70, 97, 40
    q = _randn(gen, b, hq, lq, d, dtype=dtype, device=device)
    k = _randn(gen, b, hk, lk, d, dtype=dtype, device=device)
    v = _randn(gen, b, hk, lk, d, dtype=dtype, device=device)
    dout = _randn(gen, b, hq, lq, d, dtype=dtype, device=device)
    diag, left, right = launch.mask_params(lq, lk, True, True, 20, -1)
    params = dict(scale=d**-0.5, diag=diag, left=left, right=right)
    fwd = launch.default_config("fwd", head_dim=d, dtype=dtype, device=device)
    bwd = launch.default_config("bwd", head_dim=d, dtype=dtype, device=device)
    fwd["USE_TMA"] = bwd["USE_TMA"] = True
    assert launch._tma_ok(q, k, v)
    out, lse = launch.attention_fwd(q, k, v, config=fwd, **params)
    dq, dk, dv = launch.attention_bwd(dout, q, k, v, out, lse, config=bwd, **params)
    kw = dict(scale=d**-0.5, causal=True, window=(20, -1))
    r_out, r_lse = attention_fwd(_np(q), _np(k), _np(v), **kw)
    g = attention_bwd(_np(dout), _np(q), _np(k), _np(v), **kw)
    b_out, b_lse = op.torch_attention_fwd(q, k, v, **params)
    b_dq, b_dk, b_dv = op.torch_attention_bwd(dout, q, k, v, b_out, b_lse, **params)
    report = Report("attention", f"tma {_name(dtype)}")
    report.check("out", out, r_out, baseline=b_out)
    report.check("lse", lse, r_lse, baseline=b_lse, dtype=_name(dtype))
    report.check("dq", dq, g["q"], baseline=b_dq)
    report.check("dk", dk, g["k"], baseline=b_dk)
    report.check("dv", dv, g["v"], baseline=b_dv)
    report.assert_ok()


def test_backward_is_deterministic(device):
    gen = torch.Generator().manual_seed(2)
    q = _randn(gen, 1, 70, 4, 32, dtype=torch.float16, device=device).requires_grad_()
    k = _randn(gen, 1, 70, 1, 32, dtype=torch.float16, device=device).requires_grad_()
    v = _randn(gen, 1, 70, 1, 32, dtype=torch.float16, device=device).requires_grad_()
    dout = _randn(gen, 1, 70, 4, 32, dtype=torch.float16, device=device)
    grads = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        flash_attn_func(q, k, v, causal=True, deterministic=False).backward(dout)
        grads.append((q.grad.clone(), k.grad.clone(), v.grad.clone()))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("used", [(1, 0), (0, 1)])
def test_unused_outputs(device, used, unused_outputs_get_no_cotangent):
    g = torch.Generator().manual_seed(3)
    leaves = [torch.randn(1, 19, 2, 16, generator=g).to(device).requires_grad_() for _ in range(3)]

    def outputs():
        out, lse, _ = op.flash_attn_func(*leaves, causal=True, return_attn_probs=True)
        return [out, lse]

    unused_outputs_get_no_cotangent(outputs, used, leaves, f"attention {used}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_torch_backend(dtype, device, monkeypatch):
    """SCANOPT_BACKEND=torch runs the PyTorch path; it must meet the per-dtype budget too."""
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    monkeypatch.setattr(launch, "attention_fwd", None)  # the kernels must not be reached
    monkeypatch.setattr(launch, "attention_bwd", None)
    gen = torch.Generator().manual_seed(4)
    q = _randn(gen, 2, 63, 4, 40, dtype=dtype, device=device).requires_grad_()
    k = _randn(gen, 2, 130, 2, 40, dtype=dtype, device=device).requires_grad_()
    v = _randn(gen, 2, 130, 2, 40, dtype=dtype, device=device).requires_grad_()
    dout = _randn(gen, 2, 63, 4, 40, dtype=dtype, device=device)
    out = flash_attn_func(q, k, v, causal=True, window_size=(30, -1), softcap=4.0)
    out.backward(dout)
    kw = dict(causal=True, window=(30, -1), softcap=4.0)
    qh, kh, vh, doh = (_np(t.transpose(1, 2)) for t in (q, k, v, dout))
    r_out, _ = attention_fwd(qh, kh, vh, **kw)
    g = attention_bwd(doh, qh, kh, vh, **kw)
    report = Report("attention", f"torch backend {_name(dtype)}")
    report.check("out", out.transpose(1, 2), r_out)
    for name, t in (("dq", q), ("dk", k), ("dv", v)):
        report.check(name, t.grad.transpose(1, 2), g[name[1]])
    report.assert_ok()


def test_dropout_fallback_warns_once_and_is_exact(device):
    gen = torch.Generator().manual_seed(6)
    q = _randn(gen, 1, 20, 2, 16, dtype=torch.float32, device=device)
    k = _randn(gen, 1, 30, 1, 16, dtype=torch.float32, device=device)
    v = _randn(gen, 1, 30, 1, 16, dtype=torch.float32, device=device)
    op._WARNED.clear()
    with pytest.warns(UserWarning, match="dropout_p > 0"):
        out, lse, s_dmask = flash_attn_func(q, k, v, dropout_p=0.4, return_attn_probs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flash_attn_func(q, k, v, dropout_p=0.4)
    # S_dmask encodes the kept probabilities (negative = dropped): rebuild the output from it
    keep = s_dmask >= 0
    assert 0.2 < 1 - keep.float().mean().item() < 0.6
    p = s_dmask.abs() * keep / 0.6
    expect = torch.matmul(p, v.transpose(1, 2).repeat_interleave(2, dim=1))
    assert torch.allclose(out.transpose(1, 2), expect, atol=1e-5)
    r_out, r_lse = attention_fwd(_np(q.transpose(1, 2)), _np(k.transpose(1, 2)),
                                 _np(v.transpose(1, 2)))  # fmt: skip
    assert rel_l2(lse, r_lse) < 1e-6


def test_alibi_fallback(device):
    gen = torch.Generator().manual_seed(8)
    b, lq, lk, h, d = 2, 13, 21, 2, 16
    q = _randn(gen, b, lq, h, d, dtype=torch.float32, device=device)
    k = _randn(gen, b, lk, h, d, dtype=torch.float32, device=device)
    v = _randn(gen, b, lk, h, d, dtype=torch.float32, device=device)
    slopes = torch.tensor([0.25, 0.5], device=device)
    op._WARNED.clear()
    with pytest.warns(UserWarning, match="alibi_slopes"):
        out = flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    s = qd @ kd.transpose(-1, -2) * d**-0.5
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    s = s - slopes.double().cpu()[:, None, None].to(s.device) * (i + lk - lq - j).abs().to(s.device)
    s = s.masked_fill((j > i + lk - lq).to(s.device), float("-inf"))
    expect = torch.softmax(s, -1) @ vd
    assert rel_l2(out.transpose(1, 2), expect) < 1e-5


def test_sdpa_mask_fallback_is_torch(device):
    gen = torch.Generator().manual_seed(9)
    q = _randn(gen, 1, 2, 10, 16, dtype=torch.float32, device=device)
    k = _randn(gen, 1, 2, 12, 16, dtype=torch.float32, device=device)
    v = _randn(gen, 1, 2, 12, 16, dtype=torch.float32, device=device)
    mask = torch.rand(10, 12, generator=gen).to(device) > 0.3
    op._WARNED.clear()
    with pytest.warns(UserWarning, match="attn_mask"):
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out, expect)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda q, k, v: flash_attn_func(q[0], k, v), ValueError, "q must have 4 dimensions"),
        (lambda q, k, v: flash_attn_func(q.long(), k, v), TypeError, "q must be float32"),
        (lambda q, k, v: flash_attn_func(q, k[..., :8], v), ValueError, "head dims differ"),
        (lambda q, k, v: flash_attn_func(q, k[:1], v[:1]), ValueError, "batch mismatch.*k"),
        (lambda q, k, v: flash_attn_func(q, k.half(), v), TypeError, "k has dtype"),
        (lambda q, k, v: flash_attn_func(q, k, v[:, :5]), ValueError, "v has 5 keys"),
        (lambda q, k, v: flash_attn_func(q[:, :, :3], k, v), ValueError, "Hq % Hk"),
        (lambda q, k, v: flash_attn_func(q, k, v, window_size=3), ValueError, "window_size"),
        (lambda q, k, v: flash_attn_func(q, k, v, softcap=-1.0), ValueError, "softcap"),
        (
            lambda q, k, v: scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ),
            ValueError,
            "enable_gqa",
        ),
        (
            lambda q, k, v: scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0]),
            ValueError,
            "query must have 3 or 4 dimensions",
        ),
    ],
    ids=[
        "rank",
        "dtype",
        "head_dim",
        "batch",
        "kv_dtype",
        "v_len",
        "gqa",
        "window",
        "softcap",
        "sdpa_gqa",
        "sdpa_rank",
    ],  # fmt: skip
)
def test_bad_inputs(make, error, match):
    q = torch.randn(2, 7, 4, 16)
    k = torch.randn(2, 9, 2, 16)
    v = torch.randn(2, 9, 2, 16)
    with pytest.raises(error, match=match):
        make(q, k, v)


def test_custom_ops_opcheck(monkeypatch):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of both ops."""
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    q = torch.randn(1, 9, 2, 16, requires_grad=True)
    k = torch.randn(1, 11, 1, 16, requires_grad=True)
    v = torch.randn(1, 11, 1, 24, requires_grad=True)
    args = (q, k, v, 0.25, True, True, -1, -1, 0.0, True)
    torch.library.opcheck(torch.ops.scanopt.attention_fwd.default, args)
    out, lse = torch.ops.scanopt.attention_fwd(*[a.detach() if torch.is_tensor(a) else a
                                                 for a in args])  # fmt: skip
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                torch.randn_like(lse), 0.25, True, True, -1, -1, 0.0, True)  # fmt: skip
    torch.library.opcheck(torch.ops.scanopt.attention_bwd.default, bwd_args)


def test_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    torch._dynamo.reset()

    def f(q, k, v):
        a = flash_attn_func(q, k, v, causal=True, window_size=(8, -1))
        b = scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=True,
        )  # fmt: skip
        return a.sum() + b.float().square().sum()

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 17, 4, 16, generator=gen, requires_grad=True)
    k = torch.randn(1, 19, 2, 16, generator=gen, requires_grad=True)
    v = torch.randn(1, 19, 2, 16, generator=gen, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_ref = f(q, k, v)
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v))
    assert torch.allclose(loss, loss_ref, rtol=1e-5)
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_self_check_quick(device):
    reports = op.self_check(device, quick=True)
    assert reports and all(r.passed for r in reports), "\n".join(map(str, reports))


# ------------------------------------------------------------------------------------------
# GPU (run on the H200: pytest tests/test_attention.py -m gpu)

GPU_CASES = [
    ("d128_causal_gqa", 1, 4, 2, 1025, 1025, 128, {"causal": True}),
    ("d64_full_q_lt_k", 1, 2, 2, 700, 2048, 64, {}),
    ("d96_causal_q_gt_k", 1, 2, 1, 1500, 1000, 96, {"causal": True}),
    ("d256_window", 1, 2, 1, 900, 1100, 256, {"window": (128, 64)}),
    ("d80_softcap", 1, 4, 2, 513, 513, 80, {"softcap": 30.0, "causal": True}),
    ("d40_L1", 2, 4, 2, 1, 333, 40, {"causal": True}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_name)
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_flash_attn(case, dtype):
    cid, b, hq, hk, lq, lk, d, opts = case
    _check_fa(b, hq, hk, lq, lk, d, d, opts, dtype, "cuda", seed=len(cid), case=cid)


@pytest.mark.gpu
def test_gpu_fp32_exact_path():
    _check_fa(1, 4, 2, 300, 257, 64, 64, {"causal": True}, torch.float32, "cuda", case="fp32")


@pytest.mark.gpu
def test_gpu_full_gradients_4k():
    _check_fa(1, 1, 1, 4096, 4096, 64, 64, {"causal": True}, torch.bfloat16, "cuda", case="4k")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("causal", "d"), [(True, 128), (False, 64)], ids=["causal_d128", "full_d64"]
)
def test_gpu_long_16k(causal, d):
    """L=16384 bf16, GQA: out, lse and dq on the last 256 query rows against the reference (rows
    are independent, and bottom-right alignment keeps the causal diagonal of a trailing slice)."""
    gen = torch.Generator().manual_seed(16)
    b, hq, hk, n, rows = 1, 2, 1, 16384, 256
    q = _randn(gen, b, n, hq, d, dtype=torch.bfloat16, device="cuda").requires_grad_()
    k = _randn(gen, b, n, hk, d, dtype=torch.bfloat16, device="cuda").requires_grad_()
    v = _randn(gen, b, n, hk, d, dtype=torch.bfloat16, device="cuda").requires_grad_()
    dout = _randn(gen, b, n, hq, d, dtype=torch.bfloat16, device="cuda")
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    out.backward(dout)
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()

    tail = slice(n - rows, n)
    qh, kh, vh, doh = (t.detach().transpose(1, 2) for t in (q, k, v, dout))
    qt, dot_ = qh[:, :, tail], doh[:, :, tail]
    diag, left, right = launch.mask_params(rows, n, causal, True, -1, -1)
    params = dict(scale=d**-0.5, diag=diag, left=left, right=right)
    b_out, b_lse = op.torch_attention_fwd(qt, kh, vh, **params)
    b_dq, _, _ = op.torch_attention_bwd(dot_, qt, kh, vh, b_out, b_lse, **params)
    r_out, r_lse = attention_fwd(_np(qt), _np(kh), _np(vh), causal=causal)
    g = attention_bwd(_np(dot_), _np(qt), _np(kh), _np(vh), causal=causal)
    report = Report("attention", f"16k {'causal' if causal else 'full'} bf16")
    report.check("out", out[:, tail].transpose(1, 2), r_out, baseline=b_out)
    report.check("lse", lse[:, :, tail], r_lse, baseline=b_lse, dtype="bfloat16")
    report.check("dq", q.grad[:, tail].transpose(1, 2), g["q"], baseline=b_dq)
    report.assert_ok()


@pytest.mark.gpu
def test_gpu_deterministic_backward():
    gen = torch.Generator().manual_seed(3)
    q = _randn(gen, 2, 2048, 8, 128, dtype=torch.bfloat16, device="cuda").requires_grad_()
    k = _randn(gen, 2, 2048, 2, 128, dtype=torch.bfloat16, device="cuda").requires_grad_()
    v = _randn(gen, 2, 2048, 2, 128, dtype=torch.bfloat16, device="cuda").requires_grad_()
    dout = _randn(gen, 2, 2048, 8, 128, dtype=torch.bfloat16, device="cuda")
    grads = []
    for _ in range(3):
        q.grad = k.grad = v.grad = None
        flash_attn_func(q, k, v, causal=True).backward(dout)
        grads.append([t.grad.clone() for t in (q, k, v)])
    for later in grads[1:]:
        for a, b in zip(grads[0], later, strict=True):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_sdpa_bf16_matches_reference():
    gen = torch.Generator().manual_seed(12)
    q = _randn(gen, 2, 8, 777, 128, dtype=torch.bfloat16, device="cuda")
    k = _randn(gen, 2, 2, 1300, 128, dtype=torch.bfloat16, device="cuda")
    v = _randn(gen, 2, 2, 1300, 128, dtype=torch.bfloat16, device="cuda")
    out = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    diag, left, right = launch.mask_params(777, 1300, True, False, -1, -1)
    b_out, _ = op.torch_attention_fwd(q, k, v, scale=128**-0.5, diag=diag, left=left, right=right)
    r_out, _ = attention_fwd(_np(q), _np(k), _np(v), causal=True, causal_align="top_left")
    report = Report("attention", "sdpa bf16")
    report.check("out", out, r_out, baseline=b_out)
    report.assert_ok()
    assert np.isfinite(_np(out)).all()
