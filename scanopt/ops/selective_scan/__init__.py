"""Mamba-1 selective scan (``selective_scan_fn``) and its decode step (``selective_state_update``).

- ``kernels.py``: the Triton kernels (chunked scan forward, checkpointed backward, decode step).
- ``launch.py``: allocation, grid and the heuristic launch configs; no autograd.
- ``op.py``: the PyTorch implementation, the ``scanopt::`` custom ops with fake and autograd
  registrations, the public functions and ``self_check``.
"""
