"""Causal depthwise conv1d: reference VJP vs finite differences, kernels vs the float64
reference (forward and gradients) on odd shapes, the decode update, and input errors."""

import numpy as np
import pytest

from scanopt.reference import causal_conv1d_bwd, causal_conv1d_fwd
from scanopt.verify import Report

torch = pytest.importorskip("torch")


def _inputs(B, D, L, W, dtype, device, bias=True, init=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return (
        mk(B, D, L),
        mk(D, W) * 0.5,
        mk(D) if bias else None,
        mk(B, D, W - 1) if init else None,
    )


def test_reference_vjp_matches_finite_differences():
    rng = np.random.default_rng(0)
    x, w, b, s = rng.normal(size=(2, 3, 5)), rng.normal(size=(3, 3)), rng.normal(size=3), None
    s = rng.normal(size=(2, 3, 2))
    dout, dfin = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 2))

    def loss(x, w, b, s):
        out, fin = causal_conv1d_fwd(x, w, b, s, activation=True)
        return float((out * dout).sum() + (fin * dfin).sum())

    grads = causal_conv1d_bwd(dout, x, w, b, s, activation=True, dfinal_states=dfin)
    args = {"x": x, "weight": w, "bias": b, "initial_states": s}
    for name, val in args.items():
        num = np.zeros_like(val)
        for idx in np.ndindex(val.shape):
            hi, lo = val.copy(), val.copy()
            hi[idx] += 1e-6
            lo[idx] -= 1e-6
            a_hi, a_lo = dict(args, **{name: hi}), dict(args, **{name: lo})
            num[idx] = (loss(*a_hi.values()) - loss(*a_lo.values())) / 2e-6
        np.testing.assert_allclose(grads[name], num, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "B,D,L,W,act,bias,init",
    [
        (1, 3, 1, 4, True, True, True),
        (2, 5, 19, 4, True, True, False),
        (1, 7, 33, 3, False, False, True),
        (2, 3, 2, 4, None, True, True),  # L < width - 1: the final state reaches into init
        (1, 17, 140, 2, True, True, False),  # two time tiles, two channel tiles
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference(device, B, D, L, W, act, bias, init, dtype):
    from scanopt import causal_conv1d_fn
    from scanopt.ops.causal_conv1d.op import causal_conv1d_torch

    x, w, b, s = _inputs(B, D, L, W, dtype, device, bias, init)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, s)]
    activation = "silu" if act else None
    out, fin = causal_conv1d_fn(leaves[0], leaves[1], leaves[2], None, leaves[3], True, None,
                                activation)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
    dfin = torch.randn(fin.shape, generator=g).to(device=device, dtype=fin.dtype)
    torch.autograd.backward([out, fin], [dout, dfin])

    npy = lambda t: None if t is None else t.detach().cpu().double().numpy()  # noqa: E731
    ref_out, ref_fin = causal_conv1d_fwd(npy(x), npy(w), npy(b), npy(s), bool(act))
    ref_g = causal_conv1d_bwd(npy(dout), npy(x), npy(w), npy(b), npy(s), bool(act), npy(dfin))
    # same-dtype PyTorch baseline for the 2x rule
    base = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, s)]
    b_out, b_fin = causal_conv1d_torch(*base, silu=bool(act))
    torch.autograd.backward([b_out, b_fin], [dout, dfin])

    rep = Report("causal_conv1d", f"B{B} D{D} L{L} W{W} act={act} {dtype}")
    rep.check("out", out, ref_out, baseline=b_out)
    rep.check("final_states", fin, ref_fin)
    for name, leaf, bl in zip(("x", "weight", "bias", "initial_states"), leaves, base):
        if leaf is not None:
            rep.check(f"d{name}", leaf.grad, ref_g[name], baseline=bl.grad)
    rep.assert_ok()


def test_backward_is_deterministic(device):
    from scanopt import causal_conv1d_fn

    x, w, b, _ = _inputs(2, 6, 150, 4, torch.float32, device, init=False)
    grads = []
    for _ in range(2):
        w_ = w.clone().requires_grad_()
        b_ = b.clone().requires_grad_()
        causal_conv1d_fn(x, w_, b_, activation="silu").square().sum().backward()
        grads.append((w_.grad, b_.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("seqlen", [None, 3])
def test_update_matches_full_conv(device, seqlen):
    from scanopt import causal_conv1d_fn, causal_conv1d_update

    B, D, W, state_len, L = 2, 5, 4, 5, 7
    x, w, b, _ = _inputs(B, D, L, W, torch.float32, device, init=False)
    full = causal_conv1d_fn(x, w, b, activation="silu")
    state = torch.zeros(B, D, state_len, device=device)
    outs, t = [], 0
    step = seqlen or 1
    while t < L:
        n = min(step, L - t)
        xt = x[..., t : t + n] if seqlen else x[..., t]
        outs.append(causal_conv1d_update(xt, state, w, b, "silu"))
        t += n
    got = torch.cat(outs, -1) if seqlen else torch.stack(outs, -1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, x[..., L - state_len :])


def test_bad_inputs_name_the_argument(device):
    from scanopt import causal_conv1d_fn, causal_conv1d_update

    x, w, b, s = _inputs(1, 4, 6, 3, torch.float32, device)
    with pytest.raises(ValueError, match="seq_idx"):
        causal_conv1d_fn(x, w, seq_idx=torch.zeros(1, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_fn(x, w[:3])
    with pytest.raises(ValueError, match="initial_states"):
        causal_conv1d_fn(x, w, initial_states=s[..., :1])
    with pytest.raises(NotImplementedError, match="activation"):
        causal_conv1d_fn(x, w, activation="relu")
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(x[..., 0], torch.zeros(1, 4, 1), w)
    with pytest.raises(ValueError, match="cache_seqlens"):
        causal_conv1d_update(x[..., 0], torch.zeros(1, 4, 2), w, cache_seqlens=torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 3, 4])
def test_kernel_bf16_gpu(W):
    test_kernel_matches_reference("cuda", 2, 40, 1025, W, True, True, True, torch.bfloat16)


def test_torch_backend_matches_reference(device, monkeypatch):
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    test_kernel_matches_reference(device, 2, 5, 9, 3, True, True, True, torch.float32)


def test_custom_ops_pass_opcheck(device):
    # fake (meta) kernels, schema and autograd registration agree with the real ops
    import scanopt.ops.causal_conv1d.op  # noqa: F401  (registers the ops)

    x, w, b, s = _inputs(1, 3, 5, 3, torch.float32, device)
    triton = device == "cuda" or __import__("os").environ.get("TRITON_INTERPRET") == "1"
    args = (x.requires_grad_(), w.requires_grad_(), b, s, True, triton)
    torch.library.opcheck(torch.ops.scanopt.causal_conv1d_fwd.default, args)
