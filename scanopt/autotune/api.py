"""The contract between a tunable kernel and the tuner: ``Space``, ``Tunable`` and ``Case``.

A kernel (one op, one direction) becomes tunable by a ``Tunable`` in ``scanopt/autotune/spaces.py``
(the op's own files stay untouched): its shape dims, its search space, its launcher's heuristic
default and a ``make_case`` that builds inputs, launches a config and verifies the result. See the
package docstring (``scanopt.autotune``) for the full description.

Light on imports: the config store (the hot path) imports ``bucket`` from here.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scanopt.autotune.device import DeviceProps

Shape = Mapping[str, int]
Config = dict[str, Any]
Constraint = Callable[[Config, Shape, DeviceProps], bool]


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def bucket(shape: Shape) -> dict[str, int]:
    """The shape bucket a config is stored under: every size rounded UP to a power of two.

    ``L=1000`` and ``L=1024`` share bucket 1024; ``L=1025`` is in bucket 2048. Rounding up means
    the bucket's representative is its most demanding shape, so a config tuned (and
    constraint-checked) there fits every shape of the bucket. 0 and 1 stay themselves (flags
    such as ``causal`` are dims too).
    """
    return {name: int(v) if int(v) <= 1 else next_pow2(int(v)) for name, v in shape.items()}


def bucket_str(shape: Shape) -> str:
    """``"L=1024,dim=2048"`` in the shape's own key order."""
    return ",".join(f"{k}={v}" for k, v in shape.items())


def config_key(config: Mapping[str, Any]) -> str:
    """A canonical string for a config (the tuner's memo key)."""
    return json.dumps(dict(config), sort_keys=True, default=str)


def _sort_choices(values: Sequence[Any]) -> tuple[Any, ...]:
    unique = list(dict.fromkeys(values))
    try:
        return tuple(sorted(unique))
    except TypeError:
        return tuple(unique)


@dataclass(frozen=True)
class Space:
    """A declarative search space: ordered choices per tunable and a validity constraint.

    ``params`` maps each tunable (a key of the launcher's config dict) to its choices, ordered
    (the samplers treat the index as ordinal, so keep sizes ascending). ``constraint(config,
    shape, device_props) -> bool`` rejects impossible points (e.g. shared memory or registers
    over the device's budget) before anything is compiled; ``None`` accepts every point.
    """

    params: Mapping[str, Sequence[Any]]
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        fixed = {}
        for name, choices in self.params.items():
            values = tuple(choices)
            if not values:
                raise ValueError(f"search space parameter {name!r} has no choices")
            fixed[name] = values
        object.__setattr__(self, "params", fixed)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.params)

    def size(self) -> int:
        """Number of points of the Cartesian product (before the constraint)."""
        return math.prod(len(c) for c in self.params.values())

    def points(self) -> Iterator[Config]:
        """Every point of the Cartesian product, in order."""
        names = self.names
        for values in itertools.product(*self.params.values()):
            yield dict(zip(names, values, strict=True))

    def contains(self, config: Mapping[str, Any]) -> bool:
        """True when ``config`` sets every tunable to one of its choices."""
        return all(name in config and config[name] in ch for name, ch in self.params.items())

    def allows(self, config: Mapping[str, Any], shape: Shape, props: DeviceProps) -> bool:
        """In the space and accepted by the constraint."""
        if not self.contains(config):
            return False
        return self.constraint is None or bool(self.constraint(dict(config), shape, props))

    def valid_points(
        self, shape: Shape, props: DeviceProps, limit: int | None = None
    ) -> list[Config] | None:
        """The points the constraint accepts; ``None`` when the product exceeds ``limit``."""
        if limit is not None and self.size() > limit:
            return None
        return [p for p in self.points() if self.allows(p, shape, props)]

    def including(self, config: Mapping[str, Any]) -> Space:
        """This space with ``config``'s values added to the choices (the heuristic default must
        be a point of the space so the study can start from it)."""
        params = {
            name: _sort_choices([*choices, config[name]]) if name in config else choices
            for name, choices in self.params.items()
        }
        return Space(params, self.constraint)

    def project(self, config: Mapping[str, Any]) -> Config:
        """The tunables of ``config`` (drops launcher keys the space does not tune)."""
        return {name: config[name] for name in self.params if name in config}

    # Optuna encoding: each tunable is an ordinal integer index into its choices.
    def encode(self, config: Mapping[str, Any]) -> dict[str, int]:
        """Optuna parameters (choice indices) of a config in the space."""
        return {name: list(ch).index(config[name]) for name, ch in self.params.items()}

    def decode(self, params: Mapping[str, int]) -> Config:
        """The config of Optuna parameters (choice indices)."""
        return {name: ch[int(params[name])] for name, ch in self.params.items()}

    def suggest(self, trial: Any) -> Config:
        """Ask an Optuna trial for one point (``suggest_int`` over each choice index)."""
        return self.decode(
            {name: trial.suggest_int(name, 0, len(ch) - 1) for name, ch in self.params.items()}
        )

    def describe(self) -> dict[str, list[Any]]:
        return {name: list(ch) for name, ch in self.params.items()}

    def digest(self) -> str:
        """A short hash of the choices and the constraint's source (recorded with each result)."""
        try:
            src = inspect.getsource(self.constraint) if self.constraint else ""
        except (OSError, TypeError):
            src = getattr(self.constraint, "__qualname__", repr(self.constraint))
        text = json.dumps(self.describe(), sort_keys=True, default=str) + src
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Case:
    """One tuning problem: inputs at one shape, ready to launch any config of the space.

    - ``run(config, index)`` launches the kernel(s) with ``config`` on input set
      ``index % n_inputs`` and returns the outputs. This is what is timed, so it does no
      allocation of inputs, no verification and no synchronisation.
    - ``verify(config)`` launches ``config`` on fresh outputs (the tuner sets
      ``SCANOPT_POISON=1`` around it) and returns a ``scanopt.verify.Report`` against the NumPy
      float64 reference, with the same-dtype PyTorch baseline. A report that did not pass
      rejects the config before it is ever timed.
    """

    run: Callable[[Config, int], Any]
    verify: Callable[[Config], Any]
    n_inputs: int = 1
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tunable:
    """One kernel (op, direction) that the tuner can tune. See ``scanopt.autotune``.

    - ``dims``: the shape's named sizes, in the order ``--shape 4x2048x...`` gives them; the
      launcher passes the same names to ``resolve_config``.
    - ``exact``: dims whose bucket must match for the store's nearest-bucket fallback (head
      dims, state sizes: they change register and shared-memory use); the others (lengths,
      batch) may come from the nearest bucket.
    - ``space(shape, dtype, props) -> Space``; ``default(shape, dtype, props) -> dict`` the
      launcher's heuristic; ``make_case(shape, dtype, device, seed) -> Case``. ``dtype`` is a
      name (``"bfloat16"``) in ``space``/``default`` and a ``torch.dtype`` in ``make_case``.
    - ``example_shape``: the default ``--shape``; ``bench_shapes``: the anchor-width shapes of
      ``--bench-shapes``; ``test_shape``: a tiny shape that runs in seconds under Triton's
      interpreter.
    - ``requires``: a module that must import for this kernel to exist (the op's launcher);
      ops not written yet are skipped.
    """

    op: str
    direction: str
    dims: tuple[str, ...]
    space: Callable[[Shape, str, DeviceProps], Space]
    default: Callable[[Shape, str, DeviceProps], Config]
    make_case: Callable[..., Case]
    example_shape: Mapping[str, int]
    bench_shapes: tuple[Mapping[str, int], ...] = ()
    test_shape: Mapping[str, int] | None = None
    exact: tuple[str, ...] = ()
    requires: str | None = None
    description: str = ""

    @property
    def name(self) -> str:
        return f"{self.op}.{self.direction}"

    def full_shape(self, partial: Mapping[str, int] | None = None) -> dict[str, int]:
        """``example_shape`` updated with ``partial``; unknown names are an error."""
        shape = {d: int(self.example_shape[d]) for d in self.dims}
        for k, v in (partial or {}).items():
            if k not in shape:
                raise ValueError(
                    f"{self.name}: unknown shape dim {k!r}; dims are {', '.join(self.dims)}"
                )
            shape[k] = int(v)
        return shape

    def parse_shape(self, text: str) -> dict[str, int]:
        """``"L=4096,dim=1024"`` (missing dims from ``example_shape``) or ``"4x2048x4096x16"``
        (every dim, in ``dims`` order)."""
        text = text.strip()
        if "=" in text:
            parts = {}
            for item in filter(None, (p.strip() for p in text.split(","))):
                name, _, value = item.partition("=")
                parts[name.strip()] = int(value)
            return self.full_shape(parts)
        values = [int(v) for v in text.lower().replace(",", "x").split("x") if v]
        if len(values) != len(self.dims):
            raise ValueError(
                f"{self.name}: shape {text!r} has {len(values)} sizes, expected "
                f"{len(self.dims)} ({'x'.join(self.dims)}) or name=value pairs"
            )
        return dict(zip(self.dims, values, strict=True))
