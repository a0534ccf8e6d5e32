"""The fused output layer at the edges of valid input (issue 27 item 3): a hidden size of 0 (the
logits are the bias, or zeros: log C per counted token) on every backend, and PyTorch's own
gradient checker on the fused op."""

import numpy as np
import pytest

from helpers.support import assert_close, require_or_skip

import xseqloss as xsl


def _zero_hidden_reference(b, y, keep):
    """float64 formula: logits = b at every token (H = 0), mean over the counted tokens; the
    gradient of that mean with respect to b."""
    lse = np.log(np.exp(b - b.max()).sum()) + b.max()
    per = lse - b[y]
    n = keep.sum()
    p = np.exp(b - lse)
    onehot = np.eye(b.shape[0])[y]
    db = ((p - onehot) * keep[..., None]).reshape(-1, b.shape[0]).sum(0) / n
    return (per * keep).sum() / n, per * keep, db


@pytest.mark.parametrize("layout, shape", [("NTH", (2, 3, 0)), ("TNH", (3, 2, 0)), ("NH", (4, 0)), ("H", (0,))])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_zero_hidden_size(backend, layout, shape, with_bias):
    """H = 0: every token's logits are the bias (zeros without one), so each counted token's loss
    is log C (log-sum-exp(b) - b[y] with a bias); d hidden and d weight are empty arrays of the
    inputs' shapes, d bias the softmax minus the one-hot, averaged."""
    C = 5
    r = np.random.default_rng(3)
    y = r.integers(0, C, shape[:-1])
    mask = r.uniform(size=shape[:-1]) > 0.3 if shape[:-1] else None
    if mask is not None:
        mask.flat[0] = True
    keep = np.ones(shape[:-1], bool) if mask is None else mask
    b = r.normal(size=C) if with_bias else np.zeros(C)
    want, want_tok, want_db = _zero_hidden_reference(b, y, keep)
    if not with_bias:
        assert_close(want_tok[keep], np.full(int(keep.sum()), np.log(C)), tol=1e-15, what="log C")
    h, w = np.zeros(shape), np.zeros((C, 0))
    kw = dict(layout=layout, bias=backend.array(b) if with_bias else None)
    if mask is not None:
        kw["mask"] = backend.array(mask)
    for chunk in (None, 2):
        v, (dh, dw, db) = xsl.linear_value_and_grad(backend.array(h), backend.array(w), backend.array(y),
                                                    chunk_size=chunk, **kw)
        assert_close(backend.float_out(v), want, what=f"value chunk={chunk}")
        assert tuple(backend.float_out(dh).shape) == shape and tuple(backend.float_out(dw).shape) == (C, 0)
        if with_bias:
            assert_close(backend.float_out(db), want_db, what=f"d bias chunk={chunk}")
        per = xsl.linear_cross_entropy(backend.array(h), backend.array(w), backend.array(y), reduction="none",
                                       chunk_size=chunk, **kw)
        assert_close(backend.float_out(per), want_tok, what=f"per token chunk={chunk}")
    hc = backend.array(np.zeros((0, C)))  # the "HC" weight of the same layer
    v = xsl.linear_cross_entropy(backend.array(h), hc, backend.array(y), weight_layout="HC", **kw)
    assert_close(backend.float_out(v), want, what="weight_layout='HC'")


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_gradcheck(with_bias, reduction):
    """torch.autograd.gradcheck (float64, tiny sizes) on the fused op: first derivatives of every
    output against finite differences, including the checks of an undefined incoming gradient
    (the backward used to compare ``dl`` with the formed upstream when ``dl`` was None)."""
    require_or_skip("torch")
    import torch
    r = np.random.default_rng(7)
    h = torch.tensor(r.normal(size=(2, 3, 4)), requires_grad=True)
    w = torch.tensor(r.normal(size=(5, 4)), requires_grad=True)
    b = torch.tensor(r.normal(size=5), requires_grad=True)
    y = torch.tensor(r.integers(0, 5, (2, 3)))
    y[1, 2] = -100

    def f(h_, w_, *rest):
        return xsl.linear_cross_entropy(h_, w_, y, bias=rest[0] if rest else None, reduction=reduction, chunk_size=4)
    args = (h, w, b) if with_bias else (h, w)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


def test_torch_gradcheck_of_return_stats():
    """gradcheck with return_stats: the loss's gradient is checked while the stats (no gradient)
    hand the backward an undefined incoming gradient for their outputs."""
    require_or_skip("torch")
    import torch
    r = np.random.default_rng(8)
    h = torch.tensor(r.normal(size=(2, 3, 4)), requires_grad=True)
    w = torch.tensor(r.normal(size=(5, 4)), requires_grad=True)
    y = torch.tensor(r.integers(0, 5, (2, 3)))

    def f(h_, w_):
        return xsl.linear_cross_entropy(h_, w_, y, chunk_size=4, return_stats=("entropy",))[0]
    assert torch.autograd.gradcheck(f, (h, w), eps=1e-6, atol=1e-6)
