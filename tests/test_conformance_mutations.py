"""Mutation testing of the conformance suite: bugs planted one at a time in a backend's kernels
must make the suite report that backend, and only that backend, as failing (issue 11).

Each bug is one that an earlier version of the suite missed: a chunk loop that skips the last row
of every full chunk, an upstream gradient compared approximately, the reusable gradient buffer
handed out while the caller still holds it, NaN at ignored rows in the PyTorch default-call
kernel, `empty="nan"` forgotten by NumPy's default-call kernel, and a backward that divides by a
zero expected upstream gradient. The suite runs NumPy and PyTorch (both in this process, so the
planted bug is seen) on a handful of cases, every kernel of each (conformance/runner.py ENGINES).
"""

from __future__ import annotations

import pytest

from support import require_or_skip

CASES = ["ntc", "mask", "weights", "garbage_ignored", "all_ignored_mean_nan"]


def _suite():
    from xseqloss.cli import _suite
    return _suite()


def _skip_last_row_of_full_chunks(monkeypatch):
    from xseqloss.backends import torch as tb

    real = tb._chunks

    def chunks(z, k, chunk_elements):
        kk, gen = real(z, k, chunk_elements)
        C = z.shape[k]
        rows = max(1, chunk_elements // max(C, 1))

        def bad():
            for idx in gen:
                s = idx[0]
                if kk == 1 and s.stop - s.start == rows and rows > 1:  # a full chunk of rows
                    idx = (slice(s.start, s.stop - 1),) + idx[1:]
                yield idx
        return kk, bad()
    monkeypatch.setattr(tb, "_chunks", chunks)


def _approximate_upstream(monkeypatch):
    import torch

    from xseqloss.backends import torch as tb

    real = tb._upstream_factor

    def factor(dl, hint):
        if hint is not None and torch.allclose(dl, hint, rtol=1e-3):
            return None  # "close enough": keeps the gradient formed for the expected upstream
        return real(dl, hint)
    monkeypatch.setattr(tb, "_upstream_factor", factor)


def _zero_hint_divides(monkeypatch):
    import torch

    from xseqloss.backends import torch as tb

    def factor(dl, hint):
        if hint is None:
            return dl
        if torch.equal(dl, hint):
            return None
        return dl / hint  # 0 / 0 at rows whose expected upstream was 0
    monkeypatch.setattr(tb, "_upstream_factor", factor)


def _buffer_handed_out_while_held(monkeypatch):
    from xseqloss.backends import torch as tb

    if tb._BUFFERS is None:
        pytest.skip("this torch has no storage use counts: no reusable buffer to break")
    monkeypatch.setattr(tb._BUFFERS, "_uses", lambda t: tb._BUFFERS.idle)  # "nobody else holds it"


def _nan_at_ignored_rows(monkeypatch):
    import torch

    from xseqloss.backends import torch as tb

    real = tb._native_default_loss

    def native(self, st, z, y):
        with monkeypatch.context() as m:  # the guard that zeroes non-finite ignored rows, skipped
            m.setattr(torch, "isfinite", lambda x: torch.ones_like(x, dtype=torch.bool))
            return real(self, st, z, y)
    monkeypatch.setattr(tb.TorchBackend, "native_default_loss", native)


def _numpy_empty_nan_forgotten(monkeypatch):
    import numpy as np

    from xseqloss.backends import numpy as nb

    real = nb._native_default_loss

    def native(self, st, z, y):
        out = real(self, st, z, y)
        if out is not None and st.opts.reduction == "mean" and np.isnan(out):
            return np.asarray(0.0, out.dtype)  # the empty mean as 0, whatever `empty` says
        return out
    monkeypatch.setattr(nb.NumpyBackend, "native_default_loss", native)


MUTATIONS = {
    "torch: chunk loop skips the last row of full chunks": ("torch", _skip_last_row_of_full_chunks),
    "torch: upstream gradient compared approximately": ("torch", _approximate_upstream),
    "torch: backward divides by a zero expected upstream": ("torch", _zero_hint_divides),
    "torch: gradient buffer handed out while held": ("torch", _buffer_handed_out_while_held),
    "torch: NaN at ignored rows of the default-call kernel": ("torch", _nan_at_ignored_rows),
    "numpy: empty='nan' forgotten by the default-call kernel": ("numpy", _numpy_empty_nan_forgotten),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_planted_bug_fails_exactly_its_backend(monkeypatch, name):
    require_or_skip("torch")
    backend, plant = MUTATIONS[name]
    suite = _suite()
    plant(monkeypatch)
    report = suite.run(backends=["numpy", "torch"], cases=CASES, compiled=False, errors=False)
    failing = {r["backend"] for r in report["results"] if not r["passed"]}
    assert failing == {backend}, f"{name}: expected only {backend} to fail, got {failing or 'none'}"


def test_the_same_cases_pass_unmutated():
    require_or_skip("torch")
    report = _suite().run(backends=["numpy", "torch"], cases=CASES, compiled=False, errors=False)
    fails = [(r["backend"], r.get("engine"), r["case"], r["check"]) for r in report["results"] if not r["passed"]]
    assert report["results"] and not fails, fails
