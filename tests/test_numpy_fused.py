"""NumPy's value_and_grad kernel (xseqloss/backends/numpy.py): the gradient is formed chunk by
chunk straight into one output buffer in the logits' dtype. Chunks are made tiny here so every
case crosses chunk boundaries; every path is checked against the float64 reference."""

import numpy as np
import pytest

from cases import make_case
from reference import reference
from support import assert_close

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
def small_chunks(monkeypatch):
    from xseqloss.backends import numpy as nb

    monkeypatch.setattr(nb, "_CHUNK_ELEMENTS", 16)  # 2 rows of 7 classes per chunk
    return nb


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

    z = rng.normal(size=(64, 4096)).astype(np.float32)  # 1 MB; chunks of 2**21 elements hold it all
    y = rng.integers(0, 4096, size=64)
    from xseqloss.backends import numpy as nb

    nb._CHUNK_ELEMENTS, old = 4096 * 8, nb._CHUNK_ELEMENTS  # 8 rows per chunk
    try:
        xsl.value_and_grad(z, y, layout="TC")  # warm caches
        tracemalloc.start()
        _, grad = xsl.value_and_grad(z, y, layout="TC")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        nb._CHUNK_ELEMENTS = old
    assert peak <= z.nbytes * 1.25, peak / z.nbytes
