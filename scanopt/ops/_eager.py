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


def eager() -> bool:
    """True when the custom-op dispatch may be bypassed (not tracing under torch.compile)."""
    return not torch.compiler.is_compiling()


def make_function(
    name: str,
    impl: Callable[..., Any],
    setup_context: Callable[[Any, tuple, Any], None],
    backward: Callable[..., tuple],
) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` running ``impl(*args)`` forward and ``backward`` (the
    function given to ``register_autograd``) backward."""

    def forward(ctx: Any, *args: Any) -> Any:
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    return type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


def apply(fn: type[torch.autograd.Function], impl: Callable[..., Any], *args: Any) -> Any:
    """``impl(*args)`` directly when no tensor argument needs a gradient, else ``fn.apply``."""
    if torch.is_grad_enabled():
        for a in args:
            if isinstance(a, torch.Tensor) and a.requires_grad:
                return fn.apply(*args)
    return impl(*args)
