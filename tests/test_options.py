"""Every option on every backend against the float64 reference (tests/helpers/reference64.py):
value, gradient of the summed output, return type, dtype and shape."""

import numpy as np
import pytest

from helpers.compare import check_case
from helpers.inputs import (ALL_LAYOUTS, DENOMINATORS, REDUCTIONS, from_nt, make_case,
                            valid_reductions)
from helpers.reference64 import reference
from helpers.support import assert_close, reductions_for

import xseqloss as xsl

# id -> make_case keyword arguments (N=2, T=4, C=5, layout NTC unless given)
OPTION_CASES = {
    "plain": {},
    "mask_bool": dict(mask=True),
    "mask_numeric": dict(mask_numeric=True),
    "lengths": dict(lengths=True),
    "lengths_and_mask": dict(lengths=True, mask=True),
    "ignore_default_-100": dict(ignore=-100),
    "ignore_int_in_range": dict(ignore=2, ignore_index=2),
    "ignore_negative_custom": dict(ignore=-1, ignore_index=-1),
    "ignore_list": dict(ignore=[-100, 7], ignore_index=[-100, 7]),
    "ignore_tuple_in_range": dict(ignore=(1, 3), ignore_index=(1, 3)),
    "ignore_set": dict(ignore=[-5], ignore_index={-5, 9}),
    "ignore_none": dict(ignore_index=None),
    "weights": dict(weights=True),
    "negative_weights": dict(neg_weights=True),
    "class_weights": dict(class_weights=True),
    "class_weights_mask_weights": dict(class_weights=True, mask=True, weights=True,
                                       ignore=-100),
    "smooth_uniform": dict(label_smoothing=0.1),
    "smooth_others": dict(label_smoothing=0.2, smoothing="others"),
    "smooth_one": dict(label_smoothing=1.0),
    "smooth_uniform_cw": dict(label_smoothing=0.15, class_weights=True, ignore=-100),
    "smooth_others_cw": dict(label_smoothing=0.15, smoothing="others",
                             class_weights=True, mask=True),
    "soft": dict(soft=True),
    "soft_cw_weights_smooth": dict(soft=True, class_weights=True, weights=True,
                                   label_smoothing=0.1),
    "soft_mask_lengths": dict(soft=True, mask=True, lengths=True),
    "log_probs": dict(inputs="log_probs", mask=True),
    "log_probs_smooth_cw": dict(inputs="log_probs", label_smoothing=0.1,
                                class_weights=True, weights=True),
    "probs": dict(inputs="probs", lengths=True, class_weights=True),
    "probs_smooth_others": dict(inputs="probs", label_smoothing=0.1,
                                smoothing="others", ignore=-100),
    "soft_log_probs": dict(soft=True, inputs="log_probs"),
    # "others" = "uniform" with eps * C / (C - 1) (API.md), also for soft targets
    "soft_others": dict(soft=True, label_smoothing=0.2, smoothing="others", mask=True),
    # ignore_index is not used with soft targets (decisions.md item 4)
    "soft_ignore_index": dict(soft=True, ignore_index=2, class_weights=True),
    "z_loss": dict(z_loss=1e-2, mask=True),
    "z_loss_weights": dict(z_loss=0.1, weights=True, ignore=-100),
    "softcap": dict(logit_softcap=2.0, scale=4.0),
    "softcap_z_loss_smooth": dict(logit_softcap=3.0, z_loss=1e-3,
                                  label_smoothing=0.1, scale=5.0, lengths=True),
    "everything": dict(mask=True, lengths=True, ignore=-100, weights=True,
                       class_weights=True, label_smoothing=0.1, z_loss=1e-3,
                       logit_softcap=5.0),
    "C1": dict(C=1),
    "C1_others": dict(C=1, label_smoothing=0.3, smoothing="others"),
    "C2": dict(C=2, label_smoothing=0.3, smoothing="others"),
    "num_classes": dict(num_classes=5),
    "validate_false": dict(validate=False, mask=True, ignore=-100),
    "N1_T1": dict(N=1, T=1),
}


def _reductions_and_denominators(layout="NTC"):
    for r in valid_reductions(layout):
        if r in ("none", "sum"):
            yield r, "weights"
        else:
            for d in DENOMINATORS:
                yield r, d


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_option_matches_reference(backend, rng, case):
    """Every reduction with the default denominator (the denominators are
    crossed with the reductions in test_denominators)."""
    kw = dict(OPTION_CASES[case])
    logits, targets, opts = make_case(rng, **kw)
    for reduction in reductions_for(backend, REDUCTIONS, case):
        check_case(backend, logits, targets, reduction=reduction, **opts)


@pytest.mark.parametrize("case", ["class_weights_mask_weights", "soft_cw_weights_smooth",
                                  "lengths_and_mask"])
def test_denominators(backend, rng, case):
    logits, targets, opts = make_case(rng, **OPTION_CASES[case])
    keep = reductions_for(backend, ("mean", "per_sequence", "per_position", "sequence_mean"),
                          case)
    for reduction, denominator in _reductions_and_denominators():
        if reduction not in keep:
            continue
        check_case(backend, logits, targets, reduction=reduction,
                   denominator=denominator, **opts)


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_layout_matches_reference(backend, rng, layout):
    N, T, C = (3 if "N" in layout else 1), (4 if "T" in layout else 1), 5
    kw = dict(N=N, T=T, C=C, layout=layout, mask=True, weights=True, ignore=-100)
    if "N" in layout and "T" in layout:
        kw["lengths"] = True
    logits, targets, opts = make_case(rng, **kw)
    for reduction in reductions_for(backend, valid_reductions(layout), layout):
        check_case(backend, logits, targets, layout=layout, reduction=reduction,
                   denominator="tokens" if reduction == "per_position" else "weights",
                   **opts)


@pytest.mark.parametrize("layout", ["NCT", "TNC", "CNT"])
def test_layout_soft_targets(backend, rng, layout):
    logits, targets, opts = make_case(rng, N=2, T=3, C=4, layout=layout, soft=True,
                                      mask=True, class_weights=True)
    for reduction in reductions_for(backend, valid_reductions(layout), layout + "soft"):
        check_case(backend, logits, targets, layout=layout, reduction=reduction, **opts)


@pytest.mark.parametrize("reduction", ["mean", "sequence_mean"])
@pytest.mark.parametrize("normalizer", [7, 2.5, "array"])
def test_normalizer(backend, rng, reduction, normalizer):
    logits, targets, opts = make_case(rng, mask=True, weights=True)
    if normalizer == "array":  # a scalar array of the backend's own type
        value = 3.0
        norm = backend.array(np.asarray(value, np.float64))
    else:
        value = norm = normalizer
    out = backend.loss(logits, targets, reduction=reduction, normalizer=norm, **opts)
    ref = reference(logits, targets, reduction=reduction, normalizer=value, **opts)
    assert_close(backend.float_out(out), ref)
    # and through the reference checker with the gradient (plain number)
    if normalizer != "array":
        check_case(backend, logits, targets, reduction=reduction,
                   normalizer=normalizer, **opts)


@pytest.mark.parametrize("empty", ["zero", "nan"])
def test_empty_all_masked(backend, rng, empty):
    logits, targets, opts = make_case(rng)
    opts["mask"] = np.zeros(targets.shape, bool)
    for reduction, denominator in [("none", "weights"), ("sum", "weights"),
                                   ("mean", "weights"), ("mean", "tokens"),
                                   ("per_sequence", "weights"), ("per_position", "tokens"),
                                   ("sequence_mean", "weights")]:
        got, ref = check_case(backend, logits, targets, reduction=reduction,
                              denominator=denominator, empty=empty, **opts)
        if reduction in ("mean", "sequence_mean", "per_sequence", "per_position"):
            assert np.all(np.isnan(got)) if empty == "nan" else np.all(got == 0)


@pytest.mark.parametrize("empty", ["zero", "nan"])
def test_empty_partial(backend, rng, empty):
    """One sequence and one position without counted tokens: only those
    entries follow the empty rule; the gradient is exactly zero there."""
    logits, targets, opts = make_case(rng, N=3, T=4)
    mask = np.ones((3, 4), bool)
    mask[1, :] = False
    mask[:, 2] = False
    got = {}
    for reduction in ("per_sequence", "per_position", "mean", "sequence_mean"):
        got[reduction], _ = check_case(backend, logits, targets, reduction=reduction,
                                       empty=empty, mask=mask, **opts)
    for key, empty_at, full_at in (("per_sequence", 1, [0, 2]),
                                   ("per_position", 2, [0, 1, 3])):
        v = got[key]
        assert np.isnan(v[empty_at]) if empty == "nan" else v[empty_at] == 0
        assert np.all(np.isfinite(v[full_at]))
    assert np.isfinite(got["mean"])


@pytest.mark.parametrize("empty", ["zero", "nan"])
def test_zero_normalizer_follows_empty(backend, rng, empty):
    logits, targets, opts = make_case(rng)
    got, _ = check_case(backend, logits, targets, reduction="mean", normalizer=0,
                        empty=empty)
    assert np.isnan(got) if empty == "nan" else got == 0


def test_empty_batch_N0(backend, rng):
    logits = np.zeros((0, 3, 4))
    targets = np.zeros((0, 3), np.int64)
    for reduction in REDUCTIONS:
        got, _ = check_case(backend, logits, targets, reduction=reduction)
        if reduction in ("mean", "sequence_mean", "per_position"):
            assert np.all(got == 0)  # empty="zero"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", ["plain", "everything", "soft_cw_weights_smooth",
                                  "smooth_others_cw", "probs"])
def test_low_precision_matches_reference(backend, rng, dtype, case):
    if dtype not in backend.supports:
        pytest.skip(f"{backend.name} has no {dtype}")
    logits, targets, opts = make_case(rng, N=3, T=5, C=6, **OPTION_CASES[case])
    for reduction in reductions_for(backend, ("none", "mean", "per_sequence", "sum"),
                                    case + dtype):
        check_case(backend, logits, targets, dtype=dtype, reduction=reduction, **opts)


@pytest.mark.parametrize("tdtype", ["int8", "int16", "int32", "int64", "uint8"])
def test_integer_target_dtypes(backend, rng, tdtype):
    """Any integer dtype of targets is accepted (decisions.md item 14)."""
    logits, targets, opts = make_case(rng, mask=True)
    targets = targets.astype(tdtype)
    for reduction in ("none", "mean"):
        check_case(backend, logits, targets, reduction=reduction, **opts)


def test_numpy_side_arrays_are_converted(backend, rng):
    """Side arrays given as NumPy (and lengths as a Python list) are moved to
    the logits' framework; the result is still the logits' framework type."""
    logits, targets, opts = make_case(rng, mask=True, weights=True,
                                      class_weights=True, ignore=-100)
    for reduction in ("none", "mean"):
        check_case(backend, logits, targets, native=False, reduction=reduction,
                   lengths=[4, 2], **opts)


def test_backend_argument_converts_numpy(backend, rng, xsl):
    """backend="name" turns NumPy logits and targets into that framework."""
    logits, targets, opts = make_case(rng, mask=True, lengths=True, weights=True)
    for reduction in ("none", "per_sequence", "mean"):
        out = xsl.sequence_cross_entropy(logits, targets, backend=backend.name,
                                         reduction=reduction, **opts)
        assert backend.is_native(out), type(out)
        assert backend.dtype_name(out) == "float64"
        assert_close(backend.float_out(out),
                     reference(logits, targets, reduction=reduction, **opts))


def test_single_token_python_int_target(backend, xsl):
    """One token (layout "C") with a Python int target."""
    out = xsl.sequence_cross_entropy(np.array([0.5, 1.5, -1.0]), 1, layout="C",
                                     backend=backend.name)
    ref = reference(np.array([0.5, 1.5, -1.0]), np.array(1), layout="C")
    assert backend.is_native(out)
    assert abs(float(backend.float_out(out)) - float(ref)) < 1e-6


def test_neg_inf_at_non_target_class_is_finite(backend, rng):
    """Vocabulary masking: -inf at classes other than the target keeps the loss
    and gradient finite and exact."""
    logits, targets, opts = make_case(rng, N=2, T=3, C=5)
    targets = np.array([[0, 1, 2], [3, 4, 0]])
    logits[0, 0, 3] = -np.inf
    logits[1, 2, 1:] = -np.inf
    for reduction in ("none", "mean"):
        got, ref = check_case(backend, logits, targets, reduction=reduction)
        assert np.all(np.isfinite(got))


def test_uniform_logits_give_log_C(backend):
    C = 7
    logits = np.full((2, 3, C), 1.25)
    targets = np.arange(6).reshape(2, 3) % C
    out = backend.float_out(backend.loss(logits, targets, reduction="none"))
    np.testing.assert_allclose(out, np.log(C), rtol=1e-12)


def test_token_weights_scale_none_output(backend, rng):
    """decisions.md item 1: "none" returns weights * l."""
    logits, targets, _ = make_case(rng)
    w = from_nt(np.array([[1.0, 2.0, 0.0, -1.0], [0.5, 1.0, 3.0, 1.0]]), "NTC")
    plain = backend.float_out(backend.loss(logits, targets, reduction="none"))
    weighted = backend.float_out(backend.loss(logits, targets, reduction="none",
                                              weights=w))
    np.testing.assert_allclose(weighted, w * plain, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_non_contiguous_views(name, xsl, rng):
    """Strided views (a permuted NTC buffer read as "NCT", every other step)."""
    from helpers.support import get_backend
    backend = get_backend(name)
    logits, targets, opts = make_case(rng, N=2, T=6, C=5, mask=True, weights=True)
    base = backend.array(logits)
    if name == "torch":
        base.requires_grad_(True)
        view = base.permute(0, 2, 1)[:, :, ::2]
    else:
        view = np.transpose(base, (0, 2, 1))[:, :, ::2]
    sub = {k: v[:, ::2] for k, v in opts.items()}
    ref, gref = reference(logits[:, ::2], targets[:, ::2], reduction="none", with_grad=True,
                          **sub)
    args = (view, backend.array(targets[:, ::2]))
    kw = dict(layout="NCT", reduction="none", **{k: backend.array(v) for k, v in sub.items()})
    out = xsl.sequence_cross_entropy(*args, **kw)
    assert_close(backend.float_out(out), ref)
    if name == "torch":
        out.sum().backward()
        g = backend.float_out(base.grad)
        assert_close(g[:, ::2], gref)
        assert np.all(g[:, 1::2] == 0)
    else:
        _, g = xsl.value_and_grad(*args, **kw)
        assert_close(g, np.transpose(gref, (0, 2, 1)))


@pytest.mark.parametrize("tdtype,ignore", [("int8", -100), ("int16", -1), ("uint8", 255),
                                           ("int32", -100)])
def test_integer_target_dtypes_with_ignore_index(backend, rng, tdtype, ignore):
    logits, targets, opts = make_case(rng, ignore=ignore, ignore_index=ignore)
    for reduction in ("none", "mean"):
        check_case(backend, logits, targets.astype(tdtype), reduction=reduction, **opts)


# ignore_index given as a 0-d array or a framework scalar (issue 11)
def _scalar(backend, value):
    """value as a 0-d integer array of the backend's own framework (NumPy for numpy)."""
    return backend.array(np.array(value, np.int64))


def test_ignore_index_as_0d_array_or_tensor(backend):
    z = np.random.default_rng(0).normal(size=(1, 3, 4))
    y = np.array([[1, 2, -3]])
    want = xsl.sequence_cross_entropy(z, y, ignore_index=-3)
    for ig in (np.array(-3), np.int32(-3), _scalar(backend, -3)):
        got = backend.float_out(backend.loss(z, y, ignore_index=ig))
        assert_close(got, want, what=f"ignore_index={ig!r}")
    got = backend.float_out(backend.loss(z, y, ignore_index=[np.int64(-3), _scalar(backend, 7)]))
    assert_close(got, want)
