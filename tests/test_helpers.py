"""Helpers of API.md section 4 on every backend: value_and_grad, token_count,
pool; the softmax-input warning; torch's inplace_backward."""

import warnings

import numpy as np
import pytest

from helpers.compare import check_output_meta, expected_shape
from helpers.inputs import REDUCTIONS, make_case, softmax
from helpers.reference64 import reference, reference_pool
from helpers.support import assert_close, get_backend, reductions_for, require_or_skip, round_to

import xseqloss as xsl


# ------------------------------------------------------------ value_and_grad

@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_value_and_grad(backend, xsl, rng, dtype):
    """(loss, d loss / d logits) in the backend's own types; for non-scalar
    reductions the gradient of the sum (decisions.md item 2)."""
    logits, targets, opts = make_case(rng, mask=True, weights=True, class_weights=True,
                                      label_smoothing=0.1, ignore=-100)
    x, t, kw = backend.convert_args(logits, targets, dtype, opts)
    xr = round_to(logits, dtype)
    for reduction in reductions_for(backend, REDUCTIONS, dtype):
        value, grad = xsl.value_and_grad(x, t, reduction=reduction, **kw)
        check_output_meta(backend, value, dtype, expected_shape(reduction, "NTC", logits.shape))
        assert backend.is_native(grad) and backend.dtype_name(grad) == dtype
        ref, gref = reference(xr, targets, reduction=reduction, with_grad=True, **opts)
        assert_close(backend.float_out(value), ref, dtype)
        assert_close(backend.float_out(grad), gref, dtype, what="gradient")


def test_value_and_grad_matches_autodiff(backend, xsl, rng):
    if backend.name == "numpy":
        pytest.skip("NumPy has no autodiff of its own")
    logits, targets, opts = make_case(rng, lengths=True, z_loss=1e-2, logit_softcap=4.0)
    x, t, kw = backend.convert_args(logits, targets, "float64", opts)
    for reduction in ("mean", "none", "per_position"):
        v1, g1 = xsl.value_and_grad(x, t, reduction=reduction, **kw)
        v2, g2 = backend.loss_and_grad(logits, targets, "float64", reduction=reduction, **opts)
        assert_close(backend.float_out(v1), backend.float_out(v2), tol=1e-14)
        assert_close(backend.float_out(g1), backend.float_out(g2), tol=1e-14)


def test_value_and_grad_layout_and_soft(backend, xsl, rng):
    logits, targets, opts = make_case(rng, layout="TNC", soft=True, mask=True)
    x, t, kw = backend.convert_args(logits, targets, "float32", opts)
    v, g = xsl.value_and_grad(x, t, layout="TNC", **kw)
    ref, gref = reference(round_to(logits, "float32"), round_to(targets, "float32"),
                          layout="TNC", with_grad=True, **opts)
    assert tuple(g.shape) == logits.shape
    assert_close(backend.float_out(v), ref, "float32")
    assert_close(backend.float_out(g), gref, "float32")


# ---------------------------------------------------------------- token_count

def _is_integer_dtype(name):
    return name.startswith(("int", "uint"))


@pytest.mark.parametrize("denominator", ["weights", "tokens", "positions"])
@pytest.mark.parametrize("case", ["mask_lengths_ignore", "weights_cw", "soft_weights", "TNC"])
def test_token_count(backend, xsl, rng, denominator, case):
    kw = {"mask_lengths_ignore": dict(mask=True, lengths=True, ignore=-100),
          "weights_cw": dict(weights=True, class_weights=True, mask=True, ignore=-100),
          "soft_weights": dict(soft=True, weights=True, mask=True),
          "TNC": dict(layout="TNC", mask=True, ignore=-100)}[case]
    layout = kw.get("layout", "NTC")
    logits, targets, opts = make_case(rng, **kw)
    _, D = reference(logits, targets, layout=layout, denominator=denominator,
                        return_count=True, **opts)
    conv = {k: backend.array(v) if isinstance(v, np.ndarray) else v for k, v in opts.items()}
    if "class_weights" in opts:
        conv["num_classes"] = logits.shape[-1]
    n = xsl.token_count(backend.array(targets), layout=layout, denominator=denominator, **conv)
    assert backend.is_native(n), type(n)
    assert tuple(n.shape) == ()
    name = backend.dtype_name(n)
    if denominator == "weights" and ("weights" in opts or "class_weights" in opts):
        assert name == "float64", f"float64 weights give a float64 count, got {name}"
    elif denominator != "weights":
        assert _is_integer_dtype(name), f"{denominator} count has dtype {name}"
    else:
        assert name in ("float32", "float64") or _is_integer_dtype(name), name
    assert float(backend.float_out(n)) == pytest.approx(D, rel=1e-12)
    # it is what "mean" divides by
    mean = backend.float_out(backend.loss(logits, targets, layout=layout,
                                          denominator=denominator, **opts))
    total = backend.float_out(backend.loss(logits, targets, layout=layout, reduction="sum",
                                           denominator=denominator, **opts))
    assert mean == pytest.approx(total / D, rel=1e-12)


def test_token_count_float32_weights(backend, xsl):
    y = np.array([[0, 1, -100], [2, 2, 1]])
    w = np.array([[0.5, 1.5, 2.0], [1.0, 0.25, 0.0]], np.float32)
    n = xsl.token_count(backend.array(y), layout="NTC", weights=backend.array(w))
    assert backend.dtype_name(n) == "float32"
    assert float(backend.float_out(n)) == pytest.approx(0.5 + 1.5 + 1.0 + 0.25 + 0.0)


def test_token_count_class_weights_need_C(backend, xsl):
    """Index targets with class_weights: C comes from num_classes or from the
    class_weights' length."""
    y = np.array([[0, 1, 2], [2, 2, -100]])
    cw = np.array([1.0, 2.0, 0.5])
    n = xsl.token_count(backend.array(y), layout="NTC", class_weights=backend.array(cw))
    assert float(backend.float_out(n)) == pytest.approx(1 + 2 + 0.5 * 3)
    n = xsl.token_count(backend.array(y), layout="NTC", class_weights=backend.array(cw),
                        num_classes=3)
    assert float(backend.float_out(n)) == pytest.approx(4.5)


def test_token_count_large_is_exact_integer(backend, xsl):
    """Counts are integers, never floats of the input dtype (2**24 + 1 is not
    a float32)."""
    n_tok = 2**24 + 1
    y = np.zeros((1, n_tok), np.int32)
    n = xsl.token_count(backend.array(y), layout="NTC", denominator="tokens")
    assert _is_integer_dtype(backend.dtype_name(n))
    assert int(backend.to_numpy(n)) == n_tok


# soft targets with class weights (issue 17, hunt item 2)
def test_token_count_soft_targets_with_class_weights(backend, xsl):
    """It returned array(None, dtype=object) on NumPy and crashed elsewhere; class weights do not
    enter W for soft targets (decisions.md item 7), so it is the number of counted tokens."""
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(4), size=(2, 3))
    m = np.array([[1, 1, 0], [1, 0, 1]], bool)
    cw = np.array([1.0, 2.0, 3.0, 0.5])
    n = xsl.token_count(backend.array(q), mask=backend.array(m), class_weights=backend.array(cw))
    assert float(backend.float_out(n)) == 4.0
    z = rng.normal(size=(2, 3, 4))
    mean = float(backend.float_out(backend.loss(z, q, mask=m, class_weights=cw)))
    total = float(backend.float_out(backend.loss(z, q, mask=m, class_weights=cw, reduction="sum")))
    assert_close(mean * 4.0, total)


# ------------------------------------------------------------------- pool

POOL_METHODS = ("last", "first", "mean", "max")


@pytest.mark.parametrize("method", POOL_METHODS)
@pytest.mark.parametrize("layout", ["NTH", "TNH"])
def test_pool(backend, xsl, rng, method, layout):
    N, T, H = 3, 5, 4
    h = rng.normal(size=(N, T, H))
    lengths = np.array([5, 2, 1])
    mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], bool)
    if layout == "TNH":
        h_in, mask_in = np.transpose(h, (1, 0, 2)), mask.T
    else:
        h_in, mask_in = h, mask
    for kw, ref_kw in ((dict(lengths=backend.array(lengths)), dict(lengths=lengths)),
                       (dict(mask=backend.array(mask_in)), dict(mask=mask))):
        out = xsl.pool(backend.array(h_in), layout=layout, method=method, **kw)
        assert backend.is_native(out)
        assert tuple(out.shape) == (N, H)
        assert_close(backend.float_out(out), reference_pool(h, method=method, **ref_kw))


def test_pool_last_is_last_counted_step_not_index_minus_one(backend, xsl):
    h = np.arange(2 * 4 * 2, dtype=np.float64).reshape(2, 4, 2)
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], bool)
    out = backend.float_out(xsl.pool(backend.array(h), mask=backend.array(mask), method="last"))
    np.testing.assert_array_equal(out, np.stack([h[0, 1], h[1, 2]]))
    out = backend.float_out(xsl.pool(backend.array(h), lengths=backend.array(np.array([3, 1])),
                                     method="last"))
    np.testing.assert_array_equal(out, np.stack([h[0, 2], h[1, 0]]))
    assert not np.array_equal(out, h[:, -1])


def test_pool_ignores_garbage_at_uncounted_steps(backend, xsl):
    h = np.ones((2, 3, 2))
    h[0, 2] = np.nan
    h[1, 1:] = np.inf
    for method in POOL_METHODS:
        out = backend.float_out(xsl.pool(backend.array(h), lengths=backend.array(np.array([2, 1])),
                                         method=method))
        np.testing.assert_array_equal(out, np.ones((2, 2)))


# -------------------------------------------------------- softmax warning

def _softmax_warnings(record):
    return [w for w in record if "softmax" in str(w.message).lower()]


def test_softmax_inputs_warn_once(backend, xsl, rng):
    p = softmax(rng.normal(size=(2, 6, 5)))
    y = rng.integers(0, 5, size=(2, 6))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = xsl.sequence_cross_entropy(backend.array(p), backend.array(y))
    assert len(_softmax_warnings(record)) == 1, [str(w.message) for w in record]
    assert np.isfinite(backend.float_out(out))
    # the same call with raw logits: no warning
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        xsl.sequence_cross_entropy(backend.array(rng.normal(size=(2, 6, 5))), backend.array(y))
    assert not _softmax_warnings(record), [str(w.message) for w in record]


def test_softmax_warning_not_for_probs_or_log_probs(backend, xsl, rng):
    p = softmax(rng.normal(size=(2, 3, 4)))
    y = rng.integers(0, 4, size=(2, 3))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        xsl.sequence_cross_entropy(backend.array(p), backend.array(y), inputs="probs")
        xsl.sequence_cross_entropy(backend.array(np.log(p)), backend.array(y), inputs="log_probs")
    assert not _softmax_warnings(record)


# ------------------------------------------------------ torch inplace_backward

@pytest.mark.parametrize("reduction", ["mean", "sum", "per_sequence"])
def test_torch_inplace_backward(xsl, reduction):
    be = get_backend("torch")
    torch = be.torch
    rng = np.random.default_rng(4)
    logits, targets, opts = make_case(rng, mask=True, label_smoothing=0.1, class_weights=True,
                                      ignore=-100)
    _, gref = reference(logits, targets, reduction=reduction, with_grad=True, **opts)
    ref = reference(logits, targets, reduction=reduction, **opts)
    _, t, kw = be.convert_args(logits, targets, "float64", opts)
    x = torch.tensor(logits, requires_grad=True)
    out = xsl.sequence_cross_entropy(x, t, reduction=reduction, inplace_backward=True, **kw)
    assert_close(be.float_out(out), ref)
    out.sum().backward()
    assert_close(be.float_out(x.grad), gref, what="inplace gradient")


# inplace_backward on a tensor whose elements share memory (issue 17, hunt item 5)
def test_inplace_backward_on_overlapping_memory_is_our_error():
    require_or_skip("torch")
    import torch
    base = torch.randn(1, 1, 5, requires_grad=True)
    z = base.expand(2, 3, 5)  # stride 0: six rows share one row of memory
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(xsl.XSeqLossError, match=r"inplace_backward=True.*share memory"):
        xsl.sequence_cross_entropy(z, y, inplace_backward=True)
    loss = xsl.sequence_cross_entropy(z, y)  # without in place it is fine
    loss.backward()
    assert torch.isfinite(base.grad).all()
