"""Triton kernels of the Mamba-1 selective scan and its decode step.

The scan kernels work on one batch row and a block of ``BLOCK_D`` channels and walk the sequence
in chunks of ``BLOCK_L = BLOCK_G * BLOCK_R`` steps. A chunk is loaded as a ``[BLOCK_D,
BLOCK_G, BLOCK_R]`` tile (step ``g * BLOCK_R + r``); Triton's coalesced layout gives each
thread consecutive steps of one group ``g`` of one channel (the 16-byte vector of the input
dtype; the rest of ``BLOCK_R`` after one in-register layout change), with the groups on lanes.

- The per-(t, d) work (softplus, dt*u, D*u, the gate) is done once per element.
- A tile splits into its ``BLOCK_R`` rows, ``[BLOCK_D, BLOCK_G]`` tensors, by reshape + split
  (``_rows``), and the recurrence ``x = exp2(dt A log2e) x + dt u B`` is written out row by
  row: no scan primitive over time, one exp2 and a few FMAs per (t, d, n), all in registers.
- The N state columns are a loop; per column, the ``BLOCK_G`` groups of a chunk first run
  their rows from a zero state, their (decay product, state) pairs are combined across the
  lanes by a tiny ``tl.associative_scan`` over the groups, and a second pass over the rows
  starts each group from its true state (``_chunk_states``). The groups are what fills the GPU
  when ``batch * dim`` is small (batch 4 x dim 2048 is only 8192 sequential channels).
- A column's state between chunks lives in a small fp32 buffer (batch, N, dim), read and
  written by the thread that owns it.
- A column's global loads (A, B/C rows, the carried state) are split from its arithmetic;
  with ``PREFETCH`` the loop issues the next column's loads before this column's work.

The backward walks the chunks in reverse from the forward's chunk-boundary checkpoints: per
chunk and column it recomputes the states, then runs the adjoint the same way (rows backwards,
a reverse scan over the groups). Tails are neutral: positions past L and channels past dim get
``dt = 0`` (decay 1, input 0) and masked loads, so no stored value depends on them.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.jit import constexpr_function

from scanopt.ops._bf16 import widen_bf16_words

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@constexpr_function
def _bitrev(t, bits):
    r = 0
    for b in range(bits):
        r = r * 2 + (t >> b) % 2
    return r


@constexpr_function
def _log2(n):
    return max(int(n).bit_length() - 1, 0)


@triton.jit
def _rows(x, R: tl.constexpr):
    """The R entries along the last axis of a [BD, G, R] tile as a tuple of [BD, G] tensors
    (R >= 2, a power of two); likewise for a [1, G, R] tile."""
    LOG: tl.constexpr = _log2(R)
    parts = (x,)
    for lev in tl.static_range(LOG):
        new = ()
        for p in tl.static_range(1 << lev):
            if (R >> lev) == 2:
                lo, hi = tl.split(parts[p])
            else:
                lo, hi = tl.split(
                    tl.reshape(parts[p], [x.shape[0], x.shape[1], (R >> lev) // 2, 2])
                )
            new = new + (lo, hi)
        parts = new
    rows = ()
    for t in tl.static_range(R):
        rows = rows + (parts[_bitrev(t, LOG)],)
    return rows


@triton.jit
def _join_rows(rows, R: tl.constexpr):
    """Inverse of ``_rows``: R [BD, G] tensors -> the [BD, G, R] tile."""
    LOG: tl.constexpr = _log2(R)
    parts = ()
    for i in tl.static_range(R):
        parts = parts + (rows[_bitrev(i, LOG)],)
    for k in tl.static_range(LOG):
        new = ()
        for p in tl.static_range(R >> (k + 1)):
            t = tl.join(parts[2 * p], parts[2 * p + 1])  # [BD, G, 2] or [BD, G, S, 2]
            if k > 0:
                t = tl.reshape(t, [t.shape[0], t.shape[1], 2 << k])
            new = new + (t,)
        parts = new
    return parts[0]


@triton.jit
def _softplus(x):
    # mamba_ssm's softplus: x above 20, log(1 + e^x) below; log1p by Kahan's trick (exact for
    # tiny e^x, where log(1 + e) would round to 0)
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _softplus_fast(x, APPROX_LOG2: tl.constexpr):
    # softplus for 16-bit inputs (whose rounding, 2^-9 relative, is ~1000x this one's error):
    # ln 2 * log2(1 + e), e = 2^(x log2 e), with APPROX_LOG2 on the special-function unit
    # (lg2.approx, ~2^-22 absolute); below e = 1/8, where 1 + e would round away the digits,
    # log1p's series to e^7 (alternating: error below e^8 / 8, 6e-8 relative). ~18
    # instructions against ~45 for ``_softplus``; relative error ~1e-6
    # (tests/test_selective_scan.py::test_fast_activations_accuracy)
    e = tl.exp2(tl.minimum(x, 20.0) * LOG2E)
    es = tl.minimum(e, 0.125)  # the series' argument, bounded where it is not used
    series = 0.14285715 * es - 0.16666667
    series = series * es + 0.2
    series = series * es - 0.25
    series = series * es + 0.33333334
    series = series * es - 0.5
    series = (series * es + 1.0) * es
    if APPROX_LOG2:
        lg = libdevice.fast_log2f(1.0 + e)  # not in the interpreter
    else:
        lg = tl.log2(1.0 + e)
    lp = tl.where(e < 0.125, series, lg * LN2)
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _softplus_grad(x, FAST: tl.constexpr = 0):
    return tl.where(x > 20.0, 1.0, _sigmoid(x, FAST))


@triton.jit
def _sigmoid(x, FAST: tl.constexpr = 0):
    """``tl.sigmoid`` (an IEEE division), or with FAST (16-bit inputs; see ``FAST_ACT``)
    1 / (1 + 2^(-x log2 e)) with the approximate reciprocal (2: on the GPU; 1: the division,
    in the interpreter): ~5 instructions against ~15, ~2 ulp of fp32."""
    if FAST == 2:
        return libdevice.fast_dividef(1.0, 1.0 + tl.exp2(-x * LOG2E))
    elif FAST == 1:
        return 1.0 / (1.0 + tl.exp2(-x * LOG2E))
    else:
        return tl.sigmoid(x)


@triton.jit
def _linear_combine(a_l, b_l, a_r, b_r):
    # composition of x -> a x + b maps; in a forward scan (a_l, b_l) is the earlier segment, in
    # a reverse scan the later one
    return a_l * a_r, b_l * a_r + b_r


@triton.jit
def _load_tile(base, l3, offs_d, mask, s_l, s_d):
    """A [BD, G, R] fp32 tile of a (dim, L)-strided input at steps l3 [1, G, R]."""
    return tl.load(base + l3 * s_l + offs_d[:, None, None] * s_d, mask=mask, other=0.0).to(
        tl.float32
    )


@triton.jit
def _load_dt(delta_base, bias, l3, offs_d, mask, s_dt_l, s_dt_d, HAS_BIAS: tl.constexpr,
             SOFTPLUS: tl.constexpr, FAST_ACT: tl.constexpr):  # fmt: skip
    """(pre-softplus delta, dt) of a [BD, G, R] tile; dt is 0 where masked. FAST_ACT as
    in ``selective_scan_fwd_serial_kernel``."""
    pre = _load_tile(delta_base, l3, offs_d, mask, s_dt_l, s_dt_d)
    if HAS_BIAS:
        pre = pre + bias[:, None, None]
    dt = pre
    if SOFTPLUS:
        if FAST_ACT:
            dt = _softplus_fast(pre, FAST_ACT == 2)
        else:
            dt = _softplus(pre)
    dt = tl.where(mask, dt, 0.0)
    return pre, dt


@triton.jit
def _bc_load(base, fixed_ptr, n, l3, mask_l3, offs_d, mask_d, s_n, s_l, s_d,
             VAR: tl.constexpr, valid=True):  # fmt: skip
    """B or C of column n as loaded: variable, the chunk's [1, G, R] tile in the input dtype;
    fixed, the [BD] fp32 column (zeros where ``valid`` is False)."""
    if VAR:
        raw = tl.load(base + n * s_n + l3 * s_l, mask=mask_l3 & valid, other=0.0)
    else:
        raw = tl.load(fixed_ptr + offs_d * s_d + n * s_n, mask=mask_d & valid, other=0.0).to(
            tl.float32
        )
    return raw


@triton.jit
def _bc_split(raw, VAR: tl.constexpr, R: tl.constexpr):
    """``_bc_load``'s tile as R rows broadcastable to [BD, G]."""
    out = ()
    if VAR:
        out = _rows(raw.to(tl.float32), R)  # R x [1, G]
    else:
        for _t in tl.static_range(R):
            out = out + (raw[:, None],)  # [BD, 1]
    return out


@triton.jit
def _chunk_states(dt_r, dtu_r, A2n, Bt, carry, gi, R: tl.constexpr):
    """Decays and inputs of one column over a chunk's rows, and the state entering each group.

    ``carry`` [BD, G]: the state before the chunk (read in group 0 only). Returns ``(a_r,
    inp_r, P, x_in, x_end)``: the R decays and inputs [BD, G], each group's decay product, the
    state entering each group, and the state after the chunk (the same in every group).
    """
    a_r = ()
    inp_r = ()
    for t in tl.static_range(R):
        a = tl.exp2(dt_r[t] * A2n)
        inp = dtu_r[t] * Bt[t]
        if t == 0:
            h = inp
            P = a
        else:
            h = a * h + inp
            P = P * a
        a_r = a_r + (a,)
        inp_r = inp_r + (inp,)
    h = h + tl.where(gi == 0, P * carry, -0.0)
    Pg, incl = tl.associative_scan((P, h), axis=1, combine_fn=_linear_combine)  # [BD, G]
    G: tl.constexpr = carry.shape[1]
    prev = tl.gather(incl, tl.broadcast_to(tl.maximum(gi - 1, 0), carry.shape), 1)
    x_in = tl.where(gi == 0, carry, prev)
    x_end = tl.gather(incl, tl.full(carry.shape, G - 1, tl.int32), 1)
    return a_r, inp_r, P, x_in, x_end


@triton.jit
def _fwd_column_loads(n, valid, A_ptr, B_base, B_ptr, C_base, C_ptr, st_ptrs, l3, mask_l3,
                      offs_d, mask_d, first_group, dim, s_A_d, s_A_n, s_B_n, s_B_l, s_B_g,
                      s_C_n, s_C_l, s_C_g, B_VAR: tl.constexpr, C_VAR: tl.constexpr):  # fmt: skip
    """The global loads of one state column of a forward chunk: ``(A2n [BD], B, C, carry)``,
    B/C as ``_bc_load`` gives them and ``carry`` [BD, G] the column's state before the chunk
    (group 0 only). Split from the arithmetic so the column loop can issue them one iteration
    ahead (``PREFETCH``); a column with ``valid`` False reads nothing (zeros)."""
    A2n = (
        tl.load(A_ptr + offs_d * s_A_d + n * s_A_n, mask=mask_d & valid, other=0.0).to(tl.float32)
        * LOG2E
    )  # [BD]
    Braw = _bc_load(B_base, B_ptr, n, l3, mask_l3, offs_d, mask_d, s_B_n, s_B_l, s_B_g, B_VAR,
                    valid)  # fmt: skip
    Craw = _bc_load(C_base, C_ptr, n, l3, mask_l3, offs_d, mask_d, s_C_n, s_C_l, s_C_g, C_VAR,
                    valid)  # fmt: skip
    carry = tl.load(st_ptrs + n * dim, mask=first_group & valid, other=0.0)
    return A2n, Braw, Craw, carry


@triton.jit
def _fwd_column(n, valid, loads, y_r, dt_r, dtu_r, st_ptrs, ck_ptrs, first_group, gi, dim, N, kk,
                store_ck, B_VAR: tl.constexpr, C_VAR: tl.constexpr, R: tl.constexpr):  # fmt: skip
    """One state column of a forward chunk, from its ``_fwd_column_loads``: advance its state
    over the chunk and add x C to the R rows of ``y_r``. A column with ``valid`` False (past N)
    has decay 1, input 0 and C 0: it adds nothing and stores nothing."""
    A2n, Braw, Craw, carry = loads
    Bt = _bc_split(Braw, B_VAR, R)
    Ct = _bc_split(Craw, C_VAR, R)
    keep = first_group & valid
    a_r, inp_r, P, xn, x_end = _chunk_states(dt_r, dtu_r, A2n[:, None], Bt, carry, gi, R)
    tl.store(st_ptrs + n * dim, x_end, mask=keep)
    # a mask, not a branch: the chunk stays one basic block for the scheduler
    tl.store(ck_ptrs + (kk * N + n).to(tl.int64) * dim, x_end, mask=keep & store_ck)
    new_y = ()
    for t in tl.static_range(R):
        xn = a_r[t] * xn + inp_r[t]
        new_y = new_y + (y_r[t] + xn * Ct[t],)
    return new_y


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    h0_ptr,
    out_ptr,
    state_ptr,
    ckpt_ptr,
    dim,
    L,
    N,
    n_ck,
    cpg_b,
    cpg_c,
    s_u_b,
    s_u_d,
    s_u_l,
    s_dt_b,
    s_dt_d,
    s_dt_l,
    s_z_b,
    s_z_d,
    s_z_l,
    s_A_d,
    s_A_n,
    s_B_b,
    s_B_g,
    s_B_n,
    s_B_l,
    s_C_b,
    s_C_g,
    s_C_n,
    s_C_l,
    s_D,
    s_bias,
    s_h0_b,
    s_h0_d,
    s_h0_n,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    B_VAR: tl.constexpr,
    C_VAR: tl.constexpr,
    STORE_CKPT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_R: tl.constexpr,
    CK: tl.constexpr,
    COLS: tl.constexpr,
    PREFETCH: tl.constexpr,
    FAST_ACT: tl.constexpr = 0,
):
    """out = (sum_n x_t C_t + D u) * silu(z) (batch, dim, L); the states at every CK-th step.

    Grid: (batch, cdiv(dim, BLOCK_D)). The N state columns are a loop; each column's state
    between chunks lives in ``state`` (batch, N, dim) fp32 (read and written by the same thread;
    it holds the last state at the end). B/C variable: (batch, G, N, L) strides with the group
    of the whole channel block (the launcher makes blocks group-aligned); fixed: (dim, N) with
    ``s_B_g`` the dim stride. ``ckpt[b, k, :, d]`` is the state after step ``(k+1)*CK - 1`` (the
    last one after step L-1); CK is a multiple of the chunk length BLOCK_G * BLOCK_R.
    """
    BLOCK_L: tl.constexpr = BLOCK_G * BLOCK_R
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    d0 = pid_d * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)  # [BD]
    mask_d = offs_d < dim
    gi = tl.arange(0, BLOCK_G)[None, :]  # [1, G]
    step = gi[:, :, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, None, :]  # [1, G, R]
    first_group = mask_d[:, None] & (gi == 0)  # [BD, G]: the copy of a per-channel value we keep
    zero2 = tl.zeros([BLOCK_D, BLOCK_G], dtype=tl.float32)

    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * s_bias, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d * s_D, mask=mask_d, other=0.0).to(tl.float32)
    u_base = u_ptr + pid_b * s_u_b
    delta_base = delta_ptr + pid_b * s_dt_b
    B_base = B_ptr + pid_b * s_B_b + (d0 // cpg_b) * s_B_g
    C_base = C_ptr + pid_b * s_C_b + (d0 // cpg_c) * s_C_g
    st_ptrs = state_ptr + pid_b * N * dim + offs_d[:, None] + gi * 0  # [BD, G], + n * dim
    ck_ptrs = ckpt_ptr + pid_b * n_ck * N * dim + offs_d[:, None] + gi * 0  # + (k*N + n)*dim
    io_off = (pid_b * dim + offs_d[:, None, None]) * L  # [BD, 1, 1] into out

    # the state before the first chunk
    for n in range(0, N):
        if HAS_H0:
            x0 = tl.load(h0_ptr + pid_b * s_h0_b + offs_d * s_h0_d + n * s_h0_n, mask=mask_d,
                         other=0.0).to(tl.float32)  # fmt: skip
        else:
            x0 = tl.zeros([BLOCK_D], dtype=tl.float32)
        tl.store(st_ptrs + n * dim, zero2 + x0[:, None], mask=first_group)

    n_chunks = tl.cdiv(L, BLOCK_L)
    for c in range(0, n_chunks):
        l3 = c * BLOCK_L + step  # [1, G, R]
        mask_l3 = l3 < L
        mask3 = mask_l3 & mask_d[:, None, None]  # [BD, G, R]
        u = _load_tile(u_base, l3, offs_d, mask3, s_u_l, s_u_d)
        pre, dt = _load_dt(delta_base, bias, l3, offs_d, mask3, s_dt_l, s_dt_d, HAS_BIAS,
                           SOFTPLUS, FAST_ACT)  # fmt: skip
        dt_r = _rows(dt, BLOCK_R)
        dtu_r = _rows(dt * u, BLOCK_R)
        zrow = dt_r[0] * 0.0  # zeros in the rows' layout (tl.zeros would pick another one)
        y_r = ()
        for _t in tl.static_range(BLOCK_R):
            y_r = y_r + (zrow,)
        store_ck = STORE_CKPT & (((c + 1) % (CK // BLOCK_L) == 0) | (c == n_chunks - 1))
        kk = c // (CK // BLOCK_L)
        # COLS state columns per iteration: independent recurrences the scheduler interleaves.
        # PREFETCH: the next iteration's column loads are issued before this one's arithmetic,
        # so each column's B/C rows arrive while the previous column computes (without it the
        # warps stall on those loads: Nsight Compute, H100, 2026-12-06)
        if PREFETCH:
            ahead = ()
            for j in tl.static_range(COLS):
                ahead = ahead + (
                    _fwd_column_loads(
                        j, j < N, A_ptr, B_base, B_ptr, C_base, C_ptr, st_ptrs, l3, mask_l3,
                        offs_d, mask_d, first_group, dim, s_A_d, s_A_n, s_B_n, s_B_l, s_B_g,
                        s_C_n, s_C_l, s_C_g, B_VAR, C_VAR,
                    ),
                )  # fmt: skip
        for n0 in range(0, N, COLS):
            n_load = n0  # first column whose loads are issued in this iteration
            if PREFETCH:
                n_load = n0 + COLS
            fresh = ()
            for j in tl.static_range(COLS):
                fresh = fresh + (
                    _fwd_column_loads(
                        n_load + j, (n_load + j) < N, A_ptr, B_base, B_ptr, C_base, C_ptr,
                        st_ptrs, l3, mask_l3, offs_d, mask_d, first_group, dim, s_A_d, s_A_n,
                        s_B_n, s_B_l, s_B_g, s_C_n, s_C_l, s_C_g, B_VAR, C_VAR,
                    ),
                )  # fmt: skip
            if PREFETCH:
                cur = ahead
                ahead = fresh
            else:
                cur = fresh
            for j in tl.static_range(COLS):
                y_r = _fwd_column(
                    n0 + j, (n0 + j) < N, cur[j], y_r, dt_r, dtu_r, st_ptrs, ck_ptrs,
                    first_group, gi, dim, N, kk, store_ck, B_VAR, C_VAR, BLOCK_R,
                )  # fmt: skip
        y = _join_rows(y_r, BLOCK_R)  # [BD, G, R]
        if HAS_D:
            y += Dv[:, None, None] * u
        if HAS_Z:
            zt = _load_tile(z_ptr + pid_b * s_z_b, l3, offs_d, mask3, s_z_l, s_z_d)
            y = y * zt * _sigmoid(zt, FAST_ACT)
        tl.store(out_ptr + io_off + l3, y.to(out_ptr.dtype.element_ty), mask=mask3)


# ---------------------------------------------------------------------------------------------
# Serial forward family (config SERIAL=1): a channel's N states live in the registers of
# NSPLIT lanes (N / NSPLIT each, a tuple of [BD, NS, 1] tensors, state n = j * NSPLIT + lane),
# and the steps are walked one by one. No group scan and no second state pass: per (t, d, n)
# one exp2 and four FMA-pipe operations, plus a log2(NSPLIT)-round lane sum of y per step and
# channel. Parallelism over L comes from segments of SEG steps: PASS 1 runs every segment but
# the last from a zero state (its end state and sum of dt), ``selective_scan_fwd_combine_kernel``
# chains them into each segment's start state, PASS 2 reruns every segment from its start state
# and writes out, the checkpoints and the last state. One segment: PASS 2 alone.


@triton.jit
def _serial_rows(ptrs, mask, NS: tl.constexpr, T: tl.constexpr):
    """A [BD, NS, T] load (T steps contiguous, 16 bytes: one vector per lane, so Triton's
    coalesced layout has the T steps in each thread) as T [BD, NS] fp32 step rows, split in
    registers."""
    return _rows(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), T)


@triton.jit
def _serial_loads(t0, t_stop, u_base, dt_base, B_base, C_base, md, col_d, lane_n, t3, tw, tq, N,
                  s_u_l, s_dt_l, s_B_n, s_B_l, s_C_n, s_C_l, NSPLIT: tl.constexpr,
                  NPT: tl.constexpr, PASS: tl.constexpr, B_VAR: tl.constexpr,
                  C_VAR: tl.constexpr, CPL: tl.constexpr, PAIRS: tl.constexpr):  # fmt: skip
    """The global loads of the block at step t0, in the inputs' dtypes (zeros past t_stop):
    ``(u, dt before bias/softplus, B rows, C rows)``: u ``[BD, NS, T]`` and dt ``[BD, NS, T2]``
    tuples over the CPL channel sub-blocks (``u_base``, ``dt_base``, ``md`` likewise), the rows
    a tuple of NPT ``[BD, NS, T]`` tiles shared by the sub-blocks (empty when fixed, or C in
    PASS 1)."""
    u_raw = ()
    dt_raw = ()
    for c in tl.static_range(CPL):
        mq = md[c] & (t0 + tq < t_stop)  # [BD, NS, T2]
        dt_raw = dt_raw + (tl.load(dt_base[c] + (t0 + tq) * s_dt_l, mask=mq, other=0.0),)
        m3 = md[c] & (t0 + t3 < t_stop)  # [BD, 1, T]
        u_raw = u_raw + (tl.load(u_base[c] + (t0 + t3) * s_u_l, mask=m3, other=0.0),)
    if PAIRS:
        # bf16 B/C as int32 words of two steps (t0 + 2i, t0 + 2i + 1): tw [1, 1, T/2]; every
        # row starts at an even element and L is even, so a word is all in or all out
        t_bc = t0 // 2 + tw
        mbc = (col_d >= 0) & (t_bc < t_stop // 2)  # B/C rows: every channel's lanes load them
    else:
        t_bc = t0 + tw
        mbc = (col_d >= 0) & (t_bc < t_stop)
    Braw = ()
    Craw = ()
    for j in tl.static_range(NPT):
        m_bc = mbc & (j * NSPLIT + lane_n < N)  # [BD, NS, T] (T/2 words with PAIRS)
        if B_VAR:
            Braw = Braw + (tl.load(B_base + j * NSPLIT * s_B_n + t_bc * s_B_l, mask=m_bc,
                                   other=0),)  # fmt: skip
        if PASS == 2 and C_VAR:
            Craw = Craw + (tl.load(C_base + j * NSPLIT * s_C_n + t_bc * s_C_l, mask=m_bc,
                                   other=0),)  # fmt: skip
    return u_raw, dt_raw, Braw, Craw


@triton.jit
def _widen_pairs(words, T: tl.constexpr):
    """T fp32 rows from a tile of T/2 int32 words, each two bf16 steps (the earlier step in
    the low half; ``widen_bf16_words``)."""
    rows = ()
    for i in tl.static_range(T // 2):
        rows = rows + widen_bf16_words(words[i])
    return rows


@triton.jit
def _serial_widen(Braw, Craw, NPT: tl.constexpr, T: tl.constexpr, PASS: tl.constexpr,
                  B_VAR: tl.constexpr, C_VAR: tl.constexpr, PAIRS: tl.constexpr):  # fmt: skip
    """The block's B/C rows in fp32: NPT tuples of T ``[BD, NS]`` rows each (empty where
    ``_serial_loads`` loaded none)."""
    Bj = ()
    Cj = ()
    for j in tl.static_range(NPT):
        if B_VAR:
            if PAIRS:
                Bj = Bj + (_widen_pairs(_rows(Braw[j], T // 2), T),)
            else:
                Bj = Bj + (_rows(Braw[j].to(tl.float32), T),)
        if PASS == 2 and C_VAR:
            if PAIRS:
                Cj = Cj + (_widen_pairs(_rows(Craw[j], T // 2), T),)
            else:
                Cj = Cj + (_rows(Craw[j].to(tl.float32), T),)
    return Bj, Cj


@triton.jit
def selective_scan_fwd_serial_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    hs_ptr,
    hend_ptr,
    dtsum_ptr,
    out_ptr,
    state_ptr,
    ckpt_ptr,
    dim,
    L,
    SEG,
    n_ck,
    CK,
    cpg_b,
    cpg_c,
    s_u_b,
    s_u_d,
    s_u_l,
    s_dt_b,
    s_dt_d,
    s_dt_l,
    s_z_b,
    s_z_d,
    s_z_l,
    s_A_d,
    s_A_n,
    s_B_b,
    s_B_g,
    s_B_n,
    s_B_l,
    s_C_b,
    s_C_g,
    s_C_n,
    s_C_l,
    s_D,
    s_bias,
    s_hs_b,
    s_hs_s,
    s_hs_d,
    s_hs_n,
    N: tl.constexpr,
    PASS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_HS: tl.constexpr,
    B_VAR: tl.constexpr,
    C_VAR: tl.constexpr,
    STORE_CKPT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NSPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PREFETCH: tl.constexpr = False,
    FAST_ACT: tl.constexpr = 0,
    CPL: tl.constexpr = 1,
    BC_PAIRS: tl.constexpr = False,
):
    """One segment of SEG steps of ``BLOCK_D * CPL`` channels (CPL sub-blocks of BLOCK_D, one
    channel of each per NSPLIT lanes). Grid: (cdiv(dim, BLOCK_D * CPL), segments, batch).
    FAST_ACT: 0 the exact softplus and sigmoid; 1 / 2 the 16-bit inputs' ones
    (``_softplus_fast``, ``_sigmoid``; 2 with the GPU's approximate log2 and reciprocal, 1 in
    the interpreter). The group kernels take the same flag.

    PASS 1: from a zero state; stores the segment's end state ``hend[b, s, n, d]`` and its sum
    of dt ``dtsum[b, s, d]`` (fp32). PASS 2: from ``hs[b, s, d, n]`` (strides ``s_hs_*``: the
    combine kernel's start states, or the initial state for one segment; zeros without
    ``HAS_HS``); stores out, ``ckpt[b, k, n, d]`` after every step ``(k+1)*CK - 1`` (the last
    one after step L-1) and, in the last segment, the last state ``state[b, n, d]``.
    B/C as in ``selective_scan_fwd_kernel`` (variable: the group of the channel block).
    """
    NPT: tl.constexpr = (N + NSPLIT - 1) // NSPLIT  # states per lane
    pid_d = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    d0 = pid_d * (BLOCK_D * CPL)
    lane_n = tl.arange(0, NSPLIT)[None, :, None]  # [1, NS, 1]
    lane2 = tl.arange(0, NSPLIT)[None, :]  # [1, NS]
    t_begin = pid_s * SEG
    t_stop = tl.minimum(t_begin + SEG, L)
    t3 = tl.arange(0, BLOCK_T)[None, None, :]  # [1, 1, T]
    T2: tl.constexpr = BLOCK_T // NSPLIT  # steps per lane where each (t, d) is done once
    tq = lane_n * T2 + tl.arange(0, T2)[None, None, :]  # [1, NS, T2]

    # CPL sub-blocks of BLOCK_D channels each (a thread holds one channel of each): they share
    # the B/C rows, loaded and widened once per thread. Per sub-block c, tuples over c (and
    # c * NPT + j for per-state values): channel offsets, masks, bases.
    offs_d = ()
    col_d = ()  # [BD, 1, 1]
    md = ()  # [BD, 1, 1]
    col2 = ()  # [BD, 1]
    md2 = ()
    u_base = ()  # [BD, NS, 1]
    dt_base = ()
    out_base = ()  # [BD, 1, 1]
    for c in tl.static_range(CPL):
        od = d0 + c * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
        offs_d = offs_d + (od,)
        col_d = col_d + (od[:, None, None],)
        md = md + (od[:, None, None] < dim,)
        col2 = col2 + (od[:, None],)
        md2 = md2 + (od[:, None] < dim,)
        u_base = u_base + (u_ptr + pid_b * s_u_b + od[:, None, None] * s_u_d + lane_n * 0,)
        dt_base = dt_base + (delta_ptr + pid_b * s_dt_b + od[:, None, None] * s_dt_d
                             + lane_n * 0,)  # fmt: skip
        out_base = out_base + (out_ptr + (pid_b * dim + od[:, None, None]) * L,)
    # the layout every per-step [BD, NS] value takes (the split rows of a [BD, NS, T] load):
    # the state, A and the rest are put in it once here, so the step loop changes no layout
    zero = _serial_rows(u_base[0] + t3 * 0, md[0] & (t3 < 0), NSPLIT, BLOCK_T)[0]  # [BD, NS]

    # per channel and state: A log2(e), fixed B / C, the state ([BD, NS] each; states past N
    # have A = B = C = 0 and stay 0)
    A2 = ()
    Bf = ()
    Cf = ()
    h = ()
    for c in tl.static_range(CPL):
        for j in tl.static_range(NPT):
            n = j * NSPLIT + lane2  # [1, NS]
            mn = md2[c] & (n < N)
            A2 = A2 + (zero + tl.load(A_ptr + col2[c] * s_A_d + n * s_A_n, mask=mn, other=0.0)
                       * LOG2E,)  # fmt: skip
            if not B_VAR:
                Bf = Bf + (zero + tl.load(B_ptr + col2[c] * s_B_g + n * s_B_n, mask=mn,
                                          other=0.0).to(tl.float32),)  # fmt: skip
            if not C_VAR:
                Cf = Cf + (zero + tl.load(C_ptr + col2[c] * s_C_g + n * s_C_n, mask=mn,
                                          other=0.0).to(tl.float32),)  # fmt: skip
            if PASS == 2 and HAS_HS:
                h = h + (zero + tl.load(hs_ptr + pid_b * s_hs_b + pid_s * s_hs_s
                                        + col2[c] * s_hs_d + n * s_hs_n, mask=mn,
                                        other=0.0).to(tl.float32),)  # fmt: skip
            else:
                h = h + (zero,)
    bias = ()  # [BD, 1, 1]
    Dv = ()  # [BD, NS]: D u enters y once per channel, on state lane 0
    dtsum = ()  # [BD, NS, T2]
    for c in tl.static_range(CPL):
        b_c = tl.zeros([BLOCK_D, 1, 1], dtype=tl.float32)
        if HAS_BIAS:
            b_c += tl.load(bias_ptr + col_d[c] * s_bias, mask=md[c], other=0.0).to(tl.float32)
        bias = bias + (b_c,)
        d_c = zero
        if HAS_D:
            d_c += tl.load(D_ptr + col2[c] * s_D, mask=md2[c] & (lane2 == 0), other=0.0).to(
                tl.float32)  # fmt: skip
        Dv = Dv + (d_c,)
        dtsum = dtsum + (tl.zeros([BLOCK_D, NSPLIT, T2], dtype=tl.float32),)

    # B/C rows: [BD, NS, T] pointers, one channel per thread (the first sub-block's; the
    # channels of a program share one group); BC_PAIRS: int32 words of two bf16 steps
    # (the launcher passes even strides for every axis but L, and s_l = 1)
    if BC_PAIRS:  # the strides come in words (halved), L's stays 1
        B_base = B_ptr.to(tl.pointer_type(tl.int32)) + pid_b * s_B_b + (d0 // cpg_b) * s_B_g \
            + lane_n * s_B_n + col_d[0] * 0  # fmt: skip
        C_base = C_ptr.to(tl.pointer_type(tl.int32)) + pid_b * s_C_b + (d0 // cpg_c) * s_C_g \
            + lane_n * s_C_n + col_d[0] * 0  # fmt: skip
        tw = tl.arange(0, BLOCK_T // 2)[None, None, :]  # [1, 1, T/2] B/C words
    else:
        tw = t3
        B_base = B_ptr + pid_b * s_B_b + (d0 // cpg_b) * s_B_g + col_d[0] * 0 + lane_n * s_B_n
        C_base = C_ptr + pid_b * s_C_b + (d0 // cpg_c) * s_C_g + col_d[0] * 0 + lane_n * s_C_n
    # checkpoints: per state, the pointer into chunk 0 (hoisted out of the step loop), the
    # chunk index kk and the steps left in it (a countdown: CK is a runtime value, and a
    # division per block cost ~45 instructions; CK is a multiple of BLOCK_T)
    ck_ptrs = ()
    if STORE_CKPT:
        for c in tl.static_range(CPL):
            for j in tl.static_range(NPT):
                ck_ptrs = ck_ptrs + (ckpt_ptr + ((pid_b * n_ck) * N + j * NSPLIT + lane2) * dim
                                     + col2[c],)  # fmt: skip
    kk = t_begin // CK
    ck_left = CK - (t_begin - kk * CK)
    # PREFETCH: the next block's loads are issued before this block's arithmetic, so a block
    # does not wait on its own loads. u and dt are carried through the loop in the inputs'
    # dtypes; the B/C rows are widened at the end of the block (the loads have landed by
    # then) and carried in fp32: carried 16-bit values cost a PRMT each to split
    if PREFETCH:
        ahead = _serial_loads(t_begin, t_stop, u_base, dt_base, B_base, C_base, md, col_d[0],
                              lane_n, t3, tw, tq, N, s_u_l, s_dt_l, s_B_n, s_B_l, s_C_n, s_C_l,
                              NSPLIT, NPT, PASS, B_VAR, C_VAR, CPL, BC_PAIRS)  # fmt: skip
        bc_ahead = _serial_widen(ahead[2], ahead[3], NPT, BLOCK_T, PASS, B_VAR, C_VAR, BC_PAIRS)
        ahead = (ahead[0], ahead[1])
    for t0 in range(t_begin, t_stop, BLOCK_T):
        if PREFETCH:
            u_raw, dt_raw = ahead
            Bj, Cj = bc_ahead
            nxt = _serial_loads(t0 + BLOCK_T, t_stop, u_base, dt_base, B_base, C_base, md,
                                col_d[0], lane_n, t3, tw, tq, N, s_u_l, s_dt_l, s_B_n, s_B_l, s_C_n,
                                s_C_l, NSPLIT, NPT, PASS, B_VAR, C_VAR, CPL, BC_PAIRS)  # fmt: skip
            ahead = (nxt[0], nxt[1])
        else:
            u_raw, dt_raw, Braw, Craw = _serial_loads(
                t0, t_stop, u_base, dt_base, B_base, C_base, md, col_d[0], lane_n, t3, tw, tq, N,
                s_u_l, s_dt_l, s_B_n, s_B_l, s_C_n, s_C_l, NSPLIT, NPT, PASS, B_VAR, C_VAR, CPL,
                BC_PAIRS)  # fmt: skip
            # the block's B/C rows, widened once for every sub-block
            Bj, Cj = _serial_widen(Braw, Craw, NPT, BLOCK_T, PASS, B_VAR, C_VAR, BC_PAIRS)
        new_h = ()
        new_dtsum = ()
        for c in tl.static_range(CPL):
            mq = md[c] & (t0 + tq < t_stop)  # [BD, NS, T2]
            # dt once per (t, d): lane s of a channel takes steps s*T2 .. s*T2 + T2 - 1
            # (softplus costs exp/log/rcp; NSPLIT copies would add NSPLIT * 3 / (N / NSPLIT)
            # of the recurrence's exp2s), then every lane gets the block's T values
            dt_q = dt_raw[c].to(tl.float32) + bias[c]
            if SOFTPLUS:
                if FAST_ACT:
                    dt_q = _softplus_fast(dt_q, FAST_ACT == 2)
                else:
                    dt_q = _softplus(dt_q)
            dt_q = tl.where(mq, dt_q, 0.0)  # past L: decay 1, input 0
            if PASS == 1:
                new_dtsum = new_dtsum + (dtsum[c] + dt_q,)
            u3 = u_raw[c].to(tl.float32)
            # a max over a unit axis: the layout pass does not move the broadcast's conversion
            # back through it, so the softplus stays at one (t, d) per lane
            dt_q = tl.max(tl.reshape(dt_q, [BLOCK_D, NSPLIT, T2, 1]), axis=3)
            dt3 = u3 * 0.0 + tl.reshape(dt_q, [BLOCK_D, BLOCK_T])[:, None, :]  # [BD, NS, T]
            u_r = _rows(u3, BLOCK_T)
            dt_r = _rows(dt3, BLOCK_T)
            dtu_r = ()
            y_r = ()
            for t in tl.static_range(BLOCK_T):
                dtu_r = dtu_r + (dt_r[t] * u_r[t],)
                y_r = y_r + (Dv[c] * u_r[t],)
            for j in tl.static_range(NPT):
                hj = h[c * NPT + j]
                new_y = ()
                for t in tl.static_range(BLOCK_T):
                    if B_VAR:
                        inp = dtu_r[t] * Bj[j][t]
                    else:
                        inp = dtu_r[t] * Bf[c * NPT + j]
                    hj = tl.exp2(dt_r[t] * A2[c * NPT + j]) * hj + inp
                    if PASS == 2:
                        if C_VAR:
                            new_y = new_y + (y_r[t] + hj * Cj[j][t],)
                        else:
                            new_y = new_y + (y_r[t] + hj * Cf[c * NPT + j],)
                if PASS == 2:
                    y_r = new_y
                new_h = new_h + (hj,)
            if PASS == 2:
                y = tl.sum(_join_rows(y_r, BLOCK_T), axis=1)  # [BD, NS, T] -> [BD, T]
                # back to one (t, d) per lane for the gate and the store
                y = tl.reshape(y, [BLOCK_D, NSPLIT, T2])
                if HAS_Z:
                    zq = tl.load(z_ptr + pid_b * s_z_b + col_d[c] * s_z_d + (t0 + tq) * s_z_l,
                                 mask=mq, other=0.0).to(tl.float32)  # fmt: skip
                    y = y * zq * _sigmoid(zq, FAST_ACT)
                tl.store(out_base[c] + t0 + tq, y.to(out_ptr.dtype.element_ty), mask=mq)
        h = new_h
        if PASS == 1:
            dtsum = new_dtsum
        if PREFETCH:
            bc_ahead = _serial_widen(nxt[2], nxt[3], NPT, BLOCK_T, PASS, B_VAR, C_VAR, BC_PAIRS)
        if PASS == 2 and STORE_CKPT:
            # a mask, not a branch: after step (k+1)*CK - 1, or the last step (a block lies
            # inside one checkpoint chunk, kk)
            ck_left -= BLOCK_T
            at_ck = (ck_left == 0) | (t0 + BLOCK_T >= L)
            for c in tl.static_range(CPL):
                for j in tl.static_range(NPT):
                    tl.store(ck_ptrs[c * NPT + j] + kk * (N * dim), h[c * NPT + j],
                             mask=md2[c] & (j * NSPLIT + lane2 < N) & at_ck)  # fmt: skip
            kk = tl.where(ck_left == 0, kk + 1, kk)
            ck_left = tl.where(ck_left == 0, CK, ck_left)
    if PASS == 1:
        row = pid_b * tl.num_programs(1) + pid_s
        for c in tl.static_range(CPL):
            for j in tl.static_range(NPT):
                n = j * NSPLIT + lane2
                tl.store(hend_ptr + (row * N + n) * dim + col2[c], h[c * NPT + j],
                         mask=md2[c] & (n < N))  # fmt: skip
            tl.store(dtsum_ptr + row * dim + offs_d[c],
                     tl.sum(tl.sum(dtsum[c], axis=2), axis=1), mask=offs_d[c] < dim)  # fmt: skip
    else:
        last = t_stop >= L
        for c in tl.static_range(CPL):
            for j in tl.static_range(NPT):
                n = j * NSPLIT + lane2
                tl.store(state_ptr + (pid_b * N + n) * dim + col2[c], h[c * NPT + j],
                         mask=md2[c] & (n < N) & last)  # fmt: skip


@triton.jit
def selective_scan_fwd_combine_kernel(
    A_ptr,
    h0_ptr,
    hend_ptr,
    dtsum_ptr,
    hs_ptr,
    dim,
    N,
    n_seg,
    n_run,
    s_A_d,
    s_A_n,
    s_h0_b,
    s_h0_d,
    s_h0_n,
    HAS_H0: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Every segment's start state ``hs[b, s, d, n]`` (fp32, s < n_seg) from the initial state
    and PASS 1's end states of segments 0 .. n_run - 1 (n_run = n_seg - 1):
    ``hs[s + 1] = exp2(A log2(e) dtsum[s]) hs[s] + hend[s]``. Grid: (cdiv(dim, BLOCK_D),
    batch); serial over the segments, one program per channel block."""
    pid_d = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    for n in range(0, N):
        A2 = tl.load(A_ptr + offs_d * s_A_d + n * s_A_n, mask=mask_d, other=0.0) * LOG2E
        if HAS_H0:
            x = tl.load(h0_ptr + pid_b * s_h0_b + offs_d * s_h0_d + n * s_h0_n, mask=mask_d,
                        other=0.0).to(tl.float32)  # fmt: skip
        else:
            x = tl.zeros([BLOCK_D], dtype=tl.float32)
        hs_row = hs_ptr + (pid_b * n_seg * dim + offs_d) * N + n  # + s * dim * N
        tl.store(hs_row, x, mask=mask_d)
        for s in range(0, n_run):
            row = pid_b * n_run + s
            e = tl.load(hend_ptr + (row * N + n) * dim + offs_d, mask=mask_d, other=0.0)
            ds = tl.load(dtsum_ptr + row * dim + offs_d, mask=mask_d, other=0.0)
            x = tl.exp2(A2 * ds) * x + e
            tl.store(hs_row + (s + 1) * dim * N, x, mask=mask_d)


@triton.jit
def _bwd_column_loads(n, valid, c, A_ptr, B_base, B_ptr, C_base, C_ptr, h0_ptr, ck_ptrs,
                      adj_ptrs, l3, mask_l3, offs_d, mask_d, first_group, pid_b, dim, N, s_A_d,
                      s_A_n, s_B_n, s_B_l, s_B_g, s_C_n, s_C_l, s_C_g, s_h0_b, s_h0_d, s_h0_n,
                      B_VAR: tl.constexpr, C_VAR: tl.constexpr, HAS_H0: tl.constexpr):  # fmt: skip
    """The global loads of one state column of a backward chunk ``c``: ``(A2n [BD], B, C, xc
    [BD], q [BD, G])``: B/C as ``_bc_load`` gives them, ``xc`` the state before the chunk (its
    checkpoint, or the initial state for chunk 0) and ``q`` the column's adjoint after the chunk
    (group 0 only). A column with ``valid`` False reads nothing (zeros)."""
    md = mask_d & valid
    A2n = tl.load(A_ptr + offs_d * s_A_d + n * s_A_n, mask=md, other=0.0).to(tl.float32) * LOG2E
    Braw = _bc_load(B_base, B_ptr, n, l3, mask_l3, offs_d, mask_d, s_B_n, s_B_l, s_B_g, B_VAR,
                    valid)  # fmt: skip
    Craw = _bc_load(C_base, C_ptr, n, l3, mask_l3, offs_d, mask_d, s_C_n, s_C_l, s_C_g, C_VAR,
                    valid)  # fmt: skip
    xc = tl.load(ck_ptrs + ((c - 1) * N + n).to(tl.int64) * dim, mask=md & (c > 0), other=0.0)
    if HAS_H0:
        h0n = tl.load(h0_ptr + pid_b * s_h0_b + offs_d * s_h0_d + n * s_h0_n,
                      mask=md & (c == 0), other=0.0).to(tl.float32)  # fmt: skip
        xc = tl.where(c == 0, h0n, xc)
    q = tl.load(adj_ptrs + n * dim, mask=first_group & valid, other=0.0)
    return A2n, Braw, Craw, xc, q


@triton.jit
def selective_scan_bwd_kernel(
    dout_ptr,
    dlast_ptr,
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    h0_ptr,
    ckpt_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    adj_ptr,
    dA_ptr,
    dB_ptr,
    dC_ptr,
    dD_ptr,
    dbias_ptr,
    dim,
    L,
    L_row,
    N,
    n_ck,
    s_ck_b,
    cpg_b,
    cpg_c,
    s_do_b,
    s_do_d,
    s_do_l,
    s_u_b,
    s_u_d,
    s_u_l,
    s_dt_b,
    s_dt_d,
    s_dt_l,
    s_z_b,
    s_z_d,
    s_z_l,
    s_A_d,
    s_A_n,
    s_B_b,
    s_B_g,
    s_B_n,
    s_B_l,
    s_C_b,
    s_C_g,
    s_C_n,
    s_C_l,
    s_D,
    s_bias,
    s_h0_b,
    s_h0_d,
    s_h0_n,
    s_dl_b,
    s_dl_d,
    s_dl_n,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    B_VAR: tl.constexpr,
    C_VAR: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PREFETCH: tl.constexpr,
    ATOMIC_BC: tl.constexpr = 0,
    FAST_ACT: tl.constexpr = 0,
):
    """All gradients of the scan, walking the chunks (of BLOCK_G * BLOCK_R steps = the
    forward's checkpoint interval) backwards.

    Per chunk and state column: recompute the chunk's states from its checkpoint (as the
    forward does), then the adjoint ``g_t = dy_t C_t + G_t`` with ``G_t = a_{t+1} g_{t+1}``
    (dLoss/dx_t through the later steps), again in two passes over the rows with a reverse scan
    across the groups in between. Each column's ``G`` between chunks lives in ``adj`` (batch, N,
    dim) fp32; after the first chunk it is the initial-state gradient.

    A launch may cover a segment of the sequence (the launcher's ``SEGMENTS``): then every
    (batch, dim, L) tensor is a view starting at the segment, ``L`` its length and ``L_row`` the
    row length of du / ddelta / dz, the checkpoints start at the segment (batch stride
    ``s_ck_b``), ``h0`` is the checkpoint before it and ``dlast`` the adjoint the later segment
    left in ``adj``.

    Outputs: du, ddelta, dz (batch, dim, L_row) contiguous; partial sums summed by the caller:
    ``dA[b, n, g, d]``, ``dD[b, l, d]``, ``dbias[b, l, d]`` (l < the chunk length), dB/dC
    ``[b, n, g, d]`` when fixed or ``[b, d_block, n, L]`` when variable (summed over the blocks
    of a group). With ``ATOMIC_BC`` (non-deterministic mode, one launch only) variable dB/dC go
    straight into zeroed fp32 ``[b, group, n, L]`` by ``atomic_add``: 1 adds the program's sum
    over its channels, 2 every channel's own term (no cross-warp sum, BLOCK_D times the atomics).
    No other output uses atomics.
    """
    BLOCK_L: tl.constexpr = BLOCK_G * BLOCK_R
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    n_dblk = tl.num_programs(1)
    d0 = pid_d * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)  # [BD]
    mask_d = offs_d < dim
    gi = tl.arange(0, BLOCK_G)[None, :]  # [1, G]
    step = gi[:, :, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, None, :]  # [1, G, R]
    zero2 = tl.zeros([BLOCK_D, BLOCK_G], dtype=tl.float32)
    first_group = mask_d[:, None] & (gi == 0)  # [BD, G]
    last_group = gi == BLOCK_G - 1  # [1, G]
    mask_dg = mask_d[:, None] & (gi >= 0)  # [BD, G]

    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * s_bias, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d * s_D, mask=mask_d, other=0.0).to(tl.float32)
    dD_acc = tl.zeros([BLOCK_D, BLOCK_G, BLOCK_R], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D, BLOCK_G, BLOCK_R], dtype=tl.float32)

    u_base = u_ptr + pid_b * s_u_b
    delta_base = delta_ptr + pid_b * s_dt_b
    dout_base = dout_ptr + pid_b * s_do_b
    B_base = B_ptr + pid_b * s_B_b + (d0 // cpg_b) * s_B_g
    C_base = C_ptr + pid_b * s_C_b + (d0 // cpg_c) * s_C_g
    # du / ddelta / dz rows are L_row long (the whole sequence when a launch covers a segment)
    io_off = (pid_b * dim + offs_d[:, None, None]) * L_row  # [BD, 1, 1]
    adj_ptrs = adj_ptr + pid_b * N * dim + offs_d[:, None] + gi * 0  # [BD, G], + n * dim
    ck_ptrs = ckpt_ptr + pid_b * s_ck_b + offs_d  # [BD], + (k*N + n) * dim
    # this thread's [BD, G] slots of the (batch, N, G, dim) partial sums, + n * G * dim
    nd_off = pid_b * N * BLOCK_G * dim + gi * dim + offs_d[:, None]
    part_off = (pid_b * n_dblk + pid_d) * N * L  # into dB/dC parts (batch, n_dblk, N, L)
    if ATOMIC_BC:  # into dB/dC (batch, groups, N, L): this block's group (blocks never straddle)
        part_off_b = (pid_b * (dim // cpg_b) + d0 // cpg_b) * N * L
        part_off_c = (pid_b * (dim // cpg_c) + d0 // cpg_c) * N * L
    else:
        part_off_b = part_off
        part_off_c = part_off

    for n in range(0, N):
        if HAS_DLAST:
            g0 = tl.load(dlast_ptr + pid_b * s_dl_b + offs_d * s_dl_d + n * s_dl_n, mask=mask_d,
                         other=0.0).to(tl.float32)  # fmt: skip
        else:
            g0 = tl.zeros([BLOCK_D], dtype=tl.float32)
        tl.store(adj_ptrs + n * dim, zero2 + g0[:, None], mask=first_group)
        tl.store(dA_ptr + nd_off + n * BLOCK_G * dim, zero2, mask=mask_dg)
        if not B_VAR:
            tl.store(dB_ptr + nd_off + n * BLOCK_G * dim, zero2, mask=mask_dg)
        if not C_VAR:
            tl.store(dC_ptr + nd_off + n * BLOCK_G * dim, zero2, mask=mask_dg)

    for i in range(0, n_ck):
        c = n_ck - 1 - i
        l3 = c * BLOCK_L + step  # [1, G, R]
        mask_l3 = l3 < L
        mask3 = mask_l3 & mask_d[:, None, None]  # [BD, G, R]
        u = _load_tile(u_base, l3, offs_d, mask3, s_u_l, s_u_d)
        pre, dt = _load_dt(delta_base, bias, l3, offs_d, mask3, s_dt_l, s_dt_d, HAS_BIAS,
                           SOFTPLUS, FAST_ACT)  # fmt: skip
        dout = _load_tile(dout_base, l3, offs_d, mask3, s_do_l, s_do_d)
        if HAS_Z:
            zt = _load_tile(z_ptr + pid_b * s_z_b, l3, offs_d, mask3, s_z_l, s_z_d)
            sig = _sigmoid(zt, FAST_ACT)
            dy = dout * zt * sig
        else:
            dy = dout
        dt_r = _rows(dt, BLOCK_R)
        dtu_r = _rows(dt * u, BLOCK_R)
        dy_r = _rows(dy, BLOCK_R)
        zrow = dt_r[0] * 0.0  # zeros in the rows' layout (tl.zeros would pick another one)
        gB_r = ()  # sum_n g B
        gxA_r = ()  # sum_n g a x_{t-1} A log2(e)
        y_r = ()  # sum_n x C
        for _t in tl.static_range(BLOCK_R):
            gB_r = gB_r + (zrow,)
            gxA_r = gxA_r + (zrow,)
            y_r = y_r + (zrow,)
        # PREFETCH: column n + 1's loads are issued before column n's arithmetic (see the forward)
        if PREFETCH:
            ahead = _bwd_column_loads(
                0, 0 < N, c, A_ptr, B_base, B_ptr, C_base, C_ptr, h0_ptr, ck_ptrs, adj_ptrs, l3,
                mask_l3, offs_d, mask_d, first_group, pid_b, dim, N, s_A_d, s_A_n, s_B_n, s_B_l,
                s_B_g, s_C_n, s_C_l, s_C_g, s_h0_b, s_h0_d, s_h0_n, B_VAR, C_VAR, HAS_H0,
            )  # fmt: skip
        for n in range(0, N):
            n_load = n  # the column whose loads are issued in this iteration
            if PREFETCH:
                n_load = n + 1
            fresh = _bwd_column_loads(
                n_load, n_load < N, c, A_ptr, B_base, B_ptr, C_base, C_ptr, h0_ptr, ck_ptrs,
                adj_ptrs, l3, mask_l3, offs_d, mask_d, first_group, pid_b, dim, N, s_A_d, s_A_n,
                s_B_n, s_B_l, s_B_g, s_C_n, s_C_l, s_C_g, s_h0_b, s_h0_d, s_h0_n, B_VAR, C_VAR,
                HAS_H0,
            )  # fmt: skip
            if PREFETCH:
                cur = ahead
                ahead = fresh
            else:
                cur = fresh
            A2n, Braw, Craw, xc, q = cur
            A2n = A2n[:, None]  # [BD, 1]
            Bt = _bc_split(Braw, B_VAR, BLOCK_R)
            Ct = _bc_split(Craw, C_VAR, BLOCK_R)
            a_r, inp_r, P, x_in, x_end = _chunk_states(dt_r, dtu_r, A2n, Bt, zrow + xc[:, None],
                                                       gi, BLOCK_R)  # fmt: skip
            xs_r = ()
            xn = x_in
            for t in tl.static_range(BLOCK_R):
                xn = a_r[t] * xn + inp_r[t]
                xs_r = xs_r + (xn,)
            # adjoint: local pass per group, then the groups' carries right to left
            q = tl.gather(q, tl.full(zero2.shape, 0, tl.int32), 1)  # group 0 holds it
            Gl = zrow
            for t in tl.static_range(BLOCK_R - 1, -1, -1):
                Gl = a_r[t] * (dy_r[t] * Ct[t] + Gl)
            Gl = Gl + tl.where(last_group, P * q, -0.0)
            Pg, incl = tl.associative_scan((P, Gl), axis=1, combine_fn=_linear_combine,
                                           reverse=True)  # fmt: skip
            nxt = tl.gather(incl, tl.broadcast_to(tl.minimum(gi + 1, BLOCK_G - 1), zero2.shape),
                            1)  # fmt: skip
            Gc = tl.where(last_group, q, nxt)
            tl.store(adj_ptrs + n * dim, incl, mask=first_group)  # dLoss/dx before the chunk
            dAn = zrow
            dBn = zrow
            dCn = zrow
            nB = ()
            nxA = ()
            ny = ()
            pB = ()
            pC = ()
            for t in tl.static_range(BLOCK_R - 1, -1, -1):
                g = dy_r[t] * Ct[t] + Gc
                Gc = a_r[t] * g
                if t > 0:
                    gx = Gc * xs_r[t - 1]  # g_t a_t x_{t-1}
                else:
                    gx = Gc * x_in
                dAn += gx * dt_r[t]
                nB = (gB_r[t] + g * Bt[t],) + nB
                nxA = (gxA_r[t] + gx * A2n,) + nxA
                if HAS_Z:
                    ny = (y_r[t] + xs_r[t] * Ct[t],) + ny
                if B_VAR:
                    pB = (g * dtu_r[t],) + pB
                else:
                    dBn += g * dtu_r[t]
                if C_VAR:
                    pC = (xs_r[t] * dy_r[t],) + pC
                else:
                    dCn += xs_r[t] * dy_r[t]
            gB_r = nB
            gxA_r = nxA
            if HAS_Z:
                y_r = ny
            # the thread's own [BD, G] slots, added to by a reduction (no load to wait for): one
            # thread per address, whose same-address operations keep program order, so the
            # sum's order (and bits) are fixed
            slot = nd_off + n * BLOCK_G * dim
            tl.atomic_add(dA_ptr + slot, dAn, mask=mask_dg, sem="relaxed")
            if B_VAR:
                if ATOMIC_BC == 2:  # every channel's term: [BD, G, R]
                    tl.atomic_add(dB_ptr + part_off_b + n * L + l3 + offs_d[:, None, None] * 0,
                                  _join_rows(pB, BLOCK_R), mask=mask3, sem="relaxed")  # fmt: skip
                else:
                    # sum over the channels: [1, G, R]
                    part = tl.sum(_join_rows(pB, BLOCK_R), axis=0, keep_dims=True)
                    if ATOMIC_BC == 1:
                        tl.atomic_add(dB_ptr + part_off_b + n * L + l3, part, mask=mask_l3,
                                      sem="relaxed")  # fmt: skip
                    else:
                        tl.store(dB_ptr + part_off_b + n * L + l3, part, mask=mask_l3)
            else:
                tl.atomic_add(dB_ptr + slot, dBn, mask=mask_dg, sem="relaxed")
            if C_VAR:
                if ATOMIC_BC == 2:  # every channel's term: [BD, G, R]
                    tl.atomic_add(dC_ptr + part_off_c + n * L + l3 + offs_d[:, None, None] * 0,
                                  _join_rows(pC, BLOCK_R), mask=mask3, sem="relaxed")  # fmt: skip
                else:
                    # sum over the channels: [1, G, R]
                    part = tl.sum(_join_rows(pC, BLOCK_R), axis=0, keep_dims=True)
                    if ATOMIC_BC == 1:
                        tl.atomic_add(dC_ptr + part_off_c + n * L + l3, part, mask=mask_l3,
                                      sem="relaxed")  # fmt: skip
                    else:
                        tl.store(dC_ptr + part_off_c + n * L + l3, part, mask=mask_l3)
            else:
                tl.atomic_add(dC_ptr + slot, dCn, mask=mask_dg, sem="relaxed")
        gB = _join_rows(gB_r, BLOCK_R)  # [BD, G, R]
        ddt = _join_rows(gxA_r, BLOCK_R) * (1.0 / LOG2E) + gB * u
        du = gB * dt
        if HAS_D:
            du += Dv[:, None, None] * dy
            dD_acc += dy * u
        if HAS_Z:
            y = _join_rows(y_r, BLOCK_R)
            if HAS_D:
                y += Dv[:, None, None] * u
            dz = dout * y * sig * (1.0 + zt * (1.0 - sig))
            tl.store(dz_ptr + io_off + l3, dz.to(dz_ptr.dtype.element_ty), mask=mask3)
        if SOFTPLUS:
            ddt = ddt * _softplus_grad(pre, FAST_ACT)
        ddt = tl.where(mask3, ddt, 0.0)
        dbias_acc += ddt
        tl.store(du_ptr + io_off + l3, du.to(du_ptr.dtype.element_ty), mask=mask3)
        tl.store(ddelta_ptr + io_off + l3, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask3)

    acc_ptrs = pid_b * BLOCK_L * dim + step * dim + offs_d[:, None, None]  # [BD, G, R]
    mask_acc = mask_d[:, None, None] & (step >= 0)
    if HAS_D:
        tl.store(dD_ptr + acc_ptrs, dD_acc, mask=mask_acc)
    if HAS_BIAS:
        tl.store(dbias_ptr + acc_ptrs, dbias_acc, mask=mask_acc)


@triton.jit
def _serial_bcast(q, u3, BLOCK_D: tl.constexpr, NSPLIT: tl.constexpr, T2: tl.constexpr,
                  T: tl.constexpr):  # fmt: skip
    """A per-(t, d) value held one (t, d) per lane ([BD, NS, T2]) broadcast to every lane of its
    channel as the block's T rows ([BD, NS, T], the layout of ``u3``). The unit-axis max keeps
    Triton from moving the broadcast back through the producer (see the forward)."""
    q = tl.max(tl.reshape(q, [BLOCK_D, NSPLIT, T2, 1]), axis=3)
    return u3 * 0.0 + tl.reshape(q, [BLOCK_D, T])[:, None, :]


@triton.jit
def selective_scan_bwd_serial_kernel(
    dout_ptr, dlast_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    h0_ptr, ckpt_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dh0_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    dim, L, n_ck, CK, cpg_b, cpg_c, n_groups_b, n_groups_c,
    s_do_b, s_do_d, s_do_l, s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l,
    s_A_d, s_A_n, s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l, s_D, s_bias,
    s_h0_b, s_h0_d, s_h0_n, s_dl_b, s_dl_d, s_dl_n,
    N: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    B_VAR: tl.constexpr,
    C_VAR: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NSPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Serial backward: a channel's N states on NSPLIT lanes (NPT each), the steps walked one by
    one, no group scans. Grid: (cdiv(dim, BLOCK_D), batch); one program walks its channels'
    whole sequence, checkpoint chunk by chunk (CK steps, a multiple of BLOCK_T), last first.

    Per chunk: a forward walk from the chunk's checkpoint writes each BLOCK_T-step block's
    start state to the program's ``scratch`` slots; then, block by block from the last, each
    state's forward walk over the block (its BLOCK_T states in registers) and its adjoint walk
    back. Outputs: du, ddelta, dz (batch, dim, L) in their dtypes; fp32 dh0 (batch, N, dim),
    dA (batch, N, dim), dD and dbias (batch, dim) per batch row; dB / dC variable: atomically
    added into zeroed (batch, groups, N, L) sums; fixed: (batch, N, dim) per batch row.
    """
    NPT: tl.constexpr = (N + NSPLIT - 1) // NSPLIT  # states per lane
    T2: tl.constexpr = BLOCK_T // NSPLIT  # steps per lane with one (t, d) each
    pid_d = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    n_dblk = tl.num_programs(0)
    d0 = pid_d * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)  # [BD]
    lane_n = tl.arange(0, NSPLIT)[None, :, None]  # [1, NS, 1]
    col_d = offs_d[:, None, None]  # [BD, 1, 1]
    md = col_d < dim
    t3 = tl.arange(0, BLOCK_T)[None, None, :]  # [1, 1, T]
    tq = lane_n * T2 + tl.arange(0, T2)[None, None, :]  # [1, NS, T2]
    lane2 = tl.arange(0, NSPLIT)[None, :]  # [1, NS]
    col2 = offs_d[:, None]  # [BD, 1]
    md2 = col2 < dim

    u_base = u_ptr + pid_b * s_u_b + col_d * s_u_d + lane_n * 0  # [BD, NS, 1]
    zero = _serial_rows(u_base + t3 * 0, md & (t3 < 0), NSPLIT, BLOCK_T)[0]  # [BD, NS] zeros
    dt_base = delta_ptr + pid_b * s_dt_b + col_d * s_dt_d
    do_base = dout_ptr + pid_b * s_do_b + col_d * s_do_d
    z_base = z_ptr + pid_b * s_z_b + col_d * s_z_d
    B_base = B_ptr + pid_b * s_B_b + (d0 // cpg_b) * s_B_g + col_d * 0 + lane_n * s_B_n
    C_base = C_ptr + pid_b * s_C_b + (d0 // cpg_c) * s_C_g + col_d * 0 + lane_n * s_C_n
    io_base = (pid_b * dim + col_d) * L  # [BD, 1, 1] into the (batch, dim, L) gradients

    # per channel and state ([BD, NS] each): A (natural and log2 units), fixed B / C, the
    # adjoint after the last step, the dA / fixed dB / dC sums
    A1 = ()
    A2 = ()
    Bf = ()
    Cf = ()
    g = ()
    dA_acc = ()
    dBf = ()
    dCf = ()
    for j in tl.static_range(NPT):
        n = j * NSPLIT + lane2
        mn = md2 & (n < N)
        a_nat = zero + tl.load(A_ptr + col2 * s_A_d + n * s_A_n, mask=mn, other=0.0)
        A1 = A1 + (a_nat,)
        A2 = A2 + (a_nat * LOG2E,)
        if not B_VAR:
            Bf = Bf + (zero + tl.load(B_ptr + col2 * s_B_g + n * s_B_n, mask=mn, other=0.0).to(
                tl.float32),)  # fmt: skip
        if not C_VAR:
            Cf = Cf + (zero + tl.load(C_ptr + col2 * s_C_g + n * s_C_n, mask=mn, other=0.0).to(
                tl.float32),)  # fmt: skip
        if HAS_DLAST:
            g = g + (zero + tl.load(dlast_ptr + pid_b * s_dl_b + col2 * s_dl_d + n * s_dl_n,
                                    mask=mn, other=0.0).to(tl.float32),)  # fmt: skip
        else:
            g = g + (zero,)
        dA_acc = dA_acc + (zero,)
        dBf = dBf + (zero,)
        dCf = dCf + (zero,)
    bias = tl.zeros([BLOCK_D, 1, 1], dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + col_d * s_bias, mask=md, other=0.0).to(tl.float32)
    Dq = tl.zeros([BLOCK_D, 1, 1], dtype=tl.float32)
    if HAS_D:
        Dq += tl.load(D_ptr + col_d * s_D, mask=md, other=0.0).to(tl.float32)
    dD_acc = tl.zeros([BLOCK_D, NSPLIT, T2], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D, NSPLIT, T2], dtype=tl.float32)

    NB_CK = CK // BLOCK_T  # blocks per checkpoint chunk (runtime)
    # this program's scratch slots: [NB_CK, NPT, BD * NS] fp32, one element per lane
    slots = scratch_ptr + (pid_b * n_dblk + pid_d) * NB_CK * (NPT * BLOCK_D * NSPLIT) + (
        (col2 - d0) * NSPLIT + lane2)  # fmt: skip
    for i_c in range(0, n_ck):
        c = n_ck - 1 - i_c
        t_lo = c * CK
        t_hi = tl.minimum(t_lo + CK, L)
        # the state before the chunk: checkpoint c - 1, the initial state, or zeros
        x = ()
        for j in tl.static_range(NPT):
            n = j * NSPLIT + lane2
            mn = md2 & (n < N)
            xc = zero + tl.load(ckpt_ptr + ((pid_b * n_ck + c - 1) * N + n) * dim + col2,
                                mask=mn & (c > 0), other=0.0)  # fmt: skip
            if HAS_H0:
                h0n = tl.load(h0_ptr + pid_b * s_h0_b + col2 * s_h0_d + n * s_h0_n,
                              mask=mn & (c == 0), other=0.0).to(tl.float32)  # fmt: skip
                xc = tl.where(c == 0, h0n, xc)
            x = x + (xc,)
        # walk 1: each block's start state into the scratch slots
        for t0 in range(t_lo, t_hi, BLOCK_T):
            i = (t0 - t_lo) // BLOCK_T
            for j in tl.static_range(NPT):
                tl.store(slots + (i * NPT + j) * (BLOCK_D * NSPLIT), x[j])
            mq = md & (t0 + tq < t_hi)
            dt_q = tl.load(dt_base + (t0 + tq) * s_dt_l, mask=mq, other=0.0).to(tl.float32) + bias
            if SOFTPLUS:
                dt_q = _softplus(dt_q)
            dt_q = tl.where(mq, dt_q, 0.0)
            u3 = tl.load(u_base + (t0 + t3) * s_u_l, mask=md & (t0 + t3 < t_hi),
                         other=0.0).to(tl.float32)  # fmt: skip
            dt3 = _serial_bcast(dt_q, u3, BLOCK_D, NSPLIT, T2, BLOCK_T)
            dt_r = _rows(dt3, BLOCK_T)
            dtu_r = _rows(dt3 * u3, BLOCK_T)
            new_x = ()
            for j in tl.static_range(NPT):
                if B_VAR:
                    Bj = _rows(tl.load(B_base + j * NSPLIT * s_B_n + (t0 + t3) * s_B_l,
                                       mask=(col_d >= 0) & (t0 + t3 < t_hi)
                                       & (j * NSPLIT + lane_n < N), other=0.0).to(tl.float32),
                               BLOCK_T)  # fmt: skip
                xj = x[j]
                for t in tl.static_range(BLOCK_T):
                    if B_VAR:
                        inp = dtu_r[t] * Bj[t]
                    else:
                        inp = dtu_r[t] * Bf[j]
                    xj = tl.exp2(dt_r[t] * A2[j]) * xj + inp
                new_x = new_x + (xj,)
            x = new_x
        # walk 2: the blocks last to first
        n_blk = (t_hi - t_lo + BLOCK_T - 1) // BLOCK_T
        for ii in range(0, n_blk):
            i = n_blk - 1 - ii
            t0 = t_lo + i * BLOCK_T
            mq = md & (t0 + tq < L)  # [BD, NS, T2]: one (t, d) per lane
            m3 = md & (t0 + t3 < L)  # [BD, 1, T]
            pre_q = tl.load(dt_base + (t0 + tq) * s_dt_l, mask=mq, other=0.0).to(tl.float32)
            pre_q += bias
            dt_q = pre_q
            if SOFTPLUS:
                dt_q = _softplus(pre_q)
            dt_q = tl.where(mq, dt_q, 0.0)
            dout_q = tl.load(do_base + (t0 + tq) * s_do_l, mask=mq, other=0.0).to(tl.float32)
            u_q = tl.load(u_ptr + pid_b * s_u_b + col_d * s_u_d + (t0 + tq) * s_u_l, mask=mq,
                          other=0.0).to(tl.float32)  # fmt: skip
            dy_q = dout_q
            if HAS_Z:
                z_q = tl.load(z_base + (t0 + tq) * s_z_l, mask=mq, other=0.0).to(tl.float32)
                sig_q = tl.sigmoid(z_q)
                dy_q = dout_q * z_q * sig_q
            u3 = tl.load(u_base + (t0 + t3) * s_u_l, mask=m3, other=0.0).to(tl.float32)
            dt3 = _serial_bcast(dt_q, u3, BLOCK_D, NSPLIT, T2, BLOCK_T)
            dy3 = _serial_bcast(dy_q, u3, BLOCK_D, NSPLIT, T2, BLOCK_T)
            dt_r = _rows(dt3, BLOCK_T)
            u_r = _rows(u3, BLOCK_T)
            dy_r = _rows(dy3, BLOCK_T)
            dtu_r = _rows(dt3 * u3, BLOCK_T)
            du_r = ()
            ddt_r = ()
            y_r = ()
            for _t in tl.static_range(BLOCK_T):
                du_r = du_r + (zero,)
                ddt_r = ddt_r + (zero,)
                y_r = y_r + (zero,)
            new_g = ()
            new_dA = ()
            new_dBf = ()
            new_dCf = ()
            for j in tl.static_range(NPT):
                mbc = (col_d >= 0) & (t0 + t3 < L) & (j * NSPLIT + lane_n < N)  # [BD, NS, T]
                if B_VAR:
                    Bj = _rows(tl.load(B_base + j * NSPLIT * s_B_n + (t0 + t3) * s_B_l,
                                       mask=mbc, other=0.0).to(tl.float32), BLOCK_T)  # fmt: skip
                if C_VAR:
                    Cj = _rows(tl.load(C_base + j * NSPLIT * s_C_n + (t0 + t3) * s_C_l,
                                       mask=mbc, other=0.0).to(tl.float32), BLOCK_T)  # fmt: skip
                x_in = tl.load(slots + (i * NPT + j) * (BLOCK_D * NSPLIT))
                # the block's states of column j, forward
                xs = ()
                xj = x_in
                for t in tl.static_range(BLOCK_T):
                    if B_VAR:
                        inp = dtu_r[t] * Bj[t]
                    else:
                        inp = dtu_r[t] * Bf[j]
                    xj = tl.exp2(dt_r[t] * A2[j]) * xj + inp
                    xs = xs + (xj,)
                # the adjoint, backward; the gradient terms of each step
                gj = g[j]
                dAj = dA_acc[j]
                dBj = dBf[j]
                dCj = dCf[j]
                pB = ()
                pC = ()
                new_du = ()
                new_ddt = ()
                new_y = ()
                for t in tl.static_range(BLOCK_T - 1, -1, -1):
                    if C_VAR:
                        Ct = Cj[t]
                    else:
                        Ct = Cf[j]
                    if B_VAR:
                        Bt = Bj[t]
                    else:
                        Bt = Bf[j]
                    gj = gj + dy_r[t] * Ct  # dLoss/dx_t
                    if t > 0:
                        x_prev = xs[t - 1]
                    else:
                        x_prev = x_in
                    ga = gj * tl.exp2(dt_r[t] * A2[j])  # dLoss/dx_{t-1} through step t
                    gax = ga * x_prev
                    dAj += gax * dt_r[t]
                    gB = gj * Bt
                    new_du = (du_r[t] + gB * dt_r[t],) + new_du
                    new_ddt = (ddt_r[t] + gB * u_r[t] + gax * A1[j],) + new_ddt
                    if HAS_Z:
                        new_y = (y_r[t] + xs[t] * Ct,) + new_y
                    if B_VAR:
                        pB = (gj * dtu_r[t],) + pB
                    else:
                        dBj += gj * dtu_r[t]
                    if C_VAR:
                        pC = (xs[t] * dy_r[t],) + pC
                    else:
                        dCj += xs[t] * dy_r[t]
                    gj = ga
                du_r = new_du
                ddt_r = new_ddt
                if HAS_Z:
                    y_r = new_y
                new_g = new_g + (gj,)
                new_dA = new_dA + (dAj,)
                new_dBf = new_dBf + (dBj,)
                new_dCf = new_dCf + (dCj,)
                # variable B / C: the program's channel sum of column j's terms, added
                tn = (j * NSPLIT + tl.arange(0, NSPLIT))[:, None]  # [NS, 1]
                tl2 = t0 + tl.arange(0, BLOCK_T)[None, :]  # [1, T]
                m_nt = (tn < N) & (tl2 < L)
                if B_VAR:
                    part = tl.sum(_join_rows(pB, BLOCK_T), axis=0)  # [NS, T]
                    grp = pid_b * n_groups_b + d0 // cpg_b
                    tl.atomic_add(dB_ptr + (grp * N + tn) * L + tl2, part, mask=m_nt,
                                  sem="relaxed")  # fmt: skip
                if C_VAR:
                    part = tl.sum(_join_rows(pC, BLOCK_T), axis=0)  # [NS, T]
                    grp = pid_b * n_groups_c + d0 // cpg_c
                    tl.atomic_add(dC_ptr + (grp * N + tn) * L + tl2, part, mask=m_nt,
                                  sem="relaxed")  # fmt: skip
            g = new_g
            dA_acc = new_dA
            dBf = new_dBf
            dCf = new_dCf
            # per (t, d): the sums over the states (the lanes), back to one (t, d) per lane
            du_q = tl.reshape(tl.sum(_join_rows(du_r, BLOCK_T), axis=1), [BLOCK_D, NSPLIT, T2])
            ddt_q = tl.reshape(tl.sum(_join_rows(ddt_r, BLOCK_T), axis=1),
                               [BLOCK_D, NSPLIT, T2])  # fmt: skip
            if HAS_D:
                du_q += Dq * dy_q
                dD_acc += tl.where(mq, dy_q * u_q, 0.0)
            if HAS_Z:
                y_q = tl.reshape(tl.sum(_join_rows(y_r, BLOCK_T), axis=1), [BLOCK_D, NSPLIT, T2])
                y_q += Dq * u_q
                dz_q = dout_q * y_q * sig_q * (1.0 + z_q * (1.0 - sig_q))
                tl.store(dz_ptr + io_base + t0 + tq, dz_q.to(dz_ptr.dtype.element_ty), mask=mq)
            if SOFTPLUS:
                ddt_q = ddt_q * _softplus_grad(pre_q)
            ddt_q = tl.where(mq, ddt_q, 0.0)
            dbias_acc += ddt_q
            tl.store(du_ptr + io_base + t0 + tq, du_q.to(du_ptr.dtype.element_ty), mask=mq)
            tl.store(ddelta_ptr + io_base + t0 + tq, ddt_q.to(ddelta_ptr.dtype.element_ty),
                     mask=mq)  # fmt: skip
    # per batch row: the state sums and the adjoint before step 0
    for j in tl.static_range(NPT):
        n = j * NSPLIT + lane2
        mn = md2 & (n < N)
        off = (pid_b * N + n) * dim + col2
        tl.store(dh0_ptr + off, g[j], mask=mn)
        tl.store(dA_ptr + off, dA_acc[j], mask=mn)
        if not B_VAR:
            tl.store(dB_ptr + off, dBf[j], mask=mn)
        if not C_VAR:
            tl.store(dC_ptr + off, dCf[j], mask=mn)
    lane0 = (lane_n == 0) & md  # [BD, NS, 1]
    if HAS_D:
        dD = tl.sum(tl.sum(dD_acc, axis=2, keep_dims=True), axis=1, keep_dims=True)
        tl.store(dD_ptr + pid_b * dim + col_d + lane_n * 0, dD + lane_n * 0.0, mask=lane0)
    if HAS_BIAS:
        db = tl.sum(tl.sum(dbias_acc, axis=2, keep_dims=True), axis=1, keep_dims=True)
        tl.store(dbias_ptr + pid_b * dim + col_d + lane_n * 0, db + lane_n * 0.0, mask=lane0)


@triton.jit
def selective_state_update_kernel(
    state_ptr,
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    idx_ptr,
    out_ptr,
    nheads,
    dim,
    N,
    heads_per_group,
    s_st_b,
    s_st_h,
    s_st_d,
    s_st_n,
    s_x_b,
    s_x_h,
    s_x_d,
    s_dt_b,
    s_dt_h,
    s_dt_d,
    s_A_h,
    s_A_d,
    s_A_n,
    s_B_b,
    s_B_g,
    s_B_n,
    s_C_b,
    s_C_g,
    s_C_n,
    s_D_h,
    s_D_d,
    s_z_b,
    s_z_h,
    s_z_d,
    s_bias_h,
    s_bias_d,
    s_o_b,
    s_o_h,
    s_o_d,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_IDX: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIM_FIRST: tl.constexpr,
    WIDE: tl.constexpr,
    FAST_ACT: tl.constexpr = 0,
):
    """One decode step: state = state * exp(dt A) + dt x B; out = (state . C + D x) * silu(z).

    Grid: (cdiv(dim, BLOCK_D), nheads, batch) with ``DIM_FIRST`` (mamba_ssm's order: programs
    launched one after another touch consecutive state rows), else (batch, nheads, cdiv(dim,
    BLOCK_D)) for a batch above the 65535 a grid's z axis allows. The state is read in its dtype,
    updated in fp32 and written back in place; a negative ``state_batch_indices`` entry skips the
    row (out = 0). Offsets are 32-bit unless ``WIDE`` (some tensor spans 2^31 elements): 48 of
    360 SASS instructions at the anchor shape were 64-bit index arithmetic (sm_90a).
    ``FAST_ACT`` (16-bit dt and x, as the scan kernels'): ``_softplus_fast`` and ``_sigmoid``'s
    approximate reciprocal, shorter on the step's dependent chain (dt -> decay -> state -> out).
    """
    if DIM_FIRST:
        pid_d = tl.program_id(0)
        pid_h = tl.program_id(1)
        pid_b = tl.program_id(2)
    else:
        pid_b = tl.program_id(0)
        pid_h = tl.program_id(1)
        pid_d = tl.program_id(2)
    if WIDE:  # some tensor spans 2^31 elements or more: 64-bit offsets
        pid_d = pid_d.to(tl.int64)
        pid_h = pid_h.to(tl.int64)
        pid_b = pid_b.to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    offs_n = tl.arange(0, BLOCK_N)  # [BN]
    mask_d = offs_d < dim
    mask_dn = mask_d[:, None] & (offs_n[None, :] < N)  # [BD, BN]
    out_ptrs = out_ptr + pid_b * s_o_b + pid_h * s_o_h + offs_d * s_o_d

    if HAS_IDX:
        # a negative state_batch_indices entry: leave that state row alone, out = 0 (by masks:
        # one code path with and without indices)
        st_b = tl.load(idx_ptr + pid_b)
        st_b = st_b.to(tl.int64) if WIDE else st_b.to(tl.int32)
        live = st_b >= 0
        st_b = tl.maximum(st_b, 0)
        mask_st = mask_dn & live
    else:
        st_b = pid_b
        mask_st = mask_dn
    st_ptrs = (
        state_ptr
        + st_b * s_st_b
        + pid_h * s_st_h
        + offs_d[:, None] * s_st_d
        + offs_n[None, :] * s_st_n
    )  # [BD, BN]
    state = tl.load(st_ptrs, mask=mask_st, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * s_x_b + pid_h * s_x_h + offs_d * s_x_d, mask=mask_d, other=0.0)
    x = x.to(tl.float32)
    dt = tl.load(
        dt_ptr + pid_b * s_dt_b + pid_h * s_dt_h + offs_d * s_dt_d, mask=mask_d, other=0.0
    ).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + pid_h * s_bias_h + offs_d * s_bias_d, mask=mask_d, other=0.0).to(
            tl.float32
        )
    if SOFTPLUS:
        if FAST_ACT:
            dt = _softplus_fast(dt, FAST_ACT == 2)
        else:
            dt = _softplus(dt)
    A = tl.load(
        A_ptr + pid_h * s_A_h + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n,
        mask=mask_dn,
        other=0.0,
    ).to(tl.float32)  # [BD, BN]
    grp = pid_h // heads_per_group
    Bv = tl.load(
        B_ptr + pid_b * s_B_b + grp * s_B_g + offs_n * s_B_n, mask=offs_n < N, other=0.0
    ).to(tl.float32)  # [BN]
    Cv = tl.load(
        C_ptr + pid_b * s_C_b + grp * s_C_g + offs_n * s_C_n, mask=offs_n < N, other=0.0
    ).to(tl.float32)
    state = state * tl.exp2(A * LOG2E * dt[:, None]) + (dt * x)[:, None] * Bv[None, :]
    tl.store(st_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask_st)
    out = tl.sum(state * Cv[None, :], axis=1)  # [BD]
    if HAS_D:
        out += x * tl.load(D_ptr + pid_h * s_D_h + offs_d * s_D_d, mask=mask_d, other=0.0).to(
            tl.float32
        )
    if HAS_Z:
        z = tl.load(
            z_ptr + pid_b * s_z_b + pid_h * s_z_h + offs_d * s_z_d, mask=mask_d, other=0.0
        ).to(tl.float32)
        out = out * z * _sigmoid(z, FAST_ACT)
    if HAS_IDX:
        out = tl.where(live, out, 0.0)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_d)
