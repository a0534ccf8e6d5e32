"""The error catalogue (API.md section 2, decisions.md item 11) on every backend,
eager: the exception class and regexes on the message (argument name, position,
value, valid range; both shapes with axis letters; layout suggestions).

Then the errors that outside suites and adversarial hunts found missing or wrong (issues 11 and
17), each with a test that fails on the old code: labels that wrapped (uint64 2**64 - 100 became
-100, the ignore value), ignore_index as a float, a bool or an int outside int64, a negative or
NaN NumPy normalizer, the options cache letting a rejected value through, and the soft-target
message stating a rule other than the one enforced."""

import re

import numpy as np
import pytest

from helpers.support import ALL_BACKENDS, _framework_error, get_backend, require_or_skip

import xseqloss as xsl

N, T, C = 2, 3, 4


def base():
    rng = np.random.default_rng(5)
    return rng.normal(size=(N, T, C)), np.array([[0, 1, 2], [3, 0, 1]])


def _t(**changes):
    """targets with some entries changed: _t(**{"0,1": 4})"""
    y = base()[1].copy()
    for k, v in changes.items():
        y[tuple(int(i) for i in k.split(","))] = v
    return y


E, TE = "XSeqLossError", "XSeqLossTypeError"
RANGE_C = r"\[0, 4\)"
LS_RANGE = r"\[0(\.0)?, 1(\.0)?\]"

# id -> (exception, kwargs builder, regexes). The builder returns the keyword
# arguments of sequence_cross_entropy with NumPy values: "logits", "targets"
# and options; NumPy arrays are converted to the backend under test.
ERRORS = {
    "target_ge_C": (E, lambda: dict(targets=_t(**{"0,1": 4})),
                    [r"targets\[0, 1\]", r"= ?4\b", RANGE_C]),
    "target_far_out": (E, lambda: dict(targets=_t(**{"1,2": 1000})),
                       [r"targets\[1, 2\]", r"= ?1000\b", RANGE_C]),
    "target_negative_never_wraps": (E, lambda: dict(targets=_t(**{"1,2": -1})),
                                    [r"targets\[1, 2\]", r"= ?-1\b", RANGE_C]),
    "target_-100_with_ignore_none": (E, lambda: dict(targets=_t(**{"0,0": -100}),
                                                     ignore_index=None),
                                     [r"targets\[0, 0\]", r"= ?-100\b", RANGE_C]),
    "target_-100_other_ignore": (E, lambda: dict(targets=_t(**{"1,1": -100}),
                                                 ignore_index=[-1, 7]),
                                 [r"targets\[1, 1\]", r"= ?-100\b", RANGE_C]),
    "target_bad_TNC_position": (E, lambda: dict(logits=np.zeros((T, N, C)),
                                                targets=np.array([[0, 1], [2, 9], [0, 0]]),
                                                layout="TNC"),
                                [r"targets\[1, 1\]", r"= ?9\b", RANGE_C]),
    "float_targets": (TE, lambda: dict(targets=_t().astype(np.float32)),
                      [r"targets", r"(?i)int"]),
    "bool_targets": (TE, lambda: dict(targets=_t() > 0), [r"targets", r"bool"]),
    "integer_logits": (TE, lambda: dict(logits=np.ones((N, T, C), np.int64)),
                       [r"logits", r"(?i)float"]),
    "C_zero": (E, lambda: dict(logits=np.zeros((N, T, 0)), targets=np.zeros((N, T), np.int64)),
               [r"logits|C", r"(?i)class|C ?= ?0"]),
    "lengths_negative": (E, lambda: dict(lengths=np.array([3, -2])),
                         [r"lengths\[1\]", r"= ?-2\b", r"\[0, 3\]"]),
    "lengths_over_T": (E, lambda: dict(lengths=np.array([4, 1])),
                       [r"lengths\[0\]", r"= ?4\b", r"\[0, 3\]"]),
    "lengths_float": (TE, lambda: dict(lengths=np.array([2.5, 1.0])), [r"lengths"]),
    "mask_shape": (E, lambda: dict(mask=np.ones((2, 4), bool)),
                   [r"mask", r"\(2, 4\)", r"\(N=2, T=3\)"]),
    "mask_broadcast": (E, lambda: dict(mask=np.ones((1, 3), bool)),
                       [r"mask", r"\(1, 3\)", r"\(N=2, T=3\)"]),
    "weights_shape": (E, lambda: dict(weights=np.ones((3, 2))),
                      [r"weights", r"\(3, 2\)", r"\(N=2, T=3\)"]),
    "weights_scalar_broadcast": (E, lambda: dict(weights=np.ones((2,))),
                                 [r"weights", r"\(2,\)", r"\(N=2, T=3\)"]),
    "lengths_shape": (E, lambda: dict(lengths=np.array([1, 2, 3])),
                      [r"lengths", r"\(3,\)", r"\(N=2\)"]),
    "class_weights_shape": (E, lambda: dict(class_weights=np.ones(3)),
                            [r"class_weights", r"\(3,\)", r"\(C=4\)"]),
    "label_smoothing_high": (E, lambda: dict(label_smoothing=1.5),
                             [r"label_smoothing", r"1\.5", LS_RANGE]),
    "label_smoothing_negative": (E, lambda: dict(label_smoothing=-0.1),
                                 [r"label_smoothing", r"-0\.1", LS_RANGE]),
    "z_loss_negative": (E, lambda: dict(z_loss=-0.01), [r"z_loss", r"-0\.01"]),
    "softcap_zero": (E, lambda: dict(logit_softcap=0.0), [r"logit_softcap", r"\b0"]),
    "softcap_negative": (E, lambda: dict(logit_softcap=-2.0), [r"logit_softcap", r"-2"]),
    "class_weights_negative": (E, lambda: dict(class_weights=np.array([1.0, 1.0, -1.0, 1.0])),
                               [r"class_weights\[2\]", r"= ?-1"]),
    "class_weights_inf": (E, lambda: dict(class_weights=np.array([1.0, np.inf, 1.0, 1.0])),
                          [r"class_weights\[1\]", r"= ?inf"]),
    "class_weights_nan": (E, lambda: dict(class_weights=np.array([1.0, 1.0, 1.0, np.nan])),
                          [r"class_weights\[3\]", r"= ?nan"]),
    "layout_unknown_letter": (E, lambda: dict(layout="NTX"), [r"layout", r"NTX"]),
    "layout_repeated": (E, lambda: dict(layout="NNC"), [r"layout", r"NNC"]),
    "layout_without_C": (E, lambda: dict(layout="NT", logits=np.zeros((N, T))),
                         [r"layout", r"NT"]),
    "layout_rank_mismatch": (E, lambda: dict(layout="NC"), [r"layout|logits", r"NC"]),
    "reduction_unknown": (E, lambda: dict(reduction="avg"), [r"reduction", r"avg"]),
    "denominator_unknown": (E, lambda: dict(denominator="count"), [r"denominator", r"count"]),
    "inputs_unknown": (E, lambda: dict(inputs="logit"), [r"inputs", r"logit"]),
    "smoothing_unknown": (E, lambda: dict(smoothing="label", label_smoothing=0.1),
                          [r"smoothing", r"label"]),
    "empty_unknown": (E, lambda: dict(empty="inf"), [r"empty", r"inf"]),
    "backend_unknown": (E, lambda: dict(backend="mxnet"), [r"backend", r"mxnet"]),
    # the message must say that num_classes is what catches a swapped layout
    # when T == C (API.md "Shapes")
    "num_classes_mismatch": (E, lambda: dict(num_classes=3),
                             [r"num_classes", r"\b3\b", r"\b4\b", r"layout",
                              r"(?i)swap", r"T ?== ?C"]),
    "num_classes_swapped_layout": (E, lambda: dict(logits=np.zeros((N, 5, T)),
                                                   targets=np.zeros((N, T), np.int64),
                                                   layout="NCT", num_classes=3),
                                   [r"num_classes", r"layout"]),
    "suggest_NCT": (E, lambda: dict(logits=np.zeros((N, C, T))),
                    [r"did you mean layout=[\"']NCT[\"']"]),
    "suggest_CNT": (E, lambda: dict(logits=np.zeros((C, N, T))),
                    [r"did you mean layout=[\"']CNT[\"']"]),
    "suggest_NTC_from_NCT": (E, lambda: dict(layout="NCT"),
                             [r"did you mean layout=[\"']NTC[\"']"]),
    "targets_broadcast_1T": (E, lambda: dict(targets=np.zeros((1, T), np.int64)),
                             [r"targets", r"\(1, 3\)", r"\(N=2, T=3\)"]),
    "targets_broadcast_N1": (E, lambda: dict(targets=np.zeros((N, 1), np.int64)),
                             [r"targets", r"\(2, 1\)", r"\(N=2, T=3\)"]),
    "targets_trailing_1": (E, lambda: dict(targets=np.zeros((N, T, 1), np.int64)),
                           [r"targets", r"\(2, 3, 1\)"]),
    "targets_flat": (E, lambda: dict(targets=np.zeros((N * T,), np.int64)),
                     [r"targets", r"\(6,\)"]),
    "targets_T_plus_1": (E, lambda: dict(targets=np.zeros((N, T + 1), np.int64)),
                         [r"targets", r"\(2, 4\)", r"\(N=2, T=3\)"]),
    "soft_targets_negative": (E, lambda: dict(targets=np.broadcast_to(
                                  np.array([0.5, 0.5, 0.25, -0.25]), (N, T, C)).copy()),
                              [r"targets"]),
    "soft_targets_nan": (E, lambda: dict(targets=np.where(
                             np.arange(N * T * C).reshape(N, T, C) == 5, np.nan, 0.25)),
                         [r"targets"]),
    "probs_out_of_range": (E, lambda: dict(logits=np.full((N, T, C), 0.25) +
                                           np.array([0.5, -0.5, 0, 0]), inputs="probs"),
                           [r"inputs=[\"']logits[\"']"]),
    "probs_not_normalised": (E, lambda: dict(logits=np.full((N, T, C), 0.3), inputs="probs"),
                             [r"inputs=[\"']logits[\"']"]),
    "z_loss_needs_logits": (E, lambda: dict(z_loss=0.1, inputs="log_probs"),
                            [r"z_loss", r"logits"]),
    "softcap_needs_logits": (E, lambda: dict(logit_softcap=2.0, inputs="probs",
                                             logits=np.full((N, T, C), 0.25)),
                             [r"logit_softcap", r"logits"]),
    "normalizer_with_sum": (E, lambda: dict(normalizer=3.0, reduction="sum"), [r"normalizer"]),
    "normalizer_negative": (E, lambda: dict(normalizer=-1.0), [r"normalizer", r"-1"]),
    "normalizer_nan": (E, lambda: dict(normalizer=float("nan")), [r"normalizer", r"nan"]),
    "lengths_needs_N_and_T": (E, lambda: dict(logits=np.zeros((T, C)), targets=np.zeros(T, np.int64),
                                              layout="TC", lengths=np.array([2])),
                              [r"lengths"]),
    "per_sequence_needs_N": (E, lambda: dict(logits=np.zeros((T, C)), targets=np.zeros(T, np.int64),
                                             layout="TC", reduction="per_sequence"),
                             [r"per_sequence"]),
    "sequence_mean_needs_N": (E, lambda: dict(logits=np.zeros((T, C)), targets=np.zeros(T, np.int64),
                                              layout="TC", reduction="sequence_mean"),
                              [r"sequence_mean"]),
    "per_position_needs_T": (E, lambda: dict(logits=np.zeros((N, C)), targets=np.zeros(N, np.int64),
                                             layout="NC", reduction="per_position"),
                             [r"per_position"]),
}


def call(backend, xsl, spec):
    logits, targets = base()
    kw = spec()
    logits = kw.pop("logits", logits)
    targets = kw.pop("targets", targets)
    x = backend.array(logits)
    t = backend.array(targets)
    for k, v in list(kw.items()):
        if isinstance(v, np.ndarray):
            kw[k] = backend.array(v)
    return xsl.sequence_cross_entropy(x, t, **kw)


def check_message(excinfo, patterns):
    msg = str(excinfo.value)
    for p in patterns:
        assert re.search(p, msg), f"message {msg!r} does not match {p!r}"


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_catalogue(backend, xsl, case):
    exc_name, spec, patterns = ERRORS[case]
    exc = getattr(xsl, exc_name)
    with pytest.raises(exc) as info:
        call(backend, xsl, spec)
    check_message(info, patterns)


def test_exception_hierarchy(xsl):
    assert issubclass(xsl.XSeqLossError, ValueError)
    assert issubclass(xsl.XSeqLossTypeError, TypeError)


def test_C1_is_valid(backend, xsl):
    x = backend.array(np.random.default_rng(0).normal(size=(N, T, 1)))
    t = backend.array(np.zeros((N, T), np.int64))
    out = backend.float_out(xsl.sequence_cross_entropy(x, t, reduction="none"))
    assert np.all(out == 0)


def test_ignored_labels_out_of_range_are_fine(backend, xsl):
    """ignore_index values outside [0, C) (255, -100) do not raise."""
    x = backend.array(np.zeros((N, T, C)))
    y = _t(**{"0,1": 255, "1,1": -100})
    out = xsl.sequence_cross_entropy(x, backend.array(y), ignore_index=[255, -100],
                                     reduction="none")
    got = backend.float_out(out)
    assert got[0, 1] == 0 and got[1, 1] == 0 and np.isclose(got[0, 0], np.log(C))


def test_inplace_backward_rejected_off_torch(backend, xsl):
    x, y = base()
    if backend.name == "torch":
        pytest.skip("inplace_backward is a PyTorch feature (tested in test_helpers)")
    with pytest.raises(xsl.XSeqLossError) as info:
        xsl.sequence_cross_entropy(backend.array(x), backend.array(y), inplace_backward=True)
    check_message(info, [r"inplace_backward", r"(?i)torch"])


def _other_framework(name):
    for other in ALL_BACKENDS:
        if other not in (name, "numpy") and _framework_error(other) is None:
            return get_backend(other)
    pytest.skip("needs a second framework")


@pytest.mark.parametrize("argument", ["targets", "mask", "weights", "lengths",
                                      "class_weights"])
def test_foreign_framework_side_array(backend, xsl, argument):
    """An array of another framework as a side argument is a TypeError that
    says how to convert it."""
    other = _other_framework(backend.name)
    x, y = base()
    values = {"targets": y, "mask": np.ones((N, T), bool), "weights": np.ones((N, T)),
              "lengths": np.array([3, 2]), "class_weights": np.ones(C)}
    kw = {k: backend.array(v) for k, v in values.items() if k != "targets"}
    targets = backend.array(y)
    if argument == "targets":
        targets = other.array(y)
    else:
        kw[argument] = other.array(values[argument])
    with pytest.raises(xsl.XSeqLossTypeError) as info:
        xsl.sequence_cross_entropy(backend.array(x), targets, **kw)
    check_message(info, [argument, r"(?i)convert|numpy|asarray"])


def test_foreign_framework_mentions_both(backend, xsl):
    """The TypeError names the foreign framework and the logits' one."""
    other = _other_framework(backend.name)
    x, y = base()
    with pytest.raises(TypeError) as info:
        xsl.sequence_cross_entropy(backend.array(x), backend.array(y),
                                   mask=other.array(np.ones((N, T), bool)))
    names = {"numpy": r"(?i)numpy", "torch": r"(?i)torch", "tensorflow": r"(?i)tensorflow|tf\.",
             "jax": r"(?i)jax"}
    check_message(info, [names[other.name], names[backend.name]])


# -------------------------------------------------- labels that wrap or slip through (issue 11)

def test_uint64_label_past_int64_is_out_of_range_not_ignored(backend):
    """2**64 - 100 cast to int64 is -100, the default ignore value: it was silently ignored. It
    is checked before any cast, and the message shows the value as given."""
    if backend.name == "jax":
        import jax
        if not jax.config.jax_enable_x64:
            pytest.skip("JAX without x64 has no uint64")
    z = np.zeros((1, 3, 4), np.float32)
    y = np.array([[1, 2, 2 ** 64 - 100]], np.uint64)
    with pytest.raises(xsl.XSeqLossError, match=r"targets\[0, 2\] = 18446744073709551516 is out of range"):
        backend.loss(z, y)
    out = backend.float_out(backend.loss(z, y, validate=False, reduction="none"))
    assert np.isnan(out[0, 2]) and np.isfinite(out[0, :2]).all()


def test_uint32_label_past_int32_under_jax_without_x64():
    """Without x64 JAX's labels are int32: a uint32 label of 2**32 - 100 would become -100."""
    require_or_skip("jax")
    import subprocess
    import sys
    code = ("import numpy as np, jax.numpy as jnp, xseqloss as xsl\n"
            "y = jnp.asarray(np.array([[1, 2**32 - 100]], np.uint32))\n"
            "z = jnp.zeros((1, 2, 3))\n"
            "out = xsl.sequence_cross_entropy(z, y, validate=False, reduction='none')\n"
            "assert bool(jnp.isnan(out[0, 1])), out\n"
            "try:\n    xsl.sequence_cross_entropy(z, y)\nexcept xsl.XSeqLossError as e:\n"
            "    assert '4294967196' in str(e), e\nelse:\n    raise SystemExit('accepted')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------- ignore_index values (issue 11)

@pytest.mark.parametrize("bad, kind, match", [
    (np.array(1.0), xsl.XSeqLossTypeError, "ignore_index must be an int"),
    (np.array(True), xsl.XSeqLossTypeError, "ignore_index must be an int"),
    (2 ** 63, xsl.XSeqLossError, r"ignore_index=9223372036854775808 is out of range"),
    ([1, -(2 ** 63) - 1], xsl.XSeqLossError, r"ignore_index\[1\]=-9223372036854775809 is out of range"),
    ((1.0, 2.0), xsl.XSeqLossTypeError, r"ignore_index\[0\] = 1.0 is not an int"),
])
def test_bad_ignore_index_is_our_error_on_every_backend(backend, bad, kind, match):
    z = np.zeros((1, 2, 3))
    y = np.array([[1, 2]])
    with pytest.raises(kind, match=match):
        backend.loss(z, y, ignore_index=bad)


def test_bad_tensor_ignore_index_is_our_error(backend):
    if backend.name == "numpy":
        pytest.skip("NumPy arrays: test_bad_ignore_index_is_our_error_on_every_backend")
    with pytest.raises(xsl.XSeqLossTypeError, match="ignore_index must be an int"):
        backend.loss(np.zeros((1, 2, 3)), np.array([[1, 2]]), ignore_index=backend.array(np.array(1.5)))


# ---------------------------------------------------- the options cache (issue 17, hunt item 3)

@pytest.mark.parametrize("bad", [(1.0, 2.0), (True, 2), (1, 2.0)])
def test_options_cache_rejects_what_a_fresh_process_rejects(bad):
    z, y = np.zeros((1, 2, 3)), np.array([[1, 2]])
    xsl.sequence_cross_entropy(z, y, ignore_index=(1, 2))  # the good value first: it is cached
    with pytest.raises(xsl.XSeqLossTypeError, match="ignore_index"):
        xsl.sequence_cross_entropy(z, y, ignore_index=bad)
    xsl.sequence_cross_entropy(z, y, label_smoothing=1)  # 1 == 1.0 == True: equal, not the same
    with pytest.raises(xsl.XSeqLossTypeError, match="label_smoothing"):
        xsl.sequence_cross_entropy(z, y, label_smoothing=True)


# ----------------------------------------------------------------- normalizer values (issue 11)

@pytest.mark.parametrize("value", [np.float64(-1.0), np.array(np.nan), np.array(-2.0, np.float32),
                                   np.float32(np.inf)], ids=["np.float64(-1)", "0-d nan", "0-d -2", "inf"])
def test_bad_normalizer_array_raises_on_every_backend(backend, value):
    """A NumPy scalar or 0-d array normalizer that is negative or non-finite was accepted silently
    on the NumPy backend (PyTorch raised): one rule everywhere. With validate=False: NaN."""
    z = np.random.default_rng(1).normal(size=(1, 3, 4))
    y = np.array([[1, 2, 3]])
    with pytest.raises(xsl.XSeqLossError, match=r"normalizer = .* is out of range: valid range is \[0, inf\)"):
        backend.loss(z, y, normalizer=value)
    assert np.isnan(backend.float_out(backend.loss(z, y, normalizer=value, validate=False)))


# ---------------------------------------------- the soft-target message (issue 17, hunt item 7)

def test_soft_target_message_states_the_enforced_rule():
    z = np.zeros((1, 1, 3))
    ok = xsl.sequence_cross_entropy(z, np.array([[[2.0, 0.0, 0.0]]]))  # 2.0 is allowed: finite, >= 0
    assert np.isfinite(ok)
    with pytest.raises(xsl.XSeqLossError, match=r"finite and >= 0, i.e. in \[0, inf\)"):
        xsl.sequence_cross_entropy(z, np.array([[[-0.5, 1.0, 0.5]]]))
