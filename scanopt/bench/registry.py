"""Cases, providers and op suites: what ``scanopt bench`` sweeps, declared as data.

- A :class:`Case` is one op at one shape and dtype (``shape`` is its printable key).
- A :class:`Provider` is one implementation of an op (scanopt, the PyTorch path, an SDPA backend,
  mamba_ssm, fla, flash_attn, RWKV-LM). ``load()`` imports it lazily and returns an :class:`Impl`
  or raises :class:`Unavailable` with the reason printed as a note. ``adapt`` maps the op's
  canonical inputs to the provider's own layout with differentiable torch ops (run once, untimed;
  autograd maps the gradients back for verification); ``outputs`` maps its result back to the
  canonical output names.
- A :class:`Suite` is one op: its sweep (default shapes mirror ANCHORS.md: batch 4, d_model 2048),
  input distributions, tensor specs (for the byte formula), FLOP formula, references and
  providers. ``SUITES`` lists them; ``get_suite(name)`` imports one.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from scanopt.bench.formulas import DIRECTIONS, TensorSpec, io_bytes

#: dtype aliases accepted on the command line -> torch dtype names
DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float": "float32",
    "float32": "float32",
}

#: op name -> module defining ``SUITE``
SUITES: dict[str, str] = {
    "attention": "scanopt.bench.suites.attention",
    "attention_nc": "scanopt.bench.suites.attention",
    "attention_h32": "scanopt.bench.suites.attention",
    "attention_h32_nc": "scanopt.bench.suites.attention",
    "selective_scan": "scanopt.bench.suites.mamba",
    "ssd": "scanopt.bench.suites.mamba",
    "state_update": "scanopt.bench.suites.mamba",
    "wkv4": "scanopt.bench.suites.wkv",
    "wkv6": "scanopt.bench.suites.wkv",
    "wkv7": "scanopt.bench.suites.wkv",
}


def dtype_name(alias: str) -> str:
    """Canonical dtype name (``bfloat16``, ``float16``, ``float32``) of a command-line alias."""
    try:
        return DTYPE_ALIASES[alias.strip().lower()]
    except KeyError:
        known = ", ".join(sorted(DTYPE_ALIASES))
        raise ValueError(f"unknown dtype {alias!r}; use one of {known}") from None


def torch_dtype(name: str):
    import torch

    return getattr(torch, dtype_name(name))


@dataclass(frozen=True)
class Case:
    """One op at one shape (``dims``, in display order) and dtype."""

    op: str
    dims: tuple[tuple[str, Any], ...]
    dtype: str

    def __getitem__(self, key: str) -> Any:
        return dict(self.dims)[key]

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.dims).get(key, default)

    @property
    def shape(self) -> str:
        """``"B=4 H=16 L=1024 D=128 causal=1"``: the CSV's shape column."""
        return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.dims)

    def with_dtype(self, dtype: str) -> Case:
        return Case(self.op, self.dims, dtype)


class Unavailable(Exception):
    """A provider cannot run in this process; the message (a note in the output) says why."""


@dataclass
class Impl:
    """A loaded provider: ``run(native_inputs, case) -> result``, timed as is, inside
    ``context()`` (e.g. an SDPA backend or ``SCANOPT_BACKEND=torch``)."""

    run: Callable[[Any, Case], Any]
    context: Callable[[], AbstractContextManager] = nullcontext
    detail: str = ""


def _identity(x: dict, case: Case) -> dict:
    return x


def first_as_out(result: Any, native: Any, case: Case) -> dict:
    """The result (or its first element, for ``(out, state)`` returns) as ``{"out": ...}``."""
    if isinstance(result, (tuple, list)):
        result = result[0]
    return {"out": result}


def _always(case: Case) -> str | None:
    return None


@dataclass
class Provider:
    """One implementation of an op (see the module docstring)."""

    name: str
    description: str
    load: Callable[[], Impl]
    adapt: Callable[[dict, Case], Any] = _identity
    outputs: Callable[[Any, Any, Case], dict] = first_as_out
    supports: Callable[[Case], str | None] = _always
    #: bytes of device memory one forward+backward needs beyond the inputs (None: small)
    memory: Callable[[Case], int] | None = None
    _impl: Impl | None = field(default=None, repr=False)
    _error: str | None = field(default=None, repr=False)

    def resolve(self) -> Impl:
        """Load once per process; raise :class:`Unavailable` (with the cached reason) if it fails."""
        if self._impl is not None:
            return self._impl
        if self._error is not None:
            raise Unavailable(self._error)
        try:
            self._impl = self.load()
        except Unavailable as e:
            self._error = str(e)
        except (ImportError, AttributeError, RuntimeError, OSError) as e:
            self._error = f"{type(e).__name__}: {first_line(e)}"
        if self._impl is None:
            raise Unavailable(self._error)
        return self._impl


def first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextmanager
def backend_env(value: str) -> Iterator[None]:
    """Set ``SCANOPT_BACKEND`` for the duration (scanopt reads it on every call)."""
    old = os.environ.get("SCANOPT_BACKEND")
    os.environ["SCANOPT_BACKEND"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SCANOPT_BACKEND", None)
        else:
            os.environ["SCANOPT_BACKEND"] = old


def scanopt_function(name: str) -> Callable:
    """``scanopt.<name>``, or :class:`Unavailable` when that op is not in this installation."""
    import scanopt

    try:
        return getattr(scanopt, name)
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"scanopt.{name} is not importable ({first_line(e)})") from None


#: longest sequence the Python-loop PyTorch paths are run at (they are slow and memory-hungry)
TORCH_LOOP_MAX_L = 2048


class Suite:
    """One benchmarked op. Subclasses fill in the class attributes and the abstract methods."""

    name: str = ""
    title: str = ""
    #: "tflops" (compute-bound: attention) or "gbps" (memory-bound: the scans)
    metric: str = "gbps"
    directions: tuple[str, ...] = DIRECTIONS
    #: canonical inputs that receive gradients (empty: forward only)
    grad_names: tuple[str, ...] = ()
    #: canonical outputs compared against the reference (the backward seeds the first ones)
    output_names: tuple[str, ...] = ("out",)
    #: outputs that the backward is seeded from (a random cotangent each)
    grad_outputs: tuple[str, ...] = ("out",)
    #: the swept dimension and its values
    sweep_key: str = "L"
    default_sweep: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    quick_sweep: tuple[int, ...] = (1024, 4096)
    default_dtypes: tuple[str, ...] = ("bfloat16",)
    #: forward timed with CUDA graphs by default (microsecond launches)
    cudagraph: bool = False
    #: reference order: "numpy" (scanopt.reference, when numpy_ok), "torch64" (float64 PyTorch on
    #: the device), "trusted" (the first provider of ``trusted`` that runs, in float32)
    reference_order: tuple[str, ...] = ("numpy", "torch64", "trusted")
    trusted: tuple[str, ...] = ()

    def dims(self, value: int) -> tuple[tuple[str, Any], ...]:
        """The full dims of one sweep point."""
        raise NotImplementedError

    def cases(
        self, values: Sequence[int] | None = None, dtypes: Sequence[str] | None = None
    ) -> list[Case]:
        values = self.default_sweep if values is None else values
        dtypes = self.default_dtypes if dtypes is None else dtypes
        return [Case(self.name, self.dims(v), dtype_name(dt)) for dt in dtypes for v in values]

    def specs(self, case: Case) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        """(inputs, outputs): every tensor read and written, with shapes and dtypes."""
        raise NotImplementedError

    def make_inputs(self, case: Case, device: Any, gen: Any) -> dict:
        """Canonical input tensors on ``device`` (fresh random values from ``gen``)."""
        raise NotImplementedError

    def flops(self, case: Case, direction: str) -> float | None:
        return None

    def nbytes(self, case: Case, direction: str) -> int:
        inputs, outputs = self.specs(case)
        return io_bytes(inputs, outputs, self.grad_names, direction)

    def numpy_ok(self, case: Case) -> bool:
        """Whether the NumPy reference is cheap enough at this shape."""
        return False

    def numpy_reference(self, case: Case, x: dict, douts: dict | None) -> tuple[dict, dict]:
        """(outputs, grads) from ``scanopt.reference`` on float64 NumPy inputs."""
        raise NotImplementedError

    def torch64_reference(self, case: Case, x: dict, douts: dict | None) -> tuple[dict, dict]:
        """(outputs, grads) computed in float64 with PyTorch on the inputs' device."""
        raise NotImplementedError

    def providers(self) -> list[Provider]:
        raise NotImplementedError


def get_suite(name: str) -> Suite:
    """The suite of op ``name`` (imports its module)."""
    if name not in SUITES:
        raise ValueError(f"unknown op {name!r}; known: {', '.join(SUITES)}")
    module = importlib.import_module(SUITES[name])
    return module.SUITES[name]
