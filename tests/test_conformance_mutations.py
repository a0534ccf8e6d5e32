"""Mutation testing of the conformance suite: bugs planted one at a time in a backend's kernels
must make the suite report that backend, and only that backend, as failing (issue 11).

Each bug is one that an earlier version of the suite missed: a chunk loop that skips the last row
of every full chunk, an upstream gradient compared approximately, the reusable gradient buffer
handed out while the caller still holds it, NaN at ignored rows in the PyTorch default-call
kernel, ignored tokens counted by NumPy's default-call kernel, and a backward that divides by a
zero expected upstream gradient. The suite runs NumPy and PyTorch (both in this process, so the
planted bug is seen) on a handful of cases, every kernel of each (conformance/runner.py ENGINES).
"""

from __future__ import annotations

import pytest

from helpers.support import require_or_skip

CASES = ["ntc", "mask", "weights", "garbage_ignored", "all_ignored_mean_nan"]


def _suite():
    from xseqloss.cli import _suite
    return _suite()


def _skip_last_row_of_full_chunks(monkeypatch):
    from xseqloss.internals import part

    fused = part("torch", "fused")
    real = fused._chunks

    def chunks(z, k, chunk_elements, C_rows=None):
        kk, gen = real(z, k, chunk_elements, C_rows)
        C = z.shape[k]
        rows = max(1, chunk_elements // max(C, 1))

        def bad():
            for idx in gen:
                s = idx[0]
                if kk == 1 and s.stop - s.start == rows and rows > 1:  # a full chunk of rows
                    idx = (slice(s.start, s.stop - 1),) + idx[1:]
                yield idx
        return kk, bad()
    monkeypatch.setattr(fused, "_chunks", chunks)


def _approximate_upstream(monkeypatch):
    import torch

    from xseqloss.internals import core

    real = core.backward.is_formed

    def is_formed(ops, dl, formed, keep=None):
        if torch.allclose(dl, formed, rtol=1e-3):
            return torch.tensor(True)  # "close enough": keeps the gradient formed for the expected upstream
        return real(ops, dl, formed, keep)
    monkeypatch.setattr(core.backward, "is_formed", is_formed)


def _zero_hint_divides(monkeypatch):
    import torch

    from xseqloss.internals import core

    def upstream(ops, dl, formed, keep=None, per_row=True):
        return core.backward.Upstream(torch.equal(dl, formed), dl / formed,  # 0 / 0 at rows whose expected upstream was 0
                                      torch.tensor(False))
    monkeypatch.setattr(core.backward, "upstream", upstream)


def _buffer_handed_out_while_held(monkeypatch):
    from xseqloss.internals import part

    buffers = part("torch", "buffers")
    if buffers._BUFFERS is None:
        pytest.skip("this torch has no storage use counts: no reusable buffer to break")
    monkeypatch.setattr(buffers._BUFFERS, "_uses", lambda t: buffers._BUFFERS.idle)  # "nobody else holds it"


def _nan_at_ignored_rows(monkeypatch):
    import torch

    from xseqloss.internals import backend

    cls = type(backend("torch"))
    real = cls.default_token_loss

    def native(self, st, z, y, *a):
        with monkeypatch.context() as m:  # the guard that zeroes non-finite ignored rows, skipped
            m.setattr(torch, "isfinite", lambda x: torch.ones_like(x, dtype=torch.bool))
            return real(self, st, z, y, *a)
    monkeypatch.setattr(cls, "default_token_loss", native)


def _numpy_counts_ignored_tokens(monkeypatch):
    from xseqloss.internals import backend

    cls = type(backend("numpy"))
    real = cls.default_token_loss

    def native(self, st, z, y, *a):
        out = real(self, st, z, y, *a)
        if out is None or st.opts.reduction != "mean" or out[1] == 0:
            return out
        return out[0] * out[1] / y.size, y.size, out[2]  # "every token counts": the mean divides by all
    monkeypatch.setattr(cls, "default_token_loss", native)


MUTATIONS = {
    "torch: chunk loop skips the last row of full chunks": ("torch", _skip_last_row_of_full_chunks),
    "torch: upstream gradient compared approximately": ("torch", _approximate_upstream),
    "torch: backward divides by a zero expected upstream": ("torch", _zero_hint_divides),
    "torch: gradient buffer handed out while held": ("torch", _buffer_handed_out_while_held),
    "torch: NaN at ignored rows of the default-call kernel": ("torch", _nan_at_ignored_rows),
    "numpy: the default-call kernel counts ignored tokens": ("numpy", _numpy_counts_ignored_tokens),
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


# ------------------------------------------------------------------ token_stats (API.md 11)

# T = 0.5, 1.5, a per-token temperature (and T = 1, which the planted bug cannot move)
STATS_CASES = ["st_nct_t05/float32", "st_tnc_t15_mask/float64", "st_temp_token_mask/float32", "st_ntc/float32"]


def _stats_cases():
    from conformance.stats_cases import expand_stats

    cases = [c for c in expand_stats() if c.name in STATS_CASES]
    assert sorted(c.name for c in cases) == sorted(STATS_CASES)
    return cases


def _entropy_at_temperature_squared(monkeypatch):
    """The published double-temperature bug (RL-Align/RL-Kernel #81), in one backend's entropy only:
    the entropy (and its gradient) of softmax(z / T^2); log_prob and lse stay right."""
    from xseqloss.internals import backend

    cls = type(backend("torch"))
    real = cls.token_stats_rows

    def rows(self, st, z, y, ids, keep, temp, acc):
        out = real(self, st, z, y, ids, keep, temp, acc)
        if "entropy" in out and temp is not None:
            out = dict(out)
            out["entropy"] = real(self, st, z, y, ids, keep, temp * temp, acc)["entropy"]
        return out
    monkeypatch.setattr(cls, "token_stats_rows", rows)


def _failing_stats(backends):
    from conformance.adapters import ADAPTERS
    from conformance.stats_checks import run_stats

    failing = {}
    for name in backends:
        recs = run_stats(ADAPTERS[name], "cpu", _stats_cases(), compiled=False)
        assert recs, name
        failing[name] = sorted({(r["case"], r["check"]) for r in recs if not r["passed"]})
    return failing


def test_planted_double_temperature_in_torch_entropy_fails_the_stats_checks(monkeypatch):
    require_or_skip("torch")
    _entropy_at_temperature_squared(monkeypatch)
    failing = _failing_stats(["numpy", "torch"])
    assert failing["numpy"] == [], failing["numpy"]
    # every case with T != 1 fails on torch, in its values and its gradient; T = 1 cannot show it
    cases = {c for c, _ in failing["torch"]}
    assert cases == {f"stats:{n}" for n in STATS_CASES if not n.startswith("st_ntc/")}, failing["torch"]
    assert {k for _, k in failing["torch"]} == {"stats", "stats_vjp"}, failing["torch"]


def test_the_same_stats_cases_pass_unmutated():
    require_or_skip("torch")
    failing = _failing_stats(["numpy", "torch"])
    assert failing == {"numpy": [], "torch": []}, failing
