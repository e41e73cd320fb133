"""Patch HuggingFace ``transformers`` model code to run on scanopt (``patch_transformers``).

What is patched (and restored by :func:`revert`):

- ``mamba``: ``transformers.models.mamba.modeling_mamba``'s kernel hooks, by layout:
  4.5x: the module globals ``selective_scan_fn``, ``mamba_inner_fn``, ``selective_state_update``,
  the causal-conv1d loader ``_lazy_load_causal_conv1d``, and ``MambaMixer.forward`` so the fused
  path (``cuda_kernels_forward``) runs on every device scanopt runs on, not only on CUDA (with
  ``model=`` only that model's mixers are redirected; the module globals are shared);
  5.0: the same, plus ``lazy_load_kernel`` (``MambaMixer.__init__`` re-resolves the globals
  through it); >= 5.1x: the hub-wrapped functions ``mamba_selective_scan``,
  ``mamba_selective_state_update``, ``mamba_inner_fn``, ``causal_conv1d_fn`` and
  ``causal_conv1d_update``, which ``MambaMixer.forward`` calls on every device (module-wide:
  every Mamba model, ``model=`` or not).
- ``rwkv``: ``transformers.models.rwkv.modeling_rwkv.rwkv_linear_attention`` -> ``scanopt.wkv4``.
- ``attention``: ``AttentionInterface.register("scanopt", ...)`` and the matching
  ``AttentionMaskInterface`` entry (SDPA-style masks), so ``attn_implementation="scanopt"``
  works; with ``model=`` the model is also switched to it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PatchHandle", "patch_transformers", "revert", "scanopt_attention_forward"]

_KNOWN_OPS = ("mamba", "rwkv", "attention")
_MISSING = object()
_ACTIVE: list[PatchHandle] = []


@dataclass
class PatchHandle:
    """What one :func:`patch_transformers` call changed; ``revert(handle)`` undoes it."""

    ops: tuple[str, ...]
    model: Any = None
    _undo: list[Any] = field(default_factory=list)
    _attn_before: Any = None
    active: bool = True

    def set(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, remembering what was there (own attribute or none)."""
        old = vars(obj).get(name, _MISSING)

        def undo() -> None:
            if old is not _MISSING:
                setattr(obj, name, old)
            elif name in vars(obj):
                delattr(obj, name)

        self._undo.append(undo)
        setattr(obj, name, value)

    def set_item(self, mapping: dict, key: str, value: Any) -> None:
        """``mapping[key] = value``, remembering the previous entry."""
        old = mapping.get(key, _MISSING)

        def undo() -> None:
            if old is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old

        self._undo.append(undo)
        mapping[key] = value

    def revert(self) -> None:
        """Restore everything this handle patched (idempotent)."""
        if not self.active:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if self.model is not None and self._attn_before is not None:
            _set_attn_implementation(self.model, self._attn_before)
        self.active = False
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "scanopt.integrations.patch_transformers needs transformers: "
            "pip install 'scanopt[hf]' (transformers>=4.45)"
        ) from e
    return transformers


def _version(transformers) -> str:
    return getattr(transformers, "__version__", "?")


# --------------------------------------------------------------------------------------------
# Mamba


def _causal_conv1d_pair():
    from scanopt.ops.causal_conv1d.op import causal_conv1d_fn, causal_conv1d_update

    return causal_conv1d_fn, causal_conv1d_update


def _mixer_forward(
    self, hidden_states, cache_params=None, cache_position=None, attention_mask=None
):
    """MambaMixer.forward that always takes the fused path (scanopt's kernels on any device)."""
    return self.cuda_kernels_forward(hidden_states, cache_params, cache_position, attention_mask)


# Keyword arguments that transformers' own kernel wrappers drop before calling mamba_ssm /
# causal-conv1d (they select among its PyTorch fallbacks), and those that must never be dropped
# (packed sequences: dropping them would mix sequences silently).
_HF_TORCH_ONLY_KWARGS = frozenset({"use_mambapy", "use_associative_scan"})
_HF_PACKED_KWARGS = ("cu_seqlens", "seq_idx")


def _hf_adapter(fn, hf_name: str):
    """``fn`` called the way transformers' ``use_kernel_func_from_hub_with_fallback`` calls the
    upstream kernel: keyword arguments ``fn`` does not take are dropped (HF passes its model
    ``**kwargs`` through), except packed-sequence metadata, which raises instead."""
    accepted = frozenset(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def adapter(*args, **kwargs):
        for name in _HF_PACKED_KWARGS:
            if kwargs.get(name) is not None and name not in accepted:
                raise ValueError(
                    f"{hf_name}: {name}= (packed sequences) is not supported by scanopt's "
                    f"{fn.__name__}; unpad the batch or leave the model unpatched"
                )
        return fn(*args, **{k: v for k, v in kwargs.items() if k in accepted})

    adapter.__scanopt_hf_adapter__ = fn
    return adapter


def _hf_mamba_ssm_namespace() -> types.SimpleNamespace:
    """What transformers 5.0's ``lazy_load_kernel("mamba-ssm")`` returns, backed by scanopt."""
    from scanopt.integrations.mamba import mamba_inner_fn
    from scanopt.ops.selective_scan.op import selective_scan_fn, selective_state_update

    return types.SimpleNamespace(
        selective_scan_fn=selective_scan_fn,
        selective_state_update=selective_state_update,
        mamba_inner_fn=mamba_inner_fn,
    )


def _hf_causal_conv1d_namespace() -> types.SimpleNamespace:
    conv_fn, conv_update = _causal_conv1d_pair()
    return types.SimpleNamespace(causal_conv1d_fn=conv_fn, causal_conv1d_update=conv_update)


def _lazy_load_kernel_hook(original):
    """transformers 5.0's ``lazy_load_kernel``, answering mamba-ssm / causal-conv1d with scanopt
    (``MambaMixer.__init__`` re-resolves its kernel globals through it for every new model)."""

    def lazy_load_kernel(kernel_name, *args, **kwargs):
        if kernel_name == "mamba-ssm":
            return _hf_mamba_ssm_namespace()
        if kernel_name == "causal-conv1d":
            return _hf_causal_conv1d_namespace()
        return original(kernel_name, *args, **kwargs)

    return lazy_load_kernel


# transformers >= 5.1x: module-level functions wrapped by ``use_kernel_func_from_hub_with_fallback``
# that ``MambaMixer.forward`` calls on every device; (module global, scanopt function, HF name).
def _hf_5x_hooks():
    from scanopt.integrations.mamba import mamba_inner_fn
    from scanopt.ops.selective_scan.op import selective_scan_fn, selective_state_update

    conv_fn, conv_update = _causal_conv1d_pair()
    return (
        ("mamba_selective_scan", selective_scan_fn, "selective_scan_fn"),
        ("mamba_selective_state_update", selective_state_update, "selective_state_update"),
        ("mamba_inner_fn", mamba_inner_fn, "mamba_inner_fn"),
        ("causal_conv1d_fn", conv_fn, "causal_conv1d_fn"),
        ("causal_conv1d_update", conv_update, "causal_conv1d_update"),
    )


def _patch_mamba(handle: PatchHandle, transformers, model) -> None:
    """Three layouts of ``modeling_mamba`` are known, told apart by what the module defines:
    4.5x (``_lazy_load_causal_conv1d`` + ``MambaMixer.cuda_kernels_forward``), 5.0
    (``lazy_load_kernel`` globals resolved in ``MambaMixer.__init__`` +
    ``cuda_kernels_forward``) and >= 5.1x (``mamba_selective_scan`` & co., hub wrappers the
    forward calls on every device)."""
    try:
        mm = importlib.import_module("transformers.models.mamba.modeling_mamba")
    except ImportError as e:
        raise RuntimeError(
            f"transformers {_version(transformers)} has no models.mamba.modeling_mamba"
        ) from e
    mixer = getattr(mm, "MambaMixer", None)
    if mixer is None:
        raise RuntimeError(
            f"transformers {_version(transformers)}: modeling_mamba has no MambaMixer"
        )

    if "mamba_selective_scan" in mm.__dict__:  # >= 5.1x
        hooks = _hf_5x_hooks()
        missing = [name for name, _, _ in hooks if name not in mm.__dict__]
        if missing:
            raise RuntimeError(
                f"transformers {_version(transformers)}: modeling_mamba lacks {missing}, so "
                "scanopt cannot hook HF Mamba on this version"
            )
        for name, fn, hf_name in hooks:
            handle.set(mm, name, _hf_adapter(fn, hf_name))
        return  # the forward already calls these globals on every device, for every model

    if not hasattr(mixer, "cuda_kernels_forward"):
        raise RuntimeError(
            f"transformers {_version(transformers)}: modeling_mamba has neither "
            "MambaMixer.cuda_kernels_forward (4.5x, 5.0) nor mamba_selective_scan (5.1x+), so "
            "scanopt cannot hook HF Mamba on this version; patch_transformers(ops=('rwkv', "
            "'attention')) still works"
        )
    ssm = _hf_mamba_ssm_namespace()
    conv = _hf_causal_conv1d_namespace()
    handle.set(mm, "selective_scan_fn", ssm.selective_scan_fn)
    handle.set(mm, "mamba_inner_fn", ssm.mamba_inner_fn)
    handle.set(mm, "selective_state_update", ssm.selective_state_update)
    hooked_conv = False
    if hasattr(mm, "_lazy_load_causal_conv1d"):  # 4.5x: returns (update, fn)
        handle.set(
            mm,
            "_lazy_load_causal_conv1d",
            lambda: (conv.causal_conv1d_update, conv.causal_conv1d_fn),
        )
        hooked_conv = True
    lazy_globals = "lazy_load_kernel" in mm.__dict__
    if lazy_globals:  # 5.0: MambaMixer.__init__ (re)creates the kernel globals through it
        handle.set(mm, "lazy_load_kernel", _lazy_load_kernel_hook(mm.lazy_load_kernel))
    for name in ("causal_conv1d_fn", "causal_conv1d_update"):
        if lazy_globals or name in mm.__dict__:  # versions that hold them as module globals
            handle.set(mm, name, getattr(conv, name))
            hooked_conv = True
    if not hooked_conv:
        raise RuntimeError(
            f"transformers {_version(transformers)}: modeling_mamba resolves causal_conv1d in a "
            "way scanopt does not know (no _lazy_load_causal_conv1d, no causal_conv1d_fn global)"
        )
    if model is None:
        handle.set(mixer, "forward", _mixer_forward)
    else:
        found = [m for m in model.modules() if isinstance(m, mixer)]
        for m in found:
            handle.set(m, "forward", types.MethodType(_mixer_forward, m))


# --------------------------------------------------------------------------------------------
# RWKV (v4)


def _rwkv_linear_attention(time_decay, time_first, key, value, state=None, return_state=False):
    """transformers' ``rwkv_linear_attention`` on scanopt's WKV-4."""
    from scanopt.ops.wkv4.op import wkv4

    return wkv4(time_decay, time_first, key, value, state=state, return_state=return_state)


def _patch_rwkv(handle: PatchHandle, transformers) -> None:
    try:
        mr = importlib.import_module("transformers.models.rwkv.modeling_rwkv")
    except ImportError as e:
        raise RuntimeError(
            f"transformers {_version(transformers)} has no models.rwkv.modeling_rwkv"
        ) from e
    if not hasattr(mr, "rwkv_linear_attention"):
        raise RuntimeError(
            f"transformers {_version(transformers)}: modeling_rwkv.rwkv_linear_attention is "
            "absent, so scanopt cannot hook HF RWKV on this version"
        )
    handle.set(mr, "rwkv_linear_attention", _rwkv_linear_attention)


# --------------------------------------------------------------------------------------------
# attention


def scanopt_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """An ``AttentionInterface`` function: query/key/value ``(B, H, L, D)`` -> ``(attn_output
    (B, L, H, D), None)``, computed by ``scanopt.scaled_dot_product_attention``. Masks that are
    not plain causal (padding) go through scanopt's exact fallback."""
    from scanopt.ops.attention.op import scaled_dot_product_attention

    if kwargs.get("output_attentions", False) or kwargs.get("head_mask") is not None:
        raise NotImplementedError(
            "attn_implementation='scanopt' returns no attention weights (output_attentions) "
            "and takes no head_mask; use 'eager' for those"
        )
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None
        is_causal = is_causal and getattr(module, "is_causal", True)
    out = scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=bool(is_causal),
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def _causal_skipping_mask(sdpa_mask):
    """transformers' SDPA mask function, returning ``None`` (-> the causal kernel) when the
    boolean mask it built is exactly the square causal mask. transformers 4.5x disables its own
    skip whenever ``position_ids`` are passed without an attention mask (packed-sequence
    detection), which would send every plain forward to the masked fallback. The check runs once
    per forward (masks are shared by the layers) and is skipped while compiling."""

    def mask_fn(*args, **kwargs):
        mask = sdpa_mask(*args, **kwargs)
        if (
            isinstance(mask, torch.Tensor)
            and mask.dtype == torch.bool
            and mask.dim() == 4
            and mask.shape[-1] == mask.shape[-2]
            and not torch.compiler.is_compiling()
        ):
            n = mask.shape[-1]
            tril = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
            if bool((mask == tril).all()):
                return None
        return mask

    return mask_fn


def _set_attn_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = name


def _patch_attention(handle: PatchHandle, transformers, model) -> None:
    interface = getattr(transformers, "AttentionInterface", None)
    if interface is None:
        try:
            interface = importlib.import_module("transformers.modeling_utils").AttentionInterface
        except (ImportError, AttributeError):
            interface = None
    if interface is None:
        raise RuntimeError(
            f"transformers {_version(transformers)} has no AttentionInterface; "
            "attn_implementation='scanopt' needs a transformers version that has it"
        )
    # register() writes the class-wide mapping; go through it so the entry can be restored
    handle.set_item(interface._global_mapping, "scanopt", scanopt_attention_forward)
    try:
        mu = importlib.import_module("transformers.masking_utils")
        mask_interface = getattr(mu, "AttentionMaskInterface", None)
    except ImportError:
        mask_interface = None
    if mask_interface is not None:
        mmap = mask_interface._global_mapping
        sdpa_mask = mmap.get("sdpa", getattr(mu, "sdpa_mask", None))
        handle.set_item(mmap, "scanopt", _causal_skipping_mask(sdpa_mask))
    if model is not None:
        handle._attn_before = getattr(model.config, "_attn_implementation", None) or "eager"
        _set_attn_implementation(model, "scanopt")


# --------------------------------------------------------------------------------------------
# public API


def patch_transformers(model: Any = None, ops: tuple[str, ...] = _KNOWN_OPS) -> PatchHandle:
    """Route HF ``transformers`` models to scanopt's kernels.

    Args:
        model: ``None`` patches the classes and module functions (every model of the process);
            a model instance limits the Mamba forward redirection to its mixers and switches an
            attention model to ``attn_implementation="scanopt"``.
        ops: any of ``"mamba"``, ``"rwkv"``, ``"attention"``.

    Returns:
        A :class:`PatchHandle` (also a context manager); ``revert(handle)`` restores the
        originals. Raises ``RuntimeError`` naming the transformers version when a hook is absent.

    Example::

        handle = scanopt.integrations.patch_transformers(model)
        logits = model(input_ids).logits          # scanopt kernels
        scanopt.integrations.revert(handle)
    """
    if isinstance(ops, str):
        ops = (ops,)
    unknown = [o for o in ops if o not in _KNOWN_OPS]
    if unknown:
        raise ValueError(f"ops must be a subset of {_KNOWN_OPS}, got unknown {unknown}")
    transformers = _import_transformers()
    handle = PatchHandle(ops=tuple(ops), model=model)
    try:
        if "mamba" in ops:
            _patch_mamba(handle, transformers, model)
        if "rwkv" in ops:
            _patch_rwkv(handle, transformers)
        if "attention" in ops:
            _patch_attention(handle, transformers, model)
    except BaseException:
        handle.revert()
        raise
    _ACTIVE.append(handle)
    return handle


def revert(handle: PatchHandle | None = None) -> None:
    """Undo ``handle``'s patches, or every active patch (newest first) when ``None``."""
    if handle is not None:
        handle.revert()
        return
    for h in reversed(list(_ACTIVE)):
        h.revert()
