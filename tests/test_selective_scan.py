"""Mamba-1 selective scan (``scanopt.selective_scan_fn``) and its decode step
(``scanopt.selective_state_update``): forward, last state and every gradient against the float64
reference with the verify rule, for every B/C layout and option; launch configs; the torch
backend; errors; opcheck and torch.compile. CPU tests run the Triton kernels through the
interpreter (fp32 and fp16; bf16 only on the GPU)."""

import contextlib
from unittest import mock

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import scanopt
from scanopt._env import interpreting
from scanopt.ops.selective_scan import kernels, launch, op
from scanopt.reference import selective_scan_bwd, selective_scan_fwd
from scanopt.verify import Report, to_numpy


@pytest.fixture(autouse=True, scope="module")
def _interpreter_patches():
    """Two test-only patches of Triton's CPU interpreter (the kernels are unchanged):

    - ``tl.associative_scan`` with a user combine function runs one element at a time (~50 us
      each); this folds along the scan axis with the same combine, vectorised over the other
      axes (same order of operations, same results): the CPU tests run ~20x faster.
    - ``tl.exp2`` is NumPy's float32 ``exp2``, whose error is correlated across nearby
      arguments, so over 1000 steps of one channel it drifts about twice as far as a correctly
      rounded exp and fails the fp32 rule by a hair. The patch rounds the float64 result. The
      GPU's ``ex2.approx`` is what it is; the GPU tests measure it.
    """
    if not interpreting():
        yield
        return
    import triton.runtime.interpreter as interp

    def generic_scan(self, input):
        datas = [np.moveaxis(arg.handle.data, self.axis, 0) for arg in input]
        outs = [np.empty_like(d) for d in datas]
        acc = None
        for i in range(datas[0].shape[0]):
            cur = tuple(self.to_tensor(d[i], arg.dtype) for d, arg in zip(datas, input))
            if acc is None:
                acc = cur
            else:
                ret = self.combine_fn.fn(*acc, *cur)
                acc = ret if isinstance(ret, tuple) else (ret,)
            for o, a in zip(outs, acc):
                o[i] = np.reshape(a.handle.data, o[i].shape)
        return [self.to_tensor(np.moveaxis(o, 0, self.axis), a.dtype) for o, a in zip(outs, input)]

    def exp2(self, arg):
        return self.unary_op(arg, lambda x: np.exp2(x.astype(np.float64)).astype(x.dtype))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interp.ScanOps, "generic_scan", generic_scan)
        mp.setattr(interp.InterpreterBuilder, "create_exp2", exp2)
        yield


F32, F16 = torch.float32, torch.float16
ALL = dict(D=True, z=True, delta_bias=True, delta_softplus=True)
NONE = dict(D=False, z=False, delta_bias=False, delta_softplus=False)

# (batch, dim, L, N, dtype, B kind, C kind, groups, options, initial_state)
CASES = [
    (2, 5, 1, 16, F32, "variable", "variable", 1, ALL, True),
    (1, 5, 1, 1, F16, "fixed", "fixed", 1, NONE, False),
    (2, 5, 63, 16, F32, "variable", "fixed", 1, ALL, True),
    (2, 5, 63, 1, F32, "fixed", "variable", 1, ALL, False),
    (1, 5, 63, 16, F16, "variable", "variable", 1, ALL, True),
    (2, 6, 63, 16, F16, "grouped", "variable", 3, ALL, False),
    (1, 6, 63, 5, F32, "grouped", "grouped", 2, ALL, True),  # 3 channels per group
    (2, 5, 63, 16, F32, "variable", "variable", 1, dict(NONE, delta_softplus=True), True),
    (1, 5, 63, 3, F16, "fixed", "grouped", 5, dict(ALL, z=False), False),
    (1, 5, 1025, 16, F16, "variable", "variable", 1, ALL, True),
    (1, 5, 1025, 4, F16, "fixed", "grouped", 5, dict(ALL, D=False), False),
    (1, 5, 1025, 16, F32, "variable", "variable", 1, dict(ALL, delta_bias=False), False),
]


def _case_id(c):
    batch, dim, L, N, dtype, bk, ck, G, opts, h0 = c
    flags = "".join(k[0] for k, v in opts.items() if v)
    return f"b{batch}-d{dim}-L{L}-N{N}-{str(dtype)[6:]}-B{bk[:3]}-C{ck[:3]}-G{G}-{flags}-h0{h0:d}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_scan_matches_reference(device, case):
    batch, dim, L, N, dtype, bk, ck, G, opts, h0 = case
    x = op.make_inputs(batch, dim, L, N, dtype=dtype, device=device, B_kind=bk, C_kind=ck,
                       groups=G, initial_state=h0, seed=L + N, **opts)  # fmt: skip
    op.check_case(x, _case_id(case)).assert_ok()


def _launch_grads(x, fwd_cfg, chunk, bwd_cfg=None):
    """Forward + backward straight through the launchers (fp32 results)."""
    args = [x[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]
    out, last, ckpt = launch.selective_scan_fwd(*args, True, chunk, True, config=fwd_cfg)
    grads = launch.selective_scan_bwd(x["dout"], x["dlast"], *args, ckpt, True, chunk,
                                      config=bwd_cfg)  # fmt: skip
    return out, last, ckpt, grads


@pytest.mark.parametrize(
    "fwd_cfg,chunk,bwd_cfg,L",
    [
        # several forward chunks per checkpoint; the backward derives BLOCK_G from the chunk
        ({"BLOCK_G": 2, "BLOCK_R": 4, "BLOCK_D": 2}, 32, {"BLOCK_D": 4, "BLOCK_R": 2}, 75),
        # two state columns per iteration of the forward's column loop (loads issued one
        # iteration ahead, then where they are used)
        ({"BLOCK_G": 2, "BLOCK_R": 4, "BLOCK_D": 2, "COLS": 2}, 16, {"BLOCK_D": 4}, 40),
        ({"BLOCK_G": 2, "BLOCK_R": 4, "BLOCK_D": 2, "COLS": 2, "PREFETCH": 0}, 16, {}, 40),
        # one group per chunk
        ({"BLOCK_G": 1, "BLOCK_R": 16, "BLOCK_D": 8}, 16, {"BLOCK_D": 1}, 75),
        ({"BLOCK_G": 8, "BLOCK_R": 2, "BLOCK_D": 4}, 16, {"BLOCK_G": 4, "BLOCK_D": 8}, 75),
        # the GPU defaults (8 groups of 16 steps, two columns in flight, loads one column
        # ahead), three chunks
        (
            {"BLOCK_G": 8, "BLOCK_R": 16, "BLOCK_D": 4, "COLS": 2, "PREFETCH": 1, "num_warps": 1},
            128,
            {"BLOCK_R": 16, "BLOCK_D": 32, "num_warps": 4},
            300,
        ),
        # the serial forward: 3 segments of 32 steps (the last one short), checkpoints every
        # 16; then one automatic segment (from the initial state directly)
        ({"SERIAL": 1, "SEG": 32, "BLOCK_D": 4}, 16, {"BLOCK_D": 4}, 75),
        ({"SERIAL": 1, "BLOCK_D": 8}, 32, {"BLOCK_R": 8}, 40),
    ],
)
def test_launch_configs_agree_with_reference(device, fwd_cfg, chunk, bwd_cfg, L):
    x = op.make_inputs(2, 7, L, 6, device=device, initial_state=True, seed=chunk)
    out, last, ckpt, grads = _launch_grads(x, fwd_cfg, chunk, bwd_cfg)
    np_in = {n: to_numpy(x[n]) for n in op._TENSORS}
    ref_out, ref_last = selective_scan_fwd(delta_softplus=True, **np_in)
    ref_g = selective_scan_bwd(to_numpy(x["dout"]), delta_softplus=True,
                               dlast_state=to_numpy(x["dlast"]), **np_in)  # fmt: skip
    report = Report("selective_scan", f"{fwd_cfg}-{chunk}-{bwd_cfg}")
    report.check("out", out, ref_out)
    report.check("last_state", last, ref_last)
    for name in op._TENSORS:
        report.check(f"d{name}", grads[name], ref_g[name])
    report.assert_ok()
    # ckpt[k] is the state after step (k+1)*chunk - 1; the last one after step L-1
    ref_states = []
    for stop in [*range(chunk, L, chunk), L]:
        sl = {n: v[..., :stop] if n in ("u", "delta", "z", "B", "C") and v.ndim >= 3 else v
              for n, v in np_in.items()}  # fmt: skip
        ref_states.append(selective_scan_fwd(delta_softplus=True, **sl)[1])
    assert ckpt.shape == (2, len(ref_states), 6, 7)  # (batch, n_ck, N, dim)
    np.testing.assert_allclose(to_numpy(ckpt.transpose(2, 3)), np.stack(ref_states, 1),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="must equal the checkpoint chunk"):
        launch.selective_scan_bwd(x["dout"], None, *[x[n] for n in op._TENSORS], ckpt, True,
                                  chunk, config={"BLOCK_G": chunk, "BLOCK_R": 2})  # fmt: skip
    with pytest.raises(ValueError, match="must divide the checkpoint chunk"):
        launch.selective_scan_fwd(*[x[n] for n in op._TENSORS], True, chunk, True,
                                  config={"BLOCK_G": chunk, "BLOCK_R": 4})  # fmt: skip


@pytest.mark.parametrize(
    "bk,ck,h0,seg,N,nsplit,pf,dtype",
    [("variable", "variable", False, 16, 4, 1, 0, torch.float32),
     ("grouped", "fixed", True, 24, 5, 4, 1, torch.float32),
     ("fixed", "grouped", True, 0, 16, 2, 1, torch.float16),
     ("variable", "grouped", False, 40, 3, 4, 0, torch.float16),
     ("variable", "fixed", True, 24, 16, 8, 1, torch.float16),
     ("variable", "variable", True, 24, 16, -8, 1, torch.float16),
     ("grouped", "fixed", False, 0, 5, -4, 0, torch.float32),
     ("variable", "variable", True, 24, 16, -4, 0, torch.bfloat16),
     ("grouped", "variable", False, 16, 5, 2, 1, torch.bfloat16),
     ("variable", "grouped", True, 0, 16, 4, 1, torch.bfloat16)],  # odd L: bf16 B/C as is
)  # fmt: skip
def test_serial_forward_matches_group_kernel(device, bk, ck, h0, seg, N, nsplit, pf, dtype):
    # SERIAL=1: a channel's states on NSPLIT lanes walk the steps one by one, segments
    # chained by PASS 1 + combine (N not a multiple of NSPLIT: padded lanes). Same recurrence
    # as the group-scan kernel up to rounding: output, last state and every checkpoint, and the
    # reference; outputs are NaN-poisoned, so a gap would show
    # nsplit < 0: one warp of 32 / |nsplit| channel lanes and BLOCK_D = 2 * 32 / |nsplit|, so
    # each thread holds two channels (CPL 2): with dim 7 the second sub-block is partly past
    # dim; with dim 32 in two groups, the second program's sub-blocks read the second group.
    # bf16 with an even L reads B/C as int32 words of two steps (launch._bf16_pairs)
    L = 70 if seg else 37
    cpl = nsplit < 0
    nsplit = abs(nsplit)
    dim = (7 if nsplit == 8 else 32) if cpl else 6
    x = op.make_inputs(2, dim, L, N, device=device, B_kind=bk, C_kind=ck, groups=2,
                       initial_state=h0, seed=N, dtype=dtype)  # fmt: skip
    args = [x[n] for n in op._TENSORS]
    group = launch.selective_scan_fwd(
        *args, True, 16, True, config={"BLOCK_G": 2, "BLOCK_R": 8, "BLOCK_D": 2}
    )
    cfg = {"SERIAL": 1, "SEG": seg, "BLOCK_D": 4, "NSPLIT": nsplit, "PREFETCH": pf}
    if cpl:
        cfg.update(BLOCK_D=64 // nsplit, num_warps=1)
    serial = launch.selective_scan_fwd(*args, True, 16, True, config=cfg)
    for a, b, name in zip(group, serial, ("out", "last", "ckpt")):
        assert b.shape == a.shape and torch.isfinite(b).all(), name
        # fp32 states agree to rounding; a 16-bit output may round the other way (one ulp,
        # 2^-10 / 2^-8 relative: the two kernels sum y over the states in different orders)
        tol = (
            {torch.float16: 2e-3, torch.bfloat16: 8e-3}.get(dtype, 2e-5) if name == "out" else 2e-5
        )
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol, msg=name)
    _assert_forward_matches_reference(x, serial[0], serial[1], f"serial {bk}/{ck} seg {seg}")


@triton.jit
def _fast_act_probe(x_ptr, y_ptr, s_ptr, n, APPROX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + offs, kernels._softplus_fast(x, APPROX), mask=offs < n)
    tl.store(s_ptr + offs, kernels._sigmoid(x, 2 if APPROX else 1), mask=offs < n)


@pytest.mark.parametrize("approx", [False, True])
def test_fast_activations_accuracy(device, approx):
    # the kernels' softplus for 16-bit inputs (FAST_ACT): series below e = 1/8, log2 above, x
    # above 20; relative error against float64 over [-80, 40] (e = exp(x) stays normal) and at
    # the branch points. The interpreter has no approximate log2 (GPU only); the GPU's adds
    # lg2.approx's 2^-22 absolute (1.4e-6 relative at e = 1/8)
    if approx and device != "cuda":
        pytest.skip("lg2.approx is GPU-only")
    edges = [np.log(0.125), np.log(0.125) + 1e-6, 20.0, np.nextafter(20.0, 30.0), 0.0]
    x64 = np.concatenate([np.linspace(-80.0, 40.0, 4001), edges])
    x = torch.tensor(x64, dtype=torch.float32, device=device)
    y, sig = torch.empty_like(x), torch.empty_like(x)
    _fast_act_probe[((x.numel() + 1023) // 1024,)](x, y, sig, x.numel(), APPROX=approx, BLOCK=1024)
    xs = x.double().cpu().numpy()  # the fp32 inputs, exactly
    ref = np.logaddexp(0.0, xs)
    rel = np.abs(y.double().cpu().numpy() - ref) / ref
    # exp(x) as exp2(x log2 e) in fp32: the product's rounding, ~|x| 6e-8, is every fp32
    # softplus's error (the exact one's too); the series, 1 + e and the log2 add up to ~6e-7
    # (2e-6 with lg2.approx)
    budget = 8e-8 * np.abs(xs) + (2.5e-6 if approx else 8e-7)
    assert (rel < budget).all(), (rel.max(), xs[np.argmax(rel / budget)])
    # the fast sigmoid (FAST_ACT): the same exp, then the reciprocal (rcp.approx on the GPU)
    ref = 1.0 / (1.0 + np.exp(-xs))
    rel = np.abs(sig.double().cpu().numpy() - ref) / ref
    budget = 8e-8 * np.abs(xs) + (1e-6 if approx else 3e-7)
    assert (rel < budget).all(), ("sigmoid", rel.max(), xs[np.argmax(rel / budget)])


def test_serial_forward_large_state_takes_the_group_kernel(device, monkeypatch):
    # N / NSPLIT above MAX_SERIAL_N: SERIAL is ignored (the states would not fit in registers)
    from scanopt.ops.selective_scan import kernels

    x = op.make_inputs(1, 3, 9, launch.MAX_SERIAL_N + 1, device=device, seed=0)
    called = mock.Mock(side_effect=AssertionError("serial kernel launched"))
    monkeypatch.setattr(kernels, "selective_scan_fwd_serial_kernel", called)
    out, _, _ = launch.selective_scan_fwd(*[x[n] for n in op._TENSORS], True, 8, False,
                                          config={"SERIAL": 1, "NSPLIT": 1})  # fmt: skip
    assert torch.isfinite(out).all()


def test_forward_default_family_and_tuned_entries(monkeypatch):
    # the CUDA default is the serial family where the states fit; a tuned entry or an explicit
    # config without SERIAL is a group-scan tile (entries tuned before the serial family)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU heuristic, not the interpreter's
    entries: dict = {}
    monkeypatch.setattr(
        launch, "tuned_config", lambda op_, kind, dtype, dims, base, device=None: {
            **base, **entries.get(kind, {})}
    )  # fmt: skip
    cuda = torch.device("cuda")  # a device object only: nothing runs

    def fwd(config=None, N=16):
        return launch.resolve_config("fwd", config, batch=4, device=cuda, dim=2048, N=N, L=4096,
                                     dtype=torch.bfloat16, device_type="cuda")  # fmt: skip

    assert fwd()["SERIAL"] == 1
    assert fwd(N=4 * launch.MAX_SERIAL_N + 1)["SERIAL"] == 0  # states too many for registers
    entries["fwd"] = {"BLOCK_D": 1, "BLOCK_G": 32, "COLS": 1}
    cfg = fwd()
    assert cfg["SERIAL"] == 0 and cfg["BLOCK_D"] == 1 and cfg["BLOCK_G"] == 32
    entries["fwd"] = {"SERIAL": 1, "NSPLIT": 2, "BLOCK_D": 16}
    assert {k: fwd()[k] for k in ("SERIAL", "NSPLIT", "BLOCK_D")} == entries["fwd"]
    entries.clear()
    assert fwd({"BLOCK_D": 8})["SERIAL"] == 0
    assert fwd({"SERIAL": 1, "NSPLIT": 2})["SERIAL"] == 1


def test_backward_modes_look_up_their_own_tuned_entries(monkeypatch):
    # the atomic and the fixed-order backward are tuned apart: the store key carries the mode,
    # and the training forward's checkpoint chunk follows the mode's entry
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    entries = {0: {"BLOCK_G": 4, "BLOCK_R": 8}, 1: {"BLOCK_G": 16, "BLOCK_R": 16}}
    seen = []

    def tuned(op_, kind, dtype, dims, base, device=None):
        seen.append(dict(dims))
        return {**base, **entries[dims["atomic"]]} if kind == "bwd" else dict(base)

    monkeypatch.setattr(launch, "tuned_config", tuned)
    cuda = torch.device("cuda")  # a device object only: nothing runs
    shape = dict(batch=4, dim=2048, N=16, L=4096, dtype=torch.bfloat16, device=cuda)
    assert launch.checkpoint_chunk(**shape, deterministic=True) == 32
    assert launch.checkpoint_chunk(**shape, deterministic=False) == 256
    assert [d["atomic"] for d in seen] == [0, 1]


def test_default_serial_forward_falls_back_for_a_misfit_chunk(device, monkeypatch):
    # a checkpoint chunk that is no multiple of the serial block (8 steps of fp16): the default
    # serial forward takes the group scan, not an error; an explicit SERIAL config still errs
    serial_default = launch.default_config

    def default(kind, **kw):
        cfg = serial_default(kind, **kw)
        if kind == "fwd" and kw.get("serial", True):
            cfg = {**cfg, "SERIAL": 1, "BLOCK_D": 32}
        return cfg

    monkeypatch.setattr(launch, "default_config", default)
    x = op.make_inputs(1, 5, 13, 4, device=device, seed=3, dtype=torch.float16)
    args = [x[n] for n in op._TENSORS]
    out, last, ckpt = launch.selective_scan_fwd(*args, True, 4, True)
    assert ckpt.shape[1] == 4 and torch.isfinite(ckpt).all()
    _assert_forward_matches_reference(x, out, last, "misfit chunk")
    with pytest.raises(ValueError, match="multiple of 8"):
        launch.selective_scan_fwd(*args, True, 4, True, config={"SERIAL": 1})


def _assert_forward_matches_reference(x, out, last, case):
    """``out`` / ``last`` against the float64 reference forward of inputs ``x``."""
    np_in = {n: to_numpy(x[n]) for n in op._TENSORS if x[n] is not None}
    ref_out, ref_last = selective_scan_fwd(delta_softplus=True, **np_in)
    report = Report("selective_scan", case)
    report.check("out", out, ref_out)
    report.check("last_state", last, ref_last)
    report.assert_ok()


def _assert_backward_matches_reference(x, grads, case):
    """The launcher's gradients ``grads`` against the float64 reference backward of ``x``."""
    np_in = {n: to_numpy(x[n]) for n in op._TENSORS if x[n] is not None}
    ref_g = selective_scan_bwd(to_numpy(x["dout"]), delta_softplus=True,
                               dlast_state=to_numpy(x["dlast"]), **np_in)  # fmt: skip
    report = Report("selective_scan", case)
    for name in op._TENSORS:
        if x[name] is not None:
            report.check(f"d{name}", grads[name], ref_g[name])
    report.assert_ok()


@pytest.mark.parametrize("N", [1, 5])
@pytest.mark.parametrize("bk", ["fixed", "variable"])
def test_forward_two_columns_odd_state_size(device, N, bk):
    # COLS=2 with N odd: the column past N must add nothing and store nothing
    x = op.make_inputs(2, 5, 21, N, device=device, B_kind=bk, initial_state=True, seed=N)
    args = [x[n] for n in op._TENSORS]
    res = [launch.selective_scan_fwd(*args, True, 8, True,
                                     config={"BLOCK_G": 2, "BLOCK_R": 4, "BLOCK_D": 4, "COLS": c})
           for c in (1, 2)]  # fmt: skip
    for a, b in zip(*res):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    _assert_forward_matches_reference(x, res[1][0], res[1][1], f"COLS=2 N={N} {bk}")


@pytest.mark.parametrize(
    "bk,ck,N,cols",
    [("variable", "fixed", 5, 1), ("grouped", "variable", 4, 2), ("fixed", "fixed", 1, 2),
     ("variable", "variable", 3, 2)],
)  # fmt: skip
def test_forward_prefetch_is_bit_identical(device, bk, ck, N, cols):
    # PREFETCH issues a column's loads (A, B/C rows, the carried state) one iteration early:
    # same arithmetic in the same order, so every output, state and checkpoint must be equal
    # to the bit; a stale carry or a wrong column would not be
    x = op.make_inputs(2, 6, 45, N, device=device, B_kind=bk, C_kind=ck, groups=2,
                       initial_state=True, seed=N + cols)  # fmt: skip
    args = [x[n] for n in op._TENSORS]
    cfg = {"BLOCK_G": 2, "BLOCK_R": 4, "BLOCK_D": 2, "COLS": cols}
    res = [launch.selective_scan_fwd(*args, True, 16, True, config={**cfg, "PREFETCH": p})
           for p in (0, 1)]  # fmt: skip
    for name, a, b in zip(("out", "last_state", "ckpt"), *res):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), name
    _assert_forward_matches_reference(x, res[1][0], res[1][1], f"PREFETCH {bk}/{ck} N={N} {cols}")


@pytest.mark.parametrize(
    "bk,ck,N,h0",
    [("variable", "fixed", 5, True), ("grouped", "variable", 4, False), ("fixed", "fixed", 1, True)],
)  # fmt: skip
def test_backward_prefetch_is_bit_identical(device, bk, ck, N, h0):
    # the backward's PREFETCH issues column n + 1's loads (A, B/C, checkpoint or initial state,
    # adjoint) during column n: every gradient must be equal to the bit
    x = op.make_inputs(2, 6, 45, N, device=device, B_kind=bk, C_kind=ck, groups=2,
                       initial_state=h0, seed=N)  # fmt: skip
    args = [x[n] for n in op._TENSORS]
    fwd_cfg = {"BLOCK_G": 2, "BLOCK_R": 4, "BLOCK_D": 2}
    _, _, ckpt = launch.selective_scan_fwd(*args, True, 16, True, config=fwd_cfg)
    res = [
        launch.selective_scan_bwd(x["dout"], x["dlast"], *args, ckpt, True, 16,
                                  config={"BLOCK_D": 2, "BLOCK_R": 4, "PREFETCH": p})
        for p in (0, 1)
    ]  # fmt: skip
    for name in res[0]:
        a, b = res[0][name], res[1][name]
        if a is None:
            assert b is None, name
            continue
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), name
    _assert_backward_matches_reference(x, res[1], f"bwd PREFETCH {bk}/{ck} N={N}")


def _two_backward_launches(x, key, values, exact):
    """The backward launched twice from one forward's checkpoints (16-step chunks), with
    ``{key: values[0]}`` and ``{key: values[1]}`` on a small tile: the gradients named in
    ``exact`` equal to the bit, the others within 1e-5 (sums in another order). Returns the
    second launch's gradients."""
    args = [x[n] for n in op._TENSORS]
    fwd_cfg = {"BLOCK_G": 2, "BLOCK_R": 8, "BLOCK_D": 2}
    _, _, ckpt = launch.selective_scan_fwd(*args, True, 16, True, config=fwd_cfg)
    bwd_cfg = {"BLOCK_D": 2, "BLOCK_R": 8}
    first, second = (
        launch.selective_scan_bwd(x["dout"], x["dlast"], *args, ckpt, True, 16,
                                  config={**bwd_cfg, key: v})
        for v in values
    )  # fmt: skip
    for name in first:
        a, b = first[name], second[name]
        if a is None:
            assert b is None, name
            continue
        assert b.shape == a.shape and torch.isfinite(b).all(), name
        if name in exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(
                b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
            )
    return second


@pytest.mark.parametrize(
    "bk,ck,h0,segments",
    [("variable", "fixed", True, 2), ("grouped", "variable", False, 3), ("fixed", "fixed", True, 8),
     ("variable", "variable", True, 5)],
)  # fmt: skip
def test_segmented_backward_matches_one_launch(device, bk, ck, h0, segments):
    # SEGMENTS launches cover the chunks last segment first, each from the checkpoint before it
    # and the adjoint the later one left: du, ddelta, dz and the initial-state gradient are the
    # same computation (bits equal); dA, dD, dbias and dB/dC are summed per segment (another
    # order, or torch's reduction over channel blocks at another length). L = 45 with 16-step
    # chunks: 3 chunks, the last one short; 8 segments is more than there are chunks.
    x = op.make_inputs(2, 6, 45, 4, device=device, B_kind=bk, C_kind=ck, groups=2,
                       initial_state=h0, seed=segments)  # fmt: skip
    seg = _two_backward_launches(x, "SEGMENTS", (1, segments),
                                 exact={"u", "delta", "z", "initial_state"})  # fmt: skip
    _assert_backward_matches_reference(x, seg, f"bwd SEGMENTS={segments} {bk}/{ck}")


@pytest.mark.parametrize("bk,ck", [("variable", "grouped"), ("grouped", "fixed")])
@pytest.mark.parametrize("mode", [1, 2])
def test_atomic_backward_matches_deterministic(device, bk, ck, mode):
    # ATOMIC_BC adds the variable dB/dC terms by atomics straight into their sums (1: each
    # program's channel sum, 2: every channel's term); the other gradients are the same
    # computation (bits equal), dB/dC the same sums in another order. Several channel blocks per
    # group (BLOCK_D 2, 6 channels, 2 groups), 3 chunks, the last one short.
    x = op.make_inputs(2, 6, 45, 4, device=device, B_kind=bk, C_kind=ck, groups=2,
                       initial_state=True, seed=mode)  # fmt: skip
    exact = {"u", "delta", "A", "D", "z", "delta_bias", "initial_state"}
    atom = _two_backward_launches(x, "ATOMIC_BC", (0, mode), exact)
    _assert_backward_matches_reference(x, atom, f"bwd ATOMIC_BC={mode} {bk}/{ck}")


@pytest.mark.parametrize(
    "bk,ck,h0,N,nsplit,L,dtype",
    [("variable", "variable", True, 4, 4, 45, torch.float32),
     ("grouped", "fixed", False, 5, 2, 37, torch.float32),
     ("fixed", "grouped", True, 16, 4, 70, torch.float16),
     ("fixed", "fixed", True, 3, 1, 33, torch.float32)],
)  # fmt: skip
def test_serial_backward_matches_group_kernel(device, bk, ck, h0, N, nsplit, L, dtype):
    # SERIAL=1 backward: a channel's states on NSPLIT lanes walk each 16-step checkpoint chunk's
    # blocks last to first. The same gradients as the group kernel up to summation order (its
    # variable dB/dC by atomics), and the reference's; several channel blocks per group, a short
    # last chunk and block, padded state lanes (N not a multiple of NSPLIT)
    x = op.make_inputs(2, 6, L, N, device=device, B_kind=bk, C_kind=ck, groups=2,
                       initial_state=h0, seed=N + L, dtype=dtype)  # fmt: skip
    args = [x[n] for n in op._TENSORS]
    _, _, ckpt = launch.selective_scan_fwd(
        *args, True, 16, True, config={"BLOCK_G": 2, "BLOCK_R": 8, "BLOCK_D": 2}
    )
    group = launch.selective_scan_bwd(x["dout"], x["dlast"], *args, ckpt, True, 16,
                                      config={"BLOCK_D": 2, "BLOCK_R": 8})  # fmt: skip
    spy = mock.Mock(wraps=launch._bwd_serial)
    with mock.patch.object(launch, "_bwd_serial", spy):
        serial = launch.selective_scan_bwd(
            x["dout"], x["dlast"], *args, ckpt, True, 16, deterministic=False,
            config={"SERIAL": 1, "NSPLIT": nsplit, "BLOCK_D": 4, "BLOCK_R": 8},
        )  # fmt: skip
    assert spy.call_count == 1
    for name, a in group.items():
        b = serial[name]
        if a is None:
            assert b is None, name
            continue
        assert b.shape == a.shape and torch.isfinite(b).all(), name
        tol = 2e-3 if dtype == torch.float16 and name in ("u", "delta", "z") else 1e-4
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip
    _assert_backward_matches_reference(x, serial, f"serial bwd {bk}/{ck} N {N}")


def test_serial_backward_keeps_determinism(device):
    # deterministic=True with variable B/C: the serial backward's atomics are not allowed, the
    # group kernel runs (fixed B/C have no atomics: the serial one may run)
    x = op.make_inputs(1, 4, 20, 4, device=device, B_kind="variable", C_kind="fixed", seed=1)
    args = [x[n] for n in op._TENSORS]
    _, _, ckpt = launch.selective_scan_fwd(
        *args, True, 16, True, config={"BLOCK_G": 2, "BLOCK_R": 8, "BLOCK_D": 2}
    )
    with mock.patch.object(launch, "_bwd_serial",
                           mock.Mock(side_effect=AssertionError("serial backward"))):  # fmt: skip
        launch.selective_scan_bwd(x["dout"], x["dlast"], *args, ckpt, True, 16,
                                  config={"SERIAL": 1, "BLOCK_R": 8})  # fmt: skip


@pytest.mark.parametrize("use_op", [False, True])
def test_public_nondeterministic_backward(device, use_op):
    # deterministic=False reaches the backward through autograd (eager Function or the custom
    # op), whose variable/grouped dB/dC then come from atomics: the same sums in another order
    x = op.make_inputs(2, 6, 37, 4, device=device, B_kind="variable", C_kind="grouped",
                       groups=2, initial_state=True, seed=3)  # fmt: skip
    spy = mock.Mock(wraps=launch.selective_scan_bwd)

    def run(det):
        leaves = {n: x[n].detach().clone().requires_grad_() for n in op._TENSORS
                  if x[n] is not None}  # fmt: skip
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(launch, "selective_scan_bwd", spy))
            if use_op:
                stack.enter_context(mock.patch("scanopt.ops.selective_scan.op.eager",
                                               lambda *a: False))  # fmt: skip
            out, last = scanopt.selective_scan_fn(
                delta_softplus=True, return_last_state=True, deterministic=det,
                **{n: leaves.get(n) for n in op._TENSORS},
            )  # fmt: skip
            grads = torch.autograd.grad([out, last], list(leaves.values()),
                                        [x["dout"], x["dlast"]])  # fmt: skip
        assert spy.call_args.kwargs["deterministic"] is det
        return dict(zip(leaves, grads))

    det, nondet = run(True), run(False)
    for name in det:
        if name in ("B", "C"):
            torch.testing.assert_close(nondet[name], det[name], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(nondet[name], det[name]), name
    _assert_backward_matches_reference(x, nondet, "deterministic=False")


@pytest.mark.parametrize(
    "config,match",
    [({"BLOCK_Q": 2}, "unknown selective_scan fwd config keys"), ({"BLOCK_G": 3}, "power of two"),
     ({"COLS": 3}, "COLS must be 1 or 2"), ({"PREFETCH": 2}, "PREFETCH must be 0 or 1"),
     ({"SEGMENTS": 0}, "unknown selective_scan fwd config keys"),
     ({"SERIAL": 2}, "SERIAL must be 0 or 1"), ({"SEG": -1}, "SEG must be"),
     ({"NSPLIT": 3}, "NSPLIT must be a power of two")],
)  # fmt: skip
def test_bad_launch_config_is_rejected(device, config, match):
    x = op.make_inputs(1, 3, 8, 2, device=device)
    with pytest.raises(ValueError, match=match):
        launch.selective_scan_fwd(*[x[n] for n in op._TENSORS], True, 8, False, config=config)


def test_outputs_are_fully_written(device):
    # outputs are allocated NaN-poisoned (SCANOPT_POISON=1 in conftest): any gap would show
    x = op.make_inputs(2, 9, 70, 16, device=device, B_kind="grouped", groups=3, seed=1)
    out, last, grads = op.run_case(x)
    for t in (out, last, *grads.values()):
        assert torch.isfinite(t).all()


def test_last_state_gradient_alone(device):
    x = op.make_inputs(1, 5, 40, 8, device=device, initial_state=True, seed=2)
    leaves = {n: x[n].clone().requires_grad_() for n in op._TENSORS}
    _, last = scanopt.selective_scan_fn(delta_softplus=True, return_last_state=True, **leaves)
    (last * x["dlast"]).sum().backward()
    np_in = {n: to_numpy(x[n]) for n in op._TENSORS}
    ref = selective_scan_bwd(np.zeros(x["u"].shape), delta_softplus=True,
                             dlast_state=to_numpy(x["dlast"]), **np_in)  # fmt: skip
    report = Report("selective_scan", "dlast only")
    for n in op._TENSORS:
        report.check(f"d{n}", leaves[n].grad, ref[n])
    report.assert_ok()


def test_backward_is_deterministic(device):
    x = op.make_inputs(2, 40, 130, 16, device=device, seed=3)
    x["deterministic"] = True
    _, _, g1 = op.run_case(x)
    _, _, g2 = op.run_case(x)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


@pytest.mark.parametrize("torch_flag", [False, True])
def test_default_determinism_follows_torch(device, monkeypatch, torch_flag):
    # deterministic=None: the fixed-order backward exactly when torch's deterministic
    # algorithms are on (mamba_ssm's own backward uses atomics either way)
    x = op.make_inputs(1, 4, 9, 2, device=device, seed=1)
    spy = mock.Mock(wraps=launch.selective_scan_bwd)
    monkeypatch.setattr(launch, "selective_scan_bwd", spy)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: torch_flag)
    op.run_case(x)
    assert spy.call_args.kwargs["deterministic"] is torch_flag


def test_strided_inputs(device):
    """HF passes B/C as (b, L, N) transposed to (b, N, L); u/delta may be slices of a wider
    projection (only the last dim contiguous, or not even that)."""
    batch, dim, L, N = 2, 5, 37, 4
    x = op.make_inputs(batch, dim, L, N, device=device, initial_state=True, seed=4)
    proj = torch.randn(batch, 3 * dim, L, device=device)
    proj[:, ::3] = x["u"]
    x_strided = dict(x, u=proj[:, ::3])
    x_strided["B"] = x["B"].transpose(1, 2).contiguous().transpose(1, 2)
    x_strided["C"] = x["C"].transpose(1, 2).contiguous().transpose(1, 2)
    x_strided["delta"] = x["delta"].transpose(1, 2).contiguous().transpose(1, 2)
    assert x_strided["B"].stride(-1) != 1 and x_strided["u"].stride(1) == 3 * L
    ref = op.run_case(x)
    got = op.run_case(x_strided)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-6)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-5, atol=1e-5)


def test_no_grad_returns_plain_output_and_stores_no_checkpoints(device, monkeypatch):
    x = op.make_inputs(1, 5, 20, 4, device=device, seed=5)
    seen = []
    real = launch.selective_scan_fwd

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        seen.append(res[2].shape)
        return res

    monkeypatch.setattr(launch, "selective_scan_fwd", spy)
    kw = {n: x[n] for n in op._TENSORS}
    with torch.no_grad():
        out = scanopt.selective_scan_fn(delta_softplus=True, **kw)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 5, 20) and out.dtype == x["u"].dtype
    if seen:  # the Triton path ran
        assert seen[0][1] == 0


def test_torch_backend(device, monkeypatch):
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    for bk, ck, G in (("variable", "fixed", 1), ("grouped", "grouped", 3)):
        x = op.make_inputs(2, 6, 50, 8, device=device, B_kind=bk, C_kind=ck, groups=G,
                           initial_state=True, seed=6)  # fmt: skip
        op.check_case(x, f"torch-{bk}-{ck}").assert_ok()


def test_torch_backend_agrees_with_kernels(device):
    x = op.make_inputs(2, 6, 45, 16, dtype=torch.float16, device=device, initial_state=True)
    out, last, grads = op.run_case(x)
    with op._backend("torch"):
        b_out, b_last, b_grads = op.run_case(x)
    torch.testing.assert_close(out, b_out, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(last, b_last, rtol=1e-5, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads[n], b_grads[n], rtol=3e-3, atol=3e-3)


def _scan_args(**over):
    x = op.make_inputs(2, 6, 10, 4, B_kind="grouped", groups=2, initial_state=True)
    kw = {n: x[n] for n in op._TENSORS}
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(u=torch.randn(6, 10)), ValueError, "u must have 3 dimensions"),
        (dict(delta=torch.randn(2, 6, 11)), ValueError, "delta must have shape"),
        (dict(A=torch.randn(5, 4)), ValueError, "A must have shape"),
        (dict(A=torch.randn(6, 4, dtype=torch.float16)), TypeError, "A must be float32"),
        (dict(A=torch.randn(6, 4, dtype=torch.complex64)), TypeError, "A must be float32"),
        (dict(u=torch.ones(2, 6, 10, dtype=torch.int32)), TypeError, "u must be"),
        (dict(B=torch.randn(2, 4, 4, 10)), ValueError, "B: the group count G=4"),
        (dict(C=torch.randn(2, 4, 9)), ValueError, "C must have shape"),
        (dict(C=torch.randn(2, 2, 3, 4, 10)), ValueError, "C must have 2 or 3 or 4 dimensions"),
        (dict(D=torch.randn(5)), ValueError, "D must have shape"),
        (dict(z=torch.randn(2, 6, 9)), ValueError, "z must have shape"),
        (dict(delta_bias=torch.randn(6, 1)), ValueError, "delta_bias must have shape"),
        (dict(initial_state=torch.randn(2, 6, 5)), ValueError, "initial_state must have shape"),
        (dict(z=torch.randn(2, 6, 10, device="meta")), ValueError, "z is on meta"),
        (
            dict(
                A=-torch.rand(6, 257),
                B=torch.randn(6, 257),
                C=torch.randn(6, 257),
                initial_state=None,
            ),
            ValueError,
            "N=257",
        ),  # fmt: skip
        (dict(u=torch.randn(2, 6, 0), delta=torch.randn(2, 6, 0)), ValueError, "L must be"),
    ],
)
def test_bad_inputs(over, exc, match):
    with pytest.raises(exc, match=match):
        scanopt.selective_scan_fn(**_scan_args(**over))


def test_opcheck(monkeypatch):
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    x = op.make_inputs(2, 4, 9, 3, B_kind="grouped", groups=2, initial_state=True)
    args = [x[n].requires_grad_() for n in op._TENSORS]
    torch.library.opcheck(torch.ops.scanopt.selective_scan_fwd.default, (*args, True, 4, True))
    torch.library.opcheck(torch.ops.scanopt.selective_scan_fwd.default, (*args, True, 4, False))
    raw = [t.detach() for t in args]
    _, _, ckpt = torch.ops.scanopt.selective_scan_fwd(*raw, True, 4, True)
    torch.library.opcheck(
        torch.ops.scanopt.selective_scan_bwd.default,
        (x["dout"], x["dlast"], *raw, ckpt, True, 4),
        test_utils=("test_schema", "test_faketensor"),
    )
    u = op.make_update_inputs(2, 4, 8, 16, ngroups=2)
    torch.library.opcheck(
        torch.ops.scanopt.selective_state_update.default,
        (u["state"], u["x"], u["dt"], u["A"], u["B"], u["C"], u["D"], u["z"], u["dt_bias"],
         True, None),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip


class _MambaBlock(torch.nn.Module):
    """in_proj -> (x, z); x_proj -> (dt, B, C); selective_scan_fn; out_proj."""

    def __init__(self, d_model=8, dim=12, N=4):
        super().__init__()
        self.dim, self.N = dim, N
        self.in_proj = torch.nn.Linear(d_model, 2 * dim)
        self.x_proj = torch.nn.Linear(dim, dim + 2 * N)
        self.A_log = torch.nn.Parameter(torch.randn(dim, N))
        self.D = torch.nn.Parameter(torch.ones(dim))
        self.dt_bias = torch.nn.Parameter(torch.rand(dim))
        self.out_proj = torch.nn.Linear(dim, d_model)

    def forward(self, h):
        x, z = self.in_proj(h).chunk(2, dim=-1)
        dt, B, C = self.x_proj(x).split([self.dim, self.N, self.N], dim=-1)
        y, last = scanopt.selective_scan_fn(
            x.transpose(1, 2), dt.transpose(1, 2), -torch.exp(self.A_log), B.transpose(1, 2),
            C.transpose(1, 2), self.D, z.transpose(1, 2), self.dt_bias, delta_softplus=True,
            return_last_state=True,
        )  # fmt: skip
        return self.out_proj(y.transpose(1, 2)), last


def test_eager_calls_skip_the_dispatcher_and_match_the_custom_op():
    """In eager mode selective_scan_fn runs the custom op's implementation through a plain
    autograd.Function (no dispatcher: host time), also when some inputs are nn.Parameters,
    with the custom op's results and gradients."""
    torch.manual_seed(0)
    block = _MambaBlock()
    h = torch.randn(2, 9, 8)

    def run(use_op):
        block.zero_grad()
        if use_op:  # what tracing sees: force the custom op
            with mock.patch("scanopt.ops.selective_scan.op.eager", lambda *a: False):
                y, last = block(h)
        else:
            y, last = block(h)
            # D and dt_bias are nn.Parameters, as in a real Mamba block: still the bypass
            assert type(last.grad_fn).__name__ == "_ScanFunctionBackward"
        (y.square().sum() + last.sum()).backward()
        return y, last, [p.grad.clone() for p in block.parameters()]

    y_eager, last_eager, g_eager = run(False)
    y_op, last_op, g_op = run(True)
    assert torch.equal(y_eager, y_op) and torch.equal(last_eager, last_op)
    for a, b in zip(g_eager, g_op):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_mamba_block(monkeypatch, tmp_path):
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    # a fresh compile cache: a graph compiled against an older version of the op's fake
    # implementation must not be reused
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    block = _MambaBlock()
    h = torch.randn(2, 9, 8)

    def run(fn):
        block.zero_grad()
        y, last = fn(h)
        (y.square().sum() + last.sum()).backward()
        return y.detach(), last.detach(), [p.grad.clone() for p in block.parameters()]

    ref = run(block)
    torch._dynamo.reset()
    got = run(torch.compile(block, fullgraph=True, backend="inductor"))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[2], ref[2]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_self_check_quick(device):
    for report in op.self_check(device, quick=True):
        report.assert_ok()


# --------------------------------------------------------------------------------------------
# decode step


@pytest.mark.parametrize(
    "nheads,ngroups,dtype,state_dtype",
    [
        (None, 1, F32, None),
        (None, 1, F16, F32),
        (4, 2, F32, None),
        (3, 3, F16, None),
        (2, 1, F16, F32),
    ],
)
def test_state_update_matches_reference(device, nheads, ngroups, dtype, state_dtype):
    x = op.make_update_inputs(3, nheads, 37, 16, ngroups=ngroups, dtype=dtype,
                              state_dtype=state_dtype, device=device, seed=ngroups)  # fmt: skip
    op.check_update_case(x, f"h{nheads}-g{ngroups}").assert_ok()
    op.check_update_case(x, f"h{nheads}-g{ngroups}-nosoftplus", dt_softplus=False).assert_ok()


def test_state_update_in_place_and_tied_heads(device):
    """Mamba-2's decode call: stride-0 expanded A / dt / dt_bias / D (one value per head)."""
    batch, nheads, hd, N = 2, 4, 8, 16
    g = torch.Generator().manual_seed(0)
    state = torch.randn(batch, nheads, hd, N, generator=g).to(device)
    A = (-torch.rand(nheads, generator=g)).to(device)[:, None, None].expand(nheads, hd, N)
    dt = torch.randn(batch, nheads, generator=g).to(device)[..., None].expand(batch, nheads, hd)
    bias = torch.randn(nheads, generator=g).to(device)[:, None].expand(nheads, hd)
    D = torch.randn(nheads, generator=g).to(device)[:, None].expand(nheads, hd)
    x = torch.randn(batch, nheads, hd, generator=g).to(device)
    B = torch.randn(batch, 1, N, generator=g).to(device)
    C = torch.randn(batch, 1, N, generator=g).to(device)
    kw = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=bias, dt_softplus=True)
    before = state.clone()
    ptr = state.data_ptr()
    out = scanopt.selective_state_update(state, **kw)
    from scanopt.reference import selective_state_update_fwd

    ref_out, ref_state = selective_state_update_fwd(
        to_numpy(before), *(to_numpy(kw[n]) for n in ("x", "dt", "A", "B", "C", "D")),
        dt_bias=to_numpy(bias), dt_softplus=True,
    )  # fmt: skip
    assert state.data_ptr() == ptr
    np.testing.assert_allclose(to_numpy(state), ref_state, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(out), ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wide", [False, True])
def test_state_update_batch_indices(device, monkeypatch, wide):
    if wide:  # the 64-bit offset path (a tensor spanning 2^31 elements)
        from scanopt.ops.selective_scan import launch as scan_launch

        monkeypatch.setattr(scan_launch, "_INT32_LIMIT", 1)
    x = op.make_update_inputs(3, None, 20, 8, device=device, seed=7)
    pool = torch.randn(5, 20, 8, device=device)
    idx = torch.tensor([4, -1, 1], device=device)
    from scanopt.reference import selective_state_update_fwd

    rows = pool[[4, 1]].clone()
    sel = [0, 2]
    ref_out, ref_state = selective_state_update_fwd(
        to_numpy(rows), *(to_numpy(x[n][sel]) for n in ("x", "dt")), to_numpy(x["A"]),
        *(to_numpy(x[n][sel]) for n in ("B", "C")), to_numpy(x["D"]), to_numpy(x["z"][sel]),
        to_numpy(x["dt_bias"]), dt_softplus=True,
    )  # fmt: skip
    untouched = pool[[0, 2, 3]].clone()
    kw = {n: x[n] for n in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")}
    out = scanopt.selective_state_update(pool, **kw, dt_softplus=True, state_batch_indices=idx)
    np.testing.assert_allclose(to_numpy(pool[[4, 1]]), ref_state, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(out[sel]), ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(pool[[0, 2, 3]], untouched)


def test_state_update_eager_bypass_matches_custom_op(device, monkeypatch):
    # eager calls skip the dispatcher (the decode step's host cost): they must run the same
    # implementation as the custom op (same bits), and bump the state's version counter as the
    # custom op's in-place handling does (autograd relies on it to catch stale saved tensors)
    from scanopt.ops.selective_scan import op as scan_op

    x = op.make_update_inputs(3, 2, 37, 16, ngroups=1, device=device, seed=5)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    kw = {n: x[n] for n in names}
    state_eager, state_op = x["state"].clone(), x["state"].clone()
    taken = []
    impl = scan_op._state_update_impl
    monkeypatch.setattr(scan_op, "_state_update_impl", lambda *a: taken.append(1) or impl(*a))
    before = state_eager._version
    out_eager = scanopt.selective_state_update(state_eager, **kw, dt_softplus=True)
    assert taken, "the eager bypass was not taken"
    assert state_eager._version > before
    before = state_op._version
    out_op = torch.ops.scanopt.selective_state_update(state_op, *(kw[n] for n in names), True, None)
    assert state_op._version > before
    assert torch.equal(out_eager, out_op)
    assert torch.equal(state_eager, state_op)
    # under a gradient-requiring input the dispatcher path runs (no bypass)
    taken.clear()
    with torch.enable_grad():
        scanopt.selective_state_update(
            x["state"].clone(), **{**kw, "x": kw["x"].clone().requires_grad_()}, dt_softplus=True
        )
    assert not taken


@pytest.mark.parametrize("knob", ["_GRID_YZ_MAX", "_INT32_LIMIT"])
def test_state_update_other_launches_agree(device, monkeypatch, knob):
    """The decode kernel's batch-first grid (taken for a batch above the grid's y/z limit) and
    its 64-bit offsets (taken when a tensor spans 2^31 elements) give the same bits as the
    default launch, and the reference's values."""
    from scanopt.ops.selective_scan import launch as scan_launch

    x = op.make_update_inputs(3, 2, 37, 16, ngroups=1, device=device, seed=11)
    kw = {n: x[n] for n in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")}
    state0 = x["state"].clone()
    state_default = state0.clone()
    out_default = scanopt.selective_state_update(state_default, **kw, dt_softplus=True)
    monkeypatch.setattr(scan_launch, knob, 1)
    state_other = state0.clone()
    out_other = scanopt.selective_state_update(state_other, **kw, dt_softplus=True)
    assert torch.equal(out_other, out_default)
    assert torch.equal(state_other, state_default)
    op.check_update_case(x, "other-launch").assert_ok()


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(x=torch.randn(2, 7)), "x must have shape"),
        (dict(A=torch.randn(6, 5)), "A must have shape"),
        (dict(B=torch.randn(2, 3, 4), C=torch.randn(2, 3, 4)), "divisible by ngroups"),
        (dict(dt=torch.ones(2, 6, dtype=torch.int64)), "dt must be"),
        (dict(state=torch.randn(2, 6)), "state must have 3 or 4 dimensions"),
        (dict(D=torch.randn(6, device="meta")), "D is on meta"),
    ],
)
def test_state_update_bad_inputs(over, match):
    x = op.make_update_inputs(2, None, 6, 4)
    x.update(over)
    with pytest.raises((ValueError, TypeError), match=match):
        scanopt.selective_state_update(**x)


# --------------------------------------------------------------------------------------------
# GPU (bf16, long sequences); run on the H200 with `pytest -m gpu`


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1, 2048, 4096, 16384])
def test_gpu_bf16_long(L):
    x = op.make_inputs(2, 64, L, 16, dtype=torch.bfloat16, device="cuda", initial_state=True,
                       seed=L)  # fmt: skip
    op.check_case(x, f"bf16-L{L}").assert_ok()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "bk,ck,G,dtype",
    [
        ("grouped", "grouped", 4, torch.bfloat16),
        ("fixed", "variable", 1, torch.bfloat16),
        ("variable", "variable", 1, torch.float16),
        ("variable", "fixed", 1, torch.float32),
    ],
)
def test_gpu_layouts_dtypes(bk, ck, G, dtype):
    # fp32 at a moderate length: the GPU's exp2 (ex2.approx, ~2 ulp) is less exact than torch's
    # exp, and its error accumulates along a slowly decaying state
    L = 1000 if dtype == torch.float32 else 3000
    x = op.make_inputs(2, 256, L, 16, dtype=dtype, device="cuda", B_kind=bk, C_kind=ck,
                       groups=G, seed=G)  # fmt: skip
    op.check_case(x, f"{bk}-{ck}-G{G}-{dtype}").assert_ok()


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 4, 64, 256])
def test_gpu_state_sizes(N):
    x = op.make_inputs(1, 96, 777, N, dtype=torch.bfloat16, device="cuda", initial_state=True)
    op.check_case(x, f"N{N}").assert_ok()


@pytest.mark.gpu
@pytest.mark.parametrize("nheads,dim", [(None, 2048), (None, 2064), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_state_update(nheads, dim, dtype):
    x = op.make_update_inputs(4, nheads, dim, 16, ngroups=8 if nheads else 1, dtype=dtype,
                              device="cuda")  # fmt: skip
    op.check_update_case(x, f"h{nheads}-d{dim}").assert_ok()


@pytest.mark.gpu
def test_gpu_deterministic_anchor_width():
    x = op.make_inputs(2, 2048, 1024, 16, dtype=torch.bfloat16, device="cuda")
    x["deterministic"] = True
    _, _, g1 = op.run_case(x)
    _, _, g2 = op.run_case(x)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


@pytest.mark.gpu
@pytest.mark.parametrize("bk,ck", [("variable", "variable"), ("grouped", "fixed")])
def test_gpu_serial_backward_bf16(monkeypatch, bk, ck):
    # the public op with the serial backward (opt-in SERIAL=1, non-deterministic mode) at 4k
    # in bf16: verified like every other case (float64 reference, same-dtype PyTorch baseline)
    x = op.make_inputs(2, 256, 4096, 16, dtype=torch.bfloat16, device="cuda", seed=5,
                       B_kind=bk, C_kind=ck, groups=4, initial_state=True)  # fmt: skip
    x["deterministic"] = False
    default = launch.default_config

    def cfg(kind, **shape):
        base = default(kind, **shape)
        return {**base, "SERIAL": 1, "NSPLIT": 4, "BLOCK_D": 8} if kind == "bwd" else base

    monkeypatch.setattr(launch, "default_config", cfg)
    spy = mock.Mock(wraps=launch._bwd_serial)
    monkeypatch.setattr(launch, "_bwd_serial", spy)
    op.check_case(x, f"bf16 serial backward {bk}/{ck}").assert_ok()
    assert spy.call_count >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [(4, 8, 16, 1), (32, 8, 16, 4)])
def test_gpu_segmented_backward_bf16(monkeypatch, tile):
    # the public op with its backward in 8 launches: the one-warp tile (the default's
    # partial-sum memory) and the default tile. Verified like every other case (float64
    # reference, same-dtype PyTorch baseline), and du/ddelta/dz equal to one launch's bits.
    x = op.make_inputs(2, 256, 4096, 16, dtype=torch.bfloat16, device="cuda", seed=3,
                       initial_state=True)  # fmt: skip
    x["deterministic"] = True  # segments are the deterministic path's
    default = launch.default_config

    def with_segments(segments):
        def cfg(kind, **shape):
            base = default(kind, **shape)
            if kind != "bwd":
                return base
            tiled = dict(zip(("BLOCK_D", "BLOCK_G", "BLOCK_R", "num_warps"), tile))
            return {**base, **tiled, "SEGMENTS": segments}

        return cfg

    monkeypatch.setattr(launch, "default_config", with_segments(1))
    _, _, one = op.run_case(x)
    monkeypatch.setattr(launch, "default_config", with_segments(8))
    op.check_case(x, f"bf16 SEGMENTS=8 {tile}").assert_ok()
    _, _, seg = op.run_case(x)
    for name in ("u", "delta", "z"):
        assert torch.equal(one[name], seg[name]), name


@pytest.mark.gpu
def test_gpu_self_check():
    for report in op.self_check("cuda", quick=False):
        report.assert_ok()


@pytest.mark.parametrize(
    ("g", "r", "chunk", "want"),
    [(32, 16, 128, (8, 16)), (8, 16, 128, (8, 16)), (1, 32, 16, (1, 16)), (4, 4, 64, (4, 4))],
)
def test_tuned_forward_chunk_is_fitted_to_the_checkpoint_interval(g, r, chunk, want):
    from scanopt.ops.selective_scan.launch import _fit_chunk

    cfg = _fit_chunk({"BLOCK_D": 1, "BLOCK_G": g, "BLOCK_R": r, "num_warps": 1}, chunk)
    assert (cfg["BLOCK_G"], cfg["BLOCK_R"]) == want
    assert chunk % (cfg["BLOCK_G"] * cfg["BLOCK_R"]) == 0
    # the groups given up come back as channels: the tile still covers as many lanes
    assert cfg["BLOCK_D"] * cfg["BLOCK_G"] == g
