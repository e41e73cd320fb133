"""Eager-mode fast path around the ``torch.library`` custom ops.

A call through ``torch.ops.scanopt.<op>`` in eager mode pays the dispatcher, the generated
autograd wrapper, ``fill_defaults`` and a redispatch (tens of microseconds per op). Outside
``torch.compile`` the public functions instead call :func:`apply`, which runs the *same*
implementation functions the custom ops wrap, through a plain ``torch.autograd.Function`` (or
directly when no gradient is needed). Results are bit-identical: same launchers, same
``setup_context``/``backward`` as registered with ``register_autograd`` (default gradient
materialization, like the generated wrapper). Under ``torch.compile`` the public functions keep
calling the custom ops, so tracing sees opaque ops with fake kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: tensor types the bypass takes: plain tensors and model parameters (``nn.Parameter`` only
#: disables ``__torch_function__``; D, dt_bias, time_decay, ... are parameters in real models)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*args: Any) -> bool:
    """True when the custom-op dispatch may be bypassed: not tracing (``torch.compile``,
    ``make_fx``, ``opcheck``: no dispatch mode active) and every tensor argument a plain
    ``torch.Tensor`` or ``nn.Parameter`` (no FakeTensor, FunctionalTensor or other subclass)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


def make_function(
    name: str,
    impl: Callable[..., Any],
    setup_context: Callable[[Any, tuple, Any], None],
    backward: Callable[..., tuple],
) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` running ``impl(*args)`` forward, ``setup_context`` as
    registered with ``register_autograd``, and ``backward`` (the registered backward, calling
    the backward implementation directly instead of through its custom op)."""

    def forward(ctx: Any, *args: Any) -> Any:
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    return type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


def needs_grad(*args: Any) -> bool:
    """True when autograd would record a call on ``args``: grad mode on and some tensor
    argument requires a gradient."""
    if torch.is_grad_enabled():
        for a in args:
            if isinstance(a, torch.Tensor) and a.requires_grad:
                return True
    return False


def apply(fn: type[torch.autograd.Function], impl: Callable[..., Any], *args: Any) -> Any:
    """``impl(*args)`` directly when no tensor argument needs a gradient, else ``fn.apply``."""
    return fn.apply(*args) if needs_grad(*args) else impl(*args)
