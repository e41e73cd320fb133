"""The launchers of wkv4, wkv6, wkv7 and attention look up the tuned-config store.

A config written to a temporary user store (``SCANOPT_CACHE_DIR``) under the keys a ``scanopt
tune`` study exports (op, direction, dtype, the Tunable's shape dims) must be the one the
launcher resolves and launches with; an entry for another Triton version, or one naming a key
the launcher does not take, must be ignored. Runs on CPU under the interpreter (conftest).
"""

from __future__ import annotations

import pytest
import torch

from scanopt._env import interpreting
from scanopt.autotune import spaces, store
from scanopt.autotune.device import device_props

pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (CPU)")

CPU = torch.device("cpu")


@pytest.fixture
def user_store(tmp_path, monkeypatch):
    monkeypatch.setenv("SCANOPT_CACHE_DIR", str(tmp_path / "cache"))
    store.clear_cache()
    yield tmp_path
    store.clear_cache()


def _record(op, direction, shape, config, *, dtype="float32", triton_version=None):
    # the Tunable's exact dims, as `scanopt tune` records them
    exact = spaces.get_tunable(op, direction).exact
    e = store.make_entry(device_props("cpu"), op, direction, dtype, shape, config, exact=exact)
    if triton_version is not None:
        e["triton"] = triton_version
    store.record(e)
    store.clear_cache()


# ------------------------------------------------------------------------------------------
# one resolver per op: (shape as the Tunable names it) -> the config the launcher uses


def _wkv4(direction, shape):
    from scanopt.ops.wkv4 import launch

    return launch.resolve_config(
        direction, None, B=shape["B"], T=shape["T"], C=shape["C"], dtype=torch.float32, device=CPU
    )


def _wkv4_default(direction, shape):
    from scanopt.ops.wkv4 import launch

    return launch.default_config(
        direction, B=shape["B"], T=shape["T"], C=shape["C"], dtype=torch.float32, device=CPU
    )


def _rwkv(op):
    def resolve(direction, shape):
        from scanopt.ops._rwkv_common import resolve_config

        return resolve_config(
            op, direction, None, T=shape["T"], K=shape["K"], V=shape["V"], dtype=torch.float32,
            B=shape["B"], H=shape["H"], device=CPU,
        )  # fmt: skip

    return resolve


def _rwkv_default(op):
    def default(direction, shape):
        from scanopt.ops._rwkv_common import default_config

        return default_config(
            direction, T=shape["T"], K=shape["K"], V=shape["V"], dtype=torch.float32, op=op
        )

    return default


def _attn(direction, shape):
    from scanopt.ops.attention import launch

    return launch.launch_config(
        direction, batch=shape["B"], heads=shape["H"], lq=shape["L"], head_dim=shape["D"],
        head_dim_v=shape["D"], dtype=torch.float32, causal=bool(shape["causal"]), device=CPU,
        seq_first=bool(shape["seq"]),
    )  # fmt: skip


def _attn_default(direction, shape):
    from scanopt.ops.attention import launch

    return launch.default_config(
        direction, head_dim=shape["D"], dtype=torch.float32, causal=bool(shape["causal"]),
        device=CPU,
    )  # fmt: skip


WKV4_SHAPE = {"B": 1, "T": 45, "C": 40}
RWKV_SHAPE = {"B": 1, "T": 19, "H": 2, "K": 16, "V": 16}
ATTN_SHAPE = {"B": 1, "H": 2, "L": 40, "D": 32, "causal": 1, "seq": 1}

# (op, direction, shape, resolver, default, a tuned config different from the default)
CASES = [
    ("wkv4", "fwd", WKV4_SHAPE, _wkv4, _wkv4_default, {"chunk": 32, "block_t": 8, "num_warps": 2}),
    ("wkv4", "bwd", WKV4_SHAPE, _wkv4, _wkv4_default, {"block_t": 4, "scan_warps": 2}),
    ("wkv6", "fwd", RWKV_SHAPE, _rwkv("wkv6"), _rwkv_default("wkv6"), {"BV": 8, "num_warps": 2}),
    ("wkv6", "bwd", RWKV_SHAPE, _rwkv("wkv6"), _rwkv_default("wkv6"), {"BV": 8, "num_stages": 2}),
    ("wkv7", "fwd", RWKV_SHAPE, _rwkv("wkv7"), _rwkv_default("wkv7"), {"BV": 8, "num_warps": 2}),
    ("wkv7", "bwd", RWKV_SHAPE, _rwkv("wkv7"), _rwkv_default("wkv7"), {"BV": 8, "num_stages": 2}),
    ("attention", "fwd", ATTN_SHAPE, _attn, _attn_default, {"BLOCK_M": 16, "num_warps": 2}),
    ("attention", "bwd", ATTN_SHAPE, _attn, _attn_default, {"BLOCK_N_Q": 32, "num_warps_q": 2}),
]
IDS = [f"{c[0]}.{c[1]}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_launcher_resolves_the_user_store_config(user_store, case):
    op, direction, shape, resolve, default, tuned = case
    base = default(direction, shape)
    assert any(base[k] != v for k, v in tuned.items()), "the test config must differ"
    assert resolve(direction, shape) == base  # empty store: the heuristic default
    _record(op, direction, shape, tuned)
    assert resolve(direction, shape) == {**base, **tuned}
    # a nearby shape of the same bucket family resolves to it too (nearest bucket)
    other = {**shape, "B": 2}
    assert resolve(direction, other) == {**base, **tuned} or default(direction, other) != base


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_launcher_ignores_other_triton_and_unknown_keys(user_store, case):
    op, direction, shape, resolve, default, tuned = case
    base = default(direction, shape)
    _record(op, direction, shape, tuned, triton_version="0.0.1")
    assert resolve(direction, shape) == base
    _record(op, direction, shape, {**tuned, "NOT_A_KEY": 4})
    assert resolve(direction, shape) == base
    _record(op, "fwd" if direction == "bwd" else "bwd", shape, {"num_warps": 8})
    assert resolve(direction, shape) == base
    _record(op, direction, shape, tuned, dtype="float16")  # another dtype
    assert resolve(direction, shape) == base


class _Spy:
    """Stands in for a Triton kernel and records the meta-parameters of each launch."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)

        return launch


def test_wkv4_public_call_launches_the_tuned_config(user_store, monkeypatch):
    import scanopt
    from scanopt.ops.wkv4 import launch

    B, T, C = WKV4_SHAPE["B"], WKV4_SHAPE["T"], WKV4_SHAPE["C"]
    _record("wkv4", "fwd", WKV4_SHAPE, {"chunk": 16, "block_t": 4, "num_warps": 2})
    spy = _Spy()
    monkeypatch.setattr(launch, "wkv4_fwd_out_kernel", spy)
    for name in ("wkv4_fwd_summary_kernel", "wkv4_fwd_scan_kernel"):
        monkeypatch.setattr(launch, name, _Spy())
    td, tf = torch.randn(C), torch.randn(C)
    k, v = torch.randn(B, T, C), torch.randn(B, T, C)
    scanopt.wkv4(td, tf, k, v)
    (kw,) = spy.calls
    assert (kw["CHUNK"], kw["BLOCK_T"], kw["num_warps"]) == (16, 4, 2)


def test_attention_public_call_launches_the_tuned_config(user_store, monkeypatch):
    import scanopt
    from scanopt.ops.attention import kernels

    shape = {"B": 1, "H": 2, "L": 40, "D": 32, "causal": 1, "seq": 1}
    _record("attention", "fwd", shape, {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 2})
    spy = _Spy()
    monkeypatch.setattr(kernels, "attn_fwd_kernel", spy)
    q, k, v = (torch.randn(1, 40, 2, 32) for _ in range(3))
    scanopt.flash_attn_func(q, k, v, causal=True)
    (kw,) = spy.calls
    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"]) == (32, 64, 2)
    # the memory layout is part of the key: (B, H, L, D)-contiguous tensors through SDPA do not
    # take the seq-first entry, but their own
    spy.calls.clear()
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    scanopt.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    (kw,) = spy.calls
    assert (kw["BLOCK_M"], kw["BLOCK_N"]) != (32, 64)
    _record("attention", "fwd", {**shape, "seq": 0}, {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 2})
    scanopt.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    assert (spy.calls[-1]["BLOCK_M"], spy.calls[-1]["BLOCK_N"]) == (64, 16)
    scanopt.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True)  # fmt: skip
    assert (spy.calls[-1]["BLOCK_M"], spy.calls[-1]["BLOCK_N"]) == (32, 64)  # seq-first views


@pytest.mark.parametrize("op", ["wkv6", "wkv7"])
def test_rwkv_tuned_config_may_switch_to_the_tensor_core_kernels(user_store, op):
    """A tuned config that picks MODE "tc" (what ``scanopt tune`` finds when tc is faster) is
    used for its dtype; an explicit MODE still wins, and fp32 never takes tc."""
    from scanopt.ops._rwkv_common import resolve_config

    def resolve(direction, dtype, config=None):
        s = RWKV_SHAPE
        return resolve_config(
            op, direction, config, T=s["T"], K=s["K"], V=s["V"], dtype=dtype, B=s["B"],
            H=s["H"], device=CPU,
        )  # fmt: skip

    for direction in ("fwd", "bwd"):
        _record(op, direction, RWKV_SHAPE, {"MODE": "tc", "BV": 16}, dtype="float16")
        assert resolve(direction, torch.float16)["MODE"] == "tc"
        assert resolve(direction, torch.float16, {"MODE": "recurrent"})["MODE"] == "recurrent"
        _record(op, direction, RWKV_SHAPE, {"MODE": "tc", "BV": 16}, dtype="float32")
        assert resolve(direction, torch.float32)["MODE"] != "tc"
