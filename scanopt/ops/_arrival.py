"""Arrival counters for kernels whose last program finishes a reduction ("last arrival").

A kernel that would otherwise need a second launch to combine its programs' results (a serial
pass over chunk summaries, a sum over partials) can let each program, after storing its part,
take a ticket from an int32 counter (``tl.atomic_add``, acquire-release, after a barrier); the
program that draws the last ticket reads every part (``.cg`` loads, past L1) and finishes the
job in a fixed order, so the result is deterministic. That program also sets its counter back
to zero, so the buffer is ready for the next launch on the same stream without a memset (an
extra launch would cost what the fusion saves).
"""

from __future__ import annotations

import torch

#: (device index, raw stream) -> int32 counters, all zero between launches
_BUFFERS: dict[tuple[int, int], torch.Tensor] = {}

#: streams remembered (a program creating streams per step would otherwise grow the dict)
_MAX_STREAMS = 64


def counters(n: int, device: torch.device) -> torch.Tensor:
    """``n`` int32 counters, all zero, for one launch whose last programs reset them.

    One buffer per (device, stream), grown on demand. On the CPU (the interpreter) and during
    CUDA graph capture, a freshly zeroed tensor (the capture records its memset).
    """
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(max(n, 1), dtype=torch.int32, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, torch._C._cuda_getCurrentRawStream(index))
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is None and len(_BUFFERS) >= _MAX_STREAMS:
            _BUFFERS.clear()  # freed in stream order: a queued kernel keeps its memory
        buf = torch.zeros(max(n, 1024, 2 * (buf.numel() if buf is not None else 0)),
                          dtype=torch.int32, device=device)  # fmt: skip
        _BUFFERS[key] = buf
    return buf
