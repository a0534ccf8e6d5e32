"""The Triton kernel through xseqloss's own API on CPU (issue 15, API.md 10): with TRITON_INTERPRET=1
and the torch engine forced to "triton", the conformance suite's subset for the kernel
(conformance/runner.py TRITON_CASES: every option it covers, float32 and bfloat16, C = 32000 across
blocks, NaN in rows that do not count, p(y) -> 1 in bfloat16) against the float64 reference, the
fused output layer on the kernel, and Liger-Kernel issue 272's pattern through the public call.

Each runs in a subprocess: Triton fixes interpreter mode when the kernel module is first imported.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers.triton_runs import require_triton as _require_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(code: str, timeout: int = 420) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", XSEQLOSS_TORCH_KERNEL="triton")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


SPY = """
import json, sys
sys.path.insert(0, ".")
from xseqloss.internals import part; torch_triton = part("torch", "triton")
calls = [0]
_orig = torch_triton.token_loss_triton
def _spy(*a, **k):
    calls[0] += 1
    return _orig(*a, **k)
torch_triton.token_loss_triton = _spy
"""


def test_conformance_subset_on_the_triton_kernel():
    _require_triton()
    out = _child(SPY + """
    from conformance import runner
    # blocks of 4 classes: the suite's 6- and 7-class cases cross block boundaries; C = 32000 in the
    # interpreter would take minutes (it runs on the GPU, benchmarks/gpu.sh)
    torch_triton.INTERPRET_MAX_BLOCK = 4
    rep = runner.run_engine("torch", "triton", exclude=("vocab*",),
                            progress=lambda m: print(m, file=sys.stderr, flush=True))
    rep["not_applicable"] = []
    tri = [r for r in rep["results"] if r["engine"] == "triton"]
    bad = [(r["case"], r["dtype"], r.get("check"), r.get("detail", "")[:200]) for r in rep["results"] if not r["passed"]]
    print(json.dumps({"triton": len(tri), "dtypes": sorted({r["dtype"] for r in tri}),
                      "cases": len({r["case"] for r in tri}), "failed": bad, "calls": calls[0],
                      "not_applicable": rep["not_applicable"]}))
    """.replace("\n    ", "\n"))
    assert out["failed"] == [], out["failed"]
    assert out["dtypes"] == ["bfloat16", "float32"] and out["cases"] >= 38, out
    assert out["calls"] >= out["cases"], "the Triton kernel did not run for every case"
    assert not [n for n in out["not_applicable"] if "triton" in n["reason"]], out["not_applicable"]


def test_public_calls_run_the_kernel_and_bump_the_version_counter():
    """Liger-Kernel issue 272: a softmax saves its output for backward; the loss's gradient written
    in place into that output must not silently corrupt the softmax's gradient. The kernel bumps the
    version counter, so autograd raises; out of place, the softmax's gradient is the chunked one."""
    _require_triton()
    out = _child(SPY + """
    import torch, xseqloss as xsl
    from xseqloss.internals import engine as _engine
    torch.manual_seed(0)
    x = torch.randn(2, 3, 70, requires_grad=True)
    y = torch.randint(0, 70, (2, 3))
    p = torch.softmax(x, -1)  # softmax's backward reads p
    raised = ""
    try:
        xsl.sequence_cross_entropy(p, y, inplace_backward=True).backward()
    except RuntimeError as e:
        raised = str(e)
    after_inplace = calls[0]
    grads = {}
    for k in ("triton", "chunked"):
        x.grad = None
        with _engine.use("torch", k):
            xsl.sequence_cross_entropy(torch.softmax(x, -1), y, label_smoothing=0.1).backward()
        grads[k] = x.grad.clone()
    h = torch.randn(2, 3, 8, requires_grad=True); w = torch.randn(70, 8, requires_grad=True)
    before = calls[0]
    xsl.linear_cross_entropy(h, w, y, chunk_size=4, z_loss=1e-3).backward()
    lin_calls = calls[0] - before
    gh = h.grad.clone(); h.grad = None
    xsl.sequence_cross_entropy(h @ w.t(), y, z_loss=1e-3).backward()
    print(json.dumps({"raised": raised, "after_inplace": after_inplace,
                      "softmax_grad_diff": float((grads["triton"] - grads["chunked"]).abs().max()),
                      "linear_calls": lin_calls, "linear_dh_diff": float((gh - h.grad).abs().max())}))
    """.replace("\n    ", "\n"), timeout=240)
    assert out["after_inplace"] >= 1, "the in-place call did not run the Triton kernel"
    assert "modified by an inplace operation" in out["raised"], out
    assert out["softmax_grad_diff"] < 1e-6, out
    assert out["linear_calls"] == 2, out  # 6 tokens in chunks of 4: the fused layer runs the kernel per chunk
    assert out["linear_dh_diff"] < 1e-5, out
