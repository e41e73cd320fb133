"""Per-GPU autotuning with Optuna and the config store (see DESIGN.md, "Autotuning").

Launchers take a ``config`` dict of every tunable (block sizes, warps, stages); the heuristic
``default_config`` of each launcher provides it until a tuned config exists, and
``resolve_config`` picks the tuned one when it does.

Run time (the hot path; never imports optuna)
    ``resolve_config(op, direction, dtype, shape, default, device=...)`` returns
    ``{**default, **tuned}`` from the user store (``$SCANOPT_CACHE_DIR/configs``), else the
    configs shipped in ``scanopt/configs/<GPU_SLUG>/``, else the nearest shape bucket (at most one
    octave away in one size), else
    ``default``. Keyed by GPU (name, capability, SM count), Triton version, op, direction,
    dtype and shape bucket (every size rounded up to a power of two). Cached per argument
    tuple, so after the first call it is a dict access. See ``scanopt.autotune.store``.

Tuning (``scanopt tune``; ``scanopt.autotune.tuner``)
    One Optuna study per (op, direction, dtype, shape bucket) on this GPU, stored in SQLite
    in the user cache (or any ``--storage`` URL, shared by workers on several GPUs/machines).
    Every trial is verified against the NumPy float64 reference before it is timed; wrong
    results, compile errors and out-of-resources are PRUNED trials; repeats come from a cache;
    small valid spaces are enumerated, larger ones sampled with multivariate TPE seeded with the
    heuristic default. ``scanopt configs export --shipped`` turns the user store into shipped
    package data.

How a kernel plugs in (``scanopt.autotune.api``; examples in ``scanopt.autotune.spaces``)
    A kernel is tunable when a ``Tunable`` describes it; register a builder in ``spaces.py``
    with ``@register("op")`` returning one ``Tunable`` per direction, or pass
    ``--op package.module:ATTR`` naming a ``Tunable`` (or a list of them) for out-of-tree
    kernels. A ``Tunable`` provides:

    - ``op``, ``direction`` (``"fwd"``/``"bwd"``), ``dims``: the named sizes that select a
      config (e.g. ``("B", "T", "H", "K", "V")``) -- the launcher passes the same names to
      ``resolve_config`` -- and ``exact``: those the nearest-bucket fallback must match;
    - ``space(shape, dtype, props) -> Space``: ``Space(params={name: choices}, constraint=
      callable(config, shape, props) -> bool)``; every name is a key of the launcher's config,
      ``props`` a ``DeviceProps`` (shared memory, registers, SM count of this GPU);
    - ``default(shape, dtype, props) -> dict``: the launcher's ``default_config``;
    - ``make_case(shape, dtype, device, seed) -> Case`` with ``run(config, index)`` (launch on
      input set ``index``; timed) and ``verify(config) -> scanopt.verify.Report`` (launch on
      poisoned outputs and compare with the reference and the same-dtype PyTorch baseline);
      ``spaces.standard_case`` builds one from ``make_inputs``/``launch``/``reference``/
      ``baseline`` functions;
    - ``example_shape``, ``bench_shapes`` (``--bench-shapes``) and ``test_shape`` (tiny, for
      the interpreter), and ``requires``: the op's module (absent ops are skipped).

    The launcher's side is one line: where it builds its config, use
    ``resolve_config("op", "fwd", x.dtype, {"T": T, ...}, default_config(...), device=x.device)``
    instead of ``default_config(...)`` when the caller passed no ``config``.
"""

from __future__ import annotations

from scanopt.autotune.store import resolve_config

__all__ = ["resolve_config"]
