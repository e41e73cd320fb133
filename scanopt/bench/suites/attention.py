"""Attention: 16 heads x head dim 128 (d_model 2048), batch 4, causal, bf16 (ANCHORS.md).

Canonical layout: torch SDPA's ``(B, H, L, D)``; providers in flash-attn's ``(B, L, H, D)`` layout
get contiguous transposed copies (made once, untimed).

Providers: ``scanopt`` (``scanopt.scaled_dot_product_attention``), ``scanopt-flash``
(``scanopt.flash_attn_func``), ``torch`` (scanopt's PyTorch path, else ``softmax(QK^T)V``),
``sdpa-cudnn`` / ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-math`` (``F.scaled_dot_product_attention``
inside ``torch.nn.attention.sdpa_kernel`` with one backend), ``flash_attn`` (Dao-AILab's
``flash_attn_func``). Reference: exact float64 attention on the device (blockwise).
"""

from __future__ import annotations

from typing import Any

from scanopt.bench import eager
from scanopt.bench.formulas import TensorSpec, attention_flops
from scanopt.bench.registry import (
    Case,
    Impl,
    Provider,
    Suite,
    Unavailable,
    backend_env,
    first_as_out,
    scanopt_function,
)
from scanopt.bench.suites import randn


def _bhld(case: Case) -> tuple[int, int, int, int]:
    return case["B"], case["H"], case["L"], case["D"]


def _to_blhd(x: dict, case: Case) -> dict:
    return {n: x[n].transpose(1, 2).contiguous() for n in ("q", "k", "v")}


def _out_from_blhd(result: Any, native: Any, case: Case) -> dict:
    out = first_as_out(result, native, case)["out"]
    return {"out": out.transpose(1, 2)}


def _scores_bytes(case: Case) -> int:
    """Memory of paths that materialise the score matrix: about four fp32 ``L x L`` per head."""
    b, h, L, _ = _bhld(case)
    return 16 * b * h * L * L


def _scanopt_sdpa() -> Impl:
    fn = scanopt_function("scaled_dot_product_attention")
    return Impl(lambda x, c: fn(x["q"], x["k"], x["v"], is_causal=c["causal"]))


def _scanopt_flash() -> Impl:
    fn = scanopt_function("flash_attn_func")
    return Impl(lambda x, c: fn(x["q"], x["k"], x["v"], causal=c["causal"]))


def _torch_path() -> Impl:
    try:
        fn = scanopt_function("scaled_dot_product_attention")
    except Unavailable:
        return Impl(
            lambda x, c: eager.attention(x["q"], x["k"], x["v"], causal=c["causal"]),
            detail="plain PyTorch softmax(QK^T)V (scanopt's attention op is not importable)",
        )
    return Impl(
        lambda x, c: fn(x["q"], x["k"], x["v"], is_causal=c["causal"]),
        context=lambda: backend_env("torch"),
        detail="scanopt with SCANOPT_BACKEND=torch",
    )


def _sdpa(backend: str) -> Any:
    def load() -> Impl:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = getattr(SDPBackend, backend)
        return Impl(
            lambda x, c: F.scaled_dot_product_attention(
                x["q"], x["k"], x["v"], is_causal=c["causal"]
            ),
            context=lambda: sdpa_kernel([chosen]),
        )

    return load


def _flash_attn() -> Impl:
    from flash_attn import flash_attn_func

    return Impl(lambda x, c: flash_attn_func(x["q"], x["k"], x["v"], causal=c["causal"]))


class AttentionSuite(Suite):
    name = "attention"
    title = "causal attention, 16 heads x 128"
    metric = "tflops"
    grad_names = ("q", "k", "v")
    reference_order = ("torch64", "numpy", "trusted")
    fixed = {"B": 4, "H": 16, "D": 128, "causal": True}

    def __init__(
        self, name: str = "attention", heads: int = 16, head_dim: int = 128, causal: bool = True
    ) -> None:
        self.name = name
        self.title = f"{'causal' if causal else 'non-causal'} attention, {heads} heads x {head_dim}"
        self.fixed = {"B": 4, "H": heads, "D": head_dim, "causal": causal}
        self._providers: list[Provider] | None = None

    def dims(self, value: int) -> tuple:
        f = self.fixed
        return (("B", f["B"]), ("H", f["H"]), ("L", value), ("D", f["D"]), ("causal", f["causal"]))

    def specs(self, case: Case):
        b, h, L, d = _bhld(case)
        t = TensorSpec((b, h, L, d), case.dtype)
        return {"q": t, "k": t, "v": t}, {"out": t}

    def flops(self, case: Case, direction: str) -> float:
        b, h, L, d = _bhld(case)
        return attention_flops(b, h, L, L, d, bool(case["causal"]), direction)

    def make_inputs(self, case: Case, device: Any, gen: Any) -> dict:
        from scanopt.bench.registry import torch_dtype

        dt = torch_dtype(case.dtype)
        shape = _bhld(case)
        return {n: randn(shape, gen, device).to(dt) for n in ("q", "k", "v")}

    def numpy_ok(self, case: Case) -> bool:
        b, h, L, _ = _bhld(case)
        return b * h * L * L <= 2**24

    def numpy_reference(self, case: Case, x: dict, douts: dict | None):
        from scanopt.reference import attention_bwd, attention_fwd

        kw = {"causal": bool(case["causal"]), "causal_align": "top_left"}
        out, _ = attention_fwd(x["q"], x["k"], x["v"], **kw)
        grads = {}
        if douts is not None:
            grads = attention_bwd(douts["out"], x["q"], x["k"], x["v"], **kw)
        return {"out": out}, grads

    def torch64_reference(self, case: Case, x: dict, douts: dict | None):
        dout = None if douts is None else douts["out"]
        out, grads = eager.attention_fp64(x["q"], x["k"], x["v"], dout, causal=case["causal"])
        return {"out": out}, grads

    def providers(self) -> list[Provider]:
        if self._providers is None:
            self._providers = [
                Provider("scanopt", "scanopt.scaled_dot_product_attention", _scanopt_sdpa),
                Provider(
                    "scanopt-flash",
                    "scanopt.flash_attn_func, (B, L, H, D) layout",
                    _scanopt_flash,
                    adapt=_to_blhd,
                    outputs=_out_from_blhd,
                ),
                Provider("torch", "PyTorch path", _torch_path, memory=_scores_bytes),
                Provider("sdpa-cudnn", "SDPA, cuDNN backend", _sdpa("CUDNN_ATTENTION")),
                Provider("sdpa-flash", "SDPA, FlashAttention-2 backend", _sdpa("FLASH_ATTENTION")),
                Provider(
                    "sdpa-efficient", "SDPA, memory-efficient backend", _sdpa("EFFICIENT_ATTENTION")
                ),
                Provider("sdpa-math", "SDPA, math backend", _sdpa("MATH"), memory=_scores_bytes),
                Provider(
                    "flash_attn",
                    "flash_attn.flash_attn_func (Dao-AILab), (B, L, H, D) layout",
                    _flash_attn,
                    adapt=_to_blhd,
                    outputs=_out_from_blhd,
                ),
            ]
        return self._providers


#: the issue's four anchor shapes (d_model 2048): 16 x 128 and 32 x 64, causal and not
SUITES = {
    "attention": AttentionSuite(),
    "attention_nc": AttentionSuite("attention_nc", causal=False),
    "attention_h32": AttentionSuite("attention_h32", heads=32, head_dim=64),
    "attention_h32_nc": AttentionSuite("attention_h32_nc", heads=32, head_dim=64, causal=False),
}
