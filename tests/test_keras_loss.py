"""xseqloss.keras.SequenceCrossEntropy: a keras.losses.Loss for compile/fit (API.md section 3).

The in-process tests use whatever Keras backend this interpreter has (TensorFlow unless KERAS_BACKEND
says otherwise). ``test_fit_on_backend`` runs tests/helpers/keras_fit_script.py in a fresh interpreter per
Keras backend, because Keras picks its backend once, at import.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers.support import assert_close, import_or_skip, require_or_skip

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import_or_skip("keras", minversion="3.0")

import keras  # noqa: E402

import xseqloss as xsl  # noqa: E402
import xseqloss.keras as xk  # noqa: E402
from xseqloss.keras import SequenceCrossEntropy  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KERAS_FRAMEWORK = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}

NON_DEFAULT = dict(layout="TNC", ignore_index=[0, -1], class_weights=[1.0, 2.0, 0.5], inputs="logits",
                   label_smoothing=0.2, smoothing="others", z_loss=1e-3, logit_softcap=30.0,
                   reduction="sequence_mean", denominator="tokens", normalizer=12.0, empty="nan",
                   num_classes=3, validate=False, name="seq_ce")


def _batch(seed=0, N=4, T=5, C=3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(N, T, C)).astype(np.float32)
    targets = rng.integers(0, C, (N, T))
    mask = np.ones((N, T), bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    logits[~mask, (targets[~mask] + 1) % C] += 4.0  # padding that would cost a lot if it counted
    return logits, targets, mask


def _with_mask(y_pred, mask):
    from keras.src.backend import set_keras_mask
    y_pred = keras.ops.convert_to_tensor(y_pred)
    set_keras_mask(y_pred, keras.ops.convert_to_tensor(mask))
    return y_pred


def _num(x):
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


def test_config_round_trips_every_option():
    loss = SequenceCrossEntropy(**NON_DEFAULT)
    cfg = loss.get_config()
    for key, value in NON_DEFAULT.items():
        assert cfg[key] == value, key
    json.dumps(cfg)  # plain JSON values (class_weights as a list)
    again = SequenceCrossEntropy.from_config(cfg)
    assert again.get_config() == cfg
    # through Keras's own serialisation (what model.save uses): found by its registered name
    blob = keras.saving.serialize_keras_object(loss)
    back = keras.saving.deserialize_keras_object(json.loads(json.dumps(blob)))
    assert type(back) is SequenceCrossEntropy and back.get_config() == cfg
    assert SequenceCrossEntropy().get_config()["reduction"] == "mean"  # ours, not Keras's default


def test_options_are_keyword_only_and_checked_at_construction():
    with pytest.raises(TypeError):
        SequenceCrossEntropy("NCT")  # noqa
    with pytest.raises(xsl.XSeqLossError, match="reduction='sum_over_batch_size' is not valid"):
        SequenceCrossEntropy(reduction="sum_over_batch_size")
    with pytest.raises(xsl.XSeqLossError, match=r"class_weights\[1\] = -2\.0 is invalid"):
        SequenceCrossEntropy(class_weights=[1.0, -2.0])
    with pytest.raises(xsl.XSeqLossError, match=r"must be \(C=3,\)"):
        SequenceCrossEntropy(class_weights=[1.0, 2.0], num_classes=3)
    with pytest.raises(xsl.XSeqLossError, match="normalizer"):
        SequenceCrossEntropy(reduction="none", normalizer=3)


@pytest.mark.parametrize("opts", [{}, dict(label_smoothing=0.1, class_weights=[1.0, 3.0, 0.5]),
                                  dict(reduction="per_sequence", denominator="tokens")],
                         ids=["plain", "smoothing+cw", "per_sequence"])
def test_keras_mask_and_sample_weight_become_mask_and_weights(opts):
    logits, targets, mask = _batch()
    sw = np.random.default_rng(1).random(targets.shape).astype(np.float32)
    loss = SequenceCrossEntropy(**opts)
    fopts = {k: (np.asarray(v) if k == "class_weights" else v) for k, v in opts.items()}
    want = xsl.sequence_cross_entropy(logits.astype(np.float64), targets, mask=mask, weights=sw, **fopts)
    got = loss(keras.ops.convert_to_tensor(targets), _with_mask(logits, mask), sample_weight=sw)
    assert_close(_num(got), want, "float32")
    # without a Keras mask every position counts: a different number
    unmasked = loss(targets, logits, sample_weight=sw)
    assert_close(_num(unmasked), xsl.sequence_cross_entropy(logits.astype(np.float64), targets, weights=sw,
                                                            **fopts), "float32")
    assert np.abs(_num(unmasked) - _num(got)).max() > 1e-3


def test_per_sample_weights_apply_to_every_token_of_the_sample():
    logits, targets, mask = _batch()
    s = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
    loss = SequenceCrossEntropy()
    for sw in (s, s[:, None]):  # (N,) and (N, 1): Keras's per-sample shapes
        got = loss(targets, _with_mask(logits, mask), sample_weight=sw)
        want = xsl.sequence_cross_entropy(logits.astype(np.float64), targets, mask=mask,
                                          weights=np.repeat(s[:, None], 5, 1).astype(np.float64))
        assert_close(_num(got), want, "float32")
    got = loss(targets, logits, sample_weight=np.repeat(s[:, None], 5, 1)[..., None])  # (N, T, 1)
    assert_close(_num(got), xsl.sequence_cross_entropy(logits.astype(np.float64), targets,
                                                       weights=np.repeat(s[:, None], 5, 1)), "float32")


def test_labels_reach_xseqloss_as_integers(monkeypatch):
    seen = []
    core = xk.sequence_cross_entropy

    def spy(logits, targets, **kw):
        seen.append(keras.backend.standardize_dtype(targets.dtype))
        return core(logits, targets, **kw)

    monkeypatch.setattr(xk, "sequence_cross_entropy", spy)
    logits, targets, mask = _batch()
    SequenceCrossEntropy()(targets.astype(np.int32), logits)
    SequenceCrossEntropy()(targets, logits)
    assert seen and all(d.startswith("int") for d in seen), seen  # Keras's Loss would give float32
    # float class ids (as Keras hands them over) reach xseqloss as integers too
    seen.clear()
    SequenceCrossEntropy()(targets.astype(np.float64), logits)
    assert seen and all(d.startswith("int") for d in seen), seen
    # an out-of-range label raises in eager mode (it would be a float 3.0 under Keras's casting)
    bad = targets.copy()
    bad[1, 2] = 3
    with pytest.raises(xsl.XSeqLossError, match=r"targets\[1, 2\] = 3 is out of range"):
        SequenceCrossEntropy()(bad, logits)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_float_class_ids_are_exact_integers_or_an_error(dtype):
    """Keras hands labels over as floats on some paths (float64 under MirroredStrategy's symbolic
    build; a float NumPy ``y``): accepted when every value is an exact integer, else an error naming
    the first non-integral value (eager) or a NaN loss (traced), never rounded."""
    logits, targets, mask = _batch()
    targets[0, 1] = -100
    want = xsl.sequence_cross_entropy(logits.astype(np.float64), targets, mask=mask, label_smoothing=0.1)
    loss = SequenceCrossEntropy(label_smoothing=0.1)
    got = loss(targets.astype(dtype), _with_mask(logits, mask))
    assert_close(_num(got), want, "float32")
    assert_close(_num(loss.call(targets.astype(dtype), logits)),
                 xsl.sequence_cross_entropy(logits.astype(np.float64), targets, reduction="none",
                                            label_smoothing=0.1), "float32")
    for pos, value in (((1, 2), 1.5), ((3, 0), -0.25), ((2, 4), np.nan), ((0, 3), np.inf), ((1, 1), 2.0 ** 60)):
        bad = targets.astype(dtype)
        bad[pos] = value
        shown = re.escape(repr(float(np.asarray(value, dtype))))
        with pytest.raises(xsl.XSeqLossError, match=rf"targets\[{pos[0]}, {pos[1]}\] = {shown} is not an exact int"):
            loss(bad, logits)
    # a value that is whole but not a class is the ordinary out-of-range error
    bad = targets.astype(dtype)
    bad[2, 3] = 3.0
    with pytest.raises(xsl.XSeqLossError, match=r"targets\[2, 3\] = 3 is out of range"):
        loss(bad, logits)
    # segments_in_targets: both columns converted
    pairs = np.stack([targets, np.repeat(np.arange(5)[None] // 3, 4, 0)], -1)
    seg = SequenceCrossEntropy(reduction="segment_mean", segments_in_targets=True)
    assert_close(_num(seg(pairs.astype(dtype), logits)),
                 xsl.sequence_cross_entropy(logits.astype(np.float64), targets, segment_ids=pairs[..., 1],
                                            reduction="segment_mean"), "float32")


def test_float_class_ids_traced_give_nan_for_a_non_integral_value():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the traced path is checked here under tf.function (fit covers jax.jit)")
    import tensorflow as tf
    logits, targets, _ = _batch()
    loss = SequenceCrossEntropy()
    f = tf.function(lambda y, z: loss(y, z))
    ok = f(tf.constant(targets.astype(np.float64)), tf.constant(logits))
    assert_close(_num(ok), xsl.sequence_cross_entropy(logits.astype(np.float64), targets), "float32")
    bad = targets.astype(np.float64)
    bad[1, 2] = 1.5
    assert np.isnan(_num(f(tf.constant(bad), tf.constant(logits))))


def test_soft_targets_and_call():
    logits, targets, mask = _batch()
    soft = np.eye(3, dtype=np.float32)[targets] * 0.8 + 0.2 / 3
    loss = SequenceCrossEntropy()
    got = loss(soft, _with_mask(logits, mask), sample_weight=np.arange(1, 5, dtype=np.float32))
    want = xsl.sequence_cross_entropy(logits.astype(np.float64), soft.astype(np.float64), mask=mask,
                                      weights=np.repeat(np.arange(1.0, 5.0)[:, None], 5, 1))
    assert_close(_num(got), want, "float32")
    per_token = loss.call(targets, logits)  # Loss.call: per-token losses
    assert tuple(per_token.shape) == (4, 5)
    assert_close(_num(per_token), xsl.sequence_cross_entropy(logits.astype(np.float64), targets,
                                                             reduction="none"), "float32")


def _run_fit_check(backend):
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "helpers", "keras_fit_script.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", sorted(KERAS_FRAMEWORK))
def test_fit_on_backend(backend):
    require_or_skip(KERAS_FRAMEWORK[backend])
    r = _run_fit_check(backend)
    assert r["backend"] == backend
    h = r["history"]
    assert len(h) == 2 and np.all(np.isfinite(h)) and h[1] < 0.9 * h[0], h
    seen = r["fit_seen"]
    assert all(f["targets_dtype"].startswith("int") for f in seen), seen  # labels never cast to float
    assert any(f["mask"] for f in seen), seen  # the Embedding's mask reached xseqloss during fit
    if backend == "tensorflow":
        assert any(f["logits_shape"][0] is None for f in seen), seen  # tf.function with unknown batch
    if backend == "jax":
        assert all("Tracer" in f["logits_type"] for f in seen), seen  # under jax.jit
    # evaluate() on one batch equals sequence_cross_entropy with the mask x != 0, computed here in float64
    tol = 2e-5
    assert abs(r["eval"] - r["direct"]) <= tol * (1 + abs(r["direct"])), r
    assert abs(r["direct_unmasked"] - r["direct"]) > 0.05  # so the comparison can tell the mask was used
    assert abs(r["eval_sw_tok"] - r["direct_sw_tok"]) <= tol * (1 + abs(r["direct_sw_tok"])), r
    assert abs(r["eval_sw_seq"] - r["direct_sw_seq"]) <= tol * (1 + abs(r["direct_sw_seq"])), r
    # model.save / load_model keeps the loss, all its options and its value
    assert r["loaded_loss_type"] == "SequenceCrossEntropy"
    assert r["loaded_loss_config"] == r["config"] and r["config"]["label_smoothing"] == 0.05
    assert r["eval_loaded"] == pytest.approx(r["eval"], rel=1e-6)
    # float64 labels (exact integers), as Keras hands them over: the same loss; with the global
    # normalizer (one device: the ordinary mean) too, before and after a .keras round trip
    assert r["eval_float_labels"] == pytest.approx(r["eval"], rel=1e-6)
    assert abs(r["eval_global"] - r["direct"]) <= tol * (1 + abs(r["direct"])), r
    assert r["global_loaded_normalizer"] == "global"
    assert r["eval_global_loaded"] == pytest.approx(r["eval_global"], rel=1e-6)
    # fit on float64 labels: they reach xseqloss as integers, and it trains
    assert r["float_fit_seen"] and all(f["targets_dtype"].startswith("int") for f in r["float_fit_seen"]), r
    assert np.all(np.isfinite(r["float_fit_history"])), r
