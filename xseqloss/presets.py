"""Keyword dictionaries that reproduce other systems' cross-entropy exactly when passed with ``**``.

>>> import numpy as np, xseqloss as xsl
>>> logits = np.zeros((1, 3, 2)); labels = np.array([[-100, -100, -100]])  # every token ignored
>>> float(xsl.sequence_cross_entropy(logits, labels, **xsl.presets.TORCH))  # PyTorch: mean of nothing
nan
>>> float(xsl.sequence_cross_entropy(logits, labels, **dict(xsl.presets.KERAS, ignore_index=-100)))  # Keras
0.0

A preset fixes the *semantics* (which tokens count, the reduction, what the mean divides by, the empty
rule, the smoothing convention); it never fixes ``layout`` (give the axes of your own logits, e.g.
``layout="NCT"`` for PyTorch's class-at-dim-1 tensors) or per-call values (``label_smoothing``,
``class_weights``, ``weights``, ``mask``, ``normalizer``), which you add next to it. To change a key the
preset sets, merge first: ``xsl.sequence_cross_entropy(x, y, **dict(xsl.presets.KERAS, ignore_index=0))``
(passing the same keyword twice is a ``TypeError`` in Python).

The presets are read-only (``types.MappingProxyType``): a typo such as ``TORCH["empty"] = "zero"`` raises
instead of silently changing the behaviour of every later call in the process.

Where a preset stops reproducing its system, the differences are listed with it; docs/porting.md shows
each side by side with the native call. What xseqloss keeps on purpose in every preset: out-of-range
labels raise (eager) or give NaN (traced) instead of each system's own behaviour, labels are never cast
to float, and reductions run in float32 or wider.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["TORCH", "KERAS", "OPTAX", "TFA_SEQUENCE_LOSS", "HF_FOR_CAUSAL_LM", "HF_SHIFTED_LABELS", "FAIRSEQ", "ALL"]


def _preset(**kw: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(kw))


TORCH = _preset(ignore_index=-100, smoothing="uniform", reduction="mean", denominator="weights", empty="nan")
"""``torch.nn.functional.cross_entropy`` / ``nn.CrossEntropyLoss`` with ``reduction="mean"`` (torch 2.x).

Index targets ``y`` (with ``weight=cw`` -> ``class_weights=cw``, ``label_smoothing=eps``, ``ignore_index``)::

    l_n  = (1 - eps) cw[y_n] (-log p[y_n]) + (eps / C) sum_c cw[c] (-log p[c])     (0 where ignored)
    loss = sum_n l_n / sum_n cw[y_n] over counted n                                  (NaN when 0)

Probability ("soft") targets ``q`` of the logits' shape: ``l_n = -sum_c cw[c] q~[c] log p[c]`` with
``q~ = (1 - eps) q + eps / C``, and the mean divides by the number of positions (class weights are not
in the denominator) - what xseqloss's "weights" denominator gives for soft targets without ``weights``.

Covers: ``reduction="mean"`` with or without ``weight``, ``label_smoothing``, ``ignore_index``, soft
targets, empty batches (NaN). For ``reduction="sum"``/``"none"`` use ``dict(TORCH, reduction="sum")``
(``"none"`` gives ``cw[y] * l`` per token like torch). Layout: torch wants classes at dim 1, so pass
``layout="NC"`` for (N, C) and ``layout="NCT"`` for (N, C, T) logits.
Differences kept: out-of-range labels (torch: IndexError on CPU, device assert on CUDA); int32 labels
are accepted (torch: "expected scalar type Long"); float16/bfloat16 logits give a float32 loss (torch
keeps the input dtype).
"""

KERAS = _preset(ignore_index=None, smoothing="uniform", reduction="mean", denominator="tokens", empty="zero")
"""``keras.losses.SparseCategoricalCrossentropy(from_logits=True)`` (Keras 3, reduction
``"sum_over_batch_size"``), with ``ignore_class=k`` -> ``dict(KERAS, ignore_index=k)``, the Keras mask
of ``y_pred`` -> ``mask`` and ``sample_weight`` of the tokens' shape -> ``weights``::

    l_n  = -log softmax(z_n)[y_n]                                   (0 where ignored or masked)
    loss = sum_n s_n l_n / #counted        if ignore_class or a mask is in play
         = sum_n s_n l_n / #positions      otherwise (= #counted: every position counts)
    (0 when nothing counts: divide_no_nan)

The sample weights are *not* in the denominator (a zero weight still counts as a token) - xseqloss's
``denominator="tokens"``. Keras's ``reduction="mean_with_sample_weight"`` (sum s l / sum s) is
``dict(KERAS, denominator="weights")``.
Limitations: ``from_logits=False`` (Keras's default) renormalises the probabilities and clips them to
[1e-7, 1 - 1e-7]; ``inputs="probs"`` does neither (it takes log(max(p, 1e-7)) of the given p), so the
two agree only for normalised probability rows with every entry in [1e-7, 1 - 1e-7]. Keras labels are
cast to float32 by ``Loss.__call__`` (class ids above 2**24 round); xseqloss never casts them. Under
``tf.distribute`` Keras further divides by the number of replicas.
"""

OPTAX = _preset(ignore_index=None, reduction="none")
"""``optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)`` (optax 0.2.x): the
per-token loss, class axis last, no reduction::

    l = logsumexp(z) - z[y]

``where=token_mask`` (shape of the labels) -> ``mask`` (loss 0 there). Soft labels:
``optax.losses.softmax_cross_entropy(logits, optax.smooth_labels(q, alpha))`` equals float targets
``q`` with ``label_smoothing=alpha``.
Differences kept: optax wraps labels in [-C, -1] to class C + y and gives NaN for y >= C or y < -C;
xseqloss raises (eager) or gives NaN (traced) for every out-of-range label. optax returns the logits'
dtype (bfloat16 logits give a quantised bfloat16 loss); xseqloss returns float32. A class mask
(``where`` of the logits' shape, excluding classes from the logsumexp) has no xseqloss equivalent.
"""

TFA_SEQUENCE_LOSS = _preset(ignore_index=None, reduction="mean", denominator="weights", empty="zero")
"""``tfa.seq2seq.sequence_loss(logits, targets, weights)`` with its defaults
(``average_across_timesteps=True, average_across_batch=True``); also ``tf.contrib.seq2seq`` (late 1.x) and
``tf.compat.v1.losses.sparse_softmax_cross_entropy(reduction=MEAN)``. Pass ``weights=w`` ([B, T])::

    loss = sum_bt w_bt l_bt / sum_bt w_bt          (0 when sum w == 0: div_no_nan)

Other flags: ``average_across_timesteps`` only -> ``dict(TFA_SEQUENCE_LOSS, reduction="per_sequence")``;
``average_across_batch`` only -> ``reduction="per_position"``. The ``SequenceLoss`` class default
(``sum_over_timesteps=sum_over_batch=True``) divides by the number of *nonzero* weights:
``dict(TFA_SEQUENCE_LOSS, denominator="tokens")`` with ``mask=(w != 0)`` and ``weights=w``
(TF1's ``SUM_BY_NONZERO_WEIGHTS`` likewise). Early ``tf.contrib`` versions added 1e-12 to the
denominator instead of div_no_nan (1e-12 relative difference).
Limitations: tfa requires rank-3 batch-major logits (layout "NTC"); a custom
``softmax_loss_function`` has no equivalent.
"""

HF_SHIFTED_LABELS = _preset(ignore_index=-100, smoothing="uniform", reduction="mean", denominator="weights",
                            empty="nan")
"""Hugging Face transformers ``fixed_cross_entropy`` (what ``ForCausalLMLoss`` calls after shifting), for
labels shifted already (``shift_labels=``); a causal LM's own ``labels`` take ``HF_FOR_CAUSAL_LM``::

    without num_items_in_batch:  F.cross_entropy(logits, labels, ignore_index=-100)   (mean; NaN if empty)
    with num_items_in_batch:     F.cross_entropy(..., reduction="sum") / num_items_in_batch

-> ``normalizer=num_items_in_batch`` (the global count of labels != -100 over the accumulated
micro-batches and workers, e.g. summed ``xsl.token_count``), which makes gradient accumulation exact.
This preset does not shift: ``ForCausalLMLoss`` compares ``logits[:, t]`` with ``labels[:, t + 1]``,
which is ``HF_FOR_CAUSAL_LM`` below (``shift=1``, nothing copied); slicing ``logits[:, :-1]`` by hand
copies the logits and is the classic place for a double shift.
HF casts the logits to float32 (``logits.float()``); xseqloss reduces in float32 anyway. The Trainer's
``LabelSmoother(epsilon)`` (``(1 - eps) mean nll + eps sum(-log p) / (n_active V)``) is
``label_smoothing=epsilon`` with this preset and no normalizer.
"""

HF_FOR_CAUSAL_LM = _preset(**HF_SHIFTED_LABELS, shift=1)
"""Hugging Face transformers ``ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch)``
(``transformers/loss/loss_utils.py``), its shift included::

    labels   = pad(labels, (0, 1), value=-100)[..., 1:]        # the target of step t is labels[t + 1]
    loss     = fixed_cross_entropy(logits.float().view(-1, V), labels.view(-1), num_items_in_batch)

-> ``xsl.sequence_cross_entropy(logits, labels, **HF_FOR_CAUSAL_LM, normalizer=num_items_in_batch)``:
``shift=1`` scores the logits at t against labels[t + 1] without copying the logits, and the last
step of every row never counts (HF pads labels with -100 there). ``num_items_in_batch`` must count
the *shifted* labels: ``xsl.token_count(labels, shift=1)`` summed over micro-batches and workers
(transformers PR 46204 fixed the Trainer counting the unshifted ones). Without
``num_items_in_batch`` omit ``normalizer`` (the mean over the counted shifted tokens, NaN if none).
With ``shift_labels=`` given (already shifted, e.g. for sequence parallelism) use ``HF_SHIFTED_LABELS``.
Under ``Trainer`` or as a model's ``loss_function``, ``xseqloss.hf.CausalLMLoss`` applies these rules.
"""

FAIRSEQ = _preset(ignore_index=None, inputs="log_probs", smoothing="others", reduction="sum", empty="zero")
"""fairseq ``label_smoothed_nll_loss(lprobs, target, epsilon, ignore_index=None, reduce=True)`` (since
commit 791ab7c2, 2021-02-03), with ``label_smoothing=epsilon`` and ``ignore_index=padding_idx``
(the dictionary's pad, 1 in fairseq's ``Dictionary``) -> ``dict(FAIRSEQ, ignore_index=1)``::

    nll = -lprobs[y] ; smooth = -sum_c lprobs[c]          (both 0 at ignored tokens)
    eps_i = eps / (V - 1)
    loss = sum (1 - eps - eps_i) nll + eps_i smooth        (target keeps 1 - eps, others share eps)

``inputs="log_probs"`` because fairseq takes the model's log-probabilities; raw logits with
``dict(FAIRSEQ, inputs="logits")`` give the same loss (log_softmax is applied for you). The criterion
then divides by ``sample_size`` (tokens, or sentences with ``--sentence-avg``) summed over workers and
``update_freq``: ``dict(FAIRSEQ, reduction="mean", normalizer=sample_size)``. ``reduce=False`` ->
``reduction="none"``. fairseq logs loss / ln 2 (bits); xseqloss returns nats.
Limitation: fairseq before 2021-02 (and many forks) used ``eps_i = eps / V`` and ``(1 - eps) nll``:
that is ``smoothing="uniform"``.
"""

ALL = MappingProxyType({"TORCH": TORCH, "KERAS": KERAS, "OPTAX": OPTAX, "TFA_SEQUENCE_LOSS": TFA_SEQUENCE_LOSS,
                        "HF_FOR_CAUSAL_LM": HF_FOR_CAUSAL_LM, "HF_SHIFTED_LABELS": HF_SHIFTED_LABELS, "FAIRSEQ": FAIRSEQ})
"""Every preset by name (read-only)."""


def __getattr__(name: str) -> Any:
    if name == "HF_CAUSAL_LM":  # renamed (decision 102): the old name did not say that it does not shift
        raise AttributeError("xseqloss.presets.HF_CAUSAL_LM was renamed: a causal LM's labels take "
                             "HF_FOR_CAUSAL_LM (the shift built in, as transformers' ForCausalLMLoss); labels "
                             "shifted already (shift_labels=) take HF_SHIFTED_LABELS")
    raise AttributeError(f"module 'xseqloss.presets' has no attribute {name!r}")
