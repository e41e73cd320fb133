"""Allocation, grid, config and launch of the RWKV-6 WKV kernels (no autograd here).

Every launcher takes ``config=None`` (a dict; ``default_config`` gives the heuristic one) so the
tuner can feed any point of the search space through the same code path. ``config["MODE"]``
picks the fused-recurrent kernels or the chunk-parallel ones (see ``kernels.py``); both write
and read the same checkpoints, so a forward in one mode can be followed by a backward in the
other.
"""

from __future__ import annotations

import math

import torch

from scanopt._launch import launch
from scanopt._tensor import empty
from scanopt._triton_compat import ensure_interpreter_compat
from scanopt.ops._partials import sum_partials
from scanopt.ops._rwkv_common import (
    CKPT_CHUNK,
    CONFIG_KEYS,
    TC_PRECISION,
    block_paths,
    block_precision,
    cdiv,
    factor_pairs,
    launch_config,
    next_pow2,
)
from scanopt.ops._rwkv_common import default_config as _default_config
from scanopt.ops._tc_helpers import tc_cumsum_kernel
from scanopt.ops.wkv6 import kernels

__all__ = ["CONFIG_KEYS", "default_config", "wkv6_fwd", "wkv6_bwd"]


def default_config(direction: str, *, T: int, K: int, V: int, dtype: torch.dtype) -> dict:
    """Heuristic config (see :func:`scanopt.ops._rwkv_common.default_config` for the keys)."""
    return _default_config(direction, T=T, K=K, V=V, dtype=dtype, op="wkv6", w_dtype=dtype)


def _launch_opts(cfg: dict) -> dict:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def wkv6_fwd(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    store_ckpt: bool,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the forward kernels.

    Returns ``o`` ``[B, T, H, V]`` (``r.dtype``), the final state ``[B, H, K, V]`` fp32 and the
    checkpoints ``[B, H, ceil(T / CHUNK), K, V]`` fp32 (the state before steps 0, CHUNK, ...;
    shape ``(0,)`` unless ``store_ckpt``).
    """
    ensure_interpreter_compat()
    B, T, H, K = r.shape
    V = v.shape[-1]
    cfg = launch_config("wkv6", "fwd", config, r, w, v)
    r, k, v, w, u = (x.contiguous() for x in (r, k, v, w, u))
    h0 = initial_state.contiguous() if initial_state is not None else None
    device = r.device
    o = empty((B, T, H, V), r.dtype, device)
    ht = empty((B, H, K, V), torch.float32, device)
    CK, BV = cfg["CHUNK"], cfg["BV"]
    NV = cdiv(V, BV)
    ckpt = empty((B, H, cdiv(T, CK), K, V) if store_ckpt else (0,), torch.float32, device)
    if cfg["MODE"] == "recurrent":
        launch(kernels.wkv6_fwd_kernel, (NV, B * H),
            r, k, v, w, u, o, h0 if h0 is not None else ht, ht, ckpt,
            scale, T, H, K, V,
            BK=next_pow2(K), BV=BV, CHUNK=CK, PF=cfg["PF"],
            HAS_H0=h0 is not None, STORE_CKPT=store_ckpt, **_launch_opts(cfg),
        )  # fmt: skip
        return o, ht, ckpt

    if cfg["MODE"] == "tc":
        return _wkv6_fwd_tc(r, k, v, w, u, o, ht, ckpt, h0, scale, store_ckpt, cfg)

    BK, BT = next_pow2(K), cfg["BT"]
    NT = cdiv(T, BT)
    ratio = BT // CK if store_ckpt else 1
    hbuf = ckpt if store_ckpt else torch.empty((B, H, NT, K, V), dtype=torch.float32, device=device)
    p = torch.empty((B, H, NT, K), dtype=torch.float32, device=device)
    uc = torch.empty((B, H, NT, K, V), dtype=torch.float32, device=device)
    launch(
        kernels.wkv6_chunk_transition_kernel,
        (NV, NT, B * H),
        k,
        v,
        w,
        p,
        uc,
        T,
        H,
        K,
        V,
        BK=BK,
        BV=BV,
        BT=BT,
        PF=cfg["PF"],
        **_launch_opts(cfg),
    )
    launch(kernels.wkv6_chunk_state_fwd_kernel, (NV, B * H),
        p, uc, h0 if h0 is not None else ht, ht, hbuf, T, H, K, V,
        BK=BK, BV=BV, BT=BT, RATIO=ratio, HAS_H0=h0 is not None, **_launch_opts(cfg),
    )  # fmt: skip
    launch(kernels.wkv6_chunk_out_kernel, (NV, NT, B * H),
        r, k, v, w, u, o, hbuf, scale, T, H, K, V,
        BK=BK, BV=BV, BT=BT, RATIO=ratio, PF=cfg["PF"], **_launch_opts(cfg),
    )  # fmt: skip
    return o, ht, ckpt


def _wkv6_fwd_tc(r, k, v, w, u, o, ht, ckpt, h0, scale, store_ckpt, cfg):
    """``MODE="tc"``: the state before every chunk of ``BT`` steps on tensor cores (serial),
    the log decays from each chunk's start (one cumsum pass; two fp32 ``[B, H, T, K]`` buffers
    that live for the call), then every chunk's output in parallel, which also writes the
    ``CHUNK``-step checkpoints inside its chunk."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    BK, BT = max(16, next_pow2(K)), cfg["BT"]
    hbuf = torch.empty((B, H, cdiv(T, BT), K, V), dtype=torch.float32, device=r.device)
    prec = TC_PRECISION[r.dtype]
    opts = _launch_opts(cfg)
    serial_opts = {**opts, "num_warps": cfg["SW"]}  # the [K, BW] serial passes
    gi = torch.empty((B, H, cdiv(T, BT) * BT, K), dtype=torch.float32, device=r.device)
    gr = torch.empty_like(gi)
    launch(tc_cumsum_kernel, (cdiv(T, BT), B * H), w, gi, gr, T, H, K, BK=BK, BT=BT, **opts)
    launch(kernels.wkv6_tc_state_kernel, (cdiv(V, cfg["BW"]), B * H),
        k, v, gi, gr, h0 if h0 is not None else ht, ht, hbuf, T, H, K, V,
        BK=BK, BV=cfg["BW"], BS=BT, HAS_H0=h0 is not None, PREC=prec, **serial_opts,
    )  # fmt: skip
    launch(kernels.wkv6_tc_out_kernel, (cdiv(T, BT), cdiv(V, cfg["BV"]), B * H),
        r, k, v, gi, u, o, hbuf, ckpt if store_ckpt else hbuf, scale, T, H, K, V,
        BK=BK, BV=cfg["BV"], BT=BT, BC=16, CK=cfg["CHUNK"], STORE_CKPT=store_ckpt,
        FACTOR=factor_pairs(w), PREC=block_precision(r, w), **opts,
    )  # fmt: skip
    return o, ht, ckpt


def wkv6_bwd(
    do: torch.Tensor,
    dht: torch.Tensor | None,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    ckpt: torch.Tensor,
    chunk: int,
    config: dict | None = None,
) -> tuple[torch.Tensor, ...]:
    """Run the backward kernels from the forward's checkpoints (``chunk`` steps apart;
    recomputed here when ``ckpt`` is empty; the chunked mode needs ``chunk == 16``).

    Returns ``dr, dk, dv, dw, du`` in their inputs' dtypes and ``dh0`` (``initial_state``'s
    dtype; shape ``(0,)`` when there is no initial state).
    """
    ensure_interpreter_compat()
    B, T, H, K = r.shape
    V = v.shape[-1]
    cfg = launch_config("wkv6", "bwd", config, r, w, v)
    chunked = cfg["MODE"] == "chunked"
    if cfg["MODE"] in ("chunked", "tc") and chunk != CKPT_CHUNK:
        raise ValueError(f"wkv6: the {cfg['MODE']} backward needs {CKPT_CHUNK}-step checkpoints")
    r, k, v, w, u, do = (x.contiguous() for x in (r, k, v, w, u, do))
    h0 = initial_state.contiguous() if initial_state is not None else None
    dht = dht.contiguous() if dht is not None else None
    if ckpt.numel() == 0:
        _, _, ckpt = wkv6_fwd(r, k, v, w, u, scale, h0, True, {"CHUNK": chunk})
    ckpt = ckpt.contiguous()
    device = r.device
    BK, BV = next_pow2(K), cfg["BV"]
    NV = cdiv(V, BV)

    def part(like: torch.Tensor) -> torch.Tensor:
        # V-blocks write partial sums; with one block the kernel writes the final tensor
        if NV == 1:
            return empty((B, T, H, K), like.dtype, device)
        return empty((NV, B, T, H, K), torch.float32, device)

    dr, dk, dw = part(r), part(k), part(w)
    dv = empty((B, T, H, V), v.dtype, device)
    dh0_dtype = h0.dtype if h0 is not None else torch.float32
    dh0 = empty((B, H, K, V) if h0 is not None else (0,), dh0_dtype, device)
    if cfg["MODE"] == "tc":
        NS = cdiv(T, CKPT_CHUNK)
        prec = TC_PRECISION[r.dtype]
        opts = _launch_opts(cfg)
        serial_opts = {**opts, "num_warps": cfg["SW"]}  # the [K, BW] serial passes
        # chunk-end cotangents every BT steps (serial); each 16-step block program carries its
        # chunk's back over the chunk's later rows itself
        dbuf = torch.empty((B, H, cdiv(T, cfg["BT"]), K, V), dtype=torch.float32, device=device)
        launch(kernels.wkv6_tc_dstate_kernel, (cdiv(V, cfg["BW"]), B * H),
            r, w, do, dht if dht is not None else dbuf, dbuf, dh0, scale, T, H, K, V,
            BK=max(16, BK), BV=cfg["BW"], BS=cfg["BT"], HAS_DHT=dht is not None,
            HAS_H0=h0 is not None, PREC=prec, **serial_opts,
        )  # fmt: skip
        du = empty((NV, NS, B, H, K), torch.float32, device)
        carry = bool(cfg.get("CARRY", 0))  # configs stored before the key existed lack it
        dpass = bool(cfg.get("DPASS", 0))
        gi = gr = dbuf  # (unread without DPASS)
        if dpass:  # the block-relative log decays, once, for the gradient kernel to read
            gi = torch.empty((B, H, NS * CKPT_CHUNK, K), dtype=torch.float32, device=device)
            gr = torch.empty_like(gi)
            launch(
                tc_cumsum_kernel,
                (NS, B * H),
                w,
                gi,
                gr,
                T,
                H,
                K,
                BK=max(16, BK),
                BT=CKPT_CHUNK,
                **opts,
            )
        for path in block_paths(w):
            launch(kernels.wkv6_tc_bwd_kernel, (cdiv(T, cfg["BT"]) if carry else NS, NV, B * H),
                r, k, v, w, gi, gr, u, do, ckpt, dbuf, dr, dk, dw, du, dv, scale, T, H, K, V,
                B * T * H * K if NV > 1 else 0,
                BK=max(16, BK), BV=BV, BC=CKPT_CHUNK, BT=cfg["BT"], PATH=path, CARRY=carry,
                DPASS=dpass,
                PREC=block_precision(r, w), **opts,
            )  # fmt: skip
        du = du.flatten(0, 1)
    elif not chunked:
        du = empty((NV, B, H, K), torch.float32, device)
        work = torch.empty((NV * B * H, chunk, BV, BK), dtype=torch.float32, device=device)
        launch(kernels.wkv6_bwd_kernel, (NV, B * H),
            r, k, v, w, u, do, dht if dht is not None else do, ckpt, work,
            dr, dk, dw, du, dv, dh0,
            scale, T, H, K, V,
            BK=BK, BV=BV, CHUNK=chunk, PF=math.gcd(cfg["PF"], chunk),  # unrolled by PF over chunk-step pieces
            HAS_H0=h0 is not None, HAS_DHT=dht is not None, **_launch_opts(cfg),
        )  # fmt: skip
    else:
        BT = cfg["BT"]
        NT = cdiv(T, BT)
        p = torch.empty((B, H, NT, K), dtype=torch.float32, device=device)
        y = torch.empty((B, H, NT, K, V), dtype=torch.float32, device=device)
        launch(
            kernels.wkv6_chunk_adjoint_kernel,
            (NV, NT, B * H),
            r,
            w,
            do,
            p,
            y,
            scale,
            T,
            H,
            K,
            V,
            BK=BK,
            BV=BV,
            BT=BT,
            PF=cfg["PF"],
            **_launch_opts(cfg),
        )
        dhend = torch.empty((B, H, NT, K, V), dtype=torch.float32, device=device)
        launch(kernels.wkv6_chunk_state_bwd_kernel, (NV, B * H),
            p, y, dht if dht is not None else y, dhend, dh0, T, H, K, V,
            BK=BK, BV=BV, BT=BT, HAS_DHT=dht is not None, HAS_H0=h0 is not None,
            **_launch_opts(cfg),
        )  # fmt: skip
        du = empty((NV, NT, B, H, K), torch.float32, device)
        launch(kernels.wkv6_chunk_bwd_kernel, (NV, NT, B * H),
            r, k, v, w, u, do, ckpt, dhend, dr, dk, dw, du, dv,
            scale, T, H, K, V, BK=BK, BV=BV, BT=BT, **_launch_opts(cfg),
        )  # fmt: skip
        du = du.flatten(0, 1)
    if NV > 1:
        dr, dk, dw = (sum_partials(g, x.dtype) for g, x in ((dr, r), (dk, k), (dw, w)))
    du = du.sum((0, 1)).to(u.dtype)
    return dr, dk, dv, dw, du, dh0
