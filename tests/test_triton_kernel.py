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

import os
import subprocess
import sys

import pytest

from helpers.triton_runs import COMPILE_CHECKS, INTERPRET_CHECKS, require_triton, result, run

HERE = os.path.dirname(os.path.abspath(__file__))


def _result(mode, name):
    require_triton()
    return result(mode, name)


@pytest.mark.parametrize("name", INTERPRET_CHECKS)
def test_kernel_in_interpreter(name):
    _result("interpret", name)


@pytest.mark.parametrize("name", COMPILE_CHECKS)
def test_kernel_compiles_for_h200(name):
    _result("compile", name)


def test_every_check_is_listed():
    """A check added to the script but not listed here would never be asserted."""
    require_triton()
    for mode, listed in (("interpret", INTERPRET_CHECKS), ("compile", COMPILE_CHECKS)):
        results, why = run(mode)
        assert results is not None, why
        assert sorted(results) == sorted(listed), (mode, sorted(results))


def test_import_xseqloss_imports_neither_torch_nor_triton():
    code = ("import sys, xseqloss; bad = [m for m in ('torch', 'triton') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(HERE))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
