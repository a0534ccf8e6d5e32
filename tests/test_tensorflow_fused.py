"""TensorFlow's XLA kernel (xseqloss/backends/tensorflow/xla.py, ``fused_token_loss``): on large logits
plain cross-entropy is formed by an XLA-compiled kernel that also forms the gradient, already
multiplied by the upstream gradient backward expects; backward returns it as it is when that is what
arrives, and rescales or forms it again otherwise. Large inputs are simulated by lowering the size
threshold, so every case here runs the kernel; each is checked against the float64 reference."""

import numpy as np
import pytest

from helpers.inputs import make_case
from helpers.reference64 import reference
from helpers.support import assert_close, get_backend, require_or_skip

OPTION_SETS = {
    "plain": dict(),
    "mask": dict(mask=True, ignore=-100),
    "weights_lengths": dict(weights=True, lengths=True),
    "ignore3": dict(ignore=3),
}
REDUCTIONS = ["mean", "sum", "none", "per_sequence", "sequence_mean", "per_position"]


@pytest.fixture
def tf():
    require_or_skip("tensorflow")
    from xseqloss.internals import engine as _engine

    # the XLA kernel at every size (the engine is part of the plan: traces made for another
    # kernel are never reused)
    with _engine.use("tensorflow", "xla"):
        yield get_backend("tensorflow").tf


@pytest.fixture
def rescales(tf, monkeypatch):
    """Counts the backward passes that had to rescale or form the gradient again (run time, not
    trace time: the counter sits inside the branch)."""
    from xseqloss.internals import backend, part

    xla = part("tensorflow", "xla")
    seen = []
    real = xla.rescaled

    def wrapped(*args):
        tick = tf.py_function(lambda: seen.append(1) or 0, [], tf.int32)
        with tf.control_dependencies([tick]):
            return tf.identity(real(*args))

    monkeypatch.setattr(xla, "rescaled", wrapped)
    # traces made before the counter was in place must not be reused, nor these leak into others
    monkeypatch.setattr(backend("tensorflow"), "_functions", {})
    monkeypatch.setattr(backend("tensorflow"), "_concrete", {})
    return seen


def _tape(tf, fn, x, scale=1.0, cotangent=None):
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = fn(x)
        total = tf.reduce_sum(out * cotangent) if cotangent is not None else tf.reduce_sum(out) * scale
    return out, tape.gradient(total, x)


@pytest.mark.parametrize("layout", ["NTC", "NCT", "TNC"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_matches_reference_and_backward_needs_no_pass(xsl, tf, rescales, rng, name, reduction, layout):
    be = get_backend("tensorflow")
    logits, targets, opts = make_case(rng, N=3, T=5, C=7, layout=layout, **OPTION_SETS[name])
    x, t, kw = be.convert_args(logits, targets, "float64", opts)
    fn = lambda z: xsl.sequence_cross_entropy(z, t, layout=layout, reduction=reduction, **kw)  # noqa: E731
    out, grad = _tape(tf, fn, x)
    ref, ref_grad = reference(logits, targets, layout=layout, reduction=reduction, with_grad=True, **opts)
    assert_close(be.to_numpy(out), ref, what="loss")
    assert_close(be.to_numpy(grad), ref_grad, what="gradient")
    assert rescales == [], "backward of the loss itself should return the gradient formed in the forward pass"
    assert_close(be.to_numpy(fn(x)), ref, what="loss without a tape")  # the forward-only trace


@pytest.mark.parametrize("reduction", ["mean", "none", "per_sequence"])
def test_a_scaled_loss_or_a_cotangent_rescales(xsl, tf, rescales, rng, reduction):
    be = get_backend("tensorflow")
    logits, targets, opts = make_case(rng, N=3, T=5, C=7, **OPTION_SETS["mask"])
    x, t, kw = be.convert_args(logits, targets, "float64", opts)
    fn = lambda z: xsl.sequence_cross_entropy(z, t, reduction=reduction, **kw)  # noqa: E731
    ref, ref_grad = reference(logits, targets, reduction=reduction, with_grad=True, **opts)
    _, grad = _tape(tf, fn, x, scale=1024.0)  # a loss scale, as mixed precision uses
    assert_close(be.to_numpy(grad), 1024.0 * ref_grad, what="scaled gradient")
    assert len(rescales) == 1
    ct = rng.normal(size=np.shape(ref))
    _, grad = _tape(tf, fn, x, cotangent=tf.constant(ct))
    _, ref_ct = reference(logits, targets, reduction=reduction, with_grad=True, cotangent=ct, **opts)
    assert_close(be.to_numpy(grad), ref_ct, what="gradient of a cotangent")


def test_a_row_folded_to_zero_is_formed_again(tf, rng):
    """Through the public API an upstream gradient is always proportional to the fold; the rule
    for a row the fold zeroed that now needs a value is checked on the helper itself."""
    from xseqloss.internals import backend, part

    xla = part("tensorflow", "xla")
    z = rng.normal(size=(4, 6))
    y = np.array([0, 5, 2, 3])
    hint = np.array([0.5, 0.0, 0.25, 0.0])
    dl = np.array([1.0, 2.0, 0.5, 0.0])
    keep = tf.zeros([], tf.bool)
    zt, yt, ht = tf.constant(z), tf.constant(y), tf.constant(hint)
    _, g = xla._xla_kernel(2, 1, True, False)(zt, yt, keep, ht)
    out = xla.rescaled(backend("tensorflow"), zt, yt, keep, None, g, tf.constant(dl), ht, 1, False, 0).numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = (p - np.eye(6)[y]) * dl[:, None]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_dtypes(xsl, tf, rng, dtype):
    be = get_backend("tensorflow")
    logits, targets, opts = make_case(rng, N=2, T=6, C=7, **OPTION_SETS["mask"])
    x, t, kw = be.convert_args(logits, targets, dtype, opts)
    out, grad = _tape(tf, lambda z: xsl.sequence_cross_entropy(z, t, **kw), x)
    assert grad.dtype == x.dtype and out.dtype == (tf.float64 if dtype == "float64" else tf.float32)
    base = be.to_numpy(x)  # the rounded logits
    ref, ref_grad = reference(base, targets, with_grad=True, **opts)
    tol = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 2e-6, "float64": 1e-12}[dtype]
    assert_close(be.to_numpy(out), ref, tol=tol, what="loss")
    assert_close(be.to_numpy(grad), ref_grad, tol=tol, what="gradient")


def test_rows_that_do_not_count_are_exact_zeros_even_with_nan(xsl, tf, rng):
    logits, targets, _ = make_case(rng, N=2, T=5, C=7)
    mask = np.ones((2, 5), bool)
    mask[0, 1] = mask[1, 3] = False
    targets[1, 4] = -100
    logits[0, 1] = np.nan
    logits[1, 3, 2] = np.inf
    logits[1, 4, 0] = -np.inf
    x = tf.constant(logits)
    out, grad = _tape(tf, lambda z: xsl.sequence_cross_entropy(z, tf.constant(targets), mask=tf.constant(mask)), x)
    g = grad.numpy()
    assert np.isfinite(out.numpy()) and np.all(np.isfinite(g))
    assert np.all(g[0, 1] == 0.0) and np.all(g[1, 3] == 0.0) and np.all(g[1, 4] == 0.0)
    clean = np.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)
    ref, ref_grad = reference(clean, targets, mask=mask, with_grad=True)
    assert_close(out.numpy(), ref)
    assert_close(g, ref_grad)


def test_bad_label_without_validation_gives_a_nan_row(xsl, tf, rng):
    logits, targets, _ = make_case(rng, N=2, T=5, C=7)
    targets[1, 2] = 9
    x = tf.constant(logits)
    fn = lambda z: xsl.sequence_cross_entropy(z, tf.constant(targets), reduction="none", validate=False)  # noqa: E731
    out, grad = _tape(tf, fn, x)
    out, g = out.numpy(), grad.numpy()
    assert np.isnan(out[1, 2]) and np.all(np.isnan(g[1, 2]))
    ok = np.ones((2, 5), bool)
    ok[1, 2] = False
    ref, ref_grad = reference(logits, np.where(ok, targets, 0), reduction="none", with_grad=True)
    assert_close(out[ok], ref[ok])
    assert_close(g[ok], ref_grad[ok])


def test_inside_a_tf_function_with_known_and_unknown_shapes(xsl, tf, monkeypatch, rng):
    """Inside the caller's tf.function the kernel is chosen at trace time when the size is known,
    at run time (a tf.cond against the native kernel) when a dimension is not."""
    from xseqloss.internals import engine as _engine

    with _engine.use("tensorflow", "auto", xla_min_elements=100):
        _known_and_unknown(xsl, tf, rng)


def _known_and_unknown(xsl, tf, rng):
    spec = [tf.TensorSpec([None, 5, 7], tf.float64), tf.TensorSpec([None, 5], tf.int64),
            tf.TensorSpec([None, 5], tf.bool)]

    def step(z, y, m):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = xsl.sequence_cross_entropy(z, y, mask=m)
        return loss, tape.gradient(loss, z)

    unknown = tf.function(step, input_signature=spec)
    known = tf.function(step)
    for n in (1, 4):  # 35 elements (native kernel) and 140 (XLA kernel)
        logits, targets, opts = make_case(rng, N=n, T=5, C=7, mask=True)
        ref, ref_grad = reference(logits, targets, with_grad=True, **opts)
        args = (tf.constant(logits), tf.constant(targets), tf.constant(opts["mask"]))
        for f in (unknown, known):
            loss, grad = f(*args)
            assert_close(loss.numpy(), ref, what=f"loss, n={n}")
            assert_close(grad.numpy(), ref_grad, what=f"gradient, n={n}")


def test_a_second_gradient_from_a_persistent_tape(xsl, tf, rng):
    logits, targets, _ = make_case(rng, N=2, T=5, C=7)
    x = tf.constant(logits)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        loss = xsl.sequence_cross_entropy(x, tf.constant(targets))
    g1 = tape.gradient(loss, x).numpy()
    g2 = tape.gradient(loss, x).numpy()
    np.testing.assert_array_equal(g1, g2)
    assert_close(g1, reference(logits, targets, with_grad=True)[1])


def test_below_the_threshold_the_native_kernel_runs(xsl, tf, monkeypatch, rng):
    from xseqloss.internals import part

    xla = part("tensorflow", "xla")
    calls = []
    real = xla._xla_kernel
    monkeypatch.setattr(xla, "_xla_kernel", lambda *a: calls.append(a) or real(*a))
    logits, targets, _ = make_case(rng, N=2, T=5, C=7)
    xsl.sequence_cross_entropy(tf.constant(logits), tf.constant(targets))
    assert calls, "the XLA kernel should run at threshold 0"
    calls.clear()
    from xseqloss.internals import engine as _engine
    with _engine.use("tensorflow", "auto", xla_min_elements=71):
        xsl.sequence_cross_entropy(tf.constant(logits), tf.constant(targets))
    assert not calls, "70 elements are below a threshold of 71"
    with _engine.use("tensorflow", "native"):
        xsl.sequence_cross_entropy(tf.constant(logits), tf.constant(targets))
    assert not calls, "the native kernel never runs the XLA kernel"


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_value_and_grad_runs_the_kernel_with_its_gradient(xsl, tf, rng, reduction):
    """xseqloss.value_and_grad traces its own tape: the kernel must form the gradient there even
    though no tape is active outside, and after a forward-only call with the same arguments."""
    be = get_backend("tensorflow")
    logits, targets, opts = make_case(rng, N=3, T=5, C=7, **OPTION_SETS["mask"])
    x, t, kw = be.convert_args(logits, targets, "float64", opts)
    ref, ref_grad = reference(logits, targets, reduction=reduction, with_grad=True, **opts)
    assert_close(be.to_numpy(xsl.sequence_cross_entropy(x, t, reduction=reduction, **kw)), ref)
    loss, grad = xsl.value_and_grad(x, t, reduction=reduction, **kw)
    assert_close(be.to_numpy(loss), ref, what="loss")
    assert_close(be.to_numpy(grad), ref_grad, what="gradient")


def test_the_same_class_axis_at_two_ranks(xsl, tf, rng):
    """'NC' and 'NCT' both have classes at axis 1: the kernel is traced per rank, so calls at one
    rank never relax the other's trace to an unknown rank."""
    for layout, shape in [("NCT", (2, 7, 5)), ("NC", (6, 7)), ("NCT", (3, 7, 4)), ("NC", (4, 7))]:
        logits = rng.normal(size=shape)
        targets = rng.integers(0, 7, size=tuple(d for i, d in enumerate(shape) if i != 1))
        x = tf.constant(logits)
        out, grad = _tape(tf, lambda z: xsl.sequence_cross_entropy(z, tf.constant(targets), layout=layout), x)
        ref, ref_grad = reference(logits, targets, layout=layout, with_grad=True)
        assert_close(out.numpy(), ref, what=f"loss {layout} {shape}")
        assert_close(grad.numpy(), ref_grad, what=f"gradient {layout} {shape}")


# ------------------------------------------------------------ linear_token_stats' chunk kernel

def _linear_stats_grads(xsl, tf, h, w, b, y, ids, temp, cts, **kw):
    with tf.GradientTape() as tape:
        tape.watch([h, w, b])
        s = xsl.linear_token_stats(h, w, y, bias=b, ids=ids, temperature=temp, layout="NTH",
                                   outputs=("log_prob", "entropy", "lse", "argmax", "ids_log_prob"), **kw)
        total = tf.add_n([tf.reduce_sum(getattr(s, n) * c) for n, c in cts.items()])
    return s, tape.gradient(total, [h, w, b])


@pytest.mark.parametrize("traced", [False, True])
def test_linear_stats_chunk_kernel_by_xla_matches_the_native_formula(xsl, tf, monkeypatch, rng, traced):
    """``compile_chunk_kernel``: under kernel "xla" every chunk of linear_token_stats runs one XLA
    program (forward and backward); outputs and gradients agree with the native formula ("native"
    never compiles it), with several chunks, a padded last one, a bias, ids, a per-token
    temperature and random cotangents on every differentiable output."""
    from xseqloss.internals import engine as _engine
    from xseqloss.internals import part

    ls = part("tensorflow", "linear_stats")
    calls = []
    real = ls._compiled
    monkeypatch.setattr(ls, "_compiled", lambda *a: calls.append(a[1].__name__) or real(*a))
    N, T, H, C = 2, 9, 6, 13
    h = tf.constant(rng.standard_normal((N, T, H)).astype(np.float32))
    w = tf.constant(rng.standard_normal((C, H)).astype(np.float32))
    b = tf.constant(rng.standard_normal(C).astype(np.float32))
    y = tf.constant(rng.integers(0, C, (N, T)))
    ids = tf.constant(rng.integers(0, C, (N, T, 2)))
    temp = tf.constant(rng.uniform(0.5, 1.5, (N, T)).astype(np.float32))
    cts = {n: tf.constant(rng.standard_normal((N, T) + ((2,) if n == "ids_log_prob" else ())).astype(np.float32))
           for n in ("log_prob", "entropy", "lse", "ids_log_prob")}
    run = (lambda *a: tf.function(lambda: _linear_stats_grads(*a, chunk_size=4))()) if traced else \
        (lambda *a: _linear_stats_grads(*a, chunk_size=4))
    got = {}
    for kernel in ("xla", "native"):
        calls.clear()
        with _engine.use("tensorflow", kernel):
            got[kernel] = run(xsl, tf, h, w, b, y, ids, temp, cts)
        if kernel == "xla":
            assert {"forward_kernel", "backward_kernel"} <= set(calls), calls
        else:
            assert not calls, "the native kernel never compiles the chunk kernel"
    (s1, g1), (s2, g2) = got["xla"], got["native"]
    for n in ("log_prob", "entropy", "lse", "ids_log_prob", "argmax"):
        np.testing.assert_allclose(getattr(s1, n).numpy(), getattr(s2, n).numpy(), rtol=1e-5, atol=1e-5, err_msg=n)
    for a, c in zip(g1, g2):
        np.testing.assert_allclose(a.numpy(), c.numpy(), rtol=1e-4, atol=1e-5)


def test_linear_stats_chunk_kernel_threshold(xsl, tf, monkeypatch, rng):
    """kernel "auto" compiles the chunk kernel from ``xla_min_elements`` logits per chunk on (XLA
    compiles once per chunk shape: small chunks keep the native formula)."""
    from xseqloss.internals import engine as _engine
    from xseqloss.internals import part

    ls = part("tensorflow", "linear_stats")
    calls = []
    real = ls._compiled
    monkeypatch.setattr(ls, "_compiled", lambda *a: calls.append(1) or real(*a))
    h = tf.constant(rng.standard_normal((8, 5)).astype(np.float32))
    w = tf.constant(rng.standard_normal((7, 5)).astype(np.float32))
    y = tf.constant(rng.integers(0, 7, 8))
    with _engine.use("tensorflow", "auto", xla_min_elements=29):  # chunks of 4 rows: 28 logits
        xsl.linear_token_stats(h, w, y, layout="NH", chunk_size=4)
    assert not calls
    with _engine.use("tensorflow", "auto", xla_min_elements=28):
        xsl.linear_token_stats(h, w, y, layout="NH", chunk_size=4)
    assert calls
