"""``@triton.jit`` helpers shared by the WKV-6 and WKV-7 kernels (mostly the tensor-core
``MODE="tc"`` ones), and the decay pass both launch (:func:`tc_cumsum_kernel`).

Importing this module imports Triton (it is only imported by the kernels modules)."""

import triton
import triton.language as tl


@triton.jit
def store_flat(ptrs, x, mask, N: tl.constexpr):
    """``tl.store(ptrs, x, mask)`` of an N-element tile as one flat vector. A 2-D store whose
    addresses are contiguous along one axis gets a layout coalesced along it from Triton; when
    that is not the layout the tile is computed in, a loop that stores its carried state every
    few steps keeps a second copy of the whole update in the store's layout (sm_90a, the
    recurrent WKV-7 forward: 2,512 SASS instructions against 2,072 flat). Flat, the store
    takes the tile's own layout."""
    tl.store(tl.reshape(ptrs, [N]), tl.reshape(x, [N]), mask=tl.reshape(mask, [N]))


@triton.jit
def load_flat(ptrs, mask, R: tl.constexpr, C: tl.constexpr):
    """``tl.load(ptrs, mask, other=0)`` of an ``[R, C]`` tile through one flat vector, for the
    reason of :func:`store_flat`: the loaded tile takes the layout its users want."""
    x = tl.load(tl.reshape(ptrs, [R * C]), mask=tl.reshape(mask, [R * C]), other=0.0)
    return tl.reshape(x, [R, C])


@triton.jit
def prev_rows(x, N: tl.constexpr):
    """``y[t] = x[t - 1]``, ``y[0] = 0`` for an ``[N, *]`` fp32 tile, exactly (an fp32 product
    with a 0/1 shift matrix). The exclusive log decay is taken this way rather than as
    ``g - w``: the subtraction costs ~ulp(|g|) absolute in the exponent, which is the whole
    relative error of an adjacent pair's factor exp(e_{t+1} - g_t) = 1 under strong decay."""
    o = tl.arange(0, N)
    shift = (o[:, None] == o[None, :] + 1).to(tl.float32)  # [N, N]
    return tl.dot(shift, x, input_precision="ieee")


@triton.jit
def next_rows(x, N: tl.constexpr):
    """``y[t] = x[t + 1]``, ``y[N - 1] = 0`` for an ``[N, *]`` fp32 tile, exactly (as
    :func:`prev_rows`)."""
    o = tl.arange(0, N)
    shift = (o[:, None] + 1 == o[None, :]).to(tl.float32)  # [N, N]
    return tl.dot(shift, x, input_precision="ieee")


@triton.jit
def decay_to_end(g, ew, N: tl.constexpr):
    """``exp(g[N-1] - g[t])`` (decay from after step t to the block's end) of an ``[N, *]`` tile
    of inclusive log decays ``g`` with step decays ``ew = exp(w)``, as
    ``exp(g[N-1] - g[t+1]) * ew[t+1]``: one step from the end it is that step's exp(w) itself,
    not exp of a difference of cumulative sums (off by ~|g| 2^-24 in the exponent, ~1e-5
    relative under strong decay, where exactly these one-step terms dominate dw)."""
    o = tl.arange(0, N)
    to_end = next_rows(tl.exp(last_row(g, N)[None, :] - g) * ew, N)
    return to_end + tl.where(o[:, None] == N - 1, 1.0, 0.0)


@triton.jit
def last_row(x, N: tl.constexpr):
    """Row ``N - 1`` of an ``[N, *]`` tile, as a vector."""
    o = tl.arange(0, N)
    return tl.sum(tl.where((o == N - 1)[:, None], x, 0.0), axis=0)


@triton.jit
def unit_lower_inverse(L, N: tl.constexpr):
    """``(I - L)^{-1}`` of a strictly lower-triangular ``[N, N]`` fp32 tile (N = 16), as
    ``(I + L)(I + L^2)(I + L^4)(I + L^8)`` = I + L + ... + L^15 (L is nilpotent): 7 small fp32
    products instead of N dependent substitution steps."""
    o = tl.arange(0, N)
    eye = (o[:, None] == o[None, :]).to(tl.float32)
    inv = eye + L
    p = tl.dot(L, L, input_precision="ieee")  # L^2
    inv = tl.dot(inv, eye + p, input_precision="ieee")
    p = tl.dot(p, p, input_precision="ieee")  # L^4
    inv = tl.dot(inv, eye + p, input_precision="ieee")
    p = tl.dot(p, p, input_precision="ieee")  # L^8
    inv = tl.dot(inv, eye + p, input_precision="ieee")
    return inv


#: largest total log decay of one 16-step block (over every key channel) for which the tc
#: kernels factor the pair factors exp(g_t - g_j) as exp(g_t) * exp(-g_j) (g from the block
#: start, so exp(g) <= 1 and exp(-g) <= e^60 ~ 1e26, with 1e12 of fp32 range to spare for the
#: values they scale). RWKV-LM's RWKV-7 clamp gives at most 16 * 0.607 = 9.7; blocks past it
#: take the exact pairwise path.
FACTOR_LIMIT = tl.constexpr(60.0)


@triton.jit
def block_decay(g, N: tl.constexpr):
    """The block's total log decay in its most-decaying key channel, from its inclusive log
    decays ``g`` ([N, *], non-increasing down the rows, 0 at the block start)."""
    return tl.min(last_row(g, N), axis=0)


@triton.jit
def factor_safe(g, N: tl.constexpr):
    """True when the block's total decay stays above ``-FACTOR_LIMIT`` in every key channel:
    its pair factors may be taken as products exp(g_t) exp(-g_j)."""
    return block_decay(g, N) >= -FACTOR_LIMIT


@triton.jit
def other_path(total, PATH: tl.constexpr):
    """Whether a block of total log decay ``total`` belongs to the other launch of a block
    kernel: ``PATH`` 1 takes the blocks with bounded decay (factored pairs), 2 the rest (exact
    pairs), 0 (an fp32 ``w``) every block. One path per compiled kernel keeps the registers of
    the other out of it."""
    if PATH == 1:
        return total < -FACTOR_LIMIT
    elif PATH == 2:
        return total >= -FACTOR_LIMIT
    else:
        return False


@triton.jit
def decayed_pairs(x, gx, y, gy, mask, FACTORED: tl.constexpr, PREC: tl.constexpr):
    """``A[t, j] = sum_k x[t, k] y[j, k] exp(gx[t, k] - gy[j, k])`` where ``mask[t, j]``, else 0,
    for ``[N, BK]`` tiles (N = 16). ``mask`` may only select pairs with ``gx[t] <= gy[j]``
    (every factor <= 1). ``FACTORED`` (blocks whose decay passes :func:`factor_safe`): one
    tensor-core product of ``x * exp(gx)`` and ``y * exp(-gy)``; otherwise one ``[N, N, BK]``
    tile of exponentials of the differences (any decay)."""
    if FACTORED:
        A = tl.dot(x * tl.exp(gx), tl.trans(y * tl.exp(-gy)), input_precision=PREC)
        A = tl.where(mask, A, 0.0)
    else:
        f = tl.exp(tl.where(mask[:, :, None], gx[:, None, :] - gy[None, :, :], float("-inf")))
        A = tl.sum(x[:, None, :] * y[None, :, :] * f, axis=2)
    return A


@triton.jit
def read_block_decays(gi, o_g, m_k, o_i, K):
    """A 16-step block's log decays from :func:`tc_cumsum_kernel`'s inclusive rows ``gi`` (run
    with BT = 16), at offsets ``o_g`` ``[BC, *]``: the inclusive ``g`` and the exclusive ``e``,
    read as the row before (0 at the block start): the same stored float, so an adjacent pair's
    factor exp(e_t - g_{t-1}) is exactly 1."""
    g = tl.load(gi + o_g, mask=m_k[None, :], other=0.0)
    e = tl.load(gi + o_g - K, mask=(o_i > 0)[:, None] & m_k[None, :], other=0.0)
    return g, e


@triton.jit(do_not_specialize=["T"])
def tc_cumsum_kernel(
    w,  # [B, T, H, K] log decay
    gi,  # [B, H, NC * BT, K] fp32: inclusive log decay from the start of each BT-step chunk
    gr,  # [B, H, NC * BT, K] fp32: log decay from after each step to its chunk's end
    T,
    H,
    K,
    BK: tl.constexpr,
    BT: tl.constexpr,
):
    """Each BT-step chunk's log decays, once, so that the kernels after it read every row they
    need (inclusive, exclusive = the row before, a block's first and last, the decay to the
    chunk end) from memory instead of forming them with cross-thread scans, shuffles and
    reductions (WKV-6's forward with BT = 64; the WKV-6 / WKV-7 backward's DPASS with BT = 16).
    Rows past T (w = 0) repeat the last value. ``gr`` is summed from the chunk end (the next rows
    of w), not taken as gi[end] - gi: a difference of two prefix sums is ~ulp(|gi[end]|) off in
    the factors near 1 of the last steps, which dominate the state."""
    i_c = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    NC = (T + BT - 1) // BT
    HK = tl.cast(H, tl.int64) * K
    o_k = tl.arange(0, BK)
    t = i_c * BT + tl.arange(0, BT)
    m_k = o_k < K
    b_w = tl.load(
        w + i_b * T * HK + i_h * K + t[:, None] * HK + o_k[None, :],
        mask=(t < T)[:, None] & m_k[None, :],
        other=0.0,
    ).to(tl.float32)  # [BT, BK]
    o_g = (i_bh * NC * BT + t[:, None]) * K + o_k[None, :]
    tl.store(gi + o_g, tl.cumsum(b_w, axis=0), mask=m_k[None, :])
    m_n = ((t + 1) < T) & (tl.arange(0, BT) + 1 < BT)  # the next row, inside the chunk
    b_wn = tl.load(
        w + i_b * T * HK + i_h * K + (t[:, None] + 1) * HK + o_k[None, :],
        mask=m_n[:, None] & m_k[None, :],
        other=0.0,
    ).to(tl.float32)  # [BT, BK]
    tl.store(gr + o_g, tl.cumsum(b_wn, axis=0, reverse=True), mask=m_k[None, :])
