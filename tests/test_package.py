"""Package shape and command line: imports, console script, errors, backend selection."""

import os
import subprocess
import sys

import pytest

from scanopt import _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env_extra=None, code=None):
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "scanopt", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_reference_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['triton'] = None\n"
        "import scanopt.reference as r\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(len(r.__all__))"
    )
    proc = _run(code=code)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 12


def test_import_scanopt_has_no_heavy_side_effects():
    code = "import sys, scanopt; print('torch' in sys.modules, 'triton' in sys.modules)"
    proc = _run(code=code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_public_names_resolve_lazily():
    import scanopt

    assert "selective_scan_fn" in dir(scanopt)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        scanopt.nope  # noqa: B018


def test_subpackages_live_under_scanopt():
    import scanopt.autotune
    import scanopt.ops
    import scanopt.reference

    for mod in (scanopt.ops, scanopt.reference, scanopt.autotune):
        assert mod.__name__.startswith("scanopt.")


def test_cli_help_and_info():
    proc = _run("--help")
    assert proc.returncode == 0 and "verify" in proc.stdout and "info" in proc.stdout
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    for key in ("scanopt", "torch", "triton", "device", "SCANOPT_BACKEND", "user configs"):
        assert key in proc.stdout


@pytest.mark.parametrize("args", [["--bogus"], ["verify", "--bogus"], ["nosuchcommand"]])
def test_cli_unknown_arguments_give_one_line_error(args):
    proc = _run(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scanopt") and "error" in lines[0]


def test_cli_verify_rejects_unknown_op():
    proc = _run("verify", "--op", "nosuchop")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("SCANOPT_BACKEND", "auto")
    assert _env.backend_for("cuda") == "triton"
    assert _env.backend_for("cpu") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _env.backend_for("cpu") == "triton"
    monkeypatch.setenv("SCANOPT_BACKEND", "torch")
    assert _env.backend_for("cuda") == "torch"
    monkeypatch.setenv("SCANOPT_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _env.backend_for("cpu")
    monkeypatch.setenv("SCANOPT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SCANOPT_BACKEND must be one of"):
        _env.backend_for("cpu")
