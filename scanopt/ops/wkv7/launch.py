"""Allocation, grid, config and launch of the RWKV-7 WKV kernels (no autograd here).

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
    launch_config,
    next_pow2,
)
from scanopt.ops._rwkv_common import default_config as _default_config
from scanopt.ops._tc_helpers import tc_cumsum_kernel
from scanopt.ops.wkv7 import kernels

__all__ = ["CONFIG_KEYS", "default_config", "wkv7_fwd", "wkv7_bwd"]


def default_config(direction: str, *, T: int, K: int, V: int, dtype: torch.dtype) -> dict:
    """Heuristic config (see :func:`scanopt.ops._rwkv_common.default_config` for the keys)."""
    return _default_config(direction, T=T, K=K, V=V, dtype=dtype, op="wkv7", w_dtype=dtype)


def _launch_opts(cfg: dict, min_warps: int = 1) -> dict:
    return {"num_warps": max(cfg["num_warps"], min_warps), "num_stages": cfg["num_stages"]}


def wkv7_fwd(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
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
    cfg = launch_config("wkv7", "fwd", config, r, w, v)
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    h0 = initial_state.contiguous() if initial_state is not None else None
    device = r.device
    o = empty((B, T, H, V), r.dtype, device)
    ht = empty((B, H, K, V), torch.float32, device)
    CK, BV = cfg["CHUNK"], cfg["BV"]
    ckpt = empty((B, H, cdiv(T, CK), K, V) if store_ckpt else (0,), torch.float32, device)
    if cfg["MODE"] == "recurrent" and cfg.get("KS", 0):
        # K in lane groups of KS values per thread (kernels.wkv7_fwd_ks_kernel)
        BK = next_pow2(K)
        KS = min(int(cfg["KS"]), BK)
        KG = BK // KS
        lanes = 32 * cfg["num_warps"]
        if KG > lanes:
            raise ValueError(f"wkv7 fwd config: KS={KS} leaves {KG} lane groups for K={K}, "
                             f"more than {lanes} lanes")  # fmt: skip
        VL = lanes // KG
        CPL = max(1, BV // VL)
        launch(kernels.wkv7_fwd_ks_kernel, (cdiv(V, VL * CPL), B * H),
            r, w, k, v, a, b, o, h0 if h0 is not None else ht, ht, ckpt,
            scale, T, H, K, V,
            KS=KS, KG=KG, VL=VL, CPL=CPL, CHUNK=CK, PF=cfg["PF"],
            HAS_H0=h0 is not None, STORE_CKPT=store_ckpt, PAIRS=_bf16_words(KS, r, w, k, a, b),
            **_launch_opts(cfg),
        )  # fmt: skip
        return o, ht, ckpt
    if cfg["MODE"] == "recurrent":
        launch(kernels.wkv7_fwd_kernel, (cdiv(V, BV), B * H),
            r, w, k, v, a, b, o, h0 if h0 is not None else ht, ht, ckpt,
            scale, T, H, K, V,
            BK=next_pow2(K), BV=BV, CHUNK=CK, PF=cfg["PF"],
            HAS_H0=h0 is not None, STORE_CKPT=store_ckpt, **_launch_opts(cfg),
        )  # fmt: skip
        return o, ht, ckpt

    if cfg["MODE"] == "tc":
        return _wkv7_fwd_tc(r, w, k, v, a, b, o, ht, ckpt, h0, scale, store_ckpt, cfg)

    BK, BT, BW = max(16, next_pow2(K)), cfg["BT"], cfg["BW"]
    NT, W = cdiv(T, BT), K + V
    ratio = BT // CK if store_ckpt else 1
    hbuf = ckpt if store_ckpt else torch.empty((B, H, NT, K, V), dtype=torch.float32, device=device)
    pu = torch.empty((B, H, NT, K, W), dtype=torch.float32, device=device)
    launch(
        kernels.wkv7_chunk_transition_kernel,
        (cdiv(W, BW), NT, B * H),
        w,
        k,
        v,
        a,
        b,
        pu,
        T,
        H,
        K,
        V,
        W,
        BK=BK,
        BW=BW,
        BT=BT,
        PF=cfg["PF"],
        **_launch_opts(cfg),
    )
    launch(kernels.wkv7_chunk_state_fwd_kernel, (cdiv(V, BV), B * H),
        pu, h0 if h0 is not None else ht, ht, hbuf, T, H, K, V,
        BK=BK, BV=BV, BKC=16, BT=BT, RATIO=ratio, HAS_H0=h0 is not None,
        **_launch_opts(cfg, 4),
    )  # fmt: skip
    launch(kernels.wkv7_chunk_out_kernel, (cdiv(V, BV), NT, B * H),
        r, w, k, v, a, b, o, hbuf, scale, T, H, K, V,
        BK=BK, BV=BV, BT=BT, RATIO=ratio, PF=cfg["PF"], **_launch_opts(cfg),
    )  # fmt: skip
    return o, ht, ckpt


def _bf16_words(KS: int, *xs: torch.Tensor) -> bool:
    """Whether the KS kernel reads the K-vectors as int32 words of two bf16 (contiguous
    ``[B, T, H, K]`` with K and KS even, 4-byte aligned)."""
    return KS % 2 == 0 and all(
        x.dtype == torch.bfloat16 and x.shape[-1] % 2 == 0 and x.data_ptr() % 4 == 0 for x in xs
    )


def _wkv7_fwd_tc(r, w, k, v, a, b, o, ht, ckpt, h0, scale, store_ckpt, cfg):
    """``MODE="tc"``: per-block (I - Aab)^{-1} products in parallel; the chunk transitions
    (``BT`` steps, ``BT // 16`` blocks) in parallel, the state serially chunk by chunk, then the
    states of the blocks inside each chunk in parallel (with ``BT`` = 16: every block
    serially); then every block's output in parallel."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    if store_ckpt and cfg["CHUNK"] != CKPT_CHUNK:
        raise ValueError(f"wkv7 fwd config: MODE 'tc' stores {CKPT_CHUNK}-step checkpoints: {cfg}")
    BK, NS = max(16, next_pow2(K)), cdiv(T, CKPT_CHUNK)
    device = r.device
    aw = torch.empty((B, H, NS, CKPT_CHUNK, K), dtype=torch.float32, device=device)
    wk = torch.empty((B, H, NS, CKPT_CHUNK, CKPT_CHUNK), dtype=torch.float32, device=device)
    hbuf = ckpt if store_ckpt else torch.empty((B, H, NS, K, V), dtype=torch.float32, device=device)
    prec = TC_PRECISION[r.dtype]
    opts = _launch_opts(cfg)
    serial_opts = {**opts, "num_warps": cfg["SW"]}  # the [K, BW] serial passes
    for path in block_paths(w):
        launch(kernels.wkv7_tc_prep_kernel, (NS, B * H),
            w, k, a, b, aw, wk, T, H, K, BK=BK, BC=CKPT_CHUNK, PATH=path, PREC=prec, **opts,
        )  # fmt: skip
    NB = cfg["BT"] // CKPT_CHUNK  # blocks per chunk of the serial pass
    h_init = h0 if h0 is not None else ht
    if NB == 1:  # the state pass walks every block
        launch(kernels.wkv7_tc_state_kernel, (cdiv(V, cfg["BW"]), B * H),
            w, k, v, b, aw, wk, h_init, ht, hbuf, T, H, K, V,
            BK=BK, BV=cfg["BW"], BC=CKPT_CHUNK, NB=0, HAS_H0=h0 is not None, PREC=prec,
            **serial_opts,
        )  # fmt: skip
    else:  # chunk transitions in parallel, the serial pass per chunk, then the blocks between
        NT, W = cdiv(NS, NB), K + V
        pu = torch.empty((B, H, NT, K, W), dtype=torch.float32, device=device)
        launch(kernels.wkv7_tc_transition_kernel, (NT, cdiv(W, cfg["BV"]), B * H),
            w, k, v, b, aw, wk, pu, T, H, K, V, BK=BK, BW=cfg["BV"], BC=CKPT_CHUNK, NB=NB,
            PREC=prec, **opts,
        )  # fmt: skip
        launch(kernels.wkv7_chunk_state_fwd_kernel, (cdiv(V, cfg["BW"]), B * H),
            pu, h_init, ht, hbuf, T, H, K, V, BK=BK, BV=cfg["BW"], BKC=16, BT=cfg["BT"],
            RATIO=NB, HAS_H0=h0 is not None, **serial_opts,
        )  # fmt: skip
        launch(kernels.wkv7_tc_state_kernel, (cdiv(V, cfg["BW"]) * NT, B * H),
            w, k, v, b, aw, wk, h_init, ht, hbuf, T, H, K, V,
            BK=BK, BV=cfg["BW"], BC=CKPT_CHUNK, NB=NB, HAS_H0=False, PREC=prec, **opts,
        )  # fmt: skip
    for path in block_paths(w):
        launch(kernels.wkv7_tc_out_kernel, (NS, cdiv(V, cfg["BV"]), B * H),
            r, w, k, v, b, aw, wk, o, hbuf, scale, T, H, K, V,
            BK=BK, BV=cfg["BV"], BC=CKPT_CHUNK, PATH=path, PREC=prec, **opts,
        )  # fmt: skip
    return o, ht, ckpt


def wkv7_bwd(
    do: torch.Tensor,
    dht: torch.Tensor | None,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    ckpt: torch.Tensor,
    chunk: int,
    config: dict | None = None,
) -> tuple[torch.Tensor, ...]:
    """Run the backward kernels from the forward's checkpoints (``chunk`` steps apart;
    recomputed here when ``ckpt`` is empty; the chunked mode needs ``chunk == 16``).

    Returns ``dr, dw, dk, dv, da, db`` in their inputs' dtypes and ``dh0`` (``initial_state``'s
    dtype; shape ``(0,)`` when there is no initial state).
    """
    ensure_interpreter_compat()
    B, T, H, K = r.shape
    V = v.shape[-1]
    cfg = launch_config("wkv7", "bwd", config, r, w, v)
    chunked = cfg["MODE"] == "chunked"
    if cfg["MODE"] in ("chunked", "tc") and chunk != CKPT_CHUNK:
        raise ValueError(f"wkv7: the {cfg['MODE']} backward needs {CKPT_CHUNK}-step checkpoints")
    r, w, k, v, a, b, do = (x.contiguous() for x in (r, w, k, v, a, b, do))
    h0 = initial_state.contiguous() if initial_state is not None else None
    dht = dht.contiguous() if dht is not None else None
    if ckpt.numel() == 0:
        _, _, ckpt = wkv7_fwd(r, w, k, v, a, b, scale, h0, True, {"CHUNK": chunk})
    ckpt = ckpt.contiguous()
    device = r.device
    BV = cfg["BV"]
    NV = cdiv(V, BV)

    def part(like: torch.Tensor) -> torch.Tensor:
        # V-blocks write partial sums; with one block the kernel writes the final tensor
        if NV == 1:
            return empty((B, T, H, K), like.dtype, device)
        return empty((NV, B, T, H, K), torch.float32, device)

    dr, dw, dk, da, db = part(r), part(w), part(k), part(a), part(b)
    dv = empty((B, T, H, V), v.dtype, device)
    dh0_dtype = h0.dtype if h0 is not None else torch.float32
    dh0 = empty((B, H, K, V) if h0 is not None else (0,), dh0_dtype, device)
    if cfg["MODE"] == "tc":
        BK, NS = max(16, next_pow2(K)), cdiv(T, CKPT_CHUNK)
        prec = TC_PRECISION[r.dtype]
        opts = _launch_opts(cfg)
        serial_opts = {**opts, "num_warps": cfg["SW"]}  # the [K, BW] serial passes
        z1 = torch.empty((B, H, NS, CKPT_CHUNK, CKPT_CHUNK), dtype=torch.float32, device=device)
        z2 = torch.empty((B, H, NS, CKPT_CHUNK, K), dtype=torch.float32, device=device)
        # DPASS 1: the gradient kernel reads the decay pass's rows; 2: the bprep kernel and the
        # serial cotangent passes too (configs stored before the key existed lack it)
        dpass = int(cfg.get("DPASS", 0))
        gread = dpass == 2
        gi = gr = z1  # (unread without DPASS)
        if dpass:  # the block-relative log decays, once, for the kernels after it to read
            gi = torch.empty((B, H, NS * CKPT_CHUNK, K), dtype=torch.float32, device=device)
            gr = torch.empty_like(gi)
            launch(tc_cumsum_kernel, (NS, B * H), w, gi, gr, T, H, K, BK=BK, BT=CKPT_CHUNK, **opts)
        for path in block_paths(w):
            launch(kernels.wkv7_tc_bprep_kernel, (NS, B * H),
                r, w, a, b, gi, gr, z1, z2, scale, T, H, K,
                BK=BK, BC=CKPT_CHUNK, PATH=path, PREC=prec, GREAD=gread, **opts,
            )  # fmt: skip
        dbuf = torch.empty((B, H, NS, K, V), dtype=torch.float32, device=device)
        NB = cfg["BT"] // CKPT_CHUNK  # blocks per chunk of the serial pass
        if NB == 1:  # the cotangent pass walks every block
            launch(kernels.wkv7_tc_dstate_kernel, (cdiv(V, cfg["BW"]), B * H),
                r, w, a, do, z1, z2, dht if dht is not None else dbuf, dbuf, dh0, gi, scale,
                T, H, K, V, BK=BK, BV=cfg["BW"], BC=CKPT_CHUNK, NB=0, HAS_DHT=dht is not None,
                HAS_H0=h0 is not None, PREC=prec, GREAD=gread, **serial_opts,
            )  # fmt: skip
        else:  # chunk adjoints in parallel, the serial pass per chunk, then the blocks between
            NT = cdiv(NS, NB)
            p = torch.empty((B, H, NT, K, K), dtype=torch.float32, device=device)
            y = torch.empty((B, H, NT, K, V), dtype=torch.float32, device=device)
            launch(kernels.wkv7_tc_adjoint_kernel, (NT, cdiv(K + V, cfg["BV"]), B * H),
                r, w, a, do, z1, z2, p, y, gi, scale, T, H, K, V,
                BK=BK, BW=cfg["BV"], BC=CKPT_CHUNK, NB=NB, PREC=prec, GREAD=gread, **opts,
            )  # fmt: skip
            dhend = torch.empty((B, H, NT, K, V), dtype=torch.float32, device=device)
            launch(kernels.wkv7_chunk_state_bwd_kernel, (cdiv(V, cfg["BW"]), B * H),
                p, y, dht if dht is not None else y, dhend, dh0, T, H, K, V,
                BK=BK, BV=cfg["BW"], BKC=16, BT=cfg["BT"], HAS_DHT=dht is not None,
                HAS_H0=h0 is not None, **serial_opts,
            )  # fmt: skip
            launch(kernels.wkv7_tc_dstate_kernel, (cdiv(V, cfg["BW"]) * NT, B * H),
                r, w, a, do, z1, z2, dhend, dbuf, dh0, gi, scale, T, H, K, V,
                BK=BK, BV=cfg["BW"], BC=CKPT_CHUNK, NB=NB, HAS_DHT=True, HAS_H0=False,
                PREC=prec, GREAD=gread, **opts,
            )  # fmt: skip
        for path in block_paths(w):
            launch(kernels.wkv7_tc_bwd_kernel, (NS, NV, B * H),
                r, w, k, v, a, b, do, ckpt, dbuf, gi, gr, dr, dw, dk, da, db, dv, scale,
                T, H, K, V, B * T * H * K if NV > 1 else 0,
                BK=BK, BKC=min(BK, 32 if path == 1 else 16), BV=BV, BC=CKPT_CHUNK, PATH=path,
                DPASS=dpass > 0, PREC=block_precision(r, w), **opts,
            )  # fmt: skip
    elif not chunked:
        BK = next_pow2(K)
        work = torch.empty((NV * B * H, chunk, BV, BK), dtype=torch.float32, device=device)
        launch(kernels.wkv7_bwd_kernel, (NV, B * H),
            r, w, k, v, a, b, do, dht if dht is not None else do, ckpt, work,
            dr, dw, dk, da, db, dv, dh0,
            scale, T, H, K, V,
            BK=BK, BV=BV, CHUNK=chunk, PF=math.gcd(cfg["PF"], chunk),  # unrolled by PF over chunk-step pieces
            HAS_H0=h0 is not None, HAS_DHT=dht is not None, **_launch_opts(cfg),
        )  # fmt: skip
    else:
        BK, BT, BW = max(16, next_pow2(K)), cfg["BT"], cfg["BW"]
        NT = cdiv(T, BT)
        p = torch.empty((B, H, NT, K, K), dtype=torch.float32, device=device)
        launch(
            kernels.wkv7_chunk_transition_kernel,
            (cdiv(K, BW), NT, B * H),
            w,
            k,
            v,
            a,
            b,
            p,
            T,
            H,
            K,
            V,
            K,
            BK=BK,
            BW=BW,
            BT=BT,
            PF=cfg["PF"],
            **_launch_opts(cfg),
        )
        y = torch.empty((B, H, NT, K, V), dtype=torch.float32, device=device)
        launch(
            kernels.wkv7_chunk_adjoint_kernel,
            (NV, NT, B * H),
            r,
            w,
            a,
            b,
            do,
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
        launch(kernels.wkv7_chunk_state_bwd_kernel, (NV, B * H),
            p, y, dht if dht is not None else y, dhend, dh0, T, H, K, V,
            BK=BK, BV=BV, BKC=16, BT=BT,
            HAS_DHT=dht is not None, HAS_H0=h0 is not None, **_launch_opts(cfg, 4),
        )  # fmt: skip
        launch(kernels.wkv7_chunk_bwd_kernel, (NV, NT, B * H),
            r, w, k, v, a, b, do, ckpt, dhend, dr, dw, dk, da, db, dv,
            scale, T, H, K, V, BK=BK, BV=BV, BT=BT, **_launch_opts(cfg),
        )  # fmt: skip
    if NV > 1:
        dr, dw, dk, da, db = (
            sum_partials(g, x.dtype) for g, x in ((dr, r), (dw, w), (dk, k), (da, a), (db, b))
        )
    return dr, dw, dk, dv, da, db, dh0
