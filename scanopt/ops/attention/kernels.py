"""Triton kernels for flash attention (FlashAttention-2 algorithm).

Every kernel sees q/k/v/o in the logical ``(B, H, L, D)`` order through strides (the last dim
contiguous), so flash-attn's ``(B, L, H, D)`` and SDPA's ``(B, H, L, D)`` need no copies.

Mask: query row ``i`` may attend key ``j`` iff ``-left <= j - i - diag <= right`` and ``j < Lk``;
``diag`` is ``Lk - Lq`` (bottom-right causal alignment) or ``0`` (top-left), an unbounded side
is passed as a bound larger than both lengths. For a block of rows the key loop is split into
masked edge blocks and unmasked interior blocks, so the common case pays for no mask.

Scores are kept in base 2: ``s2 = log2(e) * scale * q.k`` (or ``log2(e) * softcap *
tanh(scale * q.k / softcap)``), so the softmax uses ``exp2``; the stored LSE is natural-log.
A row with no allowed key gets ``out = 0`` and ``lse = -inf``; the backward reads such a
``-inf`` as ``+inf`` so that its probabilities are 0.

Backward (deterministic, no atomics): ``delta = rowsum(dO * O) - dlse``; one program per
(K/V block, kv head) walks every query head of its GQA group and accumulates dK, dV in
registers; a separate program per (Q block, q head) accumulates dQ. S and dP are recomputed in
both, i.e. 7 matrix products instead of 5.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tanh(x):
    # fp32-accurate tanh (no libdevice, so the interpreter runs it): odd series near 0
    ax = tl.abs(x)
    e = tl.exp2(ax * -2.8853900817779268)
    far = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    poly = 0.021869488536155203 * x2 - 0.05396825396825397
    poly = poly * x2 + 0.13333333333333333
    poly = poly * x2 - 0.3333333333333333
    near = ax + ax * x2 * poly
    t = tl.where(ax < 0.3, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _load_tile(
    ptr, rows, cols, stride, n_rows, n_cols, MASK_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr
):
    # [len(rows), len(cols)] tile starting at ptr; rows/cols are offsets from ptr
    ptrs = ptr + rows[:, None] * stride + cols[None, :]
    if MASK_ROWS:
        if EVEN_COLS:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)
    else:
        if EVEN_COLS:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(cols < n_cols)[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(ptr, x, rows, cols, stride, n_rows, n_cols):
    ptrs = ptr + rows[:, None] * stride + cols[None, :]
    tl.store(ptrs, x, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _block_ranges(start, BLOCK: tl.constexpr, BLOCK_OTHER: tl.constexpr, n_other, diag, lo_w, hi_w):
    # for the BLOCK indices [start, start + BLOCK) of one side, the range [lo, hi) of the other
    # side's indices that any of them may pair with, and the loop bounds of its three phases:
    # masked [lo_blk, a_end), unmasked [a_end, b_end), masked [b_end, hi); lo_w/hi_w are the
    # window offsets (j - i - diag in [-left, right] seen from the side being walked)
    lo = tl.maximum(start + diag - lo_w, 0)
    hi = tl.minimum(start + BLOCK - 1 + diag + hi_w + 1, n_other)
    full_lo = tl.maximum(start + BLOCK - 1 + diag - lo_w, 0)
    full_hi = tl.minimum(start + diag + hi_w + 1, n_other)
    lo_blk = (lo // BLOCK_OTHER) * BLOCK_OTHER
    u_lo = tl.cdiv(full_lo, BLOCK_OTHER) * BLOCK_OTHER
    u_hi = (full_hi // BLOCK_OTHER) * BLOCK_OTHER
    has_full = u_hi > u_lo
    a_end = tl.where(has_full, u_lo, hi)
    b_end = tl.where(has_full, u_hi, hi)
    return lo_blk, a_end, b_end, hi


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    desc_k,
    desc_v,
    b,
    hk,
    stride_kl,
    stride_vl,
    rows,
    start,
    end,
    Lk,
    D,
    DV,
    qk_scale,
    cap2,
    diag,
    left,
    right,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    SOFTCAP: tl.constexpr,
    USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    SCALE_IN_EXP: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptr = k_base + start.to(tl.int64) * stride_kl
    v_ptr = v_base + start.to(tl.int64) * stride_vl
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        if USE_TMA:
            k = desc_k.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)  # [BLOCK_N, BLOCK_D]
        else:
            k = _load_tile(k_ptr, offs_n, offs_d, stride_kl, Lk - start_n, D, MASKED, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        # SCALE_IN_EXP (qk_scale > 0, no softcap): s stays raw; the row max is taken before
        # scaling (a positive scale commutes with max, rounding included) and the scale goes
        # into exp2's argument, one FFMA per score instead of an FMUL and an FFMA
        if SOFTCAP:
            s = cap2 * _tanh(s * qk_scale)
        elif not SCALE_IN_EXP:
            s = s * qk_scale
        if MASKED:
            cols = start_n + offs_n
            rel = cols[None, :] - rows[:, None] - diag
            ok = (rel >= -left) & (rel <= right) & (cols < Lk)[None, :]
            s = tl.where(ok, s, float("-inf"))
        if SCALE_IN_EXP:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        if SCALE_IN_EXP:
            p = tl.exp2(s * qk_scale - m_use[:, None])  # [BLOCK_M, BLOCK_N]
        else:
            p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)  # [BLOCK_M]
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = desc_v.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)  # [BLOCK_N, BLOCK_DV]
        else:
            v = _load_tile(v_ptr, offs_n, offs_dv, stride_vl, Lk - start_n, DV, MASKED, EVEN_DV)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)  # [BLOCK_M, BLOCK_DV]
        m_i = m_new
        k_ptr += BLOCK_N * stride_kl
        v_ptr += BLOCK_N * stride_vl
    return acc, l_i, m_i


@triton.jit
def attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    desc_k,
    desc_v,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_ob,
    stride_oh,
    stride_ol,
    Hq,
    G,
    Lq,
    Lk,
    D,
    DV,
    sm_scale,
    softcap,
    diag,
    left,
    right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    SOFTCAP: tl.constexpr,
    USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    SCALE_IN_EXP: tl.constexpr = False,
):
    # heaviest row blocks (causal: the last ones) first
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_ql
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    q = _load_tile(q_base, rows - start_m, offs_d, stride_ql, Lq - start_m, D, True, EVEN_D)
    if SOFTCAP:
        qk_scale = sm_scale / softcap
        cap2 = softcap * LOG2E
    else:
        qk_scale = sm_scale * LOG2E
        cap2 = 1.0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo_blk, a_end, b_end, hi = _block_ranges(start_m, BLOCK_M, BLOCK_N, Lk, diag, left, right)
    b32 = b.to(tl.int32)
    hk32 = hk.to(tl.int32)
    for phase in tl.static_range(3):
        # masked left edge, unmasked interior, masked right edge (diagonal, window, Lk tail)
        if phase == 0:
            start_n, end_n = lo_blk, a_end
        elif phase == 1:
            start_n, end_n = a_end, b_end
        else:
            start_n, end_n = b_end, hi
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, desc_k, desc_v, b32, hk32, stride_kl, stride_vl,
            rows, start_n, end_n, Lk, D, DV, qk_scale, cap2, diag, left, right, BLOCK_N,
            BLOCK_D, BLOCK_DV, phase != 1, EVEN_D, EVEN_DV, SOFTCAP, USE_TMA, PRECISION,
            WARP_SPECIALIZE and phase == 1, SCALE_IN_EXP,
        )  # fmt: skip

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]  # [BLOCK_M, BLOCK_DV]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)  # [BLOCK_M]
    o_base = O + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_ol
    _store_tile(
        o_base, out.to(O.dtype.element_ty), rows - start_m, offs_dv, stride_ol, Lq - start_m, DV
    )
    tl.store(LSE + pid_bh * Lq + rows, lse, mask=rows < Lq)


@triton.jit
def attn_bwd_preprocess_kernel(
    O,
    DO,
    DLSE,
    DELTA,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_dob,
    stride_doh,
    stride_dol,
    Hq,
    Lq,
    DV,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    start_m = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_DV)
    o = _load_tile(
        O + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_ol,
        rows,
        cols,
        stride_ol,
        Lq - start_m,
        DV,
        True,
        False,
    )  # [BLOCK_M, BLOCK_DV]
    do = _load_tile(
        DO + b * stride_dob + h * stride_doh + start_m.to(tl.int64) * stride_dol,
        rows,
        cols,
        stride_dol,
        Lq - start_m,
        DV,
        True,
        False,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK_M]
    offs = pid_bh * Lq + start_m + rows
    in_range = start_m + rows < Lq
    if HAS_DLSE:
        delta -= tl.load(DLSE + offs, mask=in_range, other=0.0)
    tl.store(DELTA + offs, delta, mask=in_range)


@triton.jit
def _bwd_kv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_ptr,
    delta_ptr,
    desc_q,
    desc_do,
    b,
    h,
    stride_ql,
    stride_dol,
    cols,
    start,
    end,
    Lq,
    D,
    DV,
    qk_scale,
    cap2,
    diag,
    left,
    right,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    SOFTCAP: tl.constexpr,
    USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptr = q_base + start.to(tl.int64) * stride_ql
    do_ptr = do_base + start.to(tl.int64) * stride_dol
    for start_m in tl.range(start, end, BLOCK_M):
        rows = start_m + offs_m
        if USE_TMA:
            q = desc_q.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)  # [BLOCK_M, BLOCK_D]
            do = desc_do.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_DV)
        else:
            q = _load_tile(q_ptr, offs_m, offs_d, stride_ql, Lq - start_m, D, MASKED, EVEN_D)
            do = _load_tile(do_ptr, offs_m, offs_dv, stride_dol, Lq - start_m, DV, MASKED, EVEN_DV)
        if MASKED:
            lse = tl.load(lse_ptr + rows, mask=rows < Lq, other=float("inf"))
            delta = tl.load(delta_ptr + rows, mask=rows < Lq, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # [BLOCK_M]
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        if SOFTCAP:
            t = _tanh(st * qk_scale)
            st = cap2 * t
        else:
            st = st * qk_scale
        pt = tl.exp2(st - lse2[None, :])  # [BLOCK_N, BLOCK_M]
        if MASKED:
            rel = cols[:, None] - rows[None, :] - diag
            ok = (rel >= -left) & (rel <= right) & (rows < Lq)[None, :]
            pt = tl.where(ok, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)  # [BLOCK_N, BLOCK_DV]
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - t * t)
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)  # [BLOCK_N, BLOCK_D]
        q_ptr += BLOCK_M * stride_ql
        do_ptr += BLOCK_M * stride_dol
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV_,
    desc_q,
    desc_do,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dkb,
    stride_dkh,
    stride_dkl,
    stride_dvb,
    stride_dvh,
    stride_dvl,
    Hk,
    G,
    Lq,
    Lk,
    D,
    DV,
    sm_scale,
    softcap,
    diag,
    left,
    right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    SOFTCAP: tl.constexpr,
    USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hk
    hk = pid_bh % Hk
    Hq = Hk * G
    start_n = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    cols = start_n + offs_n
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(
        K + b * stride_kb + hk * stride_kh + start_n.to(tl.int64) * stride_kl,
        offs_n,
        offs_d,
        stride_kl,
        Lk - start_n,
        D,
        True,
        EVEN_D,
    )  # [BLOCK_N, BLOCK_D]
    v = _load_tile(
        V + b * stride_vb + hk * stride_vh + start_n.to(tl.int64) * stride_vl,
        offs_n,
        offs_dv,
        stride_vl,
        Lk - start_n,
        DV,
        True,
        EVEN_DV,
    )  # [BLOCK_N, BLOCK_DV]
    if SOFTCAP:
        qk_scale = sm_scale / softcap
        cap2 = softcap * LOG2E
    else:
        qk_scale = sm_scale * LOG2E
        cap2 = 1.0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # query rows i pair with key j iff -right <= i - j + diag <= left
    lo_blk, a_end, b_end, hi = _block_ranges(start_n, BLOCK_N, BLOCK_M, Lq, -diag, right, left)
    b32 = b.to(tl.int32)
    for g in range(G):
        h = hk * G + g
        bh = b * Hq + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_ptr = LSE + bh * Lq
        delta_ptr = DELTA + bh * Lq
        h32 = h.to(tl.int32)
        for phase in tl.static_range(3):
            if phase == 0:
                start_m, end_m = lo_blk, a_end
            elif phase == 1:
                start_m, end_m = a_end, b_end
            else:
                start_m, end_m = b_end, hi
            dk, dv = _bwd_kv_inner(
                dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, desc_q, desc_do, b32, h32,
                stride_ql, stride_dol, cols, start_m, end_m, Lq, D, DV, qk_scale, cap2, diag,
                left, right, BLOCK_M, BLOCK_D, BLOCK_DV, phase != 1, EVEN_D, EVEN_DV, SOFTCAP,
                USE_TMA, PRECISION,
            )  # fmt: skip
    dk = dk * sm_scale
    _store_tile(
        DK + b * stride_dkb + hk * stride_dkh + start_n.to(tl.int64) * stride_dkl,
        dk.to(DK.dtype.element_ty),
        offs_n,
        offs_d,
        stride_dkl,
        Lk - start_n,
        D,
    )
    _store_tile(
        DV_ + b * stride_dvb + hk * stride_dvh + start_n.to(tl.int64) * stride_dvl,
        dv.to(DV_.dtype.element_ty),
        offs_n,
        offs_dv,
        stride_dvl,
        Lk - start_n,
        DV,
    )


@triton.jit
def _bwd_q_inner(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    desc_k,
    desc_v,
    b,
    hk,
    stride_kl,
    stride_vl,
    rows,
    start,
    end,
    Lk,
    D,
    DV,
    qk_scale,
    cap2,
    diag,
    left,
    right,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    SOFTCAP: tl.constexpr,
    USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptr = k_base + start.to(tl.int64) * stride_kl
    v_ptr = v_base + start.to(tl.int64) * stride_vl
    for start_n in tl.range(start, end, BLOCK_N):
        if USE_TMA:
            k = desc_k.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)  # [BLOCK_N, BLOCK_D]
            v = desc_v.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            k = _load_tile(k_ptr, offs_n, offs_d, stride_kl, Lk - start_n, D, MASKED, EVEN_D)
            v = _load_tile(v_ptr, offs_n, offs_dv, stride_vl, Lk - start_n, DV, MASKED, EVEN_DV)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        if SOFTCAP:
            t = _tanh(s * qk_scale)
            s = cap2 * t
        else:
            s = s * qk_scale
        p = tl.exp2(s - lse2[:, None])  # [BLOCK_M, BLOCK_N]
        if MASKED:
            cols = start_n + offs_n
            rel = cols[None, :] - rows[:, None] - diag
            ok = (rel >= -left) & (rel <= right) & (cols < Lk)[None, :]
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # [BLOCK_M, BLOCK_D]
        k_ptr += BLOCK_N * stride_kl
        v_ptr += BLOCK_N * stride_vl
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    desc_k,
    desc_v,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dqb,
    stride_dqh,
    stride_dql,
    Hq,
    G,
    Lq,
    Lk,
    D,
    DV,
    sm_scale,
    softcap,
    diag,
    left,
    right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    SOFTCAP: tl.constexpr,
    USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    rows = start_m + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(
        Q + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_ql,
        offs_m,
        offs_d,
        stride_ql,
        Lq - start_m,
        D,
        True,
        EVEN_D,
    )  # [BLOCK_M, BLOCK_D]
    do = _load_tile(
        DO + b * stride_dob + h * stride_doh + start_m.to(tl.int64) * stride_dol,
        offs_m,
        offs_dv,
        stride_dol,
        Lq - start_m,
        DV,
        True,
        EVEN_DV,
    )
    lse = tl.load(LSE + pid_bh * Lq + rows, mask=rows < Lq, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # [BLOCK_M]
    delta = tl.load(DELTA + pid_bh * Lq + rows, mask=rows < Lq, other=0.0)
    if SOFTCAP:
        qk_scale = sm_scale / softcap
        cap2 = softcap * LOG2E
    else:
        qk_scale = sm_scale * LOG2E
        cap2 = 1.0
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo_blk, a_end, b_end, hi = _block_ranges(start_m, BLOCK_M, BLOCK_N, Lk, diag, left, right)
    b32 = b.to(tl.int32)
    hk32 = hk.to(tl.int32)
    for phase in tl.static_range(3):
        if phase == 0:
            start_n, end_n = lo_blk, a_end
        elif phase == 1:
            start_n, end_n = a_end, b_end
        else:
            start_n, end_n = b_end, hi
        dq = _bwd_q_inner(
            dq, q, do, lse2, delta, k_base, v_base, desc_k, desc_v, b32, hk32, stride_kl,
            stride_vl, rows, start_n, end_n, Lk, D, DV, qk_scale, cap2, diag, left, right,
            BLOCK_N, BLOCK_D, BLOCK_DV, phase != 1, EVEN_D, EVEN_DV, SOFTCAP, USE_TMA, PRECISION,
        )  # fmt: skip
    dq = dq * sm_scale
    _store_tile(
        DQ + b * stride_dqb + h * stride_dqh + start_m.to(tl.int64) * stride_dql,
        dq.to(DQ.dtype.element_ty),
        offs_m,
        offs_d,
        stride_dql,
        Lq - start_m,
        D,
    )
