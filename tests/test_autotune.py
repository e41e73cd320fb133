"""Autotuning: search spaces, the config store and its lookup order, correctness-gated Optuna
studies in worker subprocesses (SQLite, journal file, PostgreSQL), ``scanopt tune`` and
``scanopt configs``.

Most tests tune ``TOY`` below, a tiny Triton kernel defined in this module (the workers import it
as ``test_autotune:TOY``; the tests put this folder on PYTHONPATH). Its ``BLOCK=64`` configs
drop the tail -- an injected wrong config that must be pruned, never timed -- and ``TOY_CRASH``
makes one config kill its worker. One test tunes a real op under Triton's interpreter.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from scanopt._tensor import empty
from scanopt.autotune import spaces, store, tuner
from scanopt.autotune.api import Space, Tunable, bucket, config_key
from scanopt.autotune.device import CPU_PROPS, DeviceProps

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# the toy kernel: y = 2 x + 1 in blocks; BLOCK == 64 leaves the tail unwritten (injected bug)


@triton.jit
def _toy_kernel(x, y, n, BLOCK: tl.constexpr, DROP_TAIL: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    limit = (n // BLOCK) * BLOCK if DROP_TAIL else n
    m = offs < limit
    tl.store(y + offs, tl.load(x + offs, mask=m) * 2.0 + 1.0, mask=m)


def toy_launch(x: torch.Tensor, config: dict) -> torch.Tensor:
    n = x.numel()
    y = empty(x.shape, x.dtype, x.device)
    block = config["BLOCK"]
    _toy_kernel[(triton.cdiv(n, block),)](
        x, y, n, BLOCK=block, DROP_TAIL=block == 64, num_warps=config["num_warps"]
    )
    return y


def _toy_log(kind: str, config: dict) -> None:
    path = os.environ.get("TOY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{kind} {config['BLOCK']},{config['num_warps']}\n")


def _toy_case(shape, dtype, device, seed):
    def make_inputs(s, d, dev, sd):
        g = torch.Generator().manual_seed(sd)
        return {"x": torch.randn(s["n"], generator=g).to(device=dev, dtype=d)}

    def launch(inputs, config):
        if os.environ.get("TOY_CRASH") == f"{config['BLOCK']},{config['num_warps']}":
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("TOY_SLOW"):
            time.sleep(float(os.environ["TOY_SLOW"]))
        return {"y": toy_launch(inputs["x"], config)}

    case = spaces.standard_case(
        op="toy",
        shape=shape,
        dtype=dtype,
        device=device,
        seed=seed,
        make_inputs=make_inputs,
        launch=launch,
        reference=lambda inp: {"y": inp["x"].double().cpu().numpy() * 2 + 1},
        baseline=lambda inp: {"y": inp["x"] * 2 + 1},
    )
    run, verify = case.run, case.verify

    def logged_run(config, index=0):
        _toy_log("run", config)
        return run(config, index)

    def logged_verify(config):
        _toy_log("verify", config)
        return verify(config)

    case.run, case.verify = logged_run, logged_verify
    return case


def _toy_space(shape, dtype, props):
    return Space(
        {"BLOCK": (16, 32, 64, 128), "num_warps": (1, 2, 4)},
        constraint=lambda c, s, p: c["BLOCK"] * c["num_warps"] <= 256,
    )


TOY = [
    Tunable(
        op="toy",
        direction="fwd",
        dims=("n",),
        space=_toy_space,
        default=lambda shape, dtype, props: {"BLOCK": 32, "num_warps": 1},
        make_case=_toy_case,
        example_shape={"n": 1000},
        test_shape={"n": 300},
    )
]
TOY_OP = "test_autotune:TOY"
#: points of the toy space the constraint accepts (128 x 4 is rejected)
TOY_VALID = 11
TOY_WRONG = {"64,1", "64,2", "64,4"}


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh user cache (config store, studies) and the toy module importable by workers."""
    monkeypatch.setenv("SCANOPT_CACHE_DIR", str(tmp_path / "cache"))
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("TOY_LOG", str(tmp_path / "toy.log"))
    monkeypatch.delenv("TOY_CRASH", raising=False)
    monkeypatch.delenv("TOY_SLOW", raising=False)
    store.clear_cache()
    yield tmp_path
    store.clear_cache()


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A stand-in package whose ``configs/`` is the shipped store (read via importlib.resources)."""
    pkg = tmp_path / "fake_shipped_pkg"
    (pkg / "configs").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(store, "SHIPPED_PACKAGE", "fake_shipped_pkg")
    store.clear_cache()
    yield pkg / "configs"
    sys.modules.pop("fake_shipped_pkg", None)
    store.clear_cache()


def _toy_log_lines(tmp_path) -> list[str]:
    path = tmp_path / "toy.log"
    return path.read_text().split("\n")[:-1] if path.exists() else []


def _load_study(result):
    import optuna

    return optuna.load_study(study_name=result.study, storage=result.storage)


def _statuses_by_config(study) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for t in study.get_trials(deepcopy=False):
        cfg = t.user_attrs.get("config")
        if cfg is not None:
            out.setdefault(f"{cfg['BLOCK']},{cfg['num_warps']}", []).append(
                t.user_attrs.get("status")
            )
    return out


def _entry(shape, config, *, props=CPU_PROPS, op="toy", direction="fwd", dtype="float32",
           exact=(), triton_version=None):  # fmt: skip
    e = store.make_entry(props, op, direction, dtype, shape, config, exact=exact)
    if triton_version is not None:
        e["triton"] = triton_version
    return e


def _write(root: Path, entries, op="toy", slug="CPU"):
    store.write_file(root / slug / f"{op}.json", entries)
    store.clear_cache()


DEFAULT = {"BLOCK": 32, "num_warps": 1}


def _resolve(shape, default=DEFAULT, **kw):
    return store.resolve_config("toy", "fwd", torch.float32, shape, default, device="cpu", **kw)


# --------------------------------------------------------------------------------------------
# spaces, buckets


def test_bucket_rounds_each_size_up_to_a_power_of_two():
    assert bucket({"L": 1000, "dim": 2048, "N": 1}) == {"L": 1024, "dim": 2048, "N": 1}
    assert bucket({"L": 1025, "dim": 40}) == {"L": 2048, "dim": 64}


def test_space_points_constraint_encoding():
    space = _toy_space({"n": 10}, "float32", CPU_PROPS)
    assert space.size() == 12
    valid = space.valid_points({"n": 10}, CPU_PROPS)
    assert len(valid) == TOY_VALID and {"BLOCK": 128, "num_warps": 4} not in valid
    assert space.valid_points({"n": 10}, CPU_PROPS, limit=5) is None
    cfg = {"BLOCK": 64, "num_warps": 2}
    assert space.decode(space.encode(cfg)) == cfg
    wider = space.including({"BLOCK": 48, "num_warps": 2})
    assert wider.params["BLOCK"] == (16, 32, 48, 64, 128)
    assert wider.digest() != space.digest()
    assert not space.allows({"BLOCK": 48, "num_warps": 2}, {"n": 10}, CPU_PROPS)


def test_shape_parsing():
    t = spaces.get_tunable(TOY_OP, "fwd")
    assert t.parse_shape("n=77") == {"n": 77}
    assert t.parse_shape("99") == {"n": 99}
    with pytest.raises(ValueError, match="unknown shape dim 'm'"):
        t.parse_shape("m=3")


def test_constraints_read_the_device_budget():
    small = DeviceProps("tiny", (8, 0), 10, 48 * 1024, 65536, 2048, True)
    for t in spaces.tunables():
        # the CPU (interpreter) has no budget; a GPU's registers/shared memory prune more
        big = t.full_shape(t.example_shape)
        space = t.space(big, "bfloat16", CPU_PROPS)
        on_cpu = len(space.valid_points(big, CPU_PROPS, limit=2_000_000))
        on_gpu = len(space.valid_points(big, small, limit=2_000_000))
        assert 0 < on_gpu < on_cpu, t.name


def test_selective_scan_bwd_space_bounds_partial_sum_memory(monkeypatch):
    """The fastest backward tiles (BLOCK_D 4, one warp) keep 8x the default's dB/dC partial
    sums; at the anchor shape the space must exclude them and keep the default, while the
    forward (no partial sums) keeps small tiles."""
    h100 = DeviceProps("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448, 65536, 2048, True)
    anchor = {"batch": 4, "dim": 2048, "L": 16384, "N": 16}
    bwd = spaces.get_tunable("selective_scan", "bwd")
    points = bwd.space(anchor, "bfloat16", h100).valid_points(anchor, h100, limit=2_000_000)
    block_ds = {c["BLOCK_D"] for c in points if c["SEGMENTS"] == 1}
    assert block_ds and min(block_ds) == 32, block_ds
    # SEGMENTS launches shrink the scratch by their count: the one-warp tile with 8 of them
    # needs what the default needs in one; 2 channels would need twice that
    by_segments = {s: min(c["BLOCK_D"] for c in points if c["SEGMENTS"] == s) for s in (2, 4, 8)}
    assert by_segments == {2: 16, 4: 8, 8: 4}, by_segments
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU heuristic, not the interpreter's
    default = bwd.default(anchor, "bfloat16", h100)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert default["BLOCK_D"] == 32
    assert any(all(c[k] == default[k] for k in c) for c in points), default
    # few state columns: the partial sums are small next to du/ddelta/dz, small tiles allowed
    narrow = {**anchor, "N": 4}
    pts = bwd.space(narrow, "bfloat16", h100).valid_points(narrow, h100, limit=2_000_000)
    assert min(c["BLOCK_D"] for c in pts if c["SEGMENTS"] == 1) == 8
    fwd = spaces.get_tunable("selective_scan", "fwd")
    pts = fwd.space(anchor, "bfloat16", h100).valid_points(anchor, h100, limit=2_000_000)
    assert min(c["BLOCK_D"] for c in pts) == 1


# --------------------------------------------------------------------------------------------
# the store


def test_lookup_order_user_shipped_nearest_default(cache, shipped):
    user = store.user_root()
    a, b, c = (
        {"BLOCK": 16, "num_warps": 1},
        {"BLOCK": 128, "num_warps": 2},
        {"BLOCK": 16, "num_warps": 2},
    )
    _write(user, [_entry({"n": 1000}, a)])
    _write(shipped, [_entry({"n": 1000}, b), _entry({"n": 5000}, c)])
    # exact bucket 1024 in both: the user store wins
    assert _resolve({"n": 900}) == a
    assert store.lookup("toy", "fwd", "float32", {"n": 900}, "cpu")[0] == "user"
    # bucket 8192 only shipped
    assert _resolve({"n": 8000}) == c
    assert store.lookup("toy", "fwd", "float32", {"n": 8000}, "cpu")[0] == "shipped"
    # bucket 2048: no exact entry; 1024 (user) and 8192 (shipped) are 1 and 2 octaves away
    assert _resolve({"n": 2000}) == a
    assert store.lookup("toy", "fwd", "float32", {"n": 2000}, "cpu")[0] == "user-nearest"
    # bucket 16384: 8192 (shipped) is nearer than 1024 (user)
    assert _resolve({"n": 16000}) == c
    assert store.lookup("toy", "fwd", "float32", {"n": 16000}, "cpu")[0] == "shipped-nearest"
    # bucket 4096: 1024 (user, ranked first) is two octaves away, beyond the limit; 8192
    # (shipped) is one: the shipped entry wins
    assert _resolve({"n": 4000}) == c
    # bucket 65536: 8192 is three octaves away, beyond MAX_NEAREST_DISTANCE: the default
    assert _resolve({"n": 60000}) == DEFAULT
    assert store.lookup("toy", "fwd", "float32", {"n": 60000}, "cpu") == ("default", None)
    # another dtype, direction or op: the heuristic default
    assert (
        store.resolve_config("toy", "fwd", "float16", {"n": 900}, DEFAULT, device="cpu") == DEFAULT
    )
    assert (
        store.resolve_config("toy", "bwd", "float32", {"n": 900}, DEFAULT, device="cpu") == DEFAULT
    )
    assert (
        store.resolve_config("nope", "fwd", "float32", {"n": 900}, DEFAULT, device="cpu") == DEFAULT
    )


def test_nearest_bucket_must_match_exact_dims_and_gpu(cache):
    other_gpu = DeviceProps("NVIDIA H200", (9, 0), 132, 232448, 65536, 2048, True)
    same_name_fewer_sms = DeviceProps(CPU_PROPS.name, (0, 0), 7, 1, 1, 1, False)
    cfg = {"BLOCK": 128, "num_warps": 2}
    _write(
        store.user_root(),
        [_entry({"L": 1024, "D": 64}, cfg, exact=("D",))]
        + [_entry({"L": 4096, "D": 128}, cfg, props=same_name_fewer_sms)],
    )
    _write(
        store.user_root(), [_entry({"L": 4096, "D": 128}, cfg, props=other_gpu)], slug="NVIDIA_H200"
    )
    # D bucket differs (128 vs 64): not a neighbour; other GPUs never match
    assert _resolve({"L": 4096, "D": 128}) == DEFAULT
    assert _resolve({"L": 2000, "D": 40}) == cfg  # D 40 -> bucket 64, L nearest
    assert _resolve({"L": 4000, "D": 40}) == DEFAULT  # L two octaves away: too far


def test_other_triton_version_is_ignored_with_one_log_line(cache, caplog):
    _write(
        store.user_root(),
        [_entry({"n": 1000}, {"BLOCK": 128, "num_warps": 2}, triton_version="0.0.1")],
    )
    with caplog.at_level(logging.WARNING, logger="scanopt.autotune"):
        assert _resolve({"n": 1000}) == DEFAULT
        assert _resolve({"n": 3000}) == DEFAULT
        assert _resolve({"n": 50}) == DEFAULT
    lines = [r for r in caplog.records if "Triton 0.0.1" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert triton.__version__ in lines[0].getMessage()


def test_resolve_is_cached_after_the_first_call(cache, monkeypatch):
    cfg = {"BLOCK": 128, "num_warps": 2}
    _write(store.user_root(), [_entry({"n": 1000}, cfg)])
    assert _resolve({"n": 1000}) == cfg

    def boom(*a, **k):
        raise AssertionError("lookup ran again")

    original = store.lookup
    monkeypatch.setattr(store, "lookup", boom)
    for _ in range(3):
        assert _resolve({"n": 1000}) == cfg
    # the default may change between calls (it is not cached, only the tuned entry is)
    assert _resolve({"n": 1000}, default={"BLOCK": 32, "num_warps": 1, "extra": 7}) == {
        **cfg,
        "extra": 7,
    }
    monkeypatch.setattr(store, "lookup", original)
    store.clear_cache()
    (store.user_root() / "CPU" / "toy.json").unlink()
    assert _resolve({"n": 1000}) == DEFAULT


def test_stale_keys_fall_back_to_the_default(cache, caplog):
    _write(store.user_root(), [_entry({"n": 1000}, {"BLOCK": 128, "OLD_KNOB": 3})])
    with caplog.at_level(logging.WARNING, logger="scanopt.autotune"):
        assert _resolve({"n": 1000}) == DEFAULT
    assert any("OLD_KNOB" in r.getMessage() for r in caplog.records)


def test_bad_files_are_ignored(cache):
    path = store.user_root() / "CPU" / "toy.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert _resolve({"n": 1000}) == DEFAULT
    path.write_text(json.dumps({"schema": 99, "entries": []}))
    store.clear_cache()
    assert _resolve({"n": 1000}) == DEFAULT


def test_hot_path_never_imports_optuna(cache):
    _write(store.user_root(), [_entry({"n": 1000}, {"BLOCK": 128, "num_warps": 2})])
    code = (
        "import sys, torch\n"
        "from scanopt.autotune import resolve_config\n"
        "c = resolve_config('toy', 'fwd', torch.float32, {'n': 1000}, {'BLOCK': 1, 'num_warps': 1},"
        " device='cpu')\n"
        "assert c == {'BLOCK': 128, 'num_warps': 2}, c\n"
        "assert 'optuna' not in sys.modules and 'sqlalchemy' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())


def test_shipped_configs_are_found_through_importlib_resources(cache, shipped):
    cfg = {"BLOCK": 16, "num_warps": 4}
    store.write_file(shipped / "CPU" / "toy.json", [_entry({"n": 1000}, cfg)])
    store.clear_cache()
    assert str(store.shipped_root()).startswith(str(shipped))
    assert _resolve({"n": 1000}) == cfg
    assert [name for name, _ in store.iter_shipped()] == ["CPU/toy.json"]


def test_real_package_declares_shipped_configs_as_package_data():
    import importlib.resources

    import tomllib

    configs = importlib.resources.files("scanopt").joinpath("configs")
    assert configs.is_dir()
    pyproject = tomllib.loads((HERE.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["scanopt"]
    assert "configs/**/*.json" in patterns
    for d in configs.iterdir():  # every shipped file parses and is keyed for its folder's GPU
        if d.is_dir():
            for f in d.iterdir():
                for e in store._parse(f.read_text(), f.name):
                    assert e["gpu"]["name"].replace(" ", "_") == d.name


# --------------------------------------------------------------------------------------------
# tuning


def test_tune_grid_prunes_the_wrong_config_and_saves_the_winner(cache):
    result = tuner.tune(TOY_OP, "fwd", "float32", {"n": 300}, trials=50, jobs=1, rebench=2,
                        reps=1, progress=False)  # fmt: skip
    assert result.sampler == "grid" and result.valid_points == TOY_VALID
    assert result.evaluated == TOY_VALID and result.statuses["wrong"] == 3
    assert result.best_config is not None and config_key(result.best_config) != config_key(
        {"BLOCK": 64}
    )
    lines = _toy_log_lines(cache)
    timed = {line.split()[1] for line in lines if line.startswith("run")}
    verified = {line.split()[1] for line in lines if line.startswith("verify")}
    assert TOY_WRONG <= verified and not (TOY_WRONG & timed), "a wrong config was timed"
    assert "128,4" not in verified, "a config the constraint rejects was compiled"
    study = _load_study(result)
    by_cfg = _statuses_by_config(study)
    assert all(by_cfg[c] == ["wrong"] for c in TOY_WRONG)
    assert by_cfg.get("128,4", ["constraint"]) == ["constraint"]
    pruned = [t for t in study.trials if t.user_attrs.get("status") == "wrong"]
    assert all(t.state.name == "PRUNED" and "p20" not in t.user_attrs for t in pruned)
    assert study.trials[0].user_attrs["config"] == DEFAULT  # the heuristic default goes first
    # the op side: resolve_config now returns the winner for every shape of the bucket
    store.clear_cache()
    assert _resolve({"n": 260}) == result.best_config
    entry = store.lookup("toy", "fwd", "float32", {"n": 300}, "cpu")[1]
    assert entry["meta"]["default_ms"] and entry["meta"]["speedup"] and "rebench" in entry["meta"]


def test_budget_counts_distinct_configs_run(cache):
    result = tuner.tune(TOY_OP, "fwd", "float32", {"n": 100}, trials=3, rebench=0, reps=1,
                        progress=False)  # fmt: skip
    assert result.evaluated == 3
    assert len({line for line in _toy_log_lines(cache) if line.startswith("verify")}) == 3


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_share_one_study_and_run_each_config_once(cache, kind, monkeypatch):
    monkeypatch.setenv("TOY_SLOW", "0.15")  # enough work that both workers start in time
    storage = None if kind == "sqlite" else f"journal:{cache / 'studies.journal'}"
    result = tuner.tune(TOY_OP, "fwd", "float32", {"n": 200}, trials=50, jobs=2, rebench=0,
                        reps=1, storage=storage, progress=False)  # fmt: skip
    study = _load_study(result) if storage is None else _open(storage, result.study)
    workers = {t.user_attrs.get("worker") for t in study.trials}
    assert len(workers) == 2, workers
    verified = [line for line in _toy_log_lines(cache) if line.startswith("verify")]
    assert len(verified) == len(set(verified)) == TOY_VALID


def _open(storage, name):
    import optuna

    return optuna.load_study(study_name=name, storage=tuner.open_storage(storage))


def test_tpe_repeats_are_answered_from_the_cache(cache):
    result = tuner.tune(TOY_OP, "fwd", "float32", {"n": 100}, trials=8, sampler="tpe", jobs=1,
                        seed=3, rebench=0, reps=1, progress=False)  # fmt: skip
    assert result.sampler == "tpe" and result.evaluated == 8
    verified = [line for line in _toy_log_lines(cache) if line.startswith("verify")]
    assert len(verified) == len(set(verified)) == 8
    study = _load_study(result)
    dups = [t for t in study.trials if t.user_attrs.get("status") == "duplicate"]
    for t in dups:  # a repeat carries the first result, it is not re-run
        first = study.trials[t.user_attrs["duplicate_of"]]
        assert t.user_attrs["config"] == first.user_attrs["config"] and t.value == first.value


@pytest.mark.parametrize("sampler", ["random", "gp"])
def test_other_samplers_run(cache, sampler):
    result = tuner.tune(TOY_OP, "fwd", "float32", {"n": 64}, trials=3, sampler=sampler,
                        rebench=0, reps=1, progress=False)  # fmt: skip
    assert result.evaluated == 3 and result.best_config is not None


def test_cmaes_without_its_package_says_what_to_install(cache):
    pytest.importorskip("optuna")
    try:
        import cmaes  # noqa: F401

        pytest.skip("cmaes is installed")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="pip install cmaes"):
        tuner.tune(TOY_OP, "fwd", "float32", {"n": 64}, trials=2, sampler="cmaes", progress=False)


def test_seeded_grid_order_is_repeatable(cache):
    t = spaces.get_tunable(TOY_OP, "fwd")
    orders = []
    for seed, name in ((5, "a"), (5, "b"), (6, "c")):
        spec = tuner.StudySpec(op=TOY_OP, direction="fwd", dtype="float32", shape={"n": 64},
                               study=name, storage=tuner.default_storage_url(), trials=50,
                               seed=seed)  # fmt: skip
        study, sampler, n_valid = tuner.prepare_study(spec, t, CPU_PROPS)
        assert sampler == "grid" and n_valid == TOY_VALID
        waiting = study.get_trials(deepcopy=False)
        assert len(waiting) == TOY_VALID and waiting[0].user_attrs["role"] == "default"
        orders.append([json.dumps(x.system_attrs["fixed_params"]) for x in waiting])
    assert orders[0] == orders[1] != orders[2]
    assert orders[0][0] == orders[2][0]  # the heuristic default first, whatever the seed


def test_a_config_that_kills_its_worker_is_recorded_and_tuning_goes_on(cache, monkeypatch):
    monkeypatch.setenv("TOY_CRASH", "16,2")
    result = tuner.tune(TOY_OP, "fwd", "float32", {"n": 100}, trials=50, rebench=0, reps=1,
                        progress=False)  # fmt: skip
    by_cfg = _statuses_by_config(_load_study(result))
    assert by_cfg["16,2"] == ["crash"]
    assert result.evaluated == TOY_VALID and result.statuses["ok"] == TOY_VALID - 4
    assert result.best_config is not None


def test_a_killed_worker_loses_no_finished_trial(cache, monkeypatch):
    monkeypatch.setenv("TOY_SLOW", "0.3")
    t = spaces.get_tunable(TOY_OP, "fwd")
    spec = tuner.StudySpec(op=TOY_OP, direction="fwd", dtype="float32", shape={"n": 100},
                           study="killed", storage=tuner.default_storage_url(), trials=50, reps=1)  # fmt: skip
    study, _, _ = tuner.prepare_study(spec, t, CPU_PROPS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "scanopt.autotune._worker", "work", spec.to_json()]
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            done = [x for x in study.get_trials(deepcopy=False) if x.state.name == "COMPLETE"]
            if len(done) >= 2:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = {x.number: x.value for x in study.get_trials() if x.state.is_finished()}
    assert len([v for v in finished.values() if v is not None]) >= 2
    monkeypatch.delenv("TOY_SLOW")
    result = tuner.tune(TOY_OP, "fwd", "float32", {"n": 100}, trials=50, study_name="killed",
                        rebench=0, reps=1, progress=False)  # fmt: skip
    study = _load_study(result)
    after = {x.number: x.value for x in study.get_trials() if x.number in finished}
    assert after == finished  # kept, not redone
    assert result.evaluated == TOY_VALID


def _postgres_url() -> str | None:
    url = os.environ.get(
        "SCANOPT_TEST_POSTGRES_URL", "postgresql://scanopt:scanopt@127.0.0.1:5432/scanopt_test"
    )
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(
            tuner._pg_driver(url), connect_args={"connect_timeout": 3}
        )
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
        engine.dispose()
    except Exception as exc:  # no driver, no server
        pytest.skip(
            f"no PostgreSQL server at {tuner.display_url(url)} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120]}); .ci/run starts one; set SCANOPT_TEST_POSTGRES_URL"
        )
    return url


def test_postgresql_storage_shared_by_two_workers(cache, monkeypatch):
    url = _postgres_url()
    monkeypatch.setenv("TOY_SLOW", "0.15")
    name = f"pytest-{os.getpid()}-{time.time_ns()}"
    result = tuner.tune(TOY_OP, "fwd", "float32", {"n": 128}, trials=50, jobs=2, rebench=0,
                        reps=1, storage=url, study_name=name, progress=False)  # fmt: skip
    study = _open(url, name)
    assert len({t.user_attrs.get("worker") for t in study.trials}) == 2
    verified = [line for line in _toy_log_lines(cache) if line.startswith("verify")]
    assert len(verified) == len(set(verified)) == TOY_VALID
    assert result.best_config is not None
    import optuna

    optuna.delete_study(study_name=name, storage=tuner.open_storage(url))


# --------------------------------------------------------------------------------------------
# the command line


def _cli(*argv: str) -> int:
    from scanopt.autotune.cli import register

    parser = argparse.ArgumentParser(prog="scanopt")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_tune_then_configs_list_show_export_import_clear(cache, shipped, capsys):
    assert _cli("tune", "--op", TOY_OP, "--shape", "n=300", "--shape", "5000", "--trials", "3",
                "--rebench", "0", "--reps", "1", "--quiet") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "toy.fwd" in out and "n=300" in out and "n=5000" in out
    assert _cli("configs", "list") == 0
    assert out.count("toy.fwd") >= 2 or "toy.fwd" in capsys.readouterr().out
    assert _cli("configs", "show", TOY_OP, "--shape", "n=290") == 0
    assert "[user]" in capsys.readouterr().out
    bundle = cache / "bundle.json"
    assert _cli("configs", "export", "--to", str(bundle)) == 0
    assert len(json.loads(bundle.read_text())["entries"]) == 2
    assert _cli("configs", "clear") == 1  # asks for --yes
    assert (store.user_root() / "CPU" / "toy.json").exists()
    assert _cli("configs", "clear", "--yes") == 0
    assert _resolve({"n": 300}) == DEFAULT
    assert store.lookup("toy", "fwd", "float32", {"n": 300}, "cpu")[0] == "default"
    assert _cli("configs", "import", str(bundle)) == 0
    source, entry = store.lookup("toy", "fwd", "float32", {"n": 300}, "cpu")
    assert source == "user" and _resolve({"n": 300}) == entry["config"]
    capsys.readouterr()
    assert _cli("configs", "export", "--shipped") == 0
    assert (shipped / "CPU" / "toy.json").exists()
    _cli("configs", "clear", "--yes")
    assert store.lookup("toy", "fwd", "float32", {"n": 300}, "cpu")[0] == "shipped"
    assert _resolve({"n": 300}) == entry["config"]


def test_cli_errors(cache, capsys):
    assert _cli("tune") == 2
    assert _cli("tune", "--op", "no_such_op") == 2
    assert "unknown op 'no_such_op'" in capsys.readouterr().err
    assert _cli("tune", "--op", TOY_OP, "--shape", "m=3") == 2
    assert _cli("tune", "--list") == 0


# --------------------------------------------------------------------------------------------
# the real ops (whichever exist in this tree)


ALL = [f"{op}.{d}" for op in spaces.known_ops() for d in ("fwd", "bwd")]


def _available(name: str) -> Tunable:
    op, _, direction = name.partition(".")
    try:
        return spaces.get_tunable(op, direction)
    except ValueError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", ALL)
def test_each_tunable_default_is_in_its_space_and_verifies(name):
    t = _available(name)
    shape = t.full_shape(t.test_shape)
    space, default, full = tuner.resolve_space(t, shape, "float32", CPU_PROPS)
    assert space.contains(default)
    case = t.make_case(shape, torch.float32, "cpu", 0)
    report = case.verify(full)
    report.assert_ok()


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_attention_tuning_times_the_layout_the_public_ops_see(direction):
    # flash_attn_func (and models calling SDPA on q.view(B, L, H, D).transpose(1, 2)) hand the
    # launcher seq-first memory; a config tuned on (B, H, L, D)-contiguous tensors was 1.28x
    # faster there and 2.8x slower through flash_attn_func (H100, 2026-12-07)
    # hand the launcher seq-first memory; a config tuned on (B, H, L, D)-contiguous tensors was
    # 1.28x faster there and 2.8x slower through flash_attn_func: the layout is a dim of the key
    t = _available(f"attention.{direction}")
    assert "seq" in t.exact
    assert {s["seq"] for s in t.bench_shapes} == {0, 1}
    for seq in (1, 0):
        shape = t.full_shape({**t.test_shape, "seq": seq})
        case = t.make_case(shape, torch.float32, "cpu", 0)
        outs = case.run(t.default(shape, "float32", CPU_PROPS), 0)
        for name, out in outs.items():
            if out.dim() == 4:
                mem = out.transpose(1, 2) if seq else out
                assert mem.is_contiguous(), f"{name}: memory not in the case's layout (seq={seq})"
        case.verify(t.default(shape, "float32", CPU_PROPS)).assert_ok()


def test_rwkv_spaces_offer_each_kernel_family_where_it_applies():
    for op in ("wkv6", "wkv7"):
        t = spaces.get_tunable(op, "fwd")
        small = t.full_shape(t.test_shape)
        assert t.space(small, "bfloat16", CPU_PROPS).params["MODE"] == (
            "recurrent",
            "chunked",
            "tc",
        )
        assert t.space(small, "float32", CPU_PROPS).params["MODE"] == ("recurrent", "chunked")
        assert t.space({**small, "K": 256}, "bfloat16", CPU_PROPS).params["MODE"] == ("recurrent",)
        ks0 = {"KS": 0} if op == "wkv7" else {}  # WKV-7's forward: the split-K knob
        tc8 = {"MODE": "tc", "BV": 8, "num_warps": 4, "num_stages": 1, "BW": 16, "SW": 4, **ks0}
        assert not t.space(small, "bfloat16", CPU_PROPS).allows(tc8, small, CPU_PROPS)
        # the chunk length is tunable for the chunked families, a single point for recurrent
        space = t.space(small, "bfloat16", CPU_PROPS)
        assert space.params["BT"] == (32, 64, 128)
        rec = {"MODE": "recurrent", "BV": 16, "num_warps": 1, "num_stages": 1, "BW": 16, "SW": 4,
               **ks0}  # fmt: skip
        assert space.allows({**rec, "BT": 64}, small, CPU_PROPS)
        assert not space.allows({**rec, "BT": 32}, small, CPU_PROPS)
        assert space.allows({**tc8, "BV": 16, "BT": 32}, small, CPU_PROPS)
        # SW (warps of tc's serial passes) is a tc knob: one point for the other families
        assert space.params["SW"] == (2, 4, 8)
        assert space.allows({**tc8, "BV": 16, "BT": 64, "BW": 16, "SW": 2}, small, CPU_PROPS)
        assert space.allows({**rec, "BT": 64, "BW": 16, "SW": 4}, small, CPU_PROPS)
        assert not space.allows({**rec, "BT": 64, "BW": 16, "SW": 2}, small, CPU_PROPS)
        assert not space.allows({**rec, "BT": 64, "BW": 32, "SW": 4}, small, CPU_PROPS)
        # KS (K in lane groups of KS per thread) is WKV-7's recurrent forward's alone
        assert space.params.get("KS") == ((0, 4, 8, 16) if op == "wkv7" else None)
        if op == "wkv7":
            assert space.allows({**rec, "BT": 64, "KS": 8}, small, CPU_PROPS)
            assert not space.allows({**rec, "BT": 64, "KS": 16, "num_warps": 1},
                                    {**small, "K": 1024}, CPU_PROPS)  # 64 lane groups  # fmt: skip
            assert not space.allows({**tc8, "BV": 16, "BT": 64, "KS": 8}, small, CPU_PROPS)
        # CARRY (the tc backward's program per chunk) is WKV-6's tc backward's alone
        bwd = spaces.get_tunable(op, "bwd").space(small, "bfloat16", CPU_PROPS)
        assert bwd.params.get("CARRY") == ((0, 1) if op == "wkv6" else None)
        assert bwd.params.get("DPASS") == (0, 1)
        assert "CARRY" not in space.params and "DPASS" not in space.params
        if op == "wkv6":
            sw = {"BT": 64, "CARRY": 0, "DPASS": 0}
            assert bwd.allows({**tc8, **sw, "BV": 16, "CARRY": 1, "DPASS": 1}, small, CPU_PROPS)
            assert not bwd.allows({**rec, **sw, "BW": 16, "CARRY": 1}, small, CPU_PROPS)
            assert not bwd.allows({**rec, **sw, "BW": 16, "DPASS": 1}, small, CPU_PROPS)
            assert bwd.allows({**rec, **sw, "BW": 16}, small, CPU_PROPS)


def test_tune_a_real_op_under_the_interpreter_and_the_op_uses_it(cache):
    t = _first_real()
    op, direction = t.op, t.direction
    shape = t.full_shape(t.test_shape)
    result = tuner.tune(op, direction, "float32", shape, trials=3, sampler="random", seed=1,
                        rebench=0, reps=1, progress=False)  # fmt: skip
    assert result.evaluated == 3 and result.best_config is not None
    store.clear_cache()
    default = t.default(shape, "float32", CPU_PROPS)
    resolved = store.resolve_config(op, direction, torch.float32, shape, default, device="cpu")
    assert resolved == {**default, **result.best_config}
    # the op's launcher runs the tuned config and stays right
    case = t.make_case(shape, torch.float32, "cpu", 7)
    case.verify(resolved).assert_ok()


# --------------------------------------------------------------------------------------------
# GPU (the lead runs these on the H200)


@pytest.mark.gpu
def test_gpu_tuning_times_with_do_bench_and_keys_the_store_by_gpu(cache):
    t = _first_real()
    shape = t.full_shape(t.test_shape)
    result = tuner.tune(t.op, t.direction, "bfloat16", shape, trials=4, rebench=2,
                        progress=False)  # fmt: skip
    assert result.best_config is not None and result.best_ms > 0
    entry = store.lookup(t.op, t.direction, "bfloat16", shape, "cuda")[1]
    assert entry["gpu"]["name"] == torch.cuda.get_device_name()
    assert entry["meta"]["timing"] == "do_bench median"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
def test_gpu_every_valid_config_of_a_small_space_verifies(name):
    """A seeded sample of each kernel's valid configs (and its default) compiles and verifies
    in bf16 on this GPU at the test shape, or is cleanly rejected (out of resources is an
    error the tuner prunes); none gives a wrong result."""
    import random

    from scanopt.autotune.device import device_props

    t = _available(name)
    shape = t.full_shape(t.test_shape)
    props = device_props("cuda")
    space, default, full = tuner.resolve_space(t, shape, "bfloat16", props)
    valid = space.valid_points(shape, props, limit=100_000)
    sample = [default, *random.Random(0).sample(valid, min(5, len(valid)))]
    case = t.make_case(shape, torch.bfloat16, "cuda", 0)
    wrong = []
    for cfg in sample:
        try:
            report = case.verify({**full, **cfg})
        except Exception as exc:  # compile error / out of resources: pruned by the tuner
            assert cfg != default, f"the default config fails: {exc}"
            continue
        if not report.passed:
            wrong.append(str(report))
    assert not wrong, "\n".join(wrong)


def _first_real() -> Tunable:
    for op in spaces.known_ops():
        found = spaces.tunables(op)
        if found:
            return found[0]
    pytest.skip("no real op is available yet")


def test_scan_forward_space_serial_points():
    # the serial forward: one canonical group tile, BLOCK_D filling the warps with 1, 2 or 4
    # channels per thread (sub-blocks sharing the B/C rows)
    t = spaces.get_tunable("selective_scan", "fwd")
    shape = {**t.full_shape(t.test_shape), "dim": 64, "N": 16}
    space = t.space(shape, "bfloat16", CPU_PROPS)
    base = {"BLOCK_G": 2, "BLOCK_R": 4, "COLS": 1, "SERIAL": 1, "NSPLIT": 4, "num_warps": 1,
            "num_stages": 1, "PREFETCH": 1}  # fmt: skip
    for bd, allowed in [(8, True), (16, True), (32, True), (4, False)]:
        assert space.allows({**base, "BLOCK_D": bd}, shape, CPU_PROPS) is allowed, bd
    assert not space.allows({**base, "BLOCK_D": 8, "BLOCK_R": 8}, shape, CPU_PROPS)
