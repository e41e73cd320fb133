"""Triton kernels of the causal depthwise conv1d (``@triton.jit`` only).

Time is seen through ``xp = concat(initial_states, x)``: the ``WIDTH - 1`` positions before
``t = 0`` come from ``initial_states`` (or are zero). Programs own a ``[BLOCK_D, BLOCK_L]`` tile
(channels x time, time the contiguous axis).

- ``causal_conv1d_fwd_kernel``: ``y = bias + sum_j w[:, j] * xp[:, t + j]``, optional SiLU.
- ``causal_conv1d_bwd_g_kernel``: recomputes ``y``, writes ``g = dout * act'(y)`` (fp32) and the
  tile's partial sums of ``dweight`` and ``dbias`` (summed on the host in a fixed order: no float
  atomics, deterministic).
- ``causal_conv1d_bwd_dx_kernel``: ``dxp[s] = sum_j w[:, j] * g[s - j]`` over all of ``xp``.
"""

import triton
import triton.language as tl


@triton.jit
def _load_xp(x_ptr, init_ptr, pid_b, offs_d, t, mask_d, L, D, sxb, sxd, sxl,
             WIDTH: tl.constexpr, HAS_INIT: tl.constexpr):  # fmt: skip
    # xp at x-coordinates t ([BLOCK_L]; negative t reads initial_states), [BLOCK_D, BLOCK_L] fp32
    in_x = (t >= 0) & (t < L)
    ptrs = x_ptr + pid_b * sxb + offs_d[:, None] * sxd + t[None, :] * sxl
    v = tl.load(ptrs, mask=mask_d[:, None] & in_x[None, :], other=0.0).to(tl.float32)
    if HAS_INIT:
        in_s = (t < 0) & (t >= -(WIDTH - 1))
        s_idx = t + (WIDTH - 1)
        sptrs = init_ptr + (pid_b * D + offs_d[:, None]) * (WIDTH - 1) + s_idx[None, :]
        v += tl.load(sptrs, mask=mask_d[:, None] & in_s[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _conv(x_ptr, init_ptr, w_ptr, b_ptr, pid_b, offs_d, offs_l, mask_d, L, D, sxb, sxd, sxl,
          WIDTH: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr,
          BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):  # fmt: skip
    y = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        w = tl.load(w_ptr + offs_d * WIDTH + j, mask=mask_d, other=0.0).to(tl.float32)  # [BLOCK_D]
        xv = _load_xp(x_ptr, init_ptr, pid_b, offs_d, offs_l + (j - (WIDTH - 1)), mask_d, L, D,
                      sxb, sxd, sxl, WIDTH, HAS_INIT)  # fmt: skip
        y += w[:, None] * xv
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    return y


@triton.jit
def causal_conv1d_fwd_kernel(
    x_ptr, init_ptr, w_ptr, b_ptr, out_ptr,
    D, L, sxb, sxd, sxl,
    WIDTH: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_l = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # [BLOCK_L]
    mask_d = offs_d < D
    y = _conv(x_ptr, init_ptr, w_ptr, b_ptr, pid_b, offs_d, offs_l, mask_d, L, D, sxb, sxd, sxl,
              WIDTH, HAS_INIT, HAS_BIAS, BLOCK_D, BLOCK_L)  # fmt: skip
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    optrs = out_ptr + (pid_b * D + offs_d[:, None]) * L + offs_l[None, :]
    tl.store(optrs, y.to(out_ptr.dtype.element_ty), mask=mask_d[:, None] & (offs_l < L)[None, :])


@triton.jit
def causal_conv1d_bwd_g_kernel(
    dout_ptr, x_ptr, init_ptr, w_ptr, b_ptr, g_ptr, dw_ptr, db_ptr,
    D, L, NL, sxb, sxd, sxl, sgb, sgd, sgl,
    WIDTH: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_l = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # [BLOCK_L]
    mask_d = offs_d < D
    mask = mask_d[:, None] & (offs_l < L)[None, :]
    gptrs = dout_ptr + pid_b * sgb + offs_d[:, None] * sgd + offs_l[None, :] * sgl
    g = tl.load(gptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_L]
    if SILU:
        y = _conv(x_ptr, init_ptr, w_ptr, b_ptr, pid_b, offs_d, offs_l, mask_d, L, D, sxb, sxd,
                  sxl, WIDTH, HAS_INIT, HAS_BIAS, BLOCK_D, BLOCK_L)  # fmt: skip
        s = 1.0 / (1.0 + tl.exp(-y))
        g = g * s * (1.0 + y * (1.0 - s))
    g = tl.where(mask, g, 0.0)
    tl.store(g_ptr + (pid_b * D + offs_d[:, None]) * L + offs_l[None, :], g, mask=mask)
    # partial sums of this tile: dw (B, NL, D, WIDTH), db (B, NL, D)
    part = (pid_b * NL + pid_l) * D + offs_d  # [BLOCK_D]
    for j in tl.static_range(WIDTH):
        xv = _load_xp(x_ptr, init_ptr, pid_b, offs_d, offs_l + (j - (WIDTH - 1)), mask_d, L, D,
                      sxb, sxd, sxl, WIDTH, HAS_INIT)  # fmt: skip
        tl.store(dw_ptr + part * WIDTH + j, tl.sum(g * xv, axis=1), mask=mask_d)
    if HAS_BIAS:
        tl.store(db_ptr + part, tl.sum(g, axis=1), mask=mask_d)


@triton.jit
def causal_conv1d_bwd_dx_kernel(
    g_ptr, w_ptr, dxp_ptr, D, L,
    WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    offs_s = pid_s * BLOCK_L + tl.arange(0, BLOCK_L)  # [BLOCK_L], xp coordinates
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        w = tl.load(w_ptr + offs_d * WIDTH + j, mask=mask_d, other=0.0).to(tl.float32)  # [BLOCK_D]
        t = offs_s - j
        m = mask_d[:, None] & ((t >= 0) & (t < L))[None, :]
        gv = tl.load(g_ptr + (pid_b * D + offs_d[:, None]) * L + t[None, :], mask=m, other=0.0)
        acc += w[:, None] * gv
    S = L + WIDTH - 1
    dptrs = dxp_ptr + (pid_b * D + offs_d[:, None]) * S + offs_s[None, :]
    tl.store(dptrs, acc, mask=mask_d[:, None] & (offs_s < S)[None, :])
