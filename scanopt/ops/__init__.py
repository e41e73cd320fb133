"""One subpackage per op: ``kernels.py`` (@triton.jit only), ``launch.py`` (allocation, grid,
config, launch; no autograd) and ``op.py`` (torch.library ops, autograd, the public function).

``OPS`` maps each op name to the module whose ``self_check(device, quick)`` returns
``scanopt.verify.Report`` objects; ``scanopt verify`` walks it. Modules are imported only when
asked for, so Triton's interpreter can be switched on first.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

OPS: dict[str, str] = {
    "selective_scan": "scanopt.ops.selective_scan.op",
    "wkv4": "scanopt.ops.wkv4.op",
    "wkv6": "scanopt.ops.wkv6.op",
    "wkv7": "scanopt.ops.wkv7.op",
    "attention": "scanopt.ops.attention.op",
}


def available_ops() -> list[str]:
    """Names of ops whose module exists in this installation."""
    found = []
    for name, mod in OPS.items():
        try:
            if importlib.util.find_spec(mod) is not None:
                found.append(name)
        except ModuleNotFoundError:  # the op's package itself is absent
            pass
    return found


def load(name: str) -> ModuleType:
    """Import the ``op.py`` module of one op."""
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; known: {', '.join(OPS)}")
    return importlib.import_module(OPS[name])
