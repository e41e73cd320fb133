"""Allocation, grids, configs and launches of the attention kernels (no autograd here).

Launchers take q/k/v as logical ``(B, H, L, D)`` tensors (any strides, last dim contiguous) and
the mask as ``(diag, left, right)`` from :func:`mask_params`. Every launcher accepts
``config=None`` (then :func:`default_config`); a config is a plain dict of block sizes, warps,
stages and the TMA / warp-specialization switches, so a tuner can feed its own.
"""

from __future__ import annotations

from typing import Any

import torch

from scanopt._env import interpreting
from scanopt._launch import launch
from scanopt._tensor import empty
from scanopt._triton_compat import ensure_interpreter_compat
from scanopt.autotune import resolve_config as tuned_config
from scanopt.autotune.store import register_launch_cache
from scanopt.ops.attention import kernels

#: largest head dim the kernels take (the public functions send larger ones to PyTorch)
MAX_HEAD_DIM = 256


def block_dim(d: int) -> int:
    """Head dim padded to the power of two the kernels use (at least 16, the MMA K step)."""
    return max(16, 1 << (d - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def mask_params(
    lq: int, lk: int, causal: bool, bottom_right: bool, window_left: int, window_right: int
) -> tuple[int, int, int]:
    """``(diag, left, right)``: query i may attend key j iff ``-left <= j - i - diag <= right``.

    ``diag`` is ``lk - lq`` for bottom-right alignment (flash-attn) and 0 for top-left (SDPA);
    a negative window side is unbounded and becomes ``lq + lk + 1``; ``causal`` sets right = 0.
    """
    big = lq + lk + 1
    diag = lk - lq if bottom_right else 0
    left = big if window_left < 0 else min(window_left, big)
    right = 0 if causal else (big if window_right < 0 else min(window_right, big))
    return diag, left, right


_CAPABILITY: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device ((0, 0) elsewhere), cached per device index."""
    if device.type != "cuda":
        return (0, 0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(index)
    if cap is None:
        cap = torch.cuda.get_device_capability(index)
        if not torch.compiler.is_compiling():
            _CAPABILITY[index] = cap
    return cap


def _fwd(bm: int, bn: int, warps: int, stages: int, tma: bool = False, ws: bool = False) -> dict:
    return {
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "num_warps": warps,
        "num_stages": stages,
        "USE_TMA": tma,
        "WARP_SPECIALIZE": ws,
    }


def _bwd(kv: tuple[int, int, int, int], q: tuple[int, int, int, int], tma: bool = False) -> dict:
    """kv = (BLOCK_M, BLOCK_N, warps, stages) of the dK/dV kernel, q likewise of the dQ kernel."""
    return {
        "BLOCK_M_KV": kv[0],
        "BLOCK_N_KV": kv[1],
        "num_warps_kv": kv[2],
        "num_stages_kv": kv[3],
        "BLOCK_M_Q": q[0],
        "BLOCK_N_Q": q[1],
        "num_warps_q": q[2],
        "num_stages_q": q[3],
        "BLOCK_M_PRE": 64,
        "USE_TMA": tma,
    }


# Defaults by padded head dim (64: D <= 64, 128: D <= 128, 256: D <= 256).
# Hopper (sm90) 16-bit, keyed also by causal: the winners of a sweep on an H200 (bf16, B=4,
# L=4096, H=16xD=128 and H=32xD=64; numbers in bench/notes/attention.md); the D=256 entries are
# unmeasured heuristics (verified by the GPU tests, not timed). TMA = host tensor descriptors.
_HOPPER_FWD: dict[tuple[int, bool], dict] = {
    (64, False): _fwd(64, 128, 4, 3, tma=True),
    (64, True): _fwd(128, 64, 4, 3),
    (128, False): _fwd(128, 128, 8, 3, tma=True, ws=True),
    (128, True): _fwd(128, 128, 8, 3, tma=True, ws=True),
    (256, False): _fwd(64, 64, 8, 2, tma=True),
    (256, True): _fwd(64, 64, 8, 2, tma=True),
}
_HOPPER_BWD: dict[tuple[int, bool], dict] = {
    (64, False): _bwd((32, 64, 4, 3), (128, 64, 4, 3), tma=True),
    (64, True): _bwd((32, 64, 4, 3), (128, 64, 4, 3), tma=True),
    (128, False): _bwd((64, 128, 8, 2), (128, 64, 8, 3), tma=True),
    (128, True): _bwd((64, 128, 8, 2), (128, 64, 8, 3), tma=True),
    (256, False): _bwd((32, 64, 8, 2), (64, 32, 8, 2), tma=True),
    (256, True): _bwd((32, 64, 8, 2), (64, 32, 8, 2), tma=True),
}
# Other GPUs (Ampere, Ada): plain pointer loads, tiles kept to about 100 KB of shared memory so
# that consumer parts fit too; unmeasured heuristics (the tuner is meant to replace them).
_OTHER_FWD = {64: _fwd(128, 64, 4, 3), 128: _fwd(128, 64, 8, 2), 256: _fwd(64, 32, 4, 2)}
_OTHER_BWD = {
    64: _bwd((32, 64, 4, 3), (128, 64, 4, 2)),
    128: _bwd((32, 128, 8, 2), (64, 64, 4, 2)),
    256: _bwd((16, 64, 4, 2), (32, 64, 4, 1)),
}
# fp32: IEEE fp32 dot products (exact to fp32 rounding), small tiles
_FP32_FWD = {64: _fwd(64, 32, 4, 2), 128: _fwd(64, 32, 4, 2), 256: _fwd(32, 32, 4, 1)}
_FP32_BWD = {
    64: _bwd((32, 64, 4, 1), (64, 32, 4, 1)),
    128: _bwd((32, 64, 4, 1), (64, 32, 4, 1)),
    256: _bwd((16, 32, 4, 1), (32, 16, 4, 1)),
}
# Triton's interpreter: small blocks, so that the tests' short sequences cross every phase
_INTERPRETER_FWD = _fwd(32, 16, 4, 1)
_INTERPRETER_BWD = _bwd((16, 32, 4, 1), (32, 16, 4, 1))


def default_config(
    direction: str,
    *,
    head_dim: int,
    head_dim_v: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    causal: bool = False,
    device: torch.device | str = "cuda",
) -> dict[str, Any]:
    """Heuristic launch config for ``direction`` ``"fwd"`` or ``"bwd"`` (a fresh dict).

    fwd keys: BLOCK_M, BLOCK_N, num_warps, num_stages, USE_TMA, WARP_SPECIALIZE.
    bwd keys: BLOCK_M_KV, BLOCK_N_KV, num_warps_kv, num_stages_kv (dK/dV kernel), BLOCK_M_Q,
    BLOCK_N_Q, num_warps_q, num_stages_q (dQ kernel), BLOCK_M_PRE (delta kernel), USE_TMA.
    USE_TMA is honoured only where tensor descriptors work (sm90+, 16-byte aligned strides).
    """
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    fwd = direction == "fwd"
    device = torch.device(device)
    if device.type != "cuda":
        return dict(_INTERPRETER_FWD if fwd else _INTERPRETER_BWD)
    d = max(block_dim(head_dim), block_dim(head_dim_v or head_dim))
    dclass = 64 if d <= 64 else (128 if d <= 128 else 256)
    if dtype == torch.float32:
        return dict((_FP32_FWD if fwd else _FP32_BWD)[dclass])
    if _capability(device)[0] >= 9:
        return dict((_HOPPER_FWD if fwd else _HOPPER_BWD)[(dclass, bool(causal))])
    return dict((_OTHER_FWD if fwd else _OTHER_BWD)[dclass])


#: launch_config's cache (also cleared by ``scanopt.autotune.store.clear_cache``)
_RESOLVED: dict[tuple, dict[str, Any]] = register_launch_cache({})


def launch_config(
    direction: str,
    *,
    batch: int,
    heads: int,
    lq: int,
    head_dim: int,
    head_dim_v: int,
    dtype: torch.dtype,
    causal: bool,
    device: torch.device,
    seq_first: bool = False,
) -> dict[str, Any]:
    """The config a launcher uses when none is passed: :func:`default_config`, replaced by a
    tuned config for this GPU and shape bucket when the config store has one
    (``scanopt.autotune``, op ``"attention"``, shape ``{B, H, L, D, causal, seq}`` with L the
    query length and ``seq`` 1 for seq-first memory; consulted where the kernels run: CUDA, or
    the CPU under the interpreter). The memory layout is part of the key because the best tile
    differs with it: a config tuned on ``(B, H, L, D)``-contiguous tensors ran 2.8x slower on
    seq-first ones (H100, 2026-12-07).

    Cached per (direction, shapes, dtype, causal, device, layout): a dict access after the
    first call. The returned dict is shared; callers must not mutate it.
    """
    compiling = torch.compiler.is_compiling()  # sizes may be symbolic: no cache
    key = (direction, batch, heads, lq, head_dim, head_dim_v, dtype, causal, device, seq_first)
    cfg = None if compiling else _RESOLVED.get(key)
    if cfg is None:
        cfg = default_config(
            direction, head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype, causal=causal,
            device=device,
        )  # fmt: skip
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            shape = {"B": batch, "H": heads, "L": lq, "D": head_dim, "causal": int(causal),
                     "seq": int(seq_first)}  # fmt: skip
            cfg = tuned_config("attention", direction, dtype, shape, cfg, device=device)
        if not compiling:
            _RESOLVED[key] = cfg
    return cfg


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Host tensor descriptors need cc >= 9 (or the interpreter), 16-byte aligned base/strides."""
    t0 = tensors[0]
    if t0.device.type == "cuda" and _capability(t0.device)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1:
            return False
        if any(s <= 0 or (s * size) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _descriptor(t: torch.Tensor, block_rows: int, block_cols: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_rows, block_cols])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _alloc(shape: tuple[int, ...], seq_first: bool, like: torch.Tensor) -> torch.Tensor:
    """A logical (B, H, L, D) output whose memory is (B, L, H, D) when ``seq_first``."""
    b, h, n, d = shape
    if seq_first:
        return empty((b, n, h, d), like.dtype, like.device).transpose(1, 2)
    return empty((b, h, n, d), like.dtype, like.device)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    diag: int,
    left: int,
    right: int,
    softcap: float = 0.0,
    seq_first: bool = False,
    config: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward. q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), ``Hq % Hk == 0``.

    Returns ``out`` (B, Hq, Lq, Dv) in q's dtype (memory (B, Lq, Hq, Dv) when ``seq_first``)
    and ``lse`` (B, Hq, Lq) float32, natural log, ``-inf`` on rows with no allowed key.
    """
    ensure_interpreter_compat()
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    bsz, hq, lq, d = q.shape
    hk, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    cfg = config or launch_config(
        "fwd", batch=bsz, heads=hq, lq=lq, head_dim=d, head_dim_v=dv, dtype=q.dtype,
        causal=right == 0, device=q.device, seq_first=seq_first,
    )  # fmt: skip
    out = _alloc((bsz, hq, lq, dv), seq_first, q)
    lse = empty((bsz, hq, lq), torch.float32, q.device)
    if out.numel() == 0 or lq == 0:
        return out, lse
    bd, bdv = block_dim(d), block_dim(dv)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    use_tma = bool(cfg.get("USE_TMA", False)) and _tma_ok(k, v)
    desc_k = _descriptor(k, bn, bd) if use_tma else k
    desc_v = _descriptor(v, bn, bdv) if use_tma else v
    grid = (_cdiv(lq, bm), bsz * hq)
    launch(kernels.attn_fwd_kernel, grid,
        q, k, v, out, lse, desc_k, desc_v,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
        hq, hq // hk, lq, lk, d, dv,
        float(scale), float(softcap), diag, left, right,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, EVEN_D=bd == d, EVEN_DV=bdv == dv,
        SOFTCAP=softcap > 0, USE_TMA=use_tma, PRECISION=_precision(q.dtype),
        WARP_SPECIALIZE=bool(cfg.get("WARP_SPECIALIZE", False)) and use_tma and not interpreting(),
        SCALE_IN_EXP=softcap <= 0 and float(scale) > 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out, lse


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None = None,
    *,
    scale: float,
    diag: int,
    left: int,
    right: int,
    softcap: float = 0.0,
    seq_first: bool = False,
    config: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward (deterministic: no atomics). Shapes as in :func:`attention_fwd`; ``dout`` like
    ``out``, ``dlse`` like ``lse`` or None. Returns dq, dk, dv shaped like q, k, v (memory
    seq-first when ``seq_first``), in the input dtypes; dk/dv summed over each GQA group."""
    ensure_interpreter_compat()
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    bsz, hq, lq, d = q.shape
    hk, lk, dv_ = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hk
    cfg = config or launch_config(
        "bwd", batch=bsz, heads=hq, lq=lq, head_dim=d, head_dim_v=dv_, dtype=q.dtype,
        causal=right == 0, device=q.device, seq_first=seq_first,
    )  # fmt: skip
    dq = _alloc((bsz, hq, lq, d), seq_first, q)
    dk = _alloc((bsz, hk, lk, d), seq_first, k)
    dv = _alloc((bsz, hk, lk, dv_), seq_first, v)
    if bsz * hk == 0 or lk == 0 or lq == 0:  # nothing attends: every gradient is zero
        return dq.zero_(), dk.zero_(), dv.zero_()
    bd, bdv = block_dim(d), block_dim(dv_)
    common = dict(
        SOFTCAP=softcap > 0,
        PRECISION=_precision(q.dtype),
        EVEN_D=bd == d,
        EVEN_DV=bdv == dv_,
        BLOCK_D=bd,
        BLOCK_DV=bdv,
    )

    delta = empty((bsz, hq, lq), torch.float32, q.device)
    bpre = cfg["BLOCK_M_PRE"]
    launch(kernels.attn_bwd_preprocess_kernel, (_cdiv(lq, bpre), bsz * hq),
        out, dout, dlse.contiguous() if dlse is not None else lse, delta,
        *_strides3(out), *_strides3(dout), hq, lq, dv_,
        BLOCK_M=bpre, BLOCK_DV=bdv, HAS_DLSE=dlse is not None,
    )  # fmt: skip

    use_tma = bool(cfg.get("USE_TMA", False)) and _tma_ok(q, k, v, dout)
    bm, bn = cfg["BLOCK_M_KV"], cfg["BLOCK_N_KV"]
    desc_q = _descriptor(q, bm, bd) if use_tma else q
    desc_do = _descriptor(dout, bm, bdv) if use_tma else dout
    launch(kernels.attn_bwd_dkdv_kernel, (_cdiv(lk, bn), bsz * hk),
        q, k, v, dout, lse, delta, dk, dv, desc_q, desc_do,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dk),
        *_strides3(dv), hk, group, lq, lk, d, dv_,
        float(scale), float(softcap), diag, left, right,
        BLOCK_M=bm, BLOCK_N=bn, USE_TMA=use_tma,
        num_warps=cfg["num_warps_kv"], num_stages=cfg["num_stages_kv"], **common,
    )  # fmt: skip

    bm, bn = cfg["BLOCK_M_Q"], cfg["BLOCK_N_Q"]
    desc_k = _descriptor(k, bn, bd) if use_tma else k
    desc_v = _descriptor(v, bn, bdv) if use_tma else v
    launch(kernels.attn_bwd_dq_kernel, (_cdiv(lq, bm), bsz * hq),
        q, k, v, dout, lse, delta, dq, desc_k, desc_v,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dq),
        hq, group, lq, lk, d, dv_,
        float(scale), float(softcap), diag, left, right,
        BLOCK_M=bm, BLOCK_N=bn, USE_TMA=use_tma,
        num_warps=cfg["num_warps_q"], num_stages=cfg["num_stages_q"], **common,
    )  # fmt: skip
    return dq, dk, dv
