"""Precision policy (API.md "Precision", decisions.md item 13): logsumexp and
every reduction in at least float32, results float32 for float16/bfloat16,
gradients in the input dtype, labels never cast to a float type."""

import math

import numpy as np
import pytest

from helpers.compare import check_case, check_output_meta
from helpers.reference64 import reference
from helpers.support import assert_close, round_to

import xseqloss as xsl
from xseqloss.internals import engine as _engine

LN2 = math.log(2.0)


def _dtypes(backend, wanted):
    return [d for d in wanted if d in backend.supports]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_mean_over_70000_tokens(backend, dtype):
    """torch/TF reduce in float16 and return 0.0 or NaN here (70,000 > 65,504)."""
    if dtype not in backend.supports:
        pytest.skip(f"{backend.name} has no {dtype}")
    n = 70_000
    logits = np.zeros((1, n, 2))
    targets = (np.arange(n) % 2).reshape(1, n)
    out, g = backend.loss_and_grad(logits, targets, dtype, reduction="mean")
    check_output_meta(backend, out, dtype, ())
    assert abs(float(backend.float_out(out)) - LN2) <= 3e-3 * (1 + LN2)
    assert backend.dtype_name(g) == dtype
    g = backend.float_out(g)
    # d mean / d x = (softmax - onehot) / n = -+0.5 / n: small but not zero
    expected = np.where(np.arange(2)[None, None, :] == targets[..., None], -0.5, 0.5) / n
    assert np.all(np.isfinite(g))
    if dtype == "float16":  # 7.1e-6 is a float16 subnormal: ~1% resolution
        np.testing.assert_allclose(g, expected, rtol=0.02)
    else:
        np.testing.assert_allclose(g, expected, rtol=0.01)


def test_float16_sum_above_float16_max(backend):
    """8,192 tokens with loss ~12: the sum 98,304 exceeds float16's max."""
    C, n = 4, 8192
    logits = np.zeros((2, n // 2, C))
    logits[..., 0] = 12.0
    targets = np.full((2, n // 2), 1)
    x = round_to(logits, "float16")
    ref = reference(x, targets, reduction="sum")
    out = backend.loss(logits, targets, "float16", reduction="sum")
    check_output_meta(backend, out, "float16", ())
    got = float(backend.float_out(out))
    assert np.isfinite(got) and ref > 65504
    assert_close(got, ref, "float16")
    mean = backend.float_out(backend.loss(logits, targets, "float16", reduction="per_sequence"))
    assert_close(mean, reference(x, targets, reduction="per_sequence"), "float16")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_large_labels_never_cast_to_float(backend, dtype):
    """C = 5000 with labels 257, 2049, 4097 (not representable in bf16/f16 as
    floats: 2049 -> 2048 in float16, 257 -> 256 in bfloat16)."""
    if dtype not in backend.supports:
        pytest.skip(f"{backend.name} has no {dtype}")
    rng = np.random.default_rng(3)
    C = 5000
    labels = np.array([[257, 2049, 4097], [4097, 2049, 257]])
    logits = rng.normal(size=(2, 3, C))
    for n in range(2):
        for t in range(3):
            logits[n, t, labels[n, t]] = 9.0
    for tdtype in ("int64", "int32"):
        got, ref = check_case(backend, logits, labels.astype(tdtype), dtype=dtype,
                              reduction="none")
        assert np.all(ref < 1.0) and np.all(got < 1.0)  # a wrong label gives ~9+


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_gradient_dtype_is_input_dtype(backend, rng, dtype):
    if dtype not in backend.supports:
        pytest.skip(f"{backend.name} has no {dtype}")
    logits = rng.normal(size=(2, 3, 5))
    targets = rng.integers(0, 5, size=(2, 3))
    for reduction in ("mean", "none", "per_sequence"):
        out, g = backend.loss_and_grad(logits, targets, dtype, reduction=reduction,
                                       label_smoothing=0.1, z_loss=1e-3)
        assert backend.dtype_name(out) == ("float64" if dtype == "float64" else "float32")
        assert backend.dtype_name(g) == dtype


def test_half_extreme_rows_stay_finite(backend):
    """Rows that overflow a naive float16 softmax; the loss is computed in f32."""
    logits = np.array([[[65000.0, 64000.0, 0.0, -65000.0],
                        [6e4, -6e4, 0.0, 0.0]]])
    targets = np.array([[0, 1]])
    got, ref = check_case(backend, logits, targets, dtype="float16", reduction="none")
    assert got[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert got[0, 1] == pytest.approx(1.2e5, rel=3e-3)  # above float16 max, float32 output


def test_float32_huge_logits(backend):
    logits = np.array([[[1e30, -1e30, 0.0, 5.0], [1e4, -1e4, 3.0, 2.0]]])
    targets = np.array([[1, 0]])
    got, ref = check_case(backend, logits, targets, dtype="float32", reduction="none")
    assert np.all(np.isfinite(got))


def test_bfloat16_sum_does_not_stall(backend):
    if "bfloat16" not in backend.supports:
        pytest.skip(f"{backend.name} has no bfloat16")
    C, n = 4, 8192
    logits = np.zeros((1, n, C))
    logits[..., 0] = 12.0
    targets = np.ones((1, n), np.int64)
    out = backend.float_out(backend.loss(logits, targets, "bfloat16", reduction="sum"))
    ref = reference(round_to(logits, "bfloat16"), targets, reduction="sum")
    assert_close(out, ref, "bfloat16")


# -------------------------------------------------------- large logits, every kernel (issue 11)

EXACT = math.log1p(math.exp(-1.0))  # [10000, 9999, -10000], target 0: log(1 + e^-1)


def _kernels(name):
    return _engine.KERNELS[name if name != "tf" else "tensorflow"]


def _forced(backend, kernel):
    sizes = dict(chunk_elements=6) if kernel == "chunked" else {}
    return _engine.use(backend.name, kernel, **sizes)


@pytest.mark.parametrize("opts", [{}, dict(label_smoothing=0.1), dict(class_weights=[1.0, 2.0, 0.5]),
                                  dict(z_loss=1e-9), dict(reduction="sum", weights=[[2.0, 0.5]])],
                         ids=["plain", "smoothing", "class_weights", "z_loss", "weights"])
def test_large_logits_are_exact_to_float32(backend, opts):
    """float32 logits near 1e4 and 3e4 with the target at (or next to) the maximum: lse and z[y]
    each rounded at ulp(1e4) ~ 1e-3 before the subtraction gave an error far above float32's
    tolerance on every backend; in the max-shifted frame it is exact. Every kernel of the backend."""
    z = np.array([[[10000, 9999, -10000], [30000, 29999.5, 29998]]])
    y = np.array([[0, 1]])
    ref = xsl.sequence_cross_entropy(z, y, reduction="none", **{k: v for k, v in opts.items() if k != "reduction"})
    assert abs(float(ref[0, 0]) / (opts.get("class_weights", [1.0])[0]) - EXACT) < 1e-12 or opts
    ref_all = {r: xsl.value_and_grad(z, y, **dict(opts, reduction=r)) for r in ("none", opts.get("reduction", "mean"))}
    for kernel in _kernels(backend.name):
        if kernel == "triton":
            continue  # tests/test_triton_kernel.py (interpreter mode runs in a subprocess)
        with _forced(backend, kernel):
            for red, (rv, rg) in ref_all.items():
                v, g = backend.loss_and_grad(z, y, dtype="float32", **dict(opts, reduction=red))
                assert_close(backend.float_out(v), rv, "float32", what=f"{kernel} {red} value")
                assert_close(backend.float_out(g), rg, "float32", what=f"{kernel} {red} gradient")
