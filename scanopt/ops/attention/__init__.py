"""Flash attention (FlashAttention-2 algorithm) in Triton: forward, deterministic backward,
causal (both alignments), sliding window, softcap, GQA/MQA, any length and head dims up to 256.

``kernels.py`` holds the ``@triton.jit`` kernels, ``launch.py`` allocation, grids and the
heuristic ``default_config``, ``op.py`` the ``torch.library`` ops, the PyTorch path, the two
public drop-ins (``flash_attn_func``, ``scaled_dot_product_attention``) and ``self_check``.
"""
