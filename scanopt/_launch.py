"""Triton launches with less host work per call.

``kernel[grid](*args, **kw)`` runs Triton's ``JITFunction.run`` every time: it binds and
specialises every argument (dtype, 16-byte alignment, integer divisibility), builds a cache key
from the options, checks globals and reads the runtime knobs before the C launcher runs. At
small shapes that per-call Python is a large share of an op's time (bench/notes/wkv4.md: a
33-argument launch costs ~20 us of host time on the H100 machine, against ~6 us for an ATen op).

:func:`launch` does the first call of each specialisation through ``kernel[grid]`` (compile,
disk cache, everything Triton checks), keeps the ``CompiledKernel`` it returns under a key at
least as fine as Triton's own specialisation (tensor dtypes and 16-byte alignment, every integer
argument's exact value, every keyword argument and option), and afterwards calls the compiled
kernel's launcher directly (when ``DIRECT`` is on: off by default until it has run on a GPU).
What it does not model takes ``kernel[grid]``: launch hooks, the interpreter, and arguments
other than tensors, host ``TensorDescriptor`` objects, numbers and ``None``.
"""

from __future__ import annotations

import inspect

import torch
from triton import knobs

from scanopt._env import interpreting

#: True: cached specialisations are launched directly; False: every launch goes through
#: ``kernel[grid](...)``. Off until the direct path has run on a GPU (built without one, in the
#: fourteenth session; ``tests/test_launch.py``'s GPU test and ``bench/launch_probe.py`` check and
#: time it, then this default changes)
DIRECT = False

#: (kernel, device, specialisation key) -> (CompiledKernel, the trailing arguments after the
#: positional ones: keyword arguments and defaults, in signature order)
_COMPILED: dict[tuple, tuple] = {}

#: bound on the entries (a model called at many sequence lengths adds one per length and kernel)
_MAX_ENTRIES = 4096

_SCALARS = (int, float, bool, type(None))


def _key(args: tuple, kwargs: dict) -> tuple | None:
    """A hashable key that tells apart every pair of calls Triton would specialise apart; None
    where an argument is of a kind this module does not model."""
    parts = []
    for a in args:
        kind = type(a)
        if kind is int:
            parts.append(a)  # the exact value: finer than Triton's (== 1, % 16, 32 / 64 bits)
        elif isinstance(a, torch.Tensor):
            parts.append((a.dtype, a.data_ptr() & 15 == 0))
        elif kind is float:
            parts.append(float)  # Triton passes floats as fp32 arguments, never specialised
        elif kind is bool or a is None:
            parts.append((kind, a))  # True must not share a key with 1
        elif kind.__name__ == "TensorDescriptor":  # a host TMA descriptor (triton.tools)
            # the launcher rebuilds the CUtensorMap from these fields on every launch; the base
            # is 16-byte aligned by the descriptor's own check
            parts.append((kind, a.base.dtype, tuple(a.shape), tuple(a.strides),
                          tuple(a.block_shape), a.padding))  # fmt: skip
        else:
            return None
    for v in kwargs.values():
        if not isinstance(v, _SCALARS) and not isinstance(v, (str, torch.dtype)):
            return None
    return (*parts, *kwargs.items())


def _trailing(kernel, n_positional: int, kwargs: dict) -> tuple | None:
    """The arguments after the positional ones, in signature order (keywords, else defaults);
    None when a parameter has neither."""
    out = []
    for param in kernel.params[n_positional:]:
        if param.name in kwargs:
            out.append(kwargs[param.name])
        elif param.default is not inspect.Parameter.empty:
            out.append(param.default)
        else:
            return None
    return tuple(out)


def launch(kernel, grid: tuple, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, launching the cached compiled kernel directly once
    this specialisation has run. ``grid`` is a tuple of up to three ints."""
    if not DIRECT or interpreting() or not hasattr(kernel, "device_caches"):
        return kernel[grid](*args, **kwargs)
    if knobs.runtime.launch_enter_hook is not None or knobs.runtime.launch_exit_hook is not None:
        return kernel[grid](*args, **kwargs)
    key = _key(args, kwargs)
    if key is None:
        return kernel[grid](*args, **kwargs)
    device = torch.cuda.current_device()
    entry = _COMPILED.get((kernel, device, key))
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        trailing = _trailing(kernel, len(args), kwargs)
        if compiled is not None and trailing is not None and not hasattr(compiled, "result"):
            if len(_COMPILED) >= _MAX_ENTRIES:  # exact ints in the key: one entry per length
                _COMPILED.clear()
            _COMPILED[(kernel, device, key)] = (compiled, trailing)
        return compiled
    compiled, trailing = entry
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None,
                 None, *args, *trailing)  # fmt: skip
    return compiled
