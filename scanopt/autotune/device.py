"""Which device a config is for: the identity the config store keys on and the resource limits
the search spaces' constraints read.

Nothing here imports torch at import time; ``device_props`` imports it when first called.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any

#: the identity of "no GPU": Triton's interpreter on the CPU (tests, CI)
CPU_NAME = "CPU"


def gpu_slug(name: str) -> str:
    """The folder name of a GPU in the config store: ``"NVIDIA H200"`` -> ``"NVIDIA_H200"``."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "unknown"


@dataclass(frozen=True)
class DeviceProps:
    """What the store keys on (name, capability, SM count) and what constraints read.

    ``shared_mem`` is the most shared memory one program may use (the opt-in maximum on NVIDIA),
    ``regs_per_sm`` the 32-bit registers of one SM (a program's warps share them), in bytes and
    counts as CUDA reports them. On the CPU (Triton's interpreter) the limits are generous: every
    point of a space is valid there.
    """

    name: str
    capability: tuple[int, int]
    sm_count: int
    shared_mem: int
    regs_per_sm: int
    max_threads_per_sm: int
    is_cuda: bool

    @property
    def slug(self) -> str:
        return gpu_slug(self.name)

    def key(self) -> dict[str, Any]:
        """The fields a stored config must match: name, ``"major.minor"`` and SM count."""
        return {
            "name": self.name,
            "capability": f"{self.capability[0]}.{self.capability[1]}",
            "sm_count": int(self.sm_count),
        }


CPU_PROPS = DeviceProps(
    name=CPU_NAME,
    capability=(0, 0),
    sm_count=0,
    shared_mem=1 << 30,
    regs_per_sm=1 << 30,
    max_threads_per_sm=1 << 20,
    is_cuda=False,
)


def device_props(device: Any = None) -> DeviceProps:
    """Properties of ``device`` (a ``torch.device``, ``'cuda:1'``, ``'cpu'``, an index or ``None``
    for the current CUDA device, or the CPU when CUDA is absent). Cached per device."""
    if device is None:
        torch = sys.modules.get("torch")
        if torch is None:
            import torch
        if not torch.cuda.is_available():
            return CPU_PROPS
        return _cuda_props(torch.cuda.current_device())
    if isinstance(device, int):
        return _cuda_props(device)
    dev_type = getattr(device, "type", None)
    index = getattr(device, "index", None)
    if dev_type is None:
        text = str(device)
        dev_type, _, idx = text.partition(":")
        index = int(idx) if idx else None
    if dev_type != "cuda":
        return CPU_PROPS
    if index is None:
        import torch

        index = torch.cuda.current_device()
    return _cuda_props(int(index))


@functools.cache
def _cuda_props(index: int) -> DeviceProps:
    import torch

    p = torch.cuda.get_device_properties(index)
    # Fields missing from older torch builds fall back to Hopper's values (227 KiB, 64 K regs).
    return DeviceProps(
        name=p.name,
        capability=(int(p.major), int(p.minor)),
        sm_count=int(p.multi_processor_count),
        shared_mem=int(getattr(p, "shared_memory_per_block_optin", 232448)),
        regs_per_sm=int(getattr(p, "regs_per_multiprocessor", 65536)),
        max_threads_per_sm=int(getattr(p, "max_threads_per_multi_processor", 2048)),
        is_cuda=True,
    )
