"""Code shared by the WKV-6 and WKV-7 ops (and wkv4's launcher): argument checks, launch
configs, the checkpoint chunk and input generators for tests / ``self_check``.

Nothing here imports Triton at import time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from scanopt._tensor import FLOAT_DTYPES, check_tensor

#: largest key head size the fused-recurrent kernels hold in registers (state tile [K, BV])
MAX_K = 256


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


#: steps between stored state checkpoints (forward -> backward). The chunked backward walks
#: 16-step pieces with their states in registers, so checkpoints are always 16 steps apart.
CKPT_CHUNK = 16


def default_chunk(T: int, K: int, V: int) -> int:
    """Steps between stored state checkpoints: ``CKPT_CHUNK`` (checkpoint memory is
    ``B * H * ceil(T / 16) * K * V * 4`` bytes, RWKV-LM's CUDA kernel stores the same)."""
    return CKPT_CHUNK


def num_chunks(T: int, chunk: int) -> int:
    return (T + chunk - 1) // chunk


def cdiv(x: int, y: int) -> int:
    return (x + y - 1) // y


#: the keys every launch config holds, per direction (the tuner's search space is over these)
CONFIG_KEYS = {
    "fwd": ("MODE", "CHUNK", "BT", "BV", "BW", "SW", "PF", "KS", "num_warps", "num_stages"),
    "bwd": ("MODE", "BT", "BV", "BW", "SW", "CARRY", "DPASS", "PF", "num_warps", "num_stages"),
}
MODES = ("recurrent", "chunked", "tc")


def direction_config(config: dict, direction: str) -> dict:
    """The keys of ``config`` that ``direction``'s launches take (``CONFIG_KEYS``): one config
    written for both directions, split (``CHUNK`` is the forward's, ``CARRY`` the backward's)."""
    return {k: v for k, v in config.items() if k in CONFIG_KEYS[direction]}


#: tl.dot input precision of the tensor-core ("tc") kernels: 3-pass tf32 (about fp32). One-pass
#: tf32 rounds the fp32 decay-scaled operands to 2^-11, ~1e-4 relative in the fp32 final state
#: and dh0, over the verify limit there (2x the fp32 PyTorch path's error, at least 4e-6)
TC_PRECISION = {torch.bfloat16: "tf32x3", torch.float16: "tf32x3"}


def block_precision(r: torch.Tensor, w: torch.Tensor) -> str:
    """tl.dot precision of the tc kernels whose every result is in the inputs' dtype (WKV-6's
    output kernel, both ops' block-gradient kernels): one-pass tf32 when r and w are bf16 (exact
    on bf16 operands, ~1e-4 on the fp32 ones, under bf16's budget; 3-pass spills there, sm_90,
    K = V = 64), else ``TC_PRECISION`` (fp16 inputs, or an fp32 w whose gradient has fp32
    limits). The final state and dh0 always take ``TC_PRECISION``."""
    return "tf32" if r.dtype == w.dtype == torch.bfloat16 else TC_PRECISION[r.dtype]


def factor_pairs(w: torch.Tensor) -> bool:
    """Whether the tc kernels may take a block's pair factors exp(g_t - g_j) as products
    exp(g_t) exp(-g_j) (tensor-core products instead of [16, 16, K] tiles of exponentials) in
    blocks whose total decay is bounded (``_tc_helpers.FACTOR_LIMIT``): for a bf16 / fp16 ``w``.
    An fp32 ``w`` keeps the exact pairwise path everywhere: its dw has fp32 limits, and the
    products carry ~|g| 2^-24 of relative error in the one-step factors that dominate dw under
    strong decay."""
    return w.dtype != torch.float32


def block_paths(w: torch.Tensor) -> tuple[int, ...]:
    """The ``PATH`` values to launch a tc block kernel with (one launch each; a block runs in
    exactly one): 1 (bounded-decay blocks, factored pairs) and 2 (the others, exact pairs) where
    :func:`factor_pairs` allows, else 0 (every block, exact pairs)."""
    return (1, 2) if factor_pairs(w) else (0,)


def mode_applies(mode: str, dtype: torch.dtype) -> bool:
    """False for the tensor-core kernels on fp32 inputs (their log-space exponents are not
    fp32-exact); every other family takes every dtype."""
    return not (mode == "tc" and dtype == torch.float32)


def default_config(
    direction: str,
    *,
    T: int,
    K: int,
    V: int,
    dtype: torch.dtype,
    mode: str | None = None,
    op: str | None = None,
    w_dtype: torch.dtype | None = None,
) -> dict:
    """Heuristic launch config of the WKV-6/7 kernels (for ``mode``, or the default mode;
    ``w_dtype``, the log decay's dtype, takes part in choosing it).

    - ``MODE``: ``"recurrent"`` (one program per (batch, head, V-block) walks all of T; the
      backward recomputes each checkpointed piece into a global work space) or ``"chunked"``
      (chunks of ``BT`` steps run in parallel; only the state passing between chunks is serial;
      the backward keeps its states in registers). Chunked needs ``K <= 128``. Both are verified on a
      GPU; measured on an H100 (2026-12-05) recurrent is faster except WKV-6's forward, so the
      default is ``"recurrent"`` and, for ``op="wkv6"``'s forward from ``T >= 256``, ``"chunked"``.
    - ``CHUNK`` (forward only): steps between stored state checkpoints (16 for the chunked
      backward); the backward takes the chunk the checkpoints were written with.
    - ``BT`` (chunked): steps per chunk, a multiple of 16.
    - ``BV``: width of the V-block one program owns (its transposed state tile ``[BV, BK]``
      fp32 lives in registers). With ``BV < V`` the backward writes fp32 partial sums over
      V-blocks for the K-side gradients and adds them afterwards (extra memory traffic).
    - ``"tc"`` (bf16/fp16 inputs, ``K <= 128``): tensor-core kernels over 16-step blocks with
      pairwise decay factors (WKV-6's forward output kernel takes chunks of ``BT`` steps in
      16-step sub-chunks); the backward works block by block from the forward's 16-step
      checkpoints and the state cotangents of a serial reverse pass (WKV-6: every ``BT``
      steps, each block carrying its chunk's cotangent back itself; its forward's serial pass
      also walks ``BT`` steps and the output kernel writes the checkpoints). The default for
      ``op`` WKV-6 / WKV-7 with bf16/fp16 inputs and a bf16/fp16 ``w`` (K <= 128; WKV-7's
      forward keeps the recurrent kernel, faster there, whose checkpoints it reads) since the
      rework of 2026-12-07 (factored pair products in blocks of bounded decay, serial passes
      per ``BT``-step chunk): H100, fwd+bwd 2.3-2.5x faster than the recurrent default for
      WKV-6 at 1k-16k, ~1.45x for WKV-7 at 4k.
    - ``BW`` (chunked): columns per program of the chunk-transition kernel; (tc) the V-block of
      the serial state / cotangent passes.
    - ``SW`` (tc): warps of the serial state / cotangent passes (``num_warps`` is the parallel
      kernels'): their tiles are ``[K, BW]``, much smaller than the block kernels'.
    - ``CARRY`` (WKV-6 tc backward; 0 or 1): 1 runs one program per ``BT``-step chunk that walks
      its 16-step blocks last to first and carries the state cotangent back through them,
      instead of one program per block that forms it again from the chunk's later rows (0, the
      default: 1 was 1.18x / 1.16x slower in the backward on an H100 at 4k / 16k, 2026-12-07).
    - ``DPASS`` (tc backward; 0 or 1): 1 has a decay pass write each 16-step block's log
      decays (fp32, ``2 * B * H * T * K * 4`` bytes) for the gradient kernel to read, instead of
      a scan, row shifts and a reduction per block inside it (WKV-6, sm_90a: 1.2 KB -> 0.4 KB of
      spills at 4 warps). WKV-6's default since 2026-12-07 (H100, bf16, B 4, H 32, K 64:
      backward 1.24x / 1.27x faster at 4k / 16k); WKV-7's since the eleventh session (same
      GPU and shape, 4k: backward 7.73 -> 6.89 ms, 1.12x). WKV-7's 2 (opt-in, untimed): the
      bprep kernel and the serial cotangent passes read the same rows too.
    - ``PF``: steps of inputs the serial loops keep in flight (prefetch queue depth; the
      recurrent loops are unrolled by PF so each queue slot keeps its register), 1..16; the
      recurrent backward, unrolled over the checkpointed pieces, uses gcd(PF, CHUNK).
    - ``num_warps``: 1 keeps every reduction over K inside a warp, so the loops have no
      barriers; ``num_stages`` has no effect on these loops. (tc: the block kernels' warps.)

    Defaults were checked to compile for sm_90 without register spills (ptxas through
    ``triton.compile``); the timing-based choice is the tuner's.
    """
    if direction not in CONFIG_KEYS:
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    BK = max(16, next_pow2(K))
    if mode is None:
        # both families are verified on a GPU (H100, 2026-12-05); the recurrent one is faster
        # except for WKV-6's forward, which resolve_config switches to chunked from T >= 256
        mode = "recurrent"
        if (
            op in ("wkv6", "wkv7")
            and dtype in (torch.bfloat16, torch.float16)
            and w_dtype in (torch.bfloat16, torch.float16)
            and K <= 128
        ):
            # H100, 2026-12-07 (bench/notes/wkv6.md, wkv7.md; bf16, B 4, H 32, K = V = 64):
            # the reworked tc kernels (factored pairs, chunked serial passes) took 0.41-0.44x
            # the default's fwd+bwd time for WKV-6 at 1k / 4k / 16k and ~0.68x for WKV-7 at 4k
            # (profiler kernel sums). An fp32 w keeps the exact pairwise tc path, not timed
            mode = "tc"
            if op == "wkv7" and direction == "fwd":
                # H100, 2026-12-07 (wkv7.md, ninth session): the recurrent forward is faster
                # than the tc one (five latency-bound block kernels) and writes the same
                # 16-step checkpoints the tc backward reads
                mode = "recurrent"
        elif op == "wkv6" and direction == "fwd" and T >= 256 and K <= 128:
            # H100, 2026-12-05 (bench/notes/wkv6.md): the chunked forward took 0.61 / 0.57 /
            # 0.57x the recurrent one's time at T = 1k / 4k / 16k; WKV-7's chunked forward is
            # slower (its chunk transition is a K x K product), the recurrent backward wins
            mode = "chunked"
    if mode == "tc":
        # one program per (chunk, batch-head) holds the whole V (no recomputed intra-chunk A);
        # the serial state pass takes 16-wide V-blocks for parallelism (the dot's minimum)
        cfg = {
            "MODE": mode,
            "BT": 64,
            # whole V up to 64: a narrower block recomputes the intra-block matrices (the exps)
            # per V-block, and in WKV-6's backward adds fp32 partial sums over V. sm_90 (ptxas,
            # 3-pass tf32 dots, K = V = 64): WKV-6's output / gradient kernels spill 112 / 72 B
            # at BV = 64 (76 / 0 at 32); WKV-7's output kernel none. Timing decides (tuner).
            "BV": min(max(next_pow2(V), 16), 64),
            # H100, 4k, 2026-12-07: the serial passes' V-block and warps, fwd+bwd 1.28x (WKV-6,
            # 32 x 4) and 1.28x (WKV-7, 64 x 8) faster than 16 x 8; the block kernels' 4 warps
            # another 1.07x (WKV-6) and 1.63x (WKV-7: two programs per SM; its exact path
            # spills ~1 KB there, only blocks of strong decay take it)
            "BW": 32 if op == "wkv6" else 64,
            "SW": 4 if op == "wkv6" else 8,
            "PF": 1,
            "num_warps": 4,
            "num_stages": 2,
        }
        if direction == "fwd":
            cfg["CHUNK"] = default_chunk(T, K, V)
            if op == "wkv7":
                cfg["KS"] = 0
        else:
            # H100, 2026-12-07: the decay pass, WKV-6 bwd 3.94 -> 3.17 ms (4k), 15.8 -> 12.5
            # (16k); WKV-7 bwd 7.73 -> 6.89 (4k, eleventh session)
            cfg["CARRY"], cfg["DPASS"] = 0, 1
            if op == "wkv6":
                # H100, 4k, tenth session: 32-step chunks for the backward's serial pass, bwd
                # 3.19 -> 3.01 ms (16: 3.14, 128: 4.03); each 16-step block program carries its
                # chunk's cotangent over fewer later rows (the forward keeps 64: 1.13 vs 1.18)
                cfg["BT"] = 32
        return cfg
    if mode == "chunked" and direction == "bwd":
        # throughput-bound: whole V per program (no fp32 partial sums over V-blocks), the
        # V-reductions then cross warps
        BV = min(max(next_pow2(V), 16), 64 if BK <= 64 else 32)
        num_warps = 1 if BV * BK <= 1024 else min(16, BV * BK // 512)
    else:
        # latency-bound serial loops: one warp, no barriers. The forward takes BV = 8 (twice the
        # programs to overlap each other's load latency, no partial sums to pay for); the
        # backward keeps 16 (each halving of BV doubles its fp32 partial-sum traffic). Both
        # compile for sm_90 without spills at their PF (ptxas -v, K = 64).
        BV = 8 if direction == "fwd" and BK <= 64 else 16
        num_warps = 1 if BK <= 64 else 2
    cfg = {
        "MODE": mode,
        "BT": 64,
        "BV": BV,
        "BW": 16,
        "SW": num_warps,  # tc only
        "PF": 4 if direction == "fwd" else 2,
        "num_warps": num_warps,
        "num_stages": 1,
    }
    if direction == "fwd":
        cfg["CHUNK"] = default_chunk(T, K, V)
        if op == "wkv7":
            # WKV-7's split-K recurrent forward (``KS`` values of K per thread, K / KS lane
            # groups; 0: K across the lanes). H100, bf16, B 4, H 32, K = V = 64, 4k (thirteenth
            # session, wkv7.md): forward 3.39 -> 2.08 ms at KS 8 / BV 8 (BV 4: 2.57, 16: 2.85).
            # K > 64 keeps 0: its two-warp programs would split the lane groups across warps
            # (sm_90a, K 128: 128 barriers and 152 B of spills per block); untimed
            cfg["KS"] = 8 if BK <= 64 else 0
    else:
        cfg["CARRY"] = cfg["DPASS"] = 0
    return cfg


#: resolve_config's cache (also cleared by ``scanopt.autotune.store.clear_cache``)
_RESOLVED: dict[tuple, dict] = {}
#: op -> (MODE, config overrides) the launches default to inside :func:`forced_mode`
_FORCED: dict[str, tuple[str, dict]] = {}


@contextlib.contextmanager
def forced_mode(op: str, mode: str, **overrides: int) -> Iterator[None]:
    """Inside the block, launches of ``op`` (``"wkv6"`` / ``"wkv7"``) that do not name a
    ``MODE`` use ``mode`` in both directions, where the dtype allows it (``"tc"`` skips fp32
    inputs), instead of the default or tuned one: how ``scanopt bench`` times one kernel family
    through the public op. ``overrides`` (config keys, e.g. ``BW=32``) go on top of that family's
    default config in both directions. Not thread-safe; the resolved-config cache is dropped on
    entry and exit."""
    if mode not in MODES:
        raise ValueError(f"{op}: MODE must be one of {MODES}, got {mode!r}")
    unknown = set(overrides) - set(CONFIG_KEYS["fwd"]) - set(CONFIG_KEYS["bwd"])
    if unknown:
        raise ValueError(f"{op}: unknown config keys {sorted(unknown)}")
    before = _FORCED.get(op)
    _FORCED[op] = (mode, overrides)
    _RESOLVED.clear()
    try:
        yield
    finally:
        if before is None:
            _FORCED.pop(op, None)
        else:
            _FORCED[op] = before
        _RESOLVED.clear()


def resolve_config(
    op: str,
    direction: str,
    config: dict | None,
    *,
    T: int,
    K: int,
    V: int,
    dtype: torch.dtype,
    B: int | None = None,
    H: int | None = None,
    device: torch.device | None = None,
    w_dtype: torch.dtype | None = None,
) -> dict:
    """``default_config`` (for the requested ``MODE``, if any), replaced by a tuned config for
    this GPU and shape bucket when ``B``, ``H`` and ``device`` are given and the config store
    has one (``scanopt.autotune``, op ``"wkv6"``/``"wkv7"``, shape ``{B, T, H, K, V}``;
    consulted where the kernels run: CUDA, or the CPU under the interpreter), then updated with
    ``config``; unknown keys and bad values raise.

    Cached per arguments: a dict access after the first call. The returned dict is shared;
    callers must not mutate it.
    """
    if torch.compiler.is_compiling():
        return _resolve(op, direction, config, T, K, V, dtype, B, H, device, w_dtype)
    items = tuple(sorted(config.items())) if config else None
    key = (op, direction, items, T, K, V, dtype, B, H, device, w_dtype)
    cfg = _RESOLVED.get(key)
    if cfg is None:
        cfg = _RESOLVED[key] = _resolve(
            op, direction, config, T, K, V, dtype, B, H, device, w_dtype
        )
    return cfg


def launch_config(
    op: str, direction: str, config: dict | None, r: torch.Tensor, w: torch.Tensor, v: torch.Tensor
) -> dict:
    """:func:`resolve_config` for a launch on ``r`` ``[B, T, H, K]``, log decays ``w`` and values
    ``v`` ``[B, T, H, V]``: shapes, dtypes and device read off the tensors."""
    B, T, H, K = r.shape
    return resolve_config(
        op, direction, config, T=T, K=K, V=v.shape[-1], dtype=r.dtype, B=B, H=H,
        device=r.device, w_dtype=w.dtype,
    )  # fmt: skip


def _resolve(op, direction, config, T, K, V, dtype, B, H, device, w_dtype=None) -> dict:
    from scanopt._env import interpreting
    from scanopt.autotune import resolve_config as tuned_config
    from scanopt.autotune.store import register_launch_cache

    register_launch_cache(_RESOLVED)
    mode = (config or {}).get("MODE")
    forced, overrides = _FORCED.get(op, (None, {}))
    if mode is None and forced is not None and mode_applies(forced, dtype):
        mode = forced
        config = {**direction_config(overrides, direction), **(config or {})}
        config["MODE"] = forced
    if mode is not None and mode not in MODES:
        raise ValueError(f"{op} {direction} config: MODE must be one of {MODES}, got {mode!r}")
    cfg = default_config(direction, T=T, K=K, V=V, dtype=dtype, mode=mode, op=op, w_dtype=w_dtype)
    if device is not None and B is not None and H is not None:
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            shape = {"B": B, "T": T, "H": H, "K": K, "V": V}
            tuned = tuned_config(op, direction, dtype, shape, cfg, device=device)
            tuned_mode = tuned.get("MODE", cfg["MODE"])
            usable = tuned_mode in MODES and mode_applies(tuned_mode, dtype)
            # a tuned config may pick the family when none was asked for; an explicit MODE
            # (tests, forced_mode, the tuner's own trials) only takes tuned configs of that MODE
            if usable and (mode is None or tuned_mode == cfg["MODE"]):
                cfg = tuned
    if config:
        unknown = set(config) - set(CONFIG_KEYS[direction])
        if unknown:
            raise ValueError(f"unknown {op} {direction} config keys: {sorted(unknown)}")
        cfg.update(config)
    if not 1 <= cfg["PF"] <= 16:
        raise ValueError(f"{op} {direction} config: PF must be in 1..16, got {cfg}")
    if not 1 <= cfg["SW"] <= 16:
        raise ValueError(f"{op} {direction} config: SW must be in 1..16, got {cfg}")
    for key in ("BV", "CHUNK", "BT", "BW", "SW"):
        if key in cfg and (cfg[key] < 1 or cfg[key] & (cfg[key] - 1)):
            raise ValueError(f"{op} {direction} config: {key} must be a power of two, got {cfg}")
    if cfg["MODE"] not in MODES:
        raise ValueError(f"{op} {direction} config: MODE must be one of {MODES}, got {cfg}")
    for key in ("CARRY", "DPASS"):  # tc backward switches (CARRY: WKV-6's alone)
        allowed = (0, 1, 2) if key == "DPASS" and op == "wkv7" else (0, 1)
        if cfg.get(key, 0) not in allowed:
            want = "0, 1 or 2" if len(allowed) == 3 else "0 or 1"
            raise ValueError(f"{op} {direction} config: {key} must be {want}, got {cfg}")
        if cfg.get(key, 0) and key == "CARRY" and (op != "wkv6" or cfg["MODE"] != "tc"):
            raise ValueError(f"{op} {direction} config: CARRY 1 is WKV-6's tc backward's: {cfg}")
        if cfg.get(key, 0) and cfg["MODE"] != "tc":
            raise ValueError(f"{op} {direction} config: {key} 1 is the tc backward's: {cfg}")
    if cfg["MODE"] in ("chunked", "tc"):
        mode = cfg["MODE"]
        if K > 128:
            raise ValueError(f"{op} {direction} config: MODE {mode!r} needs K <= 128, got {K}")
        if cfg["BT"] < 16 or cfg["BT"] % 16:
            raise ValueError(f"{op} {direction} config: {mode} needs BT a multiple of 16: {cfg}")
        if direction == "fwd" and cfg["BT"] % cfg["CHUNK"]:
            raise ValueError(f"{op} fwd config: BT must be a multiple of CHUNK, got {cfg}")
    if cfg["MODE"] == "tc":
        if not mode_applies("tc", dtype):
            raise ValueError(
                f"{op} {direction} config: MODE 'tc' takes bf16/fp16 inputs (its log-space decays are "
                f"not fp32-exact), got {dtype}"
            )
        if cfg["BV"] < 16 or cfg["BW"] < 16 or cfg.get("CHUNK", 16) < 16:
            raise ValueError(
                f"{op} {direction} config: tc needs BV, BW, CHUNK >= 16 (tl.dot), got {cfg}"
            )
    return cfg


def check_inputs(
    names: Sequence[str],
    tensors: Sequence[object],
    value_name: str = "v",
) -> tuple[int, int, int, int, int]:
    """Validate ``[B, T, H, K]`` inputs (all named ones) and ``v`` ``[B, T, H, V]``.

    The first name is the reference tensor. Every tensor must be a float tensor on the same
    device; all but ``w`` must share one dtype (``w``, the log decay, may be kept in fp32).
    Returns ``(B, T, H, K, V)``.
    """
    ref_name, ref = names[0], tensors[0]
    check_tensor(ref_name, ref, ndim=4, dtypes=FLOAT_DTYPES)
    assert isinstance(ref, torch.Tensor)
    B, T, H, K = ref.shape
    V = None
    for name, t in zip(names, tensors, strict=True):
        if name == value_name:
            check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES, device=ref.device)
            assert isinstance(t, torch.Tensor)
            if tuple(t.shape[:3]) != (B, T, H):
                raise ValueError(
                    f"{name} must have shape ({B}, {T}, {H}, V) [B, T, H, V] like {ref_name}, "
                    f"got {tuple(t.shape)}"
                )
            V = t.shape[3]
        else:
            check_tensor(name, t, shape=(B, T, H, K), dtypes=FLOAT_DTYPES, device=ref.device)
        assert isinstance(t, torch.Tensor)
        if name != "w" and t.dtype != ref.dtype:
            raise TypeError(
                f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype} "
                "(only w, the log decay, may differ)"
            )
    assert V is not None
    if not 1 <= K <= MAX_K:
        raise ValueError(f"{ref_name}: head size K must be in [1, {MAX_K}], got {K}")
    if V < 1:
        raise ValueError(f"{value_name}: head size V must be >= 1, got {V}")
    return B, T, H, K, V


def check_state(
    name: str, t: object, B: int, H: int, K: int, V: int, device: torch.device
) -> torch.Tensor | None:
    """``None`` or a float ``[B, H, K, V]`` state on ``device``."""
    if t is None:
        return None
    return check_tensor(name, t, shape=(B, H, K, V), dtypes=FLOAT_DTYPES, device=device)


def resolve_scale(scale: float | None, K: int) -> float:
    """fla's convention: ``None`` means ``K ** -0.5``; RWKV itself uses 1.0 (our default)."""
    return K**-0.5 if scale is None else float(scale)


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will need the backward of an op taking these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def cast_grad(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return g if g.dtype == like.dtype else g.to(like.dtype)


# --------------------------------------------------------------------------------------------
# inputs for tests, self_check and benchmarks


def log_decay(
    shape: Sequence[int], kind: str, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Log decays ``w <= 0`` of one of these kinds:

    - ``"rwkv7"``: RWKV-LM's clamp, ``-exp(-0.5) * sigmoid(x)`` in (-0.607, 0);
    - ``"rwkv6"``: fla's test distribution, ``logsigmoid(x)``;
    - ``"weak"``: in (-0.05, 0), decay close to 1 (long memory);
    - ``"strong"``: in (-20, -14), decay down to 2e-9 (breaks ``exp(-cumsum)`` factorizations);
    - ``"mixed"``: each channel picks one of the above.
    """
    x = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float64)
    kinds = {
        "rwkv7": -math.exp(-0.5) * torch.sigmoid(x),
        "rwkv6": torch.nn.functional.logsigmoid(x),
        "weak": -0.05 * u,
        "strong": -14.0 - 6.0 * u,
    }
    if kind == "mixed":
        pick = torch.randint(0, len(kinds), tuple(shape), generator=generator)
        w = torch.zeros(tuple(shape), dtype=torch.float64)
        for i, value in enumerate(kinds.values()):
            w = torch.where(pick == i, value, w)
    elif kind in kinds:
        w = kinds[kind]
    else:
        raise ValueError(f"unknown decay kind {kind!r}; known: {', '.join(kinds)}, mixed")
    return w.clamp(max=0.0).to(dtype)


def self_check_reports(
    op: str,
    make_inputs: Callable[..., dict],
    check_case: Callable[..., object],
    device: str,
    quick: bool,
) -> list:
    """``scanopt verify`` for ``op`` (``"wkv6"`` / ``"wkv7"``, with that op's ``make_inputs`` and
    ``check_case``): fp32 on the CPU, bf16/fp16/fp32 on a GPU, each half-precision case again
    with the tensor-core kernels forced, and on the CPU one fp16 case of those (the interpreter
    cannot do bf16 arithmetic). Returns the :class:`scanopt.verify.Report` list."""
    own_decay = op.replace("wkv", "rwkv")  # the op's own decay distribution
    on_gpu = device.startswith("cuda")
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if on_gpu else [torch.float32]
    if quick:
        cases = [(1, 33, 2, 16, own_decay, True)]
    else:
        cases = [
            (2, 17, 2, 16, "strong", True),
            (1, 100, 2, 16, "weak", False),
            (1, 65, 1, 64, "mixed", True),
        ]
        if on_gpu:
            cases.append((1, 2048, 2, 64, own_decay, True))
    reports = []
    for dtype in dtypes:
        for B, T, H, K, decay, h0 in cases:
            w_dtype = torch.float32 if dtype == torch.float16 else dtype
            inputs = make_inputs(
                B, T, H, K, dtype=dtype, device=device, decay=decay, w_dtype=w_dtype,
                initial_state=h0, seed=T,
            )  # fmt: skip
            case = f"B{B}-T{T}-H{H}-K{K}-{decay}-h0={h0}-{str(dtype).replace('torch.', '')}"
            reports.append(check_case(inputs, case))
            if dtype != torch.float32:  # the opt-in tensor-core kernels too
                with forced_mode(op, "tc"):
                    reports.append(check_case(inputs, case + "-tc"))
    if not on_gpu:  # the interpreter cannot do bf16 arithmetic: the tensor-core kernels in fp16
        B, T, H, K, decay, h0 = cases[0]
        inputs = make_inputs(
            B, T, H, K, dtype=torch.float16, device=device, decay=decay, w_dtype=torch.float32,
            initial_state=h0, seed=T,
        )  # fmt: skip
        with forced_mode(op, "tc"):
            reports.append(check_case(inputs, f"B{B}-T{T}-H{H}-K{K}-{decay}-h0={h0}-float16-tc"))
    return reports
