"""The Triton kernel's check script (helpers/triton_kernel_script.py) run in a subprocess, once per
mode and Triton install, for tests/test_triton_kernel.py and tests/test_triton_newest.py."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from .support import require_or_skip, required_backends

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
SCRIPT = os.path.join(HERE, "helpers", "triton_kernel_script.py")

INTERPRET_CHECKS = [
    "available", "shapes_float32", "options_float32", "options_bfloat16", "options_float16",
    "dropped_rows_exact_zero", "true_class_bfloat16_p_to_1", "large_logits_exact",
    "minus_inf_at_zero_mass_class", "loss_only_matches", "in_place", "liger_272_version_counter",
    "empty_and_errors", "launch_config",
]
COMPILE_CHECKS = ["lazy_import", "compiles_for_sm90"]


def require_triton():
    require_or_skip("torch")
    if importlib.util.find_spec("triton") is None:
        if "torch" in required_backends():
            pytest.fail("triton is required with the torch backend (XSEQLOSS_REQUIRE_BACKENDS) but is not "
                        "installed: pip install -c constraints.txt triton", pytrace=False)
        pytest.skip("triton is not installed (pip install -c constraints.txt triton)")


_RUNS = {}


def run(mode, triton_path=None):
    """(the script's results, or None; why not) for ``mode`` ("interpret" or "compile"), with the
    Triton installed in the environment, or the one in the folder ``triton_path`` (put first on
    PYTHONPATH)."""
    key = (mode, triton_path)
    if key not in _RUNS:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        if mode == "interpret":
            env["TRITON_INTERPRET"] = "1"
        if triton_path is not None:
            env["PYTHONPATH"] = os.pathsep.join([triton_path] + [p for p in [env.get("PYTHONPATH")] if p])
        try:
            proc = subprocess.run([sys.executable, SCRIPT, mode], capture_output=True, text=True, env=env,
                                  timeout=240, cwd=os.path.dirname(HERE))
        except subprocess.TimeoutExpired as exc:
            _RUNS[key] = (None, f"timed out after {exc.timeout} s")
        else:
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                _RUNS[key] = (None, f"exit {proc.returncode}\nstdout tail:\n{proc.stdout[-2000:]}\n"
                                    f"stderr tail:\n{proc.stderr[-4000:]}")
            else:
                _RUNS[key] = (json.loads(lines[-1]), "")
    return _RUNS[key]


def result(mode, name, triton_path=None):
    """The detail of check ``name``, asserting that it passed."""
    results, why = run(mode, triton_path)
    assert results is not None, f"the {mode} subprocess failed: {why}"
    assert name in results, f"check {name!r} did not run (got {sorted(results)})"
    r = results[name]
    assert r["ok"], f"{name}:\n{r['detail']}"
    return r["detail"]
