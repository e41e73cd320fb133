"""``@triton.jit`` helpers shared by the tensor-core (``MODE="tc"``) WKV-6 and WKV-7 kernels.

Importing this module imports Triton (it is only imported by the kernels modules)."""

import triton
import triton.language as tl


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
