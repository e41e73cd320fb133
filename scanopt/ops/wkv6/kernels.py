"""Triton kernels for RWKV-6 WKV: fused recurrent and chunk-parallel, fp32 state in registers.

Recurrence (fla's form, state ``h`` ``[K, V]`` per (batch, head), ``q = scale * r``):

    o_t = (h_{t-1} + diag(u) k_t v_t^T)^T q_t = h_{t-1}^T q_t + (sum_k u k_t q_t) v_t
    h_t = diag(exp(w_t)) h_{t-1} + k_t v_t^T

Layout and loop structure as in ``scanopt/ops/wkv7/kernels.py``: each program owns one (batch,
head, V-block) and holds the TRANSPOSED state ``h^T`` ``[BV, BK]`` with K along the lanes of one
warp (no shared-memory conversions, no barriers in the loops), and every serial loop keeps the
next ``PF`` steps' inputs in flight. Nothing is divided by a decay or exponentiated with a
positive argument: exact in fp32 for any decay in (0, 1].

Backward (``D`` = cotangent of h_t, ``c_t = v_t . do_t``, ``e_t = sum_k u k_t q_t``):

    dq = h_{t-1} do_t + u k_t c_t             du += q_t k_t c_t            (summed over b, t)
    dk = D v_t + u q_t c_t                    dv = D^T k_t + e_t do_t
    dw = exp(w_t) * rowsum(D * h_{t-1})
    D <- diag(exp(w_t)) D + q_t do_t^T

Sums over V (dq, dk, dw, du, and c_t) are partial per V-block; the launcher adds them.

Kernel families (config ``MODE``; same 16-step checkpoints as wkv7):

- recurrent: ``wkv6_fwd_kernel``; ``wkv6_bwd_kernel`` (checkpointed pieces backwards, states
  recomputed into a per-program work space);
- chunked: over a chunk the transition is diagonal, h_end = diag(p_c) h_start + U_c with
  p_c = prod_t exp(w_t) (a running product, not exp of a log-space sum whose differences would
  cancel). ``wkv6_chunk_transition_kernel`` (parallel: U_c, p_c), ``wkv6_chunk_state_fwd_kernel``
  (serial over chunks, elementwise), ``wkv6_chunk_out_kernel`` (parallel: o, checkpoints);
  backward ``wkv6_chunk_adjoint_kernel`` (parallel: Y_c, p_c), ``wkv6_chunk_state_bwd_kernel``
  (serial: dH <- diag(p_c) dH + Y_c), ``wkv6_chunk_bwd_kernel`` (parallel; 16-step pieces with
  their states in registers).
"""

import triton
import triton.language as tl

from scanopt.ops._tc_helpers import (
    FACTOR_LIMIT,
    decay_to_end,
    last_row,
    load_flat,
    next_rows,
    other_path,
    prev_rows,
    read_block_decays,
    store_flat,
)

# ``USE`` bit masks of the inputs a loop reads: r 1, k 2, v 4, w 8, do 16
# (forward 15, recompute 14, adjoint 31, chunk adjoint 25)


@triton.jit
def _load_one(ptr, offset, mask, USED: tl.constexpr):
    if USED:
        return tl.load(ptr + offset, mask=mask, other=0.0)
    else:
        return 0.0


@triton.jit
def _load_step(xs, t, lo, hi, offs, idx, USE: tl.constexpr):
    """The inputs (r, k, v, w, do) of step ``t`` in their stored dtypes; zeros when t is outside
    [lo, hi); the scalar 0.0 for the inputs ``USE`` leaves out."""
    r, k, v, w, do = xs
    off_x, off_y, HK, HV = offs
    o_k, o_v, m_k, m_v = idx
    ok = (t >= lo) & (t < hi)
    p_x = off_x + t * HK + o_k
    p_y = off_y + t * HV + o_v
    mk = m_k & ok
    mv = m_v & ok
    return (
        _load_one(r, p_x, mk, (USE & 1) != 0),
        _load_one(k, p_x, mk, (USE & 2) != 0),
        _load_one(v, p_y, mv, (USE & 4) != 0),
        _load_one(w, p_x, mk, (USE & 8) != 0),
        _load_one(do, p_y, mv, (USE & 16) != 0),
    )


@triton.jit
def _queue_init(xs, t0, step, lo, hi, offs, idx, PF: tl.constexpr, USE: tl.constexpr):
    """The inputs of steps t0, t0 + step, ..., t0 + (PF - 1) step."""
    q = ()
    for j in tl.static_range(PF):
        q = q + (_load_step(xs, t0 + j * step, lo, hi, offs, idx, USE),)
    return q


@triton.jit
def _queue_next(q, xs, t, lo, hi, offs, idx, PF: tl.constexpr, USE: tl.constexpr):
    """Drop the head of the queue and append the inputs of step ``t``."""
    q2 = ()
    for j in tl.static_range(1, PF):
        q2 = q2 + (q[j],)
    return q2 + (_load_step(xs, t, lo, hi, offs, idx, USE),)


@triton.jit
def _queue_set(q, j: tl.constexpr, x, PF: tl.constexpr):
    """The queue with slot ``j`` replaced by ``x``. Loops unrolled by PF refill the slot they
    just consumed, so every slot keeps its register across iterations (no queue shift: a shift
    moves registers whose loads are still in flight, which waits for them every step)."""
    q2 = ()
    for i in tl.static_range(PF):
        if i == j:
            q2 = q2 + (x,)
        else:
            q2 = q2 + (q[i],)
    return q2


@triton.jit
def _step(h, x_k, x_v, x_w):
    """h^T [BV, BK] after one step (inputs as loaded)."""
    b_d = tl.exp(x_w.to(tl.float32))
    return h * b_d[None, :] + x_v.to(tl.float32)[:, None] * x_k.to(tl.float32)[None, :]


@triton.jit
def _output(h, x_r, x_k, x_v, b_u, scale):
    """o_t [BV] from h_{t-1}^T and the step's inputs."""
    b_q = x_r.to(tl.float32) * scale
    b_e = tl.sum(b_u * x_k.to(tl.float32) * b_q, 0)  # scalar: sum_k u k q
    return tl.sum(h * b_q[None, :], 1) + b_e * x_v.to(tl.float32)


@triton.jit
def _adjoint(b_hp, b_dh, b_du, x, b_u, scale):
    """Adjoint of one step from h_{t-1}^T (``b_hp``) and the cotangent of h_t^T (``b_dh``).
    Returns (cotangent of h_{t-1}^T, running du, dq, dk, dw [BK] partial over this V-block,
    dv [BV])."""
    x_r, x_k, x_v, x_w, x_do = x
    b_q = x_r.to(tl.float32) * scale
    b_k = x_k.to(tl.float32)
    b_v = x_v.to(tl.float32)
    b_do = x_do.to(tl.float32)
    b_d = tl.exp(x_w.to(tl.float32))
    b_c = tl.sum(b_v * b_do, 0)  # scalar, partial over V: v . do
    b_e = tl.sum(b_u * b_k * b_q, 0)  # scalar: sum_k u k q
    b_dq = tl.sum(b_hp * b_do[:, None], 0) + b_u * b_k * b_c
    b_du += b_q * b_k * b_c
    b_dk = tl.sum(b_dh * b_v[:, None], 0) + b_u * b_q * b_c
    b_dv = tl.sum(b_dh * b_k[None, :], 1) + b_e * b_do
    b_dw = b_d * tl.sum(b_dh * b_hp, 0)
    b_dh = b_dh * b_d[None, :] + b_do[:, None] * b_q[None, :]
    return b_dh, b_du, b_dq * scale, b_dk, b_dw, b_dv


@triton.jit
def _store_grads(gs, g, t, off_x, off_y, off_part, HK, HV, o_k, o_v, m_k, m_v, T):
    """Store one step's gradients (``gs`` = (dr, dk, dw, dv) pointers)."""
    dr, dk, dw, dv = gs
    _, _, g_r, g_k, g_w, g_v = g
    ok = (t >= 0) & (t < T)
    p_x = off_part + off_x + t * HK + o_k
    mk = m_k & ok
    tl.store(dr + p_x, g_r.to(dr.dtype.element_ty), mask=mk)
    tl.store(dk + p_x, g_k.to(dk.dtype.element_ty), mask=mk)
    tl.store(dw + p_x, g_w.to(dw.dtype.element_ty), mask=mk)
    tl.store(dv + off_y + t * HV + o_v, g_v.to(dv.dtype.element_ty), mask=m_v & ok)


# ---------------------------------------------------------------------------------------------
# recurrent


@triton.jit(do_not_specialize=["T"])
def wkv6_fwd_kernel(
    r,  # [B, T, H, K] receptance (query)
    k,  # [B, T, H, K] key
    v,  # [B, T, H, V] value
    w,  # [B, T, H, K] log decay
    u,  # [H, K] bonus of the current token
    o,  # [B, T, H, V] output
    h0,  # [B, H, K, V] initial state (read when HAS_H0)
    ht,  # [B, H, K, V] fp32 final state
    ckpt,  # [B, H, NT, K, V] fp32 state before steps 0, CHUNK, 2 CHUNK, ... (when STORE_CKPT)
    scale,
    T,
    H,
    K,
    V,
    BK: tl.constexpr,
    BV: tl.constexpr,
    CHUNK: tl.constexpr,
    PF: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_CKPT: tl.constexpr,
):
    i_v = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    HK = tl.cast(H, tl.int64) * K
    HV = tl.cast(H, tl.int64) * V

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_v[:, None] & m_k[None, :]
    o_h = o_k[None, :] * V + o_v[:, None]  # [BV, BK] offsets of h^T inside a [K, V] state

    b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
    b_h = tl.zeros([BV, BK], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + i_bh * K * V + o_h, mask=m_h, other=0.0).to(tl.float32)

    xs = (r, k, v, w, v)
    offs = (i_b * T * HK + i_h * K, i_b * T * HV + i_h * V, HK, HV)
    idx = (o_k, o_v, m_k, m_v)
    p_o = o + i_b * T * HV + i_h * V + o_v
    NT = (T + CHUNK - 1) // CHUNK
    p_c = ckpt + i_bh * NT * K * V + o_h

    q = _queue_init(xs, 0, 1, 0, T, offs, idx, PF, 15)
    for t_blk in range(0, T, PF):
        for j in tl.static_range(PF):
            t = t_blk + j
            x_r, x_k, x_v, x_w, _ = q[j]
            q = _queue_set(q, j, _load_step(xs, t + PF, 0, T, offs, idx, 15), PF)
            if t < T:
                if STORE_CKPT:
                    if t % CHUNK == 0:
                        # flat: the state keeps one layout (store_flat)
                        store_flat(p_c + (t // CHUNK) * K * V, b_h, m_h, BV * BK)
                b_o = _output(b_h, x_r, x_k, x_v, b_u, scale)
                b_h = _step(b_h, x_k, x_v, x_w)
                tl.store(p_o + t * HV, b_o.to(p_o.dtype.element_ty), mask=m_v)

    tl.store(ht + i_bh * K * V + o_h, b_h, mask=m_h)


@triton.jit(do_not_specialize=["T"])
def wkv6_bwd_kernel(
    r,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, H, V]
    w,  # [B, T, H, K] log decay
    u,  # [H, K]
    do,  # [B, T, H, V] cotangent of o
    dht,  # [B, H, K, V] cotangent of the final state (read when HAS_DHT)
    ckpt,  # [B, H, NT, K, V] fp32 checkpoints written by the forward
    work,  # [NV * B * H, CHUNK, BV, BK] fp32 work space
    dr,  # [NV, B, T, H, K] (a plain [B, T, H, K] when NV == 1)
    dk,  # [NV, B, T, H, K]
    dw,  # [NV, B, T, H, K]
    du,  # [NV, B, H, K] fp32 partial sums over T
    dv,  # [B, T, H, V]
    dh0,  # [B, H, K, V] cotangent of the initial state (written when HAS_H0)
    scale,
    T,
    H,
    K,
    V,
    BK: tl.constexpr,
    BV: tl.constexpr,
    CHUNK: tl.constexpr,
    PF: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DHT: tl.constexpr,
):
    i_v = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    n_bh = tl.num_programs(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    HK = tl.cast(H, tl.int64) * K
    HV = tl.cast(H, tl.int64) * V

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_v[:, None] & m_k[None, :]
    o_h = o_k[None, :] * V + o_v[:, None]
    p_s = work + (i_v * n_bh + i_bh) * CHUNK * BV * BK
    o_s = tl.arange(0, BV)[:, None] * BK + o_k[None, :]  # [BV, BK] inside one work-space slot
    m_all = o_s >= 0  # [BV, BK] every element (the flat accesses take a mask)

    xs = (r, k, v, w, do)
    gs = (dr, dk, dw, dv)
    off_x = i_b * T * HK + i_h * K
    off_y = i_b * T * HV + i_h * V
    offs = (off_x, off_y, HK, HV)
    idx = (o_k, o_v, m_k, m_v)
    off_part = i_v * n_bh * T * K

    b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_du = tl.zeros([BK], dtype=tl.float32)
    b_dh = tl.zeros([BV, BK], dtype=tl.float32)  # cotangent of h_t^T
    if HAS_DHT:
        b_dh += tl.load(dht + i_bh * K * V + o_h, mask=m_h, other=0.0).to(tl.float32)

    NT = (T + CHUNK - 1) // CHUNK
    for i_c in range(0, NT):
        c = NT - 1 - i_c
        t0 = c * CHUNK
        n = tl.minimum(t0 + CHUNK, T) - t0

        # recompute h_{t-1} for every step of the piece into the work space
        # flat loads / stores: the state stays in one layout through both loops (store_flat)
        b_h = load_flat(ckpt + (i_bh * NT + c) * K * V + o_h, m_h, BV, BK)
        q = _queue_init(xs, t0, 1, t0, t0 + n, offs, idx, PF, 14)
        for j_blk in range(0, n, PF):
            for jj in tl.static_range(PF):
                j = j_blk + jj
                _, x_k, x_v, x_w, _ = q[jj]
                q = _queue_set(q, jj, _load_step(xs, t0 + j + PF, t0, t0 + n, offs, idx, 14), PF)
                # past the piece's end (j >= n) the masked inputs are zeros: h stays as it is
                store_flat(p_s + j * BV * BK + o_s, b_h, m_all, BV * BK)
                b_h = _step(b_h, x_k, x_v, x_w)
        tl.debug_barrier()

        # adjoint over the piece, last step first
        q = _queue_init(xs, t0 + n - 1, -1, t0, t0 + n, offs, idx, PF, 31)
        x_hp = load_flat(p_s + (n - 1) * BV * BK + o_s, m_all, BV, BK)
        for i_blk in range(0, n, PF):
            for ii in tl.static_range(PF):
                i = i_blk + ii
                t = t0 + n - 1 - i
                x = q[ii]
                q = _queue_set(q, ii, _load_step(xs, t - PF, t0, t0 + n, offs, idx, 31), PF)
                # past the piece's start (i >= n): zero inputs leave dh as it is, no store
                b_hp = x_hp
                x_hp = load_flat(p_s + tl.maximum(n - 2 - i, 0) * BV * BK + o_s, m_all, BV, BK)
                g = _adjoint(b_hp, b_dh, b_du, x, b_u, scale)
                b_dh = g[0]
                b_du = g[1]
                _store_grads(
                    gs,
                    g,
                    tl.where(i < n, t, -1),
                    off_x,
                    off_y,
                    off_part,
                    HK,
                    HV,
                    o_k,
                    o_v,
                    m_k,
                    m_v,
                    T,
                )
        tl.debug_barrier()

    tl.store(du + (i_v * n_bh + i_bh) * K + o_k, b_du, mask=m_k)
    if HAS_H0:
        tl.store(dh0 + i_bh * K * V + o_h, b_dh.to(dh0.dtype.element_ty), mask=m_h)


# ---------------------------------------------------------------------------------------------
# chunk-parallel


@triton.jit(do_not_specialize=["T"])
def wkv6_chunk_transition_kernel(
    k,  # [B, T, H, K]
    v,  # [B, T, H, V]
    w,  # [B, T, H, K] log decay
    p,  # [B, H, NT, K] fp32 decay of the whole chunk, prod_t exp(w_t)
    uc,  # [B, H, NT, K, V] fp32 chunk contribution U_c (the chunk's end state from zero)
    T,
    H,
    K,
    V,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
    PF: tl.constexpr,
):
    i_v = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    NT = (T + BT - 1) // BT
    HK = tl.cast(H, tl.int64) * K
    HV = tl.cast(H, tl.int64) * V

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    t0 = i_c * BT
    t1 = tl.minimum(t0 + BT, T)
    xs = (k, k, v, w, v)
    offs = (i_b * T * HK + i_h * K, i_b * T * HV + i_h * V, HK, HV)
    idx = (o_k, o_v, m_k, m_v)
    b_h = tl.zeros([BV, BK], dtype=tl.float32)
    b_p = tl.full([BK], 1.0, dtype=tl.float32)
    q = _queue_init(xs, t0, 1, t0, t1, offs, idx, PF, 14)
    for t in range(t0, t1):
        _, x_k, x_v, x_w, _ = q[0]
        q = _queue_next(q, xs, t + PF, t0, t1, offs, idx, PF, 14)
        b_h = _step(b_h, x_k, x_v, x_w)
        b_p = b_p * tl.exp(x_w.to(tl.float32))
    p_u = uc + (i_bh * NT + i_c) * K * V + o_k[None, :] * V + o_v[:, None]
    tl.store(p_u, b_h, mask=m_v[:, None] & m_k[None, :])
    if i_v == 0:
        tl.store(p + (i_bh * NT + i_c) * K + o_k, b_p, mask=m_k)


@triton.jit(do_not_specialize=["T"])
def wkv6_chunk_state_fwd_kernel(
    p,  # [B, H, NT, K] fp32
    uc,  # [B, H, NT, K, V] fp32
    h0,  # [B, H, K, V] initial state (read when HAS_H0)
    ht,  # [B, H, K, V] fp32 final state
    hbuf,  # [B, H, NS, K, V] fp32; chunk c's start state goes to slot c * RATIO
    T,
    H,
    K,
    V,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
    RATIO: tl.constexpr,
    HAS_H0: tl.constexpr,
):
    i_v = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    NT = (T + BT - 1) // BT
    NS = (T + BT // RATIO - 1) // (BT // RATIO)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_h = (o_v < V)[:, None] & m_k[None, :]
    o_h = o_k[None, :] * V + o_v[:, None]

    b_h = tl.zeros([BV, BK], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + i_bh * K * V + o_h, mask=m_h, other=0.0).to(tl.float32)
    for c in range(0, NT):
        tl.store(hbuf + (i_bh * NS + c * RATIO) * K * V + o_h, b_h, mask=m_h)
        b_p = tl.load(p + (i_bh * NT + c) * K + o_k, mask=m_k, other=0.0)
        b_uc = tl.load(uc + (i_bh * NT + c) * K * V + o_h, mask=m_h, other=0.0)
        b_h = b_h * b_p[None, :] + b_uc
    tl.store(ht + i_bh * K * V + o_h, b_h, mask=m_h)


@triton.jit(do_not_specialize=["T"])
def wkv6_chunk_out_kernel(
    r,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, H, V]
    w,  # [B, T, H, K]
    u,  # [H, K] bonus
    o,  # [B, T, H, V] output
    hbuf,  # [B, H, NS, K, V] fp32: reads slot c * RATIO, writes the RATIO - 1 slots after it
    scale,
    T,
    H,
    K,
    V,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
    RATIO: tl.constexpr,
    PF: tl.constexpr,
):
    i_v = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    CK: tl.constexpr = BT // RATIO
    NS = (T + CK - 1) // CK
    HK = tl.cast(H, tl.int64) * K
    HV = tl.cast(H, tl.int64) * V

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_v[:, None] & m_k[None, :]
    o_h = o_k[None, :] * V + o_v[:, None]
    p_hc = hbuf + (i_bh * NS + i_c * RATIO) * K * V + o_h
    b_h = tl.load(p_hc, mask=m_h, other=0.0)
    b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)

    t0 = i_c * BT
    t1 = tl.minimum(t0 + BT, T)
    xs = (r, k, v, w, v)
    offs = (i_b * T * HK + i_h * K, i_b * T * HV + i_h * V, HK, HV)
    idx = (o_k, o_v, m_k, m_v)
    p_o = o + i_b * T * HV + i_h * V + t0 * HV + o_v
    q = _queue_init(xs, t0, 1, t0, t1, offs, idx, PF, 15)
    for j in range(0, t1 - t0):
        if RATIO > 1:
            if (j % CK == 0) and (j > 0):
                tl.store(p_hc + (j // CK) * K * V, b_h, mask=m_h)
        x_r, x_k, x_v, x_w, _ = q[0]
        q = _queue_next(q, xs, t0 + j + PF, t0, t1, offs, idx, PF, 15)
        b_o = _output(b_h, x_r, x_k, x_v, b_u, scale)
        b_h = _step(b_h, x_k, x_v, x_w)
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)
        p_o += HV


@triton.jit(do_not_specialize=["T"])
def wkv6_chunk_adjoint_kernel(
    r,  # [B, T, H, K]
    w,  # [B, T, H, K]
    do,  # [B, T, H, V]
    p,  # [B, H, NT, K] fp32 decay of the whole chunk (written by the V-block 0 programs)
    y,  # [B, H, NT, K, V] fp32: cotangent of chunk c's start state from chunk c's outputs only
    scale,
    T,
    H,
    K,
    V,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
    PF: tl.constexpr,
):
    i_v = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    NT = (T + BT - 1) // BT
    HK = tl.cast(H, tl.int64) * K
    HV = tl.cast(H, tl.int64) * V

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    t0 = i_c * BT
    t1 = tl.minimum(t0 + BT, T)
    xs = (r, r, do, w, do)
    offs = (i_b * T * HK + i_h * K, i_b * T * HV + i_h * V, HK, HV)
    idx = (o_k, o_v, m_k, m_v)
    b_dh = tl.zeros([BV, BK], dtype=tl.float32)
    b_p = tl.full([BK], 1.0, dtype=tl.float32)
    q = _queue_init(xs, t1 - 1, -1, t0, t1, offs, idx, PF, 25)
    for i in range(0, t1 - t0):
        x_r, _, _, x_w, x_do = q[0]
        q = _queue_next(q, xs, t1 - 1 - i - PF, t0, t1, offs, idx, PF, 25)
        b_d = tl.exp(x_w.to(tl.float32))
        b_dh = (
            b_dh * b_d[None, :]
            + x_do.to(tl.float32)[:, None] * (x_r.to(tl.float32) * scale)[None, :]
        )
        b_p = b_p * b_d
    p_y = y + (i_bh * NT + i_c) * K * V + o_k[None, :] * V + o_v[:, None]
    tl.store(p_y, b_dh, mask=m_v[:, None] & m_k[None, :])
    if i_v == 0:
        tl.store(p + (i_bh * NT + i_c) * K + o_k, b_p, mask=m_k)


@triton.jit(do_not_specialize=["T"])
def wkv6_chunk_state_bwd_kernel(
    p,  # [B, H, NT, K] fp32
    y,  # [B, H, NT, K, V] fp32 from wkv6_chunk_adjoint_kernel
    dht,  # [B, H, K, V] cotangent of the final state (read when HAS_DHT)
    dhend,  # [B, H, NT, K, V] fp32: cotangent of chunk c's end state
    dh0,  # [B, H, K, V] cotangent of the initial state (written when HAS_H0)
    T,
    H,
    K,
    V,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
    HAS_DHT: tl.constexpr,
    HAS_H0: tl.constexpr,
):
    i_v = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    NT = (T + BT - 1) // BT

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_h = (o_v < V)[:, None] & m_k[None, :]
    o_h = o_k[None, :] * V + o_v[:, None]

    b_dh = tl.zeros([BV, BK], dtype=tl.float32)
    if HAS_DHT:
        b_dh += tl.load(dht + i_bh * K * V + o_h, mask=m_h, other=0.0).to(tl.float32)
    for i_c in range(0, NT):
        c = NT - 1 - i_c
        tl.store(dhend + (i_bh * NT + c) * K * V + o_h, b_dh, mask=m_h)
        b_p = tl.load(p + (i_bh * NT + c) * K + o_k, mask=m_k, other=0.0)
        b_y = tl.load(y + (i_bh * NT + c) * K * V + o_h, mask=m_h, other=0.0)
        b_dh = b_dh * b_p[None, :] + b_y
    if HAS_H0:
        tl.store(dh0 + i_bh * K * V + o_h, b_dh.to(dh0.dtype.element_ty), mask=m_h)


@triton.jit
def _chunk_step(h, t, xs, offs, idx, T):
    x = _load_step(xs, t, 0, T, offs, idx, 14)
    return _step(h, x[1], x[2], x[3])


@triton.jit(do_not_specialize=["T"])
def wkv6_chunk_bwd_kernel(
    r,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, H, V]
    w,  # [B, T, H, K]
    u,  # [H, K]
    do,  # [B, T, H, V]
    ckpt,  # [B, H, ceil(T / 16), K, V] fp32 states every 16 steps
    dhend,  # [B, H, NT, K, V] fp32 from wkv6_chunk_state_bwd_kernel
    dr,  # [NV, B, T, H, K] (a plain [B, T, H, K] when NV == 1)
    dk,  # [NV, B, T, H, K]
    dw,  # [NV, B, T, H, K]
    du,  # [NV, NT, B, H, K] fp32 partial sums
    dv,  # [B, T, H, V]
    scale,
    T,
    H,
    K,
    V,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
):
    i_v = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    n_bh = tl.num_programs(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    NT = (T + BT - 1) // BT
    NS = (T + 15) // 16
    R: tl.constexpr = BT // 16
    HK = tl.cast(H, tl.int64) * K
    HV = tl.cast(H, tl.int64) * V

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_v[:, None] & m_k[None, :]
    o_h = o_k[None, :] * V + o_v[:, None]
    xs = (r, k, v, w, do)
    gs = (dr, dk, dw, dv)
    off_x = i_b * T * HK + i_h * K
    off_y = i_b * T * HV + i_h * V
    offs = (off_x, off_y, HK, HV)
    idx = (o_k, o_v, m_k, m_v)
    off_part = i_v * n_bh * T * K
    b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)

    b_du = tl.zeros([BK], dtype=tl.float32)
    b_dh = tl.load(dhend + (i_bh * NT + i_c) * K * V + o_h, mask=m_h, other=0.0)
    for i_s in range(0, R):
        s = R - 1 - i_s
        ts = i_c * BT + s * 16
        if ts < T:
            # block starts (every 4 steps) of this 16-step piece, from its checkpoint
            h0 = tl.load(ckpt + (i_bh * NS + i_c * R + s) * K * V + o_h, mask=m_h, other=0.0)
            h4 = h0
            for j in range(0, 4):
                h4 = _chunk_step(h4, ts + j, xs, offs, idx, T)
            h8 = h4
            for j in range(4, 8):
                h8 = _chunk_step(h8, ts + j, xs, offs, idx, T)
            h12 = h8
            for j in range(8, 12):
                h12 = _chunk_step(h12, ts + j, xs, offs, idx, T)
            for i_blk in tl.static_range(0, 4):
                hb = h12 if i_blk == 0 else (h8 if i_blk == 1 else (h4 if i_blk == 2 else h0))
                tb = ts + 12 - 4 * i_blk
                # adjoint of the block's steps, last first; h_{t-1} recomputed from hb
                for i in range(0, 4):
                    t = tb + 3 - i
                    hp = hb
                    for j in range(0, 3 - i):
                        hp = _chunk_step(hp, tb + j, xs, offs, idx, T)
                    x = _load_step(xs, t, 0, T, offs, idx, 31)
                    g = _adjoint(hp, b_dh, b_du, x, b_u, scale)
                    b_dh = g[0]
                    b_du = g[1]
                    _store_grads(gs, g, t, off_x, off_y, off_part, HK, HV, o_k, o_v, m_k, m_v, T)
    p_du = du + ((i_v * NT + i_c) * n_bh + i_bh) * K + o_k
    tl.store(p_du, b_du, mask=m_k)


# ---------------------------------------------------------------------------------------------
# Tensor-core chunked forward (``MODE="tc"``, bf16/fp16 inputs).
#
# Within a chunk starting at step c with state S = h_{c-1}, with g_i = sum_{s<=i} w_{c+s} and
# e_i = g_i - w_{c+i} (log decays from the chunk start, both <= 0):
#
#     o_i = (q_i * exp(e_i))^T S + sum_{j<i} A_ij v_j + (sum_k q_i u k_i) v_i,
#     A_ij = sum_k q_i k_j exp(e_i - g_j)                         (j < i, exponent <= 0)
#
# A is never factored as exp(e_i) * exp(-g_j) over a whole chunk (that overflows once |g| > 88,
# i.e. a few steps of w = -20). Rows are taken BC (16) at a time, and the output kernel carries
# the state from the chunk start through its sub-chunks (h <- exp(gL) h + (k exp(gL - g))^T v, a
# tensor-core product), so earlier sub-chunks reach a row only through that state. Within a
# sub-chunk A is one tensor-core product of q exp(e - e_a0) and k exp(e_a0 - g) where the
# sub-chunk's total decay is bounded (FACTOR_LIMIT), else formed exactly one column at a time.
# The serial pass over chunks runs on tensor cores too. The log decays come from one cumsum
# kernel (fp32, from each chunk's start), so the output kernel reads any row of them from memory.
# What remains inexact is the log-space subtraction itself (~|g| * 2^-24 absolute in each
# exponent, 1e-4 relative at |g| ~ 1e3), fine for bf16/fp16 inputs; fp32 inputs keep the exact
# product-of-decays kernels above.


@triton.jit(do_not_specialize=["T"])
def wkv6_tc_state_kernel(
    k,  # [B, T, H, K]
    v,  # [B, T, H, V]
    gi,  # [B, H, NS * BS, K] fp32 inclusive log decay from each chunk's start (cumsum kernel)
    gr,  # [B, H, NS * BS, K] fp32 log decay from after each step to its chunk's end
    h0,  # [B, H, K, V] initial state (read when HAS_H0)
    ht,  # [B, H, K, V] fp32 final state
    hbuf,  # [B, H, NS, K, V] fp32: the state before steps 0, BS, 2 BS, ...
    T,
    H,
    K,
    V,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BS: tl.constexpr,
    HAS_H0: tl.constexpr,
    PREC: tl.constexpr,
):
    i_v = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    NS = (T + BS - 1) // BS
    HK = tl.cast(H, tl.int64) * K
    HV = tl.cast(H, tl.int64) * V

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_s = tl.arange(0, BS)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]  # [BK, BV] offsets of h[k, v]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + i_bh * K * V + o_h, mask=m_h, other=0.0).to(tl.float32)
    p_k = k + i_b * T * HK + i_h * K + o_s[:, None] * HK + o_k[None, :]  # [BS, BK]
    p_v = v + i_b * T * HV + i_h * V + o_s[:, None] * HV + o_v[None, :]  # [BS, BV]
    p_g = i_bh * NS * BS * K + o_s[:, None] * K + o_k[None, :]  # [BS, BK] rows of gi / gr
    for n in range(0, NS):
        tl.store(hbuf + (i_bh * NS + n) * K * V + o_h, b_h, mask=m_h)
        m_t = (n * BS + o_s) < T  # tail rows load as k = v = 0: no update
        b_k = tl.load(p_k, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_kf = b_k * tl.exp(tl.load(gr + p_g, mask=m_k[None, :], other=0.0))  # to the end, <= 1
        b_gl = tl.load(gi + i_bh * NS * BS * K + (n * BS + BS - 1) * K + o_k, mask=m_k, other=0.0)
        b_h = b_h * tl.exp(b_gl)[:, None]  # the whole chunk's decay
        b_h += tl.dot(tl.trans(b_kf), b_v, input_precision=PREC)
        p_k += BS * HK
        p_v += BS * HV
        p_g += BS * K
    tl.store(ht + i_bh * K * V + o_h, b_h, mask=m_h)


@triton.jit(do_not_specialize=["T"])
def wkv6_tc_out_kernel(
    r,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, H, V]
    gi,  # [B, H, NC * BT, K] fp32 inclusive log decay from the chunk start (_tc_helpers.tc_cumsum_kernel)
    u,  # [H, K] bonus
    o,  # [B, T, H, V] output
    hbuf,  # [B, H, NC, K, V] fp32 state before each BT-step chunk
    ckpt,  # [B, H, ceil(T / CK), K, V] fp32 state every CK steps (written when STORE_CKPT)
    scale,
    T,
    H,
    K,
    V,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    CK: tl.constexpr,
    STORE_CKPT: tl.constexpr,
    FACTOR: tl.constexpr,
    PREC: tl.constexpr,
):
    i_v = tl.program_id(1).to(tl.int64)
    i_c = tl.program_id(0).to(tl.int64)  # time blocks on grid axis 0: up to 2^31, not 65535
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    NC = (T + BT - 1) // BT
    NCK = (T + CK - 1) // CK
    HK = tl.cast(H, tl.int64) * K
    HV = tl.cast(H, tl.int64) * V
    t0 = i_c * BT

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BC)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
    base_k = i_b * T * HK + i_h * K + t0 * HK
    base_v = i_b * T * HV + i_h * V + t0 * HV
    base_g = gi + (i_bh * NC * BT + t0) * K

    # the state before the sub-chunk, carried through the chunk's sub-chunks on tensor cores
    b_h = tl.load(hbuf + (i_bh * NC + i_c) * K * V + o_h, mask=m_h, other=0.0)  # [BK, BV]
    b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
    b_gref = tl.zeros([BK], dtype=tl.float32)  # log decay from the chunk to the sub-chunk start
    diag = o_i[:, None] == o_i[None, :]  # [BC, BC]
    strict = o_i[:, None] > o_i[None, :]

    for a in tl.static_range(BT // BC):
        s0 = a * BC  # the sub-chunk's first step in the chunk
        m_a = (t0 + s0 + o_i) < T  # [BC]
        m_ak = m_a[:, None] & m_k[None, :]
        m_av = m_a[:, None] & m_v[None, :]
        p_a = base_k + (s0 + o_i[:, None]) * HK + o_k[None, :]  # [BC, BK]
        p_g = base_g + (s0 + o_i[:, None]) * K + o_k[None, :]
        b_q = tl.load(r + p_a, mask=m_ak, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + p_a, mask=m_ak, other=0.0).to(tl.float32)
        b_v = tl.load(v + base_v + (s0 + o_i[:, None]) * HV + o_v[None, :], mask=m_av, other=0.0)
        b_v = b_v.to(tl.float32)  # [BC, BV]
        b_g = tl.load(p_g, mask=m_k[None, :], other=0.0)  # [BC, BK] inclusive, from the chunk
        # exclusive: the row before, the same stored value (adjacent pairs get exp(0) = 1 exactly)
        b_e = tl.load(p_g - K, mask=((s0 + o_i) > 0)[:, None] & m_k[None, :], other=0.0)
        b_gend = tl.load(base_g + (s0 + BC - 1) * K + o_k, mask=m_k, other=0.0)  # [BK]
        if STORE_CKPT and s0 % CK == 0:  # both compile-time
            if t0 + s0 < T:
                tl.store(ckpt + (i_bh * NCK + (t0 + s0) // CK) * K * V + o_h, b_h, mask=m_h)

        b_qe = b_q * tl.exp(b_e - b_gref[None, :])  # [BC, BK] decay from the sub-chunk start, <= 1
        b_o = tl.dot(b_qe, b_h, input_precision=PREC)  # [BC, BV] from the state
        # the sub-chunk's own pairs: A[i, j] = sum_k q_i k_j exp(e_i - g_j) for j < i, plus the
        # bonus on the diagonal
        b_Ad = tl.where(diag, tl.sum(b_q * b_u[None, :] * b_k, axis=1)[:, None], 0.0)
        fac = False
        if FACTOR:
            fac = tl.min(b_gend - b_gref, axis=0) >= -FACTOR_LIMIT
        if fac:
            # bounded decay over the sub-chunk: the factors as products (one tensor-core dot)
            b_kn = b_k * tl.exp(b_gref[None, :] - b_g)  # <= e^FACTOR_LIMIT
            b_Ad += tl.where(strict, tl.dot(b_qe, tl.trans(b_kn), input_precision=PREC), 0.0)
        else:
            # any decay: one key column j at a time, its row read back from memory
            for j in range(0, BC - 1):
                p_j = (s0 + j) * HK + o_k
                b_kj = tl.load(k + base_k + p_j, mask=m_k & (t0 + s0 + j < T), other=0.0)
                b_gj = tl.load(base_g + (s0 + j) * K + o_k, mask=m_k, other=0.0)  # [BK]
                b_x = tl.exp(tl.where((o_i > j)[:, None], b_e - b_gj[None, :], float("-inf")))
                b_col = tl.sum(b_q * b_x * b_kj.to(tl.float32)[None, :], 1)  # [BC]
                b_Ad += tl.where((o_i == j)[None, :], b_col[:, None], 0.0)
        b_o += tl.dot(b_Ad, b_v, input_precision=PREC)
        tl.store(
            o + base_v + (s0 + o_i[:, None]) * HV + o_v[None, :],
            b_o.to(o.dtype.element_ty),
            mask=m_av,
        )
        if a < BT // BC - 1:  # the state before the next sub-chunk
            b_kt = b_k * tl.exp(b_gend[None, :] - b_g)  # [BC, BK] decay to the sub-chunk end, <= 1
            b_h = b_h * tl.exp(b_gend - b_gref)[:, None]
            b_h += tl.dot(tl.trans(b_kt), b_v, input_precision=PREC)
            b_gref = b_gend


# ---------------------------------------------------------------------------------------------
# Tensor-core backward (``MODE="tc"``, bf16/fp16 inputs), from the forward's 16-step checkpoints.
#
# With H_s the state before block s (checkpoint) and D_s the cotangent of the state after its
# last step, every gradient is local to the block. ``wkv6_tc_dstate_kernel`` walks the chunks
# of BT steps in reverse for the chunk-end cotangents; each block program forms its own D_s
# from its chunk's and the chunk's later rows (CARRY 0), or one program per chunk carries it
# back through the chunk's blocks (CARRY 1). For steps t, j, i of the block, g / e the
# inclusive / exclusive log decays from the block start, gL the whole block's, and
# X[t, j] = exp(e_t - g_j) for j < t (0 otherwise; every factor <= 1, and X[t, t-1] = 1):
#
#     h_{t-1} = exp(e_t) H_s + sum_{j<t} X[t, j] k_j v_j^T
#     D_t     = exp(gL - g_t) D_s + sum_{i>t} X[i, t] q_i do_i^T
#
# so, with M[i, j] = do_i . v_j and c_t = M[t, t]:
#
#     dq_t = exp(e_t) (H_s do_t) + sum_{j<t} M[t, j] X[t, j] k_j + u k_t c_t
#     dk_j = exp(gL - g_j) (D_s v_j) + sum_{t>j} M[t, j] X[t, j] q_t + u q_j c_j
#     dv_j = D_s^T (k_j exp(gL - g_j)) + sum_{t>=j} A[t, j] do_t     (A: the forward's, u on its diagonal)
#     dw_t = exp(w_t) * rowsum(D_t * h_{t-1})                         (direct: no cumsum identity)
#
# The last expands into four block-local terms, each a sum of products of actual decay factors
# that all include exp(w_t), so dw keeps its relative accuracy for any decay (fla's
# dw = revcumsum(q dq - k dk) cancels to noise when exp(w) is tiny: its adjacent pairs have
# factor 1 and appear in both q dq and k dk):
#
#     dw_t = exp(gL) rowsum(H_s * D_s)                                    (state x state)
#          + sum_{j<t} k_j exp(gL - g_j) (D_s v_j)                        (block keys x D_s)
#          + sum_{i>t} q_i exp(e_i) (H_s do_i)                            (block queries x H_s)
#          + sum_{j<t<i} q_i k_j X[i, j] M[i, j]                          (pairs around t)
#
# The pair term telescopes without the adjacent pairs: with a_t = q_t sum_{j<t-1} M X k_j and
# b_j = k_j sum_{i>j+1} M X q_i (the intra-block dq / dk without their adjacent pair, each
# term carrying at least one decay factor), it is sum_{i<t} b_i - sum_{i<=t} a_i. Every sum
# over the block is a cumulative sum; the exclusive ones are exact row shifts of it.


@triton.jit(do_not_specialize=["T"])
def wkv6_tc_dstate_kernel(
    r,  # [B, T, H, K]
    w,  # [B, T, H, K] log decay
    do,  # [B, T, H, V]
    dht,  # [B, H, K, V] cotangent of the final state (read when HAS_DHT)
    dbuf,  # [B, H, NS, K, V] fp32: cotangent of the state after block n's last step
    dh0,  # [B, H, K, V] cotangent of the initial state (written when HAS_H0)
    scale,
    T,
    H,
    K,
    V,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BS: tl.constexpr,
    HAS_DHT: tl.constexpr,
    HAS_H0: tl.constexpr,
    PREC: tl.constexpr,
):
    i_v = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    NS = (T + BS - 1) // BS
    HK = tl.cast(H, tl.int64) * K
    HV = tl.cast(H, tl.int64) * V

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_s = tl.arange(0, BS)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]  # [BK, BV]

    b_d = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_d += tl.load(dht + i_bh * K * V + o_h, mask=m_h, other=0.0).to(tl.float32)
    for m in range(0, NS):
        n = NS - 1 - m
        tl.store(dbuf + (i_bh * NS + n) * K * V + o_h, b_d, mask=m_h)
        m_t = (n * BS + o_s) < T
        p_x = i_b * T * HK + i_h * K + (n * BS + o_s[:, None]) * HK + o_k[None, :]  # [BS, BK]
        b_q = tl.load(r + p_x, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_w = tl.load(w + p_x, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_do = tl.load(
            do + i_b * T * HV + i_h * V + (n * BS + o_s[:, None]) * HV + o_v[None, :],
            mask=m_t[:, None] & m_v[None, :],
            other=0.0,
        ).to(tl.float32)  # [BS, BV]
        b_g = tl.cumsum(b_w, axis=0)
        b_gl = last_row(b_g, BS)  # [BK] the whole block's log decay
        if BS <= 16:
            b_e = prev_rows(b_g, BS)  # exact, cheap at 16 rows
        else:
            # an [BS, BS] shift product on the serial path costs more than it buys: g - w is off
            # by ~|g| 2^-24 in the exponent, i.e. only where the factor exp(e) is tiny anyway
            b_e = b_g - b_w
        b_qf = b_q * scale * tl.exp(b_e)  # [BS, BK] decay from the block start
        b_d = b_d * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_qf), b_do, input_precision=PREC)
    if HAS_H0:
        tl.store(dh0 + i_bh * K * V + o_h, b_d.to(dh0.dtype.element_ty), mask=m_h)


@triton.jit(do_not_specialize=["T", "part_stride"])
def wkv6_tc_bwd_kernel(
    r,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, H, V]
    w,  # [B, T, H, K] log decay
    gi,  # [B, H, NS * BC, K] fp32 log decay from each block's start, inclusive (DPASS)
    gr,  # [B, H, NS * BC, K] fp32 log decay from after each step to its block's end (DPASS)
    u,  # [H, K]
    do,  # [B, T, H, V]
    ckpt,  # [B, H, NS, K, V] fp32 state before each BC-step block
    dbuf,  # [B, H, NC, K, V] fp32 cotangent of the state after each BT-step chunk
    dr,  # [B, T, H, K] (or fp32 partials [NV, B, T, H, K] when part_stride > 0); likewise dk, dw
    dk,
    dw,
    du,  # [NV, NS, B * H, K] fp32 partial sums
    dv,  # [B, T, H, V]
    scale,
    T,
    H,
    K,
    V,
    part_stride,  # B * T * H * K when the K-side gradients are per-V-block partials, else 0
    BK: tl.constexpr,
    BV: tl.constexpr,
    BC: tl.constexpr,
    BT: tl.constexpr,
    PATH: tl.constexpr,
    CARRY: tl.constexpr,
    DPASS: tl.constexpr,
    PREC: tl.constexpr,
):
    i_v = tl.program_id(1).to(tl.int64)
    i_p = tl.program_id(0).to(tl.int64)  # blocks / chunks on grid axis 0: up to 2^31, not 65535
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    NS = (T + BC - 1) // BC
    NC = (T + BT - 1) // BT
    HK = tl.cast(H, tl.int64) * K
    HV = tl.cast(H, tl.int64) * V

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BC)
    m_k = o_k < K
    m_v = o_v < V
    base_x = i_b * T * HK + i_h * K
    base_y = i_b * T * HV + i_h * V

    o_h = o_k[:, None] * V + o_v[None, :]
    m_h = m_k[:, None] & m_v[None, :]

    b_u = tl.load(u + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
    n_bh = tl.num_programs(2)

    if CARRY:
        # one program per BT-step chunk: its blocks last to first, carrying D_s (the cotangent
        # of the state after block s) back from the chunk end's, D_{s-1} = exp(gL) D_s +
        # (q exp(e))^T do, one tensor-core product per block. A runtime loop: unrolled, the
        # block body is 3x the code and spills 3x (sm_90a).
        c0 = i_p * BT
        NB = BT // BC
        if PATH != 0:
            # a chunk with no block of this launch's path leaves at once (tested with a margin
            # of 1 towards the path; each block's own test below is exact)
            margin = 1.0 if PATH == 1 else -1.0
            n_skip = 0
            for sb in tl.static_range(BT // BC):
                m_sb = ((c0 + sb * BC + o_i) < T)[:, None] & m_k[None, :]
                p_sb = base_x + (c0 + sb * BC + o_i[:, None]) * HK + o_k[None, :]
                b_wt = tl.load(w + p_sb, mask=m_sb, other=0.0).to(tl.float32)
                other = other_path(tl.min(tl.sum(b_wt, axis=0), axis=0) + margin, PATH)
                n_skip += (other | (c0 + sb * BC >= T)).to(tl.int32)
            if n_skip == BT // BC:
                return
        b_D = tl.load(dbuf + (i_bh * NC + i_p) * K * V + o_h, mask=m_h, other=0.0)  # [BK, BV]
    else:
        # one program per 16-step block, which forms its D_s from its chunk's end cotangent and
        # the chunk's later rows itself
        NB = 1
        t0 = i_p * BC
        c0 = (t0 // BT) * BT  # first step of this block's chunk
        m_t = (t0 + o_i) < T
        m_x = m_t[:, None] & m_k[None, :]  # [BC, BK]
        p_x = base_x + (t0 + o_i[:, None]) * HK + o_k[None, :]
        # PATH 1 takes the blocks whose total decay is bounded (pair factors as products on
        # tensor cores), PATH 2 the others (one key column at a time), PATH 0 every block (see
        # other_path)
        if PATH != 0:
            b_wt = tl.load(w + p_x, mask=m_x, other=0.0).to(tl.float32)
            if other_path(tl.min(tl.sum(b_wt, axis=0), axis=0), PATH):
                return

        # D_s: the chunk-end cotangent carried back over the chunk's rows after this block
        b_D = tl.load(dbuf + (i_bh * NC + t0 // BT) * K * V + o_h, mask=m_h, other=0.0)
        if t0 + BC < tl.minimum(c0 + BT, T):
            o_c = tl.arange(0, BT)
            m_c = ((c0 + o_c) >= t0 + BC) & ((c0 + o_c) < T)  # [BT] rows after the block
            p_c = base_x + (c0 + o_c[:, None]) * HK + o_k[None, :]  # [BT, BK]
            b_wc = tl.load(w + p_c, mask=m_c[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            b_qc = tl.load(r + p_c, mask=m_c[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            b_doc = tl.load(
                do + base_y + (c0 + o_c[:, None]) * HV + o_v[None, :],
                mask=m_c[:, None] & m_v[None, :],
                other=0.0,
            ).to(tl.float32)  # [BT, BV]
            b_gc = tl.cumsum(b_wc, axis=0)  # [BT, BK] from the block's end; 0 on earlier rows
            # exclusive decays as g - w: off by ~|g| 2^-24 in the exponent, only where exp(e) is
            # tiny
            b_qc = b_qc * scale * tl.exp(b_gc - b_wc)
            b_D = b_D * tl.exp(last_row(b_gc, BT))[:, None] + tl.dot(
                tl.trans(b_qc), b_doc, input_precision=PREC
            )

    for sb in range(0, NB):
        if CARRY:
            t0 = c0 + (NB - 1 - sb) * BC
        if t0 < T:
            i_s = t0 // BC
            m_t = (t0 + o_i) < T
            m_x = m_t[:, None] & m_k[None, :]  # [BC, BK]
            m_y = m_t[:, None] & m_v[None, :]  # [BC, BV]
            p_x = base_x + (t0 + o_i[:, None]) * HK + o_k[None, :]
            p_y = base_y + (t0 + o_i[:, None]) * HV + o_v[None, :]
            b_q = tl.load(r + p_x, mask=m_x, other=0.0).to(tl.float32) * scale  # [BC, BK]
            b_w = tl.load(w + p_x, mask=m_x, other=0.0).to(tl.float32)
            b_do = tl.load(do + p_y, mask=m_y, other=0.0).to(tl.float32)
            if DPASS:
                # the decay pass's rows: no scan, shift or reduction here (they cost registers:
                # sm_90a, 4 warps, 1.2 KB of spills without them against 0.1 KB)
                o_g = (i_bh * NS * BC + t0 + o_i[:, None]) * K + o_k[None, :]  # [BC, BK]
                b_g, b_e = read_block_decays(gi, o_g, m_k, o_i, K)  # [BC, BK]
                b_gl = tl.load(gi + (i_bh * NS * BC + t0 + BC - 1) * K + o_k, mask=m_k, other=0.0)
            else:
                b_g = tl.cumsum(b_w, axis=0)  # [BC, BK]
                b_e = prev_rows(b_g, BC)  # exact shift: e_t - g_{t-1} is exactly 0
                b_gl = last_row(b_g, BC)  # [BK]
            b_eg = tl.exp(b_e)  # [BC, BK] decay from the block start to before t
            skip = False
            if CARRY and PATH != 0:  # the one-block kernel's test (it returned early above)
                skip = other_path(tl.min(tl.sum(b_w, axis=0), axis=0), PATH)
            if skip == 0:
                b_k = tl.load(k + p_x, mask=m_x, other=0.0).to(tl.float32)
                b_v = tl.load(v + p_y, mask=m_y, other=0.0).to(tl.float32)  # [BC, BV]
                b_H = tl.load(ckpt + (i_bh * NS + i_s) * K * V + o_h, mask=m_h, other=0.0)

                diag = o_i[:, None] == o_i[None, :]  # [BC, BC]
                adjacent = o_i[:, None] == o_i[None, :] + 1  # [t, j]: j = t - 1
                b_ew = tl.exp(b_w)  # [BC, BK] the step decays themselves
                if DPASS:  # after t to the block end, summed from the end (one-step exact)
                    b_lg = tl.exp(tl.load(gr + o_g, mask=m_k[None, :], other=0.0))
                else:  # [BC, BK] after t to the block end (one-step exact)
                    b_lg = decay_to_end(b_g, b_ew, BC)

                # everything that needs the states first (they are the largest tiles)
                b_Hdo = tl.dot(b_do, tl.trans(b_H), input_precision=PREC)  # [BC, BK] (H_s do_t)
                b_Dv = tl.dot(b_v, tl.trans(b_D), input_precision=PREC)  # [BC, BK] (D_s v_t)
                b_dv = tl.dot(b_k * b_lg, b_D, input_precision=PREC)  # [BC, BV]
                b_dw = tl.exp(b_gl) * tl.sum(b_H * b_D, axis=1)  # [BK] dw's state x state term

                b_M = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)  # [BC, BC] do_t . v_j
                b_c = tl.sum(tl.where(diag, b_M, 0.0), axis=1)  # [BC] v_t . do_t
                b_Madj = tl.where(adjacent, b_M, 0.0)
                if DPASS:  # the neighbouring rows read again (L1 / L2 hits)
                    m_p = m_x & (o_i > 0)[:, None]
                    b_kp = tl.load(k + p_x - HK, mask=m_p, other=0.0).to(tl.float32)  # k_{t-1}
                    m_n = ((t0 + o_i + 1) < T)[:, None] & (o_i < BC - 1)[:, None] & m_k[None, :]
                    b_qn = tl.load(r + p_x + HK, mask=m_n, other=0.0).to(tl.float32) * scale
                else:
                    b_kp = prev_rows(b_k, BC)  # [BC, BK] k_{t-1}
                    b_qn = next_rows(b_q, BC)  # [BC, BK] q_{j+1}

                # pairs j < t - 1, one key column j at a time ([BC, BK] tiles: a [BC, BC, BK] tile spills);
                # the adjacent pairs (factor 1) are taken apart below
                b_dqf = tl.zeros([BC, BK], dtype=tl.float32)  # sum_j M[t, j] X[t, j] k_j
                b_dkf = tl.zeros([BC, BK], dtype=tl.float32)  # sum_t M[t, j] X[t, j] q_t
                b_A = tl.zeros([BC, BC], dtype=tl.float32)  # the forward's A over far pairs
                if PATH == 1:
                    # bounded decay over the block: X[t, j] = exp(e_t) exp(-g_j), three tensor-core dots
                    far = o_i[:, None] > o_i[None, :] + 1  # [t, j]: j < t - 1
                    b_Mf = tl.where(far, b_M, 0.0)
                    b_ng = tl.exp(-b_g)  # [BC, BK]
                    b_kn = b_k * b_ng
                    b_qe = b_q * b_eg
                    b_dqf = b_eg * tl.dot(b_Mf, b_kn, input_precision=PREC)
                    b_dkf = b_ng * tl.dot(tl.trans(b_Mf), b_qe, input_precision=PREC)
                    b_A = tl.where(far, tl.dot(b_qe, tl.trans(b_kn), input_precision=PREC), 0.0)
                else:
                    for j in range(0, BC - 2):
                        row_j = (o_i == j)[:, None]  # [BC, 1]
                        col_j = (o_i == j)[None, :]  # [1, BC]
                        b_gj = tl.sum(tl.where(row_j, b_g, 0.0), axis=0)  # [BK]
                        b_kj = tl.sum(tl.where(row_j, b_k, 0.0), axis=0)
                        b_Mj = tl.sum(tl.where(col_j, b_M, 0.0), axis=1)  # [BC] M[t, j]
                        b_x = tl.exp(
                            tl.where((o_i > j + 1)[:, None], b_e - b_gj[None, :], float("-inf"))
                        )
                        # one step apart (t = j + 2): that step's exp(w) itself (see decay_to_end)
                        b_ewj = tl.sum(tl.where((o_i == j + 1)[:, None], b_ew, 0.0), axis=0)
                        b_x = tl.where((o_i == j + 2)[:, None], b_ewj[None, :], b_x)
                        b_qx = b_q * b_x  # [BC, BK]
                        b_dqf += b_Mj[:, None] * b_kj[None, :] * b_x
                        b_dkf += tl.where(row_j, tl.sum(b_Mj[:, None] * b_qx, axis=0)[None, :], 0.0)
                        b_A += tl.where(col_j, tl.sum(b_qx * b_kj[None, :], axis=1)[:, None], 0.0)
                b_dq = b_eg * b_Hdo + b_dqf + tl.sum(b_Madj, axis=1)[:, None] * b_kp
                b_dq += b_u[None, :] * b_k * b_c[:, None]
                b_dk = b_lg * b_Dv + b_dkf + tl.sum(b_Madj, axis=0)[:, None] * b_qn
                b_dk += b_u[None, :] * b_q * b_c[:, None]
                b_A += tl.where(adjacent, tl.sum(b_q * b_kp, axis=1)[:, None], 0.0)
                b_A += tl.where(diag, tl.sum(b_q * b_u[None, :] * b_k, axis=1)[:, None], 0.0)
                b_dv += tl.dot(tl.trans(b_A), b_do, input_precision=PREC)
                b_du = tl.sum(b_q * b_k * b_c[:, None], axis=0)  # [BK]

                # dw (see above): prefix sums over j < t, suffix sums over i > t, the pair term telescoped
                b_pre = b_k * (b_lg * b_Dv + b_dkf)  # [BC, BK] summed over j < t
                b_suf = b_q * b_eg * b_Hdo  # summed over i > t
                b_dw = b_dw[None, :] + prev_rows(tl.cumsum(b_pre, axis=0), BC)
                b_dw += next_rows(tl.cumsum(b_suf, axis=0, reverse=True), BC)
                b_dw -= tl.cumsum(b_q * b_dqf, axis=0)

                p_part = i_v * part_stride + p_x
                tl.store(dr + p_part, (b_dq * scale).to(dr.dtype.element_ty), mask=m_x)
                tl.store(dk + p_part, b_dk.to(dk.dtype.element_ty), mask=m_x)
                tl.store(dw + p_part, b_dw.to(dw.dtype.element_ty), mask=m_x)
                tl.store(dv + p_y, b_dv.to(dv.dtype.element_ty), mask=m_y)
                tl.store(du + ((i_v * NS + i_s) * n_bh + i_bh) * K + o_k, b_du, mask=m_k)
            if CARRY:
                if sb < NB - 1:  # the cotangent after the block before
                    b_D = b_D * tl.exp(b_gl)[:, None]
                    b_D += tl.dot(tl.trans(b_q * b_eg), b_do, input_precision=PREC)
