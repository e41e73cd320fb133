"""Per-GPU autotuning with Optuna and the config store (see DESIGN.md, "Autotuning").

Launchers take a ``config`` dict of every tunable (block sizes, warps, stages); until tuned
configs ship, each launcher's ``default_config`` heuristic provides it.
"""
