"""Launchers of the selective-scan kernels: allocation, grid, launch configs. No autograd here.

Every launcher takes ``config=None`` (a dict of the keys in ``CONFIG_KEYS``); missing keys come
from :func:`default_config`, the heuristic the tuner starts from.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from scanopt._env import interpreting
from scanopt._launch import launch
from scanopt._tensor import empty
from scanopt._triton_compat import ensure_interpreter_compat
from scanopt.autotune import resolve_config as tuned_config

#: the keys of a launch config, per kernel (the tuner's search space)
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "fwd": (
        "BLOCK_D",
        "BLOCK_G",
        "BLOCK_R",
        "COLS",
        "PREFETCH",
        "SERIAL",
        "SEG",
        "NSPLIT",
        "num_warps",
        "num_stages",
    ),
    "bwd": (
        "BLOCK_D",
        "BLOCK_G",
        "BLOCK_R",
        "PREFETCH",
        "SEGMENTS",
        "ATOMIC_BC",
        "SERIAL",
        "NSPLIT",
        "num_warps",
        "num_stages",
    ),
    "update": ("BLOCK_D", "num_warps"),
}

#: largest CUDA grid size along y and z
_GRID_YZ_MAX = 65535

#: largest state size the kernels take (mamba_ssm's MAX_DSTATE)
MAX_DSTATE = 256

#: most states one lane keeps in the serial forward (``SERIAL=1``: a channel's N states live in
#: the registers of ``NSPLIT`` lanes; a larger ``N / NSPLIT`` takes the group-scan kernel)
MAX_SERIAL_N = 16


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def default_config(
    kind: str,
    *,
    dim: int,
    N: int,
    L: int = 1,
    dtype=torch.bfloat16,
    device_type: str = "cuda",
    deterministic: bool = True,
    serial: bool = True,
) -> dict:
    """Heuristic launch config of one kernel (``kind``: ``fwd``, ``bwd`` or ``update``).

    Scan kernels (see ``kernels.py``): a chunk of ``BLOCK_G * BLOCK_R`` steps of ``BLOCK_D``
    channels is a ``[BLOCK_D, BLOCK_G, BLOCK_R]`` tile; each thread owns the ``BLOCK_R`` steps
    of one group of one channel, the groups sit on ``BLOCK_G`` lanes and the channels on the
    other ``32 / BLOCK_G`` lanes and the warps.
    So ``BLOCK_D = (32 / BLOCK_G) * num_warps`` gives one channel per thread, and the grid
    has ``batch * dim * BLOCK_G / 32`` warps: the groups are what fills the GPU when
    ``batch * dim`` is small.

    - ``BLOCK_D``: channels per program (lowered so a block never straddles two groups of a
      grouped B/C).
    - ``BLOCK_G``, ``BLOCK_R``: groups per chunk and steps per group. The backward's chunk,
      ``BLOCK_G * BLOCK_R``, is also the forward's checkpoint interval: it sets the
      checkpoint memory, ``batch * dim * N * 4 * ceil(L / chunk)`` bytes, and the forward's
      chunk must divide it.
    - ``COLS`` (forward only): state columns advanced per iteration of the column loop, 1 or 2
      (2: two independent recurrences in flight per thread, more registers).
    - ``PREFETCH``: 1 issues the next iteration's column loads (A, the B/C rows, the carried
      state; in the backward the checkpoint and the adjoint) before this iteration's
      arithmetic; 0 loads each column where it is used. Same results to the bit. On an H100 the
      warps spend half their stall cycles waiting on those loads (Nsight Compute, 2026-12-06).
      Measured (H100, anchor shape, L = 4096): the forward default with ``COLS=2, PREFETCH=1``
      runs 0.676 ms against 1.026 with neither (1.52x); in the backward, where it adds spills,
      ``PREFETCH=1`` is 0.98-1.10x depending on the config, so the backward keeps 0.
    - ``SERIAL`` (forward only): 1 takes the serial family (``selective_scan_fwd_serial_kernel``):
      a channel's states on ``NSPLIT`` lanes walk the steps one by one, no group scan; ``SEG``
      steps per segment (0: automatic), segments chained by an end-state pass and a combine
      kernel. ``BLOCK_G``, ``BLOCK_R`` and ``COLS`` are then unused. ``BLOCK_D`` above
      ``32 * num_warps / NSPLIT`` (up to 4x) gives each thread that many channels, sub-blocks
      that share its B/C loads (``CPL``; opt-in, untimed). The CUDA default when
      ``ceil(N / NSPLIT) <= MAX_SERIAL_N`` and ``serial``; a config or tuned entry without
      ``SERIAL`` is a group-scan tile (``resolve_config``).
    - ``num_warps``, ``num_stages``: as usual.
    """
    if kind not in CONFIG_KEYS:
        raise ValueError(f"kind must be one of {sorted(CONFIG_KEYS)}, got {kind!r}")
    BN = next_pow2(N)
    if kind == "update":
        # mamba_ssm's hand-picked (BLOCK_SIZE_M, num_warps) by dstate
        if BN <= 16:
            return {"BLOCK_D": 32, "num_warps": 4}
        if BN <= 32:
            return {"BLOCK_D": 16, "num_warps": 4}
        if BN <= 64:
            return {"BLOCK_D": 8, "num_warps": 4}
        if BN <= 128:
            return {"BLOCK_D": 4, "num_warps": 4}
        return {"BLOCK_D": 4, "num_warps": 8}
    if device_type != "cuda" or interpreting():
        # the interpreter pays per operation, not per element: wide tiles, short loops
        cfg = {"BLOCK_D": min(next_pow2(dim), 16), "BLOCK_G": 4, "BLOCK_R": 8, "num_warps": 4,
               "num_stages": 1}  # fmt: skip
        if kind == "fwd":
            return {**cfg, "COLS": 1, "PREFETCH": 1, "SERIAL": 0, "NSPLIT": min(4, BN), "SEG": 0}
        return {**cfg, "PREFETCH": 1, "SEGMENTS": 1}
    # 8 groups of 16 steps (128-step chunks), one channel per thread. Picked offline from the
    # SASS of the column loop (about 14 instructions per (t, d, n) in the forward with one warp
    # per program; the backward costs about 39 with one warp and 50 with eight, but eight warps
    # cut its per-block dB/dC partial sums, batch * dim/BLOCK_D * N * L * 4 bytes each for
    # variable B/C, eightfold). The tuner refines both per GPU.
    if kind == "fwd":
        # group scan: two columns in flight and the next column's loads issued ahead; the
        # forward waits on load latency, not on the FMA chain (probe, H100, 2026-12-06: 1.52x)
        nsplit = min(4, BN)
        group = {"BLOCK_D": 4, "BLOCK_G": 8, "BLOCK_R": 16, "COLS": 2, "PREFETCH": 1,
                 "SERIAL": 0, "NSPLIT": nsplit, "SEG": 0, "num_warps": 1, "num_stages": 1}  # fmt: skip
        if not serial or cdiv(N, nsplit) > MAX_SERIAL_N:
            return group
        # serial family, 8 channels x 4 lanes per one-warp program: 0.527 ms against 0.676 for
        # the group scan (H100, anchor shape, 4k, launch level, 2026-12-07; mamba_ssm 0.603);
        # fwd with checkpoints + atomic bwd 2.60 against 2.67
        # (BLOCK_G, BLOCK_R, COLS) unused: the tuner's one canonical point for the family
        return {**group, "SERIAL": 1, "BLOCK_D": 32 // nsplit, "BLOCK_G": 2, "BLOCK_R": 4,
                "COLS": 1}  # fmt: skip
    # backward: 4 warps rather than 8 measured 1.12x faster (H100, anchor shape, L = 4096, fwd
    # with checkpoints + bwd: 5.65 vs 6.32 ms; bench/notes/selective_scan.md). One-warp
    # programs of 4 channels were faster still (4.60 ms) but multiply the variable-B/C partial
    # sums eightfold (4.3 GB at L = 16k); the tuner's memory rule excludes them too
    # (scanopt.autotune.spaces._scan_bwd_scratch_ok).
    # SEGMENTS: launches the backward is split into (1: one launch over the whole sequence)
    cfg = {"BLOCK_D": 32, "BLOCK_G": 8, "BLOCK_R": 16, "PREFETCH": 0, "SEGMENTS": 1,
           "num_warps": 4, "num_stages": 1}  # fmt: skip
    if not deterministic:
        # atomics remove the one-warp tile's partial sums: fwd with checkpoints + bwd 2.84 ms
        # against 4.81 for the tile above (H100, anchor shape, 4k, tenth session); same chunk
        cfg.update(BLOCK_D=4, num_warps=1)
    return cfg


def resolve_config(
    kind: str, config: dict | None, *, batch: int = 1, device: torch.device | None = None, **shape
) -> dict:
    """The launch config: ``default_config``, replaced by a tuned config for this GPU and shape
    bucket when the config store has one (``scanopt.autotune``), then updated with an explicit
    ``config``; unknown keys and bad sizes raise."""
    cfg = default_config(kind, **shape)
    if kind in ("fwd", "bwd") and device is not None and device.type == "cuda":
        dims = {"batch": batch, "dim": shape["dim"], "L": shape.get("L", 1), "N": shape["N"]}
        if kind == "fwd":
            # a tuned entry without SERIAL (tuned before the serial family existed) is a
            # group-scan tile: a -1 marker tells it from the default
            marked = {**cfg, "SERIAL": -1}
            got = tuned_config("selective_scan", kind, shape["dtype"], dims, marked, device=device)
            if got["SERIAL"] == -1:
                got["SERIAL"] = cfg["SERIAL"] if got == marked else 0
            cfg = got
        else:  # the backward's two modes are tuned apart (their best tiles differ)
            dims["atomic"] = int(not shape.get("deterministic", True))
            cfg = tuned_config("selective_scan", kind, shape["dtype"], dims, cfg, device=device)
    if config:
        unknown = set(config) - set(CONFIG_KEYS[kind])
        if unknown:
            raise ValueError(f"unknown selective_scan {kind} config keys: {sorted(unknown)}")
        if kind == "fwd" and "SERIAL" not in config:
            cfg["SERIAL"] = 0  # an explicit config without SERIAL names a group-scan tile
        cfg.update(config)
    for key in ("BLOCK_D", "BLOCK_G", "BLOCK_R"):
        if key in cfg and (cfg[key] < 1 or cfg[key] & (cfg[key] - 1)):
            raise ValueError(f"{key} must be a power of two, got {cfg[key]}")
    if "COLS" in cfg and cfg["COLS"] not in (1, 2):
        raise ValueError(f"COLS must be 1 or 2, got {cfg['COLS']}")
    if "PREFETCH" in cfg and cfg["PREFETCH"] not in (0, 1):
        raise ValueError(f"PREFETCH must be 0 or 1, got {cfg['PREFETCH']}")
    if "SERIAL" in cfg and cfg["SERIAL"] not in (0, 1):
        raise ValueError(f"SERIAL must be 0 or 1, got {cfg['SERIAL']!r}")
    if "NSPLIT" in cfg and cfg["NSPLIT"] not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"NSPLIT must be a power of two <= 32, got {cfg['NSPLIT']!r}")
    if "SEG" in cfg and (not isinstance(cfg["SEG"], int) or cfg["SEG"] < 0):
        raise ValueError(f"SEG must be a non-negative int (0: automatic), got {cfg['SEG']!r}")
    if "SEGMENTS" in cfg and (not isinstance(cfg["SEGMENTS"], int) or cfg["SEGMENTS"] < 1):
        raise ValueError(f"SEGMENTS must be a positive int, got {cfg['SEGMENTS']!r}")
    if "ATOMIC_BC" in cfg and cfg["ATOMIC_BC"] not in (0, 1, 2):
        raise ValueError(f"ATOMIC_BC must be 0, 1 or 2, got {cfg['ATOMIC_BC']!r}")
    if "BLOCK_R" in cfg and cfg["BLOCK_R"] < 2:
        raise ValueError(f"BLOCK_R must be at least 2, got {cfg['BLOCK_R']}")
    return cfg


def checkpoint_chunk(
    *, batch: int, dim: int, N: int, L: int, dtype, device: torch.device, deterministic: bool = True
) -> int:
    """Steps between two stored states (the backward's chunk) for this shape and backward
    mode."""
    cfg = resolve_config(
        "bwd", None, batch=batch, device=device, dim=dim, N=N, L=L, dtype=dtype,
        device_type=device.type, deterministic=deterministic,
    )  # fmt: skip
    return cfg["BLOCK_G"] * cfg["BLOCK_R"]


def _fit_chunk(cfg: dict, chunk: int) -> dict:
    """Shrink a forward config's chunk ``BLOCK_G * BLOCK_R`` until it divides the checkpoint
    chunk (a config tuned for inference may use longer chunks than training checkpoints).

    Every group given up is made good with channels (``BLOCK_D`` grows by the same factor), so
    the tile still fills every lane: a tuned ``BLOCK_D=1, BLOCK_G=32`` shrunk to 8 groups would
    otherwise leave 24 of 32 lanes holding copies."""
    g, r, bd = cfg["BLOCK_G"], cfg["BLOCK_R"], cfg["BLOCK_D"]
    while chunk % (g * r) and g > 1:
        g //= 2
        bd *= 2
    while chunk % (g * r) and r > 2:
        r //= 2
    return {**cfg, "BLOCK_D": bd, "BLOCK_G": g, "BLOCK_R": r}


def bc_layout(M: Tensor, dim: int) -> tuple[bool, int, int, tuple[int, int, int, int]]:
    """(variable, groups, channels per group, strides (b, g, n, l)) of a B or C argument.

    Fixed ``(dim, N)`` puts the dim stride in the ``g`` slot (the kernels index it by channel).
    """
    if M.dim() == 2:
        return False, 1, dim, (0, M.stride(0), M.stride(1), 0)
    if M.dim() == 3:
        return True, 1, dim, (M.stride(0), 0, M.stride(1), M.stride(2))
    G = M.shape[1]
    return True, G, dim // G, (M.stride(0), M.stride(1), M.stride(2), M.stride(3))


def _group_aligned_block(block_d: int, dim: int, *bcs: tuple) -> int:
    """Largest power of two <= block_d with every channel block inside one group of B and C."""
    for var, groups, cpg, _ in bcs:
        if var and groups > 1:
            block_d = min(block_d, cpg & -cpg)
    return block_d


def _opt_strides(t: Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def selective_scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    delta_softplus: bool,
    chunk: int,
    store_ckpt: bool,
    config: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel; returns ``(out, last_state, ckpt)``.

    ``out`` (batch, dim, L) in u's dtype, ``last_state`` (batch, dim, N) fp32, ``ckpt``
    (batch, ceil(L / chunk), N, dim) fp32: the state after every ``chunk``-th step (the last
    entry is the final state); ``(batch, 0, N, dim)`` when ``store_ckpt`` is False.
    """
    from scanopt.ops.selective_scan.kernels import selective_scan_fwd_kernel

    ensure_interpreter_compat()

    batch, dim, L = u.shape
    N = A.shape[1]
    cfg = resolve_config(
        "fwd", config, batch=batch, device=u.device, dim=dim, N=N, L=L, dtype=u.dtype,
        device_type=u.device.type,
    )  # fmt: skip
    nsplit = serial_split(cfg, N, u.element_size())
    if cfg.get("SERIAL") and cdiv(N, nsplit) <= MAX_SERIAL_N:
        if config or not (store_ckpt and chunk % serial_block(u.element_size())):
            return _fwd_serial(u, delta, A, B, C, D, z, delta_bias, initial_state,
                               delta_softplus, chunk, store_ckpt, cfg, nsplit)  # fmt: skip
        # a checkpoint chunk the serial blocks do not divide: the group scan, which fits any
        cfg = default_config("fwd", dim=dim, N=N, L=L, dtype=u.dtype, serial=False)
    if store_ckpt and not (config and {"BLOCK_G", "BLOCK_R"} <= set(config)):
        cfg = _fit_chunk(cfg, chunk)
    bcb, bcc = bc_layout(B, dim), bc_layout(C, dim)
    BD = _group_aligned_block(cfg["BLOCK_D"], dim, bcb, bcc)
    BL = cfg["BLOCK_G"] * cfg["BLOCK_R"]
    if store_ckpt and chunk % BL:
        raise ValueError(
            f"the forward's chunk BLOCK_G*BLOCK_R={BL} must divide the checkpoint chunk {chunk}"
        )
    n_ck = cdiv(L, chunk) if store_ckpt else 0
    out = empty((batch, dim, L), u.dtype, u.device)
    state = empty((batch, N, dim), torch.float32, u.device)
    ckpt = empty((batch, n_ck, N, dim), torch.float32, u.device)
    grid = (batch, cdiv(dim, BD))
    launch(selective_scan_fwd_kernel, grid,
        u, delta, A, B, C, D, z, delta_bias, initial_state, out, state, ckpt,
        dim, L, N, n_ck, bcb[2], bcc[2],
        *u.stride(), *delta.stride(), *_opt_strides(z, 3),
        *A.stride(), *bcb[3], *bcc[3],
        D.stride(0) if D is not None else 0,
        delta_bias.stride(0) if delta_bias is not None else 0,
        *_opt_strides(initial_state, 3),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), FAST_ACT=fast_act(delta),
        HAS_H0=initial_state is not None,
        B_VAR=bcb[0], C_VAR=bcc[0], STORE_CKPT=bool(store_ckpt),
        BLOCK_D=BD, BLOCK_G=cfg["BLOCK_G"], BLOCK_R=cfg["BLOCK_R"],
        CK=chunk if store_ckpt else BL, COLS=cfg.get("COLS", 1),
        PREFETCH=bool(cfg.get("PREFETCH", 0)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out, state.transpose(1, 2).contiguous(), ckpt


def fast_act(delta: Tensor) -> int:
    """The kernels' ``FAST_ACT``: for 16-bit delta, the softplus and sigmoid of
    ``kernels._softplus_fast`` and ``kernels._sigmoid`` (2 on a GPU, with lg2.approx and the
    approximate reciprocal; 1 in the interpreter, which lacks both); 0 (the exact ones) for
    fp32."""
    if delta.element_size() > 2:
        return 0
    return 1 if interpreting() else 2


def serial_block(esize: int) -> int:
    """Steps per block of the serial forward: 16 bytes of u (one vector load per lane)."""
    return max(2, 16 // esize)


def serial_split(cfg: dict, N: int, esize: int) -> int:
    """Lanes per channel in the serial forward (``NSPLIT``; default 4, fewer for N < 4; at
    most the block's steps, which the lanes share for the softplus and the gate)."""
    return min(int(cfg.get("NSPLIT", min(4, next_pow2(N)))), serial_block(esize))


def serial_segment(cfg: dict, *, batch: int, dim: int, L: int, block_t: int, nsplit: int) -> int:
    """Steps per segment of the serial forward: ``cfg["SEG"]`` rounded up to a multiple of
    ``block_t``, or (``SEG`` 0) just enough segments for ~1024 warps in all (8 per SM on a
    132-SM GPU; PASS 1 repeats a segment's exp2s, so no more than needed), at least 256 steps
    each."""
    seg = int(cfg.get("SEG", 0))
    if seg <= 0:
        n_seg = max(1, min(cdiv(1024 * 32, batch * dim * nsplit), cdiv(L, 256)))
        seg = cdiv(L, n_seg)
    return cdiv(seg, block_t) * block_t


def serial_lanes(cfg: dict, nsplit: int) -> int:
    """Channel lanes of a serial-family program: one channel per NSPLIT lanes."""
    return max(1, 32 * cfg["num_warps"] // nsplit)


def serial_channels(cfg: dict, nsplit: int, dim: int, bcb: tuple, bcc: tuple,
                    per_lane: int = 1) -> int:  # fmt: skip
    """Channels per program of the serial families: ``BLOCK_D``, at most ``per_lane`` channels
    per channel lane (``serial_lanes``), inside one group of B and C."""
    block = min(cfg["BLOCK_D"], serial_lanes(cfg, nsplit) * per_lane)
    return _group_aligned_block(block, dim, bcb, bcc)


def _bf16_pairs(M: Tensor, layout: tuple) -> bool:
    """Whether a variable bf16 B or C can be read as int32 words of two steps: L contiguous
    and even, every other stride and the data pointer even in elements (a fixed one is read
    per channel, as bf16)."""
    if not layout[0] or M.dtype != torch.bfloat16:
        return False
    strides = layout[3]  # (b, g, n, l)
    return (strides[3] == 1 and M.shape[-1] % 2 == 0 and all(x % 2 == 0 for x in strides[:3])
            and M.data_ptr() % 4 == 0)  # fmt: skip


def _fwd_serial(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk,
                store_ckpt, cfg, nsplit):  # fmt: skip
    """The serial forward family (``kernels.selective_scan_fwd_serial_kernel``); same results
    as :func:`selective_scan_fwd`."""
    from scanopt.ops.selective_scan.kernels import (
        selective_scan_fwd_combine_kernel,
        selective_scan_fwd_serial_kernel,
    )

    batch, dim, L = u.shape
    N = A.shape[1]
    dev = u.device
    f32 = torch.float32
    # 16 bytes of u per thread and load: the whole step block in one vector, in registers
    block_t = serial_block(u.element_size())
    if store_ckpt and chunk % block_t:
        raise ValueError(f"the checkpoint chunk {chunk} must be a multiple of {block_t}")
    bcb, bcc = bc_layout(B, dim), bc_layout(C, dim)
    # up to 4 channels per thread (CPL sub-blocks of one channel per NSPLIT lanes): they share
    # the thread's B/C loads and conversions
    BD = serial_channels(cfg, nsplit, dim, bcb, bcc, per_lane=4)
    cpl = max(1, BD // serial_lanes(cfg, nsplit))
    seg = serial_segment(cfg, batch=batch, dim=dim, L=L, block_t=block_t, nsplit=nsplit)
    n_seg = cdiv(L, seg)
    n_ck = cdiv(L, chunk) if store_ckpt else 0
    out = empty((batch, dim, L), u.dtype, dev)
    state = empty((batch, N, dim), f32, dev)
    ckpt = empty((batch, n_ck, N, dim), f32, dev)
    n_dblk = cdiv(dim, BD)
    pairs = _bf16_pairs(B, bcb) and _bf16_pairs(C, bcc)
    if pairs:  # B/C strides in int32 words
        bcb = (*bcb[:3], tuple(x // 2 for x in bcb[3][:3]) + (1,))
        bcc = (*bcc[:3], tuple(x // 2 for x in bcc[3][:3]) + (1,))
    common = dict(
        BC_PAIRS=pairs,
        N=N, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), B_VAR=bcb[0], C_VAR=bcc[0], BLOCK_D=BD // cpl, CPL=cpl,
        NSPLIT=nsplit,
        BLOCK_T=block_t, PREFETCH=bool(cfg.get("PREFETCH", 0)),
        FAST_ACT=fast_act(delta),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    strides = (
        *u.stride(), *delta.stride(), *_opt_strides(z, 3), *A.stride(), *bcb[3], *bcc[3],
        D.stride(0) if D is not None else 0,
        delta_bias.stride(0) if delta_bias is not None else 0,
    )  # fmt: skip
    hs = hend = dtsum = None
    hs_strides = (0, 0, 0, 0)
    if n_seg > 1:
        hend = empty((batch, n_seg - 1, N, dim), f32, dev)
        dtsum = empty((batch, n_seg - 1, dim), f32, dev)
        launch(selective_scan_fwd_serial_kernel, (n_dblk, n_seg - 1, batch),
            u, delta, A, B, C, D, z, delta_bias, None, hend, dtsum, out, state, ckpt,
            dim, L, seg, n_ck, chunk, bcb[2], bcc[2], *strides, *hs_strides,
            PASS=1, HAS_HS=False, STORE_CKPT=False, **common,
        )  # fmt: skip
        hs = empty((batch, n_seg, dim, N), f32, dev)
        launch(selective_scan_fwd_combine_kernel, (cdiv(dim, 128), batch),
            A, initial_state, hend, dtsum, hs, dim, N, n_seg, n_seg - 1, *A.stride(),
            *_opt_strides(initial_state, 3), HAS_H0=initial_state is not None, BLOCK_D=128,
            num_warps=4,
        )  # fmt: skip
        hs_strides = tuple(hs.stride())
    elif initial_state is not None:
        hs = initial_state  # (batch, dim, N): the one segment starts from it
        hs_strides = (initial_state.stride(0), 0, initial_state.stride(1),
                      initial_state.stride(2))  # fmt: skip
    launch(selective_scan_fwd_serial_kernel, (n_dblk, n_seg, batch),
        u, delta, A, B, C, D, z, delta_bias, hs, hend, dtsum, out, state, ckpt,
        dim, L, seg, n_ck, chunk if store_ckpt else block_t, bcb[2], bcc[2], *strides,
        *hs_strides, PASS=2, HAS_HS=hs is not None, STORE_CKPT=bool(store_ckpt), **common,
    )  # fmt: skip
    return out, state.transpose(1, 2).contiguous(), ckpt


def selective_scan_bwd(
    dout: Tensor,
    dlast: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    ckpt: Tensor,
    delta_softplus: bool,
    chunk: int,
    config: dict | None = None,
    *,
    deterministic: bool = True,
) -> dict[str, Tensor | None]:
    """Launch the backward kernel and reduce its partial sums (in a fixed order, so every run
    gives the same bits). Returns fp32 gradients keyed like the forward's arguments (``None``
    for an absent optional input); the caller casts them to the input dtypes.

    ``deterministic=False`` sums variable/grouped dB/dC by atomics (``ATOMIC_BC=1``, one launch)
    on the heuristic default's one-warp tile or a tuned tile; an explicit ``config`` key
    ``ATOMIC_BC`` wins either way. ``SERIAL=1`` (opt-in, untimed) takes the serial backward
    (``_bwd_serial``) where the states fit and the chunk is a multiple of its block; with
    variable B/C only when ``deterministic`` is False (its dB/dC sums are atomic).

    ``ckpt`` must come from :func:`selective_scan_fwd` with the same ``chunk``; the backward's
    chunk ``BLOCK_G * BLOCK_R`` is ``chunk`` (one of the two follows from the other when only one
    is given).
    """

    ensure_interpreter_compat()

    batch, dim, L = u.shape
    N = A.shape[1]
    cfg = resolve_config(
        "bwd", config, batch=batch, device=u.device, dim=dim, N=N, L=L, dtype=u.dtype,
        device_type=u.device.type, deterministic=deterministic,
    )  # fmt: skip
    if not deterministic and "ATOMIC_BC" not in (config or {}):
        cfg.update(ATOMIC_BC=1, SEGMENTS=1)
    if cfg["BLOCK_G"] * cfg["BLOCK_R"] != chunk:
        given = set(config or ()) & {"BLOCK_G", "BLOCK_R"}
        if len(given) == 2:
            raise ValueError(
                f"the backward's chunk BLOCK_G*BLOCK_R={cfg['BLOCK_G'] * cfg['BLOCK_R']} must "
                f"equal the checkpoint chunk {chunk}"
            )
        if "BLOCK_G" in given:
            cfg["BLOCK_R"] = max(2, chunk // cfg["BLOCK_G"])
        else:
            cfg["BLOCK_G"] = max(1, chunk // cfg["BLOCK_R"])
        if cfg["BLOCK_G"] * cfg["BLOCK_R"] != chunk:
            raise ValueError(f"the checkpoint chunk {chunk} does not split into BLOCK_G * BLOCK_R")
    n_ck = cdiv(L, chunk)
    if tuple(ckpt.shape) != (batch, n_ck, N, dim):
        raise ValueError(f"ckpt must have shape {(batch, n_ck, N, dim)}, got {tuple(ckpt.shape)}")
    bcb, bcc = bc_layout(B, dim), bc_layout(C, dim)
    dev = u.device
    f32 = torch.float32
    du = empty((batch, dim, L), u.dtype, dev)
    ddelta = empty((batch, dim, L), delta.dtype, dev)
    dz = empty((batch, dim, L), z.dtype, dev) if z is not None else None
    if cfg.get("SERIAL"):
        nsplit = serial_split(cfg, N, u.element_size())
        # variable B/C are summed over channels by atomics: only where those are allowed
        fits = cdiv(N, nsplit) <= MAX_SERIAL_N and chunk % serial_block(u.element_size()) == 0
        if fits and (not deterministic or not (bcb[0] or bcc[0])):
            return _bwd_serial(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state,
                               ckpt, delta_softplus, chunk, cfg, nsplit, bcb, bcc, du, ddelta,
                               dz)  # fmt: skip
    BD = _group_aligned_block(cfg["BLOCK_D"], dim, bcb, bcc)
    n_dblk = cdiv(dim, BD)
    BL = chunk
    # SEGMENTS > 1: one launch per segment of whole chunks, last segment first, each starting
    # from the checkpoint before it and the adjoint the later one left. Only the variable-B/C
    # partial sums scale with a launch's length, so they shrink by the segment count; du,
    # ddelta, dz and dB/dC come out bit-identical, the dA/dD/dbias sums in another order.
    # ATOMIC_BC (non-deterministic mode): variable dB/dC are added by atomics straight into
    # their (batch, groups, N, L) sums, so no partial buffer, no reduction and no segments
    atomic = int(cfg.get("ATOMIC_BC", 0)) if (bcb[0] or bcc[0]) else 0
    n_seg = 1 if atomic else max(1, min(int(cfg.get("SEGMENTS", 1)), n_ck))
    per_seg = cdiv(n_ck, n_seg)
    starts = list(range(0, n_ck, per_seg))
    segmented = len(starts) > 1
    adj_bufs = [empty((batch, N, dim), f32, dev) for _ in range(1 + segmented)]
    dB_full = dC_full = None
    if bcb[0] and segmented:
        dB_full = empty((batch, bcb[1], N, L), f32, dev)
    if bcc[0] and segmented:
        dC_full = empty((batch, bcc[1], N, L), f32, dev)
    sums: dict[str, Tensor] = {}
    adj = None
    for i, c0 in enumerate(reversed(starts)):
        c1 = min(n_ck, c0 + per_seg)
        l0, l1 = c0 * BL, min(L, c1 * BL)
        seg = slice(l0, l1)

        def cut(t: Tensor | None, seg: slice = seg) -> Tensor | None:
            # the segment's view of a (..., L) tensor (no views at all for one launch: the
            # backward's host path is part of every training step)
            return t[..., seg] if segmented and t is not None else t

        if c0 == 0:
            h0 = initial_state
        else:  # the state before chunk c0: checkpoint c0 - 1, viewed as (batch, dim, N)
            h0 = ckpt[:, c0 - 1].transpose(1, 2)
        later = dlast if i == 0 else adj.transpose(1, 2)  # (batch, dim, N) like dlast
        adj = adj_bufs[i % len(adj_bufs)]
        parts = _bwd_launch(
            cfg, BD, n_dblk, cut(dout), later, cut(u), cut(delta), A,
            cut(B) if bcb[0] else B, cut(C) if bcc[0] else C, D, cut(z), delta_bias, h0,
            ckpt[:, c0:] if segmented else ckpt, cut(du), cut(ddelta), cut(dz), adj,
            L_row=L, n_ck=c1 - c0, delta_softplus=delta_softplus,
            layouts=None if segmented else (bcb, bcc), atomic=atomic,
        )  # fmt: skip
        reduced = {
            "A": parts["dA"].sum((0, 2)),
            "D": parts["dD"].sum((0, 1)) if parts["dD"] is not None else None,
            "delta_bias": parts["dbias"].sum((0, 1)) if parts["dbias"] is not None else None,
        }
        for name, part, layout, M, full in (
            ("B", parts["dB"], bcb, B, dB_full), ("C", parts["dC"], bcc, C, dC_full)
        ):  # fmt: skip
            if not layout[0]:
                reduced[name] = part.sum((0, 2))
            elif atomic:  # already the (batch, groups, N, L) sum
                reduced[name] = part.view(M.shape)
            elif full is None:  # one launch: the whole length
                reduced[name] = _reduce_bc(part, M, layout, batch)
            else:
                full[..., seg].copy_(_reduce_bc_rows(part, layout, batch))
        for name, val in reduced.items():
            if val is not None:
                sums[name] = val if name not in sums else sums[name] + val
    dB = dB_full.view(B.shape) if dB_full is not None else sums["B"]
    dC = dC_full.view(C.shape) if dC_full is not None else sums["C"]
    return {
        "u": du,
        "delta": ddelta,
        "A": sums["A"].t().contiguous(),
        "B": dB if bcb[0] else dB.t().contiguous(),
        "C": dC if bcc[0] else dC.t().contiguous(),
        "D": sums.get("D"),
        "z": dz,
        "delta_bias": sums.get("delta_bias"),
        "initial_state": adj.transpose(1, 2).contiguous() if initial_state is not None else None,
    }


def _bwd_serial(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt,
                delta_softplus, chunk, cfg, nsplit, bcb, bcc, du, ddelta, dz):  # fmt: skip
    """The serial backward (``SERIAL=1``, ``kernels.selective_scan_bwd_serial_kernel``): one
    launch, variable dB/dC summed by atomics (not bit-reproducible), the rest in a fixed order.
    Writes ``du``, ``ddelta``, ``dz`` (allocated by the caller); same return as
    :func:`selective_scan_bwd`."""
    from scanopt.ops.selective_scan.kernels import selective_scan_bwd_serial_kernel

    batch, dim, L = u.shape
    N = A.shape[1]
    dev = u.device
    f32 = torch.float32
    block_t = serial_block(u.element_size())
    BD = serial_channels(cfg, nsplit, dim, bcb, bcc)
    n_dblk = cdiv(dim, BD)
    n_ck = cdiv(L, chunk)
    npt = cdiv(N, nsplit)
    dh0 = empty((batch, N, dim), f32, dev)
    dA = empty((batch, N, dim), f32, dev)

    def bc_buffer(layout: tuple) -> Tensor:
        if layout[0]:  # the sums themselves, added into zeros
            return torch.zeros((batch, layout[1], N, L), dtype=f32, device=dev)
        return empty((batch, N, dim), f32, dev)  # per batch row

    dB, dC = bc_buffer(bcb), bc_buffer(bcc)
    dD = empty((batch, dim), f32, dev) if D is not None else None
    dbias = empty((batch, dim), f32, dev) if delta_bias is not None else None
    # each program's block start states for one checkpoint chunk (written and read back by it)
    scratch = empty((batch, n_dblk, chunk // block_t, npt, BD * nsplit), f32, dev)
    ckpt = ckpt.contiguous()
    launch(selective_scan_bwd_serial_kernel, (n_dblk, batch),
        dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt, scratch,
        du, ddelta, dz, dh0, dA, dB, dC, dD, dbias,
        dim, L, n_ck, chunk, bcb[2], bcc[2], bcb[1], bcc[1],
        *dout.stride(), *u.stride(), *delta.stride(), *_opt_strides(z, 3),
        *A.stride(), *bcb[3], *bcc[3],
        D.stride(0) if D is not None else 0,
        delta_bias.stride(0) if delta_bias is not None else 0,
        *_opt_strides(initial_state, 3), *_opt_strides(dlast, 3),
        N=N, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), HAS_H0=initial_state is not None,
        HAS_DLAST=dlast is not None, B_VAR=bcb[0], C_VAR=bcc[0], BLOCK_D=BD, NSPLIT=nsplit,
        BLOCK_T=block_t, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return {
        "u": du,
        "delta": ddelta,
        "A": dA.sum(0).t().contiguous(),
        "B": dB.view(B.shape) if bcb[0] else dB.sum(0).t().contiguous(),
        "C": dC.view(C.shape) if bcc[0] else dC.sum(0).t().contiguous(),
        "D": dD.sum(0) if dD is not None else None,
        "z": dz,
        "delta_bias": dbias.sum(0) if dbias is not None else None,
        "initial_state": dh0.transpose(1, 2).contiguous() if initial_state is not None else None,
    }


def _bwd_launch(
    cfg: dict, BD: int, n_dblk: int, dout: Tensor, dlast: Tensor | None, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
    C: Tensor, D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None,
    h0: Tensor | None, ckpt: Tensor, du: Tensor, ddelta: Tensor, dz: Tensor | None,
    adj: Tensor, *, L_row: int, n_ck: int, delta_softplus: bool, layouts: tuple | None = None,
    atomic: int = 0,
) -> dict[str, Tensor | None]:  # fmt: skip
    """One backward launch over ``u.shape[-1]`` steps (the whole sequence or a segment: every
    (batch, dim, L) argument a view of it, ``L_row`` the outputs' row length, ``ckpt`` starting
    at its first chunk; ``layouts`` B's and C's ``bc_layout`` when they are not views).
    With ``atomic`` (1 or 2, the kernel's ``ATOMIC_BC``) variable dB/dC come back summed,
    ``(batch, groups, N, L)``. Returns its partial-sum buffers."""
    from scanopt.ops.selective_scan.kernels import selective_scan_bwd_kernel

    batch, dim, L = u.shape
    N = A.shape[1]
    dev = u.device
    f32 = torch.float32
    G, BL = cfg["BLOCK_G"], cfg["BLOCK_G"] * cfg["BLOCK_R"]
    bcb, bcc = layouts or (bc_layout(B, dim), bc_layout(C, dim))  # strides of the views
    dA = empty((batch, N, G, dim), f32, dev)

    def bc_buffer(layout: tuple) -> Tensor:
        if not layout[0]:  # fixed: per-thread partial sums
            return empty((batch, N, G, dim), f32, dev)
        if atomic:  # the sums themselves, added into zeros
            return torch.zeros((batch, layout[1], N, L), dtype=f32, device=dev)
        return empty((batch, n_dblk, N, L), f32, dev)  # per channel block

    dB, dC = bc_buffer(bcb), bc_buffer(bcc)
    dD = empty((batch, BL, dim), f32, dev) if D is not None else None
    dbias = empty((batch, BL, dim), f32, dev) if delta_bias is not None else None
    launch(selective_scan_bwd_kernel, (batch, n_dblk),
        dout, dlast, u, delta, A, B, C, D, z, delta_bias, h0, ckpt,
        du, ddelta, dz, adj, dA, dB, dC, dD, dbias,
        dim, L, L_row, N, n_ck, ckpt.stride(0), bcb[2], bcc[2],
        *dout.stride(), *u.stride(), *delta.stride(), *_opt_strides(z, 3),
        *A.stride(), *bcb[3], *bcc[3],
        D.stride(0) if D is not None else 0,
        delta_bias.stride(0) if delta_bias is not None else 0,
        *_opt_strides(h0, 3), *_opt_strides(dlast, 3),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), FAST_ACT=fast_act(delta),
        HAS_H0=h0 is not None,
        HAS_DLAST=dlast is not None, B_VAR=bcb[0], C_VAR=bcc[0],
        BLOCK_D=BD, BLOCK_G=G, BLOCK_R=cfg["BLOCK_R"], PREFETCH=bool(cfg.get("PREFETCH", 0)),
        ATOMIC_BC=atomic, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return {"dA": dA, "dB": dB, "dC": dC, "dD": dD, "dbias": dbias}


def _reduce_bc(part: Tensor, M: Tensor, layout: tuple, batch: int) -> Tensor:
    """Sum a dB/dC partial buffer back to the argument's own shape (fp32)."""
    if not layout[0]:
        return part.sum((0, 2)).t().contiguous()  # (batch, N, G, dim) -> (dim, N)
    return _reduce_bc_rows(part, layout, batch).view(M.shape)


def _reduce_bc_rows(part: Tensor, layout: tuple, batch: int) -> Tensor:
    """Variable B/C: (batch, n_dblk, N, L) partials -> (batch, groups, N, L), summing the
    channel blocks of each group."""
    groups = layout[1]
    n_dblk, N, L = part.shape[1:]
    return part.view(batch, groups, n_dblk // groups, N, L).sum(2)


#: element offsets at or above this need 64-bit index arithmetic in the decode-step kernel
_INT32_LIMIT = 2**31


def _wide(*tensors: Tensor | None) -> bool:
    """True when some tensor's last element lies ``_INT32_LIMIT`` or more elements past its start
    (``sum(size * stride)`` bounds it): its offsets would overflow 32-bit arithmetic."""
    return any(
        t is not None and sum(map(operator.mul, t.shape, t.stride())) >= _INT32_LIMIT
        for t in tensors
    )


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    state_batch_indices: Tensor | None,
    config: dict | None = None,
) -> Tensor:
    """Launch the decode step on head-layout views (state (b_state, H, dim, N), x/dt/z
    (batch, H, dim), A (H, dim, N), B/C (batch, G, N), D/dt_bias (H, dim)); updates ``state``
    in place and returns out (batch, H, dim) in x's dtype."""
    from scanopt.ops.selective_scan.kernels import selective_state_update_kernel

    ensure_interpreter_compat()

    batch, nheads, dim = x.shape
    N = state.shape[-1]
    cfg = resolve_config("update", config, dim=dim, N=N, dtype=x.dtype)
    BD = min(cfg["BLOCK_D"], next_pow2(dim))
    out = empty((batch, nheads, dim), x.dtype, x.device)
    dim_first = batch <= _GRID_YZ_MAX
    grid = (cdiv(dim, BD), nheads, batch) if dim_first else (batch, nheads, cdiv(dim, BD))
    launch(selective_state_update_kernel, grid,
        state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out,
        nheads, dim, N, nheads // B.shape[1],
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *_opt_strides(D, 2), *_opt_strides(z, 3), *_opt_strides(dt_bias, 2), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), HAS_IDX=state_batch_indices is not None,
        BLOCK_D=BD, BLOCK_N=next_pow2(N), DIM_FIRST=dim_first,
        WIDE=_wide(state, x, dt, z, out),  # A, B, C, D, dt_bias: (heads, dim, N) at most
        FAST_ACT=fast_act(dt) if x.element_size() <= 2 else 0,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out
