"""Run a sweep: for every case build the inputs once, compute one reference, then for every
provider run it once untimed (this call is also the warm-up: compilation, autotuning), verify its
outputs and gradients, and time each direction over rotating input copies.

Verification (``verified`` column), in each suite's ``reference_order``:

1. ``numpy``: ``scanopt.reference`` in float64 on the host, where the shape is small enough
   (the suite's ``numpy_ok``), the project's single source of truth.
2. ``torch64``: a float64 PyTorch computation on the device (attention: exact blockwise softmax
   attention; SSD: the chunked minimal SSD), for any shape that fits in memory.
3. ``trusted``: the first provider of the suite's ``trusted`` list that runs the shape in float32
   on the same (dtype-rounded) inputs. Its float32 error (~1e-6) is far below the bf16/fp16
   budgets. Independent implementations come first; when the only one left is the provider under
   test itself the row is marked ``self`` (a consistency check, not an independent one). With
   ``--providers``, only the selected providers (and the PyTorch path) are candidates;
   ``--reference NAME`` names the one candidate (any provider of the suite, timed or not).

Each output and gradient must pass ``scanopt.verify``'s rule at the case dtype, with the ``torch``
provider's same-dtype result as the baseline of the 2x rule when it ran (``scanopt.bench.checks``
evaluates the rule on the device). A failed row keeps its time in the CSV but is printed as
FAILED and never used in a speedup.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scanopt.bench import checks
from scanopt.bench.formulas import gbps, tflops
from scanopt.bench.registry import Case, Impl, Provider, Suite, Unavailable, first_line
from scanopt.bench.results import FAILED, OK, SELF, SKIPPED, Row
from scanopt.bench.timing import MAX_COPIES, Rotation, Timing, n_copies
from scanopt.verify import Check


@dataclass
class RunConfig:
    """Options of one sweep (the command line fills it)."""

    device: str = "cuda"
    #: directions to time (None: every direction the op has)
    directions: Sequence[str] | None = None
    #: provider names to run (None: all)
    providers: Sequence[str] | None = None
    #: the one provider the "trusted" reference may come from (None: the suite's order)
    reference: str | None = None
    verify: bool = True
    #: CUDA-graph timing of forwards (None: the suite's default)
    cudagraph: bool | None = None
    seed: int = 0
    max_copies: int = MAX_COPIES
    #: a provider is skipped when its memory estimate exceeds this fraction of free memory
    memory_fraction: float = 0.8


@dataclass
class Reference:
    outs: dict
    grads: dict
    source: str
    #: the provider that produced it (trusted mode), else None
    provider: str | None = None


@dataclass
class CaseResult:
    case: Case
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    reference: str = ""


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _tensors(obj: Any) -> list:
    import torch

    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _map(obj: Any, fn: Callable) -> Any:
    import torch

    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_map(v, fn) for v in obj)
    if isinstance(obj, list):
        return [_map(v, fn) for v in obj]
    return obj


def _diff_outputs(result: Any) -> list:
    return [t for t in _tensors(result) if t.requires_grad]


def _leaves(suite: Suite, canon: dict, need_grad: bool) -> dict:
    return {
        n: t.detach()
        .clone()
        .requires_grad_(need_grad and n in suite.grad_names and t.is_floating_point())
        for n, t in canon.items()
    }


def _is_oom(e: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, oom) or "out of memory" in str(e).lower()


#: messages of providers that refuse a case (not a bug): reported as "skipped"
_UNSUPPORTED = ("no viable backend", "no available kernel")


def _describe_error(e: BaseException) -> tuple[str, str]:
    """(verb, text) for a provider exception: ("skipped", why) or ("error", what)."""
    if _is_oom(e):
        return "error", "out of memory"
    text = first_line(e)
    if any(m in str(e).lower() for m in _UNSUPPORTED):
        return "skipped", f"does not support this case: {text}"
    return "error", f"{type(e).__name__}: {text}"


def _release(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _free_bytes(device: Any) -> int | None:
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(dev)[0])


def _l2_bytes(device: Any) -> int:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))
    return 32 << 20


def _skip_reason(p: Provider, case: Case, cfg: RunConfig) -> str | None:
    reason = p.supports(case)
    if reason is None and p.memory is not None:
        free = _free_bytes(cfg.device)
        need = p.memory(case)
        if free is not None and need > cfg.memory_fraction * free:
            reason = f"needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    return reason


# ---------------------------------------------------------------------------------------------
# one provider, one call
# ---------------------------------------------------------------------------------------------


def run_once(
    p: Provider,
    impl: Impl,
    suite: Suite,
    case: Case,
    canon: dict,
    douts: dict | None,
) -> tuple[dict, dict]:
    """One untimed call on fresh copies of the inputs: (outputs, gradients of the canonical
    inputs). Gradients flow back through ``p.adapt`` and ``p.outputs``, so every provider is
    compared in the canonical layout."""
    import torch

    need_grad = douts is not None
    leaves = _leaves(suite, canon, need_grad)
    with torch.enable_grad() if need_grad else torch.no_grad():
        native = p.adapt(leaves, case)
        result = impl.run(native, case)
        outs = p.outputs(result, native, case)
        grads: dict = {}
        if need_grad:
            names = [n for n in suite.grad_outputs if n in outs]
            torch.autograd.backward(
                [outs[n] for n in names], [douts[n].to(outs[n].dtype) for n in names]
            )
            grads = {n: leaves[n].grad for n in suite.grad_names}
    return {n: t.detach() for n, t in outs.items()}, grads


def _native_copies(p: Provider, suite: Suite, case: Case, canon: dict, need_grad: bool, k: int):
    """``k`` copies of the provider's own inputs, each a set of leaf tensors (adapt is not timed)."""
    import torch

    copies = []
    for _ in range(k):
        with torch.enable_grad():
            native = p.adapt(_leaves(suite, canon, need_grad), case)
        copies.append(_map(native, lambda t: t.detach().requires_grad_(t.requires_grad)))
    return copies


def time_provider(
    p: Provider,
    impl: Impl,
    suite: Suite,
    case: Case,
    canon: dict,
    douts: dict | None,
    directions: Sequence[str],
    cfg: RunConfig,
    timer: Callable[..., Timing],
    notes: list[str],
) -> dict[str, Timing]:
    """Time each direction; returns {direction: Timing}."""
    import torch

    train = bool(suite.grad_names)
    in_bytes = sum(t.numel() * t.element_size() for t in canon.values())
    k = n_copies(in_bytes, _l2_bytes(cfg.device), cfg.max_copies)
    natives = _native_copies(p, suite, case, canon, train, k)
    leaves = [t for nat in natives for t in _tensors(nat) if t.requires_grad]
    run = impl.run
    out: dict[str, Timing] = {}
    on_cuda = torch.device(cfg.device).type == "cuda"
    use_graph = (suite.cudagraph if cfg.cudagraph is None else cfg.cudagraph) and on_cuda

    if "fwd" in directions:
        fwd = Rotation(lambda nat: run(nat, case), natives)
        with torch.enable_grad() if train else torch.no_grad():
            if use_graph:
                try:
                    out["fwd"] = timer(fwd, cudagraph=True)
                except Exception as e:  # noqa: BLE001 - capture can fail in many ways
                    notes.append(f"{p.name}: CUDA-graph timing failed ({first_line(e)}); do_bench")
                    out["fwd"] = timer(fwd)
            else:
                out["fwd"] = timer(fwd)

    if douts is None or not ({"bwd", "fwd+bwd"} & set(directions)):
        return out

    # cotangents of the provider's own outputs, from the canonical ones (autograd maps layouts)
    res0 = run(natives[0], case)
    diff0 = _diff_outputs(res0)
    outs0 = p.outputs(res0, natives[0], case)
    names = [n for n in suite.grad_outputs if n in outs0]
    got = torch.autograd.grad(
        [outs0[n] for n in names],
        diff0,
        [douts[n].to(outs0[n].dtype) for n in names],
        allow_unused=True,
    )
    idx = [i for i, g in enumerate(got) if g is not None]
    dvals = [got[i].detach() for i in idx]
    del res0, diff0, outs0, got

    if "bwd" in directions:
        graphs = []
        for nat in natives:
            diff = _diff_outputs(run(nat, case))
            graphs.append(([diff[i] for i in idx], [d.clone() for d in dvals]))

        def bwd(item: tuple) -> None:
            torch.autograd.backward(item[0], item[1], retain_graph=True)

        out["bwd"] = timer(Rotation(bwd, graphs), grad_to_none=leaves)
        del graphs

    if "fwd+bwd" in directions:
        pairs = [(nat, [d.clone() for d in dvals]) for nat in natives]

        def fwd_bwd(item: tuple) -> None:
            diff = _diff_outputs(run(item[0], case))
            torch.autograd.backward([diff[i] for i in idx], item[1])

        out["fwd+bwd"] = timer(Rotation(fwd_bwd, pairs), grad_to_none=leaves)
    return out


# ---------------------------------------------------------------------------------------------
# reference and verification
# ---------------------------------------------------------------------------------------------


def compute_reference(
    suite: Suite, case: Case, canon: dict, douts: dict | None, cfg: RunConfig
) -> tuple[Reference | None, list[str]]:
    """The float64 outputs (and gradients) every provider is checked against; see the module
    docstring for the order. Returns (reference or None, notes)."""
    import torch

    from scanopt.verify import to_numpy

    notes: list[str] = []
    dev = torch.device(cfg.device)

    def to_dev(d: dict) -> dict:
        return {
            n: (torch.as_tensor(v, dtype=torch.float64, device=dev) if v is not None else None)
            for n, v in d.items()
        }

    for kind in suite.reference_order:
        if kind == "numpy" and suite.numpy_ok(case):
            try:
                x = {n: to_numpy(t) for n, t in canon.items()}
                d = None if douts is None else {n: to_numpy(t) for n, t in douts.items()}
                outs, grads = suite.numpy_reference(case, x, d)
                return Reference(to_dev(outs), to_dev(grads), "NumPy float64"), notes
            except ImportError as e:
                notes.append(f"reference: NumPy reference not importable ({first_line(e)})")
            except NotImplementedError:
                pass
        elif kind == "torch64":
            try:
                outs, grads = suite.torch64_reference(case, canon, douts)
                outs = {n: t.detach().double() for n, t in outs.items()}
                grads = {
                    n: (g.detach().double() if g is not None else None) for n, g in grads.items()
                }
                return Reference(outs, grads, "float64 PyTorch on the device"), notes
            except NotImplementedError:
                pass
            except Exception as e:  # noqa: BLE001 - OOM or a failure: fall through to the next
                notes.append(f"reference: float64 PyTorch failed ({first_line(e)})")
                _release(cfg.device)
        elif kind == "trusted":
            case32 = case.with_dtype("float32")
            canon32 = {n: (t.float() if t.is_floating_point() else t) for n, t in canon.items()}
            douts32 = None if douts is None else {n: t.float() for n, t in douts.items()}
            by_name = {p.name: p for p in suite.providers()}
            # --providers also bounds the reference candidates (plus the PyTorch path), so that
            # excluding a provider (say, fla for its minutes of autotuning) never runs it
            allowed = None if cfg.providers is None else {*cfg.providers, "torch"}
            candidates = suite.trusted
            if cfg.reference is not None:
                # --reference: that provider alone (it need not be timed), e.g. scanopt's
                # CUDA-core family instead of fla, whose float32 autotuning takes minutes
                candidates, allowed = (cfg.reference,), None
            for name in candidates:
                p = by_name.get(name)
                if p is None or (allowed is not None and name not in allowed):
                    continue
                try:
                    impl = p.resolve()
                except Unavailable:
                    continue
                if _skip_reason(p, case32, cfg) is not None:
                    continue
                try:
                    with impl.context():
                        outs, grads = run_once(p, impl, suite, case32, canon32, douts32)
                except Exception as e:  # noqa: BLE001 - try the next trusted provider
                    notes.append(f"reference: {name} in float32 failed ({first_line(e)})")
                    _release(cfg.device)
                    continue
                outs = {n: t.double() for n, t in outs.items()}
                grads = {n: (g.double() if g is not None else None) for n, g in grads.items()}
                return Reference(outs, grads, f"{name} in float32", name), notes
    notes.append("reference: none could run at this shape; rows are unverified")
    return None, notes


def verify_outputs(
    suite: Suite,
    case: Case,
    outs: dict,
    grads: dict,
    ref: Reference,
    baseline: tuple[dict, dict] | None,
) -> tuple[list[Check], list[Check]]:
    """(output checks, gradient checks): one ``Check`` per compared tensor (gradients are named
    ``d<input>``)."""
    base_outs, base_grads = baseline if baseline is not None else ({}, {})
    out_checks = [
        checks.check(n, outs.get(n), ref.outs[n], case.dtype, base_outs.get(n))
        for n in suite.output_names
        if n in ref.outs
    ]
    grad_checks = []
    if ref.grads and grads:
        grad_checks = [
            checks.check("d" + n, grads.get(n), ref.grads[n], case.dtype, base_grads.get(n))
            for n in suite.grad_names
            if ref.grads.get(n) is not None
        ]
    return out_checks, grad_checks


def _status(cs: Iterable[Check], ref: Reference | None, provider: str) -> tuple[str, float | None]:
    cs = list(cs)
    if ref is None or not cs:
        return SKIPPED, None
    err = max(c.err for c in cs)
    if not all(c.passed for c in cs):
        return FAILED, err
    return (SELF if ref.provider == provider else OK), err


# ---------------------------------------------------------------------------------------------
# a case, a sweep
# ---------------------------------------------------------------------------------------------


def select_providers(suite: Suite, names: Sequence[str] | None) -> list[Provider]:
    """The suite's providers, filtered by name (names that the suite lacks are ignored here; the
    command line rejects names that no selected op knows)."""
    ps = suite.providers()
    return ps if names is None else [p for p in ps if p.name in names]


def run_case(
    suite: Suite,
    case: Case,
    cfg: RunConfig,
    timer: Callable[..., Timing],
    env: dict[str, str] | None = None,
    ceilings: dict[str, Any] | None = None,
) -> CaseResult:
    """Verify and time every selected provider on one case; returns its rows and notes."""
    import torch

    from scanopt.bench.registry import torch_dtype

    env = env or {}
    device = torch.device(cfg.device)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    canon = suite.make_inputs(case, device, gen)
    directions = [d for d in suite.directions if cfg.directions is None or d in cfg.directions]
    need_grad = bool(suite.grad_names) and any(d != "fwd" for d in directions)
    _, out_specs = suite.specs(case)
    douts = None
    if need_grad:
        douts = {
            n: torch.randn(out_specs[n].shape, generator=gen, device=device).to(
                torch_dtype(out_specs[n].dtype)
            )
            for n in suite.grad_outputs
        }
    result = CaseResult(case, [])
    ref = None
    if cfg.verify:
        ref, ref_notes = compute_reference(suite, case, canon, douts, cfg)
        result.notes += ref_notes
        result.reference = ref.source if ref is not None else "none"
    else:
        result.reference = "not verified (--no-verify)"

    baseline = None
    providers = select_providers(suite, cfg.providers)
    # the torch provider first: its same-dtype results are the baseline of the 2x rule
    for p in sorted(providers, key=lambda q: q.name != "torch"):
        try:
            impl = p.resolve()
        except Unavailable as e:
            result.notes.append(f"{p.name}: skipped ({e})")
            continue
        reason = _skip_reason(p, case, cfg)
        if reason:
            result.notes.append(f"{p.name}: skipped ({reason})")
            continue
        stage = "run"
        try:
            with impl.context():
                outs, grads = run_once(p, impl, suite, case, canon, douts)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                cs = verify_outputs(suite, case, outs, grads, ref, baseline) if ref else ([], [])
                if p.name == "torch":
                    baseline = (outs, grads)
                del outs, grads
                stage = "timing"
                timings = time_provider(
                    p, impl, suite, case, canon, douts, directions, cfg, timer, result.notes
                )
        except Exception as e:  # noqa: BLE001 - one provider's failure must not end the sweep
            verb, what = _describe_error(e)
            where = "" if verb == "skipped" else f" during {stage}"
            result.notes.append(f"{p.name}: {verb}{where} ({what})")
            _release(device)
            continue
        for c in cs[0] + cs[1]:
            if not c.passed:
                result.notes.append(f"{p.name}: {c}")  # "<tensor>: err <= limit (...) FAILED"
        if impl.detail:
            result.notes.append(f"{p.name}: {impl.detail}")
        result.rows += _rows(suite, case, p.name, timings, cs, ref, env, ceilings)
        _release(device)
    order = {p.name: i for i, p in enumerate(providers)}
    result.rows.sort(key=lambda r: order[r.provider])
    return result


def _rows(
    suite: Suite,
    case: Case,
    provider: str,
    timings: dict[str, Timing],
    cs: tuple[list[Check], list[Check]],
    ref: Reference | None,
    env: dict[str, str],
    ceilings: dict[str, Any] | None,
) -> list[Row]:
    out_checks, grad_checks = cs
    rows = []
    for direction, t in timings.items():
        relevant = {"fwd": out_checks, "bwd": grad_checks, "fwd+bwd": out_checks + grad_checks}[
            direction
        ]
        verified, err = _status(relevant, ref, provider)
        fl = suite.flops(case, direction)
        tf = tflops(fl, t.p50) if fl else None
        gb = gbps(suite.nbytes(case, direction), t.p50) if suite.metric == "gbps" else None
        pct = None
        if ceilings:
            if suite.metric == "tflops" and tf is not None and ceilings.get("matmul_tflops"):
                pct = 100.0 * tf / ceilings["matmul_tflops"]
            elif gb is not None and ceilings.get("copy_gbps"):
                pct = 100.0 * gb / ceilings["copy_gbps"]
        rows.append(
            Row(
                op=case.op,
                direction=direction,
                provider=provider,
                dtype=case.dtype,
                shape=case.shape,
                ms_p50=t.p50,
                ms_p20=t.p20,
                ms_p80=t.p80,
                tflops=tf,
                gbps=gb,
                pct_of_ceiling=pct,
                rel_err=err if err is None or math.isfinite(err) else math.inf,
                verified=verified,
                **env,
            )
        )
    return rows


def run_sweep(
    work: Sequence[tuple[Suite, Case]],
    cfg: RunConfig,
    timer: Callable[..., Timing],
    env: dict[str, str] | None = None,
    ceilings: dict[str, Any] | None = None,
    on_case: Callable[[CaseResult], None] | None = None,
    progress: bool = True,
) -> list[CaseResult]:
    """Run every (suite, case) in order, with a progress bar (tqdm when importable)."""
    bar = _progress_bar(len(work)) if progress else None
    results = []
    try:
        for suite, case in work:
            if bar is not None:
                bar.set_description(f"{case.op} {case.dtype} {case.shape}")
            res = run_case(suite, case, cfg, timer, env, ceilings)
            results.append(res)
            if on_case is not None:
                on_case(res)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


class _PlainBar:
    """Fallback progress: one line per case on stderr."""

    def __init__(self, total: int):
        self.total, self.n = total, 0

    def set_description(self, text: str) -> None:
        import sys

        print(f"[{self.n + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        pass


def _progress_bar(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainBar(total)
    return tqdm(total=total, unit="case", leave=False, dynamic_ncols=True)


__all__ = [
    "CaseResult",
    "Reference",
    "RunConfig",
    "compute_reference",
    "run_case",
    "run_once",
    "run_sweep",
    "select_providers",
    "time_provider",
    "verify_outputs",
]
