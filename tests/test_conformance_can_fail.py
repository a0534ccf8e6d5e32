"""The conformance suite can fail, and its command line works.

A suite that never fails proves nothing: perturbing one framework function that
one backend really calls must make that backend, and only that backend, fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_KEYS = {"backend", "device", "dtype", "case", "check", "error", "tolerance", "passed"}


def _suite():
    from xseqloss.cli import _suite
    return _suite()  # xseqloss._conformance, installed or loaded from the repository's conformance/


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def test_perturbed_torch_kernel_fails_torch_only(monkeypatch):
    from helpers.support import require_or_skip

    require_or_skip("torch")  # an error, not a skip, when XSEQLOSS_REQUIRE_BACKENDS asks for torch
    import torch

    suite = _suite()
    # The torch backend's fused plain kernel (xseqloss/backends/torch/ops.py, plain_rows) takes the
    # logsumexp as m + s.log(): make Tensor.log 1e-3 too large, so every token's loss is off by 1e-3.
    # Nothing outside the torch backend calls torch.Tensor.log (torch's own F.cross_entropy, the
    # native comparison, runs in C++).
    real = torch.Tensor.log
    calls = []

    def perturbed(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs) + 1e-3

    monkeypatch.setattr(torch.Tensor, "log", perturbed)
    # small default calls run F.cross_entropy itself (backends/torch.py, _native_default_loss), the
    # very function the native comparison calls: send them through the fused kernel, as large ones
    from xseqloss.internals import engine as _engine
    with _engine.use("torch", "chunked"):  # numpy beside it: only torch may fail
        report = suite.run(backends=["numpy", "torch"], cases=["ntc", "nct", "mask"], compiled=False,
                           errors=False, engines=False)
    assert calls, "the torch backend no longer calls torch.Tensor.log: perturb a function it does call"
    failing = {r["backend"] for r in report["results"] if not r["passed"]}
    assert failing == {"torch"}, f"expected only torch to fail, got {failing}"
    torch_fails = {(r["check"], r["dtype"]) for r in report["results"]
                   if r["backend"] == "torch" and not r["passed"]}
    # 1e-3 is beyond the float32 / float64 tolerances (and disagrees with torch's own loss),
    # within float16 / bfloat16's
    assert {("value", "float32"), ("value", "float64"), ("native", "float64")} <= torch_fails
    assert not any(dt in ("float16", "bfloat16") for _, dt in torch_fails)


def test_unperturbed_subset_passes():
    suite = _suite()
    report = suite.run(backends=["numpy"], cases=["ntc", "mask"], compiled=False, errors=False)
    assert report["results"] and not suite.failures(report)


def test_cli_conformance_quick_writes_json(tmp_path):
    out = tmp_path / "report.json"
    md = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, "-m", "xseqloss", "conformance", "--backends", "numpy", "--quick",
                           "--json", str(out), "--markdown", str(md)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert set(report) >= {"environment", "results"}
    env = report["environment"]
    assert {"python", "platform", "versions", "devices", "date", "xseqloss"} <= set(env)
    assert report["results"]
    for r in report["results"]:
        assert REQUIRED_KEYS <= set(r)
        assert r["backend"] == "numpy"
    assert {r["check"] for r in report["results"]} >= {"value", "grad", "deterministic", "errors"}
    assert "| backend | device | engine | dtype |" in md.read_text()
    assert "numpy/cpu" in proc.stdout  # the summary table
    assert "[conformance]" in proc.stderr  # progress goes to stderr
    fails = [r for r in report["results"] if not r["passed"]]
    assert proc.returncode == (1 if fails else 0)
    assert proc.returncode == 0, "failing checks:\n" + "\n".join(
        f"{r['case']} {r['check']} {r['error']} {r['detail']}" for r in fails)


def test_cli_conformance_unknown_backend_is_a_usage_error(tmp_path):
    from xseqloss.cli import main
    assert main(["conformance", "--backends", "mxnet"]) == 2


def test_cli_crosscheck_npz(tmp_path, capsys):
    from xseqloss.cli import main
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 3)).astype(np.float32)
    targets = rng.integers(0, 5, (2, 3))
    targets[0, 1] = -100
    path = tmp_path / "batch.npz"
    np.savez(path, logits=logits, targets=targets, mask=np.array([[1, 1, 1], [1, 1, 0]], bool))
    rc = main(["crosscheck", str(path), "--layout", "NCT", "--reduction", "sum", "--label-smoothing", "0.1",
               "--backends", "numpy"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "reference" in out and "numpy/cpu" in out and "ok" in out


def test_cli_crosscheck_npy_needs_targets(tmp_path, capsys):
    from xseqloss.cli import main
    np.save(tmp_path / "logits.npy", np.zeros((2, 3, 4), np.float32))
    assert main(["crosscheck", str(tmp_path / "logits.npy")]) == 2
    np.save(tmp_path / "targets.npy", np.zeros((2, 3), np.int64))
    assert main(["crosscheck", str(tmp_path / "logits.npy"), "--targets", str(tmp_path / "targets.npy"),
                 "--backends", "numpy"]) == 0
