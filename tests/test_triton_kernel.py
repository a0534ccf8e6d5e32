"""The Triton kernel for PyTorch CUDA (xseqloss/backends/torch/triton.py, issue 15), checked on CPU.

The checks live in helpers/triton_kernel_script.py and run in two subprocesses, one each:
* "interpret": with TRITON_INTERPRET=1 set before Triton is imported, the kernel runs on CPU tensors
  through Triton's interpreter and is compared with a float64 NumPy implementation of its formula
  (every option, float32/float16/bfloat16, block boundaries, p(y) -> 1 in bfloat16, logits near
  +-1e4 and +-3e4, -inf at zero-mass classes, garbage in dropped rows, in place, the version counter
  and Liger-Kernel issue 272's pattern);
* "compile": without the interpreter, the kernel is compiled ahead of time for sm_90 (the H200) with
  this Triton, no GPU needed, and its IR shows 64-bit row offsets.
Subprocesses keep the interpreter out of this pytest process (Triton reads TRITON_INTERPRET when a
kernel is decorated), and one subprocess per mode runs many checks for one start-up.

Triton is required like a framework: missing, these tests skip, unless XSEQLOSS_REQUIRE_BACKENDS
asks for torch (or "all"), where a missing Triton is an error (CI installs it).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers.support import require_or_skip, required_backends

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "helpers", "triton_kernel_script.py")

INTERPRET_CHECKS = [
    "available", "shapes_float32", "options_float32", "options_bfloat16", "options_float16",
    "dropped_rows_exact_zero", "true_class_bfloat16_p_to_1", "large_logits_exact",
    "minus_inf_at_zero_mass_class", "loss_only_matches", "in_place", "liger_272_version_counter",
    "empty_and_errors", "launch_config",
]
COMPILE_CHECKS = ["lazy_import", "compiles_for_sm90"]


def _require_triton():
    require_or_skip("torch")
    if importlib.util.find_spec("triton") is None:
        if "torch" in required_backends():
            pytest.fail("triton is required with the torch backend (XSEQLOSS_REQUIRE_BACKENDS) but is not "
                        "installed: pip install -c constraints.txt triton", pytrace=False)
        pytest.skip("triton is not installed (pip install -c constraints.txt triton)")


_RUNS = {}


def _run(mode):
    if mode not in _RUNS:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        if mode == "interpret":
            env["TRITON_INTERPRET"] = "1"
        try:
            proc = subprocess.run([sys.executable, SCRIPT, mode], capture_output=True, text=True, env=env,
                                  timeout=240, cwd=os.path.dirname(HERE))
        except subprocess.TimeoutExpired as exc:
            _RUNS[mode] = (None, f"timed out after {exc.timeout} s")
        else:
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                _RUNS[mode] = (None, f"exit {proc.returncode}\nstdout tail:\n{proc.stdout[-2000:]}\n"
                                     f"stderr tail:\n{proc.stderr[-4000:]}")
            else:
                _RUNS[mode] = (json.loads(lines[-1]), "")
    return _RUNS[mode]


def _result(mode, name):
    _require_triton()
    results, why = _run(mode)
    assert results is not None, f"the {mode} subprocess failed: {why}"
    assert name in results, f"check {name!r} did not run (got {sorted(results)})"
    r = results[name]
    assert r["ok"], f"{name}:\n{r['detail']}"
    return r["detail"]


@pytest.mark.parametrize("name", INTERPRET_CHECKS)
def test_kernel_in_interpreter(name):
    _result("interpret", name)


@pytest.mark.parametrize("name", COMPILE_CHECKS)
def test_kernel_compiles_for_h200(name):
    _result("compile", name)


def test_every_check_is_listed():
    """A check added to the script but not listed here would never be asserted."""
    _require_triton()
    for mode, listed in (("interpret", INTERPRET_CHECKS), ("compile", COMPILE_CHECKS)):
        results, why = _run(mode)
        assert results is not None, why
        assert sorted(results) == sorted(listed), (mode, sorted(results))


def test_import_xseqloss_imports_neither_torch_nor_triton():
    code = ("import sys, xseqloss; bad = [m for m in ('torch', 'triton') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(HERE))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
