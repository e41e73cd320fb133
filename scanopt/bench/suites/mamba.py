"""Mamba suites (ANCHORS.md widths, batch 4):

- ``selective_scan``: Mamba-1, dim 2048, dstate 16, variable B/C ``(batch, N, L)``, with z, D,
  delta_bias and delta_softplus. Providers: ``scanopt`` (``scanopt.selective_scan_fn``), ``torch``
  (scanopt's PyTorch path, else mamba_ssm's ``selective_scan_ref`` loop; L <= 2048),
  ``mamba_ssm`` (``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` over the CUDA
  extension ``selective_scan_cuda``, which needs ``MAMBA_KEEP_CUDA_BUILD=TRUE`` since mamba #977).
  Reference: NumPy for short sequences (L <= 152 at this width: the NumPy scan costs ~35 ms per
  step), else mamba_ssm in float32, else the PyTorch loop in float32 (L <= 2048), else scanopt in
  float32 (``verified=self``).
- ``ssd``: Mamba-2 SSD, 64 heads x headdim 64, dstate 128, 1 group, chunk 256, with D, dt_bias and
  dt_softplus. Providers: ``torch`` (the chunked "minimal SSD" of the Mamba-2 paper, float32) and
  ``mamba_ssm`` (``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``); scanopt has no
  SSD op yet. Reference: the minimal SSD in float64 on the device (exact).
- ``state_update``: the Mamba-1 decode step, dim 2048, dstate 16, swept over batch 1..64,
  forward only, timed with CUDA graphs. Providers: ``scanopt`` (``scanopt.selective_state_update``),
  ``torch``, ``mamba_ssm`` (``mamba_ssm.ops.triton.selective_state_update``). Reference: NumPy.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from scanopt.bench import eager
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

# ---------------------------------------------------------------------------------------------
# selective scan
# ---------------------------------------------------------------------------------------------

_SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _scan_call(fn: Any) -> Any:
    return lambda x, c: fn(
        x["u"],
        x["delta"],
        x["A"],
        x["B"],
        x["C"],
        x["D"],
        x["z"],
        x["delta_bias"],
        delta_softplus=True,
    )


def _scan_scanopt() -> Impl:
    return Impl(_scan_call(scanopt_function("selective_scan_fn")))


def _scan_torch() -> Impl:
    try:
        fn = scanopt_function("selective_scan_fn")
    except Unavailable:
        return Impl(
            _scan_call(eager.selective_scan),
            detail="mamba_ssm's selective_scan_ref loop in PyTorch (scanopt's op not importable)",
        )
    return Impl(
        _scan_call(fn),
        context=lambda: backend_env("torch"),
        detail="scanopt with SCANOPT_BACKEND=torch",
    )


def _scan_mamba() -> Impl:
    if importlib.util.find_spec("selective_scan_cuda") is None:
        raise Unavailable(
            "mamba_ssm's CUDA extension selective_scan_cuda is not built "
            "(pip install mamba-ssm with MAMBA_KEEP_CUDA_BUILD=TRUE)"
        )
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return Impl(_scan_call(selective_scan_fn))


def _loop_limit(case: Case) -> str | None:
    if case["L"] > TORCH_LOOP_MAX_L:
        return f"the PyTorch loop is only run up to L={TORCH_LOOP_MAX_L}"
    return None


class SelectiveScanSuite(Suite):
    name = "selective_scan"
    title = "Mamba-1 selective scan, dim 2048, dstate 16"
    metric = "gbps"
    grad_names = _SCAN_ARGS
    reference_order = ("numpy", "trusted")
    trusted = ("mamba_ssm", "torch", "scanopt")
    fixed = {"B": 4, "D": 2048, "N": 16}

    def __init__(self) -> None:
        self._providers: list[Provider] | None = None

    def dims(self, value: int) -> tuple:
        f = self.fixed
        return (("B", f["B"]), ("D", f["D"]), ("L", value), ("N", f["N"]))

    def specs(self, case: Case):
        b, d, L, n = case["B"], case["D"], case["L"], case["N"]
        io = TensorSpec((b, d, L), case.dtype)
        bc = TensorSpec((b, n, L), case.dtype)
        inputs = {
            "u": io,
            "delta": io,
            "A": TensorSpec((d, n), "float32"),
            "B": bc,
            "C": bc,
            "D": TensorSpec((d,), "float32"),
            "z": io,
            "delta_bias": TensorSpec((d,), "float32"),
        }
        return inputs, {"out": io}

    def make_inputs(self, case: Case, device: Any, gen: Any) -> dict:
        import torch

        dt = torch_dtype(case.dtype)
        b, d, L, n = case["B"], case["D"], case["L"], case["N"]
        A = -torch.arange(1, n + 1, dtype=torch.float32, device=device).repeat(d, 1)
        return {
            "u": randn((b, d, L), gen, device).to(dt),
            "delta": randn((b, d, L), gen, device, std=0.5).to(dt),
            "A": A * rand((d, 1), gen, device, 0.5, 1.5),
            "B": randn((b, n, L), gen, device).to(dt),
            "C": randn((b, n, L), gen, device).to(dt),
            "D": randn((d,), gen, device, std=0.1, mean=1.0),
            "z": randn((b, d, L), gen, device).to(dt),
            "delta_bias": eager.softplus_inverse(rand((d,), gen, device, 1e-3, 0.1)),
        }

    def numpy_ok(self, case: Case) -> bool:
        # ~35 ms per step on one core at the anchor width: keep NumPy to short sequences
        return case["B"] * case["D"] * case["N"] * case["L"] <= 2e7

    def numpy_reference(self, case: Case, x: dict, douts: dict | None):
        from scanopt.reference import selective_scan_bwd, selective_scan_fwd

        args = [x[n] for n in _SCAN_ARGS]
        out, _ = selective_scan_fwd(*args, delta_softplus=True)
        grads = {}
        if douts is not None:
            g = selective_scan_bwd(douts["out"], *args, delta_softplus=True)
            grads = {n: g[n] for n in _SCAN_ARGS}
        return {"out": out}, grads

    def providers(self) -> list[Provider]:
        if self._providers is None:
            self._providers = [
                Provider("scanopt", "scanopt.selective_scan_fn", _scan_scanopt),
                Provider("torch", "PyTorch path", _scan_torch, supports=_loop_limit),
                Provider(
                    "mamba_ssm",
                    "mamba_ssm selective_scan_fn (CUDA selective_scan_cuda)",
                    _scan_mamba,
                ),
            ]
        return self._providers


# ---------------------------------------------------------------------------------------------
# Mamba-2 SSD
# ---------------------------------------------------------------------------------------------

_SSD_ARGS = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def _ssd_torch() -> Impl:
    return Impl(
        lambda x, c: eager.ssd(
            x["x"], x["dt"], x["A"], x["B"], x["C"], x["D"], x["dt_bias"], dt_softplus=True
        ),
        detail="the chunked minimal SSD of the Mamba-2 paper in PyTorch, float32",
    )


def _ssd_mamba() -> Impl:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return Impl(
        lambda x, c: mamba_chunk_scan_combined(
            x["x"],
            x["dt"],
            x["A"],
            x["B"],
            x["C"],
            chunk_size=c["chunk"],
            D=x["D"],
            dt_bias=x["dt_bias"],
            dt_softplus=True,
        )
    )


def _ssd_memory(case: Case, itemsize: int = 4) -> int:
    """The minimal SSD's largest intermediates (chunk states and C B^T blocks), with autograd."""
    b, L, h, p, n = case["B"], case["L"], case["H"], case["P"], case["N"]
    chunks = -(-L // 64)
    return 8 * itemsize * (b * chunks * h * p * n + b * chunks * 64 * 64 * h)


class SSDSuite(Suite):
    name = "ssd"
    title = "Mamba-2 SSD, 64 heads x 64, dstate 128"
    metric = "gbps"
    grad_names = _SSD_ARGS
    reference_order = ("torch64", "numpy", "trusted")
    trusted = ("mamba_ssm",)
    fixed = {"B": 4, "H": 64, "P": 64, "N": 128, "G": 1, "chunk": 256}

    def __init__(self) -> None:
        self._providers: list[Provider] | None = None

    def dims(self, value: int) -> tuple:
        f = self.fixed
        return (
            ("B", f["B"]),
            ("L", value),
            ("H", f["H"]),
            ("P", f["P"]),
            ("N", f["N"]),
            ("G", f["G"]),
            ("chunk", f["chunk"]),
        )

    def specs(self, case: Case):
        b, L, h, p, n, g = (case[k] for k in ("B", "L", "H", "P", "N", "G"))
        x = TensorSpec((b, L, h, p), case.dtype)
        bc = TensorSpec((b, L, g, n), case.dtype)
        head = TensorSpec((h,), "float32")
        inputs = {
            "x": x,
            "dt": TensorSpec((b, L, h), case.dtype),
            "A": head,
            "B": bc,
            "C": bc,
            "D": head,
            "dt_bias": head,
        }
        return inputs, {"out": x}

    def make_inputs(self, case: Case, device: Any, gen: Any) -> dict:
        import torch

        dt_ = torch_dtype(case.dtype)
        b, L, h, p, n, g = (case[k] for k in ("B", "L", "H", "P", "N", "G"))
        return {
            "x": randn((b, L, h, p), gen, device).to(dt_),
            "dt": randn((b, L, h), gen, device, std=0.5).to(dt_),
            "A": -torch.exp(rand((h,), gen, device, 0.0, 2.772588722239781)),
            "B": randn((b, L, g, n), gen, device).to(dt_),
            "C": randn((b, L, g, n), gen, device).to(dt_),
            "D": randn((h,), gen, device, std=0.1, mean=1.0),
            "dt_bias": eager.softplus_inverse(rand((h,), gen, device, 1e-3, 0.1)),
        }

    def numpy_ok(self, case: Case) -> bool:
        b, L, h, p, n = (case[k] for k in ("B", "L", "H", "P", "N"))
        return b * h * p * n * L <= 3e7

    def numpy_reference(self, case: Case, x: dict, douts: dict | None):
        """SSD as a Mamba-1 scan: channel ``(h, p)`` of ``(batch, H*P, L)`` with ``A[h]`` repeated
        over dstate, grouped B/C ``(batch, G, N, L)``; gradients summed back over ``p``."""
        import numpy as np

        from scanopt.reference import selective_scan_bwd, selective_scan_fwd

        b, L, h, p, n = (case[k] for k in ("B", "L", "H", "P", "N"))

        def per_channel(v):  # (h,) -> (h*p,)
            return np.repeat(v, p)

        u = x["x"].reshape(b, L, h * p).transpose(0, 2, 1)
        delta = np.repeat(x["dt"], p, axis=2).transpose(0, 2, 1)
        A = np.repeat(per_channel(x["A"])[:, None], n, axis=1)
        Bm, Cm = (x[k].transpose(0, 2, 3, 1) for k in ("B", "C"))
        args = (u, delta, A, Bm, Cm, per_channel(x["D"]), None, per_channel(x["dt_bias"]))
        out, _ = selective_scan_fwd(*args, delta_softplus=True)
        outs = {"out": out.transpose(0, 2, 1).reshape(b, L, h, p)}
        if douts is None:
            return outs, {}
        dout = douts["out"].reshape(b, L, h * p).transpose(0, 2, 1)
        g = selective_scan_bwd(dout, *args, delta_softplus=True)
        grads = {
            "x": g["u"].transpose(0, 2, 1).reshape(b, L, h, p),
            "dt": g["delta"].transpose(0, 2, 1).reshape(b, L, h, p).sum(-1),
            "A": g["A"].reshape(h, p, n).sum(axis=(1, 2)),
            "B": g["B"].transpose(0, 3, 1, 2),
            "C": g["C"].transpose(0, 3, 1, 2),
            "D": g["D"].reshape(h, p).sum(-1),
            "dt_bias": g["delta_bias"].reshape(h, p).sum(-1),
        }
        return outs, grads

    def torch64_reference(self, case: Case, x: dict, douts: dict | None):
        import torch

        leaves = {k: v.detach().double().requires_grad_(douts is not None) for k, v in x.items()}
        with torch.enable_grad():
            out = eager.ssd(
                *(leaves[k] for k in _SSD_ARGS),
                dt_softplus=True,
                compute_dtype=torch.float64,
            )
            grads = {}
            if douts is not None:
                got = torch.autograd.grad(out, [leaves[k] for k in _SSD_ARGS], douts["out"])
                grads = dict(zip(_SSD_ARGS, got, strict=True))
        return {"out": out.detach()}, grads

    def providers(self) -> list[Provider]:
        if self._providers is None:
            self._providers = [
                Provider("torch", "PyTorch path", _ssd_torch, memory=_ssd_memory),
                Provider("mamba_ssm", "mamba_ssm mamba_chunk_scan_combined (Triton)", _ssd_mamba),
            ]
        return self._providers


# ---------------------------------------------------------------------------------------------
# decode step
# ---------------------------------------------------------------------------------------------

_STEP_ARGS = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def _step_call(fn: Any) -> Any:
    return lambda x, c: fn(
        x["state"],
        x["x"],
        x["dt"],
        x["A"],
        x["B"],
        x["C"],
        D=x["D"],
        z=x["z"],
        dt_bias=x["dt_bias"],
        dt_softplus=True,
    )


def _step_outputs(result: Any, native: Any, case: Case) -> dict:
    out = result[0] if isinstance(result, (tuple, list)) else result
    return {"out": out, "state": native["state"]}


def _step_scanopt() -> Impl:
    return Impl(_step_call(scanopt_function("selective_state_update")))


def _step_torch() -> Impl:
    try:
        fn = scanopt_function("selective_state_update")
    except Unavailable:
        return Impl(
            _step_call(eager.selective_state_update),
            detail="mamba_ssm's selective_state_update_ref in PyTorch (scanopt's op not importable)",
        )
    return Impl(
        _step_call(fn),
        context=lambda: backend_env("torch"),
        detail="scanopt with SCANOPT_BACKEND=torch",
    )


def _step_mamba() -> Impl:
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    return Impl(_step_call(selective_state_update))


class StateUpdateSuite(Suite):
    name = "state_update"
    title = "Mamba-1 decode step, dim 2048, dstate 16"
    metric = "gbps"
    directions = ("fwd",)
    grad_names = ()
    output_names = ("out", "state")
    grad_outputs = ()
    sweep_key = "B"
    default_sweep = (1, 4, 16, 64)
    quick_sweep = (4,)
    cudagraph = True
    reference_order = ("numpy", "trusted")
    trusted = ("mamba_ssm", "torch")
    fixed = {"D": 2048, "N": 16}

    def __init__(self) -> None:
        self._providers: list[Provider] | None = None

    def dims(self, value: int) -> tuple:
        return (("B", value), ("D", self.fixed["D"]), ("N", self.fixed["N"]))

    def specs(self, case: Case):
        b, d, n = case["B"], case["D"], case["N"]
        state = TensorSpec((b, d, n), "float32")
        row = TensorSpec((b, d), case.dtype)
        bc = TensorSpec((b, n), case.dtype)
        par = TensorSpec((d,), "float32")
        inputs = {
            "state": state,
            "x": row,
            "dt": row,
            "A": TensorSpec((d, n), "float32"),
            "B": bc,
            "C": bc,
            "D": par,
            "z": row,
            "dt_bias": par,
        }
        return inputs, {"out": row, "state": state}

    def make_inputs(self, case: Case, device: Any, gen: Any) -> dict:
        import torch

        dt_ = torch_dtype(case.dtype)
        b, d, n = case["B"], case["D"], case["N"]
        A = -torch.arange(1, n + 1, dtype=torch.float32, device=device).repeat(d, 1)
        return {
            "state": randn((b, d, n), gen, device),
            "x": randn((b, d), gen, device).to(dt_),
            "dt": randn((b, d), gen, device, std=0.5).to(dt_),
            "A": A * rand((d, 1), gen, device, 0.5, 1.5),
            "B": randn((b, n), gen, device).to(dt_),
            "C": randn((b, n), gen, device).to(dt_),
            "D": randn((d,), gen, device, std=0.1, mean=1.0),
            "z": randn((b, d), gen, device).to(dt_),
            "dt_bias": eager.softplus_inverse(rand((d,), gen, device, 1e-3, 0.1)),
        }

    def numpy_ok(self, case: Case) -> bool:
        return True

    def numpy_reference(self, case: Case, x: dict, douts: dict | None):
        from scanopt.reference import selective_state_update_fwd

        out, new_state = selective_state_update_fwd(*(x[k] for k in _STEP_ARGS), dt_softplus=True)
        return {"out": out, "state": new_state}, {}

    def providers(self) -> list[Provider]:
        if self._providers is None:
            self._providers = [
                Provider(
                    "scanopt",
                    "scanopt.selective_state_update",
                    _step_scanopt,
                    outputs=_step_outputs,
                ),
                Provider("torch", "PyTorch path", _step_torch, outputs=_step_outputs),
                Provider(
                    "mamba_ssm",
                    "mamba_ssm selective_state_update (Triton)",
                    _step_mamba,
                    outputs=_step_outputs,
                ),
            ]
        return self._providers


SUITES = {
    "selective_scan": SelectiveScanSuite(),
    "ssd": SSDSuite(),
    "state_update": StateUpdateSuite(),
}
