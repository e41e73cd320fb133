"""NumPy float64 references: one forward and one hand-written backward (VJP) per op.

This subpackage imports NumPy only, so it runs (and is tested) where torch is absent.
Every function takes and returns ``numpy.ndarray`` values and computes in float64
whatever the input dtype. Backward functions return a dict of gradients keyed by the
forward's argument names; an optional argument that was ``None`` gets a ``None`` gradient.

Layouts follow the upstream contracts that scanopt replaces:

- selective scan (mamba_ssm): u/delta/z ``(batch, dim, L)``, A ``(dim, N)``, B/C ``(dim, N)``,
  ``(batch, N, L)`` or ``(batch, G, N, L)``; state ``(batch, dim, N)``.
- WKV-4 (transformers' ``rwkv_linear_attention``): key/value ``(B, T, C)``, state
  ``(num, den, max)`` each ``(B, C)``.
- WKV-6 / WKV-7 (flash-linear-attention's ``chunk_rwkv6`` / ``chunk_rwkv7``): ``[B, T, H, K]``,
  ``w`` the log decay, state ``[B, H, K, V]``.
- causal conv1d (causal-conv1d): x ``(batch, dim, L)``, weight ``(dim, width)``, states
  ``(batch, dim, width - 1)``.
- attention: torch SDPA's ``(B, H, L, D)`` layout; GQA/MQA by head count.
"""

from scanopt.reference.attention import attention_bwd, attention_fwd
from scanopt.reference.causal_conv1d import causal_conv1d_bwd, causal_conv1d_fwd
from scanopt.reference.selective_scan import (
    selective_scan_bwd,
    selective_scan_fwd,
    selective_state_update_bwd,
    selective_state_update_fwd,
)
from scanopt.reference.wkv import wkv4_bwd, wkv4_fwd, wkv6_bwd, wkv6_fwd, wkv7_bwd, wkv7_fwd

__all__ = [
    "attention_bwd",
    "attention_fwd",
    "causal_conv1d_bwd",
    "causal_conv1d_fwd",
    "selective_scan_bwd",
    "selective_scan_fwd",
    "selective_state_update_bwd",
    "selective_state_update_fwd",
    "wkv4_bwd",
    "wkv4_fwd",
    "wkv6_bwd",
    "wkv6_fwd",
    "wkv7_bwd",
    "wkv7_fwd",
]
