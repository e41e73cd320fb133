"""The JSON config store and ``resolve_config``, the only part of autotuning on the hot path.

Layout: ``<root>/<GPU_SLUG>/<op>.json``, one file per GPU model and op, where ``<root>`` is

- the user store ``scanopt._env.cache_dir() / "configs"`` (written by ``scanopt tune`` and
  ``scanopt configs import``), and
- the shipped store, package data ``scanopt/configs/`` read through ``importlib.resources``
  (written by ``scanopt configs export --shipped``).

A file is ``{"schema": 1, "entries": [entry, ...]}``; an entry is keyed by

- ``gpu``: ``{"name", "capability": "major.minor", "sm_count"}`` (all three must match),
- ``triton``: the Triton version it was tuned with (must match; others are ignored, logged once),
- ``op``, ``direction`` (``fwd``/``bwd``), ``dtype`` (``bfloat16``...),
- ``bucket``: the shape bucket, every size rounded up to a power of two (``api.bucket``), and
  ``exact``: the dims that the nearest-bucket fallback must match,

and holds ``config`` (the tuned parameters only; the launcher's default fills the rest) and
``meta`` (times, speedup over the default, error, study, versions, date: recorded, not keyed).

Lookup order (``resolve_config``): exact bucket in the user store, then in the shipped store,
then the nearest bucket (user before shipped; distance = sum of |log2| differences over the
non-exact dims, at most ``MAX_NEAREST_DISTANCE``: one octave), then the launcher's heuristic
default. The first call for a given (op,
direction, dtype, shape, device) reads the files; later calls are one dict access.
Never imports optuna.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.resources
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from scanopt.autotune.api import bucket
from scanopt.autotune.device import DeviceProps, device_props

log = logging.getLogger("scanopt.autotune")

SCHEMA = 1
#: the package whose ``configs/`` folder holds the shipped configs (tests point it elsewhere)
SHIPPED_PACKAGE = "scanopt"

_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
}

_RESOLVED: dict[tuple, dict[str, Any] | None] = {}
_FILES: dict[tuple[str, str], list[dict[str, Any]]] = {}
_LOGGED: set[tuple] = set()


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16``, ``"bf16"`` or ``"bfloat16"`` -> ``"bfloat16"``."""
    name = str(dtype).replace("torch.", "").strip().lower()
    return _DTYPE_ALIASES.get(name, name)


def triton_version() -> str:
    """The installed Triton's version (``"none"`` without Triton)."""
    try:
        import triton
    except ImportError:
        return "none"
    return str(triton.__version__)


def user_root() -> Path:
    """The user store: ``$SCANOPT_CACHE_DIR/configs`` (default ``~/.cache/scanopt/configs``)."""
    from scanopt._env import cache_dir

    return cache_dir() / "configs"


def shipped_root() -> Any:
    """The shipped store, a ``Traversable`` of ``scanopt/configs`` (package data)."""
    return importlib.resources.files(SHIPPED_PACKAGE).joinpath("configs")


def shipped_dir() -> Path:
    """The shipped store as a writable path (for ``export --shipped`` in a source checkout)."""
    return Path(str(shipped_root()))


#: the launchers' own caches of resolved launch configs (``register_launch_cache``)
_LAUNCH_CACHES: list[dict] = []


def register_launch_cache(cache: dict) -> dict:
    """Have :func:`clear_cache` also empty ``cache`` (a launcher's per-shape config cache built
    on :func:`resolve_config`); returns ``cache``."""
    if not any(c is cache for c in _LAUNCH_CACHES):
        _LAUNCH_CACHES.append(cache)
    return cache


def clear_cache() -> None:
    """Forget every resolved lookup and parsed file (after the stores change in-process),
    including the launchers' caches of resolved configs."""
    _RESOLVED.clear()
    _FILES.clear()
    _LOGGED.clear()
    for c in _LAUNCH_CACHES:
        c.clear()


# --------------------------------------------------------------------------------------------
# files


def _parse(text: str, where: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        _log_once(("bad", where), "ignoring config file %s: not valid JSON (%s)", where, exc)
        return []
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        _log_once(("schema", where), "ignoring config file %s: schema is not %d", where, SCHEMA)
        return []
    return [e for e in data.get("entries", []) if isinstance(e, dict) and "config" in e]


def _log_once(key: tuple, msg: str, *args: Any) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.warning(msg, *args)


def read_file(path: Path) -> list[dict[str, Any]]:
    """Entries of one store file (``[]`` when absent or unreadable)."""
    try:
        return _parse(Path(path).read_text(), str(path))
    except FileNotFoundError:
        return []


def _user_entries(slug: str, op: str) -> list[dict[str, Any]]:
    key = ("user:" + str(user_root()), f"{slug}/{op}")
    if key not in _FILES:
        _FILES[key] = read_file(user_root() / slug / f"{op}.json")
    return _FILES[key]


def _shipped_entries(slug: str, op: str) -> list[dict[str, Any]]:
    key = ("shipped:" + SHIPPED_PACKAGE, f"{slug}/{op}")
    if key not in _FILES:
        res = shipped_root().joinpath(slug, f"{op}.json")
        try:
            entries = _parse(res.read_text(), f"{SHIPPED_PACKAGE}/configs/{slug}/{op}.json")
        except (FileNotFoundError, NotADirectoryError, OSError):
            entries = []
        _FILES[key] = entries
    return _FILES[key]


def entry_key(entry: Mapping[str, Any]) -> tuple:
    """What makes two entries the same slot (a newer one replaces an older one)."""
    gpu = entry.get("gpu", {})
    return (
        gpu.get("name"),
        str(gpu.get("capability")),
        gpu.get("sm_count"),
        entry.get("triton"),
        entry.get("op"),
        entry.get("direction"),
        entry.get("dtype"),
        tuple(sorted(entry.get("bucket", {}).items())),
    )


def _sort_entries(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda e: json.dumps(entry_key(e), default=str))


def write_file(path: Path, entries: Iterable[dict[str, Any]]) -> None:
    """Write a store file atomically (temporary file + rename), entries sorted for stable diffs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"schema": SCHEMA, "entries": _sort_entries(entries)}, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path.lock`` (several tuners may write one store)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic rename still keeps each file whole
        yield
        return
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge_into(path: Path, new: Iterable[dict[str, Any]]) -> int:
    """Add entries to a store file, replacing those with the same key. Returns how many."""
    new = list(new)
    path = Path(path)
    with _locked(path):
        merged = {entry_key(e): e for e in read_file(path)}
        for e in new:
            merged[entry_key(e)] = e
        write_file(path, merged.values())
    clear_cache()
    return len(new)


def make_entry(
    props: DeviceProps,
    op: str,
    direction: str,
    dtype: Any,
    shape: Mapping[str, int],
    config: Mapping[str, Any],
    *,
    exact: Iterable[str] = (),
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A store entry for a config tuned at ``shape`` on ``props``' GPU with this Triton."""
    meta = dict(meta or {})
    meta.setdefault("shape", dict(shape))
    meta.setdefault(
        "date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    return {
        "gpu": props.key(),
        "triton": triton_version(),
        "op": op,
        "direction": direction,
        "dtype": dtype_name(dtype),
        "bucket": bucket(shape),
        "exact": sorted(exact),
        "config": dict(config),
        "meta": meta,
    }


def record(entry: Mapping[str, Any], root: Path | None = None) -> Path:
    """Save one entry in the user store (or under ``root``); returns the file written."""
    root = user_root() if root is None else Path(root)
    from scanopt.autotune.device import gpu_slug

    path = root / gpu_slug(entry["gpu"]["name"]) / f"{entry['op']}.json"
    merge_into(path, [dict(entry)])
    return path


def iter_store(root: Path) -> Iterable[tuple[Path, list[dict[str, Any]]]]:
    """Every ``<slug>/<op>.json`` file of a store folder with its entries."""
    root = Path(root)
    if not root.is_dir():
        return
    for path in sorted(root.glob("*/*.json")):
        yield path, read_file(path)


def iter_shipped() -> Iterable[tuple[str, list[dict[str, Any]]]]:
    """Every shipped store file (as ``"<slug>/<op>.json"``) with its entries."""
    root = shipped_root()
    try:
        slugs = [d for d in root.iterdir() if d.is_dir()]
    except (FileNotFoundError, NotADirectoryError, OSError):
        return
    for d in sorted(slugs, key=lambda t: t.name):
        for f in sorted((f for f in d.iterdir() if f.name.endswith(".json")), key=lambda t: t.name):
            yield (
                f"{d.name}/{f.name}",
                _parse(f.read_text(), f"{SHIPPED_PACKAGE}/configs/{d.name}/{f.name}"),
            )


# --------------------------------------------------------------------------------------------
# lookup


def _matching(
    entries: list[dict[str, Any]],
    props: DeviceProps,
    op: str,
    direction: str,
    dtype: str,
    source: str,
) -> list[dict[str, Any]]:
    gpu = props.key()
    here = triton_version()
    out = []
    for e in entries:
        g = e.get("gpu", {})
        if (
            g.get("name") != gpu["name"]
            or str(g.get("capability")) != gpu["capability"]
            or g.get("sm_count") != gpu["sm_count"]
            or e.get("op") != op
            or e.get("direction") != direction
            or e.get("dtype") != dtype
        ):
            continue
        if e.get("triton") != here:
            _log_once(
                ("triton", source, op, e.get("triton")),
                "scanopt: ignoring %s configs for %s tuned with Triton %s (this is Triton %s); "
                "re-tune with `scanopt tune --op %s`",
                source,
                op,
                e.get("triton"),
                here,
                op,
            )
            continue
        out.append(e)
    return out


def _distance(a: Mapping[str, int], b: Mapping[str, int]) -> float:
    return sum(abs(math.log2(max(a[k], 1)) - math.log2(max(b[k], 1))) for k in a)


#: the farthest a nearest-bucket entry may be (sum of |log2| differences): one octave in one
#: dim. An attention forward tuned at L = 1k made L = 4k 12-15% slower when it stood in for a
#: missing 4k entry (H100, 2026-12-07); tiles that win on short sequences lose on long ones.
MAX_NEAREST_DISTANCE = 1.0


def lookup(
    op: str, direction: str, dtype: Any, shape: Mapping[str, int], device: Any = None
) -> tuple[str, dict[str, Any] | None]:
    """Where ``resolve_config`` finds a config and the entry: ``("user" | "shipped" |
    "user-nearest" | "shipped-nearest", entry)`` or ``("default", None)``."""
    props = device_props(device)
    dtype = dtype_name(dtype)
    want = bucket(shape)
    sources = [
        ("user", _matching(_user_entries(props.slug, op), props, op, direction, dtype, "user")),
        (
            "shipped",
            _matching(_shipped_entries(props.slug, op), props, op, direction, dtype, "shipped"),
        ),
    ]
    for name, entries in sources:
        for e in entries:
            if e.get("bucket") == want:
                return name, e
    best: tuple[float, int, str, dict[str, Any]] | None = None
    for rank, (_, entries) in enumerate(sources):
        for e in entries:
            have = e.get("bucket", {})
            exact = e.get("exact", [])
            if set(have) != set(want) or any(have[k] != want[k] for k in exact):
                continue
            dist = _distance(have, want)
            if dist > MAX_NEAREST_DISTANCE:
                continue
            cand = (dist, rank, json.dumps(have, sort_keys=True), e)
            if best is None or cand[:3] < best[:3]:
                best = cand
    if best is not None:
        return f"{sources[best[1]][0]}-nearest", best[3]
    return "default", None


def resolve_config(
    op: str,
    direction: str,
    dtype: Any,
    shape: Mapping[str, int],
    default: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    *,
    device: Any = None,
) -> dict[str, Any]:
    """The launch config for one call: the tuned one for this GPU and shape bucket, else the
    heuristic ``default``.

    ``shape`` names the sizes the op's ``Tunable`` declares (``scanopt.autotune.spaces``);
    ``default`` is the launcher's ``default_config(...)`` dict (or a callable returning it);
    ``device`` the tensors' device (``None``: the current CUDA device, or the CPU). Returns
    ``{**default, **tuned}``; a tuned config naming a key the default lacks (recorded for an
    older version of the kernel) is ignored, logged once. Lookup order: user store, shipped
    store, nearest bucket, default (see the module docstring). Cached: a dict access after the
    first call with the same arguments.
    """
    key = (op, direction, dtype, tuple(shape.items()), device)
    try:
        tuned = _RESOLVED[key]
    except KeyError:
        _, entry = lookup(op, direction, dtype, shape, device)
        tuned = _RESOLVED[key] = dict(entry["config"]) if entry is not None else None
    base = default() if callable(default) else default
    if tuned is None:
        return dict(base)
    if not tuned.keys() <= base.keys():
        _log_once(
            ("keys", op, direction, tuple(sorted(tuned))),
            "scanopt: ignoring a tuned %s %s config with keys %s the launcher does not take (%s)",
            op,
            direction,
            sorted(set(tuned) - set(base)),
            sorted(base),
        )
        return dict(base)
    return {**base, **tuned}
