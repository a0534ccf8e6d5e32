"""The Triton kernel's interpreter checks on the newest Triton release too (issue 27 item 5).

constraints.txt pins the Triton of the GPU machine (tests/test_triton_kernel.py runs the checks
with it); users of the newest PyTorch get the newest Triton, pinned in constraints-triton-newest.txt.
pip cannot install two versions into one environment, so this test installs the newest one with
``pip install --no-deps --target`` into a cache folder of its own (once per machine and version:
$XSEQLOSS_TRITON_CACHE, else ~/.cache/xseqloss/triton-<version>) and runs the same interpreter
checks in a subprocess with that folder first on PYTHONPATH. A Triton that cannot be installed
skips, unless XSEQLOSS_REQUIRE_BACKENDS asks for torch (or "all", as CI does): then it fails.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from helpers.support import required_backends
from helpers.triton_runs import INTERPRET_CHECKS, require_triton, result, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIN_FILE = os.path.join(ROOT, "constraints-triton-newest.txt")


def newest_version():
    pins = [ln.split("#")[0].strip() for ln in open(PIN_FILE)]
    pins = [p for p in pins if p]
    assert len(pins) == 1 and pins[0].startswith("triton=="), f"{PIN_FILE}: one line triton==X.Y.Z, got {pins}"
    return pins[0].split("==", 1)[1]


def _fail_or_skip(why):
    if "torch" in required_backends():
        pytest.fail(f"{why} (XSEQLOSS_REQUIRE_BACKENDS asks for torch, whose kernels run on Triton)", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def newest_triton():
    """The folder holding the newest Triton (installed there on first use)."""
    require_triton()
    version = newest_version()
    cache = os.environ.get("XSEQLOSS_TRITON_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "xseqloss")
    target = os.path.join(cache, f"triton-{version}")
    if not os.path.isfile(os.path.join(target, "triton", "__init__.py")):
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".triton-{version}-", dir=cache)
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", tmp,
                                   f"triton=={version}"], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            shutil.rmtree(tmp, ignore_errors=True)
            _fail_or_skip(f"pip install triton=={version} timed out")
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            _fail_or_skip(f"pip could not install triton=={version}: {proc.stderr.strip()[-1500:]}")
        shutil.rmtree(target, ignore_errors=True)  # an earlier install cut short
        try:
            os.rename(tmp, target)  # atomic: a concurrent run sees a whole install or none
        except OSError:  # another run installed it first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.mark.parametrize("name", INTERPRET_CHECKS)
def test_kernel_in_interpreter_on_the_newest_triton(newest_triton, name):
    detail = result("interpret", name, newest_triton)
    if name == "available":  # the subprocess ran the pinned release, not the environment's Triton
        assert detail.endswith(f"Triton {newest_version()}"), detail


def test_every_check_runs_on_the_newest_triton(newest_triton):
    results, why = run("interpret", newest_triton)
    assert results is not None, why
    assert sorted(results) == sorted(INTERPRET_CHECKS)
