"""The reference checks itself: float64 central differences and identities.

The reference is what every backend is measured against, so its gradient is
checked against finite differences and its value against identities that any
correct cross-entropy satisfies (none of which use xseqloss).
"""

from __future__ import annotations

import numpy as np
import pytest

from . import cases
from .reference import reference

FD_CASES = ["mix_uniform", "mix_others", "zloss_mix", "softcap_zloss_mix", "soft_others_mix", "log_probs_mix",
            "probs_mix", "red_per_sequence_tokens", "red_per_position_weights", "red_sequence_mean_positions",
            "normalizer_sequence_mean", "empty_sequence_nan", "nct", "cnt", "c"]


def _fd(case, h=1e-6):
    x = case.arrays["logits"]
    kw = case.kwargs()
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        if not np.isfinite(x[i]):
            continue
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        vp = reference(xp, case.arrays["targets"], layout=case.layout, **kw)[0]
        vm = reference(xm, case.arrays["targets"], layout=case.layout, **kw)[0]
        g[i] = (np.nansum(vp) - np.nansum(vm)) / (2 * h)
    return g


@pytest.mark.parametrize("name", FD_CASES)
def test_gradient_matches_finite_differences(name):
    spec = next(s for s in cases.BASE_CASES if s["name"] == name)
    case = cases.make_case(spec, "float64")
    _, g = reference(case.arrays["logits"], case.arrays["targets"], layout=case.layout, **case.kwargs())
    h = 1e-9 if case.options.get("inputs") == "probs" else 1e-6
    np.testing.assert_allclose(g, _fd(case, h), atol=2e-6, rtol=1e-5)


def _data(seed=0, N=3, T=4, C=5):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 2, (N, T, C)), rng.integers(0, C, (N, T)), rng


def test_index_equals_one_hot_soft_target():
    x, y, rng = _data()
    cw = rng.uniform(0.5, 2, 5)
    q = np.eye(5)[y]
    for eps in (0.0, 0.2):
        a = reference(x, y, label_smoothing=eps, reduction="none", class_weights=cw)[0]
        b = reference(x, q, label_smoothing=eps, reduction="none", class_weights=cw)[0]
        np.testing.assert_allclose(a, b, rtol=1e-13)


def test_others_equals_uniform_with_rescaled_eps():
    x, y, _ = _data(1)
    C, eps = 5, 0.3
    a = reference(x, y, label_smoothing=eps, smoothing="others", reduction="none")[0]
    b = reference(x, y, label_smoothing=eps * C / (C - 1), reduction="none")[0]
    np.testing.assert_allclose(a, b, rtol=1e-13)


def test_masked_equals_dropped_and_lengths_equal_prefix_mask():
    x, y, rng = _data(2)
    lengths = np.array([4, 2, 0])
    prefix = np.arange(4)[None, :] < lengths[:, None]
    x_garbage = np.where(prefix[..., None], x, np.nan)
    a = reference(x_garbage, y, lengths=lengths)
    b = reference(x, y, mask=prefix)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-14)
    np.testing.assert_array_equal(np.nan_to_num(a[1], nan=9.0), b[1])
    kept = reference(x[prefix][None], y[prefix][None])[0]
    np.testing.assert_allclose(a[0], kept, rtol=1e-14)


def test_layout_permutation_invariance():
    x, y, _ = _data(3)
    base = reference(x, y, reduction="none", label_smoothing=0.1)[0]
    for layout in ("NCT", "TNC", "CTN"):
        perm = ["NTC".index(a) for a in layout]
        got = reference(np.transpose(x, perm), np.transpose(y, [p for p in perm if p != 2]), layout=layout,
                        reduction="none", label_smoothing=0.1)[0]
        np.testing.assert_allclose(got, np.transpose(base, [p for p in perm if p != 2]), rtol=1e-14)


def test_uniform_logits_give_log_C_and_bounds():
    C = 7
    y = np.array([[0, 3, 6]])
    np.testing.assert_allclose(reference(np.zeros((1, 3, C)), y, reduction="none")[0], np.log(C), rtol=1e-14)
    x, y, _ = _data(4)
    l = reference(x, y, reduction="none")[0]
    gap = x.max(-1) - np.take_along_axis(x, y[..., None], -1)[..., 0]
    assert np.all(l >= gap - 1e-12) and np.all(l <= gap + np.log(5) + 1e-12)


def test_reductions_are_consistent():
    x, y, rng = _data(5)
    w = rng.uniform(0, 2, y.shape)
    none = reference(x, y, weights=w, reduction="none")[0]
    assert np.isclose(reference(x, y, weights=w, reduction="sum")[0], none.sum())
    assert np.isclose(reference(x, y, weights=w, reduction="mean")[0], none.sum() / w.sum())
    assert np.isclose(reference(x, y, weights=w, reduction="mean", denominator="tokens")[0], none.sum() / y.size)
    np.testing.assert_allclose(reference(x, y, weights=w, reduction="per_sequence")[0],
                               none.sum(1) / w.sum(1))
    np.testing.assert_allclose(reference(x, y, weights=w, reduction="per_position")[0],
                               none.sum(0) / w.sum(0))
    # accumulation: sum over micro-batches / global count == global mean
    parts = [reference(x[i:i + 1], y[i:i + 1], reduction="sum")[0] for i in range(3)]
    assert np.isclose(sum(parts) / y.size, reference(x, y)[0])
