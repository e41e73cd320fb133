"""RWKV-4 WKV (``scanopt.wkv4``): Triton kernels parallel over time, launchers, torch.library ops."""
