"""Search spaces and tuning cases of every kernel, kept here so the ops' own files stay as
they are. One ``Tunable`` per (op, direction); ``get_tunable`` finds it.

Each op's builder imports that op's ``launch``/``op`` modules lazily; an op that does not exist
yet (or fails to import) is skipped, so this file may describe ops before they land.

Constraints estimate from the block sizes what a program holds: registers (fp32 tiles spread
over ``32 * num_warps`` threads, at most 255 per thread and ``regs_per_sm`` per SM) and shared
memory (tiles staged ``num_stages`` deep for pipelined loads, against the device's opt-in
maximum, read from ``torch.cuda.get_device_properties``). On the CPU every point is valid.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from scanopt.autotune.api import Case, Config, Space, Tunable, next_pow2
from scanopt.autotune.device import DeviceProps

log = logging.getLogger("scanopt.autotune")

#: batch 4, d_model 2048 (ANCHORS.md): the width every anchor row is measured at
ANCHOR_LENGTHS = (1024, 2048, 4096, 8192, 16384)

# --------------------------------------------------------------------------------------------
# resource estimates shared by the constraints

#: registers per thread the estimates may fill (of 255), leaving room for addresses, loop state
REG_BUDGET = 160


def regs_per_thread(fp32_elems: int, num_warps: int) -> float:
    """Registers one thread needs to hold ``fp32_elems`` fp32 values of a program's tiles."""
    return fp32_elems / (32 * num_warps)


def fits_registers(fp32_elems: int, num_warps: int, props: DeviceProps) -> bool:
    """True when the tiles fit the per-thread budget and one program fits an SM's registers."""
    if not props.is_cuda:
        return True
    per_thread = regs_per_thread(fp32_elems, num_warps)
    return per_thread <= REG_BUDGET and (per_thread + 40) * 32 * num_warps <= props.regs_per_sm


def fits_shared(nbytes: int, props: DeviceProps) -> bool:
    """True when ``nbytes`` of shared memory fit one program on this device."""
    return not props.is_cuda or nbytes <= props.shared_mem


def fits_threads(num_warps: int, props: DeviceProps) -> bool:
    return not props.is_cuda or 32 * num_warps <= min(1024, props.max_threads_per_sm)


# --------------------------------------------------------------------------------------------
# the generic case: timing inputs at the tuned shape, verification at a smaller one


def standard_case(
    *,
    op: str,
    shape: Mapping[str, int],
    dtype: Any,
    device: Any,
    seed: int,
    make_inputs: Callable[[Mapping[str, int], Any, Any, int], dict[str, Any]],
    launch: Callable[[dict[str, Any], Config], dict[str, Any]],
    reference: Callable[[dict[str, Any]], dict[str, Any]],
    baseline: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    verify_shape: Callable[[Mapping[str, int]], Mapping[str, int]] | None = None,
    default: Config | None = None,
    input_bytes: Callable[[Mapping[str, int], Any], int] | None = None,
) -> Case:
    """A ``Case`` from an op's pieces.

    - ``make_inputs(shape, dtype, device, seed)`` -> dict of tensors (what ``launch`` reads);
    - ``launch(inputs, config)`` -> dict name -> output tensor (the launcher, config passed);
    - ``reference(inputs)`` -> dict name -> float64 array for the outputs to check (NumPy);
    - ``baseline(inputs)`` -> dict name -> tensor: the op's PyTorch path in the same dtype,
      for the 2x rule of ``scanopt.verify`` (``None``: only the per-dtype ceiling applies);
    - ``verify_shape(shape)``: a smaller shape, with the same structure, where the NumPy
      reference is cheap (``None``: verify at the tuned shape). When it differs, each config is
      also run at the tuned shape on poisoned outputs and compared with the ``default`` config's
      result there (under the per-dtype ceiling), so a config that breaks only at the real size
      (a tail, an unwritten block) is still rejected.

    Input sets to rotate through while timing: as many as fit 1 GiB (``input_bytes``), 1 to 3;
    one on the CPU.
    """
    from scanopt.verify import BUDGETS, Report

    shape = dict(shape)
    vshape = dict(verify_shape(shape)) if verify_shape else shape
    is_cuda = str(device).startswith("cuda")
    n = 1
    if is_cuda and input_bytes is not None:
        n = max(1, min(3, (1 << 30) // max(1, input_bytes(shape, dtype))))
    sets = [make_inputs(shape, dtype, device, seed + i) for i in range(n)]
    state: dict[str, Any] = {}
    dname = str(dtype).replace("torch.", "")

    def run(config: Config, index: int = 0) -> Any:
        return launch(sets[index % n], config)

    def verify(config: Config) -> Any:
        if "vin" not in state:
            vin = sets[0] if vshape == shape else make_inputs(vshape, dtype, device, seed + 101)
            state["vin"] = vin
            state["ref"] = reference(vin)
            state["base"] = baseline(vin) if baseline is not None else {}
        report = Report(op, f"{dname} {vshape} {config}")
        outs = launch(state["vin"], config)
        for name, ref in state["ref"].items():
            # judged at the op's dtype, whatever the output's storage (fp32 lse, fp32 grads)
            report.check(name, outs[name], ref, baseline=state["base"].get(name), dtype=dname)
        if vshape != shape:
            if "big" not in state:
                if default is None:
                    raise ValueError("standard_case needs default= when verify_shape differs")
                state["big"] = {k: v.clone() for k, v in launch(sets[0], default).items()}
            big = launch(sets[0], config)
            for name in state["ref"]:
                report.check(
                    f"{name}@{shape}", big[name], state["big"][name], dtype=dname,
                    budget=BUDGETS[dname],
                )  # fmt: skip
        return report

    return Case(run=run, verify=verify, n_inputs=n, info={"verify_shape": vshape})


# --------------------------------------------------------------------------------------------
# registry


def _import(name: str) -> Any:
    return importlib.import_module(name)


#: op name -> builder returning that op's tunables (one per direction)
_BUILDERS: dict[str, Callable[[], list[Tunable]]] = {}


def register(op: str) -> Callable[[Callable[[], list[Tunable]]], Callable[[], list[Tunable]]]:
    """Decorator: ``@register("wkv7") def _wkv7() -> list[Tunable]``."""

    def deco(fn: Callable[[], list[Tunable]]) -> Callable[[], list[Tunable]]:
        _BUILDERS[op] = fn
        return fn

    return deco


def _build(op: str) -> list[Tunable]:
    try:
        return _BUILDERS[op]()
    except ImportError as exc:
        log.debug("scanopt.autotune: %s not tunable here (%s)", op, exc)
        return []


def tunables(op: str | None = None) -> list[Tunable]:
    """Every tunable kernel of the ops that exist (or of one op)."""
    ops = [op] if op is not None else list(_BUILDERS)
    return [t for name in ops if name in _BUILDERS for t in _build(name)]


def known_ops() -> list[str]:
    """Ops this file describes (whether or not they exist in this installation)."""
    return list(_BUILDERS)


def get_tunable(op: str, direction: str) -> Tunable:
    """The tunable of ``op`` (a name, or ``"package.module:attribute"`` naming a ``Tunable``,
    a list of them or a callable returning them -- how out-of-tree kernels and tests plug in)
    in ``direction``."""
    if ":" in op:
        module, _, attr = op.partition(":")
        obj = getattr(_import(module), attr)
        found = obj() if callable(obj) and not isinstance(obj, Tunable) else obj
        found = [found] if isinstance(found, Tunable) else list(found)
    else:
        if op not in _BUILDERS:
            raise ValueError(f"unknown op {op!r}; tunable ops: {', '.join(_BUILDERS)}")
        found = _build(op)
        if not found:
            raise ValueError(f"op {op!r} is not available in this installation (not built yet?)")
    for t in found:
        if t.direction == direction:
            return t
    dirs = ", ".join(t.direction for t in found)
    raise ValueError(f"{op} has no tunable kernel for direction {direction!r} (has: {dirs})")


def directions(op: str) -> list[str]:
    """Directions ``op`` can tune."""
    if ":" in op:
        module, _, attr = op.partition(":")
        obj = getattr(_import(module), attr)
        found = obj() if callable(obj) and not isinstance(obj, Tunable) else obj
        found = [found] if isinstance(found, Tunable) else list(found)
        return [t.direction for t in found]
    if op not in _BUILDERS:
        raise ValueError(f"unknown op {op!r}; tunable ops: {', '.join(_BUILDERS)}")
    return [t.direction for t in tunables(op)]


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def warps_stages(warps: tuple[int, ...] = (1, 2, 4, 8), stages: tuple[int, ...] = (1, 2, 3, 4)):
    return {"num_warps": warps, "num_stages": stages}


def _tensor_bytes(tensors: Mapping[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values() if hasattr(t, "numel"))


def _np(x: Any) -> Any:
    from scanopt.verify import to_numpy

    return None if x is None else to_numpy(x)


# --------------------------------------------------------------------------------------------
# RWKV-6 / RWKV-7: three kernel families (MODE): fused recurrent (one program per (batch, head,
# V-block), fp32 state tile [next_pow2(K), BV] in registers; the backward holds about four such
# tiles), chunked (K <= 128) and tensor-core "tc" (bf16/fp16, K <= 128, BV >= 16 for tl.dot).

_RWKV_INPUTS = {"wkv6": ("r", "k", "v", "w", "u"), "wkv7": ("r", "w", "k", "v", "a", "b")}
_RWKV_DECAY = {"wkv6": "rwkv6", "wkv7": "rwkv7"}


def _rwkv_space(direction: str, op: str) -> Callable[[Mapping[str, int], str, DeviceProps], Space]:
    tiles = 2 if direction == "fwd" else 5

    def ok(c: Config, s: Mapping[str, int], p: DeviceProps) -> bool:
        bk, bv, nw = next_pow2(s["K"]), c["BV"], c["num_warps"]
        if c["MODE"] != "tc" and (c.get("CARRY", 0) or c.get("DPASS", 0)):
            return False  # CARRY, DPASS (tc backward switches) are tc's alone
        if c["MODE"] == "recurrent" and (c.get("BT", 64) != 64 or c.get("BW", 16) != 16):
            return False  # BT, BW (chunk steps, columns) mean nothing to recurrent: one point
        if c["MODE"] != "tc" and c.get("SW", 4) != 4:
            return False  # SW (warps of tc's serial passes) is tc's alone: one point
        ks = c.get("KS", 0)
        if ks and (c["MODE"] != "recurrent" or ks > bk or bk // ks > 32 * nw):
            return False  # KS (WKV-7's split-K recurrent forward): K in lane groups of KS
        if c["MODE"] == "tc":
            # the pair tiles live in registers whatever BV is: ptxas decides; only tl.dot's
            # minimum and the thread limit are known up front
            return bv >= 16 and fits_threads(nw, p)
        if not p.is_cuda:
            return True
        return (
            fits_threads(nw, p)
            and fits_registers(tiles * bk * bv, nw, p)
            and bk * bv >= 32 * nw  # every thread owns at least one state element
            and fits_shared(bk * bv * 4 * max(1, c["num_stages"] - 1), p)
        )

    def space(shape: Mapping[str, int], dtype: str, props: DeviceProps) -> Space:
        top = next_pow2(shape["V"])
        bvs = tuple(b for b in (4, 8, 16, 32, 64, 128) if b <= top) or (top,)
        modes: tuple[str, ...] = ("recurrent",)
        if shape["K"] <= 128:
            modes += ("chunked",) + (("tc",) if dtype in ("bfloat16", "float16") else ())
        params = {"MODE": modes, "BV": bvs, "num_warps": (1, 2, 4, 8), "num_stages": (1, 2, 3)}
        if len(modes) > 1:
            # steps per chunk of the chunked / tc kernels (tc: also the interval of its serial
            # state passes, 64 by default)
            params["BT"] = (32, 64, 128)
            # chunked: columns per program of the chunk transition; tc: the V-block of the
            # serial state / cotangent passes, and their warps
            params["BW"] = tuple(b for b in (16, 32, 64) if b <= max(16, top))
        if op == "wkv7" and direction == "fwd":
            params["KS"] = (0, 4, 8, 16)  # 0: the state tile with K across the lanes
        if "tc" in modes:
            params["SW"] = (2, 4, 8)
            if direction == "bwd":
                params["DPASS"] = (0, 1)
                if op == "wkv6":
                    params["CARRY"] = (0, 1)
        return Space(params, ok)

    return space


def _rwkv_tunables(op: str) -> list[Tunable]:
    launch = _import(f"scanopt.ops.{op}.launch")
    mod = _import(f"scanopt.ops.{op}.op")
    common = _import("scanopt.ops._rwkv_common")
    ref = _import("scanopt.reference")
    names = _RWKV_INPUTS[op]
    fwd_launch, bwd_launch = getattr(launch, f"{op}_fwd"), getattr(launch, f"{op}_bwd")
    ref_fwd, ref_bwd = getattr(ref, f"{op}_fwd"), getattr(ref, f"{op}_bwd")

    def default(direction: str) -> Callable[..., Config]:
        def fn(shape: Mapping[str, int], dtype: str, props: DeviceProps) -> Config:
            return launch.default_config(
                direction, T=shape["T"], K=shape["K"], V=shape["V"], dtype=_dtype(dtype)
            )

        return fn

    def make_case(direction: str) -> Callable[..., Case]:
        def build(shape: Mapping[str, int], dtype: Any, device: Any, seed: int) -> Case:
            def make_inputs(s: Mapping[str, int], d: Any, dev: Any, sd: int) -> dict[str, Any]:
                x = mod.make_inputs(
                    s["B"], s["T"], s["H"], s["K"], s["V"], dtype=d, device=dev,
                    decay=_RWKV_DECAY[op], seed=sd,
                )  # fmt: skip
                x["chunk"] = common.default_chunk(s["T"], s["K"], s["V"])
                if direction == "bwd":
                    args = [x[n] for n in names]
                    x["ckpt"] = fwd_launch(*args, 1.0, None, True, {"CHUNK": x["chunk"]})[2]
                return x

            def run(x: dict[str, Any], config: Config) -> dict[str, Any]:
                args = [x[n] for n in names]
                if direction == "fwd":
                    o, ht, _ = fwd_launch(*args, 1.0, None, False, config)
                    return {"o": o, "final_state": ht}
                g = bwd_launch(x["do"], x["dht"], *args, 1.0, None, x["ckpt"], x["chunk"], config)
                return {f"d{n}": t for n, t in zip(names, g, strict=False)}

            def reference(x: dict[str, Any]) -> dict[str, Any]:
                args = [_np(x[n]) for n in names]
                if direction == "fwd":
                    o, ht = ref_fwd(*args, scale=1.0)
                    return {"o": o, "final_state": ht}
                g = ref_bwd(_np(x["do"]), *args, scale=1.0, dfinal_state=_np(x["dht"]))
                return {f"d{n}": g[n] for n in names}

            def baseline(x: dict[str, Any]) -> dict[str, Any]:
                args = [x[n] for n in names]
                o, ht, ck = mod._torch_fwd(*args, 1.0, None, x["chunk"], direction == "bwd")
                if direction == "fwd":
                    return {"o": o, "final_state": ht}
                g = mod._torch_bwd(x["do"], x["dht"], *args, 1.0, None, ck, x["chunk"])
                return {f"d{n}": t for n, t in zip(names, g, strict=False)}

            def small(s: Mapping[str, int]) -> dict[str, int]:
                return {**s, "B": 1, "H": min(s["H"], 2), "T": min(s["T"], 130)}

            return standard_case(
                op=op, shape=shape, dtype=dtype, device=device, seed=seed,
                make_inputs=make_inputs, launch=run, reference=reference, baseline=baseline,
                verify_shape=small,
                default=default(direction)(shape, str(dtype).replace("torch.", ""), None),
                input_bytes=lambda s, d: 8 * s["B"] * s["T"] * s["H"] * max(s["K"], s["V"])
                * d.itemsize,
            )  # fmt: skip

        return build

    out = []
    for direction in ("fwd", "bwd"):
        out.append(
            Tunable(
                op=op,
                direction=direction,
                dims=("B", "T", "H", "K", "V"),
                exact=("K", "V"),
                space=_rwkv_space(direction, op),
                default=default(direction),
                make_case=make_case(direction),
                example_shape={"B": 4, "T": 4096, "H": 32, "K": 64, "V": 64},
                bench_shapes=tuple(
                    {"B": 4, "T": t, "H": 32, "K": 64, "V": 64} for t in ANCHOR_LENGTHS
                ),
                test_shape={"B": 1, "T": 19, "H": 2, "K": 16, "V": 16},
                requires=f"scanopt.ops.{op}.launch",
                description=f"{op} {direction}: kernel family, BV, warps, stages",
            )
        )
    return out


@register("wkv6")
def _wkv6() -> list[Tunable]:
    return _rwkv_tunables("wkv6")


@register("wkv7")
def _wkv7() -> list[Tunable]:
    return _rwkv_tunables("wkv7")


# --------------------------------------------------------------------------------------------
# RWKV-4: chunked scan over T (a summary kernel per chunk, a serial pass over chunks, an output
# kernel); per program block_c channels x block_t steps in flight.

_WKV4_INPUTS = ("time_decay", "time_first", "key", "value")


def _wkv4_space(direction: str) -> Callable[[Mapping[str, int], str, DeviceProps], Space]:
    def ok(c: Config, s: Mapping[str, int], p: DeviceProps) -> bool:
        if "chunk" in c and c["block_t"] > c["chunk"]:
            return False
        if not p.is_cuda:
            return True
        per_thread = c["block_c"] * c["block_t"] * 4 / (32 * c["num_warps"])
        return (
            all(fits_threads(c[w], p) for w in ("num_warps", "sum_warps", "scan_warps"))
            and per_thread <= 192
            and c["block_c"] >= 32 * c["num_warps"] // 2
            and c["scan_block_c"] >= 32 * c["scan_warps"] // 2
        )

    def space(shape: Mapping[str, int], dtype: str, props: DeviceProps) -> Space:
        top = max(32, next_pow2(shape["C"]))
        blocks = tuple(b for b in (32, 64, 128, 256, 512) if b <= top)
        params: dict[str, tuple[Any, ...]] = {}
        if direction == "fwd":
            params["chunk"] = (16, 32, 64, 128, 256)
        params.update(
            {
                "block_t": (4, 8, 16, 32),
                "block_c": blocks,
                "num_warps": (1, 2, 4, 8),
                "sum_block_c": blocks,
                "sum_warps": (1, 2, 4, 8),
                "scan_block_c": tuple(b for b in (32, 64, 128) if b <= top),
                "scan_warps": (1, 2, 4),
                "scan_stages": (1, 2, 3),
            }
        )
        return Space(params, ok)

    return space


@register("wkv4")
def _wkv4() -> list[Tunable]:
    launch = _import("scanopt.ops.wkv4.launch")
    mod = _import("scanopt.ops.wkv4.op")
    ref = _import("scanopt.reference")

    def default(direction: str) -> Callable[..., Config]:
        def fn(shape: Mapping[str, int], dtype: str, props: DeviceProps | None) -> Config:
            dev = "cuda" if props is None or props.is_cuda else "cpu"
            return launch.default_config(
                direction, B=shape["B"], T=shape["T"], C=shape["C"], dtype=_dtype(dtype),
                device=dev,
            )  # fmt: skip

        return fn

    def make_case(direction: str) -> Callable[..., Case]:
        def build(shape: Mapping[str, int], dtype: Any, device: Any, seed: int) -> Case:
            def make_inputs(s: Mapping[str, int], d: Any, dev: Any, sd: int) -> dict[str, Any]:
                x = mod.make_inputs(s["B"], s["T"], s["C"], dtype=d, device=dev, seed=sd)
                if direction == "bwd":
                    args = [x[n] for n in _WKV4_INPUTS]
                    cfg = launch.default_config("fwd", B=s["B"], T=s["T"], C=s["C"], dtype=d,
                                                device=dev)  # fmt: skip
                    x["fwd"] = launch.wkv4_fwd(*args, None, {"chunk": cfg["chunk"]})
                    x["chunk"] = cfg["chunk"]
                return x

            def run(x: dict[str, Any], config: Config) -> dict[str, Any]:
                args = [x[n] for n in _WKV4_INPUTS]
                if direction == "fwd":
                    return {"out": launch.wkv4_fwd(*args, None, config)[0]}
                _, final, states, fidx = x["fwd"]
                g = launch.wkv4_bwd(x["grad_out"], None, *args, None, final, states, fidx,
                                    x["chunk"], config)  # fmt: skip
                return {f"d{n}": t for n, t in zip(_WKV4_INPUTS, g, strict=False)}

            def reference(x: dict[str, Any]) -> dict[str, Any]:
                args = [_np(x[n]) for n in _WKV4_INPUTS]
                if direction == "fwd":
                    return {"out": ref.wkv4_fwd(*args)[0]}
                g = ref.wkv4_bwd(_np(x["grad_out"]), *args)
                return {f"d{n}": g[n] for n in _WKV4_INPUTS}

            def baseline(x: dict[str, Any]) -> dict[str, Any]:
                args = [x[n] for n in _WKV4_INPUTS]
                if direction == "fwd":
                    return {"out": mod._torch_fwd(*args, None)[0]}
                g = mod._torch_bwd(x["grad_out"], None, *args, None)
                return {f"d{n}": t for n, t in zip(_WKV4_INPUTS, g, strict=False)}

            def small(s: Mapping[str, int]) -> dict[str, int]:
                return {"B": 1, "T": min(s["T"], 300), "C": min(s["C"], 160)}

            dname = str(dtype).replace("torch.", "")
            props = None if str(device).startswith("cuda") else _cpu_props()
            return standard_case(
                op="wkv4", shape=shape, dtype=dtype, device=device, seed=seed,
                make_inputs=make_inputs, launch=run, reference=reference, baseline=baseline,
                verify_shape=small, default=default(direction)(shape, dname, props),
                input_bytes=lambda s, d: 4 * s["B"] * s["T"] * s["C"] * d.itemsize,
            )  # fmt: skip

        return build

    return [
        Tunable(
            op="wkv4",
            direction=direction,
            dims=("B", "T", "C"),
            space=_wkv4_space(direction),
            default=default(direction),
            make_case=make_case(direction),
            example_shape={"B": 4, "T": 4096, "C": 2048},
            bench_shapes=tuple({"B": 4, "T": t, "C": 2048} for t in ANCHOR_LENGTHS),
            test_shape={"B": 1, "T": 45, "C": 40},
            requires="scanopt.ops.wkv4.launch",
            description=f"RWKV-4 chunked scan {direction}",
        )
        for direction in ("fwd", "bwd")
    ]


# --------------------------------------------------------------------------------------------
# Mamba-1 selective scan: one program per (batch, BLOCK_D channels); chunks of BLOCK_G groups
# x BLOCK_R steps as [BLOCK_D, BLOCK_G, BLOCK_R] tiles, a thread per (channel, group) holding
# BLOCK_R steps, the groups on lanes. The backward's chunk BLOCK_G * BLOCK_R is also the
# forward's checkpoint interval.

_SCAN_TENSORS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _scan_bwd_scratch_ok(block_d: int, s: Mapping[str, int], esize: int, segments: int = 1) -> bool:
    """Memory rule of the backward: with variable B/C each program of ``BLOCK_D`` channels
    writes its own fp32 partial sums of dB and dC, ``2 * 4 * batch * ceil(dim / BLOCK_D) * N * L``
    bytes, summed afterwards. Small ``BLOCK_D`` runs faster (no cross-warp reduction; 1.37x on
    an H100 for ``BLOCK_D=4`` vs the default 32) but multiplies that scratch (4.3 GB at the
    anchor shape and L = 16k). A config may use at most the larger of the default's scratch
    (``BLOCK_D=32``) and the bytes of the gradients the backward returns anyway (du, ddelta, dz
    in the input dtype), so the tuner never trades a model's memory for speed. With
    ``SEGMENTS`` launches each covers about ``L / SEGMENTS`` steps, and so does the scratch."""
    batch, dim, N, L = s["batch"], s["dim"], s["N"], s["L"]
    scratch = 8 * batch * -(-dim // block_d) * N * -(-L // segments)
    default_scratch = 8 * batch * -(-dim // 32) * N * L
    return scratch <= max(default_scratch, 3 * esize * batch * dim * L)


#: scanopt.ops.selective_scan.launch.MAX_SERIAL_N (spaces import no kernel module eagerly)
_SERIAL_N = 16


def _scan_space(direction: str) -> Callable[[Mapping[str, int], str, DeviceProps], Space]:
    rows = 6 if direction == "fwd" else 16  # live [BLOCK_R] register rows per thread
    # the backward may estimate up to twice the register file: its default (2 channel-groups
    # per thread) spills 2.7 KB per thread on sm_90 and still measured faster than every
    # non-spilling tile of the same memory (H100, 2026-12-06), so spilling is for the
    # measurement to judge, not the constraint
    reg_budget = 256 if direction == "fwd" else 512

    def ok(c: Config, s: Mapping[str, int], p: DeviceProps, esize: int = 2) -> bool:
        if direction == "bwd" and s.get("atomic", 0):
            # atomic dB/dC sums: no partial-sum scratch to bound, and one launch (SEGMENTS
            # exists to split that scratch)
            if c.get("SEGMENTS", 1) != 1:
                return False
        elif direction == "bwd" and not _scan_bwd_scratch_ok(
            c["BLOCK_D"], s, esize, c.get("SEGMENTS", 1)
        ):
            return False
        if direction == "fwd" and c.get("SERIAL", 0):
            # the serial family ignores the group tile: one canonical (G, R, COLS) point, the
            # states of a channel in registers, and BLOCK_D filling the warps with 1, 2 or 4
            # channels per thread (sub-blocks sharing the B/C rows; the launcher caps it at 4)
            nsplit = c["NSPLIT"]
            return (
                (c["BLOCK_G"], c["BLOCK_R"], c["COLS"]) == (2, 4, 1)
                and -(-s["N"] // nsplit) <= _SERIAL_N
                and c["BLOCK_D"] * nsplit in (32 * c["num_warps"] * m for m in (1, 2, 4))
                and (not p.is_cuda or fits_threads(c["num_warps"], p))
            )
        if direction == "fwd" and c.get("NSPLIT", 4) != 4:
            return False  # the group scan ignores NSPLIT: one canonical value
        if not p.is_cuda:
            return True
        nw, G = c["num_warps"], c["BLOCK_G"]
        return (
            fits_threads(nw, p)
            and G <= 32
            and c["BLOCK_D"] * G >= 32 * nw  # every lane holds a (channel, group)
            and regs_per_thread(rows * c.get("COLS", 1) * c["BLOCK_R"] * c["BLOCK_D"] * G, nw)
            <= reg_budget
        )

    def space(shape: Mapping[str, int], dtype: str, props: DeviceProps) -> Space:
        bds = tuple(b for b in (1, 2, 4, 8, 16, 32) if b <= max(4, next_pow2(shape["dim"])))
        # PREFETCH: each column's loads issued one iteration ahead
        keys = {"BLOCK_D": bds, "BLOCK_G": (2, 4, 8, 16, 32), "BLOCK_R": (4, 8, 16, 32),
                "num_warps": (1, 2, 4), "num_stages": (1,), "PREFETCH": (0, 1)}  # fmt: skip
        if direction == "fwd":
            keys["COLS"] = (1, 2)  # state columns in flight per thread
            # the serial family (states on NSPLIT lanes, steps one by one) or the group scan
            keys["SERIAL"] = (0, 1)
            keys["NSPLIT"] = (1, 2, 4, 8)
        else:  # launches per backward: bounds the variable-B/C partial sums of small BLOCK_D
            keys["SEGMENTS"] = (1, 2, 4, 8)
        esize = _dtype(dtype).itemsize
        return Space(keys, lambda c, s, p: ok(c, s, p, esize))

    return space


@register("selective_scan")
def _selective_scan() -> list[Tunable]:
    launch = _import("scanopt.ops.selective_scan.launch")
    mod = _import("scanopt.ops.selective_scan.op")
    ref = _import("scanopt.reference")

    def default(direction: str) -> Callable[..., Config]:
        def fn(shape: Mapping[str, int], dtype: str, props: DeviceProps | None) -> Config:
            dev = "cuda" if props is None or props.is_cuda else "cpu"
            return launch.default_config(
                direction, dim=shape["dim"], N=shape["N"], L=shape["L"], dtype=_dtype(dtype),
                device_type=dev, deterministic=not shape.get("atomic", 0),
            )  # fmt: skip

        return fn

    def make_case(direction: str) -> Callable[..., Case]:
        def build(shape: Mapping[str, int], dtype: Any, device: Any, seed: int) -> Case:
            dev_type = "cuda" if str(device).startswith("cuda") else "cpu"

            def make_inputs(s: Mapping[str, int], d: Any, dev: Any, sd: int) -> dict[str, Any]:
                # the anchor's configuration: variable B/C, z, D, delta_bias, softplus
                return mod.make_inputs(s["batch"], s["dim"], s["L"], s["N"], dtype=d, device=dev,
                                       seed=sd)  # fmt: skip

            def ckpt(x: dict[str, Any], chunk: int, R: int) -> Any:
                key = ("ckpt", chunk)
                if key not in x:  # made once per chunk, outside the timed region after warm-up
                    args = [x[n] for n in _SCAN_TENSORS]
                    cfg = {"BLOCK_G": chunk // R, "BLOCK_R": R}
                    x[key] = launch.selective_scan_fwd(*args, None, True, chunk, True, cfg)[2]
                return x[key]

            def run(x: dict[str, Any], config: Config) -> dict[str, Any]:
                args = [x[n] for n in _SCAN_TENSORS]
                chunk = config["BLOCK_G"] * config["BLOCK_R"]
                if direction == "fwd":
                    out, last, _ = launch.selective_scan_fwd(
                        *args, None, True, chunk, False, config
                    )
                    return {"out": out, "last_state": last}
                g = launch.selective_scan_bwd(
                    x["dout"], x["dlast"], *args, None, ckpt(x, chunk, config["BLOCK_R"]), True,
                    chunk, config, deterministic=not shape.get("atomic", 0),
                )  # fmt: skip
                return {f"d{n}": g[n] for n in _SCAN_TENSORS}

            def reference(x: dict[str, Any]) -> dict[str, Any]:
                args = {n: _np(x[n]) for n in _SCAN_TENSORS}
                if direction == "fwd":
                    out, last = ref.selective_scan_fwd(delta_softplus=True, **args)
                    return {"out": out, "last_state": last}
                g = ref.selective_scan_bwd(
                    _np(x["dout"]), delta_softplus=True, dlast_state=_np(x["dlast"]), **args
                )
                return {f"d{n}": g[n] for n in _SCAN_TENSORS}

            def baseline(x: dict[str, Any]) -> dict[str, Any]:
                args = [x[n] for n in _SCAN_TENSORS]
                chunk = launch.checkpoint_chunk(
                    batch=x["u"].shape[0], dim=x["u"].shape[1], N=x["A"].shape[1],
                    L=x["u"].shape[2], dtype=x["u"].dtype, device=x["u"].device,
                )  # fmt: skip
                out, last, ck = mod._torch_scan_fwd(*args, None, True, chunk, direction == "bwd")
                if direction == "fwd":
                    return {"out": out, "last_state": last}
                g = mod._torch_scan_bwd(x["dout"], x["dlast"], *args, None, ck, True, chunk)
                return {f"d{n}": t for n, t in zip(_SCAN_TENSORS, g, strict=False)}

            def small(s: Mapping[str, int]) -> dict[str, int]:
                return {**s, "batch": 1, "dim": min(s["dim"], 72), "L": min(s["L"], 200)}

            dname = str(dtype).replace("torch.", "")
            props = None if dev_type == "cuda" else _cpu_props()
            return standard_case(
                op="selective_scan", shape=shape, dtype=dtype, device=device, seed=seed,
                make_inputs=make_inputs, launch=run, reference=reference, baseline=baseline,
                verify_shape=small, default=default(direction)(shape, dname, props),
                input_bytes=lambda s, d: 6 * s["batch"] * s["dim"] * s["L"] * d.itemsize,
            )  # fmt: skip

        return build

    # the backward's two modes are two keys (``atomic``: 1 = atomic dB/dC sums, the default
    # unless torch's deterministic mode is on; 0 = the fixed-order backward): their best tiles
    # differ (one warp with atomics, four without; bench/notes/selective_scan.md)
    anchor = {"batch": 4, "dim": 2048, "N": 16}
    return [
        Tunable(
            op="selective_scan",
            direction="fwd",
            dims=("batch", "dim", "L", "N"),
            exact=("N",),
            space=_scan_space("fwd"),
            default=default("fwd"),
            make_case=make_case("fwd"),
            example_shape={**anchor, "L": 4096},
            bench_shapes=tuple({**anchor, "L": n} for n in ANCHOR_LENGTHS),
            test_shape={"batch": 1, "dim": 24, "L": 37, "N": 4},
            requires="scanopt.ops.selective_scan.launch",
            description="Mamba-1 selective scan fwd",
        ),
        Tunable(
            op="selective_scan",
            direction="bwd",
            dims=("batch", "dim", "L", "N", "atomic"),
            exact=("N", "atomic"),
            space=_scan_space("bwd"),
            default=default("bwd"),
            make_case=make_case("bwd"),
            example_shape={**anchor, "L": 4096, "atomic": 1},
            bench_shapes=tuple(
                {**anchor, "L": n, "atomic": a} for a in (1, 0) for n in ANCHOR_LENGTHS
            ),
            test_shape={"batch": 1, "dim": 24, "L": 37, "N": 4, "atomic": 1},
            requires="scanopt.ops.selective_scan.launch",
            description="Mamba-1 selective scan bwd (atomic: 1 = atomic dB/dC sums, the default)",
        ),
    ]


def _cpu_props() -> DeviceProps:
    from scanopt.autotune.device import CPU_PROPS

    return CPU_PROPS


# --------------------------------------------------------------------------------------------
# attention (causal, bottom-right aligned; L_q = L_k): forward BLOCK_M x BLOCK_N tiles with
# num_stages-deep K/V pipelining; backward: a dK/dV kernel, a dQ kernel and a delta kernel.


def _attn_fwd_ok(c: Config, s: Mapping[str, int], p: DeviceProps, esize: int) -> bool:
    if not p.is_cuda:
        return True
    bd = max(16, next_pow2(s["D"]))
    bm, bn, nw = c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]
    smem = (bm * bd + max(1, c["num_stages"]) * bn * 2 * bd) * esize
    regs = bm * bd + 2 * bm * bn  # fp32 accumulator + scores/probabilities
    return fits_threads(nw, p) and fits_shared(smem, p) and regs_per_thread(regs, nw) <= 256


def _attn_bwd_ok(c: Config, s: Mapping[str, int], p: DeviceProps, esize: int) -> bool:
    if not p.is_cuda:
        return True
    bd = max(16, next_pow2(s["D"]))
    bm, bn, nw, st = c["BLOCK_M_KV"], c["BLOCK_N_KV"], c["num_warps_kv"], c["num_stages_kv"]
    kv_smem = (bn * 2 * bd + max(1, st) * bm * 2 * bd) * esize
    kv_regs = 2 * bn * bd + 3 * bm * bn
    bm, bn, nw_q, st = c["BLOCK_M_Q"], c["BLOCK_N_Q"], c["num_warps_q"], c["num_stages_q"]
    q_smem = (bm * 2 * bd + max(1, st) * bn * 2 * bd) * esize
    q_regs = bm * bd + 3 * bm * bn
    return (
        fits_threads(nw, p)
        and fits_threads(nw_q, p)
        and fits_shared(max(kv_smem, q_smem), p)
        and regs_per_thread(kv_regs, nw) <= 256
        and regs_per_thread(q_regs, nw_q) <= 256
    )


@register("attention")
def _attention() -> list[Tunable]:
    launch = _import("scanopt.ops.attention.launch")
    mod = _import("scanopt.ops.attention.op")
    ref = _import("scanopt.reference")

    def esize(dtype: str) -> int:
        return 4 if dtype == "float32" else 2

    def fwd_space(shape: Mapping[str, int], dtype: str, props: DeviceProps) -> Space:
        hopper = props.is_cuda and props.capability[0] >= 9
        params: dict[str, tuple[Any, ...]] = {
            "BLOCK_M": (16, 32, 64, 128, 256),
            "BLOCK_N": (16, 32, 64, 128),
            "num_warps": (2, 4, 8),
            "num_stages": (1, 2, 3, 4),
            "USE_TMA": (False, True) if hopper else (False,),
            "WARP_SPECIALIZE": (False, True) if hopper else (False,),
        }
        e = esize(dtype)
        return Space(params, lambda c, s, p: _attn_fwd_ok(c, s, p, e))

    def bwd_space(shape: Mapping[str, int], dtype: str, props: DeviceProps) -> Space:
        hopper = props.is_cuda and props.capability[0] >= 9
        blocks = (16, 32, 64, 128)
        params: dict[str, tuple[Any, ...]] = {
            "BLOCK_M_KV": blocks,
            "BLOCK_N_KV": blocks,
            "num_warps_kv": (2, 4, 8),
            "num_stages_kv": (1, 2, 3),
            "BLOCK_M_Q": blocks,
            "BLOCK_N_Q": blocks,
            "num_warps_q": (2, 4, 8),
            "num_stages_q": (1, 2, 3),
            "BLOCK_M_PRE": (32, 64, 128),
            "USE_TMA": (False, True) if hopper else (False,),
        }
        e = esize(dtype)
        return Space(params, lambda c, s, p: _attn_bwd_ok(c, s, p, e))

    def default(direction: str) -> Callable[..., Config]:
        def fn(shape: Mapping[str, int], dtype: str, props: DeviceProps | None) -> Config:
            dev = "cuda" if props is None or props.is_cuda else "cpu"
            return launch.default_config(
                direction, head_dim=shape["D"], dtype=_dtype(dtype),
                causal=bool(shape["causal"]), device=dev,
            )  # fmt: skip

        return fn

    def make_case(direction: str) -> Callable[..., Case]:
        def build(shape: Mapping[str, int], dtype: Any, device: Any, seed: int) -> Case:
            def mask(s: Mapping[str, int]) -> dict[str, Any]:
                diag, left, right = launch.mask_params(s["L"], s["L"], bool(s["causal"]), True,
                                                       -1, -1)  # fmt: skip
                return {"scale": s["D"] ** -0.5, "diag": diag, "left": left, "right": right}

            def make_inputs(s: Mapping[str, int], d: Any, dev: Any, sd: int) -> dict[str, Any]:
                # the layout the public ops see, which is part of the shape key (``seq``): 1 =
                # flash_attn_func's (B, L, H, D) memory, and what models pass to SDPA
                # (q.view(B, L, H, D).transpose(1, 2)), as logical (B, H, L, D) views with
                # outputs allocated seq-first; 0 = (B, H, L, D)-contiguous tensors. A config
                # tuned on the second measured 1.28x faster there and 2.8x slower on the first
                # (H100, 2026-12-07, bench/notes/autotune.md).
                g = torch_generator(sd)
                seq_first = bool(s["seq"])
                if seq_first:
                    dims = (s["B"], s["L"], s["H"], s["D"])
                    x = {n: randn(dims, g, d, dev).transpose(1, 2) for n in ("q", "k", "v", "dout")}
                else:
                    dims = (s["B"], s["H"], s["L"], s["D"])
                    x = {n: randn(dims, g, d, dev) for n in ("q", "k", "v", "dout")}
                x["mask"], x["seq_first"] = mask(s), seq_first
                if direction == "bwd":
                    x["out"], x["lse"] = launch.attention_fwd(
                        x["q"], x["k"], x["v"], seq_first=seq_first, **x["mask"]
                    )
                return x

            def run(x: dict[str, Any], config: Config) -> dict[str, Any]:
                if direction == "fwd":
                    out, lse = launch.attention_fwd(x["q"], x["k"], x["v"], config=config,
                                                    seq_first=x["seq_first"], **x["mask"])  # fmt: skip
                    return {"out": out, "lse": lse}
                dq, dk, dv = launch.attention_bwd(
                    x["dout"], x["q"], x["k"], x["v"], x["out"], x["lse"], None, config=config,
                    seq_first=x["seq_first"], **x["mask"],
                )  # fmt: skip
                return {"dq": dq, "dk": dk, "dv": dv}

            def reference(x: dict[str, Any]) -> dict[str, Any]:
                s = x["q"].shape[-1] ** -0.5
                causal = x["mask"]["right"] == 0
                kw = {"scale": s, "causal": causal, "causal_align": "bottom_right"}
                q, k, v = (_np(x[n]) for n in ("q", "k", "v"))
                if direction == "fwd":
                    out, lse = ref.attention_fwd(q, k, v, **kw)
                    return {"out": out, "lse": lse}
                g = ref.attention_bwd(_np(x["dout"]), q, k, v, **kw)
                return {"dq": g["q"], "dk": g["k"], "dv": g["v"]}

            def baseline(x: dict[str, Any]) -> dict[str, Any]:
                out, lse = mod.torch_attention_fwd(x["q"], x["k"], x["v"], **x["mask"])
                if direction == "fwd":
                    return {"out": out, "lse": lse}
                dq, dk, dv = mod.torch_attention_bwd(
                    x["dout"], x["q"], x["k"], x["v"], out, lse, None, **x["mask"]
                )
                return {"dq": dq, "dk": dk, "dv": dv}

            def small(s: Mapping[str, int]) -> dict[str, int]:
                return {**s, "B": 1, "H": min(s["H"], 2), "L": min(s["L"], 300)}

            dname = str(dtype).replace("torch.", "")
            props = None if str(device).startswith("cuda") else _cpu_props()
            return standard_case(
                op="attention", shape=shape, dtype=dtype, device=device, seed=seed,
                make_inputs=make_inputs, launch=run, reference=reference, baseline=baseline,
                verify_shape=small, default=default(direction)(shape, dname, props),
                input_bytes=lambda s, d: 4 * s["B"] * s["H"] * s["L"] * s["D"] * d.itemsize,
            )  # fmt: skip

        return build

    return [
        Tunable(
            op="attention",
            direction=direction,
            # seq: 1 = seq-first memory (flash_attn_func, SDPA on transposed views), 0 =
            # (B, H, L, D)-contiguous; the best tile differs with it
            dims=("B", "H", "L", "D", "causal", "seq"),
            exact=("D", "causal", "seq"),
            space=fwd_space if direction == "fwd" else bwd_space,
            default=default(direction),
            make_case=make_case(direction),
            example_shape={"B": 4, "H": 16, "L": 4096, "D": 128, "causal": 1, "seq": 1},
            # both layouts: `scanopt bench`'s SDPA rows pass (B, H, L, D)-contiguous tensors
            bench_shapes=tuple(
                {"B": 4, "H": 16, "L": n, "D": 128, "causal": 1, "seq": seq}
                for n in ANCHOR_LENGTHS
                for seq in (1, 0)
            ),
            test_shape={"B": 1, "H": 2, "L": 40, "D": 32, "causal": 1, "seq": 1},
            requires="scanopt.ops.attention.launch",
            description=f"flash attention {direction} (causal)",
        )
        for direction in ("fwd", "bwd")
    ]


def torch_generator(seed: int) -> Any:
    import torch

    return torch.Generator().manual_seed(seed)


def randn(shape: tuple[int, ...], g: Any, dtype: Any, device: Any) -> Any:
    import torch

    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


__all__ = [
    "ANCHOR_LENGTHS",
    "Space",
    "Tunable",
    "fits_registers",
    "fits_shared",
    "fits_threads",
    "get_tunable",
    "known_ops",
    "next_pow2",
    "register",
    "standard_case",
    "tunables",
]
