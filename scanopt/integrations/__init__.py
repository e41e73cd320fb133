"""Drop-in integrations: switch existing model code to scanopt's kernels.

- :func:`patch_transformers` / :func:`revert`: HuggingFace ``transformers`` Mamba, RWKV (v4) and
  attention (``attn_implementation="scanopt"``).
- :func:`as_mamba_ssm`, :func:`as_causal_conv1d`, :func:`as_fla`, :func:`as_rwkvlm`: module
  objects with the upstream names; :func:`install_aliases` registers them in ``sys.modules``
  (opt-in) so ``import mamba_ssm.ops.selective_scan_interface`` resolves to scanopt.

Nothing here imports ``transformers`` until a patch function is called.
"""

from scanopt.integrations.aliases import (
    as_causal_conv1d,
    as_fla,
    as_mamba_ssm,
    as_rwkvlm,
    install_aliases,
    uninstall_aliases,
)
from scanopt.integrations.mamba import mamba_inner_fn
from scanopt.integrations.transformers import PatchHandle, patch_transformers, revert

__all__ = [
    "PatchHandle",
    "as_causal_conv1d",
    "as_fla",
    "as_mamba_ssm",
    "as_rwkvlm",
    "install_aliases",
    "mamba_inner_fn",
    "patch_transformers",
    "revert",
    "uninstall_aliases",
]
