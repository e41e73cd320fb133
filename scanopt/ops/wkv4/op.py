"""RWKV-4 WKV: ``torch.library`` ops, autograd, the public :func:`wkv4` and ``self_check``.

Backends (``scanopt._env.backend_for``): the Triton kernels of ``launch.py`` on CUDA tensors (and
on CPU tensors under ``TRITON_INTERPRET=1``), else :func:`wkv4_torch`, the per-token PyTorch loop
of transformers' ``rwkv_linear_attention_cpu`` (fp32 math), differentiated by autograd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from scanopt._env import backend_for
from scanopt._tensor import FLOAT_DTYPES, check_tensor
from scanopt.ops._eager import apply, eager, make_function

__all__ = ["wkv4", "wkv4_torch", "self_check"]

#: transformers' running max of an empty state (num = den = 0)
EMPTY_MAX = -1e38
_STATE_PARTS = ("num", "den", "max")

# --------------------------------------------------------------------------------------------
# PyTorch implementation (the torch backend, and the same-dtype baseline of the verify rule)


def wkv4_torch(
    time_decay: Tensor,
    time_first: Tensor,
    key: Tensor,
    value: Tensor,
    state: Sequence[Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """transformers' ``rwkv_linear_attention_cpu`` loop (fp32 math, output in ``key``'s dtype).

    Differentiable by autograd; returns ``(out, (num, den, max))`` with the final state in fp32.
    """
    B, T, C = key.shape
    w = -torch.exp(time_decay.float())
    u = time_first.float()
    if state is None:
        num = torch.zeros(B, C, dtype=torch.float32, device=key.device)
        den = torch.zeros(B, C, dtype=torch.float32, device=key.device)
        mx = torch.full((B, C), EMPTY_MAX, dtype=torch.float32, device=key.device)
    else:
        num, den, mx = (s.float() for s in state)
    outs = []
    for t in range(T):
        k = key[:, t].float()
        v = value[:, t].float()
        m = torch.maximum(mx, u + k)
        e1 = torch.exp(mx - m)
        e2 = torch.exp(u + k - m)
        outs.append(((e1 * num + e2 * v) / (e1 * den + e2)).to(key.dtype))
        q = torch.maximum(mx + w, k)
        f1 = torch.exp(mx + w - q)
        f2 = torch.exp(k - q)
        num, den, mx = f1 * num + f2 * v, f1 * den + f2, q
    out = torch.stack(outs, 1) if T else key.new_empty((B, 0, C))
    return out, (num, den, mx)


def _torch_fwd(time_decay, time_first, key, value, state):
    with torch.no_grad():
        out, final = wkv4_torch(time_decay, time_first, key, value, _unstack(state))
    return out, torch.stack(final).clone()


def _torch_bwd(grad_out, grad_final, time_decay, time_first, key, value, state):
    """Hand-written VJP of :func:`wkv4_torch` (the literal max-trick loop, fp32): each
    ``maximum`` passes its cotangent to one branch, the running max on ties."""
    B, T, C = key.shape
    f32 = dict(dtype=torch.float32, device=key.device)
    w = -torch.exp(time_decay.float())
    u = time_first.float()
    if state is None:
        num, den = torch.zeros(B, C, **f32), torch.zeros(B, C, **f32)
        mx = torch.full((B, C), EMPTY_MAX, **f32)
    else:
        num, den, mx = (s.float() for s in state.unbind(0))
    states = []
    for t in range(T):
        states.append((num, den, mx))
        k, v = key[:, t].float(), value[:, t].float()
        q = torch.maximum(mx + w, k)
        f1, f2 = torch.exp(mx + w - q), torch.exp(k - q)
        num, den, mx = f1 * num + f2 * v, f1 * den + f2, q
    if grad_final is not None:
        g_num, g_den, g_mx = (g.float() for g in grad_final.unbind(0))
    else:
        g_num, g_den, g_mx = (torch.zeros(B, C, **f32) for _ in range(3))
    dw, du = torch.zeros(C, **f32), torch.zeros(C, **f32)
    dk, dv = torch.empty(B, T, C, **f32), torch.empty(B, T, C, **f32)
    gy = grad_out.float()
    for t in reversed(range(T)):
        num, den, mx = states[t]
        k, v = key[:, t].float(), value[:, t].float()
        # state update: num' = f1 num + f2 v, den' = f1 den + f2, max' = q = max(mx + w, k)
        mw = mx + w
        q = torch.maximum(mw, k)
        f1, f2 = torch.exp(mw - q), torch.exp(k - q)
        gf1, gf2 = g_num * num + g_den * den, g_num * v + g_den
        n_num, n_den, gv = g_num * f1, g_den * f1, g_num * f2
        g_mw, gk = gf1 * f1, gf2 * f2
        g_q = g_mx - g_mw - gk
        take = mw >= q
        g_mw = g_mw + torch.where(take, g_q, 0.0)
        gk = gk + torch.where(take, 0.0, g_q)
        # output: y = (e1 num + e2 v) / (e1 den + e2), m = max(mx, u + k)
        pk = u + k
        m = torch.maximum(mx, pk)
        e1, e2 = torch.exp(mx - m), torch.exp(pk - m)
        z = e1 * den + e2
        y = (e1 * num + e2 * v) / z
        g_a = gy[:, t] / z
        g_b = -g_a * y
        ge1, ge2 = g_a * num + g_b * den, g_a * v + g_b
        n_num = n_num + g_a * e1
        n_den = n_den + g_b * e1
        gv = gv + g_a * e2
        n_mx, g_p = ge1 * e1, ge2 * e2
        g_m = -(n_mx + g_p)
        take = mx >= pk
        n_mx = n_mx + torch.where(take, g_m, 0.0) + g_mw
        g_p = g_p + torch.where(take, 0.0, g_m)
        dw += g_mw.sum(0)
        du += g_p.sum(0)
        dk[:, t] = gk + g_p
        dv[:, t] = gv
        g_num, g_den, g_mx = n_num, n_den, n_mx
    g_state = (
        torch.stack([g_num, g_den, g_mx])
        if state is not None
        else key.new_empty((0,), dtype=torch.float32)
    )
    return (
        (dw * w).to(time_decay.dtype),
        du.to(time_first.dtype),
        dk.to(key.dtype),
        dv.to(value.dtype),
        g_state,
    )


def _unstack(state: Tensor | None):
    return None if state is None else tuple(state.unbind(0))


# --------------------------------------------------------------------------------------------
# torch.library ops (chunk > 0: the Triton kernels with that chunk length; chunk == 0: PyTorch)


def _wkv4_fwd_impl(
    time_decay: Tensor,
    time_first: Tensor,
    key: Tensor,
    value: Tensor,
    state: Tensor | None,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(out, final (3, B, C) fp32, chunk states (B, NC, 3, C) fp32, argmax (B, C)
    int32)``; the last two are empty on the PyTorch path."""
    if chunk > 0:
        from scanopt.ops.wkv4 import launch

        return launch.wkv4_fwd(time_decay, time_first, key, value, state, {"chunk": chunk})
    out, final = _torch_fwd(time_decay, time_first, key, value, state)
    empty_f = key.new_empty((0,), dtype=torch.float32)
    return out, final, empty_f, key.new_empty((0,), dtype=torch.int32)


_wkv4_fwd_op = torch.library.custom_op("scanopt::wkv4_fwd", mutates_args=())(_wkv4_fwd_impl)


@_wkv4_fwd_op.register_fake
def _(time_decay, time_first, key, value, state, chunk):
    B, T, C = key.shape
    out = key.new_empty((B, T, C))
    final = key.new_empty((3, B, C), dtype=torch.float32)
    if chunk > 0:
        states = key.new_empty((B, (T + chunk - 1) // chunk, 3, C), dtype=torch.float32)
        fidx = key.new_empty((B, C), dtype=torch.int32)
    else:
        states = key.new_empty((0,), dtype=torch.float32)
        fidx = key.new_empty((0,), dtype=torch.int32)
    return out, final, states, fidx


def _wkv4_bwd_impl(
    grad_out: Tensor,
    grad_final: Tensor | None,
    time_decay: Tensor,
    time_first: Tensor,
    key: Tensor,
    value: Tensor,
    state: Tensor | None,
    final: Tensor,
    states: Tensor,
    fidx: Tensor,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns the gradients of ``(time_decay, time_first, key, value, state)``; the last is
    empty when ``state`` is ``None``."""
    if chunk > 0:
        from scanopt.ops.wkv4 import launch

        g_td, g_tf, gk, gv, gs = launch.wkv4_bwd(
            grad_out, grad_final, time_decay, time_first, key, value, state, final, states,
            fidx, chunk,
        )  # fmt: skip
        if gs is None:
            gs = key.new_empty((0,), dtype=torch.float32)
        return g_td, g_tf, gk, gv, gs
    return _torch_bwd(grad_out, grad_final, time_decay, time_first, key, value, state)


_wkv4_bwd_op = torch.library.custom_op("scanopt::wkv4_bwd", mutates_args=())(_wkv4_bwd_impl)


@_wkv4_bwd_op.register_fake
def _(grad_out, grad_final, time_decay, time_first, key, value, state, final, states, fidx, chunk):
    g_state = (
        torch.empty_like(state) if state is not None else key.new_empty((0,), dtype=torch.float32)
    )
    return (*(torch.empty_like(x) for x in (time_decay, time_first, key, value)), g_state)


def _setup_context(ctx, inputs, output):
    time_decay, time_first, key, value, state, chunk = inputs
    out, final, states, fidx = output
    ctx.save_for_backward(time_decay, time_first, key, value, state, final, states, fidx)
    ctx.chunk, ctx.out_dtype = chunk, out.dtype
    # unused outputs get None, not zeros: no memsets, and the kernels skip the final-state
    # cotangent when it is absent
    ctx.mark_non_differentiable(states, fidx)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_final, _grad_states, _grad_fidx):
    return _backward_with(torch.ops.scanopt.wkv4_bwd, ctx, grad_out, grad_final)


def _backward_eager(ctx, grad_out, grad_final, _grad_states, _grad_fidx):
    return _backward_with(_wkv4_bwd_impl, ctx, grad_out, grad_final)


def _backward_with(bwd, ctx, grad_out, grad_final):
    time_decay, time_first, key, value, state, final, states, fidx = ctx.saved_tensors
    if grad_out is None and grad_final is None:
        return (None,) * 6
    if grad_out is None:
        grad_out = torch.zeros(key.shape, dtype=ctx.out_dtype, device=key.device)
    g_td, g_tf, gk, gv, gs = bwd(
        grad_out, grad_final, time_decay, time_first, key, value, state, final, states, fidx,
        ctx.chunk,
    )  # fmt: skip
    return g_td, g_tf, gk, gv, (gs if state is not None else None), None


_wkv4_fwd_op.register_autograd(_backward, setup_context=_setup_context)
#: the same forward/backward without the dispatcher, for eager calls (``scanopt.ops._eager``)
_Wkv4Function = make_function("_Wkv4Function", _wkv4_fwd_impl, _setup_context, _backward_eager)


# --------------------------------------------------------------------------------------------
# public API


def _check_state(state: object, B: int, C: int, device: torch.device) -> Tensor | None:
    if state is None:
        return None
    if not isinstance(state, (list, tuple)) or len(state) != 3:
        raise ValueError(
            "state must be None or a list [num, den, max] of three (B, C) tensors "
            f"(transformers' layout), got {type(state).__name__}"
            + (f" of length {len(state)}" if isinstance(state, (list, tuple)) else "")
        )
    parts = [
        check_tensor(f"state[{i}] ({part})", s, shape=(B, C), dtypes=FLOAT_DTYPES, device=device)
        for i, (part, s) in enumerate(zip(_STATE_PARTS, state))
    ]
    return torch.stack([s.float() for s in parts])


def wkv4(
    time_decay: Tensor,
    time_first: Tensor,
    key: Tensor,
    value: Tensor,
    state: Sequence[Tensor] | None = None,
    return_state: bool = False,
) -> tuple[Tensor, list[Tensor] | None]:
    """RWKV-4 WKV, drop-in for transformers' ``rwkv_linear_attention``
    (``transformers.models.rwkv.modeling_rwkv``), parallel over time with no length limit.

    Per channel, with ``w = -exp(time_decay)`` and ``u = time_first``::

        out_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
              / (sum_{i<t} e^{(t-1-i) w + k_i}     + e^{u + k_t})

    computed with the max trick of the state ``(num, den, max)`` (``num`` and ``den`` stored
    divided by ``e^max``), so keys of any magnitude neither overflow nor lose the small terms.

    Args:
        time_decay: ``(C,)`` raw decay parameter (the per-step log decay is ``-exp(time_decay)``).
        time_first: ``(C,)`` bonus ``u`` of the current token.
        key: ``(B, T, C)``.
        value: ``(B, T, C)``.
        state: ``None`` or a list ``[num, den, max]`` of three ``(B, C)`` tensors (fp32 is what
            transformers passes; other float dtypes are upcast). The empty state is
            ``num = den = 0, max = -1e38``. Differentiable.
        return_state: also return the final state when no ``state`` was passed.

    Returns:
        ``(out, state)``: ``out`` ``(B, T, C)`` in ``key``'s dtype; ``state`` the final
        ``[num, den, max]`` (three ``(B, C)`` fp32 tensors) when ``return_state`` or a ``state``
        was passed, else ``None``. Gradients flow to ``time_decay``, ``time_first``, ``key``,
        ``value``, the incoming ``state`` and from the returned state (chained chunks train as
        one long sequence).

    bf16, fp16 or fp32 inputs (dtypes may differ), fp32 math; any ``T`` (no ``T_MAX``; the
    kernels are parallel over time), any ``B`` and ``C`` (no ``B * C % 32`` rule); ``key`` /
    ``value`` may have any strides (only a non-unit stride along ``C`` costs a copy).

    Example (transformers: ``modeling_rwkv.rwkv_linear_attention = scanopt.wkv4``)::

        out, state = scanopt.wkv4(att.time_decay, att.time_first, k, v, state=None,
                                  return_state=True)   # k, v: (B, T, C) bf16 on CUDA
        out2, state = scanopt.wkv4(att.time_decay, att.time_first, k2, v2, state=state)
    """
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES)
    B, T, C = key.shape
    check_tensor("value", value, shape=(B, T, C), dtypes=FLOAT_DTYPES, device=key.device)
    check_tensor("time_decay", time_decay, shape=(C,), dtypes=FLOAT_DTYPES, device=key.device)
    check_tensor("time_first", time_first, shape=(C,), dtypes=FLOAT_DTYPES, device=key.device)
    s = _check_state(state, B, C, key.device)
    chunk = 0
    if T > 0 and backend_for(key.device.type) == "triton":
        from scanopt.ops.wkv4 import launch

        cfg = launch.resolve_config("fwd", None, B=B, T=T, C=C, dtype=key.dtype, device=key.device)
        chunk = cfg["chunk"]
    args = (time_decay, time_first, key, value, s, chunk)
    if eager(*args):
        out, final, _, _ = apply(_Wkv4Function, _wkv4_fwd_impl, *args)
    else:
        out, final, _, _ = torch.ops.scanopt.wkv4_fwd(time_decay, time_first, key, value, s, chunk)
    if return_state or state is not None:
        return out, list(final.unbind(0))
    return out, None


# --------------------------------------------------------------------------------------------
# inputs, verification against the float64 reference, self_check


def make_inputs(
    B: int,
    T: int,
    C: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    key_scale: float = 1.0,
    decay: str = "rwkv4",
    state: bool = False,
    seed: int = 0,
) -> dict:
    """Random RWKV-4-shaped inputs and cotangents.

    ``time_decay`` / ``time_first`` are fp32 (as transformers keeps them), ``key`` / ``value`` in
    ``dtype``. ``decay``: ``"rwkv4"`` spreads ``time_decay`` over RWKV-4's initialisation range
    [-5, 3] (per-step decay ``exp(-exp(td))`` from 0.993 down to 2e-9); ``"mixed"`` adds channels
    with ``td`` in [3, 6] (decay down to e^-403) and [-12, -8] (almost no decay). ``key_scale``
    multiplies N(0, 1) keys (60 gives keys beyond +-100). With ``state``, a random incoming state
    (its max near the keys). Returns a dict with ``time_decay, time_first, key, value, state``
    (``None`` unless asked), ``grad_out`` and ``grad_state`` (cotangents).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)

    td = -5.0 + 8.0 * torch.rand(C, generator=g, dtype=torch.float64)
    if decay == "mixed":
        kind = torch.randint(0, 3, (C,), generator=g)
        td = torch.where(kind == 1, 3.0 + 3.0 * torch.rand(C, generator=g, dtype=torch.float64), td)
        td = torch.where(
            kind == 2, -12.0 + 4.0 * torch.rand(C, generator=g, dtype=torch.float64), td
        )
    elif decay != "rwkv4":
        raise ValueError(f"decay must be 'rwkv4' or 'mixed', got {decay!r}")
    x = {
        "time_decay": td,
        "time_first": 0.5 * randn(C),
        "key": key_scale * randn(B, T, C),
        "value": randn(B, T, C),
        "state": None,
        "grad_out": randn(B, T, C),
        "grad_state": [randn(B, C) for _ in range(3)],
    }
    if state:
        x["state"] = [randn(B, C), torch.exp(randn(B, C)), key_scale * randn(B, C)]
    out = {}
    for name, t in x.items():
        if t is None:
            out[name] = None
        elif isinstance(t, list):
            out[name] = [s.to(device=device, dtype=torch.float32) for s in t]
        elif name in ("time_decay", "time_first"):
            out[name] = t.to(device=device, dtype=torch.float32)
        else:
            out[name] = t.to(device=device, dtype=dtype)
    return out


def check_case(inputs: dict, case: str = "", *, grad_state: bool = True) -> object:
    """Run :func:`wkv4` (whatever backend is active) forward and backward on ``inputs`` (from
    :func:`make_inputs`) and compare the output, the final state and every gradient (including
    the incoming state's) with the float64 reference, using :func:`wkv4_torch` in the same
    dtypes as the baseline. ``grad_state``: also back-propagate from the final state.
    Returns a :class:`scanopt.verify.Report`."""
    from scanopt.reference import wkv4_bwd as ref_bwd
    from scanopt.reference import wkv4_fwd as ref_fwd
    from scanopt.verify import Report, to_numpy

    names = ("time_decay", "time_first", "key", "value")
    s0 = inputs["state"]

    def run(fn):
        args = [inputs[n].detach().clone().requires_grad_() for n in names]
        st = [s.detach().clone().requires_grad_() for s in s0] if s0 is not None else None
        out, fin = fn(*args, st)
        outputs, cot = [out], [inputs["grad_out"]]
        if grad_state:
            outputs += list(fin)
            cot += inputs["grad_state"]
        leaves = args + (st or [])
        grads = torch.autograd.grad(outputs, leaves, cot)
        return out, fin, grads

    out, fin, grads = run(lambda *a: wkv4(*a[:4], state=a[4], return_state=True))
    b_out, b_fin, b_grads = run(wkv4_torch)

    np_in = [to_numpy(inputs[n]) for n in names]
    np_s0 = tuple(to_numpy(s) for s in s0) if s0 is not None else None
    ref_out, ref_fin = ref_fwd(*np_in, np_s0)
    dstate = tuple(to_numpy(g) for g in inputs["grad_state"]) if grad_state else None
    ref_g = ref_bwd(to_numpy(inputs["grad_out"]), *np_in, np_s0, dstate)

    dtype = str(inputs["key"].dtype).replace("torch.", "")
    report = Report("wkv4", case)
    report.check("out", out, ref_out, baseline=b_out)
    for i, part in enumerate(_STATE_PARTS):
        report.check(f"state.{part}", fin[i], ref_fin[i], baseline=b_fin[i], dtype=dtype)
    for i, name in enumerate(names):
        report.check(f"d{name}", grads[i], ref_g[name], baseline=b_grads[i], dtype=dtype)
    if s0 is not None:
        for i, part in enumerate(_STATE_PARTS):
            report.check(
                f"dstate.{part}", grads[4 + i], ref_g["state"][i], baseline=b_grads[4 + i],
                dtype=dtype,
            )  # fmt: skip
    return report


def self_check(device: str, quick: bool) -> list:
    """Verify :func:`wkv4` on ``device`` against the float64 reference (``scanopt verify``)."""
    on_gpu = device.startswith("cuda")
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if on_gpu else [torch.float32]
    if quick:
        cases = [(2, 37, 24, 1.0, "rwkv4", True)]
    else:
        cases = [
            (2, 1, 3, 1.0, "rwkv4", False),
            (2, 65, 40, 1.0, "mixed", True),
            (1, 100, 64, 60.0, "rwkv4", True),
        ]
        if on_gpu:
            cases.append((2, 4096, 520, 1.0, "mixed", True))
    reports = []
    for dtype in dtypes:
        for B, T, C, key_scale, decay, with_state in cases:
            inputs = make_inputs(
                B, T, C, dtype=dtype, device=device, key_scale=key_scale, decay=decay,
                state=with_state, seed=T + C,
            )  # fmt: skip
            case = (
                f"B{B}-T{T}-C{C}-keys{key_scale:g}-{decay}-state={with_state}-"
                f"{str(dtype).replace('torch.', '')}"
            )
            reports.append(check_case(inputs, case))
    return reports
