"""RWKV-4 WKV (``scanopt.wkv4``): forward, the final state and every gradient (incoming state
included) against the float64 reference with the verify rule; extreme keys; state continuation;
launch configs; the torch backend; errors; torch.compile. CPU tests run the Triton kernels
through the interpreter on tiny shapes; ``-m gpu`` tests run bf16 up to T = 16k on a GPU."""

import numpy as np
import pytest
import torch

from scanopt.ops.wkv4 import launch, op
from scanopt.reference import wkv4_bwd as ref_bwd
from scanopt.reference import wkv4_fwd as ref_fwd
from scanopt.verify import Report, to_numpy

FP = [torch.float32, torch.float16]


def _name(dtype):
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize(
    "B,T,C,with_state",
    [
        (2, 1, 3, False),  # one token: a single chunk, no summary / scan kernels
        (2, 2, 64, True),
        (2, 65, 3, True),  # 65 = 4 chunks of 16 + 1: a one-token tail chunk
        (1, 65, 64, False),
        (2, 32, 5, True),  # T a multiple of the chunk: no tail masks (EVEN_T)
        (1, 300, 64, True),
    ],
)
@pytest.mark.parametrize("dtype", FP, ids=_name)
def test_wkv4_matches_reference(device, B, T, C, with_state, dtype):
    x = op.make_inputs(B, T, C, dtype=dtype, device=device, state=with_state, seed=T + C)
    op.check_case(x, f"B{B}-T{T}-C{C}-state={with_state}-{_name(dtype)}").assert_ok()


@pytest.mark.parametrize("key_scale,decay", [(60.0, "mixed"), (200.0, "rwkv4")])
@pytest.mark.parametrize("dtype", FP, ids=_name)
def test_wkv4_extreme_keys(device, key_scale, decay, dtype):
    # keys of +-60 * N(0, 1) (|k| up to ~200) and +-200 * N(0, 1): e^k overflows fp32 at 88;
    # decays down to e^-403 per step. A stretch of zero cotangents (a masked loss) must not
    # set the scale of the reverse accumulators.
    x = op.make_inputs(
        1, 70, 16, dtype=dtype, device=device, key_scale=key_scale, decay=decay, state=True,
        seed=int(key_scale),
    )  # fmt: skip
    x["grad_out"][:, 20:40] = 0
    x["key"][0, 5] = 60.0  # exactly +-60 too
    x["key"][0, 6] = -60.0
    report = op.check_case(x, f"keys{key_scale:g}-{decay}-{_name(dtype)}")
    report.assert_ok()
    assert all(np.isfinite(c.err) for c in report.checks)


def test_wkv4_tiny_and_zero_cotangents(device):
    # cotangents of size 1e-15 (below 2^-40: their scale moves into the exponents) with a zero
    # stretch, next to keys far apart: the reverse accumulators must keep every term
    x = op.make_inputs(1, 50, 16, device=device, key_scale=60.0, state=True, seed=21)
    x["grad_out"] *= 1e-15
    x["grad_out"][:, 10:30] = 0
    x["grad_state"] = [g * 1e-15 for g in x["grad_state"]]
    op.check_case(x, "tiny-cotangents").assert_ok()


def test_wkv4_state_continuation_equals_one_run(device):
    x = op.make_inputs(2, 70, 24, device=device, decay="mixed", state=True, seed=11)
    names = ("time_decay", "time_first", "key", "value")

    def leaves():
        args = [x[n].clone().requires_grad_() for n in names]
        return args, [s.clone().requires_grad_() for s in x["state"]]

    args, s0 = leaves()
    out, fin = op.wkv4(*args, state=s0)
    g_full = torch.autograd.grad([out, *fin], [*args, *s0], [x["grad_out"], *x["grad_state"]])

    args, s0 = leaves()
    td, tf, k, v = args
    cut = 23  # not a multiple of any chunk length
    out1, mid = op.wkv4(td, tf, k[:, :cut], v[:, :cut], state=s0)
    out2, fin2 = op.wkv4(td, tf, k[:, cut:], v[:, cut:], state=mid)
    out_cat = torch.cat([out1, out2], 1)
    g_parts = torch.autograd.grad([out_cat, *fin2], [*args, *s0], [x["grad_out"], *x["grad_state"]])

    torch.testing.assert_close(out_cat, out, rtol=1e-5, atol=1e-6)
    for a, b in zip(fin2, fin):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name, g1, g2 in zip([*names, "num", "den", "max"], g_parts, g_full):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "T,fwd_cfg,bwd_cfg",
    [
        # several unrolled blocks per chunk, in both directions; a one-token tail chunk
        (65, {"chunk": 32, "block_t": 8, "block_c": 16, "sum_block_c": 32}, {"block_t": 4}),
        # T a multiple of the chunk: the kernels drop every tail mask (EVEN_T)
        (64, {"chunk": 16, "block_t": 16, "scan_block_c": 16}, {"block_t": 16, "sum_block_c": 16}),
        (96, {"chunk": 32, "block_t": 8}, {"block_t": 8, "block_c": 16, "scan_block_c": 16}),
        # fuse: the summary kernels' last programs run the scans, the gradient kernel's the
        # parameter sums (channel blocks of 32 over C = 40: a partial block)
        (
            65,
            {"chunk": 16, "sum_block_c": 32, "fuse": 1},
            {"block_c": 32, "sum_block_c": 32, "fuse": 1},
        ),  # fmt: skip
    ],
)
def test_wkv4_launch_configs(device, T, fwd_cfg, bwd_cfg):
    B, C = 2, 40
    x = op.make_inputs(B, T, C, device=device, decay="mixed", state=True, seed=T)
    state = torch.stack(x["state"])
    args = [x[n] for n in ("time_decay", "time_first", "key", "value")]
    out, fin, states, fidx = launch.wkv4_fwd(*args, state, config=fwd_cfg)
    assert states.shape == (B, -(-T // fwd_cfg["chunk"]), 3, C)
    grads = launch.wkv4_bwd(
        x["grad_out"], torch.stack(x["grad_state"]), *args, state, fin, states, fidx,
        fwd_cfg["chunk"], config=bwd_cfg,
    )  # fmt: skip

    np_in = [to_numpy(a) for a in args]
    np_s0 = tuple(to_numpy(s) for s in x["state"])
    r_out, r_fin = ref_fwd(*np_in, np_s0)
    r_g = ref_bwd(to_numpy(x["grad_out"]), *np_in, np_s0, tuple(map(to_numpy, x["grad_state"])))
    report = Report("wkv4", f"{fwd_cfg}-{bwd_cfg}")
    report.check("out", out, r_out)
    for i, part in enumerate(("num", "den", "max")):
        report.check(f"state.{part}", fin[i], r_fin[i])
        report.check(f"dstate.{part}", grads[4][i], r_g["state"][i])
    for g, name in zip(grads[:4], ("time_decay", "time_first", "key", "value")):
        report.check(f"d{name}", g, r_g[name])
    report.assert_ok()


@pytest.mark.parametrize("with_state,T", [(False, 70), (True, 70), (True, 9)])
def test_wkv4_fused_launches_match_unfused(device, with_state, T, monkeypatch):
    """``fuse``: the same values as the separate scan and parameter kernels (the same
    arithmetic in the same order), call after call on one counter buffer, as on a GPU stream
    (the last programs set the counters back to zero)."""
    shared = torch.zeros(64, dtype=torch.int32, device=device)
    monkeypatch.setattr(launch, "counters", lambda n, dev: shared)
    B, C = 2, 40  # T 9: one chunk (the forward has no summary kernel; the backward's is last)
    x = op.make_inputs(B, T, C, device=device, decay="mixed", state=with_state, seed=5)
    state = torch.stack(x["state"]) if with_state else None
    gstate = torch.stack(x["grad_state"]) if with_state else None
    args = [x[n] for n in ("time_decay", "time_first", "key", "value")]

    def run(fuse):
        fwd_cfg = {"chunk": 16, "sum_block_c": 16, "block_c": 16, "fuse": fuse}
        out, fin, states, fidx = launch.wkv4_fwd(*args, state, config=fwd_cfg)
        grads = launch.wkv4_bwd(
            x["grad_out"], gstate, *args, state, fin, states, fidx, 16,
            config={"block_c": 16, "sum_block_c": 16, "fuse": fuse},
        )  # fmt: skip
        return [out, fin, states, fidx, *(g for g in grads if g is not None)]

    want = run(0)
    for _ in range(2):
        got = run(1)
        for name, a, b in zip(("out", "final", "states", "fidx", "dtd", "dtf", "dk", "dv", "ds"),
                              got, want):  # fmt: skip
            assert torch.equal(a, b), name
        assert not shared.any()


def test_wkv4_contract_like_transformers(device):
    x = op.make_inputs(2, 9, 8, device=device, state=True, seed=2)
    args = [x[n] for n in ("time_decay", "time_first", "key", "value")]
    out, st = op.wkv4(*args)
    assert st is None and out.shape == (2, 9, 8) and out.dtype == torch.float32
    out2, st = op.wkv4(*args, return_state=True)
    torch.testing.assert_close(out2, out)
    assert isinstance(st, list) and len(st) == 3
    assert all(s.shape == (2, 8) and s.dtype == torch.float32 for s in st)
    # transformers passes a tuple of strided views of its [B, C, n_layers] buffers
    buf = torch.stack(x["state"], 0).permute(1, 2, 0).unsqueeze(-1).expand(2, 8, 3, 4)
    views = tuple(buf[:, :, i, 1] for i in range(3))
    out3, st3 = op.wkv4(*args, state=views)
    out4, st4 = op.wkv4(*args, state=x["state"])
    assert isinstance(st3, list)
    torch.testing.assert_close(out3, out4)
    for a, b in zip(st3, st4):
        torch.testing.assert_close(a, b)
    # the empty state is the same as no state
    empty = [torch.zeros(2, 8), torch.zeros(2, 8), torch.full((2, 8), -1e38)]
    out5, _ = op.wkv4(*args, state=[s.to(device) for s in empty])
    torch.testing.assert_close(out5, out)


def test_wkv4_strided_and_mixed_dtype_inputs(device):
    B, T, C = 2, 33, 24
    x = op.make_inputs(B, T, C, device=device, seed=3)
    big = torch.randn(B, 2 * T, C + 5, device=device)
    key = big[:, ::2, 3 : 3 + C]  # strides (2 T (C + 5), 2 (C + 5), 1)
    key.copy_(x["key"])
    value = x["value"].half()  # value fp16, key fp32: output in key's dtype
    # gradients to a non-contiguous leaf, from a grad_out with zero strides (from .sum())
    k = key.detach().requires_grad_()
    out, _ = op.wkv4(x["time_decay"], x["time_first"], k, value)
    assert out.dtype == torch.float32
    (gk,) = torch.autograd.grad(out.sum(), [k])
    kb = key.detach().clone().requires_grad_()
    b_out, _ = op.wkv4_torch(x["time_decay"], x["time_first"], kb, value)
    (b_gk,) = torch.autograd.grad(b_out.sum(), [kb])
    td_tf = [to_numpy(x[n]) for n in ("time_decay", "time_first")]
    ref, _ = ref_fwd(*td_tf, to_numpy(key), to_numpy(value))
    r_g = ref_bwd(np.ones((B, T, C)), *td_tf, to_numpy(key), to_numpy(value))
    report = Report("wkv4", "strided")
    report.check("out", out, ref, baseline=b_out, dtype="float16")
    report.check("dkey", gk, r_g["key"], baseline=b_gk, dtype="float16")
    report.assert_ok()


def test_wkv4_torch_backend(device, monkeypatch):
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")

    def no_kernels(*args, **kwargs):
        raise AssertionError("the torch backend launched a Triton kernel")

    monkeypatch.setattr(launch, "wkv4_fwd", no_kernels)
    monkeypatch.setattr(launch, "wkv4_bwd", no_kernels)
    x = op.make_inputs(2, 21, 10, device=device, decay="mixed", state=True, seed=4)
    op.check_case(x, "torch backend").assert_ok()


@pytest.mark.parametrize("used", [(1, 0, 0, 0), (0, 1, 1, 1), (0, 0, 0, 1)])
def test_wkv4_unused_outputs(device, used, unused_outputs_get_no_cotangent):
    x = op.make_inputs(2, 37, 9, device=device, seed=7)
    leaves = [x[n].detach().requires_grad_() for n in ("time_decay", "time_first", "key", "value")]

    def outputs():
        out, state = op.wkv4(*leaves, return_state=True)
        return [out, *state]

    unused_outputs_get_no_cotangent(outputs, used, leaves, f"wkv4 {used}")


def test_wkv4_bad_inputs():
    x = op.make_inputs(2, 5, 4, seed=0)
    td, tf, k, v = (x[n] for n in ("time_decay", "time_first", "key", "value"))
    with pytest.raises(ValueError, match="key must have 3 dimensions"):
        op.wkv4(td, tf, k[0], v)
    with pytest.raises(ValueError, match=r"value must have shape \(2, 5, 4\)"):
        op.wkv4(td, tf, k, v[:, :4])
    with pytest.raises(ValueError, match=r"time_decay must have shape \(4,?\)"):
        op.wkv4(td[:3], tf, k, v)
    with pytest.raises(ValueError, match=r"time_first must have shape \(4,?\)"):
        op.wkv4(td, tf[None], k, v)
    with pytest.raises(TypeError, match="key must be float32 or float16 or bfloat16"):
        op.wkv4(td, tf, k.long(), v)
    with pytest.raises(TypeError, match="value must be a torch.Tensor"):
        op.wkv4(td, tf, k, v.numpy())
    with pytest.raises(ValueError, match="value is on meta"):
        op.wkv4(td, tf, k, v.to("meta"))
    with pytest.raises(ValueError, match=r"state must be None or a list \[num, den, max\]"):
        op.wkv4(td, tf, k, v, state=[torch.zeros(2, 4)] * 2)
    with pytest.raises(ValueError, match=r"state\[2\] \(max\) must have shape \(2, 4\)"):
        op.wkv4(td, tf, k, v, state=[torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(4)])
    with pytest.raises(ValueError, match="state must be None or a list"):
        op.wkv4(td, tf, k, v, state=torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="unknown wkv4 fwd config keys"):
        launch.wkv4_fwd(td, tf, k, v, config={"BV": 32})
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        launch.wkv4_fwd(td, tf, k, v, config={"chunk": 24})
    with pytest.raises(ValueError, match="fuse must be 0 or 1"):
        launch.wkv4_fwd(td, tf, k, v, config={"fuse": 2})


def test_wkv4_no_grad_and_empty_sequence(device):
    x = op.make_inputs(2, 0, 4, device=device, state=True, seed=1)
    args = [x[n] for n in ("time_decay", "time_first", "key", "value")]
    out, st = op.wkv4(*args, state=x["state"])
    assert out.shape == (2, 0, 4)
    for a, b in zip(st, x["state"]):
        torch.testing.assert_close(a, b)
    x = op.make_inputs(1, 40, 4, device=device, seed=1)
    with torch.no_grad():
        out, _ = op.wkv4(*(x[n] for n in ("time_decay", "time_first", "key", "value")))
    assert torch.isfinite(out).all()


def test_wkv4_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    x = op.make_inputs(2, 4, 8, seed=6)
    args = [x[n].clone().requires_grad_() for n in ("time_decay", "time_first", "key", "value")]

    def layer(td, tf, k, v):
        out, st = op.wkv4(td, tf, k * 2.0, v, return_state=True)
        return out.sin().sum() + st[0].sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    ref_grads = torch.autograd.grad(layer(*ref_args), ref_args)
    torch.testing.assert_close(loss, layer(*ref_args))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_wkv4_opcheck(device, backend):
    # chunk 0 is the PyTorch path, > 0 the kernels with that chunk length
    chunk = 0 if backend == "torch" else 16
    x = op.make_inputs(1, 5, 3, device=device, state=True, seed=9)
    names = ("time_decay", "time_first", "key", "value")
    args = [x[n].clone().requires_grad_() for n in names]
    state = torch.stack(x["state"]).requires_grad_()
    torch.library.opcheck(torch.ops.scanopt.wkv4_fwd.default, (*args, state, chunk))
    plain = [x[n] for n in names]
    out, final, states, fidx = torch.ops.scanopt.wkv4_fwd(*plain, None, chunk)
    bwd_args = (x["grad_out"], final.clone(), *plain, None, final, states, fidx, chunk)
    torch.library.opcheck(torch.ops.scanopt.wkv4_bwd.default, bwd_args)


# --------------------------------------------------------------------------------------------
# GPU (run on the H200: python -m pytest tests/test_wkv4.py -m gpu)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "T,dtype",
    [
        (1, torch.bfloat16),
        (1000, torch.bfloat16),
        (4096, torch.bfloat16),
        (16384, torch.bfloat16),
        (4096, torch.float16),
        (1000, torch.float32),
        (4096, torch.float32),
    ],
    ids=lambda v: _name(v) if isinstance(v, torch.dtype) else f"T{v}",
)
def test_wkv4_gpu_long(T, dtype):
    B, C = (2, 128) if T > 4096 else (2, 520)
    x = op.make_inputs(B, T, C, dtype=dtype, device="cuda", decay="mixed", state=True, seed=T)
    op.check_case(x, f"gpu-T{T}-C{C}-{_name(dtype)}").assert_ok()


@pytest.mark.gpu
@pytest.mark.parametrize("key_scale", [60.0, 200.0])
def test_wkv4_gpu_extreme_keys_bf16(key_scale):
    x = op.make_inputs(
        2, 2048, 64, dtype=torch.bfloat16, device="cuda", key_scale=key_scale, decay="mixed",
        state=True, seed=1,
    )  # fmt: skip
    x["grad_out"][:, 100:300] = 0
    op.check_case(x, f"gpu-keys{key_scale:g}").assert_ok()


@pytest.mark.gpu
def test_wkv4_gpu_anchor_shape_matches_torch_loop():
    # the benchmark shape (B=4, C=2048, T=4096, bf16), forward and dkey against the fp32 loop
    x = op.make_inputs(4, 4096, 2048, dtype=torch.bfloat16, device="cuda", seed=0)
    names = ("time_decay", "time_first", "key", "value")
    args = [x[n].clone().requires_grad_() for n in names]
    out, _ = op.wkv4(*args)
    (gk,) = torch.autograd.grad(out, [args[2]], x["grad_out"])
    base = [x[n].float().clone().requires_grad_() for n in names]
    b_out, _ = op.wkv4_torch(*base)
    (b_gk,) = torch.autograd.grad(b_out, [base[2]], x["grad_out"].float())
    report = Report("wkv4", "anchor")
    report.check("out", out, b_out.double(), dtype="bfloat16")
    report.check("dkey", gk, b_gk.double(), dtype="bfloat16")
    report.assert_ok()


@pytest.mark.gpu
def test_wkv4_gpu_fused_launches_match_unfused():
    """``fuse`` at the benchmark shape on the GPU's own counter buffer: bit for bit the
    separate kernels' results, call after call (a counter left non-zero would skip a scan)."""
    B, T, C = 4, 4096, 2048
    x = op.make_inputs(B, T, C, dtype=torch.bfloat16, device="cuda", state=True, seed=7)
    state, gstate = torch.stack(x["state"]), torch.stack(x["grad_state"])
    args = [x[n] for n in ("time_decay", "time_first", "key", "value")]

    def run(fuse):
        out, fin, states, fidx = launch.wkv4_fwd(*args, state, config={"fuse": fuse})
        chunk = launch.resolve_config("fwd", {"fuse": fuse}, B=B, T=T, C=C,
                                      dtype=torch.bfloat16, device="cuda")["chunk"]  # fmt: skip
        grads = launch.wkv4_bwd(x["grad_out"], gstate, *args, state, fin, states, fidx, chunk,
                                config={"fuse": fuse})  # fmt: skip
        return [out, fin, states, fidx, *grads]

    want = run(0)
    for _ in range(3):
        for name, a, b in zip(("out", "final", "states", "fidx", "dtd", "dtf", "dk", "dv", "ds"),
                              run(1), want):  # fmt: skip
            assert torch.equal(a, b), name


@pytest.mark.gpu
def test_wkv4_gpu_state_continuation_16k():
    x = op.make_inputs(1, 16384, 256, dtype=torch.bfloat16, device="cuda", state=True, seed=3)
    args = [x[n] for n in ("time_decay", "time_first", "key", "value")]
    out, fin = op.wkv4(*args, state=x["state"])
    td, tf, k, v = args
    out1, mid = op.wkv4(td, tf, k[:, :5000], v[:, :5000], state=x["state"])
    out2, fin2 = op.wkv4(td, tf, k[:, 5000:], v[:, 5000:], state=mid)
    torch.testing.assert_close(torch.cat([out1, out2], 1), out, rtol=2e-2, atol=1e-2)
    for a, b in zip(fin2, fin):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
