"""Drop-in integrations: tiny randomly initialised HF models patched vs unpatched (logits, loss,
gradients within the verify budgets), cached generation vs a full forward, revert, aliases."""

import copy
import sys

import pytest

from scanopt.verify import Report

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import scanopt.integrations as si  # noqa: E402

VOCAB, L = 64, 12


def _mamba(dtype=torch.float32):
    cfg = transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
        conv_kernel=4, use_cache=True,
    )  # fmt: skip
    return transformers.MambaForCausalLM(cfg)


def _rwkv(dtype=torch.float32):
    cfg = transformers.RwkvConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, attention_hidden_size=16,
        intermediate_size=32, context_length=32,
    )  # fmt: skip
    model = transformers.RwkvForCausalLM(cfg)
    with torch.no_grad():  # HF's init leaves the decays flat; spread them so the test can fail
        for block in model.rwkv.blocks:
            block.attention.time_decay.uniform_(-2.0, 1.0)
            block.attention.time_first.uniform_(-1.0, 1.0)
    return model


def _llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


BUILDERS = {"mamba": _mamba, "rwkv": _rwkv, "attention": _llama}


def _run(model, ids, train):
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return out.logits.detach(), out.loss.detach(), grads


def _patched_vs_unpatched(op, device, dtype, train):
    torch.manual_seed(0)
    ref_model = BUILDERS[op]().to(device)  # fp32, unpatched: the reference
    model = copy.deepcopy(ref_model).to(dtype)
    ids = torch.randint(0, VOCAB, (2, L), device=device)
    ref = _run(ref_model, ids, train)
    base = _run(copy.deepcopy(model), ids, train) if dtype != torch.float32 else None
    handle = si.patch_transformers(model, ops=(op,))
    try:
        got = _run(model, ids, train)
    finally:
        si.revert(handle)
    rep = Report(f"hf-{op}", f"{dtype} train={train}")
    dname = str(dtype).replace("torch.", "")
    for i, name in enumerate(("logits", "loss", "grads")):
        rep.check(name, got[i], ref[i], dtype=dname, baseline=None if base is None else base[i])
    rep.assert_ok()
    return model, ids


def _cached_generation_matches_full(model, ids, op, new_tokens=3):
    model.eval()
    handle = si.patch_transformers(model, ops=(op,))
    try:
        with torch.no_grad():
            gen = model.generate(
                ids, max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                return_dict_in_generate=True, output_logits=True, pad_token_id=0,
            )  # fmt: skip
            seq = gen.sequences
            full = model(input_ids=seq, use_cache=False).logits
    finally:
        si.revert(handle)
    T = ids.shape[1]
    # greedy tokens from the full forward equal the cached generation's
    assert torch.equal(full[:, T - 1 : -1].argmax(-1), seq[:, T:])
    rep = Report(f"hf-{op}-generate")
    for i, step_logits in enumerate(gen.logits):
        rep.check(f"step{i}", step_logits, full[:, T - 1 + i], dtype="float32")
    rep.assert_ok()


@pytest.mark.parametrize("op", ["mamba", "rwkv", "attention"])
def test_patched_matches_unpatched(device, op):
    # mamba in train mode takes mamba_inner_fn; eval mode the conv1d + scan path
    model, ids = _patched_vs_unpatched(op, device, torch.float32, train=(op == "mamba"))
    if op == "mamba":
        _patched_vs_unpatched(op, device, torch.float32, train=False)
    _cached_generation_matches_full(model, ids[:1, :6], op)


def _hf_mamba_hooks(mm):
    """The names patch_transformers replaces in this transformers' modeling_mamba (4.5x / 5.0
    vs >= 5.1x layouts) and the scan's name among them."""
    if hasattr(mm, "mamba_selective_scan"):  # >= 5.1x: hub-wrapped functions
        names = ("mamba_selective_scan", "mamba_selective_state_update", "mamba_inner_fn",
                 "causal_conv1d_fn", "causal_conv1d_update")  # fmt: skip
        return names, "mamba_selective_scan"
    names = ("selective_scan_fn", "mamba_inner_fn", "selective_state_update")  # 4.5x, 5.0
    loaders = tuple(n for n in ("_lazy_load_causal_conv1d", "lazy_load_kernel") if n in vars(mm))
    return names + loaders, "selective_scan_fn"


def test_patch_reaches_scanopt_and_revert_restores(device):
    from transformers.models.mamba import modeling_mamba as mm
    from transformers.models.rwkv import modeling_rwkv as mr

    from scanopt.ops.selective_scan.op import selective_scan_fn

    names, scan = _hf_mamba_hooks(mm)
    before = [vars(mm).get(n) for n in names] + [mm.MambaMixer.forward, mr.rwkv_linear_attention]
    handle = si.patch_transformers()
    assert getattr(getattr(mm, scan), "__scanopt_hf_adapter__", getattr(mm, scan)) is (
        selective_scan_fn
    )
    assert all(getattr(mm, n) is not b for n, b in zip(names, before))
    assert mr.rwkv_linear_attention is not before[-1]
    assert "scanopt" in transformers.AttentionInterface._global_mapping
    torch.manual_seed(0)
    model = _mamba().to(device).eval()  # built after the patch (5.0 re-resolves kernels here)
    calls = []
    orig = getattr(mm, scan)
    setattr(mm, scan, lambda *a, **k: calls.append(1) or orig(*a, **k))
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (1, 5), device=device), use_cache=False)
    setattr(mm, scan, orig)
    assert len(calls) == 2  # one per layer: scanopt's scan ran on this device
    si.revert(handle)
    after = [vars(mm).get(n) for n in names] + [mm.MambaMixer.forward, mr.rwkv_linear_attention]
    assert all(a is b for a, b in zip(after, before))
    assert "scanopt" not in transformers.AttentionInterface._global_mapping
    with pytest.raises(ValueError, match="ops"):
        si.patch_transformers(ops=("nope",))


def test_hf_adapter_drops_fallback_kwargs_and_refuses_packed_sequences():
    from scanopt.integrations.transformers import _hf_adapter

    def fn(x, seq_idx=None, activation=None):
        return (x, seq_idx, activation)

    ad = _hf_adapter(fn, "causal_conv1d_fn")
    assert ad(1, activation="silu", use_mambapy=True, position_ids=None) == (1, None, "silu")
    assert ad(1, seq_idx=None, cu_seqlens=None) == (1, None, None)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ad(1, cu_seqlens=torch.tensor([0, 3]))


def test_revert_restores_model_outputs(device):
    torch.manual_seed(0)
    model = _llama().to(device).eval()
    ids = torch.randint(0, VOCAB, (1, 7), device=device)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        handle = si.patch_transformers(model, ops=("attention",))
        assert model.config._attn_implementation == "scanopt"
        si.revert(handle)
        assert model.config._attn_implementation == "eager"
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_padding_mask_matches_eager(device):
    torch.manual_seed(0)
    model = _llama().to(device).eval()
    ids = torch.randint(0, VOCAB, (2, 7), device=device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first row
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with si.patch_transformers(model, ops=("attention",)):
            got = model(input_ids=ids, attention_mask=mask).logits
    rows = mask.bool()  # padded query rows are not compared (their output is arbitrary)
    Report("hf-attention-padding").check("logits", got[rows], ref[rows]).passed or pytest.fail(
        "padded attention differs from eager"
    )


def test_aliases_resolve_to_scanopt():
    from scanopt.ops.causal_conv1d.op import causal_conv1d_fn
    from scanopt.ops.selective_scan.op import selective_scan_fn, selective_state_update

    mamba = si.as_mamba_ssm()
    assert mamba.ops.selective_scan_interface.selective_scan_fn is selective_scan_fn
    assert mamba.ops.triton.selective_state_update.selective_state_update is (
        selective_state_update
    )
    fla = si.as_fla()
    assert callable(fla.ops.rwkv6.chunk_rwkv6) and callable(fla.ops.rwkv7.fused_recurrent_rwkv7)
    assert callable(si.as_rwkvlm().RUN_CUDA_RWKV6)
    if any(n in sys.modules for n in ("mamba_ssm", "causal_conv1d", "fla")):
        pytest.skip("a real mamba_ssm / causal_conv1d / fla is imported")
    si.install_aliases()
    try:
        import causal_conv1d
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as ssu

        assert mamba_inner_fn is si.mamba_inner_fn and ssu is selective_state_update
        assert causal_conv1d.causal_conv1d_fn is causal_conv1d_fn
        from fla.ops.rwkv6 import chunk_rwkv6

        with pytest.raises(ValueError, match="cu_seqlens"):
            chunk_rwkv6(*[None] * 5, cu_seqlens=torch.tensor([0, 3]))
    finally:
        si.uninstall_aliases()
    assert "mamba_ssm" not in sys.modules and "fla.ops.rwkv7" not in sys.modules


def test_mamba_inner_fn_matches_unfused(device):
    from scanopt import causal_conv1d_fn, selective_scan_fn

    torch.manual_seed(0)
    B, dim, N, R, Lx, dm = 2, 6, 4, 2, 9, 5
    xz = torch.randn(B, 2 * dim, Lx, device=device)
    cw, cb = torch.randn(dim, 1, 4, device=device) * 0.5, torch.randn(dim, device=device)
    xw = torch.randn(R + 2 * N, dim, device=device) * 0.3
    dw = torch.randn(dim, R, device=device) * 0.5
    ow = torch.randn(dm, dim, device=device) * 0.3
    A = -torch.rand(dim, N, device=device) - 0.5
    D, db = torch.randn(dim, device=device), torch.randn(dim, device=device) * 0.1
    got = si.mamba_inner_fn(xz, cw, cb, xw, dw, ow, None, A, None, None, D, delta_bias=db)
    x, z = xz.chunk(2, 1)
    c = causal_conv1d_fn(x, cw[:, 0], cb, activation="silu")
    xd = c.transpose(1, 2) @ xw.T
    delta = (xd[..., :R] @ dw.T).transpose(1, 2)
    y = selective_scan_fn(c, delta, A, xd[..., R : R + N].transpose(1, 2).contiguous(),
                          xd[..., R + N :].transpose(1, 2).contiguous(), D, z, db, True)  # fmt: skip
    want = y.transpose(1, 2) @ ow.T
    assert got.shape == (B, Lx, dm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["mamba", "rwkv", "attention"])
def test_patched_matches_unpatched_bf16_gpu(op):
    model, ids = _patched_vs_unpatched(op, "cuda", torch.bfloat16, train=(op == "mamba"))
    _patched_vs_unpatched(op, "cuda", torch.bfloat16, train=False)
