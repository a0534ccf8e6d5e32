"""Ragged inputs at their edges (issue 27 items 1 and 2): row partitions that differ between a
tf.RaggedTensor and its targets / mask / lengths are our error eagerly and at trace time where they
are static, and mark every token NaN inside a tf.function where they are known only at run time
(never a finite loss against the wrong targets); the framework errors that used to escape from
ragged and list inputs and from ``pool`` are ours, naming the argument."""

import numpy as np
import pytest

from helpers.support import assert_close, require_or_skip

import xseqloss as xsl

rng0 = np.random.default_rng(27)
C = 4
ROWS = (3, 2)
VALUES = rng0.normal(size=(sum(ROWS), C))


def _tf():
    require_or_skip("tensorflow")
    import tensorflow as tf
    return tf


def _ragged(tf, rows, values=None, dtype=None):
    """A RaggedTensor of the given row lengths (values: the flat rows, default 0..R-1 labels)."""
    splits = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    if values is None:
        values = np.arange(sum(rows)) % C
    return tf.RaggedTensor.from_row_splits(tf.constant(values, dtype=dtype), tf.constant(splits))


# ------------------------------------------------------------ item 1: tf.function, dynamic rows

@pytest.mark.parametrize("which", ["targets", "mask", "lengths"])
def test_tf_function_rows_that_differ_mark_every_token_nan(which):
    """[3, 2] logits against [2, 3] targets (or a [2, 3] ragged mask, or lengths [2, 3]) inside a
    tf.function whose row lengths are run-time values: every token's loss and gradient is NaN,
    where it used to be a finite loss against the wrong targets. The same call with matching rows
    equals eager mode (the control). (RaggedTensor logits under jit_compile=True are not possible:
    XLA has no kernel for RaggedTensorToTensor.)"""
    tf = _tf()
    z = _ragged(tf, ROWS, VALUES)
    good = dict(targets=_ragged(tf, ROWS), mask=_ragged(tf, ROWS, np.ones(5, bool)),
                lengths=tf.constant(ROWS, tf.int64))
    bad = dict(good)
    bad[which] = {"targets": _ragged(tf, ROWS[::-1]), "mask": _ragged(tf, ROWS[::-1], np.ones(5, bool)),
                  "lengths": tf.constant(ROWS[::-1], tf.int64)}[which]

    @tf.function
    def step(values, splits, y, m, lens):
        with tf.GradientTape() as tape:
            tape.watch(values)
            rz = tf.RaggedTensor.from_row_splits(values, splits)
            loss = xsl.sequence_cross_entropy(rz, y, mask=m, lengths=lens)
            none = xsl.sequence_cross_entropy(rz, y, mask=m, lengths=lens, reduction="none")
        return loss, tape.gradient(loss, values), none.flat_values

    loss, g, none = step(z.flat_values, z.row_splits, good["targets"], good["mask"], good["lengths"])
    eager, geager = xsl.value_and_grad(z, good["targets"])
    assert_close(loss.numpy(), eager.numpy(), tol=1e-12, what="matching rows: loss")
    geager = getattr(geager, "flat_values", geager)  # the gradient of the ragged data
    assert_close(g.numpy(), geager.numpy(), tol=1e-12, what="matching rows: gradient")
    assert np.isfinite(none.numpy()).all()
    loss, g, none = step(z.flat_values, z.row_splits, bad["targets"], bad["mask"], bad["lengths"])
    assert np.isnan(loss.numpy()), loss
    assert np.isnan(g.numpy()).all(), g
    assert np.isnan(none.numpy()).all(), none


def test_tf_function_with_a_different_number_of_rows_is_nan_not_a_shape_error():
    tf = _tf()
    z = _ragged(tf, ROWS, VALUES)
    y = _ragged(tf, (2, 2, 1))  # 3 rows, 5 tokens: the same flat size

    @tf.function(input_signature=[tf.RaggedTensorSpec([None, None, C], tf.float64, 1, tf.int64),
                                  tf.RaggedTensorSpec([None, None], tf.int64, 1, tf.int64)])
    def f(a, b):
        return xsl.sequence_cross_entropy(a, b)
    assert np.isnan(f(z, y).numpy())


def test_tf_function_rows_that_differ_statically_raise_at_trace_time():
    """Row lengths known while tracing (constants inside the function) are compared then: our
    error at trace time, naming both."""
    tf = _tf()

    @tf.function
    def f():
        z = _ragged(tf, ROWS, VALUES)
        y = _ragged(tf, ROWS[::-1])
        return xsl.sequence_cross_entropy(z, y)
    with pytest.raises(xsl.XSeqLossError, match=r"targets has row lengths \[2, 3\] but the RaggedTensor logits "
                                                 r"have \[3, 2\]"):
        f()


def test_eager_ragged_mask_with_other_rows_is_an_error():
    tf = _tf()
    z = _ragged(tf, ROWS, VALUES)
    with pytest.raises(xsl.XSeqLossError, match=r"mask has row lengths \[2, 3\] but the RaggedTensor logits "
                                                 r"have \[3, 2\]"):
        xsl.sequence_cross_entropy(z, _ragged(tf, ROWS), mask=_ragged(tf, ROWS[::-1], np.ones(5, bool)))
    with pytest.raises(xsl.XSeqLossError, match=r"targets has row lengths \[3, 1, 1\] but the RaggedTensor "
                                                 r"logits have \[3, 2\]"):
        xsl.sequence_cross_entropy(z, _ragged(tf, (3, 1, 1)))


# ------------------------------------------------------------ item 2: our errors, not the framework's

@pytest.mark.parametrize("name, shape", [("mask", (2, 4)), ("weights", (3, 3)), ("mask", (6,))])
def test_tf_ragged_padded_side_of_the_wrong_shape(name, shape):
    tf = _tf()
    z = _ragged(tf, ROWS, VALUES)
    side = tf.ones(shape, tf.float64 if name == "weights" else tf.bool)
    with pytest.raises(xsl.XSeqLossError, match=rf"{name} has shape .* but the RaggedTensor logits mean the padded "
                                                 rf"batch \(N=2, T=3\)"):
        xsl.sequence_cross_entropy(z, _ragged(tf, ROWS), **{name: side})
    ok = xsl.sequence_cross_entropy(z, _ragged(tf, ROWS), **{name: tf.ones((2, 3), side.dtype)})
    assert np.isfinite(ok.numpy())


def test_tf_ragged_lengths_contradicting_its_rows():
    tf = _tf()
    z = _ragged(tf, ROWS, VALUES)
    with pytest.raises(xsl.XSeqLossError, match=r"lengths are \[2, 2\] but the RaggedTensor logits have \[3, 2\]"):
        xsl.sequence_cross_entropy(z, _ragged(tf, ROWS), lengths=np.array([2, 2]))
    with pytest.raises(xsl.XSeqLossError, match=r"lengths are \[3, 2, 1\] but the RaggedTensor logits have"):
        xsl.sequence_cross_entropy(z, _ragged(tf, ROWS), lengths=tf.constant([3, 2, 1]))
    same = xsl.sequence_cross_entropy(z, _ragged(tf, ROWS), lengths=np.array(ROWS))
    assert_close(same.numpy(), xsl.sequence_cross_entropy(z, _ragged(tf, ROWS)).numpy(), tol=1e-12)


def test_tf_ragged_probs_row_not_summing_to_one():
    """The message used to fail itself (a TypeError: the padded T of a RaggedTensor is not static)."""
    tf = _tf()
    p = np.full((5, C), 0.25)
    p[3] = [0.5, 0.5, 0.5, 0.0]  # row 3: sequence 1, step 0
    z = _ragged(tf, ROWS, p)
    with pytest.raises(xsl.XSeqLossError, match=r"logits\[3, :\] \(row 3 of the ragged data: sequence 1, step 0\) "
                                                 r"sums to 1.5"):
        xsl.sequence_cross_entropy(z, _ragged(tf, ROWS), inputs="probs")


@pytest.mark.parametrize("case", ["zero_d", "float_ids", "soft_then_ids", "ids_then_soft", "side_2d",
                                  "weights_mixed"])
def test_list_items_that_are_not_sequences(backend, case):
    """List targets (and side lists) with 0-d items, float items where class ids are expected, or
    a mix of soft and index items: our error naming the item, on every backend (they gave
    "len() of unsized object", "axes don't match array", "could not broadcast" or a silent cast)."""
    z = backend.array(np.zeros((2, 3, C)))
    ids = lambda *v: backend.array(np.array(v, np.int64))  # noqa: E731
    kw = {}
    if case == "zero_d":
        y = [backend.array(np.array(1)), backend.array(np.array(2))]
        err, match = xsl.XSeqLossError, r"targets\[0\] is 0-d"
    elif case == "float_ids":
        y = [backend.array(np.array([1.0, 2.0])), backend.array(np.array([1.0]))]
        err, match = xsl.XSeqLossTypeError, r"targets\[0\] has a floating dtype .* class ids must be integers"
    elif case == "soft_then_ids":
        y = [backend.array(np.full((2, C), 0.25)), ids(1)]
        err, match = xsl.XSeqLossTypeError, r"targets\[1\] is class ids \(integers\) but targets\[0\] is soft"
    elif case == "ids_then_soft":
        y = [ids(1, 2), backend.array(np.full((1, C), 0.25))]
        err, match = xsl.XSeqLossTypeError, r"targets\[1\] is soft targets \(floating\) but targets\[0\] is class ids"
    elif case == "side_2d":
        y, kw = [ids(1, 2), ids(1)], dict(mask=[backend.array(np.ones((2, 1), bool)), backend.array(np.ones(1, bool))])
        err, match = xsl.XSeqLossError, r"mask\[0\] has shape \(2, 1\) but must be 1-D"
    else:  # weights [int, float]: the float item would have been truncated to the first's integer dtype
        y = [ids(1, 2), ids(1)]
        kw = dict(weights=[backend.array(np.array([1, 1], np.int64)), backend.array(np.array([0.5]))])
        err, match = xsl.XSeqLossTypeError, r"weights\[1\] is floating .* but weights\[0\] is integer"
    with pytest.raises(err, match=match):
        xsl.sequence_cross_entropy(z, y, **kw)


def test_pool_of_nested_and_ragged_is_our_error():
    require_or_skip("torch")
    import torch
    h = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(1, 3)], layout=torch.jagged)
    with pytest.raises(xsl.XSeqLossTypeError, match=r"pool: hidden is a PyTorch nested tensor.*to_padded_tensor"):
        xsl.pool(h)
    tf = _tf()
    r = _ragged(tf, ROWS, VALUES)
    with pytest.raises(xsl.XSeqLossTypeError, match=r"pool: hidden is a tf.RaggedTensor.*hidden.to_tensor\(\) with "
                                                     r"lengths=hidden.row_lengths\(\)"):
        xsl.pool(r)
    with pytest.raises(xsl.XSeqLossTypeError, match=r"pool: scores is a tf.RaggedTensor"):
        xsl.pool(tf.zeros((2, 3, C)), method="attention", scores=_ragged(tf, ROWS, np.zeros(5)))
