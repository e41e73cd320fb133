"""Module objects with upstream names (mamba_ssm, causal_conv1d, fla, RWKV-LM) backed by scanopt,
and an opt-in ``sys.modules`` alias installer.

Example::

    import scanopt.integrations as si
    si.install_aliases("mamba_ssm", "causal_conv1d")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn   # scanopt's
    si.uninstall_aliases()
"""

from __future__ import annotations

import sys
import types
from typing import Any

__all__ = [
    "as_causal_conv1d",
    "as_fla",
    "as_mamba_ssm",
    "as_rwkvlm",
    "install_aliases",
    "uninstall_aliases",
]

_INSTALLED: dict[str, Any] = {}
_MISSING = object()


def _tree(root: str, leaves: dict[str, dict[str, Any]]) -> dict[str, types.ModuleType]:
    """Build ``{dotted name: module}`` for ``root`` and every parent of each leaf module."""
    mods: dict[str, types.ModuleType] = {}

    def get(name: str) -> types.ModuleType:
        if name not in mods:
            mod = types.ModuleType(name, f"scanopt alias of {name!r} (scanopt.integrations)")
            mod.__path__ = []  # a package, so submodule imports resolve through sys.modules
            mod.__scanopt_alias__ = True
            mods[name] = mod
            if "." in name:
                parent, _, child = name.rpartition(".")
                setattr(get(parent), child, mod)
        return mods[name]

    get(root)
    for name, attrs in leaves.items():
        mod = get(name)
        for key, value in attrs.items():
            setattr(mod, key, value)
        mod.__all__ = list(attrs)
    return mods


# --------------------------------------------------------------------------------------------
# mamba_ssm / causal_conv1d


def _mamba_tree() -> dict[str, types.ModuleType]:
    from scanopt.integrations.mamba import mamba_inner_fn
    from scanopt.ops.selective_scan.op import selective_scan_fn, selective_state_update

    return _tree(
        "mamba_ssm",
        {
            "mamba_ssm.ops.selective_scan_interface": {
                "selective_scan_fn": selective_scan_fn,
                "mamba_inner_fn": mamba_inner_fn,
            },
            "mamba_ssm.ops.triton.selective_state_update": {
                "selective_state_update": selective_state_update,
            },
        },
    )


def as_mamba_ssm() -> types.ModuleType:
    """A ``mamba_ssm`` package object: ``.ops.selective_scan_interface.selective_scan_fn`` /
    ``mamba_inner_fn`` and ``.ops.triton.selective_state_update.selective_state_update``."""
    return _mamba_tree()["mamba_ssm"]


def _conv_tree() -> dict[str, types.ModuleType]:
    from scanopt.ops.causal_conv1d.op import causal_conv1d_fn, causal_conv1d_update

    attrs = {"causal_conv1d_fn": causal_conv1d_fn, "causal_conv1d_update": causal_conv1d_update}
    return _tree(
        "causal_conv1d", {"causal_conv1d": attrs, "causal_conv1d.causal_conv1d_interface": attrs}
    )


def as_causal_conv1d() -> types.ModuleType:
    """A ``causal_conv1d`` package object: ``causal_conv1d_fn`` and ``causal_conv1d_update``."""
    return _conv_tree()["causal_conv1d"]


# --------------------------------------------------------------------------------------------
# flash-linear-attention


def _fla_checks(name: str, cu_seqlens: Any, head_first: bool) -> None:
    if cu_seqlens is not None:
        raise ValueError(f"{name}: cu_seqlens (packed sequences) is not supported by scanopt")
    if head_first:
        raise ValueError(f"{name}: head_first=True is not supported; pass [B, T, H, K] tensors")


def _make_rwkv6(name: str):
    def fn(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False,
           cu_seqlens=None, head_first=False):  # fmt: skip
        _fla_checks(name, cu_seqlens, head_first)
        from scanopt.ops.wkv6.op import wkv6

        return wkv6(r, k, v, w, u, scale=scale, initial_state=initial_state,
                    output_final_state=output_final_state)  # fmt: skip

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = (
        f"fla.ops.rwkv6.{name} on scanopt.wkv6: r/k/w ``[B, T, H, K]``, v ``[B, T, H, V]``, "
        "u ``[H, K]``, w the log decay; ``scale=None`` means ``K ** -0.5`` (fla's default). "
        "Returns ``(o, final_state or None)``."
    )
    return fn


def _make_rwkv7(name: str):
    def fn(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False,
           cu_seqlens=None, head_first=False):  # fmt: skip
        _fla_checks(name, cu_seqlens, head_first)
        from scanopt.ops.wkv7.op import wkv7

        return wkv7(r, w, k, v, a, b, scale=scale, initial_state=initial_state,
                    output_final_state=output_final_state)  # fmt: skip

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = (
        f"fla.ops.rwkv7.{name} on scanopt.wkv7: all ``[B, T, H, K]`` (v ``[B, T, H, V]``), "
        "w the log decay. Returns ``(o, final_state or None)``."
    )
    return fn


def _fla_tree() -> dict[str, types.ModuleType]:
    r6 = {n: _make_rwkv6(n) for n in ("chunk_rwkv6", "fused_recurrent_rwkv6")}
    r7 = {n: _make_rwkv7(n) for n in ("chunk_rwkv7", "fused_recurrent_rwkv7")}
    return _tree(
        "fla",
        {
            "fla.ops.rwkv6": r6,
            "fla.ops.rwkv6.chunk": {"chunk_rwkv6": r6["chunk_rwkv6"]},
            "fla.ops.rwkv6.fused_recurrent": {"fused_recurrent_rwkv6": r6["fused_recurrent_rwkv6"]},
            "fla.ops.rwkv7": r7,
            "fla.ops.rwkv7.chunk": {"chunk_rwkv7": r7["chunk_rwkv7"]},
            "fla.ops.rwkv7.fused_recurrent": {"fused_recurrent_rwkv7": r7["fused_recurrent_rwkv7"]},
        },
    )


def as_fla() -> types.ModuleType:
    """An ``fla`` package object: ``fla.ops.rwkv6.chunk_rwkv6`` / ``fused_recurrent_rwkv6`` and
    ``fla.ops.rwkv7.chunk_rwkv7`` / ``fused_recurrent_rwkv7`` with fla's signatures."""
    return _fla_tree()["fla"]


def as_rwkvlm() -> types.ModuleType:
    """RWKV-LM's CUDA entry points on scanopt: ``RUN_CUDA_RWKV6(B, T, C, H, r, k, v, w, u)`` and
    ``RWKV7_CLAMPW_CUDA(r, w, k, v, a, b)`` (module ``rwkvlm_scanopt``; RWKV-LM defines these
    in its model file, so assign them there: ``model.RUN_CUDA_RWKV6 = shim.RUN_CUDA_RWKV6``)."""
    from scanopt.ops.wkv6.op import wkv6_rwkvlm
    from scanopt.ops.wkv7.op import wkv7_rwkvlm

    mod = types.ModuleType("rwkvlm_scanopt", "RWKV-LM kernel entry points on scanopt")
    mod.RUN_CUDA_RWKV6 = wkv6_rwkvlm
    mod.RWKV7_CLAMPW_CUDA = wkv7_rwkvlm
    return mod


# --------------------------------------------------------------------------------------------
# sys.modules aliases

_TREES = {"mamba_ssm": _mamba_tree, "causal_conv1d": _conv_tree, "fla": _fla_tree}


def install_aliases(*names: str, force: bool = False) -> list[str]:
    """Register scanopt-backed modules in ``sys.modules`` under upstream names (opt-in).

    Args:
        names: any of ``"mamba_ssm"``, ``"causal_conv1d"``, ``"fla"``; none means all three.
        force: replace modules already imported under those names (the real packages);
            without it that is a ``RuntimeError``.

    Returns:
        The dotted module names registered; :func:`uninstall_aliases` removes them again.
    """
    names = names or tuple(_TREES)
    unknown = [n for n in names if n not in _TREES]
    if unknown:
        raise ValueError(f"install_aliases: unknown names {unknown}; known: {sorted(_TREES)}")
    done = []
    for root in names:
        mods = _TREES[root]()
        for dotted in mods:
            cur = sys.modules.get(dotted)
            if cur is not None and not getattr(cur, "__scanopt_alias__", False) and not force:
                raise RuntimeError(
                    f"install_aliases: {dotted!r} is already imported (the real package?); "
                    "pass force=True to shadow it"
                )
        for dotted, mod in mods.items():
            _INSTALLED.setdefault(dotted, sys.modules.get(dotted, _MISSING))
            sys.modules[dotted] = mod
            done.append(dotted)
    return done


def uninstall_aliases() -> None:
    """Remove every alias :func:`install_aliases` registered, restoring what was there."""
    for dotted, old in _INSTALLED.items():
        if old is _MISSING:
            sys.modules.pop(dotted, None)
        else:
            sys.modules[dotted] = old
    _INSTALLED.clear()
