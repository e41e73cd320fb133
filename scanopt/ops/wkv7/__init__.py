"""RWKV-7 WKV (the generalized delta rule with a diagonal-plus-rank-1 transition), fla's
``chunk_rwkv7`` contract: ``[B, T, H, K]`` inputs, ``w`` the log decay, fp32 state ``[B, H, K, V]``.

``kernels.py`` holds the Triton kernels, ``launch.py`` allocates and launches them, ``op.py``
registers the ``torch.library`` ops and defines :func:`scanopt.wkv7`.
"""
