"""Allocation, grid, config and launch of the RWKV-4 WKV kernels (no autograd here).

Every launcher takes ``config=None`` (a dict; :func:`default_config` gives the heuristic one, and
any subset of its keys may be passed) so the tuner can feed any point of the search space through
the same code path.
"""

from __future__ import annotations

import torch

from scanopt._env import interpreting
from scanopt._launch import launch
from scanopt._tensor import empty
from scanopt._triton_compat import ensure_interpreter_compat
from scanopt.autotune import resolve_config as tuned_config
from scanopt.autotune.store import register_launch_cache
from scanopt.ops._arrival import counters
from scanopt.ops._rwkv_common import cdiv, next_pow2
from scanopt.ops.wkv4.kernels import (
    wkv4_bwd_grad_kernel,
    wkv4_bwd_param_kernel,
    wkv4_bwd_scan_kernel,
    wkv4_bwd_summary_kernel,
    wkv4_fwd_out_kernel,
    wkv4_fwd_scan_kernel,
    wkv4_fwd_summary_kernel,
)

__all__ = ["CONFIG_KEYS", "default_config", "resolve_config", "wkv4_fwd", "wkv4_bwd"]

# The kernels hold the two WKV-4 constants: transformers' empty-state max -1e38
# (``_initial_state``) and the per-step log decay's clamp -1e30 (``_decay``).

#: channels per program of the kernel that sums the decay / bonus gradients over (batch, chunk)
_PARAM_BLOCK_C = 128

#: every key of a launch config, per direction (the tuner's search space)
CONFIG_KEYS = {
    # chunk: steps per program (and between the states the backward starts from);
    # block_t: steps unrolled with their loads in flight; scan_*: the serial pass over chunks
    "fwd": (
        "chunk",
        "block_t",
        "block_c",
        "num_warps",
        "sum_block_c",
        "sum_warps",
        "scan_block_c",
        "scan_warps",
        "scan_stages",
        "fuse",
    ),
    # chunk comes from the forward; block_t must divide it
    "bwd": (
        "block_t",
        "block_c",
        "num_warps",
        "sum_block_c",
        "sum_warps",
        "scan_block_c",
        "scan_warps",
        "scan_stages",
        "fuse",
    ),
}

_POW2_KEYS = ("chunk", "block_t", "block_c", "sum_block_c", "scan_block_c")


_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    """SM count of a CUDA device (132, an H200's, elsewhere). Cached per device; under
    ``torch.compile`` only the cache is read, so tracing never queries the driver."""
    if device.type != "cuda":
        return 132
    index = device.index or 0
    if index not in _SMS and not torch.compiler.is_compiling():
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS.get(index, 132)


def default_config(
    direction: str,
    *,
    B: int,
    T: int,
    C: int,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
) -> dict:
    """Heuristic launch config for one direction ('fwd' or 'bwd').

    - ``chunk`` (fwd): the largest of 256..16 that still gives the backward's gradient kernel
      8 programs per SM (``B * ceil(C / 128) * ceil(T / chunk)``): longer chunks mean fewer
      chunk states and summaries (about 140 bytes per channel and chunk over both directions),
      shorter ones more parallelism (16 when no length reaches the target). One chunk (T <= 16,
      or a small batch) skips the forward's summary and scan kernels.
    - ``block_t``: 16 forward (two rows of loads per step in flight), 8 backward (the gradient
      kernel keeps 8 fp32 values per step in registers).
    - ``block_c`` / ``num_warps``: 2 channels per thread forward, 1 backward, 128-256 channels
      per program; ``sum_*`` for the summary kernels (same by default); ``scan_*`` for the serial
      pass over chunks: 64 channels per warp, 3-stage pipelined loads.
    - ``fuse``: 1 lets the last program of each summary kernel's channel block run the serial
      pass (and the gradient kernel's the decay / bonus sums) instead of launching the scan and
      parameter kernels: 7 launches per fwd+bwd become 4 (``scanopt.ops._arrival``). 0 for now
      (opt-in until timed on a GPU).
    """
    if direction not in CONFIG_KEYS:
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    cp = max(16, next_pow2(C))
    if direction == "fwd":
        block_c = min(256, cp)
        num_warps = max(1, min(4, block_c // 64))
    else:
        block_c = min(128, cp)
        num_warps = max(1, min(4, block_c // 32))
    scan_block_c = min(64, cp)
    cfg = {
        "block_t": 16 if direction == "fwd" else 8,
        "block_c": block_c,
        "num_warps": num_warps,
        "sum_block_c": block_c,
        "sum_warps": num_warps,
        "scan_block_c": scan_block_c,
        "scan_warps": 1 if scan_block_c <= 64 else 2,
        "scan_stages": 3,
        "fuse": 0,
    }
    if direction == "fwd":
        # the backward's gradient kernel (128 channels per program) sets the parallelism
        target = 8 * _num_sms(device)
        per_chunk = B * cdiv(C, 128)
        chunk = 16
        for c in (256, 128, 64, 32):
            if per_chunk * cdiv(T, c) >= target:
                chunk = c
                break
        chunk = min(chunk, max(16, next_pow2(T)))
        cfg["chunk"] = chunk
        cfg["block_t"] = min(cfg["block_t"], chunk)
    return cfg


def resolve_config(
    direction: str,
    config: dict | None,
    *,
    B: int,
    T: int,
    C: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> dict:
    """The launch config: :func:`default_config`, replaced by a tuned config for this GPU and
    shape bucket when the config store has one (``scanopt.autotune``, op ``"wkv4"``, shape
    ``{B, T, C}``; consulted where the kernels run: CUDA, or the CPU under the interpreter),
    then updated with ``config``; unknown keys and bad sizes raise.

    Cached per (direction, shape, dtype, device, config): after the first call a dict access.
    The returned dict is shared; callers must not mutate it.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if torch.compiler.is_compiling():  # sizes may be symbolic: no cache
        return _resolve(direction, config, B=B, T=T, C=C, dtype=dtype, device=device)
    key = (direction, B, T, C, dtype, device, tuple(sorted(config.items())) if config else None)
    cfg = _RESOLVED.get(key)
    if cfg is None:
        cfg = _RESOLVED[key] = _resolve(
            direction, config, B=B, T=T, C=C, dtype=dtype, device=device
        )
    return cfg


#: resolve_config's cache (also cleared by ``scanopt.autotune.store.clear_cache``)
_RESOLVED: dict[tuple, dict] = register_launch_cache({})


def clear_cache() -> None:
    """Forget resolved launch configs (after the config store changed)."""
    _RESOLVED.clear()


def _resolve(
    direction: str, config: dict | None, *, B: int, T: int, C: int, dtype: torch.dtype, device
) -> dict:
    cfg = default_config(direction, B=B, T=T, C=C, dtype=dtype, device=device)
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        cfg = tuned_config("wkv4", direction, dtype, {"B": B, "T": T, "C": C}, cfg, device=device)
        if direction == "fwd":
            cfg["block_t"] = min(cfg["block_t"], cfg["chunk"])
    if config:
        unknown = set(config) - set(CONFIG_KEYS[direction])
        if unknown:
            raise ValueError(f"unknown wkv4 {direction} config keys: {sorted(unknown)}")
        cfg.update(config)
        if direction == "fwd" and "block_t" not in config:
            cfg["block_t"] = min(cfg["block_t"], cfg["chunk"])
    for key in _POW2_KEYS:
        if key in cfg and (cfg[key] < 1 or cfg[key] & (cfg[key] - 1)):
            raise ValueError(f"wkv4 {direction} config: {key} must be a power of two, got {cfg}")
    if cfg.get("fuse", 0) not in (0, 1):
        raise ValueError(f"wkv4 {direction} config: fuse must be 0 or 1, got {cfg['fuse']!r}")
    return cfg


def _fast_math(device: torch.device) -> bool:
    """Approximate exp / division (libdevice ``fast_expf`` / ``fast_dividef``) on GPUs; the
    interpreter has no libdevice and runs the exact ``tl.exp`` and ``/``."""
    return device.type == "cuda" and not interpreting()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a unit stride along its last dimension (copied only when needed)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def wkv4_fwd(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the forward kernels.

    Args:
        time_decay, time_first: ``(C,)``; the per-step log decay is ``-exp(time_decay)``.
        key, value: ``(B, T, C)``, T >= 1, any strides with a unit last one.
        state: ``(3, B, C)`` fp32 ``(num, den, max)`` or ``None`` (the empty state).

    Returns:
        ``out`` ``(B, T, C)`` in ``key``'s dtype, the final state ``(3, B, C)`` fp32, every
        chunk's incoming state ``(B, NC, 3, C)`` fp32 (what the backward starts from) and the
        index of the token that set each final max ``(B, C)`` int32 (-1: the incoming state).
    """
    ensure_interpreter_compat()
    B, T, C = key.shape
    device = key.device
    cfg = resolve_config("fwd", config, B=B, T=T, C=C, dtype=key.dtype, device=device)
    chunk, block_t = cfg["chunk"], cfg["block_t"]
    if chunk % block_t:
        raise ValueError(f"wkv4 fwd config: block_t must divide chunk, got {cfg}")
    key, value = _rows(key), _rows(value)
    td, tf = time_decay.contiguous(), time_first.contiguous()
    fast = _fast_math(device)
    NC = cdiv(T, chunk)
    out = empty((B, T, C), key.dtype, device)
    final = empty((3, B, C), torch.float32, device)
    fidx = empty((B, C), torch.int32, device)
    # every chunk's incoming state; chunk 0's is written by the scan (or single-chunk) kernel
    states = empty((B, NC, 3, C), torch.float32, device)
    has_state = state is not None
    state_arg = state.contiguous() if has_state else states
    fuse = bool(cfg.get("fuse", 0))
    if NC > 1:
        summ = empty((B, NC, 3, C), torch.float32, device)
        sidx = empty((B, NC, C), torch.int32, device)
        n_cb = cdiv(C, cfg["sum_block_c"])
        launch(
            wkv4_fwd_summary_kernel,
            (NC, n_cb, B),
            key,
            value,
            td,
            summ,
            sidx,
            counters(B * n_cb, device) if fuse else sidx,
            state_arg,
            states,
            final,
            fidx,
            T,
            C,
            B,
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            CHUNK=chunk,
            BLOCK_T=block_t,
            BLOCK_C=cfg["sum_block_c"],
            EVEN_T=T % chunk == 0,
            FAST=fast,
            FUSE_SCAN=fuse,
            HAS_STATE=has_state,
            NUM_STAGES=cfg["scan_stages"],
            num_warps=cfg["sum_warps"],
        )
    if NC > 1 and not fuse:
        launch(
            wkv4_fwd_scan_kernel,
            (cdiv(C, cfg["scan_block_c"]), B),
            summ,
            sidx,
            td,
            state_arg,
            states,
            final,
            fidx,
            T,
            C,
            B,
            NC,
            CHUNK=chunk,
            BLOCK_C=cfg["scan_block_c"],
            HAS_STATE=has_state,
            NUM_STAGES=cfg["scan_stages"],
            num_warps=cfg["scan_warps"],
        )
    launch(
        wkv4_fwd_out_kernel,
        (NC, cdiv(C, cfg["block_c"]), B),
        key,
        value,
        td,
        tf,
        state_arg,
        states,
        out,
        final,
        fidx,
        T,
        C,
        B,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        out.stride(0),
        out.stride(1),
        CHUNK=chunk,
        BLOCK_T=block_t,
        BLOCK_C=cfg["block_c"],
        HAS_STATE=has_state,
        STORE_FINAL=NC == 1,
        EVEN_T=T % chunk == 0,
        FAST=fast,
        num_warps=cfg["num_warps"],
    )
    return out, final, states, fidx


def wkv4_bwd(
    grad_out: torch.Tensor,
    grad_final: torch.Tensor | None,
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: torch.Tensor | None,
    final: torch.Tensor,
    states: torch.Tensor,
    fidx: torch.Tensor,
    chunk: int,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the backward kernels from what :func:`wkv4_fwd` returned (``chunk`` as it used).

    ``grad_final`` is the cotangent of the final state ``(3, B, C)`` or ``None``. Returns the
    gradients of ``time_decay``, ``time_first``, ``key``, ``value`` (their dtypes) and of
    ``state`` (``(3, B, C)`` fp32; ``None`` when ``state`` is ``None``).
    """
    ensure_interpreter_compat()
    B, T, C = key.shape
    device = key.device
    cfg = resolve_config("bwd", config, B=B, T=T, C=C, dtype=key.dtype, device=device)
    block_t = min(cfg["block_t"], chunk)
    if chunk % block_t:
        raise ValueError(f"wkv4 bwd config: block_t must divide chunk ({chunk}), got {cfg}")
    NC = states.shape[1]
    key, value, grad_out = _rows(key), _rows(value), _rows(grad_out)
    td, tf = time_decay.contiguous(), time_first.contiguous()
    fast = _fast_math(device)
    has_dfinal = grad_final is not None
    gfinal = grad_final.float().contiguous() if has_dfinal else final
    st = state.float().contiguous() if state is not None else final

    fuse = bool(cfg.get("fuse", 0))
    sub = empty((B, NC * (chunk // block_t), 3, C), torch.float32, device)
    rsum = empty((B, NC, 5, C), torch.float32, device)
    rin = empty((B, NC, 3, C), torch.float32, device)
    gstate = empty((3, B, C), torch.float32, device) if state is not None else None
    gpt = empty((B, C), torch.float32, device)
    gwx = empty((B, C), torch.float32, device)
    scan_args = (final, fidx, gfinal, st, rin, gstate if gstate is not None else gpt, gpt, gwx)
    n_cb = cdiv(C, cfg["sum_block_c"])
    launch(
        wkv4_bwd_summary_kernel,
        (NC, n_cb, B),
        key,
        value,
        grad_out,
        td,
        tf,
        states,
        sub,
        rsum,
        counters(B * n_cb, device) if fuse else rsum,
        *scan_args,
        T,
        C,
        B,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        grad_out.stride(0),
        grad_out.stride(1),
        CHUNK=chunk,
        BLOCK_T=block_t,
        BLOCK_C=cfg["sum_block_c"],
        EVEN_T=T % chunk == 0,
        FAST=fast,
        FUSE_SCAN=fuse,
        HAS_STATE=state is not None,
        HAS_DFINAL=has_dfinal,
        NUM_STAGES=cfg["scan_stages"],
        num_warps=cfg["sum_warps"],
    )
    if not fuse:
        launch(
            wkv4_bwd_scan_kernel,
            (cdiv(C, cfg["scan_block_c"]), B),
            rsum,
            *scan_args,
            T,
            C,
            B,
            NC,
            BLOCK_C=cfg["scan_block_c"],
            HAS_STATE=state is not None,
            HAS_DFINAL=has_dfinal,
            NUM_STAGES=cfg["scan_stages"],
            num_warps=cfg["scan_warps"],
        )
    gk = empty((B, T, C), key.dtype, device)
    gv = empty((B, T, C), value.dtype, device)
    gw_part = empty((B, NC, C), torch.float32, device)
    gu_part = empty((B, NC, C), torch.float32, device)
    g_td = empty((C,), time_decay.dtype, device)
    g_tf = empty((C,), time_first.dtype, device)
    n_cg = cdiv(C, cfg["block_c"])
    launch(
        wkv4_bwd_grad_kernel,
        (NC, n_cg, B),
        key,
        value,
        grad_out,
        td,
        tf,
        sub,
        rin,
        fidx,
        gpt,
        gk,
        gv,
        gw_part,
        gu_part,
        counters(n_cg, device) if fuse else gw_part,
        gwx,
        g_td,
        g_tf,
        T,
        C,
        B,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        grad_out.stride(0),
        grad_out.stride(1),
        gk.stride(0),
        gk.stride(1),
        gv.stride(0),
        gv.stride(1),
        CHUNK=chunk,
        BLOCK_T=block_t,
        BLOCK_C=cfg["block_c"],
        HAS_DFINAL=has_dfinal,
        EVEN_T=T % chunk == 0,
        FAST=fast,
        FUSE_PARAM=fuse,
        num_warps=cfg["num_warps"],
    )
    if not fuse:
        launch(
            wkv4_bwd_param_kernel,
            (cdiv(C, _PARAM_BLOCK_C),),
            gw_part,
            gu_part,
            gwx,
            td,
            g_td,
            g_tf,
            B * NC,
            B,
            C,
            BLOCK_C=_PARAM_BLOCK_C,
            num_warps=4,
        )
    return g_td, g_tf, gk, gv, gstate
