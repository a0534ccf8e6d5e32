"""The XSEQLOSS_REQUIRE_BACKENDS rule of tests/conftest.py: a framework that
cannot be imported is skipped locally but is an error when required, so a
broken install cannot give a quietly skipped, green CI run."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_TEST = "tests/test_errors.py::test_C1_is_valid"


def run_pytest(tmp_path, require):
    # a `torch` package that fails to import shadows the real one
    fake = tmp_path / "torch"
    fake.mkdir(exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is broken (test stub)')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT])
    env.pop("XSEQLOSS_REQUIRE_BACKENDS", None)
    if require is not None:
        env["XSEQLOSS_REQUIRE_BACKENDS"] = require
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         f"{ONE_TEST}[torch]", f"{ONE_TEST}[numpy]"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_missing_framework_is_skipped_when_not_required(tmp_path):
    proc = run_pytest(tmp_path, None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout, proc.stdout


def test_missing_framework_is_an_error_when_required(tmp_path):
    for require in ("torch", "all", "numpy, torch"):
        proc = run_pytest(tmp_path, require)
        assert proc.returncode != 0, proc.stdout + proc.stderr
        assert "XSEQLOSS_REQUIRE_BACKENDS" in proc.stdout + proc.stderr
        assert "torch" in proc.stdout + proc.stderr


def test_unknown_required_name_is_an_error(tmp_path):
    proc = run_pytest(tmp_path, "pytorch-typo")
    assert proc.returncode != 0
    assert "unknown backend" in proc.stdout + proc.stderr
