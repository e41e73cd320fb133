"""RWKV-6 WKV (``scanopt.wkv6``): forward, every gradient and the state against the float64
reference with the verify rule; state passing; the torch backend; errors; torch.compile; the
RWKV-LM adapter; launch configs. CPU tests run the Triton kernels through the interpreter."""

import numpy as np
import pytest
import torch

from scanopt import _tensor
from scanopt.ops import _rwkv_common
from scanopt.ops.wkv6 import launch, op
from scanopt.verify import compare

FP = [torch.float32, torch.float16]
NAMES = ("r", "k", "v", "w", "u")


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
def test_wkv6_matches_reference(device, mode, T, decay, with_state, dtype):
    x = op.make_inputs(
        2 if T < 100 else 1, T, 2, 16, dtype=dtype, device=device, decay=decay,
        w_dtype=_w_dtype(dtype), initial_state=with_state, seed=T + 7 * with_state,
    )  # fmt: skip
    op.check_case(x, f"T{T}-{decay}-h0={with_state}").assert_ok()


@pytest.mark.parametrize(
    "B,T,H,K,V,decay",
    [
        (1, 33, 1, 20, 24, "mixed"),  # K, V not powers of two (masked lanes)
        (1, 40, 2, 16, 40, "rwkv6"),  # several V-blocks (one partial): partial sums over V
        (1, 19, 1, 32, 32, "mixed"),
    ],
)
def test_wkv6_odd_heads(device, mode, B, T, H, K, V, decay):
    x = op.make_inputs(B, T, H, K, V, device=device, decay=decay, initial_state=True, seed=K)
    op.check_case(x, f"K{K}-V{V}").assert_ok()


def test_wkv6_scale(device, mode):
    x = op.make_inputs(1, 9, 2, 16, device=device, initial_state=True, seed=3)
    op.check_case(x, "scale", scale=16**-0.5).assert_ok()


def test_wkv6_state_passing_equals_one_run(device, mode):
    x = op.make_inputs(1, 45, 2, 16, device=device, decay="mixed", initial_state=True, seed=5)

    def leaves():
        s0 = x["initial_state"].clone().requires_grad_()
        return [x[n].clone().requires_grad_() for n in NAMES], s0

    full, s0 = leaves()
    o, ht = op.wkv6(*full, initial_state=s0, output_final_state=True)
    g_full = torch.autograd.grad([o, ht], [*full, s0], [x["do"], x["dht"]])

    parts, p0 = leaves()
    r, k, v, w, u = parts
    cut = 20  # not a multiple of the checkpoint chunk
    first = [t[:, :cut] for t in (r, k, v, w)]
    second = [t[:, cut:] for t in (r, k, v, w)]
    o1, s1 = op.wkv6(*first, u, initial_state=p0, output_final_state=True)
    o2, s2 = op.wkv6(*second, u, initial_state=s1, output_final_state=True)
    o_cat = torch.cat([o1, o2], 1)
    g_parts = torch.autograd.grad([o_cat, s2], [*parts, p0], [x["do"], x["dht"]])

    torch.testing.assert_close(o_cat, o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s2, ht, rtol=1e-5, atol=1e-6)
    for name, g1, g2 in zip([*NAMES, "initial_state"], g_parts, g_full, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture
def tc(force_rwkv_mode):
    """The tensor-core kernels (fp16 here: the interpreter cannot do bf16 arithmetic), the
    forward in 32-step chunks of two sub-chunks, 16-wide V-blocks (partial sums over V)."""
    force_rwkv_mode("tc", BT=32, BV=16)


@pytest.mark.parametrize("T", [1, 17, 100])
@pytest.mark.parametrize("decay", ["strong", "mixed"])
@pytest.mark.parametrize("with_state", [False, True])
def test_wkv6_tc_matches_reference(device, tc, T, decay, with_state):
    x = op.make_inputs(
        2 if T < 100 else 1, T, 2, 16, dtype=torch.float16, device=device, decay=decay,
        w_dtype=torch.float32, initial_state=with_state, seed=T + 7 * with_state,
    )  # fmt: skip
    op.check_case(x, f"tc-T{T}-{decay}-h0={with_state}").assert_ok()


@pytest.mark.parametrize(
    "T,K,V,cfg",
    [
        (33, 20, 24, {}),  # K, V not powers of two (masked lanes)
        (70, 16, 40, {"BT": 64}),  # several V-blocks (one partial), four sub-chunks, tail chunk
        (45, 32, 16, {"BT": 16, "BW": 16}),  # one sub-chunk per chunk
    ],
)
def test_wkv6_tc_odd_heads_and_chunks(device, force_rwkv_mode, T, K, V, cfg):
    force_rwkv_mode("tc", **cfg)
    x = op.make_inputs(1, T, 1, K, V, dtype=torch.float16, device=device, decay="mixed",
                       w_dtype=torch.float32, initial_state=True, seed=K + T)  # fmt: skip
    op.check_case(x, f"tc-K{K}-V{V}-{cfg}", scale=0.6).assert_ok()


def test_wkv6_tc_state_passing_and_checkpoints(device):
    """Continuing from a returned state equals one run, and the tensor-core forward writes the
    recurrent forward's checkpoints (the backward reads them)."""
    x = op.make_inputs(1, 45, 2, 16, dtype=torch.float16, device=device, decay="mixed",
                       w_dtype=torch.float32, initial_state=True, seed=5)  # fmt: skip
    r, k, v, w, u = (x[n] for n in NAMES)
    h0 = x["initial_state"]
    tc_cfg = {"MODE": "tc", "BT": 32}
    o, ht, ck = launch.wkv6_fwd(r, k, v, w, u, 1.0, h0, True, tc_cfg)
    o_rec, ht_rec, ck_rec = launch.wkv6_fwd(r, k, v, w, u, 1.0, h0, True, {"MODE": "recurrent"})
    assert compare("o", o, o_rec, budget=2e-3).passed
    assert compare("ht", ht, ht_rec, budget=1e-5).passed
    assert compare("ckpt", ck, ck_rec, budget=1e-5).passed
    cut = 20  # not a multiple of the chunk
    o1, s1, _ = launch.wkv6_fwd(*(t[:, :cut] for t in (r, k, v, w)), u, 1.0, h0, False, tc_cfg)
    o2, s2, _ = launch.wkv6_fwd(*(t[:, cut:] for t in (r, k, v, w)), u, 1.0, s1, False, tc_cfg)
    assert compare("o", torch.cat([o1, o2], 1), o, budget=2e-3).passed
    assert compare("ht", s2, ht, budget=1e-5).passed


def test_wkv6_tc_serial_pass_width_and_warps(device):
    """The serial state / cotangent passes' V-block (BW) and warps (SW) change nothing but
    speed: same outputs, state and gradients as the default tc config."""
    x = op.make_inputs(1, 40, 1, 16, 32, dtype=torch.float16, device=device, decay="mixed",
                       initial_state=True, seed=9)  # fmt: skip
    args, h0 = [x[n] for n in NAMES], x["initial_state"]
    base = {"MODE": "tc"}
    o, ht, ck = launch.wkv6_fwd(*args, 1.0, h0, True, base)
    grads = launch.wkv6_bwd(x["do"], x["dht"], *args, 1.0, h0, ck, 16, base)
    for cfg in ({**base, "BW": 32, "SW": 2}, {**base, "BW": 64, "SW": 4}):
        o2, ht2, ck2 = launch.wkv6_fwd(*args, 1.0, h0, True, cfg)
        torch.testing.assert_close(o2, o, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(ht2, ht, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ck2, ck, rtol=1e-5, atol=1e-6)
        for g2, g in zip(
            launch.wkv6_bwd(x["do"], x["dht"], *args, 1.0, h0, ck, 16, cfg), grads, strict=True
        ):
            torch.testing.assert_close(g2, g, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="SW"):
        launch.wkv6_fwd(*args, 1.0, h0, False, {**base, "SW": 3})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decay", ["rwkv6", "weak", "blockwise"])
def test_wkv6_tc_factored_pairs_match_reference(
    device, force_rwkv_mode, blockwise_decay, dtype, decay
):
    """With a bf16 / fp16 w the tc kernels take the pair factors inside a 16-step block as
    tensor-core products where the block's total decay is bounded; "blockwise" mixes such blocks
    with one that takes the exact pairwise path, in the forward and the backward."""
    force_rwkv_mode("tc", BT=32)
    x = op.make_inputs(1, 50, 2, 16, dtype=dtype, device=device, w_dtype=dtype, seed=11,
                       decay="rwkv6" if decay == "blockwise" else decay, initial_state=True)  # fmt: skip
    if decay == "blockwise":
        blockwise_decay(x)
    op.check_case(x, f"tc-factored-{decay}-{dtype}").assert_ok()


def test_wkv6_tc_factored_pairs_agree_with_the_exact_path(device, blockwise_decay):
    """Same inputs through the factored path (fp16 w) and the exact pairwise path (the same w
    in fp32): outputs, state, checkpoints and every gradient agree to fp16 rounding."""
    x = op.make_inputs(1, 50, 1, 16, 32, dtype=torch.float16, device=device, decay="rwkv6",
                       w_dtype=torch.float16, initial_state=True, seed=12)  # fmt: skip
    blockwise_decay(x, strong_block=2)
    h0, cfg = x["initial_state"], {"MODE": "tc", "BT": 32}
    runs = []
    for w in (x["w"], x["w"].float()):
        args = [w if n == "w" else x[n] for n in NAMES]
        o, ht, ck = launch.wkv6_fwd(*args, 1.0, h0, True, cfg)
        grads = launch.wkv6_bwd(x["do"], x["dht"], *args, 1.0, h0, ck, 16, cfg)
        runs.append({"o": o, "ht": ht, "ck": ck, **dict(zip([*NAMES, "h0"], grads, strict=True))})
    for name, got in runs[0].items():
        want = runs[1][name]
        err = float((got.float() - want.float()).norm() / want.float().norm())
        assert err < 2e-3, (name, err)


@pytest.mark.parametrize(
    "w_dtype,bt,carry,dpass",
    [
        (torch.float16, 32, 1, 0),
        (torch.float16, 64, 1, 0),
        (torch.float32, 64, 1, 0),
        (torch.float16, 64, 0, 1),
        (torch.float32, 32, 0, 1),
        (torch.float16, 32, 1, 1),
    ],
)
def test_wkv6_tc_backward_switches_match_reference(
    device, force_rwkv_mode, blockwise_decay, w_dtype, bt, carry, dpass
):
    """The WKV-6 tc backward's switches. ``CARRY=1``: one program per BT-step chunk carries the
    state cotangent back through its 16-step blocks. ``DPASS=1``: a decay pass writes each
    block's log decays and the gradient kernel reads them (and its neighbouring key / query
    rows) from memory. "blockwise" puts both decay paths in one chunk (fp16 w: each launch skips
    the other's blocks; fp32 w: the exact path everywhere); T = 90 ends in a partial chunk and
    block; V = 32 in two V-blocks."""
    force_rwkv_mode("tc", BT=bt, BV=16, CARRY=carry, DPASS=dpass)
    x = op.make_inputs(1, 90, 2, 16, 32, dtype=torch.float16, device=device, decay="rwkv6",
                       w_dtype=w_dtype, initial_state=True, seed=bt + carry)  # fmt: skip
    blockwise_decay(x, strong_block=2)
    op.check_case(x, f"tc-BT{bt}-carry{carry}-dpass{dpass}-{w_dtype}").assert_ok()


def test_wkv6_tc_dw_stays_fp32_exact_under_strong_decay(device):
    """Under strong decay dw is dominated by terms one step apart (factor exp(w) of that step);
    the tc backward must take that factor as exp(w) itself, not as exp of a difference of
    cumulative sums (~1e-5 relative off at |g| ~ 300): with an fp32 w, dw's error stays
    ~50x under the verify limit (4e-6) instead of at 80% of it (measured 2.2e-7 vs 3.3e-6)."""
    from scanopt.reference import wkv6_bwd as ref_bwd
    from scanopt.verify import rel_l2, to_numpy

    x = op.make_inputs(1, 150, 1, 16, 16, dtype=torch.float16, device=device, decay="strong",
                       w_dtype=torch.float32, initial_state=True, seed=3)  # fmt: skip
    args = [x[n] for n in NAMES]
    h0, cfg = x["initial_state"], {"MODE": "tc", "BT": 32}
    _, _, ck = launch.wkv6_fwd(*args, 1.0, h0, True, cfg)
    dw = launch.wkv6_bwd(x["do"], x["dht"], *args, 1.0, h0, ck, 16, cfg)[3]
    ref = ref_bwd(to_numpy(x["do"]), *(to_numpy(a) for a in args), scale=1.0,
                  initial_state=to_numpy(h0), dfinal_state=to_numpy(x["dht"]))  # fmt: skip
    assert rel_l2(dw, ref["w"]) < 5e-7


def test_wkv6_tc_final_state_stays_fp32_exact(device):
    """The tc state pass takes each step's decay to the block end as a sum from the end, not as
    exp of a difference of two prefix sums (~ulp(|g_end|) off in the factors near 1 that
    dominate the state): with an fp32 w over a 64-step block of mixed decay the final state's
    error stays at the fp32 loop's (measured 4.8e-8; the difference form gave 4.2e-6 on the
    interpreter and 4.9e-6 on an H100, over the verify limit of 4e-6)."""
    from scanopt.reference import wkv6_fwd as ref_fwd
    from scanopt.verify import rel_l2, to_numpy

    x = op.make_inputs(1, 65, 1, 64, dtype=torch.float16, device=device, decay="mixed",
                       w_dtype=torch.float32, initial_state=True, seed=0)  # fmt: skip
    args = [x[n] for n in NAMES]
    _, ht, _ = launch.wkv6_fwd(*args, 1.0, x["initial_state"], False, {"MODE": "tc", "BT": 64})
    ref = ref_fwd(*(to_numpy(a) for a in args), scale=1.0,
                  initial_state=to_numpy(x["initial_state"]))  # fmt: skip
    assert rel_l2(ht, ref[1]) < 5e-7


def test_wkv6_tc_config_errors(device):
    x = op.make_inputs(1, 8, 1, 16, device=device, seed=1)
    args = [x[n] for n in NAMES]
    with pytest.raises(ValueError, match="bf16/fp16"):
        launch.wkv6_fwd(*args, 1.0, None, False, {"MODE": "tc"})  # fp32 inputs
    half = [a.half() for a in args]
    with pytest.raises(ValueError, match=">= 16"):
        launch.wkv6_fwd(*half, 1.0, None, False, {"MODE": "tc", "BV": 8})
    _, _, ck4 = launch.wkv6_fwd(*half, 1.0, None, True, {"MODE": "recurrent", "CHUNK": 4})
    with pytest.raises(ValueError, match="16-step checkpoints"):
        launch.wkv6_bwd(half[2], None, *half, 1.0, None, ck4, 4, {"MODE": "tc"})
    _, _, ck = launch.wkv6_fwd(*half, 1.0, None, True, {"MODE": "tc"})
    with pytest.raises(ValueError, match="CARRY must be 0 or 1"):
        launch.wkv6_bwd(half[2], None, *half, 1.0, None, ck, 16, {"MODE": "tc", "CARRY": 2})
    with pytest.raises(ValueError, match="CARRY 1 is WKV-6's tc"):
        launch.wkv6_bwd(half[2], None, *half, 1.0, None, ck, 16, {"MODE": "chunked", "CARRY": 1})
    with pytest.raises(ValueError, match="DPASS must be 0 or 1"):
        launch.wkv6_bwd(half[2], None, *half, 1.0, None, ck, 16, {"MODE": "tc", "DPASS": -1})


def test_wkv6_forced_mode_reaches_the_public_op(device, monkeypatch):
    """``forced_mode`` (what ``scanopt bench``'s scanopt-chunked provider uses) switches the public
    op to the tensor-core kernels for fp16 and leaves fp32 and the default alone."""
    seen = []
    original = launch._wkv6_fwd_tc
    monkeypatch.setattr(launch, "_wkv6_fwd_tc", lambda *a: seen.append(1) or original(*a))
    resolve = _rwkv_common.resolve_config
    kw = {"T": 40, "K": 16, "V": 16, "B": 1, "H": 1, "device": torch.device(device)}
    x = op.make_inputs(1, 40, 1, 16, dtype=torch.float16, device=device, w_dtype=torch.float32)
    with _rwkv_common.forced_mode("wkv6", "tc"):
        assert resolve("wkv6", "bwd", None, dtype=torch.float16, **kw)["MODE"] == "tc"
        assert resolve("wkv6", "fwd", None, dtype=torch.float32, **kw)["MODE"] != "tc"
        o, _ = op.wkv6(*(x[n] for n in NAMES))
    assert seen == [1]
    assert resolve("wkv6", "fwd", None, dtype=torch.float16, **kw)["MODE"] != "tc"
    assert torch.equal(
        o, launch.wkv6_fwd(*(x[n] for n in NAMES), 1.0, None, False, {"MODE": "tc"})[0]
    )
    with pytest.raises(ValueError, match="MODE"):
        with _rwkv_common.forced_mode("wkv6", "fast"):
            pass
    # overrides go on top of the forced family's default, per direction; an explicit key wins
    with _rwkv_common.forced_mode("wkv6", "tc", BW=32, SW=2, CHUNK=16):
        fwd = resolve("wkv6", "fwd", None, dtype=torch.float16, **kw)
        bwd = resolve("wkv6", "bwd", {"SW": 4}, dtype=torch.float16, **kw)
    assert (fwd["MODE"], fwd["BW"], fwd["SW"], bwd["BW"], bwd["SW"]) == ("tc", 32, 2, 32, 4)
    assert "CHUNK" not in bwd
    with pytest.raises(ValueError, match="unknown config keys"):
        with _rwkv_common.forced_mode("wkv6", "tc", BLOCK=3):
            pass


def test_wkv6_no_grad_returns_none_state_and_stores_no_checkpoints(device, monkeypatch):
    x = op.make_inputs(1, 10, 2, 16, device=device, seed=2)
    seen = []
    original = launch.wkv6_fwd

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[2].numel())
        return out

    monkeypatch.setattr(launch, "wkv6_fwd", spy)
    o, state = op.wkv6(*(x[n] for n in NAMES))
    assert state is None and o.shape == (1, 10, 2, 16) and o.dtype == torch.float32
    assert seen == [0]  # no autograd -> no checkpoints


def test_wkv6_torch_backend(device, monkeypatch):
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    called = []
    monkeypatch.setattr(launch, "wkv6_fwd", lambda *a, **k: called.append(1))
    x = op.make_inputs(2, 17, 2, 16, device=device, decay="strong", initial_state=True, seed=11)
    op.check_case(x, "torch-backend").assert_ok()
    assert not called


def test_wkv6_launch_configs_agree(device):
    """Every mode and block size gives the same result, the two modes write the same
    checkpoints, and a backward in either mode runs from a forward in either: what the tuner and
    the per-direction MODE choice rely on."""
    x = op.make_inputs(1, 37, 1, 16, 32, device=device, decay="mixed", initial_state=True, seed=4)
    args = [x[n] for n in NAMES]
    h0, do, dht = x["initial_state"], x["do"], x["dht"]

    def close(got, want):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)

    o, ht, ck = launch.wkv6_fwd(*args, 1.0, h0, True, {"MODE": "recurrent"})
    assert ck.shape == (1, 1, 3, 16, 32)
    fwd_configs = [
        {"MODE": "recurrent", "BV": 32, "CHUNK": 4, "PF": 1},
        {"MODE": "chunked", "BT": 16, "PF": 3},
        {"MODE": "chunked", "BT": 64, "BV": 32, "BW": 64, "CHUNK": 32},
    ]
    for cfg in fwd_configs:
        o2, ht2, ck2 = launch.wkv6_fwd(*args, 1.0, h0, True, cfg)
        close(o2, o)
        close(ht2, ht)
        if cfg.get("CHUNK", 16) == 16:
            close(ck2, ck)
    o3, ht3, ck3 = launch.wkv6_fwd(*args, 1.0, h0, False, {"MODE": "chunked", "BT": 16})
    close(o3, o)
    assert ck3.numel() == 0

    ref = launch.wkv6_bwd(do, dht, *args, 1.0, h0, ck, 16, {"MODE": "recurrent"})
    bwd_configs = [
        {"MODE": "recurrent", "BV": 32, "PF": 8},
        {"MODE": "chunked", "BT": 16, "PF": 1},
        {"MODE": "chunked", "BT": 32, "BV": 32, "BW": 32},
    ]
    for cfg in bwd_configs:
        for g, g_ref in zip(
            launch.wkv6_bwd(do, dht, *args, 1.0, h0, ck, 16, cfg), ref, strict=True
        ):
            close(g, g_ref)
    _, _, ck4 = launch.wkv6_fwd(*args, 1.0, h0, True, {"MODE": "recurrent", "CHUNK": 4})
    alt = launch.wkv6_bwd(do, dht, *args, 1.0, h0, ck4, 4, {"MODE": "recurrent"})
    for g, g_ref in zip(alt, ref, strict=True):
        close(g, g_ref)
    # no checkpoints: the backward recomputes them; no final-state cotangent
    nodht = launch.wkv6_bwd(do, None, *args, 1.0, h0, ck, 16, {"MODE": "recurrent"})
    for mode in ("recurrent", "chunked"):
        rec = launch.wkv6_bwd(do, None, *args, 1.0, h0, torch.empty(0), 16, {"MODE": mode})
        for g, g_ref in zip(rec, nodht, strict=True):
            close(g, g_ref)

    with pytest.raises(ValueError, match="BLOCK"):
        launch.wkv6_fwd(*args, 1.0, None, False, {"BLOCK": 3})
    with pytest.raises(ValueError, match="power of two"):
        launch.wkv6_fwd(*args, 1.0, None, False, {"BV": 24})
    with pytest.raises(ValueError, match="PF"):
        launch.wkv6_fwd(*args, 1.0, None, False, {"PF": 0})
    with pytest.raises(ValueError, match="MODE"):
        launch.wkv6_fwd(*args, 1.0, None, False, {"MODE": "fast"})
    with pytest.raises(ValueError, match="16-step checkpoints"):
        launch.wkv6_bwd(do, dht, *args, 1.0, h0, ck4, 4, {"MODE": "chunked"})


def test_wkv6_outputs_are_fully_written(device, mode):
    """Every element of every output is written (SCANOPT_POISON=1 fills buffers with NaN)."""
    assert _tensor.poison_outputs()
    x = op.make_inputs(1, 3, 1, 20, 40, device=device, initial_state=True, seed=9)
    args = [x[n].requires_grad_() for n in NAMES]
    s0 = x["initial_state"].requires_grad_()
    o, ht = op.wkv6(*args, initial_state=s0, output_final_state=True)
    grads = torch.autograd.grad([o, ht], [*args, s0], [x["do"], x["dht"]])
    for t in (o, ht, *grads):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("used", [(1, 0), (0, 1)])
def test_wkv6_unused_outputs(device, used, unused_outputs_get_no_cotangent):
    x = op.make_inputs(1, 21, 2, 16, device=device, decay="mixed", seed=8)
    leaves = [x[n].detach().requires_grad_() for n in ("r", "k", "v", "w", "u")]

    def outputs():
        return list(op.wkv6(*leaves, output_final_state=True))

    unused_outputs_get_no_cotangent(outputs, used, leaves, f"wkv6 {used}")


def test_wkv6_bad_inputs():
    x = op.make_inputs(1, 4, 2, 16)
    r, k, v, w, u = (x[n] for n in NAMES)
    with pytest.raises(ValueError, match="r must have 4 dimensions"):
        op.wkv6(r[0], k, v, w, u)
    with pytest.raises(ValueError, match="w must have shape"):
        op.wkv6(r, k, v, w[:, :3], u)
    with pytest.raises(ValueError, match="v must have shape"):
        op.wkv6(r, k, v[:, :3], w, u)
    with pytest.raises(ValueError, match="u must have shape"):
        op.wkv6(r, k, v, w, u[0])
    with pytest.raises(TypeError, match="v must have the same dtype"):
        op.wkv6(r, k, v.half(), w, u)
    with pytest.raises(TypeError, match="k must be"):
        op.wkv6(r, k.int(), v, w, u)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        op.wkv6(r, k, v, w, u, initial_state=torch.zeros(1, 2, 16, 8))
    with pytest.raises(ValueError, match="w is on meta"):
        op.wkv6(r, k, v, w.to("meta"), u)
    big = torch.zeros(1, 2, 1, 300)
    with pytest.raises(ValueError, match="head size K"):
        op.wkv6(big, big, big, big, torch.zeros(1, 300))
    with pytest.raises(ValueError, match="T must be >= 1"):
        op.wkv6(*(t[:, :0] for t in (r, k, v, w)), u)
    with pytest.raises(ValueError, match="multiple of H"):
        op.wkv6_rwkvlm(1, 2, 40, 3, *(torch.zeros(1, 2, 40) for _ in range(4)), torch.zeros(3))


def test_wkv6_fp16_w_is_allowed_and_mixed_dtypes_keep_theirs(device):
    x = op.make_inputs(1, 5, 1, 16, dtype=torch.float16, w_dtype=torch.float32, device=device)
    args = [x[n].requires_grad_() for n in NAMES]
    o, _ = op.wkv6(*args)
    grads = torch.autograd.grad(o, args, x["do"])
    assert o.dtype == torch.float16
    assert [g.dtype for g in grads] == [t.dtype for t in args]


def test_wkv6_opcheck(monkeypatch):
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    x = op.make_inputs(1, 5, 1, 16, initial_state=True, seed=1)
    args = [x[n].requires_grad_() for n in NAMES]
    s0 = x["initial_state"].requires_grad_()
    torch.library.opcheck(torch.ops.scanopt.wkv6_fwd, (*args, 1.0, s0, True, 4))
    torch.library.opcheck(torch.ops.scanopt.wkv6_fwd, (*args, 1.0, None, False, 16))


def test_wkv6_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    x = op.make_inputs(1, 6, 1, 16, initial_state=True, seed=8)
    args = [x[n].requires_grad_() for n in NAMES]

    def f(r, k, v, w, u, s0):
        o, s = op.wkv6(r, k, v, w, u, initial_state=s0, output_final_state=True)
        return (o * o).sum() + s.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*args, x["initial_state"])
    grads = torch.autograd.grad(loss, args)
    loss_ref = f(*args, x["initial_state"])
    grads_ref = torch.autograd.grad(loss_ref, args)
    torch.testing.assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)


def _rwkvlm_wkv6_numpy(B, T, C, H, r, k, v, w, u, s0=None):
    """RWKV-LM's wkv6_cuda.cu forward, transcribed: state S[v][k], decay exp(-exp(w)),
    y_i = sum_j r_j (u_j k_j v_i + S_ij), then S_ij = S_ij decay_j + k_j v_i."""
    r, k, v, w, u = (np.asarray(t.detach().double()) for t in (r, k, v, w, u))
    N = C // H
    r, k, v, w = (t.reshape(B, T, H, N) for t in (r, k, v, w))
    u = u.reshape(H, N)
    decay = np.exp(-np.exp(w))
    S = np.zeros((B, H, N, N)) if s0 is None else np.asarray(s0.double()).copy()
    y = np.zeros((B, T, H, N))
    for t in range(T):
        vk = v[:, t, :, :, None] * k[:, t, :, None, :]  # [B, H, i=v, j=k]
        y[:, t] = np.einsum("bhj,bhij->bhi", r[:, t], u[None, :, None, :] * vk + S)
        S = S * decay[:, t, :, None, :] + vk
    return y.reshape(B, T, C), S


def test_wkv6_rwkvlm_adapter(device):
    B, T, H, N = 1, 21, 2, 16
    C = H * N
    g = torch.Generator().manual_seed(0)
    x = op.make_inputs(B, T, H, N, device=device, seed=6)
    w_raw = (torch.randn(B, T, C, generator=g) - 1.0).to(device)
    r, k, v = (x[n].reshape(B, T, C) for n in ("r", "k", "v"))
    u = x["u"]
    y = op.wkv6_rwkvlm(B, T, C, H, r, k, v, w_raw, u)
    y_ref, s_ref = _rwkvlm_wkv6_numpy(B, T, C, H, r, k, v, w_raw, u)
    assert compare("y", y, y_ref, budget=1e-5).passed
    # state in RWKV-LM's [v][k] layout, passed through two calls
    cut = 8
    first = [t[:, :cut] for t in (r, k, v, w_raw)]
    second = [t[:, cut:] for t in (r, k, v, w_raw)]
    y1, s1 = op.wkv6_rwkvlm(B, cut, C, H, *first, u, output_final_state=True)
    y2, s2 = op.wkv6_rwkvlm(B, T - cut, C, H, *second, u, initial_state=s1, output_final_state=True)
    assert compare("y", torch.cat([y1, y2], 1), y_ref, budget=1e-5).passed
    assert compare("state", s2, s_ref, budget=1e-5).passed
    # gradients reach the raw decay
    w_leaf = w_raw.clone().requires_grad_()
    op.wkv6_rwkvlm(B, T, C, H, r, k, v, w_leaf, u).sum().backward()
    assert w_leaf.grad is not None and torch.isfinite(w_leaf.grad).all()


# ---------------------------------------------------------------------------------------------
# GPU (run on the H200 with `pytest -m gpu`)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4096, 16384])
def test_wkv6_gpu_bf16_long(gpu_mode, T):
    x = op.make_inputs(1, T, 2 if T < 16384 else 1, 64, dtype=torch.bfloat16, device="cuda",
                       decay="rwkv6", initial_state=True, seed=T)  # fmt: skip
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
def test_wkv6_gpu_dtypes_heads(gpu_mode, K, dtype, decay):
    x = op.make_inputs(2, 300, 2, K, dtype=dtype, device="cuda", decay=decay,
                       w_dtype=_w_dtype(dtype), initial_state=True, seed=K)  # fmt: skip
    op.check_case(x, f"K{K}-{dtype}-{decay}-{gpu_mode}").assert_ok()


@pytest.mark.gpu
def test_wkv6_gpu_many_programs(gpu_mode):
    """The anchor's B * H = 128 (every program id and V-block offset exercised)."""
    x = op.make_inputs(4, 130, 32, 64, dtype=torch.bfloat16, device="cuda", initial_state=True)
    op.check_case(x, f"B4-H32-{gpu_mode}").assert_ok()


@pytest.mark.gpu
@pytest.mark.parametrize("carry,dpass,warps", [(1, 0, 4), (0, 0, 4), (1, 1, 4), (0, 1, 8)])
@pytest.mark.parametrize("T,dtype", [(4096, torch.bfloat16), (300, torch.float16)])
def test_wkv6_gpu_tc_bwd_switches(force_rwkv_mode, carry, dpass, warps, T, dtype):
    """The tc backward's switches off their defaults (CARRY 1, DPASS 0, 8 warps) at the default
    block sizes."""
    force_rwkv_mode("tc", CARRY=carry, DPASS=dpass, num_warps=warps)
    x = op.make_inputs(2, T, 2, 64, dtype=dtype, device="cuda", decay="mixed",
                       w_dtype=_w_dtype(dtype), initial_state=True, seed=T + carry)  # fmt: skip
    op.check_case(x, f"T{T}-{dtype}-C{carry}D{dpass}W{warps}").assert_ok()


@pytest.mark.gpu
def test_wkv6_gpu_self_check():
    assert all(rep.passed for rep in op.self_check("cuda", quick=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_parts,shape", [(1, (3, 5)), (3, (2, 1029)), (4, (1, 7, 2, 16))])
def test_sum_partials_is_the_torch_sum(device, dtype, n_parts, shape):
    """The V-block partial sums of the backward (one pass, index order) equal torch's sum."""
    from scanopt.ops._partials import sum_partials

    parts = torch.randn((n_parts, *shape), generator=torch.Generator().manual_seed(n_parts))
    parts = parts.to(device)
    got = sum_partials(parts, dtype)
    want = parts.double().sum(0)
    assert got.dtype == dtype and got.shape == shape
    # fp32: the summation order's rounding; bf16 / fp16: one ulp (the interpreter may truncate)
    rtol = 1e-6 if dtype == torch.float32 else 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6)
    with pytest.raises(ValueError, match="contiguous fp32"):
        sum_partials(parts.double(), dtype)


def test_wkv_default_family_follows_the_dtypes(device, monkeypatch):
    """The tc family is the default for bf16/fp16 inputs with a bf16/fp16 w (K <= 128), except
    for WKV-7's forward (recurrent); an fp32 w, fp32 inputs or K > 128 keep the CUDA-core
    families. The public op resolves with w's dtype."""
    from scanopt.ops import _rwkv_common as common

    for op_name in ("wkv6", "wkv7"):
        for direction in ("fwd", "bwd"):

            def mode(dtype, w_dtype, K=64, op_name=op_name, direction=direction):
                cfg = common.default_config(
                    direction, T=4096, K=K, V=64, dtype=dtype, op=op_name, w_dtype=w_dtype
                )
                return cfg["MODE"]

            # WKV-7's forward: the recurrent kernel (faster; the tc backward reads its checkpoints)
            want = "recurrent" if (op_name, direction) == ("wkv7", "fwd") else "tc"
            assert mode(torch.bfloat16, torch.bfloat16) == want
            assert mode(torch.float16, torch.float16) == want
            assert mode(torch.float16, torch.float32) != "tc"
            assert mode(torch.float32, torch.float32) != "tc"
            assert mode(torch.bfloat16, torch.bfloat16, K=256) != "tc"
    seen = []
    original = launch._wkv6_fwd_tc
    monkeypatch.setattr(launch, "_wkv6_fwd_tc", lambda *a: seen.append(1) or original(*a))
    common._RESOLVED.clear()
    for w_dtype, calls in ((torch.float32, 0), (torch.float16, 1)):
        x = op.make_inputs(1, 20, 1, 16, dtype=torch.float16, device=device, w_dtype=w_dtype)
        op.wkv6(*(x[n] for n in NAMES))
        assert len(seen) == calls, w_dtype
