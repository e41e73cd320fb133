"""scanopt: Triton kernels for selective scan (Mamba), WKV (RWKV-4/6/7) and flash attention,
verified against NumPy float64 references and exposed as drop-ins for the upstream functions.

Importing ``scanopt`` imports neither torch nor triton; the public functions are loaded on first
access, so ``scanopt.reference`` works without torch and Triton's interpreter can be enabled late.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "selective_scan_fn": "scanopt.ops.selective_scan.op",
    "selective_state_update": "scanopt.ops.selective_scan.op",
    "causal_conv1d_fn": "scanopt.ops.causal_conv1d.op",
    "causal_conv1d_update": "scanopt.ops.causal_conv1d.op",
    "wkv4": "scanopt.ops.wkv4.op",
    "wkv6": "scanopt.ops.wkv6.op",
    "wkv7": "scanopt.ops.wkv7.op",
    "flash_attn_func": "scanopt.ops.attention.op",
    "scaled_dot_product_attention": "scanopt.ops.attention.op",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'scanopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
