"""Work-arounds for Triton versions scanopt supports; each says which version needs it."""

from __future__ import annotations

from scanopt._env import interpreting


def ensure_interpreter_compat() -> None:
    """Make ``range(0, T)`` over a runtime ``T`` work in Triton's interpreter with NumPy >= 2.3.

    The interpreter (triton 3.6) stores scalar kernel arguments as 1-element 1-D arrays and
    converts loop bounds with ``int(array)``, which NumPy 2.3+ rejects ("only 0-dimensional
    arrays can be converted to Python scalars"). This wraps the interpreter's tensor patch so
    ``__index__`` reads the single element. Applied only when ``TRITON_INTERPRET=1``, once, at
    the first launch; it changes nothing on GPUs.
    """
    if not interpreting():
        return
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor
    if getattr(original, "_scanopt_compat", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._scanopt_compat = True  # type: ignore[attr-defined]
    interp._patch_lang_tensor = _patch_lang_tensor
