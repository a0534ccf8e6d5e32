"""Checks of the test reference itself (tests/helpers/reference64.py): hand-computed
values, its analytic gradient against finite differences, and PyTorch's own
cross_entropy where the semantics overlap.  No xseqloss here."""

import math

import numpy as np
import pytest

from helpers.inputs import make_case
from helpers.reference64 import _smoothed_target, reference, reference_pool


def test_hand_computed_values():
    logits = np.array([[[0.0, math.log(3.0)]]])
    assert reference(logits, np.array([[1]])) == pytest.approx(-math.log(0.75), rel=1e-15)
    assert reference(logits, np.array([[0]])) == pytest.approx(-math.log(0.25), rel=1e-15)
    # z-loss adds z * lse^2, lse = log 4
    assert reference(logits, np.array([[1]]), z_loss=0.5) == pytest.approx(
        -math.log(0.75) + 0.5 * math.log(4.0) ** 2, rel=1e-15)
    # C = 1: loss 0
    assert reference(np.array([[[3.0]]]), np.array([[0]])) == 0.0
    # probs floor
    p = np.array([[[1.0, 0.0]]])
    assert reference(p, np.array([[1]]), inputs="probs") == pytest.approx(-math.log(1e-7))


def test_smoothed_target_conventions():
    C, eps = 4, 0.2
    uni = _smoothed_target(C, y=1, eps=eps)
    assert uni == pytest.approx([eps / C, 1 - eps + eps / C, eps / C, eps / C])
    oth = _smoothed_target(C, y=1, eps=eps, smoothing="others")
    # the target keeps 1 - eps, the other C - 1 classes share eps
    assert oth == pytest.approx([eps / 3, 1 - eps, eps / 3, eps / 3])
    assert sum(oth) == pytest.approx(1.0)
    assert _smoothed_target(1, y=0, eps=0.3, smoothing="others") == [1.0]


def test_reference_layouts_agree():
    rng = np.random.default_rng(0)
    x, y, o = make_case(rng, N=2, T=3, C=4, mask=True, weights=True)
    base = reference(x, y, reduction="none", **o)
    xt = np.transpose(x, (2, 1, 0))  # CTN
    o2 = {k: (v.T if k in ("mask", "weights") else v) for k, v in o.items()}
    other = reference(xt, y.T, layout="CTN", reduction="none", **o2)
    np.testing.assert_array_equal(other, base.T)


@pytest.mark.parametrize("reduction", ["none", "mean", "per_sequence",
                                       "per_position", "sequence_mean"])
@pytest.mark.parametrize("flags", [
    dict(mask=True, class_weights=True, label_smoothing=0.1, weights=True),
    dict(soft=True, class_weights=True, label_smoothing=0.2, smoothing="others"),
    dict(logit_softcap=2.0, z_loss=0.05, lengths=True, scale=3.0),
    dict(inputs="log_probs", class_weights=True, label_smoothing=0.1),
])
def test_reference_gradient_is_finite_difference(reduction, flags):
    rng = np.random.default_rng(1)
    x, y, o = make_case(rng, N=2, T=3, C=4, **flags)
    _, g = reference(x, y, reduction=reduction, with_grad=True, **o)
    h = 1e-6
    fd = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        fd[i] = (reference(xp, y, reduction=reduction, **o).sum()
                 - reference(xm, y, reduction=reduction, **o).sum()) / (2 * h)
    np.testing.assert_allclose(g, fd, atol=1e-7, rtol=1e-6)


def test_reference_matches_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(2)
    x, y, o = make_case(rng, N=3, T=4, C=5, class_weights=True, ignore=-100)
    for eps in (0.0, 0.1):
        for red in ("mean", "sum", "none"):
            ref = reference(x, y, class_weights=o["class_weights"],
                            label_smoothing=eps, reduction=red)
            t = F.cross_entropy(torch.tensor(x).permute(0, 2, 1), torch.tensor(y),
                                weight=torch.tensor(o["class_weights"]),
                                label_smoothing=eps, reduction=red)
            np.testing.assert_allclose(ref, t.numpy(), rtol=1e-12, atol=1e-12)
    # soft targets (class weights enter l only; torch's mean divides by N*T)
    q = rng.dirichlet(np.ones(5), size=(3, 4))
    ref = reference(x, q, class_weights=o["class_weights"], reduction="mean",
                    label_smoothing=0.1)
    t = F.cross_entropy(torch.tensor(x).permute(0, 2, 1),
                        torch.tensor(q).permute(0, 2, 1),
                        weight=torch.tensor(o["class_weights"]),
                        label_smoothing=0.1, reduction="mean")
    np.testing.assert_allclose(ref, t.numpy(), rtol=1e-12)


def test_reference_pool():
    h = np.arange(2 * 4 * 3, dtype=float).reshape(2, 4, 3)
    mask = np.array([[1, 1, 0, 1], [0, 1, 1, 0]], bool)
    assert np.array_equal(reference_pool(h, mask=mask, method="last"), h[[0, 1], [3, 2]])
    assert np.array_equal(reference_pool(h, lengths=[2, 1], method="last"), h[[0, 1], [1, 0]])
    assert np.array_equal(reference_pool(h, mask=mask, method="first"), h[[0, 1], [0, 1]])


@pytest.mark.parametrize("reduction", ["none", "mean", "per_sequence", "per_position",
                                       "sequence_mean"])
def test_reference_cotangent_gradient(reduction):
    rng = np.random.default_rng(3)
    x, y, o = make_case(rng, N=2, T=3, C=4, mask=True, weights=True, label_smoothing=0.1)
    out = reference(x, y, reduction=reduction, **o)
    v = rng.normal(size=np.shape(out))
    _, g = reference(x, y, reduction=reduction, with_grad=True, cotangent=v, **o)
    h = 1e-6
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        fd = (np.sum(v * reference(xp, y, reduction=reduction, **o))
              - np.sum(v * reference(xm, y, reduction=reduction, **o))) / (2 * h)
        assert abs(fd - g[i]) < 1e-7
