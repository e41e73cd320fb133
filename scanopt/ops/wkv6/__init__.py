"""RWKV-6 WKV (data-dependent diagonal decay with a current-token bonus ``u``), fla's
``chunk_rwkv6`` contract: ``[B, T, H, K]`` inputs, ``w`` the log decay, fp32 state ``[B, H, K, V]``.

``kernels.py`` holds the Triton kernels, ``launch.py`` allocates and launches them, ``op.py``
registers the ``torch.library`` ops and defines :func:`scanopt.wkv6`.
"""
