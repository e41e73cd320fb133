"""WKV suites (ANCHORS.md widths, batch 4, d_model 2048):

- ``wkv4``: C 2048, transformers' ``rwkv_linear_attention`` contract (key/value ``(B, T, C)``,
  fp32 time_decay / time_first). Providers: ``scanopt`` (``scanopt.wkv4``), ``torch`` (scanopt's
  PyTorch path, else transformers' loop; L <= 4096), ``fla`` (``fla.ops.rwkv4.fused_recurrent_rwkv4``),
  ``rwkv-lm`` (a user-built RWKV-LM kernel, see :mod:`scanopt.bench.rwkv_lm`).
- ``wkv6``: 32 heads x 64, fla's ``[B, T, H, K]`` layout, ``w`` the log decay (``logsigmoid`` of a
  normal sample, as fla's benchmark registry), scale 1. Providers: ``scanopt`` (``scanopt.wkv6``),
  ``scanopt-chunked`` (the CUDA-core chunked family, forced), ``torch`` (loop; L <= 2048),
  ``fla`` (``fla.ops.rwkv6.chunk_rwkv6``), ``rwkv-lm``.
- ``wkv7``: 32 heads x 64, ``w = -0.6065 sigmoid(normal)`` (RWKV-7's clamped decay range, so
  RWKV-LM's clampw kernels can run the same inputs), ``a = -kk``, ``b = kk * alpha`` with ``kk``
  L2-normalised per head. Providers: ``scanopt`` (``scanopt.wkv7``), ``scanopt-chunked``,
  ``torch`` (loop; L <= 2048),
  ``fla`` (``fla.ops.rwkv7.chunk_rwkv7``), ``rwkv-lm``.

Reference: NumPy where cheap (short sequences only at this width), else the first of the PyTorch
loop (L <= 2048), fla and scanopt that runs the shape in float32 (wkv4: fla first; ``verified=self``
when that is the provider under test itself).
"""

from __future__ import annotations

from typing import Any

from scanopt.bench import eager, rwkv_lm
from scanopt.bench.formulas import TensorSpec
from scanopt.bench.registry import (
    TORCH_LOOP_MAX_L,
    Case,
    Impl,
    Provider,
    Suite,
    Unavailable,
    backend_env,
    scanopt_function,
    torch_dtype,
)
from scanopt.bench.suites import rand, randn

WKV4_LOOP_MAX_L = 4096


def _loop_limit(max_l: int):
    def supports(case: Case) -> str | None:
        if case["L"] > max_l:
            return f"the PyTorch loop is only run up to L={max_l}"
        return None

    return supports


def _bf16_only(case: Case) -> str | None:
    if case.dtype != "bfloat16":
        return "RWKV-LM's kernels take bf16 only"
    return None


def _scanopt_or_eager(name: str, call: Any, eager_fn: Any, what: str) -> Any:
    def load() -> Impl:
        try:
            fn = scanopt_function(name)
        except Unavailable:
            return Impl(call(eager_fn), detail=f"{what} (scanopt's op not importable)")
        return Impl(
            call(fn),
            context=lambda: backend_env("torch"),
            detail="scanopt with SCANOPT_BACKEND=torch",
        )

    return load


def _scanopt(name: str, call: Any) -> Any:
    return lambda: Impl(call(scanopt_function(name)))


def _scanopt_mode(name: str, call: Any, mode: str) -> Any:
    """scanopt's public op with one kernel family forced (``MODE``), e.g. ``"chunked"``."""

    def load() -> Impl:
        from scanopt.ops._rwkv_common import forced_mode

        return Impl(
            call(scanopt_function(name)),
            context=lambda: forced_mode(name, mode),
            detail=f"scanopt with MODE={mode!r} forced",
        )

    return load


def _rwkv_lm(name: str, call: Any) -> Any:
    def load() -> Impl:
        return Impl(call(rwkv_lm.function(name)), detail=rwkv_lm.describe())

    return load


class _WKVSuite(Suite):
    metric = "gbps"
    reference_order = ("numpy", "trusted")
    # the PyTorch loop first where it runs (independent, and fla's chunked kernels would autotune
    # again for float32, which takes minutes per shape), then fla, then scanopt itself
    # scanopt-chunked (a different kernel family from the tc default) is there for --reference
    trusted = ("torch", "fla", "scanopt-chunked", "scanopt")

    def __init__(self) -> None:
        self._providers: list[Provider] | None = None


# ---------------------------------------------------------------------------------------------
# WKV-4
# ---------------------------------------------------------------------------------------------

_V4_ARGS = ("time_decay", "time_first", "key", "value")


def _v4_call(fn: Any) -> Any:
    return lambda x, c: fn(x["time_decay"], x["time_first"], x["key"], x["value"])


def _v4_fla_adapt(x: dict, case: Case) -> dict:
    import torch

    k = x["key"]
    state = torch.zeros(k.shape[0], 3, 1, k.shape[2], dtype=torch.float32, device=k.device)
    state[:, 2] = -1e38
    return {**x, "state": state}


def _v4_fla() -> Impl:
    from fla.ops.rwkv4 import fused_recurrent_rwkv4

    return Impl(
        lambda x, c: fused_recurrent_rwkv4(
            x["time_decay"], x["time_first"], x["key"], x["value"], x["state"]
        )
    )


class WKV4Suite(_WKVSuite):
    name = "wkv4"
    title = "RWKV-4 WKV, C 2048"
    grad_names = _V4_ARGS
    trusted = ("fla", "torch", "scanopt")  # fla's RWKV-4 kernel does not autotune
    fixed = {"B": 4, "C": 2048}

    def dims(self, value: int) -> tuple:
        return (("B", self.fixed["B"]), ("L", value), ("C", self.fixed["C"]))

    def specs(self, case: Case):
        b, L, c = case["B"], case["L"], case["C"]
        seq = TensorSpec((b, L, c), case.dtype)
        par = TensorSpec((c,), "float32")
        return {"time_decay": par, "time_first": par, "key": seq, "value": seq}, {"out": seq}

    def make_inputs(self, case: Case, device: Any, gen: Any) -> dict:
        dt = torch_dtype(case.dtype)
        b, L, c = case["B"], case["L"], case["C"]
        return {
            "time_decay": rand((c,), gen, device, -5.0, 1.0),
            "time_first": randn((c,), gen, device, std=0.5),
            "key": randn((b, L, c), gen, device).to(dt),
            "value": randn((b, L, c), gen, device).to(dt),
        }

    def numpy_ok(self, case: Case) -> bool:
        return case["B"] * case["L"] * case["C"] <= 9e6  # L <= 1024 at the anchor width

    def numpy_reference(self, case: Case, x: dict, douts: dict | None):
        from scanopt.reference import wkv4_bwd, wkv4_fwd

        args = [x[n] for n in _V4_ARGS]
        out, _ = wkv4_fwd(*args)
        grads = {}
        if douts is not None:
            g = wkv4_bwd(douts["out"], *args)
            grads = {n: g[n] for n in _V4_ARGS}
        return {"out": out}, grads

    def providers(self) -> list[Provider]:
        if self._providers is None:
            self._providers = [
                Provider("scanopt", "scanopt.wkv4", _scanopt("wkv4", _v4_call)),
                Provider(
                    "torch",
                    "PyTorch path",
                    _scanopt_or_eager("wkv4", _v4_call, eager.wkv4, "transformers' loop"),
                    supports=_loop_limit(WKV4_LOOP_MAX_L),
                ),
                Provider(
                    "fla",
                    "fla.ops.rwkv4.fused_recurrent_rwkv4 (Triton)",
                    _v4_fla,
                    adapt=_v4_fla_adapt,
                ),
                Provider(
                    "rwkv-lm",
                    "RWKV-LM CUDA kernel (user-built, --rwkv-lm)",
                    _rwkv_lm("wkv4", _v4_call),
                ),
            ]
        return self._providers


# ---------------------------------------------------------------------------------------------
# WKV-6
# ---------------------------------------------------------------------------------------------

_V6_ARGS = ("r", "k", "v", "w", "u")


def _v6_call(fn: Any, **kw: Any) -> Any:
    return lambda x, c: fn(x["r"], x["k"], x["v"], x["w"], x["u"], **kw)


def _v6_fla() -> Impl:
    from fla.ops.rwkv6 import chunk_rwkv6

    return Impl(_v6_call(chunk_rwkv6, scale=1.0))


class WKV6Suite(_WKVSuite):
    name = "wkv6"
    title = "RWKV-6 WKV, 32 heads x 64"
    grad_names = _V6_ARGS
    fixed = {"B": 4, "H": 32, "K": 64}

    def dims(self, value: int) -> tuple:
        f = self.fixed
        return (("B", f["B"]), ("L", value), ("H", f["H"]), ("K", f["K"]))

    def specs(self, case: Case):
        b, L, h, k = case["B"], case["L"], case["H"], case["K"]
        seq = TensorSpec((b, L, h, k), case.dtype)
        inputs = {"r": seq, "k": seq, "v": seq, "w": seq, "u": TensorSpec((h, k), case.dtype)}
        return inputs, {"out": seq}

    def make_inputs(self, case: Case, device: Any, gen: Any) -> dict:
        import torch.nn.functional as F

        dt = torch_dtype(case.dtype)
        b, L, h, k = case["B"], case["L"], case["H"], case["K"]
        shape = (b, L, h, k)
        return {
            "r": randn(shape, gen, device).to(dt),
            "k": randn(shape, gen, device).to(dt),
            "v": randn(shape, gen, device).to(dt),
            "w": F.logsigmoid(randn(shape, gen, device)).to(dt),
            "u": randn((h, k), gen, device, std=0.5).to(dt),
        }

    def numpy_ok(self, case: Case) -> bool:
        return case["B"] * case["L"] * case["H"] * case["K"] ** 2 <= 1.5e8

    def numpy_reference(self, case: Case, x: dict, douts: dict | None):
        from scanopt.reference import wkv6_bwd, wkv6_fwd

        args = [x[n] for n in _V6_ARGS]
        out, _ = wkv6_fwd(*args, scale=1.0)
        grads = {}
        if douts is not None:
            g = wkv6_bwd(douts["out"], *args, scale=1.0)
            grads = {n: g[n] for n in _V6_ARGS}
        return {"out": out}, grads

    def providers(self) -> list[Provider]:
        if self._providers is None:
            self._providers = [
                Provider("scanopt", "scanopt.wkv6", _scanopt("wkv6", _v6_torch_call)),
                Provider(
                    "scanopt-chunked",
                    "scanopt.wkv6, chunked CUDA-core kernels (MODE chunked, the pre-tc default)",
                    _scanopt_mode("wkv6", _v6_torch_call, "chunked"),
                ),
                Provider(
                    "torch",
                    "PyTorch path",
                    _scanopt_or_eager("wkv6", _v6_torch_call, eager.wkv6, "fla's naive loop"),
                    supports=_loop_limit(TORCH_LOOP_MAX_L),
                ),
                Provider("fla", "fla.ops.rwkv6.chunk_rwkv6 (Triton)", _v6_fla),
                Provider(
                    "rwkv-lm",
                    "RWKV-LM CUDA kernel (user-built, --rwkv-lm)",
                    _rwkv_lm("wkv6", _v6_call),
                    supports=_bf16_only,
                ),
            ]
        return self._providers


def _v6_torch_call(fn: Any) -> Any:
    return _v6_call(fn, scale=1.0)


# ---------------------------------------------------------------------------------------------
# WKV-7
# ---------------------------------------------------------------------------------------------

_V7_ARGS = ("r", "w", "k", "v", "a", "b")
#: RWKV-7's decay bound: w = -exp(-0.5) * sigmoid(.) lies in (-0.6065, 0)
W7_BOUND = 0.6065306597126334


def _v7_call(fn: Any, **kw: Any) -> Any:
    return lambda x, c: fn(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], **kw)


def _v7_scaled_call(fn: Any) -> Any:
    return _v7_call(fn, scale=1.0)


def _v7_fla() -> Impl:
    from fla.ops.rwkv7 import chunk_rwkv7

    return Impl(_v7_call(chunk_rwkv7, scale=1.0))


class WKV7Suite(_WKVSuite):
    name = "wkv7"
    title = "RWKV-7 WKV, 32 heads x 64"
    grad_names = _V7_ARGS
    fixed = {"B": 4, "H": 32, "K": 64}

    def dims(self, value: int) -> tuple:
        f = self.fixed
        return (("B", f["B"]), ("L", value), ("H", f["H"]), ("K", f["K"]))

    def specs(self, case: Case):
        b, L, h, k = case["B"], case["L"], case["H"], case["K"]
        seq = TensorSpec((b, L, h, k), case.dtype)
        return {n: seq for n in _V7_ARGS}, {"out": seq}

    def make_inputs(self, case: Case, device: Any, gen: Any) -> dict:
        import torch

        dt = torch_dtype(case.dtype)
        b, L, h, k = case["B"], case["L"], case["H"], case["K"]
        shape = (b, L, h, k)
        kk = torch.nn.functional.normalize(randn(shape, gen, device), dim=-1)
        alpha = torch.sigmoid(randn(shape, gen, device))
        return {
            "r": randn(shape, gen, device, std=0.5).to(dt),
            "w": (-W7_BOUND * torch.sigmoid(randn(shape, gen, device))).to(dt),
            "k": randn(shape, gen, device, std=0.5).to(dt),
            "v": randn(shape, gen, device, std=0.5).to(dt),
            "a": (-kk).to(dt),
            "b": (kk * alpha).to(dt),
        }

    def numpy_ok(self, case: Case) -> bool:
        return case["B"] * case["L"] * case["H"] * case["K"] ** 2 <= 1.5e8

    def numpy_reference(self, case: Case, x: dict, douts: dict | None):
        from scanopt.reference import wkv7_bwd, wkv7_fwd

        args = [x[n] for n in _V7_ARGS]
        out, _ = wkv7_fwd(*args, scale=1.0)
        grads = {}
        if douts is not None:
            g = wkv7_bwd(douts["out"], *args, scale=1.0)
            grads = {n: g[n] for n in _V7_ARGS}
        return {"out": out}, grads

    def providers(self) -> list[Provider]:
        if self._providers is None:
            self._providers = [
                Provider("scanopt", "scanopt.wkv7", _scanopt("wkv7", _v7_scaled_call)),
                Provider(
                    "scanopt-chunked",
                    "scanopt.wkv7, chunked CUDA-core kernels (MODE chunked, the pre-tc default)",
                    _scanopt_mode("wkv7", _v7_scaled_call, "chunked"),
                ),
                Provider(
                    "torch",
                    "PyTorch path",
                    _scanopt_or_eager("wkv7", _v7_scaled_call, eager.wkv7, "fla's naive loop"),
                    supports=_loop_limit(TORCH_LOOP_MAX_L),
                ),
                Provider("fla", "fla.ops.rwkv7.chunk_rwkv7 (Triton)", _v7_fla),
                Provider(
                    "rwkv-lm",
                    "RWKV-LM CUDA kernel (user-built, --rwkv-lm)",
                    _rwkv_lm("wkv7", _v7_call),
                    supports=_bf16_only,
                ),
            ]
        return self._providers


SUITES = {"wkv4": WKV4Suite(), "wkv6": WKV6Suite(), "wkv7": WKV7Suite()}
