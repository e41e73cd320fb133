"""#8's tuning evidence for one kernel: the exhaustive grid's best against what TPE finds within
25% of the grid's evaluations, on this GPU, as a row for ``bench/results/<GPU>/tuning.md``.
Not part of the package.

    PYTHONPATH=$PWD python bench/tune_evidence.py --op selective_scan --direction bwd \
        [--shape batch=4,dim=2048,L=4096,N=16,atomic=1] [--seeds 0,1,2] [--max-points 400]

Runs, in one process and one throw-away SQLite store (nothing goes to the config store):
1. a ``grid`` study over every valid point of the space (refused above ``--max-points``: the
   larger spaces need a coarser grid first);
2. one ``tpe`` study per seed with a budget of ``ceil(0.25 * points)`` distinct configs;
then prints the grid's best, each TPE study's best and its ratio to the grid's (target >= 0.97),
and the default's time. Every config is verified against the reference before it is timed (the
tuner's rule). The studies time configs at different moments, so ratios within ~1-2% of 1.0 are
within the run-to-run noise; the row says so.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import tempfile


def _parse_shape(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}


def valid_points(op: str, direction: str, shape: dict[str, int] | None) -> int:
    """Valid points of the kernel's space at ``shape`` on this machine's device."""
    from scanopt.autotune.device import device_props
    from scanopt.autotune.tuner import _setup_worker_env, load_tunable, resolve_space

    _, _, dev = _setup_worker_env()
    props = device_props(dev)
    tunable = load_tunable(op, direction)
    full = tunable.full_shape(shape)
    space, _, _ = resolve_space(tunable, full, "bfloat16", props)
    names = list(space.params)
    n = 0
    for combo in itertools.product(*space.params.values()):
        c = dict(zip(names, combo, strict=True))
        if space.constraint is None or space.constraint(c, full, props):
            n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", required=True)
    p.add_argument("--direction", choices=("fwd", "bwd"), required=True)
    p.add_argument("--shape", help="name=value pairs (default: the op's example shape)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-points", type=int, default=400)
    p.add_argument("--timeout", type=float, default=None, help="seconds per study")
    a = p.parse_args()
    from scanopt.autotune.tuner import tune

    shape = _parse_shape(a.shape)
    n = valid_points(a.op, a.direction, shape)
    if n > a.max_points:
        raise SystemExit(f"{n} valid points > --max-points {a.max_points}: no exhaustive grid")
    budget = math.ceil(0.25 * n)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/evidence.db"
        common = dict(shape=shape, storage=url, save=False, rebench=0, progress=False,
                      timeout=a.timeout)  # fmt: skip
        grid = tune(a.op, a.direction, sampler="grid", trials=n, study_name="grid", **common)
        tpe = [
            tune(
                a.op,
                a.direction,
                sampler="tpe",
                trials=budget,
                seed=int(s),
                study_name=f"tpe-{s}",
                **common,
            )  # fmt: skip
            for s in a.seeds.split(",")
        ]
    print(f"# {a.op}.{a.direction} {grid.dtype} {grid.shape}: {n} valid points, grid evaluated "
          f"{grid.evaluated} ({grid.statuses})")  # fmt: skip
    if grid.evaluated < n:
        print(f"WARNING: the grid ran {grid.evaluated} of {n} points (timeout?): not exhaustive")
    print(f"grid best {grid.best_ms:.4f} ms {grid.best_config}; default {grid.default_ms} ms")
    ratios = []
    for r in tpe:
        ratio = grid.best_ms / r.best_ms if r.best_ms else float("nan")
        ratios.append(ratio)
        print(f"tpe seed {r.study}: {r.evaluated} evaluated, best {r.best_ms:.4f} ms "
              f"({ratio:.3f} of the grid's best) {r.best_config}")  # fmt: skip
    date = datetime.date.today().isoformat()
    speed = f"{grid.default_ms / grid.best_ms:.2f}x" if grid.default_ms else "-"
    print(f"| {date} | {a.op}.{a.direction} | {grid.dtype} | "
          f"{','.join(f'{k}={v}' for k, v in grid.shape.items())} | grid {n} points: "
          f"{grid.best_ms:.4f} ms | TPE {budget} trials x {len(tpe)} seeds: "
          f"{', '.join(f'{x:.3f}' for x in ratios)} of the grid's best (noise ~1-2%) | "
          f"default {grid.default_ms or float('nan'):.4f} ms, grid best {speed} |")  # fmt: skip


if __name__ == "__main__":
    main()
