"""Peer suite: Keras 3's cross-entropy test cases, transliterated (issue 11 item 7).

Sources (only facts carry over - inputs, expected values, formulas; every line of code here is ours),
keras-team/keras at commit 3422977a5e38fb2f7709aaa9a08e47f0c43d0f60 (2026-08-21; installed: keras 3.15.1):

* ``keras/src/losses/losses_test.py``: ``CategoricalCrossentropyTest`` and
  ``SparseCategoricalCrossentropyTest`` (all-correct, unweighted, scalar / sample weights, no reduction,
  ignore_class, label smoothing, segmentation, different class axis, shape mismatch).
* ``keras/src/losses/loss_test.py``: the Keras-mask rules of ``keras.losses.Loss`` (``test_mask``,
  ``test_sample_weight``, ``test_mask_and_sample_weight``, ``test_mask_and_sample_weight_rank2``),
  written there for a squared error; here applied to the cross-entropy, with the installed Keras's
  ``SparseCategoricalCrossentropy`` as the second witness.
* ``keras/src/testing/test_case.py``: the peer's tolerances. ``assertAlmostEqual`` defaults to
  ``decimal=3`` (|x - want| < 1.5e-3: the expected numbers are printed with 3-5 digits) and
  ``assertAllClose`` to ``atol=rtol=1e-6``; each case uses the tolerance its Keras test uses, and where
  the number has a closed form we also check it with our own float32 tolerance (TOL, helpers/support.py).

How a Keras call maps to xseqloss: ``SparseCategoricalCrossentropy(from_logits=f, ignore_class=k,
reduction=r)(y, p, sample_weight=s)`` is ``dict(presets.KERAS, ignore_index=k, reduction=...)`` with
index targets, ``weights=s`` and ``inputs="logits"`` (f) or ``"probs"`` (not f);
``CategoricalCrossentropy(label_smoothing=e)`` is the same with float (soft) targets and
``label_smoothing=e``; ``axis=1`` is ``layout="NCT"``, ``axis=0`` ``layout="CNT"``; a Keras mask is
``mask``. Every case runs on NumPy, PyTorch, TensorFlow and JAX (the ``backend`` fixture), in float32
(Keras's floatx).

Semantics xseqloss does not share on purpose, and what that does to the cases:
* ``from_logits=False``: Keras renormalises each probability row and clips it to [1e-7, 1 - 1e-7];
  ``inputs="probs"`` does neither (KERAS preset docstring). The peer's y_pred row [0.5, 0.89, 0.6]
  sums to 1.99: we renormalise it ourselves before the call (the expected numbers are Keras's, after
  its renormalisation) and assert that xseqloss refuses the raw row. Rows holding exact 0 and 1 (the
  all-correct and segmentation cases): Keras's clip gives -log(1 - 1e-7) ~ 1.2e-7 per token where
  xseqloss gives 0 - below the peer's tolerance, so those cases are kept.
* A label axis of size 1 (y_true of shape (3, 1) or (1, 2, 1)): Keras squeezes it, xseqloss never
  broadcasts or squeezes (API.md section 1); the sparse cases pass (3,) labels, and one case asserts
  the refusal.

Left out, with the reason:
* ``test_config`` (serialisation of Keras's own classes; xseqloss.keras's is in test_keras_loss.py),
  ``test_dtype_arg`` (a bfloat16 loss dtype: xseqloss returns float32 for 16-bit inputs on purpose),
  ``test_warning_for_invalid_shape`` (Keras warns for C = 1; C = 1 is valid in xseqloss, loss 0),
  ``test_squeezes_singleton_class_dim_on_user_axis`` (the squeeze above), ``test_label_smoothing_ndarray``
  (the same numbers as ``test_label_smoothing``, np.asarray instead of np.array).
* The other loss classes of losses_test.py (binary, focal, generalized cross-entropy, Dice, CTC...):
  not xseqloss's loss.
"""

import numpy as np
import pytest

from helpers.support import ALL_BACKENDS, TOL, assert_close, required_backends, round_to

from xseqloss import XSeqLossError, presets

Y_PRED = np.array([[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]], np.float32)
LOGITS = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]], np.float32)
LABELS = np.array([0, 1, 2])
ONE_HOT = np.eye(3, dtype=np.float32)
SAMPLE_WEIGHT = np.array([1.2, 3.4, 5.6])

# (weighting, inputs) -> the number both test classes assert (assertAlmostEqual, decimal=3)
WEIGHTED_EXPECTED = {
    ("unweighted", "probs"): 0.3239, ("unweighted", "logits"): 0.0573,
    ("scalar", "probs"): 0.7449, ("scalar", "logits"): 0.1317,
    ("sample", "probs"): 1.0696, ("sample", "logits"): 0.31829,
}


def keras_almost_equal(got, want, decimal=3):
    """keras testing.TestCase.assertAlmostEqual: np.testing.assert_almost_equal (|x - want| < 1.5e-d)."""
    np.testing.assert_almost_equal(np.asarray(got, np.float64), want, decimal=decimal)


def keras_all_close(got, want):
    """keras testing.TestCase.assertAllClose defaults: atol=rtol=1e-6."""
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-6, rtol=1e-6)


def _log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = x.max(axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis, keepdims=True))


def _run(backend, logits, targets, layout="NC", **kw):
    return backend.float_out(backend.loss(logits, targets, "float32", layout=layout, **kw))


def _kw(inputs, **extra):
    return dict(presets.KERAS, inputs=inputs, **extra)


def _targets(kind):
    return LABELS if kind == "sparse" else ONE_HOT


# ------------------------------------------------------------ unweighted, scalar and sample weights

WEIGHTED_GRID = [(k, i, w) for k in ("sparse", "categorical") for i in ("probs", "logits")
                 for w in ("unweighted", "scalar", "sample")]


@pytest.mark.parametrize("kind,inputs,weighting", WEIGHTED_GRID, ids=["-".join(c) for c in WEIGHTED_GRID])
def test_unweighted_scalar_and_sample_weighted(backend, kind, inputs, weighting):
    """test_unweighted / test_scalar_weighted (sample_weight=2.3) / test_sample_weighted
    (sample_weight=[[1.2], [3.4], [5.6]]): Keras's mean divides by the 3 samples, never by the weights."""
    if inputs == "probs":
        x = Y_PRED / Y_PRED.sum(-1, keepdims=True)  # Keras renormalises the rows (from_logits=False)
        logp = np.log(x.astype(np.float64))
    else:
        x = LOGITS
        logp = _log_softmax(LOGITS)
    weights = {"unweighted": None, "scalar": np.full(3, 2.3), "sample": SAMPLE_WEIGHT}[weighting]
    kw = _kw(inputs) if weights is None else _kw(inputs, weights=weights)
    got = _run(backend, x, _targets(kind), **kw)
    keras_almost_equal(got, WEIGHTED_EXPECTED[weighting, inputs])
    s = np.ones(3) if weights is None else round_to(weights, "float32")
    exact = np.mean(s * -logp[np.arange(3), LABELS])  # sum_over_batch_size: / 3 samples
    assert_close(got, exact, "float32", "closed form")


def test_unnormalised_probability_rows_are_refused(backend):
    """The peer's raw y_pred (row 2 sums to 1.99): Keras renormalises, xseqloss raises (inputs="probs")."""
    with pytest.raises(XSeqLossError, match="sums to"):
        backend.loss(Y_PRED, LABELS, "float32", layout="NC", **_kw("probs"))


@pytest.mark.parametrize("kind", ["sparse", "categorical"])
@pytest.mark.parametrize("inputs", ["probs", "logits"])
def test_all_correct_unweighted(backend, kind, inputs):
    """test_all_correct_unweighted: one-hot probabilities, or logits 10 at the target; loss 0
    (assertAlmostEqual, decimal 3; Keras's probability clip gives ~1.2e-7, xseqloss exactly 0)."""
    x = ONE_HOT if inputs == "probs" else np.where(ONE_HOT == 1, 10.0, 0.0).astype(np.float32)
    got = _run(backend, x, _targets(kind), **_kw(inputs))
    keras_almost_equal(got, 0.0)
    if inputs == "probs":
        assert got == 0.0
    else:
        assert_close(got, np.log1p(2 * np.exp(-10.0)), "float32", "closed form")


@pytest.mark.parametrize("kind", ["sparse", "categorical"])
def test_no_reduction(backend, kind):
    """test_no_reduction (from_logits=True, reduction=None): (0.001822, 0.000459, 0.169846)."""
    got = _run(backend, LOGITS, _targets(kind), **_kw("logits", reduction="none"))
    assert got.shape == (3,)
    keras_all_close(got, (0.001822, 0.000459, 0.169846))
    assert_close(got, -_log_softmax(LOGITS)[np.arange(3), LABELS], "float32", "closed form")


# ----------------------------------------------------------------- SparseCategoricalCrossentropyTest

def test_sparse_ignore_class(backend):
    """test_ignore_class: labels [[-1, 2]], ignore_class=-1, reduction=None -> [[0.0, 1.480129]]."""
    y = np.array([[-1, 2]])
    logits = np.array([[[0.854, 0.698, 0.598], [0.088, 0.86, 0.018]]], np.float32)
    kw = dict(presets.KERAS, ignore_index=-1, reduction="none")
    got = _run(backend, logits, y, layout="NTC", **kw)
    keras_all_close(got, [[0.0, 1.480129]])
    assert got[0, 0] == 0.0
    # the peer's second variant has labels of shape (1, 2, 1); Keras squeezes them, xseqloss does not
    with pytest.raises(XSeqLossError, match="shape"):
        backend.loss(logits, y[..., None], "float32", layout="NTC", **kw)


SEG_TRUE_BINARY = np.array([[0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
SEG_TRUE_MULTI = np.array([[0, 1, 2, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])


def _segmentation(case):
    """(y_true (4, 4), y_pred (4, 4, C) probabilities, expected mean) of the segmentation tests."""
    if case == "binary_all_correct":
        return SEG_TRUE_BINARY, np.eye(2)[SEG_TRUE_BINARY], 0.0
    if case == "multi_all_correct":
        return SEG_TRUE_MULTI, np.eye(3)[SEG_TRUE_MULTI], 0.0
    if case == "binary":
        p = np.eye(2)[SEG_TRUE_BINARY]
        p[0, 3] = [0.2, 0.8]
        p[3, 3] = [0.6, 0.4]
        return SEG_TRUE_BINARY, p, (-np.log(0.2) - np.log(0.4)) / 16.0  # 16 pixels
    p = np.eye(3)[SEG_TRUE_MULTI]
    p[0, 3] = [0.2, 0.0, 0.8]
    p[1, 0] = [0.7, 0.3, 0.0]
    p[3, 2] = [0.5, 0.5, 0.0]
    return SEG_TRUE_MULTI, p, (-np.log(0.2) - np.log(0.3) - np.log(0.5)) / 16.0


SEGMENTATION = ["binary_all_correct", "binary", "multi_all_correct", "multi"]


@pytest.mark.parametrize("case", SEGMENTATION)
def test_sparse_segmentation(backend, case):
    """test_binary_segmentation / test_multi_class_segmentation: (4, 4) pixels, classes last,
    from_logits=False; assertAllClose."""
    y, p, want = _segmentation(case)
    got = _run(backend, p.astype(np.float32), y, layout="NTC", **_kw("probs"))
    keras_all_close(got, want)


@pytest.mark.parametrize("case", ["binary", "multi"])
def test_sparse_segmentation_different_axis(backend, case):
    """test_*_segmentation_different_axis: the class axis first (axis=0, y_pred (C, 4, 4)), and a batch
    of three copies with the class axis second (axis=1, y_pred (3, C, 4, 4)). Keras runs these on its
    torch backend only (TensorFlow: "Only axis=-1 is currently supported"; JAX: a shape error);
    xseqloss runs them on every backend (layouts "CNT" and "NCT")."""
    y, p, want = _segmentation(case)
    p = p.astype(np.float32)
    p0 = np.moveaxis(p, 2, 0)
    keras_all_close(_run(backend, p0, y, layout="CNT", **_kw("probs")), want)
    y3 = np.stack([y, y, y]).reshape(3, 16)  # (3, 4, 4) pixels -> T = 16
    p3 = np.stack([p0, p0, p0]).reshape(3, p0.shape[0], 16)
    keras_all_close(_run(backend, p3, y3, layout="NCT", **_kw("probs")), want)


# ----------------------------------------------------------------------- CategoricalCrossentropyTest

def test_categorical_label_smoothing(backend):
    """test_label_smoothing: logits [[100, -100, -100]], one-hot [[1, 0, 0]], label_smoothing=0.1,
    from_logits=True -> 400 * 0.1 / 3 (assertAlmostEqual, decimal 3)."""
    got = _run(backend, np.array([[100.0, -100.0, -100.0]], np.float32), np.array([[1.0, 0.0, 0.0]]),
               **_kw("logits", label_smoothing=0.1))
    keras_almost_equal(got, 400.0 * 0.1 / 3.0)
    assert_close(got, 400.0 * 0.1 / 3.0, "float32", "closed form")  # exact: log p = (0, -200, -200)


def test_categorical_label_smoothing_with_axis(backend):
    """test_label_smoothing_with_axis: (batch, classes, spatial) = (2, 3, 2), axis=1, probabilities,
    label_smoothing=0.1; expected -sum(smoothed * log(y_pred), axis=1), mean (decimal 5)."""
    y_true = np.array([[[1, 0], [0, 1], [0, 0]], [[0, 1], [1, 0], [0, 0]]], np.float32)
    y_pred = np.array([[[0.8, 0.1], [0.1, 0.8], [0.1, 0.1]], [[0.1, 0.8], [0.8, 0.1], [0.1, 0.1]]],
                      np.float32)
    eps = 0.1
    smoothed = y_true * (1.0 - eps) + eps / 3
    want = np.mean(-np.sum(smoothed * np.log(y_pred), axis=1))
    got = _run(backend, y_pred, y_true, layout="NCT", **_kw("probs", label_smoothing=eps))
    keras_almost_equal(got, want, decimal=5)
    assert_close(got, want, "float32", "closed form")


def test_categorical_shape_mismatch(backend):
    """test_shape_mismatch: labels [[0], [1], [2]] with (3, 3) predictions -> an error (Keras:
    "must have the same shape")."""
    with pytest.raises(XSeqLossError, match="shape"):
        backend.loss(Y_PRED / Y_PRED.sum(-1, keepdims=True), np.array([[0], [1], [2]]), "float32",
                     layout="NC", **_kw("probs"))


# ---------------------------------------------------------------- loss_test.py: Keras masks, weights

MASK = np.array([True, False, True, True])
MASK_SW = np.array([0.4, 0.3, 0.2, 0.1])
MASK_LOGITS = np.array([[0.2, 1.1, -0.4], [2.0, -1.0, 0.5], [0.3, 0.3, 1.7], [-0.6, 0.9, 0.1]], np.float32)
MASK_LABELS = np.array([1, 0, 2, 0])

# name -> (mask, sample_weight, ignore_class): the loss_test.py cases, plus ignore_class with a mask
MASK_CASES = {
    "mask": (MASK, None, None),
    "everything_masked": (np.zeros(4, bool), None, None),
    "sample_weight": (None, MASK_SW, None),
    "zero_sample_weight": (None, np.zeros(4), None),
    "mask_and_sample_weight": (MASK, MASK_SW, None),
    "mask_and_ignore_class": (MASK, MASK_SW, 2),
}


def _rule(name):
    """loss_test.py's rule: sum of weight * loss over the kept tokens / the number of kept tokens
    (every token when nothing masks), 0 when nothing is kept."""
    mask, sw, ignore = MASK_CASES[name]
    loss = -_log_softmax(MASK_LOGITS)[np.arange(4), MASK_LABELS]
    keep = np.ones(4, bool) if mask is None else mask.copy()
    if ignore is not None:
        keep &= MASK_LABELS != ignore
    s = np.ones(4) if sw is None else round_to(sw, "float32")
    n = keep.sum()
    return float((s * loss)[keep].sum() / n) if n else 0.0


@pytest.fixture(scope="module")
def keras_numbers():
    """The installed Keras's own SparseCategoricalCrossentropy on each MASK_CASES case."""
    if required_backends() == set(ALL_BACKENDS):  # CI installs Keras: its absence is an error, not a skip
        import keras
    else:
        keras = pytest.importorskip("keras", minversion="3.0")
    from keras.src.backend import set_keras_mask

    out = {}
    for name, (mask, sw, ignore) in MASK_CASES.items():
        y_pred = keras.ops.convert_to_tensor(MASK_LOGITS)
        if mask is not None:
            set_keras_mask(y_pred, keras.ops.convert_to_tensor(mask))
        fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=ignore)
        value = fn(MASK_LABELS, y_pred, sample_weight=None if sw is None else sw.astype(np.float32))
        out[name] = float(keras.ops.convert_to_numpy(value))
    return out


@pytest.mark.parametrize("name", list(MASK_CASES))
def test_keras_mask_and_sample_weight(backend, keras_numbers, name):
    """loss_test.py test_mask / test_sample_weight / test_mask_and_sample_weight (+ their "everything
    masked" / "every weight 0" edge cases: 0, no NaN), on the cross-entropy: a Keras mask is ``mask``,
    sample_weight is ``weights`` (not in the denominator), ignore_class joins the mask."""
    mask, sw, ignore = MASK_CASES[name]
    kw = dict(presets.KERAS, ignore_index=ignore)
    if mask is not None:
        kw["mask"] = mask
    if sw is not None:
        kw["weights"] = sw
    got = _run(backend, MASK_LOGITS, MASK_LABELS, **kw)
    want = _rule(name)
    assert_close(got, want, "float32", f"{name}: loss_test.py rule")
    keras_all_close(got, keras_numbers[name])
    if name in ("everything_masked", "zero_sample_weight"):
        assert got == 0.0


def test_keras_mask_and_sample_weight_rank2(backend):
    """test_mask_and_sample_weight_rank2: the same rows twice, (2, 4) tokens -> the same loss."""
    rank1 = _run(backend, MASK_LOGITS, MASK_LABELS, mask=MASK, weights=MASK_SW, **presets.KERAS)
    tile = np.stack([MASK_LOGITS, MASK_LOGITS])
    rank2 = _run(backend, tile, np.stack([MASK_LABELS] * 2), layout="NTC", mask=np.stack([MASK] * 2),
                 weights=np.stack([MASK_SW] * 2), **presets.KERAS)
    keras_all_close(rank2, rank1)
    assert abs(float(rank2) - float(rank1)) <= TOL["float32"] * (1 + abs(float(rank1)))
