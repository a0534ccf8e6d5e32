"""Small calls (issue 25, item 6): the per-signature cache of the call's static part
(``prepare_plain``) gives exactly what ``prepare_call`` gives and never hides an error, and the
default call's lean kernels (NumPy's value_and_grad included) agree with the general path and
with the float64 reference on every backend. Speed is measured by benchmarks/bench.py, not here."""

import numpy as np
import pytest

from helpers.reference64 import reference
from helpers.support import get_backend

OPTIONS = [
    {},
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(ignore_index=None),
    dict(ignore_index=2, empty="nan"),
    dict(label_smoothing=0.1),
    dict(layout="NCT"),
    dict(z_loss=1e-3, logit_softcap=30.0),
    dict(validate=False),
]


def _inputs(rng, layout="NTC", soft=False):
    z = rng.standard_normal((3, 5, 7)).astype(np.float32)
    y = rng.integers(0, 7, (3, 5))
    y[0, :2] = -100
    if layout == "NCT":
        z = np.ascontiguousarray(np.moveaxis(z, 2, 1))
    return z, y


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_cached_call_equals_prepared_call(xsl, backend, rng, opts):
    """The second call of a signature comes from the cache: the same plan, shapes and arrays."""
    from xseqloss.internals import prepare_call, prepare_plain

    be = backend
    z, y = _inputs(rng, opts.get("layout", "NTC"))
    zz, yy = be.array(z), be.array(y)
    first = prepare_plain(zz, yy, dict(opts))
    again = prepare_plain(zz, yy, dict(opts))
    fresh = prepare_call(zz, yy, **opts)
    for c in (first, again):
        assert c.st == fresh.st and c.shape == fresh.shape and c.tok_shape == fresh.tok_shape
        assert c.be is fresh.be and c.z is zz and c.tracing is False and c.check_sides is False
        np.testing.assert_array_equal(be.to_numpy(c.y), be.to_numpy(fresh.y))
        assert all(a is None for a in c.arrays[2:])


def test_cache_never_hides_an_error(xsl, backend, rng):
    """An error is raised by prepare_call itself: a bad option of a cached signature still raises,
    and the value checks (run on every call) still catch a bad label on a cache hit."""
    be = backend
    z, y = _inputs(rng)
    zz = be.array(z)
    xsl.sequence_cross_entropy(zz, be.array(y))
    xsl.sequence_cross_entropy(zz, be.array(y))
    with pytest.raises(xsl.XSeqLossTypeError, match="ignore_index"):
        xsl.sequence_cross_entropy(zz, be.array(y), ignore_index=True)  # == 1, another type: not a hit
    with pytest.raises(xsl.XSeqLossError, match="layout"):
        xsl.sequence_cross_entropy(zz, be.array(y), layout="NTX")
    bad = y.copy()
    bad[2, 4] = 7
    with pytest.raises(xsl.XSeqLossError, match=r"targets\[2, 4\] = 7 is out of range"):
        xsl.sequence_cross_entropy(zz, be.array(bad))
    if be.name != "numpy":
        return
    with pytest.raises(xsl.XSeqLossError, match=r"targets\[2, 4\] = 7 is out of range"):
        xsl.value_and_grad(z, bad)
    loss, grad = xsl.value_and_grad(z, bad, validate=False)
    assert np.isnan(loss)


def test_cache_follows_the_engine(xsl, rng):
    """The kernel in force is part of the signature: engine.use changes the plan of a cached call."""
    from xseqloss.internals import engine, prepare_plain

    z, y = _inputs(rng)
    auto = prepare_plain(z, y, {})
    with engine.use("numpy", "native"):
        native = prepare_plain(z, y, {})
    assert auto.st.engine.kernel == "auto" and native.st.engine.kernel == "native"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore, all_ignored", [(-100, False), (-100, True), (None, False), (3, False), (3, True)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_value_and_grad_default_kernel(xsl, rng, reduction, ignore, all_ignored, dtype):
    """NumPy's value_and_grad of the default call runs the plain kernel with its gradient: equal to
    the general path (kernel "native") and to the float64 reference, empty means included."""
    from xseqloss.internals import backend, engine

    cls = type(backend("numpy"))
    z = rng.standard_normal((3, 5, 7)).astype(dtype)
    y = rng.integers(0, 7, (3, 5))
    if ignore is not None:
        y[0, :2] = ignore
        if all_ignored:
            y[:] = ignore
    for empty in ("zero", "nan"):
        kw = dict(reduction=reduction, ignore_index=ignore, empty=empty)
        seen = []
        real = cls.default_token_loss
        cls.default_token_loss = lambda self, *a, **k: seen.append(real(self, *a, **k)) or seen[-1]
        try:
            loss, grad = xsl.value_and_grad(z, y, **kw)
        finally:
            cls.default_token_loss = real
        assert seen and seen[-1] is not None and seen[-1][2] is not None  # the kernel formed the gradient
        with engine.use("numpy", "native"):
            ref_loss, ref_grad = xsl.value_and_grad(z, y, **kw)
        assert type(loss) is type(ref_loss) and np.asarray(loss).dtype == np.asarray(ref_loss).dtype
        assert grad.dtype == ref_grad.dtype == z.dtype
        tol = 1e-5 if dtype == "float32" else 1e-12
        np.testing.assert_allclose(loss, ref_loss, rtol=tol, atol=tol)
        np.testing.assert_allclose(grad, ref_grad, rtol=tol, atol=tol)
        np.testing.assert_allclose(loss, reference(z, y, **kw), rtol=tol, atol=tol)
        if ignore is not None:
            assert (grad[y == ignore] == 0).all()


def test_torch_default_kernel_counts_on_the_host(xsl, rng):
    """PyTorch's default call: F.cross_entropy's own mean over the counted tokens, the empty mean
    the core's (0 or NaN, exactly 0 gradient), a NaN row that is ignored gives 0 gradient."""
    torch = get_backend("torch").torch
    z, y = _inputs(rng)
    z[0, 1] = np.nan  # an ignored row
    for empty in ("zero", "nan"):
        for yy in (y, np.full_like(y, -100)):
            x = torch.tensor(z, requires_grad=True)
            out = xsl.sequence_cross_entropy(x, torch.tensor(yy), empty=empty)
            out.backward()
            want = reference(np.where(np.isnan(z), 0, z), yy, empty=empty)
            np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-5, equal_nan=True)
            assert torch.isfinite(x.grad).all()
            assert (x.grad.numpy()[yy == -100] == 0).all()


@pytest.mark.parametrize("kw", [{}, dict(label_smoothing=0.1)], ids=["default_call", "general_path"])
def test_softmax_probe_warns_at_the_callers_line(xsl, backend, rng, kw):
    """Probability rows passed as logits warn on every backend and path, attributed to the caller's
    line; logits whose first sampled values happen to lie in [0, 1] do not."""
    import warnings

    z = rng.random((2, 5, 6)).astype(np.float32)
    probs = z / z.sum(-1, keepdims=True)
    y = rng.integers(0, 6, (2, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.float_out(xsl.sequence_cross_entropy(backend.array(probs), backend.array(y), **kw))
    probe = [w for w in caught if "did you pass softmax outputs" in str(w.message)]
    assert len(probe) == 1 and probe[0].filename == __file__
    near = probs.copy()
    near[0, 0, -1] = 3.0  # the first 8 sampled values in [0, 1], the first row not a probability row
    near[0, 1, -1] = -1.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.float_out(xsl.sequence_cross_entropy(backend.array(near), backend.array(y), **kw))
    assert not [w for w in caught if "did you pass softmax outputs" in str(w.message)]
