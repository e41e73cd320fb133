"""One module per op family: attention, mamba (selective scan, SSD, decode step), wkv (v4, v6, v7).

Each module defines ``SUITES: dict[str, Suite]``; ``scanopt.bench.registry.get_suite`` imports
the one it needs. Input helpers shared by all of them live here.
"""

from __future__ import annotations

from typing import Any


def randn(shape: tuple[int, ...], gen: Any, device: Any, std: float = 1.0, mean: float = 0.0):
    """float32 normal samples on ``device`` drawn from generator ``gen``."""
    import torch

    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return x * std + mean if (std != 1.0 or mean != 0.0) else x


def rand(shape: tuple[int, ...], gen: Any, device: Any, low: float = 0.0, high: float = 1.0):
    """float32 uniform samples in ``[low, high)`` on ``device``."""
    import torch

    return torch.rand(shape, generator=gen, device=device, dtype=torch.float32) * (high - low) + low


def free_memory(device: Any) -> int | None:
    """Free bytes on a CUDA device (None elsewhere)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free)
