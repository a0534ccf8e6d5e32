"""TensorFlow's tapes beyond one gradient (issue 27 item 3): a persistent tf.GradientTape (two
gradients of one forward, then tape.jacobian, vectorized or not) around every TensorFlow path
that forms its gradient in the forward pass (the fused layer's chunk loop, with and without the
in-place plain kernel, return_stats, linear_token_stats, sequence_cross_entropy's XLA kernel), in
eager mode, under tf.function and under tf.function(jit_compile=True); values against TensorFlow's
own cross-entropy of the materialised logits. A second derivative through the fused layer is not
formed: it is NaN, never a silent zero (decision 80)."""

import numpy as np
import pytest

from helpers.support import assert_close, require_or_skip

import xseqloss as xsl

N, T, H, C = 2, 3, 4, 5
CASES = ("linear_plain", "linear_smoothing_bias", "linear_return_stats", "linear_token_stats", "sequence")


@pytest.fixture(scope="module")
def tf():
    require_or_skip("tensorflow")
    import tensorflow as tf
    return tf


def _problem():
    r = np.random.default_rng(27)
    h, w, b = r.normal(size=(N, T, H)), r.normal(size=(C, H)), r.normal(size=C)
    y = r.integers(0, C, (N, T))
    return h, w, b, y


def _ours(tf, case, h, w, b, y, reduction):
    """(our per-token or mean output, the parameters it is differentiated against)."""
    if case == "sequence":
        z = tf.einsum("nth,ch->ntc", h, w) + b
        return xsl.sequence_cross_entropy(z, y, reduction=reduction)
    if case == "linear_token_stats":
        s = xsl.linear_token_stats(h, w, y, bias=b, outputs=("log_prob",), chunk_size=4)
        v = -s.log_prob
        return v if reduction == "none" else tf.reduce_mean(v)
    kw = dict(chunk_size=4, reduction=reduction)
    if case == "linear_smoothing_bias":
        return xsl.linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1, **kw)
    if case == "linear_return_stats":
        return xsl.linear_cross_entropy(h, w, y, bias=b, return_stats=("entropy",), **kw)[0]
    return xsl.linear_cross_entropy(h, w, y, bias=b, **kw)


def _theirs(tf, case, h, w, b, y, reduction):
    """TensorFlow's own cross-entropy of the materialised logits."""
    z = tf.einsum("nth,ch->ntc", h, w) + b
    eps = 0.1 if case == "linear_smoothing_bias" else 0.0
    soft = tf.one_hot(y, C, dtype=z.dtype) * (1 - eps) + eps / C
    per = tf.nn.softmax_cross_entropy_with_logits(soft, z)
    return per if reduction == "none" else tf.reduce_mean(per)


def _run(tf, mode, fn, *args):
    if mode == "eager":
        return fn(*args)
    return tf.function(fn, jit_compile=(mode == "jit"), autograph=False)(*args)


@pytest.mark.parametrize("case, mode", [(c, "eager") for c in CASES] + [
    ("linear_plain", "function"), ("linear_smoothing_bias", "function"), ("linear_plain", "jit"),
    ("linear_smoothing_bias", "jit"), ("linear_token_stats", "jit"), ("sequence", "jit")])
def test_persistent_tape_two_gradients_and_a_jacobian(tf, case, mode):
    """One persistent tape: the mean's gradient twice (the second use must give the same), then
    the jacobian of the per-token losses (the backward with a cotangent that is not the formed
    one: the chunk loop again, vectorized by tf.vectorized_map; under XLA, where TensorFlow cannot
    vectorize a while_loop, its loop of gradients)."""
    h, w, b, y = (tf.constant(a) for a in _problem())

    def grads(loss_fn, pfor):
        def f(h_, w_, b_):
            with tf.GradientTape(persistent=True) as tape:
                tape.watch([h_, w_, b_])
                mean = loss_fn(tf, case, h_, w_, b_, y, "mean")
                per = loss_fn(tf, case, h_, w_, b_, y, "none")
            g1 = tape.gradient(mean, [h_, w_, b_])
            g2 = tape.gradient(mean, [h_, w_, b_])
            jac = tape.jacobian(per, w_, experimental_use_pfor=pfor)  # d weight: every token's chunk
            return mean, g1, g2, jac
        return _run(tf, mode, f, h, w, b)

    pfor = mode != "jit"  # TensorFlow cannot vectorize the jacobian of any while_loop under XLA
    want, got = grads(_theirs, True), grads(_ours, pfor)
    assert_close(got[0].numpy(), want[0].numpy(), tol=1e-12, what="mean")
    for a, c, d, name in zip(got[1], got[2], want[1], ("h", "w", "b")):
        assert_close(a.numpy(), d.numpy(), tol=1e-12, what=f"d {name}, first gradient")
        assert_close(c.numpy(), d.numpy(), tol=1e-12, what=f"d {name}, second gradient")
    assert_close(got[3].numpy(), want[3].numpy(), tol=1e-12, what=f"jacobian d weight (pfor={pfor})")


@pytest.mark.parametrize("mode", ["eager", "function", "jit"])
@pytest.mark.parametrize("case", ["linear_plain", "linear_smoothing_bias", "linear_token_stats"])
def test_a_second_derivative_through_the_fused_layer_is_nan(tf, case, mode):
    """Nested tapes: the gradient of a function of the first gradient. The fused layer forms its
    first derivatives chunk by chunk and not their derivatives: every second derivative is NaN
    (it used to be a silent zero, or a LookupError or an XLA error under a persistent outer tape),
    while the first gradient, recorded by the outer persistent tape, is right."""
    h, w, b, y = (tf.constant(a) for a in _problem())

    def nested(h_, w_, ask):
        with tf.GradientTape(persistent=True) as outer:
            outer.watch([h_, w_])
            with tf.GradientTape() as inner:
                inner.watch([h_, w_])
                loss = _ours(tf, case, h_, w_, b, y, "mean")
            gh = inner.gradient(loss, h_)
            penalty = tf.reduce_sum(gh * gh)
        return outer.gradient(penalty, [h_, w_]) if ask else (loss, gh)

    loss, gh = _run(tf, mode, lambda a, c: nested(a, c, False), h, w)
    with tf.GradientTape() as tape:
        tape.watch(h)
        want = _theirs(tf, case, h, w, b, y, "mean")
    assert_close(gh.numpy(), tape.gradient(want, h).numpy(), tol=1e-12, what="first gradient under an outer tape")
    second = _run(tf, mode, lambda a, c: nested(a, c, True), h, w)
    assert all(np.isnan(g.numpy()).all() for g in second)
