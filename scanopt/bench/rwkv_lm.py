"""How ``scanopt bench`` finds RWKV-LM's CUDA kernels (the ``rwkv-lm`` provider of wkv4/6/7).

RWKV-LM compiles its kernels with ``torch.utils.cpp_extension.load`` from inside its model files,
with compile-time shapes (``-D_N_``, ``-D_T_``, ``-D_CHUNK_LEN_``) and no installable package, so
the bench cannot import them by itself. Build them once and point the bench at a small adapter
module::

    scanopt bench --op wkv7 --rwkv-lm path/to/rwkv_lm_adapter.py      # a file
    scanopt bench --op wkv7 --rwkv-lm my_package.rwkv_lm_adapter      # or an importable module

The adapter may define any of these functions, in scanopt's (= fla's / transformers') layouts and
parameterisations, differentiable with respect to every argument (an ``autograd.Function`` over
the CUDA ops, exactly as RWKV-LM's model files wrap them):

- ``wkv4(time_decay, time_first, key, value) -> out``: key/value/out ``(B, T, C)``; time_decay and
  time_first ``(C,)`` fp32; decay ``exp(-exp(time_decay))`` (RWKV-LM's kernel takes
  ``w = -exp(time_decay)``: compute it inside, as ``RWKV-v4neo/src/model.py`` does).
- ``wkv6(r, k, v, w, u) -> out``: ``[B, T, H, 64]``, ``w`` the *log* decay (``<= 0``), ``u [H, 64]``,
  scale 1. RWKV-LM's ``wkv6_cuda.cu`` computes the decay as ``exp(-exp(w_raw))``, so the adapter
  passes ``w_raw = log(-w)``; its ``-D_T_`` must be at least the longest sequence benched (the
  backward keeps a ``_T_``-long per-thread array).
- ``wkv7(r, w, k, v, a, b) -> out``: ``[B, T, H, 64]``, ``w`` the log decay in
  ``(-0.6065, 0)``. The clampw kernels compute ``exp(-0.6065 * sigmoid(w_raw))`` themselves, so
  the adapter converts ``w_raw = logit(-w / 0.6065306597)`` (an extra elementwise op inside the
  timed call; its bf16 rounding is an input perturbation the other providers do not see).

Each function is called with the bench's bf16 inputs (the provider skips other dtypes for v6 and
v7). The adapter builds RWKV-LM's sources itself (``torch.utils.cpp_extension.load``, as
RWKV-LM's model files do) and wraps the resulting ``torch.ops`` in an ``autograd.Function``;
scanopt ships no copy of those sources, no build recipe for them and no binary built from them.

The bench checks every RWKV-LM output and gradient against the reference like any other provider,
so a wrong adapter shows up as a FAILED row, never as a speedup.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType

from scanopt.bench.registry import Unavailable, first_line

_spec: str | None = None
_module: ModuleType | None = None


def configure(spec: str | None) -> None:
    """Point the ``rwkv-lm`` provider at an adapter (a ``.py`` path or a module name)."""
    global _spec, _module
    _spec, _module = spec, None


def describe() -> str:
    return f"adapter {_spec}" if _spec else ""


def _load(spec: str) -> ModuleType:
    if spec.endswith(".py") or os.path.sep in spec:
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise Unavailable(f"--rwkv-lm: no such file {spec}")
        name = "_scanopt_rwkv_lm_adapter"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def function(name: str) -> Callable:
    """The adapter's ``name`` function (``wkv4``, ``wkv6`` or ``wkv7``)."""
    global _module
    if not _spec:
        raise Unavailable("not configured: pass --rwkv-lm ADAPTER (see scanopt.bench.rwkv_lm)")
    if _module is None:
        try:
            _module = _load(_spec)
        except Unavailable:
            raise
        except Exception as e:  # noqa: BLE001 - a user module may fail in any way (e.g. nvcc)
            raise Unavailable(
                f"could not load the adapter {_spec}: {type(e).__name__}: {first_line(e)}"
            ) from e
    fn = getattr(_module, name, None)
    if fn is None:
        raise Unavailable(f"the adapter {_spec} defines no {name}()")
    return fn
