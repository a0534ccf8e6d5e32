"""xseqloss.presets reproduce other systems exactly (API.md section 4).

Each preset is checked against the system itself where it is installed (PyTorch F.cross_entropy, Keras
SparseCategoricalCrossentropy, optax) and otherwise against its published code transliterated here with
NumPy (tfa.seq2seq.sequence_loss, Hugging Face fixed_cross_entropy / ForCausalLMLoss, fairseq
label_smoothed_nll_loss; sources quoted in /work/shared/reference/other-systems.md).
"""

import importlib
import os
import types

import numpy as np
import pytest

from helpers.support import assert_close, require_or_skip

import xseqloss as xsl
from xseqloss import presets

N, T, C = 3, 6, 5


def _import_or_skip(name, minversion=None):
    """Skip when ``name`` is missing, except in CI (XSEQLOSS_REQUIRE_BACKENDS=all), where the
    requirements install it and its absence means a broken environment: an error, not a skip."""
    if os.environ.get("XSEQLOSS_REQUIRE_BACKENDS", "").strip().lower() == "all":
        return importlib.import_module(name)
    return pytest.importorskip(name, minversion=minversion)


def _data(seed=0, ignore=-100):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=1.5, size=(N, T, C))
    targets = rng.integers(0, C, (N, T))
    targets[0, 4:] = ignore
    targets[2, 1] = ignore
    return logits, targets


def _log_softmax(z, axis=-1):
    m = z.max(axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis, keepdims=True))


# ------------------------------------------------------------------------------------------- generic

def test_presets_are_read_only_and_complete():
    names = ("TORCH", "KERAS", "OPTAX", "TFA_SEQUENCE_LOSS", "HF_SHIFTED_LABELS", "HF_FOR_CAUSAL_LM", "FAIRSEQ")
    assert set(names) <= set(presets.ALL)
    logits, targets = _data()
    for name in names:
        p = getattr(presets, name)
        assert isinstance(p, types.MappingProxyType) and presets.ALL[name] is p
        with pytest.raises(TypeError):
            p["reduction"] = "sum"  # noqa: read-only
        with pytest.raises((TypeError, AttributeError)):
            p.update(reduction="sum")
        assert "layout" not in p  # the layout is always the caller's
        kw = dict(p)
        if kw.get("ignore_index", -100) is None:
            kw["ignore_index"] = -100  # the data holds -100 labels
        out = xsl.sequence_cross_entropy(logits, targets, **kw)  # every key is a valid option
        assert np.all(np.isfinite(out))
    assert xsl.presets is presets
    merged = dict(presets.KERAS, ignore_index=0)
    assert merged["ignore_index"] == 0 and presets.KERAS["ignore_index"] is None


# ------------------------------------------------------------------------------------------- PyTorch

TORCH_CASES = {
    "plain": {},
    "weight": dict(weight=[1.0, 2.0, 0.5, 3.0, 1.0]),
    "smoothing": dict(label_smoothing=0.2),
    "weight+smoothing+ignore": dict(weight=[1.0, 2.0, 0.5, 3.0, 1.0], label_smoothing=0.1),
    "sum": dict(reduction="sum", weight=[0.0, 2.0, 0.5, 3.0, 1.0], label_smoothing=0.1),
    "none": dict(reduction="none", weight=[1.0, 2.0, 0.5, 3.0, 1.0], label_smoothing=0.3),
    "ignore_index=2": dict(ignore_index=2),
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_preset_equals_F_cross_entropy(case):
    require_or_skip("torch")
    import torch
    import torch.nn.functional as F

    opts = dict(TORCH_CASES[case])
    logits, targets = _data(ignore=opts.get("ignore_index", -100))
    x = np.moveaxis(logits, -1, 1)  # torch's (N, C, T)
    xt = torch.tensor(x, requires_grad=True)
    kw = {}
    if "weight" in opts:
        w = opts.pop("weight")
        kw["class_weights"] = np.array(w)
        opts["weight"] = torch.tensor(w, dtype=torch.float64)
    want = F.cross_entropy(xt, torch.as_tensor(targets), **opts)
    want.sum().backward()
    preset = dict(presets.TORCH)
    for key in ("reduction", "ignore_index"):
        if key in opts:
            preset[key] = opts[key]
    got, grad = xsl.value_and_grad(x, targets, layout="NCT", label_smoothing=opts.get("label_smoothing", 0.0),
                                   **kw, **preset)
    assert_close(got, want.detach().numpy(), what=f"torch {case} value")
    assert_close(grad, xt.grad.numpy(), what=f"torch {case} gradient")


def test_torch_preset_soft_targets_and_empty_batch():
    require_or_skip("torch")
    import torch
    import torch.nn.functional as F

    logits, _ = _data()
    x = np.moveaxis(logits, -1, 1)
    q = np.random.default_rng(3).dirichlet(np.ones(C), (N, T))
    qt = np.moveaxis(q, -1, 1)
    w = [1.0, 2.0, 0.5, 3.0, 1.0]
    # probability targets: the mean divides by #positions (N * T), class weights only inside l
    want = F.cross_entropy(torch.tensor(x), torch.tensor(qt), weight=torch.tensor(w, dtype=torch.float64),
                           label_smoothing=0.1)
    got = xsl.sequence_cross_entropy(x, qt, layout="NCT", class_weights=np.array(w), label_smoothing=0.1,
                                     **presets.TORCH)
    assert_close(got, want.numpy(), what="soft targets")
    # every target ignored: NaN, like torch (and a zero gradient)
    y = np.full((N, T), -100)
    want = F.cross_entropy(torch.tensor(x), torch.as_tensor(y))
    assert torch.isnan(want)
    got, grad = xsl.value_and_grad(x, y, layout="NCT", **presets.TORCH)
    assert np.isnan(got) and np.all(grad == 0)
    # all selected class weights zero: torch's mean is NaN too
    y = np.zeros((N, T), int)
    w0 = [0.0, 1.0, 1.0, 1.0, 1.0]
    assert torch.isnan(F.cross_entropy(torch.tensor(x), torch.as_tensor(y), weight=torch.tensor(w0, dtype=torch.float64)))
    assert np.isnan(xsl.sequence_cross_entropy(x, y, layout="NCT", class_weights=np.array(w0), **presets.TORCH))


# --------------------------------------------------------------------------------------------- Keras

@pytest.fixture(scope="module")
def keras():
    keras = _import_or_skip("keras", minversion="3.0")
    return keras


def _keras_num(keras, x):
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


def test_keras_preset_equals_sparse_categorical_crossentropy(keras):
    logits, targets = _data(ignore=0)  # ignore_class=0
    logits32 = logits.astype(np.float32)
    sw = np.random.default_rng(4).uniform(0.0, 2.0, (N, T)).astype(np.float32)
    sw[1, 2] = 0.0  # a zero weight still counts in Keras's denominator
    kloss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)
    want = _keras_num(keras, kloss(targets, logits32, sample_weight=sw))
    got = xsl.sequence_cross_entropy(logits32, targets, weights=sw, **dict(presets.KERAS, ignore_index=0))
    assert_close(got, want, "float32", "ignore_class + sample_weight")
    # weights in the denominator instead would be a different number: the test can tell
    other = xsl.sequence_cross_entropy(logits32, targets, weights=sw, ignore_index=0)
    assert abs(float(other) - float(want)) > 1e-3

    # no ignore_class, no mask: Keras divides by every position
    y = np.abs(targets) % C
    want = _keras_num(keras, keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits32,
                                                                                         sample_weight=sw))
    assert_close(xsl.sequence_cross_entropy(logits32, y, weights=sw, **presets.KERAS), want, "float32", "plain")
    # mean_with_sample_weight: sum s l / sum s
    want = _keras_num(keras, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight")(y, logits32, sample_weight=sw))
    assert_close(xsl.sequence_cross_entropy(logits32, y, weights=sw, **dict(presets.KERAS, denominator="weights")),
                 want, "float32", "mean_with_sample_weight")
    # every token ignored: 0, not NaN
    y0 = np.zeros((N, T), int)
    want = _keras_num(keras, kloss(y0, logits32))
    assert want == 0.0
    assert float(xsl.sequence_cross_entropy(logits32, y0, **dict(presets.KERAS, ignore_index=0))) == 0.0


def test_keras_preset_with_a_keras_mask(keras):
    from keras.src.backend import set_keras_mask

    logits, targets = _data()
    targets = np.abs(targets) % C
    logits32 = logits.astype(np.float32)
    mask = np.ones((N, T), bool)
    mask[0, 3:] = False
    y_pred = keras.ops.convert_to_tensor(logits32)
    set_keras_mask(y_pred, keras.ops.convert_to_tensor(mask))
    sw = np.linspace(0.5, 1.5, N * T).reshape(N, T).astype(np.float32)
    want = _keras_num(keras, keras.losses.SparseCategoricalCrossentropy(from_logits=True)(targets, y_pred,
                                                                                         sample_weight=sw))
    got = xsl.sequence_cross_entropy(logits32, targets, mask=mask, weights=sw, **presets.KERAS)
    assert_close(got, want, "float32", "Keras mask")


# --------------------------------------------------------------------------------------------- optax

def test_optax_preset_equals_softmax_cross_entropy_with_integer_labels():
    require_or_skip("jax")
    optax = _import_or_skip("optax")
    import jax.numpy as jnp

    logits, targets = _data()
    y = np.abs(targets) % C
    want = np.asarray(optax.losses.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(y)))
    got = xsl.sequence_cross_entropy(logits, y, **presets.OPTAX)
    assert got.shape == (N, T)
    assert_close(got, want, what="per token")
    # where= token mask -> mask
    where = np.random.default_rng(5).random((N, T)) > 0.3
    want = np.asarray(optax.losses.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(logits), jnp.asarray(y), where=jnp.asarray(where)[..., None] & jnp.ones(C, bool)))
    assert_close(xsl.sequence_cross_entropy(logits, y, mask=where, **presets.OPTAX), want, what="where")
    # soft labels with smooth_labels -> float targets with label_smoothing
    q = np.random.default_rng(6).dirichlet(np.ones(C), (N, T))
    want = np.asarray(optax.losses.softmax_cross_entropy(jnp.asarray(logits),
                                                         optax.smooth_labels(jnp.asarray(q), 0.1)))
    assert_close(xsl.sequence_cross_entropy(logits, q, label_smoothing=0.1, **presets.OPTAX), want, what="smoothed")


# ----------------------------------------------------------------------------- tfa.seq2seq.sequence_loss

def _tfa_sequence_loss(logits, targets, weights, average_across_timesteps=True, average_across_batch=True,
                       sum_over_timesteps=False, sum_over_batch=False):
    """tfa.seq2seq.sequence_loss (final tfa code), transliterated; divisions are div_no_nan."""
    def div_no_nan(a, b):
        return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))

    crossent = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
    crossent = crossent * weights
    if average_across_timesteps and average_across_batch:
        return div_no_nan(crossent.sum(), weights.sum())
    if sum_over_timesteps and sum_over_batch:
        return div_no_nan(crossent.sum(), np.count_nonzero(weights))
    if average_across_timesteps:
        return div_no_nan(crossent.sum(1), weights.sum(1))
    if average_across_batch:
        return div_no_nan(crossent.sum(0), weights.sum(0))
    if sum_over_timesteps:
        return div_no_nan(crossent.sum(1), np.count_nonzero(weights, 1))
    if sum_over_batch:
        return div_no_nan(crossent.sum(0), np.count_nonzero(weights, 0))
    return crossent


def test_tfa_sequence_loss_preset_and_its_flags():
    logits, targets = _data()
    y = np.abs(targets) % C
    w = np.random.default_rng(7).uniform(0.0, 2.0, (N, T))
    w[0, 3:] = 0.0  # padding
    p = presets.TFA_SEQUENCE_LOSS
    assert_close(xsl.sequence_cross_entropy(logits, y, weights=w, **p), _tfa_sequence_loss(logits, y, w))
    assert_close(xsl.sequence_cross_entropy(logits, y, weights=w, **dict(p, reduction="per_sequence")),
                 _tfa_sequence_loss(logits, y, w, average_across_batch=False))
    assert_close(xsl.sequence_cross_entropy(logits, y, weights=w, **dict(p, reduction="per_position")),
                 _tfa_sequence_loss(logits, y, w, average_across_timesteps=False))
    # SequenceLoss's default: sum over both axes divided by the number of nonzero weights
    assert_close(xsl.sequence_cross_entropy(logits, y, weights=w, mask=w != 0, **dict(p, denominator="tokens")),
                 _tfa_sequence_loss(logits, y, w, False, False, True, True))
    # all weights zero: 0 (div_no_nan)
    z = np.zeros((N, T))
    assert float(xsl.sequence_cross_entropy(logits, y, weights=z, **p)) == float(_tfa_sequence_loss(logits, y, z)) == 0


# ------------------------------------------------------------------------------------- Hugging Face

def _hf_fixed_cross_entropy(source, target, num_items_in_batch=None, ignore_index=-100):
    """transformers' fixed_cross_entropy (F.cross_entropy on (tokens, V)), transliterated with NumPy."""
    valid = target != ignore_index
    nll = -np.take_along_axis(_log_softmax(source), np.where(valid, target, 0)[:, None], -1)[:, 0]
    total = np.where(valid, nll, 0.0).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        if num_items_in_batch is not None:
            return total / num_items_in_batch  # reduction="sum" then / num_items_in_batch
        return total / valid.sum()  # reduction="mean": NaN when nothing counts


def _hf_for_causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100):
    labels = np.pad(labels, ((0, 0), (0, 1)), constant_values=ignore_index)[:, 1:]  # shift left
    return _hf_fixed_cross_entropy(logits.reshape(-1, vocab_size), labels.reshape(-1), num_items_in_batch,
                                   ignore_index)


def test_hf_causal_lm_preset_with_and_without_num_items_in_batch():
    logits, labels = _data(seed=8)
    p = presets.HF_SHIFTED_LABELS
    # the shift is the caller's: logits[:, :-1] predict labels[:, 1:]
    want = _hf_for_causal_lm_loss(logits, labels, C)
    got = xsl.sequence_cross_entropy(logits[:, :-1], labels[:, 1:], **p)
    assert_close(got, want, what="mean")
    # gradient accumulation: two micro-batches, num_items_in_batch = labels != -100 over both
    (l1, y1), (l2, y2) = (logits[:2], labels[:2]), (logits[2:], labels[2:])
    num_items = int(np.sum(labels[:, 1:] != -100))
    assert num_items == int(xsl.token_count(y1[:, 1:])) + int(xsl.token_count(y2[:, 1:]))
    parts = [xsl.sequence_cross_entropy(a[:, :-1], b[:, 1:], normalizer=num_items, **p) for a, b in ((l1, y1), (l2, y2))]
    hf_parts = [_hf_for_causal_lm_loss(a, b, C, num_items) for a, b in ((l1, y1), (l2, y2))]
    assert_close(np.array(parts), np.array(hf_parts), what="micro-batches")
    assert_close(sum(parts), want, what="accumulated = full batch")
    # empty batch: HF's mean is NaN (torch); with num_items_in_batch 0/0 is NaN too
    y = np.full((N, T), -100)
    assert np.isnan(_hf_for_causal_lm_loss(logits, y, C)) and np.isnan(xsl.sequence_cross_entropy(logits, y, **p))
    assert np.isnan(xsl.sequence_cross_entropy(logits, y, normalizer=0, **p))
    # a micro-batch with nothing to count while others have: 0 / num_items = 0
    assert float(xsl.sequence_cross_entropy(logits, y, normalizer=5, **p)) == 0.0


def test_hf_preset_equals_torch_fixed_cross_entropy():
    """The same, against the real F.cross_entropy calls that fixed_cross_entropy makes."""
    require_or_skip("torch")
    import torch
    import torch.nn.functional as F

    logits, labels = _data(seed=9)
    src = torch.tensor(logits[:, :-1]).reshape(-1, C)
    tgt = torch.as_tensor(labels[:, 1:]).reshape(-1)
    want_mean = F.cross_entropy(src, tgt, ignore_index=-100)
    want_sum = F.cross_entropy(src, tgt, ignore_index=-100, reduction="sum") / 11
    p = presets.HF_SHIFTED_LABELS
    assert_close(xsl.sequence_cross_entropy(logits[:, :-1], labels[:, 1:], **p), want_mean.numpy())
    assert_close(xsl.sequence_cross_entropy(logits[:, :-1], labels[:, 1:], normalizer=11, **p), want_sum.numpy())


def test_hf_preset_names_say_whether_they_shift():
    """HF_CAUSAL_LM (no shift) was one word away from HF_FOR_CAUSAL_LM (shift=1): an unshifted loss
    for a causal LM's labels. The unshifted one is now named for what it takes; the old name says
    which to use instead of silently meaning either."""
    assert presets.HF_FOR_CAUSAL_LM["shift"] == 1 and "shift" not in presets.HF_SHIFTED_LABELS
    assert dict(presets.HF_FOR_CAUSAL_LM) == dict(presets.HF_SHIFTED_LABELS, shift=1)
    with pytest.raises(AttributeError, match="renamed: a causal LM's labels take HF_FOR_CAUSAL_LM.*HF_SHIFTED_LABELS"):
        presets.HF_CAUSAL_LM  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'HF_CAUSAL'"):
        presets.HF_CAUSAL  # noqa: B018
    assert "HF_CAUSAL_LM" not in presets.ALL and "HF_CAUSAL_LM" not in presets.__all__


# ------------------------------------------------------------------------------------------- fairseq

def _fairseq_label_smoothed_nll_loss(lprobs, target, epsilon, ignore_index=None, reduce=True):
    """fairseq/criterions/label_smoothed_cross_entropy.py (after commit 791ab7c2), with NumPy."""
    if target.ndim == lprobs.ndim - 1:
        target = target[..., None]
    safe = np.where(target == ignore_index, 0, target) if ignore_index is not None else target
    nll_loss = -np.take_along_axis(lprobs, safe, -1)
    smooth_loss = -lprobs.sum(-1, keepdims=True)
    if ignore_index is not None:
        pad_mask = target == ignore_index
        nll_loss = np.where(pad_mask, 0.0, nll_loss)
        smooth_loss = np.where(pad_mask, 0.0, smooth_loss)
    nll_loss, smooth_loss = nll_loss[..., 0], smooth_loss[..., 0]
    if reduce:
        nll_loss, smooth_loss = nll_loss.sum(), smooth_loss.sum()
    eps_i = epsilon / (lprobs.shape[-1] - 1)
    return (1.0 - epsilon - eps_i) * nll_loss + eps_i * smooth_loss, nll_loss


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_fairseq_preset_equals_label_smoothed_nll_loss(eps):
    logits, targets = _data(seed=10, ignore=1)  # fairseq's pad index is 1
    lprobs = _log_softmax(logits)
    want, _ = _fairseq_label_smoothed_nll_loss(lprobs, targets, eps, ignore_index=1)
    p = dict(presets.FAIRSEQ, ignore_index=1)
    assert_close(xsl.sequence_cross_entropy(lprobs, targets, label_smoothing=eps, **p), want, what="lprobs")
    # the same from raw logits
    assert_close(xsl.sequence_cross_entropy(logits, targets, label_smoothing=eps, **dict(p, inputs="logits")), want,
                 what="logits")
    # reduce=False -> reduction="none"
    per_token, _ = _fairseq_label_smoothed_nll_loss(lprobs, targets, eps, ignore_index=1, reduce=False)
    assert_close(xsl.sequence_cross_entropy(lprobs, targets, label_smoothing=eps, **dict(p, reduction="none")),
                 per_token, what="per token")
    # the trainer's normalisation: / sample_size
    assert_close(xsl.sequence_cross_entropy(lprobs, targets, label_smoothing=eps,
                                            **dict(p, reduction="mean", normalizer=7)), want / 7, what="sample_size")
    if eps:  # the two smoothing conventions really differ
        uniform = xsl.sequence_cross_entropy(lprobs, targets, label_smoothing=eps, **dict(p, smoothing="uniform"))
        assert abs(float(uniform) - float(want)) > 1e-3


def test_fairseq_equals_torch_with_rescaled_smoothing():
    """Verified relation: fairseq(eps) == F.cross_entropy(label_smoothing=eps*V/(V-1), reduction="sum")."""
    require_or_skip("torch")
    import torch
    import torch.nn.functional as F

    logits, targets = _data(seed=11)
    eps = 0.2
    want = F.cross_entropy(torch.tensor(logits).reshape(-1, C), torch.as_tensor(targets).reshape(-1),
                           label_smoothing=eps * C / (C - 1), reduction="sum")
    got = xsl.sequence_cross_entropy(logits, targets, label_smoothing=eps,
                                     **dict(presets.FAIRSEQ, inputs="logits", ignore_index=-100))
    assert_close(got, want.numpy())
