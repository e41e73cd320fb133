"""NumPy float64 reference for softmax attention: forward and hand-written backward (VJP).

Layout is torch SDPA's ``(B, H, L, D)``. Semantics follow flash-attn (``flash_attn_func`` and the
``attention_ref`` / ``construct_local_mask`` helpers of its tests) and ``torch.nn.functional.
scaled_dot_product_attention``:

- scores ``s = scale * q @ k^T`` with ``scale = 1/sqrt(D)`` by default; with ``softcap > 0``,
  ``s = softcap * tanh(s / softcap)`` (flash-attn applies the softcap after the scale).
- GQA/MQA: query head ``h`` reads kv head ``h // (Hq // Hk)`` (flash-attn's docstring and SDPA's
  ``enable_gqa`` / ``repeat_interleave``).
- Mask: with ``offset = Lk - Lq`` (``causal_align="bottom_right"``, flash-attn >= 2.1) or ``0``
  (``"top_left"``, SDPA ``is_causal``), query ``i`` attends key ``j`` iff
  ``j >= i + offset - left`` (unless ``left < 0``) and ``j <= i + offset + right`` (unless
  ``right < 0``), ``(left, right) = window``; ``causal=True`` sets ``right = 0``.
- ``lse`` is the natural-log logsumexp of the (softcapped) scaled scores over allowed keys.
- A query row with no allowed key gets ``out = 0``, ``lse = -inf`` and zero gradients. flash-attn
  zeroes such rows' output in every version; the LSE it stores there is ``-inf`` in FA3 (hopper)
  and FA4 but ``+inf`` in FA2's non-split kernel (a trick so its backward gets ``P = 0``). This
  reference uses ``-inf``: ``log(0)`` of an empty sum.
"""

from __future__ import annotations

import numpy as np

_ALIGNS = ("bottom_right", "top_left")


def _check_inputs(q, k, v, scale, causal_align, window, softcap):
    """Cast to float64 and validate shapes/options; returns (q, k, v, scale, (left, right))."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    for name, x, dims in (
        ("q", q, "(B, Hq, Lq, D)"),
        ("k", k, "(B, Hk, Lk, D)"),
        ("v", v, "(B, Hk, Lk, Dv)"),
    ):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D {dims}, got shape {x.shape}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(
            f"batch mismatch: q has batch {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}"
        )
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"head dims differ: q has D={q.shape[3]} but k has D={k.shape[3]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v has {v.shape[1]} heads but k has {k.shape[1]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v has Lk={v.shape[2]} but k has Lk={k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads Hq={q.shape[1]} must be divisible by k/v heads Hk={k.shape[1]}")
    if causal_align not in _ALIGNS:
        raise ValueError(f"causal_align must be one of {_ALIGNS}, got {causal_align!r}")
    if len(window) != 2 or any(int(w) != w for w in window):
        raise ValueError(f"window must be a pair of ints (left, right), got {window!r}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap}")
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[3])
    return q, k, v, float(scale), (int(window[0]), int(window[1]))


def _allowed(lq, lk, causal, causal_align, window):
    """Bool mask (Lq, Lk): True where query i may attend key j."""
    left, right = window
    if causal:
        right = 0
    offset = lk - lq if causal_align == "bottom_right" else 0
    i = np.arange(lq)[:, None] + offset  # diagonal position of each query row
    j = np.arange(lk)[None, :]
    ok = np.ones((lq, lk), dtype=bool)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def _forward(q, k, v, scale, softcap, ok):
    """Shared forward pieces: (out, lse, p, tanh_or_None) with kv expanded to Hq heads."""
    groups = q.shape[1] // k.shape[1]
    ke = np.repeat(k, groups, axis=1)  # (B, Hq, Lk, D)
    ve = np.repeat(v, groups, axis=1)  # (B, Hq, Lk, Dv)
    s = scale * np.einsum("bhid,bhjd->bhij", q, ke)  # (B, Hq, Lq, Lk)
    t = None
    if softcap > 0:
        t = np.tanh(s / softcap)
        s = softcap * t
    s = np.where(ok, s, -np.inf)
    m = np.max(s, axis=-1, initial=-np.inf)  # (B, Hq, Lq); -inf on empty rows
    has_key = np.isfinite(m)
    m_safe = np.where(has_key, m, 0.0)
    e = np.exp(s - m_safe[..., None])  # masked entries: exp(-inf) = 0
    l = e.sum(axis=-1)
    l_safe = np.where(has_key, l, 1.0)
    p = e / l_safe[..., None]  # (B, Hq, Lq, Lk); zero rows where nothing is allowed
    lse = np.where(has_key, m_safe + np.log(l_safe), -np.inf)
    out = np.einsum("bhij,bhjd->bhid", p, ve)  # (B, Hq, Lq, Dv)
    return out, lse, p, t, ke, ve


def attention_fwd(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float | None = None,
    causal: bool = False,
    causal_align: str = "bottom_right",
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax attention forward in float64.

    Args:
        q: (B, Hq, Lq, D) queries.
        k: (B, Hk, Lk, D) keys; ``Hq % Hk == 0`` (query head h uses kv head ``h // (Hq // Hk)``).
        v: (B, Hk, Lk, Dv) values.
        scale: score scale; ``None`` means ``1 / sqrt(D)``.
        causal: mask keys after the query's diagonal (sets the right window to 0).
        causal_align: ``"bottom_right"`` (flash-attn, diagonal offset ``Lk - Lq``) or
            ``"top_left"`` (torch SDPA ``is_causal``, offset 0). Also anchors ``window``.
        window: (left, right) sliding window; a negative side is unbounded.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.

    Returns:
        out: (B, Hq, Lq, Dv); zero on rows with no allowed key.
        lse: (B, Hq, Lq) natural-log logsumexp of the scores; ``-inf`` on rows with no allowed key.
    """
    q, k, v, scale, window = _check_inputs(q, k, v, scale, causal_align, window, softcap)
    ok = _allowed(q.shape[2], k.shape[2], causal, causal_align, window)
    out, lse, *_ = _forward(q, k, v, scale, softcap, ok)
    return out, lse


def attention_bwd(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float | None = None,
    causal: bool = False,
    causal_align: str = "bottom_right",
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    dlse: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Vector-Jacobian product of :func:`attention_fwd` in float64.

    Args:
        dout: (B, Hq, Lq, Dv) cotangent of ``out``.
        q, k, v, scale, causal, causal_align, window, softcap: as in :func:`attention_fwd`.
        dlse: optional (B, Hq, Lq) cotangent of ``lse``; ignored on rows with no allowed key.

    Returns:
        dict with ``"q"`` (B, Hq, Lq, D), ``"k"`` (B, Hk, Lk, D), ``"v"`` (B, Hk, Lk, Dv); k/v
        gradients are summed over the query heads of each GQA group.
    """
    q, k, v, scale, window = _check_inputs(q, k, v, scale, causal_align, window, softcap)
    B, Hq, Lq, _ = q.shape
    Hk, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dout = np.asarray(dout, dtype=np.float64)
    if dout.shape != (B, Hq, Lq, Dv):
        raise ValueError(
            f"dout must have shape {(B, Hq, Lq, Dv)} (B, Hq, Lq, Dv), got {dout.shape}"
        )
    if dlse is not None:
        dlse = np.asarray(dlse, dtype=np.float64)
        if dlse.shape != (B, Hq, Lq):
            raise ValueError(f"dlse must have shape {(B, Hq, Lq)} (B, Hq, Lq), got {dlse.shape}")

    ok = _allowed(Lq, Lk, causal, causal_align, window)
    out, lse, p, t, ke, ve = _forward(q, k, v, scale, softcap, ok)

    dve = np.einsum("bhij,bhid->bhjd", p, dout)  # dV = P^T dO, per query head
    dp = np.einsum("bhid,bhjd->bhij", dout, ve)  # dP = dO V^T
    delta = np.sum(dout * out, axis=-1)  # rowsum(dO * O) = rowsum(P * dP)
    if dlse is not None:
        # d lse / d s_ij = P_ij; rows with no allowed key have lse = -inf and take no gradient
        delta = delta - np.where(np.isfinite(lse), dlse, 0.0)
    ds = p * (dp - delta[..., None])  # softmax VJP; zero wherever P is zero
    if t is not None:
        ds = ds * (1.0 - t * t)  # d/dx softcap*tanh(x/softcap)
    ds = ds * scale  # gradient w.r.t. q @ k^T

    dq = np.einsum("bhij,bhjd->bhid", ds, ke)
    dke = np.einsum("bhij,bhid->bhjd", ds, q)
    groups = Hq // Hk
    # sum the expanded (B, Hq, ...) gradients over each group of query heads
    dk = dke.reshape(B, Hk, groups, Lk, -1).sum(axis=2)
    dv = dve.reshape(B, Hk, groups, Lk, Dv).sum(axis=2)
    return {"q": dq, "k": dk, "v": dv}
