"""RWKV-7 WKV (``scanopt.wkv7``): forward, every gradient and the state against the float64
reference with the verify rule; state passing; the torch backend; errors; torch.compile; the
RWKV-LM adapter; launch configs. CPU tests run the Triton kernels through the interpreter."""

import math

import numpy as np
import pytest
import torch

from scanopt import _tensor
from scanopt.ops.wkv7 import launch, op
from scanopt.verify import compare

FP = [torch.float32, torch.float16]


def _w_dtype(dtype):
    # fp16 cannot hold the gradient of a log decay near -20 (exp(-20) * O(1) underflows);
    # RWKV keeps the decay in fp32, so the fp16 cases do too.
    return torch.float32 if dtype == torch.float16 else dtype


@pytest.fixture(params=["recurrent", "chunked"])
def mode(request, force_rwkv_mode):
    """Both kernel families; chunked with 32-step chunks, so short sequences still span several
    chunks and checkpoint slots."""
    force_rwkv_mode(request.param, BT=32, BW=16)
    return request.param


@pytest.fixture(params=["recurrent", "chunked", "tc"])
def gpu_mode(request, force_rwkv_mode):
    """Every kernel family with its default block sizes (GPU tests; "tc", the tensor-core
    kernels, runs the bf16/fp16 cases)."""
    force_rwkv_mode(request.param)
    return request.param


@pytest.mark.parametrize("T", [1, 17, 100])
@pytest.mark.parametrize("decay", ["strong", "weak"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", FP, ids=lambda d: str(d).replace("torch.", ""))
def test_wkv7_matches_reference(device, mode, T, decay, with_state, dtype):
    x = op.make_inputs(
        2 if T < 100 else 1, T, 2, 16, dtype=dtype, device=device, decay=decay,
        w_dtype=_w_dtype(dtype), initial_state=with_state, seed=T + 7 * with_state,
    )  # fmt: skip
    op.check_case(x, f"T{T}-{decay}-h0={with_state}").assert_ok()


@pytest.mark.parametrize(
    "B,T,H,K,V,decay",
    [
        (1, 33, 1, 20, 24, "mixed"),  # K, V not powers of two (masked lanes)
        (1, 40, 2, 16, 40, "rwkv7"),  # several V-blocks (one partial): partial sums over V
        (1, 19, 1, 32, 32, "mixed"),
    ],
)
def test_wkv7_odd_heads(device, mode, B, T, H, K, V, decay):
    x = op.make_inputs(B, T, H, K, V, device=device, decay=decay, initial_state=True, seed=K)
    op.check_case(x, f"K{K}-V{V}").assert_ok()


@pytest.mark.parametrize(
    "T,K,V,dtype,ks,bv,decay",
    [
        (37, 16, 16, torch.float32, 8, 8, "strong"),  # K in 2 lane groups, 16 V lanes
        (100, 32, 40, torch.bfloat16, 8, 16, "mixed"),  # bf16 words; CPL 2, a partial V-block
        (17, 64, 64, torch.float16, 16, 8, "rwkv7"),  # 4 lane groups of 16
        (45, 20, 24, torch.bfloat16, 4, 4, "weak"),  # K not a power of two (masked lanes)
        (33, 32, 24, torch.float16, 0, 8, "mixed"),  # KS 0: the plain kernel, against the reference
    ],
)
def test_wkv7_split_k_forward(device, force_rwkv_mode, T, K, V, dtype, ks, bv, decay):
    # KS: the recurrent forward with K in lane groups of KS values per thread
    # (wkv7_fwd_ks_kernel; the default for K <= 64 since the thirteenth session); its
    # checkpoints feed the default backward of the dtype. Against the reference (every
    # gradient), and against the plain recurrent forward (KS 0): the same outputs, final state
    # and checkpoints up to fp32 summation order
    x = op.make_inputs(1, T, 2, K, V, dtype=dtype, device=device, decay=decay,
                       w_dtype=_w_dtype(dtype), initial_state=True, seed=K + T)  # fmt: skip
    args = [x[n] for n in NAMES]
    cfg = {"MODE": "recurrent", "KS": ks, "BV": bv, "PF": 3}
    plain = {"MODE": "recurrent", "KS": 0}  # K across the lanes (wkv7_fwd_kernel)
    want = launch.wkv7_fwd(*args, 1.0, x["initial_state"], True, plain)
    got = launch.wkv7_fwd(*args, 1.0, x["initial_state"], True, cfg)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]
    for g, w_, name in zip(got, want, ("o", "ht", "ckpt"), strict=True):
        t = tol if name == "o" else 2e-5
        torch.testing.assert_close(g.float(), w_.float(), rtol=t, atol=t, msg=name)
    force_rwkv_mode("recurrent", KS=ks, BV=bv)
    op.check_case(x, f"KS{ks}-BV{bv}").assert_ok()


def test_wkv7_scale(device, mode):
    x = op.make_inputs(1, 9, 2, 16, device=device, initial_state=True, seed=3)
    op.check_case(x, "scale", scale=16**-0.5).assert_ok()


def test_wkv7_state_passing_equals_one_run(device, mode):
    x = op.make_inputs(1, 45, 2, 16, device=device, decay="mixed", initial_state=True, seed=5)
    names = ("r", "w", "k", "v", "a", "b")

    def leaves():
        return [x[n].clone().requires_grad_() for n in names], x["initial_state"].clone()

    (full, s0) = leaves()
    s0.requires_grad_()
    o, ht = op.wkv7(*full, initial_state=s0, output_final_state=True)
    g_full = torch.autograd.grad([o, ht], [*full, s0], [x["do"], x["dht"]])

    (parts, p0) = leaves()
    p0.requires_grad_()
    cut = 20  # not a multiple of the checkpoint chunk
    o1, s1 = op.wkv7(*(t[:, :cut] for t in parts), initial_state=p0, output_final_state=True)
    o2, s2 = op.wkv7(*(t[:, cut:] for t in parts), initial_state=s1, output_final_state=True)
    o_cat = torch.cat([o1, o2], 1)
    g_parts = torch.autograd.grad([o_cat, s2], [*parts, p0], [x["do"], x["dht"]])

    torch.testing.assert_close(o_cat, o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s2, ht, rtol=1e-5, atol=1e-6)
    for name, g1, g2 in zip([*names, "initial_state"], g_parts, g_full, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6, msg=name)


NAMES = ("r", "w", "k", "v", "a", "b")


@pytest.mark.parametrize("T", [1, 17, 100])
@pytest.mark.parametrize("decay", ["strong", "mixed"])
@pytest.mark.parametrize("with_state", [False, True])
def test_wkv7_tc_matches_reference(device, force_rwkv_mode, T, decay, with_state):
    """The tensor-core kernels (fp16: the interpreter cannot do bf16 arithmetic), 16-wide
    V-blocks (partial sums over V in the backward)."""
    force_rwkv_mode("tc", BV=16)
    x = op.make_inputs(
        2 if T < 100 else 1, T, 2, 16, dtype=torch.float16, device=device, decay=decay,
        w_dtype=torch.float32, initial_state=with_state, seed=T + 7 * with_state,
    )  # fmt: skip
    op.check_case(x, f"tc-T{T}-{decay}-h0={with_state}").assert_ok()


@pytest.mark.parametrize(
    "T,K,V,decay", [(33, 20, 24, "mixed"), (40, 16, 40, "rwkv7"), (19, 32, 16, "weak")]
)
def test_wkv7_tc_odd_heads(device, force_rwkv_mode, T, K, V, decay):
    force_rwkv_mode("tc")
    x = op.make_inputs(1, T, 1, K, V, dtype=torch.float16, device=device, decay=decay,
                       w_dtype=torch.float32, initial_state=True, seed=K + T)  # fmt: skip
    op.check_case(x, f"tc-K{K}-V{V}", scale=0.6).assert_ok()


@pytest.mark.parametrize(
    "dtype,decay,K,V",
    [
        *((dt, d, 16, 16) for dt in (torch.bfloat16, torch.float16) for d in ("rwkv7", "weak")),
        (torch.bfloat16, "blockwise", 16, 16),
        (torch.float16, "blockwise", 16, 16),
        (torch.bfloat16, "blockwise", 64, 32),  # two 32-wide K slices in the factored backward
    ],
)
def test_wkv7_tc_factored_pairs_match_reference(
    device, force_rwkv_mode, blockwise_decay, dtype, decay, K, V
):
    """With a bf16 / fp16 w the tc kernels take the pair factors as tensor-core products in
    every block whose total decay is bounded; "blockwise" mixes such blocks with one that takes
    the exact pairwise path, in the forward and the backward."""
    force_rwkv_mode("tc")
    x = op.make_inputs(1, 50, 2 if K < 64 else 1, K, V, dtype=dtype, device=device, seed=11,
                       w_dtype=dtype, decay="rwkv7" if decay == "blockwise" else decay,
                       initial_state=True)  # fmt: skip
    if decay == "blockwise":
        blockwise_decay(x)
    op.check_case(x, f"tc-factored-{decay}-{dtype}").assert_ok()


def test_wkv7_tc_factored_pairs_agree_with_the_exact_path(device, blockwise_decay):
    """Same inputs through the factored path (fp16 w) and the exact pairwise path (the same w
    in fp32): outputs, state, checkpoints and every gradient agree to fp16 rounding. Sharper
    than the reference test: a wrong mask or factor in one path is an O(1) difference."""
    x = op.make_inputs(1, 50, 1, 16, 32, dtype=torch.float16, device=device, decay="rwkv7",
                       w_dtype=torch.float16, initial_state=True, seed=12)  # fmt: skip
    blockwise_decay(x, strong_block=2)
    h0, cfg = x["initial_state"], {"MODE": "tc"}
    runs = []
    for w in (x["w"], x["w"].float()):
        args = [w if n == "w" else x[n] for n in NAMES]
        o, ht, ck = launch.wkv7_fwd(*args, 1.0, h0, True, cfg)
        grads = launch.wkv7_bwd(x["do"], x["dht"], *args, 1.0, h0, ck, 16, cfg)
        runs.append({"o": o, "ht": ht, "ck": ck, **dict(zip([*NAMES, "h0"], grads, strict=True))})
    for name, got in runs[0].items():
        want = runs[1][name]
        err = float((got.float() - want.float()).norm() / want.float().norm())
        assert err < 2e-3, (name, err)


@pytest.mark.parametrize(
    "w_dtype,K,V,dpass,bt",
    [
        (torch.float16, 16, 32, 1, 64),
        (torch.float32, 16, 16, 2, 64),
        (torch.float16, 64, 32, 1, 64),
        (torch.float16, 64, 32, 2, 16),
        (torch.float16, 20, 24, 2, 64),
    ],
)
def test_wkv7_tc_decay_pass_matches_reference(device, force_rwkv_mode, blockwise_decay, w_dtype,
                                              K, V, dpass, bt):  # fmt: skip
    """``DPASS=1``: a decay pass writes each 16-step block's log decays and the gradient kernel
    reads them (and its neighbouring b / k / a / q / w rows) from memory; ``DPASS=2``: the
    bprep kernel and the serial cotangent passes read them too (BT 64: the chunk adjoints and
    the per-chunk fill; BT 16: one pass over every block). "blockwise" puts both
    decay paths in one chunk (fp16 w: each launch skips the other's blocks; fp32 w: the exact
    path everywhere); T = 90 ends in a partial block; V = 32 in two V-blocks (partial sums);
    K = 64 takes two 32-wide K slices on the factored path; K = 20, V = 24 masked lanes."""
    force_rwkv_mode("tc", BV=16, DPASS=dpass, BT=bt)
    x = op.make_inputs(1, 90, 2 if K < 64 else 1, K, V, dtype=torch.float16, device=device,
                       decay="rwkv7", w_dtype=w_dtype, initial_state=True, seed=K + V)  # fmt: skip
    blockwise_decay(x, strong_block=2)
    op.check_case(x, f"tc-dpass{dpass}-{w_dtype}-K{K}-V{V}-BT{bt}").assert_ok()


def test_wkv7_tc_decay_pass_agrees_with_the_in_kernel_scans(device):
    """DPASS 0, 1 and 2 compute the same values (the same log decays, read instead of formed):
    every gradient within fp16 rounding of DPASS 0's, on a block-crossing T, with the chunked
    serial passes (BT 64, three chunks) and with one pass over every block (BT 16)."""
    x = op.make_inputs(1, 150, 1, 16, 32, dtype=torch.float16, device=device, decay="mixed",
                       w_dtype=torch.float16, initial_state=True, seed=21)  # fmt: skip
    args, h0 = [x[n] for n in NAMES], x["initial_state"]
    _, _, ck = launch.wkv7_fwd(*args, 1.0, h0, True, {"MODE": "tc"})
    configs = [{"DPASS": 1}, {"DPASS": 2}, {"DPASS": 2, "BT": 16}]
    base, *runs = (
        launch.wkv7_bwd(x["do"], x["dht"], *args, 1.0, h0, ck, 16, {"MODE": "tc", "DPASS": 0, **c})
        for c in [{}, *configs]
    )
    for cfg, run in zip(configs, runs, strict=True):
        for name, g0, g1 in zip([*NAMES, "h0"], base, run, strict=True):
            err = float((g1.float() - g0.float()).norm() / g0.float().norm())
            assert err < 2e-3, (cfg, name, err)


def test_wkv7_tc_dw_stays_fp32_exact_under_strong_decay(device):
    """As WKV-6's test: the one-step factors of dw's dominant terms are exp(w) itself (measured
    dw error 2.6e-7, against 8.8e-7 with exp of cumulative-sum differences)."""
    from scanopt.reference import wkv7_bwd as ref_bwd
    from scanopt.verify import rel_l2, to_numpy

    x = op.make_inputs(1, 150, 1, 16, 16, dtype=torch.float16, device=device, decay="strong",
                       w_dtype=torch.float32, initial_state=True, seed=3)  # fmt: skip
    names = ("r", "w", "k", "v", "a", "b")
    args = [x[n] for n in names]
    h0, cfg = x["initial_state"], {"MODE": "tc"}
    _, _, ck = launch.wkv7_fwd(*args, 1.0, h0, True, cfg)
    dw = launch.wkv7_bwd(x["do"], x["dht"], *args, 1.0, h0, ck, 16, cfg)[1]
    ref = ref_bwd(to_numpy(x["do"]), *(to_numpy(a) for a in args), scale=1.0,
                  initial_state=to_numpy(h0), dfinal_state=to_numpy(x["dht"]))  # fmt: skip
    assert rel_l2(dw, ref["w"]) < 5e-7


def test_wkv7_tc_state_passing_and_checkpoints(device):
    """Continuing from a returned state equals one run, the tensor-core forward writes the
    recurrent forward's checkpoints, and each backward runs from the other's."""
    x = op.make_inputs(1, 45, 2, 16, dtype=torch.float16, device=device, decay="mixed",
                       w_dtype=torch.float32, initial_state=True, seed=5)  # fmt: skip
    args = [x[n] for n in NAMES]
    h0, tc = x["initial_state"], {"MODE": "tc"}
    o, ht, ck = launch.wkv7_fwd(*args, 1.0, h0, True, tc)
    o_rec, ht_rec, ck_rec = launch.wkv7_fwd(*args, 1.0, h0, True, {"MODE": "recurrent"})
    assert compare("o", o, o_rec, budget=2e-3).passed
    assert compare("ht", ht, ht_rec, budget=1e-5).passed
    assert compare("ckpt", ck, ck_rec, budget=1e-5).passed
    g_tc = launch.wkv7_bwd(x["do"], x["dht"], *args, 1.0, h0, ck_rec, 16, tc)
    g_rec = launch.wkv7_bwd(x["do"], x["dht"], *args, 1.0, h0, ck, 16, {"MODE": "recurrent"})
    for name, g1, g2 in zip([*NAMES, "h0"], g_tc, g_rec, strict=True):
        assert compare(name, g1, g2, budget=2e-3).passed, name
    cut = 20  # not a multiple of the block
    o1, s1, _ = launch.wkv7_fwd(*(t[:, :cut] for t in args), 1.0, h0, False, tc)
    o2, s2, _ = launch.wkv7_fwd(*(t[:, cut:] for t in args), 1.0, s1, False, tc)
    assert compare("o", torch.cat([o1, o2], 1), o, budget=2e-3).passed
    assert compare("ht", s2, ht, budget=1e-5).passed
    with pytest.raises(ValueError, match="bf16/fp16"):
        launch.wkv7_fwd(*(t.float() for t in args), 1.0, None, False, tc)
    with pytest.raises(ValueError, match="16-step checkpoints"):
        launch.wkv7_fwd(*args, 1.0, None, True, {**tc, "CHUNK": 32})


def test_wkv7_tc_serial_pass_width_and_warps(device):
    """The serial state / cotangent passes' V-block (BW), warps (SW) and chunk (BT) change
    nothing but speed: same outputs, state, checkpoints and gradients as the default tc config
    (T = 40: a partial last chunk at BT 32 and 64)."""
    x = op.make_inputs(1, 40, 1, 16, 32, dtype=torch.float16, device=device, decay="mixed",
                       initial_state=True, seed=9)  # fmt: skip
    args, h0 = [x[n] for n in NAMES], x["initial_state"]
    base = {"MODE": "tc"}
    o, ht, ck = launch.wkv7_fwd(*args, 1.0, h0, True, base)
    grads = launch.wkv7_bwd(x["do"], x["dht"], *args, 1.0, h0, ck, 16, base)
    # BT: the serial passes walk chunks of BT // 16 blocks (16: every block, serially)
    for cfg in (
        {**base, "BW": 32, "SW": 2},
        {**base, "BW": 64, "SW": 4},
        {**base, "BT": 16},
        {**base, "BT": 32, "BW": 32},
    ):
        o2, ht2, ck2 = launch.wkv7_fwd(*args, 1.0, h0, True, cfg)
        torch.testing.assert_close(o2, o, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(ht2, ht, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ck2, ck, rtol=1e-5, atol=1e-6)
        for g2, g in zip(
            launch.wkv7_bwd(x["do"], x["dht"], *args, 1.0, h0, ck, 16, cfg), grads, strict=True
        ):
            torch.testing.assert_close(g2, g, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="SW"):
        launch.wkv7_fwd(*args, 1.0, h0, False, {**base, "SW": 3})
    with pytest.raises(ValueError, match="DPASS 1 is the tc backward's"):
        launch.wkv7_bwd(x["do"], x["dht"], *args, 1.0, h0, ck, 16, {"MODE": "chunked", "DPASS": 1})
    with pytest.raises(ValueError, match="CARRY 1 is WKV-6's"):
        launch.wkv7_bwd(x["do"], x["dht"], *args, 1.0, h0, ck, 16, {**base, "CARRY": 1})


def test_wkv7_no_grad_returns_none_state_and_stores_no_checkpoints(device, monkeypatch):
    x = op.make_inputs(1, 10, 2, 16, device=device, seed=2)
    seen = []
    original = launch.wkv7_fwd

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[2].numel())
        return out

    monkeypatch.setattr(launch, "wkv7_fwd", spy)
    args = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    o, state = op.wkv7(*args)
    assert state is None and o.shape == (1, 10, 2, 16) and o.dtype == torch.float32
    assert seen == [0]  # no autograd -> no checkpoints


def test_wkv7_torch_backend(device, monkeypatch):
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    called = []
    monkeypatch.setattr(launch, "wkv7_fwd", lambda *a, **k: called.append(1))
    x = op.make_inputs(2, 17, 2, 16, device=device, decay="strong", initial_state=True, seed=11)
    op.check_case(x, "torch-backend").assert_ok()
    assert not called


def test_wkv7_launch_configs_agree(device):
    """Every mode and block size gives the same result, the two modes write the same
    checkpoints, and a backward in either mode runs from a forward in either: what the tuner and
    the per-direction MODE choice rely on."""
    x = op.make_inputs(1, 37, 1, 16, 32, device=device, decay="mixed", initial_state=True, seed=4)
    args = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    h0, do, dht = x["initial_state"], x["do"], x["dht"]

    def close(got, want):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)

    o, ht, ck = launch.wkv7_fwd(*args, 1.0, h0, True, {"MODE": "recurrent"})
    assert ck.shape == (1, 1, 3, 16, 32)
    fwd_configs = [
        {"MODE": "recurrent", "BV": 32, "CHUNK": 4, "PF": 1},
        {"MODE": "chunked", "BT": 16, "PF": 3},
        {"MODE": "chunked", "BT": 64, "BV": 32, "BW": 64, "CHUNK": 32},
    ]
    for cfg in fwd_configs:
        o2, ht2, ck2 = launch.wkv7_fwd(*args, 1.0, h0, True, cfg)
        close(o2, o)
        close(ht2, ht)
        if cfg.get("CHUNK", 16) == 16:
            close(ck2, ck)
    o3, ht3, ck3 = launch.wkv7_fwd(*args, 1.0, h0, False, {"MODE": "chunked", "BT": 16})
    close(o3, o)
    assert ck3.numel() == 0

    ref = launch.wkv7_bwd(do, dht, *args, 1.0, h0, ck, 16, {"MODE": "recurrent"})
    bwd_configs = [
        {"MODE": "recurrent", "BV": 32, "PF": 8},
        {"MODE": "chunked", "BT": 16, "PF": 1},
        {"MODE": "chunked", "BT": 32, "BV": 32, "BW": 32},
    ]
    for cfg in bwd_configs:
        for g, g_ref in zip(
            launch.wkv7_bwd(do, dht, *args, 1.0, h0, ck, 16, cfg), ref, strict=True
        ):
            close(g, g_ref)
    _, _, ck4 = launch.wkv7_fwd(*args, 1.0, h0, True, {"MODE": "recurrent", "CHUNK": 4})
    alt = launch.wkv7_bwd(do, dht, *args, 1.0, h0, ck4, 4, {"MODE": "recurrent"})
    for g, g_ref in zip(alt, ref, strict=True):
        close(g, g_ref)
    # no checkpoints: the backward recomputes them; no final-state cotangent
    nodht = launch.wkv7_bwd(do, None, *args, 1.0, h0, ck, 16, {"MODE": "recurrent"})
    for mode in ("recurrent", "chunked"):
        rec = launch.wkv7_bwd(do, None, *args, 1.0, h0, torch.empty(0), 16, {"MODE": mode})
        for g, g_ref in zip(rec, nodht, strict=True):
            close(g, g_ref)

    with pytest.raises(ValueError, match="BLOCK"):
        launch.wkv7_fwd(*args, 1.0, None, False, {"BLOCK": 3})
    with pytest.raises(ValueError, match="power of two"):
        launch.wkv7_fwd(*args, 1.0, None, False, {"BV": 24})
    with pytest.raises(ValueError, match="PF"):
        launch.wkv7_fwd(*args, 1.0, None, False, {"PF": 0})
    with pytest.raises(ValueError, match="MODE"):
        launch.wkv7_fwd(*args, 1.0, None, False, {"MODE": "fast"})
    with pytest.raises(ValueError, match="16-step checkpoints"):
        launch.wkv7_bwd(do, dht, *args, 1.0, h0, ck4, 4, {"MODE": "chunked"})


def test_wkv7_outputs_are_fully_written(device, mode):
    """Every element of every output is written (SCANOPT_POISON=1 fills buffers with NaN)."""
    assert _tensor.poison_outputs()
    x = op.make_inputs(1, 3, 1, 20, 40, device=device, initial_state=True, seed=9)
    args = [x[n].requires_grad_() for n in ("r", "w", "k", "v", "a", "b")]
    s0 = x["initial_state"].requires_grad_()
    o, ht = op.wkv7(*args, initial_state=s0, output_final_state=True)
    grads = torch.autograd.grad([o, ht], [*args, s0], [x["do"], x["dht"]])
    for t in (o, ht, *grads):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("used", [(1, 0), (0, 1)])
def test_wkv7_unused_outputs(device, used, unused_outputs_get_no_cotangent):
    x = op.make_inputs(1, 21, 2, 16, device=device, decay="mixed", seed=8)
    leaves = [x[n].detach().requires_grad_() for n in ("r", "w", "k", "v", "a", "b")]

    def outputs():
        return list(op.wkv7(*leaves, output_final_state=True))

    unused_outputs_get_no_cotangent(outputs, used, leaves, f"wkv7 {used}")


def test_wkv7_bad_inputs():
    x = op.make_inputs(1, 4, 2, 16)
    r, w, k, v, a, b = (x[n] for n in ("r", "w", "k", "v", "a", "b"))
    with pytest.raises(ValueError, match="r must have 4 dimensions"):
        op.wkv7(r[0], w, k, v, a, b)
    with pytest.raises(ValueError, match="w must have shape"):
        op.wkv7(r, w[:, :3], k, v, a, b)
    with pytest.raises(ValueError, match="v must have shape"):
        op.wkv7(r, w, k, v[:, :3], a, b)
    with pytest.raises(TypeError, match="b must have the same dtype"):
        op.wkv7(r, w, k, v, a, b.half())
    with pytest.raises(TypeError, match="k must be"):
        op.wkv7(r, w, k.int(), v, a, b)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        op.wkv7(r, w, k, v, a, b, initial_state=torch.zeros(1, 2, 16, 8))
    with pytest.raises(ValueError, match="a is on meta"):
        op.wkv7(r, w, k, v, a.to("meta"), b)
    big = torch.zeros(1, 2, 1, 300)
    with pytest.raises(ValueError, match="head size K"):
        op.wkv7(big, big, big, big, big, big)
    with pytest.raises(ValueError, match="T must be >= 1"):
        op.wkv7(*(t[:, :0] for t in (r, w, k, v, a, b)))
    with pytest.raises(ValueError, match="multiple of head_size"):
        op.wkv7_rwkvlm(*(torch.zeros(1, 2, 40) for _ in range(6)), head_size=16)


def test_wkv7_fp16_w_is_allowed_and_mixed_dtypes_keep_theirs(device):
    x = op.make_inputs(1, 5, 1, 16, dtype=torch.float16, w_dtype=torch.float32, device=device)
    args = [x[n].requires_grad_() for n in ("r", "w", "k", "v", "a", "b")]
    o, _ = op.wkv7(*args)
    grads = torch.autograd.grad(o, args, x["do"])
    assert o.dtype == torch.float16
    assert [g.dtype for g in grads] == [t.dtype for t in args]


def test_wkv7_opcheck(monkeypatch):
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    x = op.make_inputs(1, 5, 1, 16, initial_state=True, seed=1)
    args = [x[n].requires_grad_() for n in ("r", "w", "k", "v", "a", "b")]
    s0 = x["initial_state"].requires_grad_()
    torch.library.opcheck(torch.ops.scanopt.wkv7_fwd, (*args, 1.0, s0, True, 4))
    torch.library.opcheck(torch.ops.scanopt.wkv7_fwd, (*args, 1.0, None, False, 16))


def test_wkv7_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    x = op.make_inputs(1, 6, 1, 16, initial_state=True, seed=8)
    args = [x[n].requires_grad_() for n in ("r", "w", "k", "v", "a", "b")]

    def f(r, w, k, v, a, b, s0):
        o, s = op.wkv7(r, w, k, v, a, b, initial_state=s0, output_final_state=True)
        return (o * o).sum() + s.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*args, x["initial_state"])
    grads = torch.autograd.grad(loss, args)
    loss_ref = f(*args, x["initial_state"])
    grads_ref = torch.autograd.grad(loss_ref, args)
    torch.testing.assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)


def _rwkvlm_clampw_numpy(r, w, k, v, a, b, head_size, s0=None):
    """RWKV-LM's rwkv7_clampw.cu forward, transcribed: state S[v][k], decay
    exp(-exp(-0.5) * sigmoid(w)), sa = S a (old state), S = S diag(decay) + sa b^T + v k^T."""
    r, w, k, v, a, b = (np.asarray(t.detach().double()) for t in (r, w, k, v, a, b))
    B, T, C = r.shape
    H, N = C // head_size, head_size
    shape4 = (B, T, H, N)
    r, w, k, v, a, b = (t.reshape(shape4) for t in (r, w, k, v, a, b))
    decay = np.exp(-math.exp(-0.5) / (1.0 + np.exp(-w)))
    S = np.zeros((B, H, N, N)) if s0 is None else np.asarray(s0.double()).copy()
    y = np.zeros(shape4)
    for t in range(T):
        sa = np.einsum("bhij,bhj->bhi", S, a[:, t])
        S = (
            S * decay[:, t, :, None, :]
            + sa[..., None] * b[:, t, :, None, :]
            + v[:, t, :, :, None] * k[:, t, :, None, :]
        )
        y[:, t] = np.einsum("bhij,bhj->bhi", S, r[:, t])
    return y.reshape(B, T, C), S


def test_wkv7_rwkvlm_adapter(device):
    B, T, H, N = 1, 21, 2, 16
    g = torch.Generator().manual_seed(0)
    x = op.make_inputs(B, T, H, N, device=device, seed=6)
    w_raw = torch.randn(B, T, H * N, generator=g).to(device) * 2
    flat = {n: x[n].reshape(B, T, H * N) for n in ("r", "k", "v", "a", "b")}
    args = (flat["r"], w_raw, flat["k"], flat["v"], flat["a"], flat["b"])
    y = op.wkv7_rwkvlm(*args, head_size=N)
    y_ref, s_ref = _rwkvlm_clampw_numpy(*args, head_size=N)
    assert compare("y", y, y_ref, budget=1e-5).passed
    # state in RWKV-LM's [v][k] layout, passed through two calls
    cut = 8
    y1, s1 = op.wkv7_rwkvlm(*(t[:, :cut] for t in args), head_size=N, output_final_state=True)
    y2, s2 = op.wkv7_rwkvlm(
        *(t[:, cut:] for t in args), head_size=N, initial_state=s1, output_final_state=True
    )
    assert compare("y", torch.cat([y1, y2], 1), y_ref, budget=1e-5).passed
    assert compare("state", s2, s_ref, budget=1e-5).passed
    # gradients reach the raw decay
    w_leaf = w_raw.clone().requires_grad_()
    op.wkv7_rwkvlm(args[0], w_leaf, *args[2:], head_size=N).sum().backward()
    assert w_leaf.grad is not None and torch.isfinite(w_leaf.grad).all()


# ---------------------------------------------------------------------------------------------
# GPU (run on the H200 with `pytest -m gpu`)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4096, 16384])
def test_wkv7_gpu_bf16_long(gpu_mode, T):
    x = op.make_inputs(1, T, 2 if T < 16384 else 1, 64, dtype=torch.bfloat16, device="cuda",
                       decay="rwkv7", initial_state=True, seed=T)  # fmt: skip
    op.check_case(x, f"bf16-T{T}-{gpu_mode}").assert_ok()


# (K, dtype, decay): every head size, every dtype, both decay extremes, without compiling the
# full cross product (each (K, dtype, mode) is a separate set of Triton compilations)
GPU_CASES = [
    (64, torch.bfloat16, "strong"),
    (64, torch.bfloat16, "weak"),
    (64, torch.float16, "mixed"),
    (64, torch.float32, "mixed"),
    (16, torch.bfloat16, "mixed"),
    (32, torch.float32, "strong"),
    (128, torch.bfloat16, "mixed"),
    (128, torch.float32, "weak"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("K,dtype,decay", GPU_CASES)
def test_wkv7_gpu_dtypes_heads(gpu_mode, K, dtype, decay):
    x = op.make_inputs(2, 300, 2, K, dtype=dtype, device="cuda", decay=decay,
                       w_dtype=_w_dtype(dtype), initial_state=True, seed=K)  # fmt: skip
    op.check_case(x, f"K{K}-{dtype}-{decay}-{gpu_mode}").assert_ok()


@pytest.mark.gpu
def test_wkv7_gpu_many_programs(gpu_mode):
    """The anchor's B * H = 128 (every program id and V-block offset exercised)."""
    x = op.make_inputs(4, 130, 32, 64, dtype=torch.bfloat16, device="cuda", initial_state=True)
    op.check_case(x, f"B4-H32-{gpu_mode}").assert_ok()


@pytest.mark.gpu
@pytest.mark.parametrize("dpass", [1, 2])
@pytest.mark.parametrize("T,dtype", [(4096, torch.bfloat16), (300, torch.float16)])
def test_wkv7_gpu_tc_decay_pass(force_rwkv_mode, T, dtype, dpass):
    """The tc backward's decay pass (``DPASS`` 1 or 2, opt-in) at the default block sizes."""
    force_rwkv_mode("tc", DPASS=dpass)
    x = op.make_inputs(2, T, 2, 64, dtype=dtype, device="cuda", decay="mixed",
                       w_dtype=_w_dtype(dtype), initial_state=True, seed=T + 1)  # fmt: skip
    op.check_case(x, f"T{T}-{dtype}-dpass{dpass}").assert_ok()


@pytest.mark.gpu
def test_wkv7_gpu_self_check():
    assert all(rep.passed for rep in op.self_check("cuda", quick=False))
