"""Triton kernels of the RWKV-4 WKV, parallel over time (``@triton.jit`` only).

Per channel the WKV-4 state is a triple ``(a, b, p)`` meaning ``num = a * e^p``, ``den = b * e^p``.
Every update is a "log-add": two such pairs are added after rescaling to the larger exponent, so
one ``exp`` of a non-positive number per update, whatever the magnitude of the keys. The forward
map of a block of steps is affine in ``(num, den)`` with a scalar decay ``e^{L w}``, so time is cut
into chunks of ``CHUNK`` steps that are processed in parallel:

- forward: ``wkv4_fwd_summary_kernel`` (each chunk from the empty state) ->
  ``wkv4_fwd_scan_kernel`` (short serial pass over the chunk summaries: every chunk's incoming
  state) -> ``wkv4_fwd_out_kernel`` (each chunk again, from its incoming state: the outputs).
- backward: ``wkv4_bwd_summary_kernel`` (each chunk forward again: the chunk's share of the
  reverse accumulators and the states every ``BLOCK_T`` steps) -> ``wkv4_bwd_scan_kernel`` (serial
  pass over chunks from the end: every chunk's incoming reverse accumulator, the state gradient)
  -> ``wkv4_bwd_grad_kernel`` (per ``BLOCK_T`` block: forward recompute kept in registers, then
  the reverse sweep writing dk, dv and per-chunk partial sums of dw, du).

Inside a chunk, ``BLOCK_T`` steps are unrolled and all their loads are issued before the first
step's arithmetic, so each thread has ``BLOCK_T`` rows in flight. Programs own ``BLOCK_C``
channels (the contiguous axis: coalesced rows).
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _decay(td_ptr, offs_c, mask_c):
    # w = -exp(time_decay); clamped so that w * 0 and w + (-1e38) stay finite
    td = tl.load(td_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    return tl.maximum(-tl.exp(td), -1e30)


@triton.jit
def _exp(x, FAST: tl.constexpr):
    # FAST (GPU only; the interpreter has no libdevice): ex2.approx.ftz, no subnormal fix-up
    if FAST:
        return libdevice.fast_expf(x)
    else:
        return tl.exp(x)


@triton.jit
def _div(x, y, FAST: tl.constexpr):
    # FAST: rcp.approx.ftz and a multiply (|y| < 2^126 here: normalised sums)
    if FAST:
        return libdevice.fast_dividef(x, y)
    else:
        return x / y


@triton.jit
def _logadd(a1, b1, p1, a2, b2, p2, FAST: tl.constexpr):
    # (a1, b1) e^p1 + (a2, b2) e^p2 renormalised to max(p1, p2); ties keep the first exponent
    d = p1 - p2
    e = _exp(-tl.abs(d), FAST)
    first = d >= 0
    f1 = tl.where(first, 1.0, e)
    f2 = tl.where(first, e, 1.0)
    return a1 * f1 + a2 * f2, b1 * f1 + b2 * f2, tl.where(first, p1, p2), first


@triton.jit
def _output(a, b, p, k, v, u, FAST: tl.constexpr):
    # y = (num + e^{u+k} v) / (den + e^{u+k}), in the frame of max(p, u + k)
    d = p - (u + k)
    e = _exp(-tl.abs(d), FAST)
    first = d >= 0
    ea = tl.where(first, 1.0, e)
    ek = tl.where(first, e, 1.0)
    return _div(a * ea + v * ek, b * ea + ek, FAST)


@triton.jit
def _split_magnitude(x, base):
    # x * e^{base} as m * e^{lx}, exactly. Normally (m, lx) = (x, base): exponents stay the exact
    # sums of keys and decays the forward used. A zero x gets the exponent -1e38 and a tiny one
    # (|x| < 2^-40) moves its power of two into the exponent, so a vanishing cotangent never sets
    # the scale of a reverse accumulator (which would flush the real terms to zero).
    bits = x.to(tl.int32, bitcast=True)
    e = (bits >> 23) & 0xFF
    tiny = e < 87
    m = tl.where(tiny, ((bits & -2139095041) | 0x3F800000).to(tl.float32, bitcast=True), x)
    lx = tl.where(tiny, base + (e - 127).to(tl.float32) * 0.6931471805599453, base)
    nz = e > 0
    return tl.where(nz, m, 0.0), tl.where(nz, lx, -1e38)


@triton.jit
def _bwd_terms(a, b, p, k, v, g, u, w, FAST: tl.constexpr):
    # One token of the backward's forward recompute, from the state (a, b, p) before it.
    # With ybar = a / b the state's mean value, dv = v - ybar, r = e^{u+k} / Z (the token's
    # weight in y, Z = den + e^{u+k}) and s = e^k / den' (its weight in the next state):
    #   y - ybar = r dv,  v - y = (1 - r) dv,  ybar' - ybar = s dv,  v - ybar' = (1 - s) dv,
    # so no gradient term is a difference of two nearly equal values, however much one token
    # dominates. Returns q = g e^{u+k} / Z, r, dv, s; the cotangent g / Z of num as m e^{x + p}
    # (x <= 0: relative to this token's running max p); d2 = p + w - k and e2 = e^{-|d2|}, from
    # which the state update's factors and its max increase follow; and the next state.
    d = p - (u + k)
    e = _exp(-tl.abs(d), FAST)
    first = d >= 0
    ea = tl.where(first, 1.0, e)
    ek = tl.where(first, e, 1.0)
    rz = _div(1.0, b * ea + ek, FAST)
    r = ek * rz
    q = g * r
    m, x = _split_magnitude(g * rz, tl.minimum(d, 0.0))
    dv = v - tl.where(b > 0, _div(a, tl.where(b > 0, b, 1.0), FAST), 0.0)
    pw = p + w
    d2 = pw - k
    e2 = _exp(-tl.abs(d2), FAST)
    keep = d2 >= 0
    f1 = tl.where(keep, 1.0, e2)
    f2 = tl.where(keep, e2, 1.0)
    nb = b * f1 + f2
    s = tl.where(nb > 0, _div(f2, tl.where(nb > 0, nb, 1.0), FAST), 1.0)
    return q, r, dv, s, m, x, d2, e2, a * f1 + v * f2, nb, tl.where(keep, pw, k)


@triton.jit
def _rows_left(T, t0, BLOCK_T: tl.constexpr, EVEN_T: tl.constexpr):
    # rows of the block inside the sequence; a constant when T is a multiple of the chunk, so
    # every tail mask and select folds away
    if EVEN_T:
        return BLOCK_T
    else:
        return T - t0


@triton.jit
def _load_rows(ptr, stride_t, n_valid, mask_c, BLOCK_T: tl.constexpr):
    # BLOCK_T rows of one [B, T, C] tensor from row pointers ``ptr``, as fp32, all issued before
    # any is used; rows at or beyond ``n_valid`` read 0
    rows = ()
    for i in tl.static_range(BLOCK_T):
        rows = rows + (tl.load(ptr, mask=mask_c & (i < n_valid), other=0.0).to(tl.float32),)
        ptr += stride_t
    return rows


@triton.jit
def _store_state(ptr, C, a, b, p, mask_c):
    tl.store(ptr, a, mask=mask_c)
    tl.store(ptr + C, b, mask=mask_c)
    tl.store(ptr + 2 * C, p, mask=mask_c)


@triton.jit
def _initial_state(state_ptr, i_b, B, C, o_c, mask_c, HAS_STATE: tl.constexpr):
    # state_ptr: [3, B, C] fp32 (num, den, max); without a state, transformers' empty state
    # (0, 0, -1e38). An incoming max below -1e38 is clamped to it.
    if HAS_STATE:
        p_s = state_ptr + i_b * C + o_c
        a = tl.load(p_s, mask=mask_c, other=0.0)
        b = tl.load(p_s + B * C, mask=mask_c, other=0.0)
        p = tl.maximum(tl.load(p_s + 2 * B * C, mask=mask_c, other=-1e38), -1e38)
    else:
        a = tl.zeros(o_c.shape, dtype=tl.float32)
        b = tl.zeros(o_c.shape, dtype=tl.float32)
        p = tl.full(o_c.shape, -1e38, dtype=tl.float32)
    return a, b, p


@triton.jit
def wkv4_fwd_summary_kernel(
    k_ptr,
    v_ptr,
    td_ptr,
    sum_ptr,
    sidx_ptr,
    cnt_ptr,
    state_ptr,
    states_ptr,
    final_ptr,
    fidx_ptr,
    T,
    C,
    B,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    EVEN_T: tl.constexpr,
    FAST: tl.constexpr,
    FUSE_SCAN: tl.constexpr = False,
    HAS_STATE: tl.constexpr = False,
    NUM_STAGES: tl.constexpr = 1,
):
    # FUSE_SCAN: the last program of each (channel block, batch row) to store its summary runs
    # the scan over the row's chunks (wkv4_fwd_scan_kernel's work, one launch less);
    # cnt_ptr: [B, cdiv(C, BLOCK_C)] int32 arrival counters
    i_n = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    n_chunks = tl.num_programs(0).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = o_c < C
    w = _decay(td_ptr, o_c, mask_c)
    a = tl.zeros([BLOCK_C], tl.float32)
    b = tl.zeros([BLOCK_C], tl.float32)
    p = tl.full([BLOCK_C], -1e38, tl.float32)
    # index of the token that set the running max (-1: the incoming state)
    idx = tl.full([BLOCK_C], -1, tl.int32)
    p_k = k_ptr + i_b * stride_kb + o_c
    p_v = v_ptr + i_b * stride_vb + o_c
    t_chunk = i_n * CHUNK
    p_k += t_chunk * stride_kt
    p_v += t_chunk * stride_vt
    for sb in range(0, CHUNK, BLOCK_T):
        t0 = t_chunk + sb
        n_valid = _rows_left(T, t0, BLOCK_T, EVEN_T)
        ks = _load_rows(p_k, stride_kt, n_valid, mask_c, BLOCK_T)
        vs = _load_rows(p_v, stride_vt, n_valid, mask_c, BLOCK_T)
        p_k += BLOCK_T * stride_kt
        p_v += BLOCK_T * stride_vt
        for i in tl.static_range(BLOCK_T):
            valid = i < n_valid
            na, nb, npp, keep = _logadd(a, b, p + w, vs[i], 1.0, ks[i], FAST)
            a = tl.where(valid, na, a)
            b = tl.where(valid, nb, b)
            p = tl.where(valid, npp, p)
            idx = tl.where(valid & ~keep, (t0 + i).to(tl.int32), idx)
    row = i_b * n_chunks + i_n
    _store_state(sum_ptr + row * 3 * C + o_c, C, a, b, p, mask_c)
    tl.store(sidx_ptr + row * C + o_c, idx, mask=mask_c)
    if FUSE_SCAN:
        if _last_arrival(cnt_ptr + i_b * tl.num_programs(1) + i_c, n_chunks):
            _fwd_scan(sum_ptr, sidx_ptr, w, state_ptr, states_ptr, final_ptr, fidx_ptr, T, C, B,
                      n_chunks, i_b, o_c, mask_c, CHUNK, HAS_STATE, NUM_STAGES, ".cg")  # fmt: skip


@triton.jit
def _fwd_scan(sum_ptr, sidx_ptr, w, state_ptr, states_ptr, final_ptr, fidx_ptr, T, C, B, NC, i_b,
              o_c, mask_c, CHUNK: tl.constexpr, HAS_STATE: tl.constexpr,
              NUM_STAGES: tl.constexpr, CACHE: tl.constexpr):  # fmt: skip
    """The serial pass over one batch row's chunk summaries for channels ``o_c``: every
    chunk's incoming state, the final state and the index of the token that set its max.
    ``CACHE``: the summaries' load cache modifier (".cg" when other programs of the same launch
    wrote them)."""
    # states_ptr: [B, NC, 3, C] every chunk's incoming state; chunk 0's is the initial state
    a, b, p = _initial_state(state_ptr, i_b, B, C, o_c, mask_c, HAS_STATE)
    _store_state(states_ptr + i_b * NC * 3 * C + o_c, C, a, b, p, mask_c)
    idx = tl.full(o_c.shape, -1, tl.int32)
    for n in tl.range(0, NC, num_stages=NUM_STAGES):
        row = i_b * NC + n
        p_sum = sum_ptr + row * 3 * C + o_c
        sa = tl.load(p_sum, mask=mask_c, other=0.0, cache_modifier=CACHE)
        sb = tl.load(p_sum + C, mask=mask_c, other=0.0, cache_modifier=CACHE)
        sp = tl.load(p_sum + 2 * C, mask=mask_c, other=-1e38, cache_modifier=CACHE)
        sidx = tl.load(sidx_ptr + row * C + o_c, mask=mask_c, other=-1, cache_modifier=CACHE)
        steps = tl.minimum(T - n * CHUNK, CHUNK).to(tl.float32)
        a, b, p, keep = _logadd(a, b, p + steps * w, sa, sb, sp, False)
        idx = tl.where(keep, idx, sidx)
        _store_state(states_ptr + (row + 1) * 3 * C + o_c, C, a, b, p, mask_c & (n + 1 < NC))
    p_f = final_ptr + i_b * C + o_c
    _store_state(p_f, B * C, a, b, p, mask_c)
    tl.store(fidx_ptr + i_b * C + o_c, idx, mask=mask_c)


@triton.jit
def _last_arrival(cnt_ptr, n_parts):
    """True in the program that stores the last of ``n_parts`` parts counted at ``cnt_ptr``
    (int32, zero before the launch; that program sets it back to zero). Every thread's stores
    precede the ticket (barrier, then an acquire-release atomic by one thread): the last
    program sees every part, read with ``.cg`` loads."""
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    last = ticket == n_parts - 1
    if last:
        tl.atomic_xchg(cnt_ptr, 0)
    return last


@triton.jit
def wkv4_fwd_scan_kernel(
    sum_ptr,
    sidx_ptr,
    td_ptr,
    state_ptr,
    states_ptr,
    final_ptr,
    fidx_ptr,
    T,
    C,
    B,
    NC,
    CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_STATE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = o_c < C
    w = _decay(td_ptr, o_c, mask_c)
    _fwd_scan(sum_ptr, sidx_ptr, w, state_ptr, states_ptr, final_ptr, fidx_ptr, T, C, B, NC,
              i_b, o_c, mask_c, CHUNK, HAS_STATE, NUM_STAGES, "")  # fmt: skip


@triton.jit
def wkv4_fwd_out_kernel(
    k_ptr,
    v_ptr,
    td_ptr,
    tf_ptr,
    state_ptr,
    states_ptr,
    y_ptr,
    final_ptr,
    fidx_ptr,
    T,
    C,
    B,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    stride_yb,
    stride_yt,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_STATE: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    EVEN_T: tl.constexpr,
    FAST: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    n_chunks = tl.num_programs(0).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = o_c < C
    w = _decay(td_ptr, o_c, mask_c)
    u = tl.load(tf_ptr + o_c, mask=mask_c, other=0.0).to(tl.float32)
    p_s = states_ptr + (i_b * n_chunks + i_n) * 3 * C + o_c
    if STORE_FINAL:
        # a single chunk (no scan pass): start from the initial state, and record it as chunk
        # 0's incoming state for the backward
        a, b, p = _initial_state(state_ptr, i_b, B, C, o_c, mask_c, HAS_STATE)
        _store_state(p_s, C, a, b, p, mask_c)
    else:
        a = tl.load(p_s, mask=mask_c, other=0.0)
        b = tl.load(p_s + C, mask=mask_c, other=0.0)
        p = tl.load(p_s + 2 * C, mask=mask_c, other=-1e38)
    idx = tl.full([BLOCK_C], -1, tl.int32)
    p_k = k_ptr + i_b * stride_kb + o_c
    p_v = v_ptr + i_b * stride_vb + o_c
    p_y = y_ptr + i_b * stride_yb + o_c
    t_chunk = i_n * CHUNK
    p_k += t_chunk * stride_kt
    p_v += t_chunk * stride_vt
    p_y += t_chunk * stride_yt
    for sb in range(0, CHUNK, BLOCK_T):
        t0 = t_chunk + sb
        n_valid = _rows_left(T, t0, BLOCK_T, EVEN_T)
        ks = _load_rows(p_k, stride_kt, n_valid, mask_c, BLOCK_T)
        vs = _load_rows(p_v, stride_vt, n_valid, mask_c, BLOCK_T)
        p_k += BLOCK_T * stride_kt
        p_v += BLOCK_T * stride_vt
        for i in tl.static_range(BLOCK_T):
            valid = i < n_valid
            y = _output(a, b, p, ks[i], vs[i], u, FAST)
            tl.store(p_y, y.to(y_ptr.dtype.element_ty), mask=mask_c & valid)
            p_y += stride_yt
            na, nb, npp, keep = _logadd(a, b, p + w, vs[i], 1.0, ks[i], FAST)
            a = tl.where(valid, na, a)
            b = tl.where(valid, nb, b)
            p = tl.where(valid, npp, p)
            if STORE_FINAL:
                idx = tl.where(valid & ~keep, (t0 + i).to(tl.int32), idx)
    if STORE_FINAL:
        _store_state(final_ptr + i_b * C + o_c, B * C, a, b, p, mask_c)
        tl.store(fidx_ptr + i_b * C + o_c, idx, mask=mask_c)


@triton.jit
def wkv4_bwd_summary_kernel(
    k_ptr,
    v_ptr,
    gy_ptr,
    td_ptr,
    tf_ptr,
    states_ptr,
    sub_ptr,
    rsum_ptr,
    cnt_ptr,
    final_ptr,
    fidx_ptr,
    gfinal_ptr,
    state_ptr,
    rin_ptr,
    gstate_ptr,
    gpt_ptr,
    gwx_ptr,
    T,
    C,
    B,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    stride_gb,
    stride_gt,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    EVEN_T: tl.constexpr,
    FAST: tl.constexpr,
    FUSE_SCAN: tl.constexpr = False,
    HAS_STATE: tl.constexpr = False,
    HAS_DFINAL: tl.constexpr = False,
    NUM_STAGES: tl.constexpr = 1,
):
    # FUSE_SCAN: the last program of each (channel block, batch row) to store its summary runs
    # the reverse scan over the row's chunks (wkv4_bwd_scan_kernel's work, one launch less);
    # cnt_ptr: [B, cdiv(C, BLOCK_C)] int32 arrival counters
    i_n = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    n_chunks = tl.num_programs(0).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = o_c < C
    w = _decay(td_ptr, o_c, mask_c)
    u = tl.load(tf_ptr + o_c, mask=mask_c, other=0.0).to(tl.float32)
    row = i_b * n_chunks + i_n
    p_s = states_ptr + row * 3 * C + o_c
    a = tl.load(p_s, mask=mask_c, other=0.0)
    b = tl.load(p_s + C, mask=mask_c, other=0.0)
    p = tl.load(p_s + 2 * C, mask=mask_c, other=-1e38)
    # this chunk's share of the reverse accumulators at its start, (ra, rg) e^{rp + p_start}:
    # sum over its tokens t of e^{(t - t_start) w} dnum_t (1, ybar_start - y_t).
    # drift = ybar_t - ybar_start; rise = p_t - p_start - (t - t_start) w (sum of max increases)
    ra = tl.zeros([BLOCK_C], tl.float32)
    rg = tl.zeros([BLOCK_C], tl.float32)
    rp = tl.full([BLOCK_C], -1e38, tl.float32)
    drift = tl.zeros([BLOCK_C], tl.float32)
    rise = tl.zeros([BLOCK_C], tl.float32)
    p_k = k_ptr + i_b * stride_kb + o_c
    p_v = v_ptr + i_b * stride_vb + o_c
    p_g = gy_ptr + i_b * stride_gb + o_c
    t_chunk = i_n * CHUNK
    # sub_ptr: [B, NC * CHUNK // BLOCK_T, 3, C], the state at the start of every BLOCK_T block
    p_sub = sub_ptr + row * (CHUNK // BLOCK_T) * 3 * C + o_c
    p_k += t_chunk * stride_kt
    p_v += t_chunk * stride_vt
    p_g += t_chunk * stride_gt
    for sb in range(0, CHUNK, BLOCK_T):
        t0 = t_chunk + sb
        n_valid = _rows_left(T, t0, BLOCK_T, EVEN_T)
        _store_state(p_sub, C, a, b, p, mask_c)
        p_sub += 3 * C
        ks = _load_rows(p_k, stride_kt, n_valid, mask_c, BLOCK_T)
        vs = _load_rows(p_v, stride_vt, n_valid, mask_c, BLOCK_T)
        gs = _load_rows(p_g, stride_gt, n_valid, mask_c, BLOCK_T)
        p_k += BLOCK_T * stride_kt
        p_v += BLOCK_T * stride_vt
        p_g += BLOCK_T * stride_gt
        for i in tl.static_range(BLOCK_T):
            valid = i < n_valid
            _, r, dv, s, m, x, d2, _, na, nb, np_ = _bwd_terms(
                a, b, p, ks[i], vs[i], gs[i], u, w, FAST
            )
            # ybar_start - y_t = -(drift + r dv)
            ea, eg, ep, _ = _logadd(ra, rg, rp, m, -m * (drift + r * dv), x - rise, FAST)
            ra = tl.where(valid, ea, ra)
            rg = tl.where(valid, eg, rg)
            rp = tl.where(valid, ep, rp)
            drift = tl.where(valid, drift + s * dv, drift)
            rise = tl.where(valid, rise + tl.maximum(-d2, 0.0), rise)
            a = tl.where(valid, na, a)
            b = tl.where(valid, nb, b)
            p = tl.where(valid, np_, p)
    p_r = rsum_ptr + row * 5 * C + o_c
    _store_state(p_r, C, ra, rg, rp, mask_c)
    tl.store(p_r + 3 * C, drift, mask=mask_c)
    tl.store(p_r + 4 * C, rise, mask=mask_c)
    if FUSE_SCAN:
        if _last_arrival(cnt_ptr + i_b * tl.num_programs(1) + i_c, n_chunks):
            _bwd_scan(rsum_ptr, final_ptr, fidx_ptr, gfinal_ptr, state_ptr, rin_ptr, gstate_ptr,
                      gpt_ptr, gwx_ptr, T, C, B, n_chunks, i_b, o_c, mask_c, HAS_STATE,
                      HAS_DFINAL, NUM_STAGES, ".cg")  # fmt: skip


@triton.jit
def _bwd_scan(rsum_ptr, final_ptr, fidx_ptr, gfinal_ptr, state_ptr, rin_ptr, gstate_ptr, gpt_ptr,
              gwx_ptr, T, C, B, NC, i_b, o_c, mask_c, HAS_STATE: tl.constexpr,
              HAS_DFINAL: tl.constexpr, NUM_STAGES: tl.constexpr, CACHE: tl.constexpr):  # fmt: skip
    """The reverse pass over one batch row's chunk summaries for channels ``o_c``: each chunk's
    reverse accumulators after it (``rin``), the final max's cotangent share (``gpt``,
    ``gwx``) and the incoming state's gradient. ``CACHE`` as in :func:`_fwd_scan`."""
    o_bc = i_b * C + o_c  # into [3, B, C] and [B, C] tensors
    # reverse accumulators after the last token, (ra, rg) e^{rp + p_T}: the final state's
    # cotangent in real units, A = dnum e^{-p_T}, G = (dden + ybar_T dnum) e^{-p_T}
    if HAS_DFINAL:
        ga = tl.load(gfinal_ptr + o_bc, mask=mask_c, other=0.0)
        gb = tl.load(gfinal_ptr + B * C + o_bc, mask=mask_c, other=0.0)
        a_fin = tl.load(final_ptr + o_bc, mask=mask_c, other=0.0)
        b_fin = tl.load(final_ptr + B * C + o_bc, mask=mask_c, other=1.0)
        gg = gb + tl.where(b_fin > 0, a_fin / tl.where(b_fin > 0, b_fin, 1.0), 0.0) * ga
        big = tl.maximum(tl.abs(ga), tl.abs(gg))
        mg, rp = _split_magnitude(big, tl.zeros(o_c.shape, tl.float32))
        scale = mg / tl.where(big > 0, big, 1.0)
        ra = ga * scale
        rg = gg * scale
    else:
        ra = tl.zeros(o_c.shape, tl.float32)
        rg = tl.zeros(o_c.shape, tl.float32)
        rp = tl.full(o_c.shape, -1e38, tl.float32)
    for j in tl.range(0, NC, num_stages=NUM_STAGES):
        n = NC - 1 - j
        row = i_b * NC + n
        _store_state(rin_ptr + row * 3 * C + o_c, C, ra, rg, rp, mask_c)
        p_r = rsum_ptr + row * 5 * C + o_c
        sa = tl.load(p_r, mask=mask_c, other=0.0, cache_modifier=CACHE)
        sg = tl.load(p_r + C, mask=mask_c, other=0.0, cache_modifier=CACHE)
        sp = tl.load(p_r + 2 * C, mask=mask_c, other=-1e38, cache_modifier=CACHE)
        drift = tl.load(p_r + 3 * C, mask=mask_c, other=0.0, cache_modifier=CACHE)
        rise = tl.load(p_r + 4 * C, mask=mask_c, other=0.0, cache_modifier=CACHE)
        # to the chunk's start: G about ybar_start (ybar_start - ybar_end = -drift), exponent
        # relative to p_start (p_end - p_start - L w = rise; the decay e^{L w} included)
        ra, rg, rp, _ = _logadd(ra, rg - drift * ra, rp - rise, sa, sg, sp, False)
    # the max of the final state: its cotangent, less what flows through num and den, goes to
    # the token (or the incoming state) that set it
    gpt = tl.zeros(o_c.shape, tl.float32)
    gwx = tl.zeros(o_c.shape, tl.float32)
    jstar = tl.full(o_c.shape, 0, tl.int32)
    if HAS_DFINAL:
        gm = tl.load(gfinal_ptr + 2 * B * C + o_bc, mask=mask_c, other=0.0)
        gpt = gm - b_fin * gg
        jstar = tl.load(fidx_ptr + o_bc, mask=mask_c, other=0)
        steps_after = tl.where(jstar < 0, T, T - 1 - jstar).to(tl.float32)
        gwx = gpt * steps_after
    tl.store(gwx_ptr + o_bc, gwx, mask=mask_c)
    tl.store(gpt_ptr + o_bc, tl.where(jstar < 0, 0.0, gpt), mask=mask_c)
    if HAS_STATE:
        # num0 = a0 e^{p0}, den0 = b0 e^{p0}, and the accumulators are relative to p0; G is
        # about ybar_0 = a0 / b0, so d/dp0 = num0 dnum0 + den0 dden0 = b0 G (a0 A when b0 = 0)
        a0 = tl.load(state_ptr + o_bc, mask=mask_c, other=0.0)
        b0 = tl.load(state_ptr + B * C + o_bc, mask=mask_c, other=0.0)
        scale = tl.exp(rp)
        pos = b0 > 0
        g_a0 = ra * scale
        g_b0 = (rg - tl.where(pos, a0 / tl.where(pos, b0, 1.0), 0.0) * ra) * scale
        g_p0 = tl.where(pos, b0 * rg, a0 * ra) * scale + tl.where(jstar < 0, gpt, 0.0)
        _store_state(gstate_ptr + o_bc, B * C, g_a0, g_b0, g_p0, mask_c)


@triton.jit
def wkv4_bwd_scan_kernel(
    rsum_ptr,
    final_ptr,
    fidx_ptr,
    gfinal_ptr,
    state_ptr,
    rin_ptr,
    gstate_ptr,
    gpt_ptr,
    gwx_ptr,
    T,
    C,
    B,
    NC,
    BLOCK_C: tl.constexpr,
    HAS_STATE: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = o_c < C
    _bwd_scan(rsum_ptr, final_ptr, fidx_ptr, gfinal_ptr, state_ptr, rin_ptr, gstate_ptr, gpt_ptr,
              gwx_ptr, T, C, B, NC, i_b, o_c, mask_c, HAS_STATE, HAS_DFINAL, NUM_STAGES,
              "")  # fmt: skip


@triton.jit
def wkv4_bwd_grad_kernel(
    k_ptr,
    v_ptr,
    gy_ptr,
    td_ptr,
    tf_ptr,
    sub_ptr,
    rin_ptr,
    fidx_ptr,
    gpt_ptr,
    gk_ptr,
    gv_ptr,
    gw_ptr,
    gu_ptr,
    cnt_ptr,
    gwx_ptr,
    gtd_ptr,
    gtf_ptr,
    T,
    C,
    B,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    stride_gb,
    stride_gt,
    stride_dkb,
    stride_dkt,
    stride_dvb,
    stride_dvt,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    EVEN_T: tl.constexpr,
    FAST: tl.constexpr,
    FUSE_PARAM: tl.constexpr = False,
):
    # FUSE_PARAM: the last program of each channel block (over chunks and batch rows) to store
    # its partial sums forms time_decay's and time_first's gradients (wkv4_bwd_param_kernel's
    # work, one launch less); cnt_ptr: [cdiv(C, BLOCK_C)] int32 arrival counters
    i_n = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    n_chunks = tl.num_programs(0).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = o_c < C
    w = _decay(td_ptr, o_c, mask_c)
    u = tl.load(tf_ptr + o_c, mask=mask_c, other=0.0).to(tl.float32)
    row = i_b * n_chunks + i_n
    # reverse accumulators after token t, as (ra, rg) e^{rp + p_{t+1}} (p_{t+1}: the running max
    # after t): A_t = sum_{s > t} e^{(s-1-t) w} dnum_s, G_t = same with (ybar_{t+1} - y_s)
    p_r = rin_ptr + row * 3 * C + o_c
    ra = tl.load(p_r, mask=mask_c, other=0.0)
    rg = tl.load(p_r + C, mask=mask_c, other=0.0)
    rp = tl.load(p_r + 2 * C, mask=mask_c, other=-1e38)
    if HAS_DFINAL:
        jstar = tl.load(fidx_ptr + i_b * C + o_c, mask=mask_c, other=-1)
        gpt = tl.load(gpt_ptr + i_b * C + o_c, mask=mask_c, other=0.0)
    gw = tl.zeros([BLOCK_C], tl.float32)
    gu = tl.zeros([BLOCK_C], tl.float32)
    p_k = k_ptr + i_b * stride_kb + o_c
    p_v = v_ptr + i_b * stride_vb + o_c
    p_g = gy_ptr + i_b * stride_gb + o_c
    p_dk = gk_ptr + i_b * stride_dkb + o_c
    p_dv = gv_ptr + i_b * stride_dvb + o_c
    n_sub: tl.constexpr = CHUNK // BLOCK_T
    p_sub = sub_ptr + row * n_sub * 3 * C + o_c
    for j in range(0, n_sub):
        s = n_sub - 1 - j
        t0 = i_n * CHUNK + s * BLOCK_T
        n_valid = _rows_left(T, t0, BLOCK_T, EVEN_T)
        p_s = p_sub + s * 3 * C
        a = tl.load(p_s, mask=mask_c, other=0.0)
        b = tl.load(p_s + C, mask=mask_c, other=0.0)
        p = tl.load(p_s + 2 * C, mask=mask_c, other=-1e38)
        ks = _load_rows(p_k + t0 * stride_kt, stride_kt, n_valid, mask_c, BLOCK_T)
        vs = _load_rows(p_v + t0 * stride_vt, stride_vt, n_valid, mask_c, BLOCK_T)
        gs = _load_rows(p_g + t0 * stride_gt, stride_gt, n_valid, mask_c, BLOCK_T)
        # the block's last row, walked back by the reverse sweep
        q_dk = p_dk + (t0 + BLOCK_T - 1) * stride_dkt
        q_dv = p_dv + (t0 + BLOCK_T - 1) * stride_dvt
        # forward over the block, keeping what the reverse sweep needs in registers
        qs = ()
        rs = ()
        dvs = ()
        ss = ()
        ms = ()
        xs = ()
        bs = ()
        d2s = ()
        e2s = ()
        for i in tl.static_range(BLOCK_T):
            valid = i < n_valid
            q, r, dv, st, m, x, d2, e2, na, nb, np_ = _bwd_terms(
                a, b, p, ks[i], vs[i], gs[i], u, w, FAST
            )
            gu += tl.where(valid, q * (1.0 - r) * dv, 0.0)
            qs = qs + (q,)
            rs = rs + (r,)
            dvs = dvs + (dv,)
            ss = ss + (st,)
            ms = ms + (m,)
            xs = xs + (x,)
            bs = bs + (b,)
            d2s = d2s + (d2,)
            e2s = e2s + (e2,)
            a = tl.where(valid, na, a)
            b = tl.where(valid, nb, b)
            p = tl.where(valid, np_, p)
        # reverse over the block
        for i in tl.static_range(BLOCK_T - 1, -1, -1):
            valid = i < n_valid
            q = qs[i]
            dv = dvs[i]
            st = ss[i]
            keep = d2s[i] >= 0
            f1 = tl.where(keep, 1.0, e2s[i])  # e^{p_t + w - p_{t+1}}
            f2 = tl.where(keep, e2s[i], 1.0)  # e^{k_t - p_{t+1}}
            scale = _exp(rp, FAST)
            e_k = f2 * scale  # e^{k_t} in the accumulators' frame
            # v - y = (1 - r) dv, v - ybar_{t+1} = (1 - s) dv
            dk = e_k * ((1.0 - st) * dv * ra + rg) + q * (1.0 - rs[i]) * dv
            if HAS_DFINAL:
                dk += tl.where(t0 + i == jstar, gpt, 0.0)
            dv_out = e_k * ra + q
            m_ok = mask_c & valid
            tl.store(q_dk, dk.to(gk_ptr.dtype.element_ty), mask=m_ok)
            tl.store(q_dv, dv_out.to(gv_ptr.dtype.element_ty), mask=m_ok)
            q_dk -= stride_dkt
            q_dv -= stride_dvt
            # G about ybar_t (ybar_t - ybar_{t+1} = -s dv); then
            # dw += e^w (num_t A_t + den_t B_t) = e^w den_t G_t
            rg_t = rg - st * dv * ra
            gw += tl.where(valid, f1 * scale * bs[i] * rg_t, 0.0)
            # token t in, frame moved to p_t: e^w A_t is e^{rp - rise} relative to p_t
            m = ms[i]
            rise = tl.maximum(-d2s[i], 0.0)
            na, ng, np_, _ = _logadd(ra, rg_t, rp - rise, m, -m * rs[i] * dv, xs[i], FAST)
            ra = tl.where(valid, na, ra)
            rg = tl.where(valid, ng, rg)
            rp = tl.where(valid, np_, rp)
    tl.store(gw_ptr + row * C + o_c, gw, mask=mask_c)
    tl.store(gu_ptr + row * C + o_c, gu, mask=mask_c)
    if FUSE_PARAM:
        n_rows = n_chunks * tl.num_programs(2)
        if _last_arrival(cnt_ptr + i_c, n_rows):
            _param_sums(gw_ptr, gu_ptr, gwx_ptr, td_ptr, gtd_ptr, gtf_ptr, n_rows, B, C, o_c,
                        mask_c, ".cg")  # fmt: skip


@triton.jit
def _param_sums(gw_ptr, gu_ptr, gwx_ptr, td_ptr, gtd_ptr, gtf_ptr, R, B, C, o_c, mask_c,
                CACHE: tl.constexpr):  # fmt: skip
    """time_decay's and time_first's gradients for channels ``o_c`` from the ``[R = B * NC, C]``
    per-(batch, chunk) partial sums and the ``[B, C]`` incoming-state share of dw, summed rows
    in sequence (a fixed order: deterministic)."""
    gw = tl.zeros(o_c.shape, dtype=tl.float32)
    gu = tl.zeros(o_c.shape, dtype=tl.float32)
    for r in range(0, R):
        gw += tl.load(gw_ptr + r * C + o_c, mask=mask_c, other=0.0, cache_modifier=CACHE)
        gu += tl.load(gu_ptr + r * C + o_c, mask=mask_c, other=0.0, cache_modifier=CACHE)
    gwx = tl.zeros(o_c.shape, dtype=tl.float32)
    for b in range(0, B):
        gwx += tl.load(gwx_ptr + b * C + o_c, mask=mask_c, other=0.0)
    w = _decay(td_ptr, o_c, mask_c)
    tl.store(gtd_ptr + o_c, ((gw + gwx) * w).to(gtd_ptr.dtype.element_ty), mask=mask_c)
    tl.store(gtf_ptr + o_c, gu.to(gtf_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def wkv4_bwd_param_kernel(
    gw_ptr,
    gu_ptr,
    gwx_ptr,
    td_ptr,
    gtd_ptr,
    gtf_ptr,
    R,
    B,
    C,
    BLOCK_C: tl.constexpr,
):
    # One launch instead of the ~10 small PyTorch ops of the sums, the chain rule through
    # w = -exp(time_decay) and the casts (the grad kernel's FUSE_PARAM does it without one).
    i_c = tl.program_id(0).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    _param_sums(gw_ptr, gu_ptr, gwx_ptr, td_ptr, gtd_ptr, gtf_ptr, R, B, C, o_c, o_c < C, "")
