"""NumPy's value_and_grad kernel (xseqloss/backends/numpy/kernels.py): the gradient is formed chunk by
chunk straight into one output buffer in the logits' dtype. Chunks are made tiny here so every
case crosses chunk boundaries; every path is checked against the float64 reference."""

import numpy as np
import pytest

from helpers.inputs import make_case
from helpers.reference64 import reference
from helpers.support import assert_close

OPTION_SETS = {
    "plain": dict(),
    "ignore_mask": dict(mask=True, ignore=-100),
    "weights_lengths": dict(weights=True, lengths=True),
    "cw_smoothing": dict(class_weights=True, label_smoothing=0.1, ignore=3),
    "zloss_softcap": dict(z_loss=1e-2, logit_softcap=3.0, mask=True),
    "soft": dict(soft=True, label_smoothing=0.05, mask=True),
    "log_probs": dict(inputs="log_probs", weights=True),
    "probs": dict(inputs="probs", mask=True),
}
REDUCTIONS = ["mean", "sum", "none", "per_sequence", "sequence_mean", "per_position"]


@pytest.fixture
def small_chunks():
    from xseqloss.internals import engine as _engine

    with _engine.use("numpy", chunk_elements=16):  # 2 rows of 7 classes per chunk
        yield


@pytest.mark.parametrize("layout", ["NTC", "NCT", "TNC"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_matches_reference(xsl, small_chunks, rng, name, reduction, layout):
    logits, targets, opts = make_case(rng, N=3, T=5, C=7, layout=layout, **OPTION_SETS[name])
    loss, grad = xsl.value_and_grad(logits, targets, layout=layout, reduction=reduction, **opts)
    ref, ref_grad = reference(logits, targets, layout=layout, reduction=reduction, with_grad=True, **opts)
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    assert_close(loss, ref, what="loss")
    assert_close(grad, ref_grad, what="gradient")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("name", ["plain", "cw_smoothing"])
def test_dtypes_and_non_contiguous_logits(xsl, small_chunks, rng, dtype, name):
    logits, targets, opts = make_case(rng, N=2, T=6, C=7, **OPTION_SETS[name])
    base = np.asarray(logits, dtype)
    views = {
        "contiguous": base,
        "fortran": np.asfortranarray(base),
        "strided": np.repeat(base, 2, axis=2)[:, :, ::2],
    }
    ref, ref_grad = reference(base.astype(np.float64), targets, with_grad=True, **opts)
    tol = {"float16": 2e-3, "float32": 2e-6, "float64": 1e-12}[dtype]
    for what, z in views.items():
        loss, grad = xsl.value_and_grad(z, targets, **opts)
        assert grad.dtype == np.dtype(dtype), what
        assert_close(loss, ref, tol=tol, what=f"loss ({what})")
        assert_close(grad, ref_grad, tol=tol, what=f"gradient ({what})")


def test_rows_that_do_not_count_are_exact_zeros_even_with_nan(xsl, small_chunks, rng):
    logits, targets, _ = make_case(rng, N=2, T=5, C=7)
    mask = np.ones((2, 5), bool)
    mask[0, 1] = mask[1, 3] = False
    logits[0, 1] = np.nan
    logits[1, 3, 2] = np.inf
    loss, grad = xsl.value_and_grad(logits, targets, mask=mask)
    assert np.isfinite(loss)
    assert np.all(grad[0, 1] == 0.0) and np.all(grad[1, 3] == 0.0)
    ref, ref_grad = reference(np.nan_to_num(logits, posinf=0.0, nan=0.0), targets, mask=mask, with_grad=True)
    assert_close(loss, ref)
    assert_close(grad, ref_grad)


def test_bad_label_without_validation_gives_a_nan_row(xsl, small_chunks, rng):
    logits, targets, _ = make_case(rng, N=2, T=5, C=7)
    targets[1, 2] = 9
    loss, grad = xsl.value_and_grad(logits, targets, validate=False, reduction="none")
    assert np.isnan(loss[1, 2]) and np.all(np.isnan(grad[1, 2]))
    keep = np.ones((2, 5), bool)
    keep[1, 2] = False
    assert np.all(np.isfinite(grad[keep]))


def test_one_buffer_no_logits_sized_temporaries(xsl, rng):
    """The kernel allocates the gradient and token-sized arrays; nothing else logits-sized."""
    import tracemalloc

    from xseqloss.internals import engine as _engine

    with _engine.use("numpy", chunk_elements=4096 * 8):  # 8 rows per chunk
        _one_buffer(xsl, rng, tracemalloc)


def _one_buffer(xsl, rng, tracemalloc):
    z = rng.normal(size=(64, 4096)).astype(np.float32)  # 1 MB
    y = rng.integers(0, 4096, size=64)
    xsl.value_and_grad(z, y, layout="TC")  # warm caches
    tracemalloc.start()
    _, grad = xsl.value_and_grad(z, y, layout="TC")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak <= z.nbytes * 1.25, peak / z.nbytes  # the generic formula peaks at 4.0


# ------------------------------------------------------------------ the default call's own kernel

@pytest.fixture
def native_calls(monkeypatch):
    """Records each result of NumPy's default-call kernel (None: it handed over to the general path)."""
    from xseqloss.internals import backend

    seen = []
    cls = type(backend("numpy"))
    real = cls.default_token_loss
    monkeypatch.setattr(cls, "default_token_loss", lambda self, *a: seen.append(real(self, *a)) or seen[-1])
    return seen


@pytest.mark.parametrize("layout", ["NTC", "NCT"])
@pytest.mark.parametrize("ignore", [-100, 3, None])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_default_call_kernel_matches_reference(xsl, native_calls, rng, reduction, ignore, layout):
    logits, targets, _ = make_case(rng, N=3, T=5, C=7, layout=layout, ignore=ignore if ignore is not None else None)
    if ignore is not None:
        logits = np.array(logits)
        tok = np.argwhere(targets == ignore)
        if len(tok):  # an ignored row may hold anything
            idx = list(tok[0])
            idx.insert(layout.index("C"), slice(None))
            logits[tuple(idx)] = np.nan
    for validate in (True, False):
        out = xsl.sequence_cross_entropy(logits, targets, layout=layout, reduction=reduction,
                                         ignore_index=ignore, validate=validate)
        assert native_calls and native_calls[-1] is not None
        assert_close(out, reference(logits, targets, layout=layout, reduction=reduction, ignore_index=ignore))


def test_default_call_kernel_edge_cases(xsl, native_calls, rng):
    logits, targets, _ = make_case(rng, N=2, T=4, C=5)
    empty = np.full(targets.shape, -100)
    assert float(xsl.sequence_cross_entropy(logits, empty)) == 0.0
    assert np.isnan(float(xsl.sequence_cross_entropy(logits, empty, empty="nan")))
    minus_inf = logits.copy()
    minus_inf[0, 0] = -np.inf  # lse = -inf: a NaN token, as the general path gives
    out = xsl.sequence_cross_entropy(minus_inf, targets, reduction="none")
    assert np.isnan(out[0, 0]) and np.all(np.isfinite(out.ravel()[1:]))
    assert all(r is not None for r in native_calls)


@pytest.mark.parametrize("bad", [5, -2, -100])
def test_default_call_kernel_hands_bad_labels_to_the_general_path(xsl, native_calls, rng, bad):
    logits, targets, _ = make_case(rng, N=2, T=4, C=5)
    targets[1, 2] = bad
    ignore = None if bad == -100 else -100  # with no ignore value, -100 is just out of range
    with pytest.raises(ValueError, match=rf"targets\[1, 2\] = {bad} is out of range"):
        xsl.sequence_cross_entropy(logits, targets, ignore_index=ignore)
    out = xsl.sequence_cross_entropy(logits, targets, ignore_index=ignore, validate=False, reduction="none")
    assert np.isnan(out[1, 2]) and np.isfinite(np.delete(out.ravel(), 6)).all()
    assert native_calls == [None, None]
