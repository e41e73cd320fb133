"""Environment variables and backend selection.

Every ``SCANOPT_*`` variable is read here (and listed in the README's table). Values are read
on each call, not at import, so tests and users may change them at run time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

Backend = Literal["triton", "torch"]

#: name -> (default, one-line meaning); the README's table is generated from the same facts.
VARIABLES: dict[str, tuple[str, str]] = {
    "SCANOPT_BACKEND": (
        "auto",
        "auto: Triton kernels on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1), "
        "PyTorch elsewhere; triton: always the kernels (error if impossible); torch: always PyTorch",
    ),
    "SCANOPT_POISON": (
        "0",
        "1: fill every output buffer scanopt allocates with NaN before the kernel writes it "
        "(tests set it, so an unwritten element fails verification)",
    ),
    "SCANOPT_GIT_SHA": (
        "",
        "the git sha recorded in benchmark rows instead of the checkout's (a copy on a remote GPU)",
    ),
    "SCANOPT_CACHE_DIR": (
        "~/.cache/scanopt",
        "user cache: tuning studies, the user config store, measured GPU ceilings",
    ),
}


# POSIX keeps the environment as bytes in ``os.environ._data`` (updated by every
# ``os.environ[...] = ...``, ``monkeypatch.setenv``, ``del``); reading it with a pre-encoded key
# costs ~0.1 us against ~1.5 us for ``os.environ.get`` (key encoding, Mapping.get, decoding),
# and the launch path reads these variables a dozen times per call.
_BYTES_KEYS = {name: name.encode() for name in (*VARIABLES, "TRITON_INTERPRET")}


def _read(name: str, default: str) -> str:
    data = getattr(os.environ, "_data", None)
    if os.name == "posix" and isinstance(data, dict):
        value = data.get(_BYTES_KEYS[name])
        return default if value is None else value.decode(errors="surrogateescape")
    return os.environ.get(name, default)


def _get(name: str) -> str:
    return _read(name, VARIABLES[name][0])


def interpreting() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _read("TRITON_INTERPRET", "0") == "1"


def backend_setting() -> str:
    """The validated value of ``SCANOPT_BACKEND``: ``auto``, ``triton`` or ``torch``."""
    value = _get("SCANOPT_BACKEND").strip().lower()
    if value not in ("auto", "triton", "torch"):
        raise ValueError(f"SCANOPT_BACKEND must be one of auto, triton, torch; got {value!r}")
    return value


def backend_for(device_type: str) -> Backend:
    """Which implementation runs for tensors on ``device_type`` ('cuda', 'cpu', ...)."""
    setting = backend_setting()
    kernels_possible = device_type == "cuda" or (device_type == "cpu" and interpreting())
    if setting == "torch":
        return "torch"
    if setting == "triton":
        if not kernels_possible:
            raise RuntimeError(
                f"SCANOPT_BACKEND=triton but the tensors are on {device_type!r}: Triton kernels need "
                "CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"
            )
        return "triton"
    return "triton" if kernels_possible else "torch"


def poison_outputs() -> bool:
    """True when freshly allocated outputs are to be filled with NaN (``SCANOPT_POISON=1``)."""
    return _get("SCANOPT_POISON") == "1"


def cache_dir() -> Path:
    """The user cache directory (``SCANOPT_CACHE_DIR``, default ``~/.cache/scanopt``)."""
    return Path(os.path.expanduser(_get("SCANOPT_CACHE_DIR")))
